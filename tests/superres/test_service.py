"""The SuperResolution service over real gRPC, with a tiny real model artifact."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from services import client
from services.common.images import decode_image
from services.common.server import RunningServer, start_in_thread
from services.common.tiling import TileOutput, tiled_apply
from tests.conftest import (
    check_a_hung_up_header_read_holds_its_slot,
    encode,
    pixel_budget_full,
    server_config,
)
from tests.fixtures import bad_images, icc
from training import nets
from training.export import export_artifact

ARCH = {"type": "superres-resnet", "width": 8, "blocks": 2}


def make_tiny_model(models_dir: Path, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    module = nets.build(ARCH)
    tail = module.get_submodule("tail")
    assert isinstance(tail, torch.nn.Conv2d)
    with torch.no_grad():  # make the untrained residual visible, not just bicubic
        tail.weight.mul_(20.0)
    export_artifact(models_dir / name, name=name, task="superres", architecture=ARCH,
                    module=module, metrics={"note": "untrained test model"}, data=[],
                    command="tests", device="cpu")


@pytest.fixture(scope="module")
def sr_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    make_tiny_model(models_dir, "superres-psnr", 1)
    make_tiny_model(models_dir, "superres-perceptual", 2)
    return models_dir


@pytest.fixture(scope="module")
def sr_server(sr_models: Path) -> Iterator[RunningServer]:
    running = start_in_thread(server_config("superres", models_dir=sr_models, max_batch=8,
                                            max_wait_ms=20))
    yield running
    running.stop()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_upscale_round_trip(sr_server: RunningServer, sr_models: Path, small_photo: np.ndarray,
                            fmt: str, ext: str) -> None:
    response = client.upscale(client.connect(sr_server.target), encode(small_photo, fmt),
                              output_format=client.format_for_path("x" + ext))
    decoded = decode_image(response.image, max_pixels=10**8)
    assert (decoded.width, decoded.height) == (96 * 4, 64 * 4)
    assert (response.width, response.height) == (384, 256)
    # the preferred default, as the artifact this server serves (not the committed one)
    # names its version
    version = json.loads((sr_models / "superres-perceptual" / "config.json")
                         .read_text())["version"]
    assert response.model == f"superres-perceptual@{version}"
    bicubic = np.asarray(Image.fromarray(small_photo).resize((384, 256), Image.Resampling.BICUBIC))
    assert psnr(decoded.rgb, bicubic) > 20  # a real upscale of the same picture


def test_grey_input_gives_grey_output(sr_server: RunningServer,
                                      small_photo: np.ndarray) -> None:
    """A grey picture comes back grey: a grey PNG (grey + alpha for grey + alpha, a grey
    JPEG when JPEG is asked for), not an RGB one tinted by the network's residual, which
    it adds to each of the three equal channels it sees (the served test model, untrained
    and 20 times louder, moved them apart by up to 9 levels). PSNR against a bicubic
    upscale of the grey picture measured 35.5 dB."""
    from percept.v1 import image_pb2

    channel = client.connect(sr_server.target)
    grey = Image.fromarray(small_photo).convert("L")
    bicubic = np.asarray(grey.resize((384, 256), Image.Resampling.BICUBIC))
    response = client.upscale(channel, bad_images.grey_png(small_photo))
    with Image.open(io.BytesIO(response.image)) as output:
        assert output.format == "PNG" and output.mode == "L" and output.size == (384, 256)
        assert psnr(np.asarray(output), bicubic) > 30  # an upscale of the same picture
    height, width = small_photo.shape[:2]
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    grey_alpha = Image.fromarray(np.dstack([np.asarray(grey), ramp]), "LA")
    response = client.upscale(channel, bad_images.save(grey_alpha, "PNG"))
    with Image.open(io.BytesIO(response.image)) as output:
        assert output.mode == "LA" and output.size == (384, 256)
    response = client.upscale(channel, bad_images.grey_png(small_photo),
                              output_format=image_pb2.IMAGE_FORMAT_JPEG)
    with Image.open(io.BytesIO(response.image)) as output:
        assert output.format == "JPEG" and output.mode == "L"
    # a colour photo stays RGB
    response = client.upscale(channel, bad_images.save(Image.fromarray(small_photo), "PNG"))
    with Image.open(io.BytesIO(response.image)) as output:
        assert output.mode == "RGB"


def test_alpha_is_upscaled_and_kept(sr_server: RunningServer, small_photo: np.ndarray) -> None:
    response = client.upscale(client.connect(sr_server.target), bad_images.rgba_png(small_photo))
    decoded = decode_image(response.image, max_pixels=10**8)
    assert decoded.alpha is not None and decoded.alpha.shape == (256, 384)
    assert decoded.alpha[:, :8].mean() < 20 and decoded.alpha[:, -8:].mean() > 235


def test_an_rgb_colour_profile_is_carried_to_the_output(sr_server: RunningServer,
                                                        small_photo: np.ndarray) -> None:
    """The output keeps the input's colours, so it keeps their profile; one that littlecms
    cannot read (a header and no tags) is of no use to a viewer either, and is dropped."""
    channel = client.connect(sr_server.target)
    profile = icc.rgb_profile()
    response = client.upscale(channel,
                              bad_images.with_icc_profile(small_photo, "RGB", profile))
    decoded = decode_image(response.image, max_pixels=10**8)
    assert decoded.icc_profile == profile and decoded.width == 384
    damaged = bad_images.with_icc_profile(small_photo, "RGB", bad_images.icc_profile(b"RGB "))
    response = client.upscale(channel, damaged)
    with Image.open(io.BytesIO(response.image)) as output:
        assert "icc_profile" not in output.info


def test_model_is_chosen_by_name(sr_server: RunningServer, small_photo: np.ndarray) -> None:
    channel = client.connect(sr_server.target)
    psnr_model = client.upscale(channel, encode(small_photo), model="superres-psnr")
    assert psnr_model.model == "superres-psnr@1"
    with pytest.raises(grpc.RpcError) as error:
        client.upscale(channel, encode(small_photo), model="nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "superres-perceptual, superres-psnr" in error.value.details()


@pytest.mark.parametrize("kwargs, data, message", [
    ({}, b"", "empty image"),
    ({}, b"not an image", "not a decodable image"),
    ({}, None, "truncated|corrupt"),
    ({"scale": 2}, "photo", "scale must be 4"),
    # checked whatever the format, though PNG (the default) ignores it (superres.proto)
    ({"quality": 101}, "photo", r"^quality must be 1\.\.100, got 101$"),
    ({"quality": -1, "output_format": 1}, "photo", r"^quality must be 1\.\.100, got -1$"),
    ({}, "tiny", "the minimum is 8x8"),
    # from the header, without decoding 7 million pixels first
    ({}, "thin header", "^image is 7x1000000; the minimum is 8x8$"),
    # what libtiff found, not Pillow's bare "decoder error -2" (and not on stderr)
    ({}, "damaged tiff", "^corrupt image data: ZIPDecode: Decoding error at scanline 0 "),
    # refused from the marker structure: decoding 5,000 empty scans would take seconds
    ({}, "scan bomb", "^image is a JPEG of more than 256 scans"),
    # refused from the chunk and block structures: Pillow would walk them for seconds
    ({}, "chunk bomb", "^image is a PNG of more than 65536 chunks"),
    ({}, "comment bomb", "^image is a GIF of more than 1024 comment blocks"),
    ({}, "long rle", "^image is a BMP of more than 8 MB of run-length-coded pixels"),
    ({}, "strip bomb", "^image is a TIFF of more than 65536 uncompressed strips"),
    ({}, "tag bomb", "^image is a TIFF of more than 4096 tags in its first directory"),
])
def test_bad_requests(sr_server: RunningServer, small_photo: np.ndarray, kwargs: dict,
                      data: object, message: str, capfd: pytest.CaptureFixture[str]) -> None:
    from percept.v1 import superres_pb2, superres_pb2_grpc

    if data is None:
        data = bad_images.truncated_jpeg(small_photo)
    elif data == "photo":
        data = encode(small_photo)
    elif data == "tiny":
        data = encode(small_photo[:4, :4])
    elif data == "thin header":
        data = bad_images.png_bomb(7, 1_000_000)
    elif data == "scan bomb":
        data = bad_images.jpeg_with_empty_scans(small_photo, 5000)
    elif data == "chunk bomb":
        data = bad_images.png_with_empty_chunks(small_photo, 1_000_000)
    elif data == "comment bomb":
        data = bad_images.gif_with_extensions(small_photo, b"\x21\xfe\x00", 1_000_000)
    elif data == "long rle":  # 4.2 M one-pixel runs
        data = bad_images.bmp_rle(4096, 1030, (b"\x01\x07" * 4096 + b"\x00\x00") * 1030)
    elif data == "strip bomb":  # a row per strip
        data = bad_images.uncompressed_tiff(np.zeros((100_000, 8), np.uint8))
    elif data == "tag bomb":
        data = bad_images.uncompressed_tiff(small_photo[..., 0], 8, extra_tags=65_000)
    elif data == "damaged tiff":
        data = bad_images.tiff_with_damaged_deflate_strip(small_photo)
    stub = superres_pb2_grpc.SuperResolutionStub(client.connect(sr_server.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.Upscale(superres_pb2.UpscaleRequest(image=data, **kwargs), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.value.details())
    assert client.health_status(client.connect(sr_server.target),
                                "percept.v1.SuperResolution") == "SERVING"
    assert "Decoding error" not in capfd.readouterr().err


def test_an_image_too_small_is_invalid_even_when_the_server_is_busy(
        sr_server: RunningServer, small_photo: np.ndarray) -> None:
    """Under 8x8 is refused from the header before the pixel budget: a busy answer would
    tell the client to retry a request that can never succeed."""
    with pixel_budget_full(sr_server), pytest.raises(grpc.RpcError) as error:
        client.upscale(client.connect(sr_server.target), encode(small_photo[:7, :40]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "image is 40x7; the minimum is 8x8"


def test_a_hung_up_header_read_keeps_its_request_slot(sr_models: Path,
                                                       small_photo: np.ndarray) -> None:
    running = start_in_thread(server_config("superres", models_dir=sr_models, max_queue=1))
    channel = client.connect(running.target)
    try:
        check_a_hung_up_header_read_holds_its_slot(
            lambda image, timeout: client.upscale(channel, image, timeout=timeout),
            encode(small_photo[::-1]), encode(small_photo))
    finally:
        channel.close()
        running.stop()


def test_output_pixel_cap(sr_models: Path, small_photo: np.ndarray) -> None:
    running = start_in_thread(server_config("superres", models_dir=sr_models,
                                            max_pixels=96 * 64 * 4))
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.upscale(client.connect(running.target), encode(small_photo))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the cap of 49152 (2 x --max-pixels)" in error.value.details()
    finally:
        running.stop()


def test_an_output_over_the_cap_is_invalid_even_when_the_server_is_busy(
        sr_models: Path) -> None:
    """Refused from the header with INVALID_ARGUMENT, before the pixel budget: a busy
    answer would tell the client to retry a request that can never succeed."""
    from services.common.artifacts import load_artifact
    from services.common.errors import Busy, InvalidArgument
    from services.common.image_model import TiledImageModel
    from tests.fixtures.bad_images import png_bomb

    config = server_config("superres", models_dir=sr_models, max_pixels=1_000_000,
                           max_inflight_mpixels=1)
    model = TiledImageModel(load_artifact(sr_models, "superres-psnr", torch.device("cpu")),
                            torch.device("cpu"), config, scale=4, tile=64, overlap=8,
                            max_output_pixels=2 * config.max_pixels)
    with model.admitted(png_bomb(200, 200), config.max_pixels):  # 0.68 of the 1 MP budget
        with (pytest.raises(InvalidArgument, match=r"^the output would have 16000000 pixels, "
                                                   r"over the cap of 2000000"),
              model.admitted(png_bomb(1000, 1000), config.max_pixels)):
            pytest.fail("admitted")
        with pytest.raises(Busy), model.admitted(png_bomb(150, 150), config.max_pixels):
            pytest.fail("admitted")


def test_a_result_over_the_message_limit_says_what_to_do(sr_models: Path) -> None:
    """A 256 px noise JPEG (well under 1 MiB) upscales to 1024 px of noise: over 1 MiB as
    PNG. The refusal is ours, with the fix, not gRPC's bare 'larger than max'; JPEG fits."""
    from percept.v1 import image_pb2

    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    request = encode(noise, "JPEG", quality=90)
    assert len(request) < 2**20
    running = start_in_thread(server_config("superres", models_dir=sr_models, max_message_mb=1))
    try:
        channel = client.connect(running.target)
        with pytest.raises(grpc.RpcError) as error:
            client.upscale(channel, request)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(r"the 1024x1024 result encodes to \d+\.\d MiB as PNG, over this "
                            r"server's message limit of 1 MiB \(--max-message-mb\); ask for "
                            r"JPEG or WebP output, or send a smaller image",
                            error.value.details()), error.value.details()
        assert "grpc-retry-pushback-ms" not in dict(error.value.trailing_metadata() or ())
        reply = client.upscale(channel, request, output_format=image_pb2.IMAGE_FORMAT_JPEG)
        assert (reply.width, reply.height) == (1024, 1024) and len(reply.image) < 2**20
        channel.close()
    finally:
        running.stop()


