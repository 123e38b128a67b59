"""Perceptual losses on VGG features: content, Gram-matrix style and total variation.

- Content (feature reconstruction) loss: Gatys et al. 2016, "Image Style Transfer Using
  Convolutional Neural Networks" (CVPR), eq. 1; in the normalised form of Johnson et al.
  2016, "Perceptual Losses for Real-Time Style Transfer and Super-Resolution" (ECCV),
  eq. 2: ``||phi_j(y_hat) - phi_j(y)||^2 / (C_j H_j W_j)``.
- Gram matrix: Gatys et al. 2016, eq. 3, normalised by ``C H W`` as in Johnson et al. 2016,
  eq. 3, so that images of different sizes give comparable Grams.
- Style loss: Gatys et al. 2016, eqs. 4-5: a weighted sum over layers of the squared
  Frobenius distance between Grams (Johnson et al. 2016, eq. 4, per layer). Each layer
  has its own weight (the lecture's per-layer style weights).
- Total variation: the smoothness regulariser Johnson et al. 2016 (sec. 3.3) add to the
  image, after Mahendran & Vedaldi 2015.
- Grid penalty (ours, not in the papers): the output's spectral peaks on the lines of the
  period-2 and period-4 frequencies, over the content image's. Two stride-2 stages and two
  x2 upsampling stages give the network a 4-pixel lattice, and a Gram loss cannot see the
  phase of a pattern locked to it; total variation mostly damps period 2. The penalty reads
  the same spectral lines as ``percept eval style``'s Nyquist and quarter-frequency ratios.

Features are (N, C, H, W) tensors from :class:`training.nets.vgg19.VGG19Features`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.nn import functional as F


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between feature maps (Gatys et al. 2016, eq. 1; Johnson et al.
    2016, eq. 2): ``||F - P||^2 / (N C H W)``."""
    if features.shape != target.shape:
        raise ValueError(f"content features {tuple(features.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    return F.mse_loss(features, target)


def gram_matrix(features: Tensor) -> Tensor:
    """Batched Gram matrices ``G = F F^T / (C H W)`` of (N, C, H, W) features -> (N, C, C).

    Gatys et al. 2016, eq. 3 (``G_ij = sum_k F_ik F_jk``), normalised by ``C H W`` as in
    Johnson et al. 2016, eq. 3.
    """
    if features.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) features, got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resizes an (N, 1, H, W) mask in [0, 1] to a feature map's ``size`` by area averaging
    (the fraction of each feature cell's receptive cell that is masked)."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected an (N, 1, H, W) mask, got shape {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool2d(mask, size)


def masked_gram_matrix(features: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Gram matrices of the masked region only: ``(F m)(F m)^T / (C sum(m^2))``.

    ``mask`` (N, 1, H', W') in [0, 1] is resized to the feature map; with an all-ones mask
    this equals :func:`gram_matrix`. Used for partial stylisation (the lecture's masks).
    """
    if features.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) features, got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    weights = resize_mask(mask.to(features.dtype), (h, w))
    if weights.shape[0] not in (1, n):
        raise ValueError(f"mask batch {weights.shape[0]} does not match features batch {n}")
    flat = (features * weights).reshape(n, c, h * w)
    area = (weights * weights).reshape(weights.shape[0], -1).sum(dim=1).clamp_min(eps)
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * area.view(-1, 1, 1))


def gram_distance(gram: Tensor, target: Tensor) -> Tensor:
    """Squared Frobenius distance between Grams, averaged over the batch (Johnson et al.
    2016, eq. 4). A target of batch 1 is broadcast over the batch."""
    if gram.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"Gram {tuple(gram.shape)} and target {tuple(target.shape)} differ")
    return (gram - target).pow(2).sum(dim=(-2, -1)).mean()


def style_loss(features: Mapping[str, Tensor], target_grams: Mapping[str, Tensor],
               layer_weights: Mapping[str, float], mask: Tensor | None = None) -> Tensor:
    """Weighted sum over layers of Gram distances (Gatys et al. 2016, eqs. 4-5):
    ``sum_l w_l ||G_l(x) - A_l||_F^2``.

    ``features``: this image's features per layer; ``target_grams``: the style image's
    (normalised) Grams per layer; ``layer_weights``: layer -> weight (the lecture's
    per-layer style weights; zero-weight layers are skipped). With ``mask`` (N, 1, H, W),
    only the masked region's statistics are compared (:func:`masked_gram_matrix`).
    """
    total: Tensor | None = None
    for layer, weight in layer_weights.items():
        if weight == 0:
            continue
        if layer not in features or layer not in target_grams:
            raise KeyError(f"style layer {layer!r} missing from the features or target Grams")
        fmap = features[layer]
        gram = gram_matrix(fmap) if mask is None else masked_gram_matrix(fmap, mask)
        term = weight * gram_distance(gram, target_grams[layer])
        total = term if total is None else total + term
    if total is None:
        any_features = next(iter(features.values()), None)
        device = any_features.device if any_features is not None else None
        return torch.zeros((), device=device)
    return total


def total_variation_loss(image: Tensor) -> Tensor:
    """Total variation (squared-difference form): the mean squared difference between
    vertically and horizontally neighbouring pixels of (N, C, H, W) ``image``, summed over
    the two directions. Zero for a constant image. Johnson et al. 2016, sec. 3.3."""
    if image.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) image, got shape {tuple(image.shape)}")
    zero = image.new_zeros(())
    vertical = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean() if image.shape[-2] > 1 \
        else zero
    horizontal = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean() if image.shape[-1] > 1 \
        else zero
    return vertical + horizontal


def grid_line_peaks(image: Tensor, period: int, band: int | None = None) -> Tensor:
    """(N,) for an (N, C, H, W) ``image``: the mean spectral power on the row and the column
    of the 2D FFT at frequency 1/``period`` over the mean power on the ``band`` rows and
    columns on either side of them (default: 1/32 of the shorter side, at least 2), with
    the power summed over channels after removing each channel's mean. About 1 for photos;
    a pattern of that period locked to the pixel grid makes it several times larger
    (the same measure as ``training.evaluate_style``'s, on every channel instead of luma).
    H and W must be multiples of ``period``."""
    if image.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) image, got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if period < 2 or height % period or width % period:
        raise ValueError(f"the period-{period} grid measure needs H and W that are multiples "
                         f"of {period}, got {height}x{width}")
    x = image.float()
    spectrum = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True))
    power = (spectrum.real.square() + spectrum.imag.square()).sum(1)  # (N, H, W)
    return spectral_line_peak(power, height // period, width // period, band)


def spectral_line_peak(power: Tensor, row: int, col: int, band: int | None = None) -> Tensor:
    """(..., H, W) power spectra -> (...): the mean power on row ``row`` and column ``col``
    over the mean power on the ``band`` rows and columns on either side of them (default:
    1/32 of the shorter side, at least 2); 0 where those neighbours hold no power. The
    measure behind :func:`grid_line_peaks` and ``training.evaluate_style``'s Nyquist and
    quarter-frequency peaks."""
    height, width = power.shape[-2:]
    band = band or max(2, min(height, width) // 32)
    offsets = [d for d in range(-band, band + 1) if d]
    rows = [(row + d) % height for d in offsets]
    cols = [(col + d) % width for d in offsets]
    lines = (power[..., row, :].sum(-1) + power[..., :, col].sum(-1)) / (width + height)
    neighbours = (power[..., rows, :].sum((-2, -1)) + power[..., :, cols].sum((-2, -1))) / (
        len(rows) * width + len(cols) * height)
    positive = neighbours > 0
    return torch.where(positive, lines / torch.where(positive, neighbours, 1.0), 0.0)


def grid_loss(output: Tensor, content: Tensor, periods: tuple[int, ...] = (2, 4)) -> Tensor:
    """How far ``output``'s grid-line peaks (:func:`grid_line_peaks`) rise above
    ``content``'s: the mean over images and periods of ``max(0, log(peak_out /
    peak_content))``. Zero while the output has no more of a lattice-locked pattern than
    the photo it came from, so it never pulls a clean output anywhere."""
    if output.shape != content.shape:
        raise ValueError(f"output {tuple(output.shape)} and content {tuple(content.shape)} "
                         "differ in shape")
    terms = []
    for period in periods:
        tiny = torch.finfo(torch.float32).tiny
        ratio = grid_line_peaks(output, period) / grid_line_peaks(
            content.detach(), period).clamp_min(tiny)
        terms.append(F.relu(torch.log(ratio.clamp_min(tiny))))
    return torch.stack(terms).mean()
