"""Perceptual losses: Gram matrices, content, style and total-variation losses, and the
grid penalty."""

from __future__ import annotations

import pytest
import torch

from training.perceptual.losses import (
    content_loss,
    gram_matrix,
    grid_line_peaks,
    grid_loss,
    masked_gram_matrix,
    style_loss,
    total_variation_loss,
)


def test_gram_matrix_of_a_known_tensor() -> None:
    # Two channels over a 1x3 map: a = (1, 2, 3), b = (0, 1, -1).
    features = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 1.0, -1.0]]]])
    expected = torch.tensor([[14.0, -1.0], [-1.0, 2.0]]) / (2 * 1 * 3)
    gram = gram_matrix(features)
    assert gram.shape == (1, 2, 2)
    assert torch.allclose(gram[0], expected)


def test_gram_matrix_is_batched_and_size_normalised() -> None:
    features = torch.randn(3, 4, 5, 6)
    grams = gram_matrix(features)
    assert grams.shape == (3, 4, 4)
    for index in range(3):
        assert torch.allclose(grams[index], gram_matrix(features[index:index + 1])[0])
    # Tiling the map twice over doubles H*W and the raw sums: the normalised Gram is equal.
    assert torch.allclose(gram_matrix(features.repeat(1, 1, 2, 1)), grams, atol=1e-6)


def test_masked_gram_with_a_full_mask_equals_the_gram() -> None:
    features = torch.randn(1, 8, 6, 6)
    assert torch.allclose(masked_gram_matrix(features, torch.ones(1, 1, 24, 24)),
                          gram_matrix(features), atol=1e-6)
    # Half mask: the Gram of the masked half only.
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    assert torch.allclose(masked_gram_matrix(features, mask),
                          gram_matrix(features[..., :3]), atol=1e-6)


def test_content_loss_is_mse() -> None:
    a, b = torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0)
    assert float(content_loss(a, b)) == pytest.approx(9.0)
    assert float(content_loss(a, a)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        content_loss(a, torch.zeros(1, 2, 2, 3))


def test_style_loss_zero_for_identical_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    feats = {"relu1_1": torch.rand(1, 4, 8, 8), "relu2_1": torch.rand(1, 6, 4, 4)}
    other = {name: torch.rand_like(f) * 2 for name, f in feats.items()}
    grams = {name: gram_matrix(f) for name, f in feats.items()}
    weights = {"relu1_1": 1.0, "relu2_1": 1.0}
    assert float(style_loss(feats, grams, weights)) == 0.0
    assert float(style_loss(other, grams, weights)) > 0.0


def test_style_loss_per_layer_weights() -> None:
    torch.manual_seed(1)
    feats = {"relu1_1": torch.rand(1, 4, 8, 8), "relu2_1": torch.rand(1, 6, 4, 4)}
    target = {name: gram_matrix(torch.rand_like(f)) for name, f in feats.items()}
    only_first = float(style_loss(feats, target, {"relu1_1": 1.0, "relu2_1": 0.0}))
    only_second = float(style_loss(feats, target, {"relu1_1": 0.0, "relu2_1": 1.0}))
    mixed = float(style_loss(feats, target, {"relu1_1": 2.0, "relu2_1": 0.5}))
    assert only_first > 0 and only_second > 0
    assert mixed == pytest.approx(2.0 * only_first + 0.5 * only_second, rel=1e-5)
    expected_first = float((gram_matrix(feats["relu1_1"]) - target["relu1_1"]).pow(2).sum())
    assert only_first == pytest.approx(expected_first, rel=1e-5)


def test_style_loss_with_a_target_of_another_size() -> None:
    style = torch.rand(1, 4, 16, 12)
    image = torch.rand(1, 4, 8, 8)
    loss = style_loss({"relu1_1": image}, {"relu1_1": gram_matrix(style)}, {"relu1_1": 1.0})
    assert float(loss) > 0


def test_total_variation() -> None:
    assert float(total_variation_loss(torch.full((2, 3, 8, 8), 0.7))) == 0.0
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    assert float(total_variation_loss(ramp)) == pytest.approx(1.0)  # horizontal steps of 1
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert float(total_variation_loss(noisy)) > 0.05


def _smooth_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Low-pass noise (a photo-like falling spectrum), (1, 3, size, size) in [0, 1]."""
    noise = torch.rand(1, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic",
                                           align_corners=False).clamp(0, 1)


def _with_grid(image: torch.Tensor, period: int, amplitude: float = 0.03) -> torch.Tensor:
    """``image`` plus a pattern locked to the pixel lattice: rows of period ``period``."""
    rows = torch.arange(image.shape[-2], dtype=torch.float32)
    pattern = torch.cos(2 * torch.pi * rows / period).view(1, 1, -1, 1)
    return image + amplitude * pattern


def test_grid_line_peaks_see_a_lattice_pattern_of_their_period_only() -> None:
    photo = _smooth_image()
    for period in (2, 4):
        clean = float(grid_line_peaks(photo, period))
        # the rows' pattern fills one of the two lines the measure averages
        assert float(grid_line_peaks(_with_grid(photo, period), period)) > 5 * clean
    # a period-4 pattern is not a period-2 one, and a pattern off the lines is neither
    assert float(grid_line_peaks(_with_grid(photo, 4), 2)) == pytest.approx(
        float(grid_line_peaks(photo, 2)), rel=1e-3)
    assert float(grid_line_peaks(_with_grid(photo, 6), 4)) < 2 * float(
        grid_line_peaks(photo, 4))
    with pytest.raises(ValueError, match="multiples of 4"):
        grid_line_peaks(torch.rand(1, 3, 30, 32), 4)


def test_grid_loss_is_zero_without_a_grid_and_its_gradient_removes_one() -> None:
    photo = _smooth_image(seed=1)
    assert float(grid_loss(photo, photo)) == 0.0
    # an output with less lattice energy than its photo is not pulled anywhere either
    gridded_photo = _with_grid(photo, 4)
    assert float(grid_loss(photo, gridded_photo)) < 1e-6
    output = _with_grid(photo, 4).requires_grad_(True)
    before = float(grid_loss(output.detach(), photo))
    assert before > 1.0
    optimizer = torch.optim.Adam([output], lr=2e-3)
    for _ in range(50):
        optimizer.zero_grad()
        grid_loss(output, photo).backward()
        optimizer.step()
    assert float(grid_loss(output.detach(), photo)) < 0.3 * before
    with pytest.raises(ValueError, match="differ in shape"):
        grid_loss(photo, photo[..., :32])


def test_a_binary_mask_gives_the_gram_of_the_masked_region_alone() -> None:
    """The lecture's masks: the style statistics of a masked image are those of its masked
    cells only; what lies outside the mask, however large, does not count."""
    torch.manual_seed(0)
    features = torch.randn(1, 4, 6, 8)
    mask = torch.zeros(1, 1, 6, 8)
    mask[..., :, :3] = 1.0  # the left 3 columns
    region = features[..., :, :3].reshape(1, 4, -1)
    expected = region @ region.transpose(1, 2) / (4 * 18)
    torch.testing.assert_close(masked_gram_matrix(features, mask), expected)
    changed = features.clone()
    changed[..., :, 3:] = 100.0 * torch.randn(1, 4, 6, 5)  # outside the mask
    torch.testing.assert_close(masked_gram_matrix(changed, mask), expected)
    assert not torch.allclose(gram_matrix(changed), gram_matrix(features))
