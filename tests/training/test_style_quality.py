"""Quality of the committed fast style models on a held-out photo, and of the checkerboard
measure itself: no Nyquist spike (no checkerboard), no period-4 grid, Gram statistics
moved towards the style, content kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training import nets
from training.evaluate_style import (
    StyleMeasures,
    StyleModel,
    default_model_dirs,
    load_style_model,
    measure,
    nyquist_peak,
    nyquist_ratio,
    quarter_ratio,
    resize_short_side,
    stylise_image,
    zoom_strip,
)

pytest.importorskip("skimage")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STYLES = ("starry-night", "the-scream", "stained-tissue")

#: The Nyquist ratio (training.evaluate_style.nyquist_ratio: the output's spectral spike at
#: the Nyquist frequency over the photo's; 1 = the same), averaged over the two photos.
#: Measured on held-out photos: the committed models and freshly initialised nets of
#: their size (width 16, 5 blocks) stay around 1-1.4; a fresh net with Johnson et al.'s
#: transposed-convolution decoder measures above 10.
NYQUIST_MARGIN = 1.5
#: The same for the spectral peak at a quarter of the sampling frequency (period 4: the
#: lattice of the net's two stride-2 and two x2 stages). On these photos starry-night@1
#: (H200-trained, no grid penalty) measured 2.8 and 2.6; the committed nets measure 0.5-1.5.
QUARTER_MARGIN = 2.0
#: Style loss (the model's own loss network, vs its style image) of the output over that
#: of the photo.
MAX_STYLE_LOSS_RATIO = 0.5
#: relu2_2 / relu3_3 content loss of the output over that of the style image (vs the photo).
MAX_CONTENT_RATIO = 0.6
MODEL_SIZE = {"width": 16, "blocks": 5}


@pytest.fixture(scope="module")
def heldout_photos() -> list[np.ndarray]:
    """scikit-image's chelsea and coffee: both in the held-out split
    (training.data.photos.HELDOUT), shortest side 128."""
    from skimage import data

    return [resize_short_side(np.asarray(image), 128) for image in (data.chelsea(),
                                                                     data.coffee())]


@pytest.fixture(scope="module")
def committed() -> list[StyleModel]:
    dirs = default_model_dirs(REPO / "models")
    if not dirs:
        pytest.skip("no committed models/style-* artifacts (train them with "
                    "`make train-style STYLE=...`)")
    return [load_style_model(path) for path in dirs]


def _mean_nyquist(module: nn.Module, photos: list[np.ndarray]) -> float:
    return float(np.mean([nyquist_ratio(stylise_image(module, p), p) for p in photos]))


def _with_transposed_upsampling(width: int, blocks: int) -> nn.Module:
    """Johnson et al.'s original decoder (stride-1/2 transposed convolutions), for
    checking that the measure catches checkerboards."""
    net = nets.build({"type": "johnson-transformer", "width": width, "blocks": blocks})
    net.decoder = nn.Sequential(  # type: ignore[assignment]
        nn.ConvTranspose2d(4 * width, 2 * width, 3, stride=2, padding=1, output_padding=1),
        nn.InstanceNorm2d(2 * width, affine=True), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1),
        nn.InstanceNorm2d(width, affine=True), nn.ReLU())
    return net.eval()


def test_the_measure_catches_a_checkerboard(heldout_photos: list[np.ndarray]) -> None:
    photo = heldout_photos[0]
    checker = np.indices(photo.shape[:2]).sum(axis=0) % 2
    painted = np.clip(photo.astype(np.int16) + 12 * checker[..., None] - 6, 0, 255)
    assert nyquist_ratio(painted.astype(np.uint8), photo) > 5
    for photo in heldout_photos:
        assert 0.5 < nyquist_peak(photo) < 1.5
    torch.manual_seed(0)
    transposed = _with_transposed_upsampling(**MODEL_SIZE)
    assert _mean_nyquist(transposed, heldout_photos) > 5


def test_a_fresh_resize_convolution_net_has_no_checkerboard(
        heldout_photos: list[np.ndarray]) -> None:
    torch.manual_seed(0)
    fresh = nets.build({"type": "johnson-transformer", **MODEL_SIZE}).eval()
    assert _mean_nyquist(fresh, heldout_photos) < NYQUIST_MARGIN


def test_the_default_styles_are_committed(committed: list[StyleModel]) -> None:
    assert set(DEFAULT_STYLES) <= {m.style_name for m in committed}
    for model in committed:
        assert model.config["task"] == "style"
        assert {"name", "title", "source", "licence"} <= set(model.config["style"])
        size = (model.path / "weights.safetensors").stat().st_size
        assert size < 8_000_000, f"{model.name}: {size} bytes of weights"
        # metrics: the exported state's losses, the training size and the device
        metrics = json.loads((model.path / "metrics.json").read_text())
        assert metrics["device"] and metrics["crop"] > 0 and metrics["batch_size"] > 0
        assert 0 < metrics["selected_step"] <= metrics["steps"]
        for key in ("content", "style", "tv"):
            assert metrics["selected_loss_weighted"][key] > 0, (model.name, key)
        provenance = json.loads((model.path / "provenance.json").read_text())
        assert provenance["git_sha"] and provenance["command"]
        assert {"style image", "prepared array"} <= {d["kind"] for d in provenance["data"]}


def test_committed_models_have_no_checkerboard(committed: list[StyleModel],
                                               heldout_photos: list[np.ndarray]) -> None:
    for model in committed:
        output = stylise_image(model.module, heldout_photos[0])
        assert output.shape == heldout_photos[0].shape
        ratio = _mean_nyquist(model.module, heldout_photos)
        assert ratio < NYQUIST_MARGIN, f"{model.name}: Nyquist ratio {ratio:.2f}"


def test_committed_models_paint_no_period_4_grid(committed: list[StyleModel],
                                                 heldout_photos: list[np.ndarray]) -> None:
    for model in committed:
        ratio = float(np.mean([quarter_ratio(stylise_image(model.module, p), p)
                               for p in heldout_photos]))
        assert ratio < QUARTER_MARGIN, f"{model.name}: period-4 ratio {ratio:.2f}"


def test_committed_models_move_gram_statistics_towards_their_style(
        committed: list[StyleModel], heldout_photos: list[np.ndarray]) -> None:
    measures = StyleMeasures("cpu")
    photo = heldout_photos[0]
    for model in committed:
        result = measure(model, photo, measures, model.style_image())
        assert result["style_loss_ratio"] < MAX_STYLE_LOSS_RATIO, (model.name, result)
        for layer in StyleMeasures.GRAM_LAYERS:  # every layer's statistics move
            assert result[f"gram_ratio_{layer}"] < 1.0, (model.name, layer, result)
        for layer in StyleMeasures.CONTENT_LAYERS:
            assert result[f"content_{layer}_ratio"] < MAX_CONTENT_RATIO, (model.name, result)


def test_zoom_strip_enlarges_the_centre_of_the_photo_and_of_each_output(
        committed: list[StyleModel], heldout_photos: list[np.ndarray]) -> None:
    photo = heldout_photos[0]
    strip = np.asarray(zoom_strip(committed[:2], photo, crop=32, zoom=3))
    cell, gap, label = 96, 4, 16
    assert strip.shape == (label + cell, 3 * cell + 2 * gap, 3)
    top, left = (photo.shape[0] - 32) // 2, (photo.shape[1] - 32) // 2
    centre = photo[top:top + 32, left:left + 32]
    assert np.array_equal(strip[label:, :cell], centre.repeat(3, 0).repeat(3, 1))
    output = stylise_image(committed[1].module, photo)[top:top + 32, left:left + 32]
    second = strip[label:, 2 * (cell + gap):]
    assert np.array_equal(second[::3, ::3], output)
    with pytest.raises(ValueError, match="zoom-crop"):
        zoom_strip(committed[:1], photo, crop=4096, zoom=3)


def _without_normalisation(net: nn.Module) -> nn.Module:
    """``net`` with every instance norm replaced by the identity: its output at a pixel
    depends only on the pixels around it, so tiles agree with one whole pass up to the
    tiles' own borders, which the feathered overlaps hide."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.InstanceNorm2d):
                setattr(module, name, nn.Identity())
    return net


