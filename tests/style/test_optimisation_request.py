"""services/style/optimisation.py: what a StylizeWithImage request's images become before
the optimisation runs (the network-free part, so no VGG is loaded)."""

from __future__ import annotations

import numpy as np
import pytest

from percept.v1 import image_pb2, style_pb2
from services.common.alpha import over_white
from services.common.tensors import to_tensor
from services.style.optimisation import parse_request
from tests.conftest import encode, server_config


def _cut_out(photo: np.ndarray, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[16:-16, 24:-24] = 255
    alpha[15, 24:-24] = 100
    return np.where(alpha[..., None] > 0, photo, np.uint8(hidden)), alpha


@pytest.mark.parametrize("hidden", [0, 255])
def test_for_a_jpeg_result_both_images_are_taken_as_they_look_on_white(
        small_photo: np.ndarray, hidden: int) -> None:
    """JPEG holds no alpha, and a painting's statistics are those it shows: the content
    and the style image are each the image on white, whatever colour is hidden."""
    photo = small_photo  # at its own size: no resizing to compare through
    rgb, alpha = _cut_out(photo, hidden)
    request = style_pb2.StylizeWithImageRequest(
        content_image=encode(np.dstack([rgb, alpha])),
        style_image=encode(np.dstack([rgb[::-1], alpha[::-1]])),
        max_size=max(photo.shape[:2]), output_format=image_pb2.IMAGE_FORMAT_JPEG)
    job = parse_request(request, server_config("style"))
    assert job.content.shape == (1, 3, *photo.shape[:2])
    assert job.content.equal(to_tensor(over_white(photo, alpha)))
    assert job.style.equal(to_tensor(over_white(photo[::-1], alpha[::-1])))


def test_a_mask_of_another_shape_is_refused_naming_the_photo_as_sent() -> None:
    """The optimisation works on a copy no larger than max_size, whose size the caller
    never chose: the refusal names the photo's own size."""
    from services.common.errors import InvalidArgument

    photo = np.full((300, 451, 3), 128, np.uint8)
    request = style_pb2.StylizeWithImageRequest(
        content_image=encode(photo), style_image=encode(photo), max_size=64,
        mask=encode(np.full((512, 512, 3), 255, np.uint8)))
    with pytest.raises(InvalidArgument) as refused:
        parse_request(request, server_config("style"))
    assert str(refused.value).startswith(
        "mask aspect ratio 512x512 does not match the image's 451x300 ")
    assert refused.value.reason == "MASK_ASPECT_MISMATCH"
    fitting = request.__class__()
    fitting.CopyFrom(request)
    fitting.mask = encode(np.full((150, 226, 3), 255, np.uint8))  # 451x300, halved
    assert parse_request(fitting, server_config("style")).mask.shape == (1, 1, 43, 64)


def _tiny_request(**fields: object) -> style_pb2.StylizeWithImageRequest:
    image = encode(np.full((24, 32, 3), 128, np.uint8))
    return style_pb2.StylizeWithImageRequest(content_image=image, style_image=image,
                                             max_size=32, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, -7, -(2**63), 2**63 - 1, 0, 12345])
def test_every_int64_seed_is_a_seed(seed: int) -> None:
    """StylizeWithImageRequest.seed is an int64: a client's random long is negative half the
    time. A negative one is its bits read unsigned (as torch's manual_seed takes it); 0 and
    the positive ones are unchanged."""
    job = parse_request(_tiny_request(seed=seed), server_config("style"))
    assert job.options.seed == seed % 2**64
    assert job.options.seed >= 0


def test_leaving_iterations_at_0_over_a_low_limit_says_what_0_means() -> None:
    """0 stands for the default, 300: a server whose --max-iterations is lower names both
    and what to send, not "got 0"."""
    from services.common.errors import InvalidArgument

    config = server_config("style", max_iterations=100)
    with pytest.raises(InvalidArgument) as refused:
        parse_request(_tiny_request(), config)
    assert str(refused.value) == (
        "iterations is 0, which means the default, 300, over this server's --max-iterations "
        "of 100: set iterations to 1..100 (percept stylize --iterations N)")
    assert refused.value.field == "iterations"
    with pytest.raises(InvalidArgument) as refused:
        parse_request(_tiny_request(iterations=101), config)
    assert str(refused.value) == ("iterations must be 1..100 (this server's --max-iterations), "
                                  "got 101")
    assert parse_request(_tiny_request(iterations=100), config).options.iterations == 100
    assert parse_request(_tiny_request(), server_config("style")).options.iterations == 300


@pytest.mark.parametrize("output_format", [image_pb2.IMAGE_FORMAT_UNSPECIFIED,
                                           image_pb2.IMAGE_FORMAT_PNG,
                                           image_pb2.IMAGE_FORMAT_JPEG])
def test_quality_is_checked_whatever_the_output_format(output_format: int) -> None:
    """The proto's decision: quality is 0..100 for every format (PNG ignores its value)."""
    from services.common.errors import InvalidArgument

    for quality in (101, -1):
        with pytest.raises(InvalidArgument) as refused:
            parse_request(_tiny_request(output_format=output_format, quality=quality),
                          server_config("style"))
        assert str(refused.value) == f"quality must be 1..100, got {quality}"
        assert refused.value.field == "quality"
    for quality, used in ((0, 95), (1, 1), (100, 100)):
        job = parse_request(_tiny_request(output_format=output_format, quality=quality),
                            server_config("style"))
        assert job.quality == used