def test_tiled_and_untiled_outputs_agree(sr_server: RunningServer, photo: np.ndarray) -> None:
    """A 512 px image in 128 px tiles against one untiled forward pass."""
    from services.superres.service import SuperResolutionService

    service = sr_server.server.modules[0]
    assert isinstance(service, SuperResolutionService)
    model = service.models["superres-psnr"]
    image = np.asarray(Image.fromarray(photo).resize((512, 341), Image.Resampling.BICUBIC))
    untiled = model.run_batch([image])[0]
    assert untiled.dtype == np.uint8

    async def tiled() -> np.ndarray:
        async def process(tiles: Sequence[np.ndarray]) -> Sequence[TileOutput]:
            return model.run_batch(tiles) if len({t.shape for t in tiles}) == 1 else \
                [model.run_batch([t])[0] for t in tiles]
        return await tiled_apply(image, process, scale=4, tile=128, overlap=16)

    result = asyncio.run(tiled())
    assert result.shape == untiled.shape
    assert psnr(result, untiled) > 45, "tiling changed the output visibly"


def test_concurrent_requests_batch_their_tiles(sr_server: RunningServer,
                                               small_photo: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import REGISTRY

    queue = {"queue": "model-superres-perceptual"}
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, queue) or 0.0

    names = ("percept_batch_size_count", "percept_batch_size_sum",
             "percept_batch_seconds_count", "percept_batch_seconds_sum")
    before = [sample(name) for name in names]
    channel = client.connect(sr_server.target)
    data = encode(small_photo)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.upscale(channel, data), range(16)))
    took = time.monotonic() - started
    batches, items, timed, busy = (sample(name) - value for name, value in zip(names, before,
                                                                                 strict=True))
    assert items == 16
    assert batches < 16, "16 concurrent requests ran as 16 batches of one"
    assert timed == batches  # each batch's time, one after another on one model thread:
    assert 0 < busy < took  # the model was busy for part of the calls' time