def test_the_tiling_measure_tells_local_nets_from_instance_normalised_ones() -> None:
    """tiling_agreement on chelsea in 256 px tiles: one small net (width 4, 1 block) with
    instance normalisation, whose tiles are each normalised by their own statistics, and
    the same weights without it. Measured: 69 dB without, 18 dB with (a fresh net leans
    on the statistics far more than a trained one)."""
    from skimage import data

    from training.evaluate_style import check_tiling_tile, tiling_agreement

    photo = np.asarray(data.chelsea())
    torch.manual_seed(0)
    normalised = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1}).eval()
    tiled = tiling_agreement(normalised, photo, 256)
    local = tiling_agreement(_without_normalisation(normalised), photo, 256)
    assert local["tiling_psnr"] > 55.0
    assert tiled["tiling_psnr"] < local["tiling_psnr"] - 10.0
    for result in (tiled, local):
        assert result["tiling_gap"] == pytest.approx(result["tiling_psnr"]
                                                     - result["tiling_shift_psnr"])
    for bad in (128, 700):
        with pytest.raises(ValueError, match="--tiling takes a tile side over 128 px"):
            check_tiling_tile(bad)


def test_percept_eval_style_reports_the_tiling_measure(
        committed: list[StyleModel], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`percept eval style --tiling 576` on one photo: the tiling measures per photo and in
    the summary (with the worst gap), and a table of them; a bad tile side exits 2 with the
    reason before anything runs. the-scream version 3 clears the 2 px shift by the 3 dB the
    service test asks for (33.0 vs 29.0 dB on chelsea at 1100x700, tiled by the service;
    version 2: 33.8 vs 29.1)."""
    from PIL import Image
    from skimage import data

    from training import cli_style

    Image.fromarray(np.asarray(data.chelsea())).save(tmp_path / "chelsea.png")
    scream = next(m for m in committed if m.style_name == "the-scream")
    common = ["eval", "--models", str(scream.path), "--photos", str(tmp_path / "chelsea.png"),
              "--grid", "", "--size", "128", "--device", "cpu"]
    assert cli_style.main([*common, "--tiling", "576", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["tiling"] == {"image": [1100, 700], "tile": 576, "overlap": 64, "shift": 2}
    (entry,) = report["models"].values()
    row = entry["per_photo"]["chelsea"]
    assert row["tiling_gap"] > 3.0
    assert entry["summary"]["min_tiling_gap"] == pytest.approx(row["tiling_gap"])
    assert "tiled vs whole dB" in capsys.readouterr().out

    assert cli_style.main([*common, "--tiling", "1000", "--out", str(tmp_path / "bad")]) == 2
    assert "--tiling takes a tile side" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
