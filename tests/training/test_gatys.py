"""Optimisation-based style transfer (Gatys et al. 2016) with the lecture's tweaks, run for
real on the ImageNet VGG19 at tiny sizes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from skimage import data

from training.nets.vgg19 import VGG19Features, load_vgg19
from training.perceptual.colour import luminance, rgb_to_ycbcr
from training.perceptual.gatys import (
    GatysOptions,
    GatysProgress,
    StopRequested,
    blurred_noise,
    generator_seed,
    stylize_with_image,
)
from training.perceptual.losses import gram_matrix, total_variation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Shallow layers keep the tests that do not need the full objective fast.
FAST: dict[str, Any] = {
    "style_layer_weights": {"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0},
    "content_layer": "relu2_2",
}


def photo(array: np.ndarray, size: int) -> torch.Tensor:
    """Centre square of a photo, downsampled by striding, as (1, 3, size, size)."""
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    step = side // size
    crop = np.ascontiguousarray(array[top:top + step * size:step, left:left + step * size:step])
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def vgg() -> VGG19Features:
    return load_vgg19()


@pytest.fixture(scope="module")
def content() -> torch.Tensor:
    return photo(data.astronaut(), 64)


@pytest.fixture(scope="module")
def style() -> torch.Tensor:
    return photo(data.immunohistochemistry(), 64)


@pytest.fixture(scope="module")
def small_content() -> torch.Tensor:
    return photo(data.astronaut(), 32)


@pytest.fixture(scope="module")
def small_style() -> torch.Tensor:
    return photo(data.immunohistochemistry(), 32)


def style_distance(vgg: VGG19Features, image: torch.Tensor, style: torch.Tensor,
                   layers: Mapping[str, float]) -> float:
    """Sum over layers of the relative Gram distance ||G(x) - G(s)||^2 / ||G(s)||^2."""
    with torch.no_grad():
        fx, fs = vgg(image, list(layers)), vgg(style, list(layers))
    total = 0.0
    for name in layers:
        gs = gram_matrix(fs[name])
        total += float((gram_matrix(fx[name]) - gs).pow(2).sum() / gs.pow(2).sum())
    return total


@pytest.mark.slow
def test_loss_decreases_and_the_image_moves_towards_the_style(
        vgg: VGG19Features, content: torch.Tensor, style: torch.Tensor) -> None:
    options = GatysOptions(iterations=12)
    reports: list[GatysProgress] = []
    checks: list[int] = []

    def should_stop() -> bool:
        checks.append(1)
        return False

    result = stylize_with_image(vgg, content, style, options, on_progress=reports.append,
                                progress_every=1, should_stop=should_stop)
    assert result.shape == content.shape
    assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
    # "iterations" counts objective evaluations, also for L-BFGS.
    assert [r.iteration for r in reports] == list(range(1, 13))
    assert len(checks) == 12
    assert all(r.iterations == 12 for r in reports)
    first, best = reports[0].total_loss, min(r.total_loss for r in reports)
    assert best < 0.5 * first
    for report in reports:
        assert report.total_loss == pytest.approx(
            report.content_loss + report.style_loss + report.tv_loss, rel=1e-4)
    layers = options.style_layer_weights
    assert style_distance(vgg, result, style, layers) < \
        0.5 * style_distance(vgg, content, style, layers)


def test_progress_every_and_final_report(vgg: VGG19Features, small_content: torch.Tensor,
                                         small_style: torch.Tensor) -> None:
    reports: list[GatysProgress] = []
    stylize_with_image(vgg, small_content, small_style, GatysOptions(iterations=7, **FAST),
                       on_progress=reports.append, progress_every=3)
    assert [r.iteration for r in reports] == [3, 6, 7]


def test_adam_optimiser_reduces_the_loss(vgg: VGG19Features, small_content: torch.Tensor,
                                         small_style: torch.Tensor) -> None:
    reports: list[GatysProgress] = []
    stylize_with_image(vgg, small_content, small_style,
                       GatysOptions(iterations=10, optimizer="adam", **FAST),
                       on_progress=reports.append, progress_every=1)
    assert len(reports) == 10
    assert reports[-1].total_loss < reports[0].total_loss


def test_blurred_noise_is_smooth_and_deterministic() -> None:
    noise = blurred_noise((1, 3, 64, 64), seed=5)
    assert torch.equal(noise, blurred_noise((1, 3, 64, 64), seed=5))
    assert not torch.equal(noise, blurred_noise((1, 3, 64, 64), seed=6))
    assert float(noise.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(noise.max()) == pytest.approx(1.0, abs=1e-6)
    raw = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert float(total_variation_loss(noise)) < 0.2 * float(total_variation_loss(raw))


def test_every_bit_of_a_64_bit_seed_counts() -> None:
    """Torch's CPU generator keeps a seed's low 32 bits: 1 and 1 + 2**32 (or -1 and
    2**32 - 1, as the service reads a negative int64) made the same noise."""
    shape = (1, 3, 16, 16)
    for seed, other in [(1, 1 + 2**32), (2**32 - 1, 2**64 - 1), (2**40, 2**41), (7, 7 + 2**63)]:
        assert not torch.equal(blurred_noise(shape, seed), blurred_noise(shape, other))
    assert torch.equal(blurred_noise(shape, 2**64 - 1), blurred_noise(shape, 2**64 - 1))
    assert generator_seed(12345) == 12345  # below 2**32: the noise it always made
    assert all(0 <= generator_seed(s) < 2**32 for s in (2**32, 2**63, 2**64 - 1))


def test_noise_init_is_deterministic_for_a_seed(
        vgg: VGG19Features, small_content: torch.Tensor, small_style: torch.Tensor) -> None:
    def run(seed: int) -> torch.Tensor:
        options = GatysOptions(iterations=4, init="noise", seed=seed, **FAST)
        return stylize_with_image(vgg, small_content, small_style, options)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Starting from noise, 4 iterations leave the image far from the content.
    assert float((first - small_content).abs().mean()) > 0.05


def test_mask_keeps_the_unmasked_region(vgg: VGG19Features, small_content: torch.Tensor,
                                        small_style: torch.Tensor) -> None:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0
    result = stylize_with_image(vgg, small_content, small_style,
                                GatysOptions(iterations=6, **FAST), mask=mask)
    assert torch.equal(result[..., :16], small_content[..., :16])
    assert float((result[..., 20:] - small_content[..., 20:]).abs().mean()) > 0.01


def test_preserve_color_keeps_the_content_chroma(
        vgg: VGG19Features, small_content: torch.Tensor, small_style: torch.Tensor) -> None:
    result = stylize_with_image(vgg, small_content, small_style,
                                GatysOptions(iterations=6, preserve_color=True, **FAST))
    assert torch.allclose(rgb_to_ycbcr(result)[:, 1:], rgb_to_ycbcr(small_content)[:, 1:],
                          atol=1e-5)
    assert float((luminance(result) - luminance(small_content)).abs().mean()) > 0.01


def test_preserve_color_with_a_mask(vgg: VGG19Features, small_content: torch.Tensor,
                                    small_style: torch.Tensor) -> None:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    result = stylize_with_image(vgg, small_content, small_style,
                                GatysOptions(iterations=4, preserve_color=True, init="noise",
                                             **FAST), mask=mask)
    outside = mask.expand_as(small_content) == 0
    assert torch.equal(result[outside], small_content[outside])
    assert torch.allclose(rgb_to_ycbcr(result)[:, 1:], rgb_to_ycbcr(small_content)[:, 1:],
                          atol=1e-5)


def test_should_stop_raises_stop_requested(vgg: VGG19Features, small_content: torch.Tensor,
                                           small_style: torch.Tensor) -> None:
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(StopRequested):
        stylize_with_image(vgg, small_content, small_style, GatysOptions(iterations=50, **FAST),
                           should_stop=should_stop)
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"style_layer_weights": {"relu9_1": 1.0}}, r"unknown style layer\(s\) 'relu9_1'; "
                                                    r"valid layers: relu1_1, relu1_2"),
        ({"content_layer": "conv4_2"}, r"unknown content_layer 'conv4_2'; valid layers"),
        ({"style_layer_weights": {"relu1_1": -1.0}},
         r"style_layer_weights\['relu1_1'\] must be a finite number >= 0, got -1"),
        ({"style_weight": -2.0}, r"style_weight must be a finite number >= 0"),
        ({"tv_weight": float("nan")}, r"tv_weight must be a finite number >= 0"),
        ({"iterations": 0}, r"iterations must be an integer >= 1, got 0"),
        ({"style_layer_weights": {"relu1_1": 0.0, "relu2_1": 0.0}},
         r"every style layer weight is zero"),
        ({"style_layer_weights": {}}, r"every style layer weight is zero"),
        ({"init": "zeros"}, r"init must be one of content, noise, got 'zeros'"),
        ({"optimizer": "sgd"}, r"optimizer must be one of lbfgs, adam, got 'sgd'"),
        ({"content_weight": 0.0, "style_weight": 0.0, "tv_weight": 0.0},
         r"all zero: there is nothing to optimise"),
        ({"seed": -1}, r"seed must be an integer >= 0"),
    ],
)
def test_invalid_options_raise_precise_errors(changes: dict[str, object], message: str) -> None:
    options = GatysOptions(**changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        options.validate()


def test_invalid_inputs_raise_value_error(vgg: VGG19Features, small_content: torch.Tensor,
                                          small_style: torch.Tensor) -> None:
    options = GatysOptions(iterations=1, **FAST)
    with pytest.raises(ValueError, match=r"content must have shape \(1, 3, H, W\)"):
        stylize_with_image(vgg, small_content[:, :1], small_style, options)
    with pytest.raises(ValueError, match="mask size"):
        stylize_with_image(vgg, small_content, small_style, options,
                           mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        stylize_with_image(vgg, small_content, small_style[..., :8, :8],
                           GatysOptions(iterations=1))
    with pytest.raises(ValueError, match="progress_every"):
        stylize_with_image(vgg, small_content, small_style, options, progress_every=0)
    with pytest.raises(ValueError, match="iterations"):
        stylize_with_image(vgg, small_content, small_style, GatysOptions(iterations=0))



class _RecordingVGG(torch.nn.Module):
    """The VGG, noting the size of every image it is shown."""

    def __init__(self, vgg: VGG19Features) -> None:
        super().__init__()
        self.vgg = vgg
        self.sizes: set[tuple[int, int]] = set()

    def forward(self, image: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        self.sizes.add((int(image.shape[-2]), int(image.shape[-1])))
        return self.vgg(image, layers)


@pytest.mark.parametrize("preserve_color", [False, True])
def test_the_canvas_has_a_margin_that_the_result_does_not(
        vgg: VGG19Features, small_content: torch.Tensor, small_style: torch.Tensor,
        preserve_color: bool) -> None:
    """VGG's zero padding makes the style loss paint a frame along the edges (in a 128 px
    run of the demo, the outer columns came out 33 grey levels off their neighbours, 5 with
    the margin, against 1 in the photo). The content is optimised inside a margin of its
    own reflection, which is cut off: the frame forms there."""
    from training.perceptual.gatys import CANVAS_MARGIN

    recording = _RecordingVGG(vgg)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1.0  # stylise the right half only
    result = stylize_with_image(recording, small_content, small_style,  # type: ignore[arg-type]
                                GatysOptions(iterations=2, preserve_color=preserve_color,
                                             **FAST), mask=mask)
    assert CANVAS_MARGIN >= 16  # one feature pixel of relu5_1, the deepest style layer
    canvas = (32 + 2 * CANVAS_MARGIN, 32 + 2 * CANVAS_MARGIN)
    assert recording.sizes == {canvas, (32, 32)}  # the canvas, and the style image
    assert result.shape == small_content.shape
    assert torch.equal(result[..., :, :16], small_content[..., :, :16])  # outside the mask
