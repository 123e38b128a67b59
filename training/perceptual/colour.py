"""Colour transforms for colour-preserving (luminance-only) style transfer.

Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color in Neural Artistic Style
Transfer" (arXiv:1606.05897), sec. 3 "Luminance-only transfer": stylise the luminance
channel only, then recombine it with the colour (chroma) channels of the content image.
We use YCbCr (ITU-R BT.601, full range, as in JPEG/JFIF) with every channel on the [0, 1]
scale (Cb and Cr centred on 0.5).

Tensors are (N, 3, H, W) (or (3, H, W)) RGB in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

#: BT.601 full-range RGB -> YCbCr matrix (rows Y, Cb, Cr), [0, 1] scale.
_RGB_TO_YCBCR = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ],
    dtype=torch.float64,
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)
#: Offsets added to (Y, Cb, Cr) after the matrix.
_YCBCR_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)

#: Luminance weights of R, G, B (BT.601).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _channel_dim(image: Tensor) -> int:
    if image.dim() == 4 and image.shape[1] == 3:
        return 1
    if image.dim() == 3 and image.shape[0] == 3:
        return 0
    raise ValueError(f"expected a (N, 3, H, W) or (3, H, W) image, got {tuple(image.shape)}")


def _apply(matrix: Tensor, image: Tensor, dim: int) -> Tensor:
    matrix = matrix.to(device=image.device, dtype=image.dtype)
    return torch.tensordot(image.movedim(dim, -1), matrix.T, dims=1).movedim(-1, dim)


def _offset(image: Tensor, dim: int) -> Tensor:
    shape = [1] * image.dim()
    shape[dim] = 3
    return _YCBCR_OFFSET.to(device=image.device, dtype=image.dtype).view(shape)


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """RGB -> YCbCr (BT.601 full range), all channels on [0, 1], Cb/Cr centred on 0.5."""
    dim = _channel_dim(rgb)
    return _apply(_RGB_TO_YCBCR, rgb, dim) + _offset(rgb, dim)


def ycbcr_to_rgb(ycbcr: Tensor) -> Tensor:
    """YCbCr (BT.601 full range, [0, 1] scale) -> RGB. Not clamped."""
    dim = _channel_dim(ycbcr)
    return _apply(_YCBCR_TO_RGB, ycbcr - _offset(ycbcr, dim), dim)


def luminance(rgb: Tensor) -> Tensor:
    """The BT.601 luma Y of (N, 3, H, W) RGB, as (N, 1, H, W)."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) image, got shape {tuple(rgb.shape)}")
    weights = torch.tensor(LUMA_WEIGHTS, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def match_luminance_statistics(source_luma: Tensor, reference_luma: Tensor) -> Tensor:
    """Shifts and scales ``source_luma`` to the mean and standard deviation of
    ``reference_luma`` (Gatys et al. 2016b, eq. 1: the style's luminance is matched to the
    content's before luminance-only transfer). Clamped to [0, 1]."""
    src_mean, src_std = source_luma.mean(), source_luma.std()
    ref_mean, ref_std = reference_luma.mean(), reference_luma.std()
    scale = ref_std / src_std.clamp_min(1e-6)
    return ((source_luma - src_mean) * scale + ref_mean).clamp(0.0, 1.0)


def combine_luma_chroma(luma: Tensor, chroma_from: Tensor) -> Tensor:
    """RGB with luminance ``luma`` (N, 1, H, W) and the Cb/Cr of ``chroma_from`` (N, 3, H, W
    RGB), kept inside the RGB cube without changing the chroma.

    For fixed (Cb, Cr) every RGB channel is ``Y + a_c`` with a chroma-only offset ``a_c``,
    so the Ys that stay in [0, 1]^3 form an interval that contains ``chroma_from``'s own Y;
    we clamp Y to it, which keeps the chroma exactly.
    """
    if luma.dim() != 4 or luma.shape[1] != 1:
        raise ValueError(f"expected an (N, 1, H, W) luminance, got shape {tuple(luma.shape)}")
    ycbcr = rgb_to_ycbcr(chroma_from)
    if luma.shape[-2:] != ycbcr.shape[-2:]:
        raise ValueError(f"luminance {tuple(luma.shape)} and image {tuple(ycbcr.shape)} "
                         "differ in size")
    chroma = ycbcr[:, 1:]
    zero_luma = torch.cat([torch.zeros_like(chroma[:, :1]), chroma], dim=1)
    offsets = ycbcr_to_rgb(zero_luma)  # RGB = Y + offsets (inverse matrix has ones in col 0)
    low = (-offsets).amax(dim=1, keepdim=True)
    high = (1.0 - offsets).amin(dim=1, keepdim=True)
    y = torch.minimum(torch.maximum(luma.expand_as(low), low), high)
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=1))


def preserve_colour(stylised: Tensor, content: Tensor) -> Tensor:
    """Luminance from ``stylised``, chroma (Cb, Cr) from ``content`` (Gatys et al. 2016b,
    luminance-only transfer). Both (N, 3, H, W) RGB in [0, 1] of the same size.

    The result keeps the content's Cb/Cr exactly; where the stylised luminance would leave
    the RGB cube for that chroma it is clamped to the nearest valid luminance.
    """
    if stylised.shape != content.shape:
        raise ValueError(f"stylised {tuple(stylised.shape)} and content "
                         f"{tuple(content.shape)} differ in shape")
    return combine_luma_chroma(luminance(stylised), content)


def blend_with_mask(stylised: Tensor, content: Tensor, mask: Tensor) -> Tensor:
    """``mask * stylised + (1 - mask) * content``: stylise only where ``mask`` is 1.

    ``mask`` is (N, 1, H, W) (or (1, 1, H, W), broadcast) in [0, 1] at the images' size.
    """
    if stylised.shape != content.shape:
        raise ValueError(f"stylised {tuple(stylised.shape)} and content "
                         f"{tuple(content.shape)} differ in shape")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != content.shape[-2:] \
            or mask.shape[0] not in (1, content.shape[0]):
        raise ValueError(f"mask must be (N, 1, H, W) matching the image {tuple(content.shape)}, "
                         f"got {tuple(mask.shape)}")
    mask = mask.to(dtype=content.dtype).clamp(0.0, 1.0)
    return content + mask * (stylised - content)
