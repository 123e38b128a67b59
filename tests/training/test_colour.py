"""Colour transforms for luminance-only style transfer (Gatys et al. 2016b)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from training.perceptual.colour import (
    blend_with_mask,
    luminance,
    preserve_colour,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)


def photo(name: str, size: int = 64) -> torch.Tensor:
    array = np.ascontiguousarray(getattr(data, name)()[:size * 4:4, :size * 4:4])
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def test_ycbcr_round_trip() -> None:
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-6)
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb[0])), rgb[0], atol=1e-6)


def test_known_ycbcr_values() -> None:
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    ycbcr = rgb_to_ycbcr(colours).flatten(1)
    assert ycbcr[0].tolist() == pytest.approx([1.0, 0.5, 0.5], abs=1e-6)
    assert ycbcr[1].tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-6)
    assert ycbcr[2].tolist() == pytest.approx([0.299, 0.5 - 0.168736, 1.0], abs=1e-5)
    assert torch.allclose(luminance(colours), ycbcr[:, :1].view(3, 1, 1, 1), atol=1e-6)


def test_preserve_colour_keeps_content_chroma_and_stylised_luminance() -> None:
    content = photo("astronaut")
    stylised = photo("coffee")
    out = preserve_colour(stylised, content)
    out_ycbcr, content_ycbcr = rgb_to_ycbcr(out), rgb_to_ycbcr(content)
    assert torch.allclose(out_ycbcr[:, 1:], content_ycbcr[:, 1:], atol=1e-5)
    assert float(out.min()) >= -1e-5 and float(out.max()) <= 1 + 1e-5
    # Luminance is the stylised one except where it would leave the RGB cube.
    luma_error = (out_ycbcr[:, :1] - luminance(stylised)).abs()
    assert float((luma_error < 1e-5).float().mean()) > 0.9


def test_preserve_colour_of_grey_content_is_the_stylised_luminance() -> None:
    stylised = photo("coffee")
    grey = torch.full_like(stylised, 0.5)
    out = preserve_colour(stylised, grey)
    expected = luminance(stylised).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-5)


def test_blend_with_mask() -> None:
    content, stylised = photo("astronaut"), photo("coffee")
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1.0
    out = blend_with_mask(stylised, content, mask)
    assert torch.equal(out[..., :32], content[..., :32])
    assert torch.allclose(out[..., 32:], stylised[..., 32:])
    half = blend_with_mask(stylised, content, torch.full((1, 1, 64, 64), 0.5))
    assert torch.allclose(half, (stylised + content) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        blend_with_mask(stylised, content, torch.ones(1, 1, 32, 32))


def test_images_or_masks_of_another_batch_size_are_refused_not_broadcast() -> None:
    """One content image against two stylisations would broadcast in torch's arithmetic
    and give two results without a word; so would a mask for two images."""
    one, two = photo("astronaut"), torch.cat([photo("coffee"), photo("chelsea")])
    with pytest.raises(ValueError, match=r"stylised \(2, 3, 64, 64\) and content "
                                         r"\(1, 3, 64, 64\) differ in shape"):
        preserve_colour(two, one)
    with pytest.raises(ValueError, match=r"mask must be \(N, 1, H, W\) matching the image "
                                         r"\(1, 3, 64, 64\), got \(2, 1, 64, 64\)"):
        blend_with_mask(one, one, torch.ones(2, 1, 64, 64))
    both = blend_with_mask(two, two.flip(0), torch.ones(1, 1, 64, 64))  # one for all
    assert torch.allclose(both, two, atol=1e-6)