def test_an_unknown_output_format_is_refused_before_any_tile_runs(
        sr_server: RunningServer, photo: np.ndarray) -> None:
    """INVALID_ARGUMENT at once, not after the network has upscaled the whole image (which
    takes seconds to minutes on a CPU) only for the encoder to refuse the format."""
    from percept.v1 import superres_pb2, superres_pb2_grpc
    from services.superres.service import SuperResolutionService

    service = sr_server.server.modules[0]
    assert isinstance(service, SuperResolutionService)
    models = service.models
    before = {name: model.batcher.batches_run for name, model in models.items()}
    stub = superres_pb2_grpc.SuperResolutionStub(client.connect(sr_server.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.Upscale(superres_pb2.UpscaleRequest(image=encode(photo), output_format=99),
                     timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "unknown output_format 99"
    assert {name: model.batcher.batches_run for name, model in models.items()} == before


RED = (220, 30, 30)


def red_disc_on_transparent_black(side: int = 64) -> np.ndarray:
    """An RGBA logo as exporters write it: an anti-aliased red disc (its edge pixels red and
    partly transparent) on fully transparent pixels whose hidden colour is black."""
    sub = 8  # alpha = the disc's coverage of each pixel, from 8x8 samples
    centre, radius = side / 2, side * 0.35
    coords = (np.arange(side * sub) + 0.5) / sub
    inside = (coords[None, :] - centre) ** 2 + (coords[:, None] - centre) ** 2 < radius**2
    alpha = np.round(inside.reshape(side, sub, side, sub).mean((1, 3)) * 255).astype(np.uint8)
    rgb = np.where(alpha[..., None] > 0, np.array(RED, np.uint8), np.uint8(0))
    return np.dstack([rgb, alpha])


def test_alpha_edges_keep_the_visible_colour(sr_server: RunningServer) -> None:
    """The colour hidden under fully transparent pixels is invisible in the input and must
    stay so: every pixel the output shows (alpha > 0) of a uniformly red disc is the red of
    a uniformly red image's upscale, not darkened by the black around it (a dark halo that
    plain bicubic resizing in Pillow, which weights colours by alpha, does not draw)."""
    logo = red_disc_on_transparent_black()
    channel = client.connect(sr_server.target)
    result = decode_image(client.upscale(channel, encode(logo)).image, max_pixels=10**8)
    solid = np.broadcast_to(np.array(RED, np.uint8), (*logo.shape[:2], 3)).copy()
    reference = decode_image(client.upscale(channel, encode(solid)).image, max_pixels=10**8)
    assert result.alpha is not None and result.alpha.shape == (256, 256)
    shown_px = result.alpha > 0
    assert shown_px.sum() > 0.3 * shown_px.size and not shown_px.all()
    error = np.abs(result.rgb.astype(int) - reference.rgb.astype(int))[shown_px]
    assert error.max() <= 2, f"edge colours off by up to {error.max()} levels"


def test_a_jpeg_of_an_rgba_image_is_the_upscale_of_the_image_on_white(
        sr_server: RunningServer) -> None:
    """JPEG holds no alpha: the result is that of the image as it looks on a white page
    (the transparent corners white, as an editor flattens it for JPEG), not of the black
    the exporter hid under them."""
    from percept.v1 import image_pb2

    logo = red_disc_on_transparent_black()
    reply = client.upscale(client.connect(sr_server.target), encode(logo),
                           output_format=image_pb2.IMAGE_FORMAT_JPEG)
    result = decode_image(reply.image, max_pixels=10**8)
    assert result.alpha is None and result.rgb.shape == (256, 256, 3)
    assert result.rgb[:24, :24].min() > 239 and result.rgb[-24:, -24:].min() > 239
    assert np.abs(result.rgb[128, 128].astype(int) - RED).max() < 16


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_colour_key_transparency_is_kept(sr_server: RunningServer, small_photo: np.ndarray,
                                           mode: str) -> None:
    """An RGB or grey PNG may mark one colour transparent (its tRNS chunk) instead of
    carrying an alpha channel; the output keeps those pixels transparent."""
    image = small_photo.copy()
    image[:, :32] = 0  # the left third: the transparent colour
    data = bad_images.save(Image.fromarray(image).convert(mode), "PNG",
                           transparency=(0, 0, 0) if mode == "RGB" else 0)
    result = decode_image(client.upscale(client.connect(sr_server.target), data).image,
                          max_pixels=10**8)
    assert result.alpha is not None
    assert result.alpha[:, :120].max() == 0 and result.alpha[:, 136:].min() == 255


def test_fill_transparent_gives_hidden_pixels_the_nearest_visible_colour() -> None:
    from services.common.alpha import fill_transparent

    red, green = np.array([200, 10, 10], np.uint8), np.array([10, 200, 10], np.uint8)
    rgb = np.zeros((10, 64, 3), np.uint8)
    rgb[:, :29], rgb[:, 35:] = red, green
    alpha = np.full((10, 64), 255, np.uint8)
    alpha[:, 29:35] = 0  # a hidden black strip between the two
    alpha[:, 0] = 1  # visible, though barely: kept as it is
    rgb[:, 0] = 77
    filled = fill_transparent(rgb, alpha)
    assert (filled[alpha > 0] == rgb[alpha > 0]).all()
    assert (filled[:, 29:32] == red).all() and (filled[:, 32:35] == green).all()

    # one visible pixel of an odd-sized strip colours it all, whatever the shape
    for shape in [(1, 9), (9, 1), (7, 5)]:
        rgb, alpha = np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.uint8)
        rgb[-1, -1], alpha[-1, -1] = (10, 20, 30), 128
        assert (fill_transparent(rgb, alpha) == (10, 20, 30)).all()
    # colours are weighted by their alpha
    rgb, alpha = np.zeros((2, 2, 3), np.uint8), np.array([[255, 85], [0, 0]], np.uint8)
    rgb[0, 0], rgb[0, 1] = (200, 0, 0), (0, 0, 200)
    assert fill_transparent(rgb, alpha)[1].tolist() == [[150, 0, 50]] * 2
    # nothing hidden, or nothing visible: nothing to take a colour from, or to give one to
    rgb = np.full((4, 4, 3), 9, np.uint8)
    assert fill_transparent(rgb, np.full((4, 4), 255, np.uint8)) is rgb
    assert fill_transparent(rgb, np.zeros((4, 4), np.uint8)) is rgb


@pytest.mark.parametrize("fmt, side, limit", [("WEBP", 4100, 16383), ("JPEG", 16400, 65500)])
def test_a_result_too_wide_for_the_format_is_refused_before_any_tile_runs(
        sr_server: RunningServer, fmt: str, side: int, limit: int) -> None:
    """4x of a 4,100 px wide strip is over WebP's 16,383 px a side (16,400 over JPEG's
    65,500): INVALID_ARGUMENT saying to ask for PNG, before the network upscales it all."""
    from percept.v1 import image_pb2
    from services.superres.service import SuperResolutionService

    service = sr_server.server.modules[0]
    assert isinstance(service, SuperResolutionService)
    batches = service.models["superres-perceptual"].batcher.batches_run
    strip = np.random.default_rng(0).integers(0, 256, (8, side, 3), np.uint8)
    with pytest.raises(grpc.RpcError) as error:
        client.upscale(client.connect(sr_server.target), encode(strip),
                       output_format=getattr(image_pb2, f"IMAGE_FORMAT_{fmt}"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(
        f"the {4 * side}x32 result is over {fmt}'s limit of {limit} px a side; ask for PNG")
    assert service.models["superres-perceptual"].batcher.batches_run == batches


def test_an_image_of_one_tile_is_queued_as_small_and_a_tiled_one_is_not(
        sr_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher serves small requests ahead of the queued tiles of larger ones
    (services/common/batching.py): an image of one tile is small, every tile of a larger
    image is not."""
    from services.common.batching import MicroBatcher

    seen: list[tuple[tuple[int, ...], bool]] = []
    submit = MicroBatcher.submit

    async def recording(self: MicroBatcher, item: np.ndarray, **options: object) -> object:
        seen.append((item.shape, bool(options.get("small", True))))
        return await submit(self, item, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(MicroBatcher, "submit", recording)
    channel = client.connect(sr_server.target)
    rng = np.random.default_rng(0)
    client.upscale(channel, encode(rng.integers(0, 255, (64, 80, 3), np.uint8)))
    assert seen == [((64, 80, 3), True)]
    seen.clear()
    client.upscale(channel, encode(rng.integers(0, 255, (300, 560, 3), np.uint8)))
    assert len(seen) > 1 and not any(small for _, small in seen)
