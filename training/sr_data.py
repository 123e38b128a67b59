"""Super-resolution training pairs from prepared arrays, with optional degradations.

The prepared folder (``percept data prepare --sizes 288 72``) holds exact pairs: item i of
the 72 px array is the PIL BICUBIC 4x reduction of item i of the 288 px array. Training
crops are cut at matching places in both (HR offsets are multiples of 4), so a pair stays
exact, then both get the same random flip/rotation (the 8 symmetries of the square).

Degradations (all off by default) make the low-res input look more like real-world input:
Gaussian blur of the HR crop before bicubic downscaling (computed in torch, then the LR is
``interpolate(..., "bicubic", antialias=True)``), then additive Gaussian noise, then JPEG
re-encoding of the LR crop (the order a camera pipeline applies them). Numpy, torch and PIL only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from training.data.arrays import PreparedArrays
from training.image_batches import to_tensor, to_uint8_images

SCALE = 4
#: The highest JPEG quality a degraded low-res input is re-encoded at.
MAX_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Degradation:
    """Random degradations of the low-res input; each applied with probability ``prob``.

    blur: maximum Gaussian sigma in HR pixels (uniform in [0, blur]); 0 disables.
    noise: maximum noise standard deviation on the [0, 1] scale; 0 disables.
    jpeg: lowest JPEG quality (uniform in [jpeg, MAX_JPEG_QUALITY]); 0 disables.
    """

    blur: float = 0.0
    noise: float = 0.0
    jpeg: int = 0
    prob: float = 0.5

    @property
    def active(self) -> bool:
        return self.blur > 0 or self.noise > 0 or self.jpeg > 0


def _gradient_energy(image: np.ndarray) -> float:
    grey = image.astype(np.float32).mean(axis=2)
    return float(np.mean(np.diff(grey, axis=0) ** 2) + np.mean(np.diff(grey, axis=1) ** 2))


class PairSampler:
    """Random (LR, HR) uint8 crops from prepared arrays, seeded."""

    def __init__(self, prepared: PreparedArrays, crop: int, seed: int = 0) -> None:
        if crop % SCALE:
            raise ValueError(f"--crop must be a multiple of {SCALE}, got {crop}")
        self.hr = prepared.arrays[prepared.sizes[0]]
        size = self.hr.shape[1]
        if crop > size:
            raise ValueError(f"--crop {crop} is larger than the prepared images ({size} px)")
        self.lr = prepared.arrays.get(size // SCALE) if size % SCALE == 0 else None
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return int(self.hr.shape[0])

    def _pair(self, index: int, top: int, left: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.crop
        hr = np.asarray(self.hr[index, top:top + c, left:left + c])
        if self.lr is None:
            lr = np.asarray(Image.fromarray(hr).resize((c // SCALE, c // SCALE),
                                                       Image.Resampling.BICUBIC))
        else:
            t, lft, lc = top // SCALE, left // SCALE, c // SCALE
            lr = np.asarray(self.lr[index, t:t + lc, lft:lft + lc])
        return lr, hr

    def sample(self, batch: int, detail: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """A random batch: (N, c/4, c/4, 3) and (N, c, c, 3) uint8, randomly flipped/rotated.

        With ``detail`` > 1, ``detail`` x ``batch`` candidate crops are drawn and the
        ``batch`` with the most low-res gradient energy are kept: wallpaper photos are
        largely smooth bokeh that bicubic already gets right, and short (CPU) runs learn
        more from textured crops.
        """
        size = self.hr.shape[1]
        steps = (size - self.crop) // SCALE + 1
        count = batch * max(1, detail)
        indices = self.rng.integers(0, len(self), count)
        offsets = self.rng.integers(0, steps, (count, 2)) * SCALE
        transforms = self.rng.integers(0, 8, count)
        pairs = [self._pair(int(i), int(t), int(lf)) for i, (t, lf) in zip(indices, offsets,
                                                                           strict=True)]
        if count > batch:
            energy = [_gradient_energy(lr) for lr, _ in pairs]
            keep = np.sort(np.argsort(energy, kind="stable")[::-1][:batch])
            pairs = [pairs[i] for i in keep]
            transforms = transforms[keep]
        lrs, hrs = [], []
        for (lr, hr), k in zip(pairs, transforms, strict=True):
            lr, hr = np.rot90(lr, int(k) % 4), np.rot90(hr, int(k) % 4)
            if k >= 4:
                lr, hr = lr[:, ::-1], hr[:, ::-1]
            lrs.append(lr)
            hrs.append(hr)
        return np.stack(lrs), np.stack(hrs)

    def fixed(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The centre crops of the first ``count`` items (the arrays are already shuffled):
        a fixed batch for samples and validation."""
        size = self.hr.shape[1]
        offset = (size - self.crop) // 2 // SCALE * SCALE
        pairs = [self._pair(i, offset, offset) for i in range(min(count, len(self)))]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Per-image Gaussian blur of (N, C, H, W) with sigma per image (0 leaves it as is)."""
    radius = int(np.ceil(3 * float(sigmas.max()))) if sigmas.numel() else 0
    if radius == 0:
        return images
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigmas.clamp_min(1e-3).to(images.dtype).view(-1, 1)
    kernels = torch.exp(-(x.view(1, -1) ** 2) / (2 * safe ** 2))
    kernels = torch.where(sigmas.view(-1, 1) > 0, kernels, (x.abs() < 0.5).to(images.dtype))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    n, c, h, w = images.shape
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    # Grouped convolution: one group per (image, channel), each with its image's kernel.
    flat = padded.reshape(1, n * c, h + 2 * radius, w + 2 * radius)
    horizontal = kernels.repeat_interleave(c, dim=0).view(n * c, 1, 1, -1)
    vertical = horizontal.view(n * c, 1, -1, 1)
    out = F.conv2d(F.conv2d(flat, horizontal, groups=n * c), vertical, groups=n * c)
    return out.view(n, c, h, w)


def jpeg_roundtrip(images: np.ndarray, qualities: list[int | None]) -> np.ndarray:
    """Re-encodes each (H, W, 3) uint8 image as JPEG at its quality (None: unchanged)."""
    out = images.copy()
    for i, quality in enumerate(qualities):
        if quality is None:
            continue
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def degrade(lr: np.ndarray, hr: Tensor, degradation: Degradation,
            rng: np.random.Generator) -> Tensor:
    """The degraded low-res batch (N, 3, h, w) float in [0, 1] on ``hr``'s device."""
    n = hr.shape[0]
    device = hr.device
    if degradation.blur > 0:
        chosen = rng.random(n) < degradation.prob
        sigmas = torch.from_numpy(rng.uniform(0, degradation.blur, n) * chosen).to(device)
        blurred = gaussian_blur(hr, sigmas.float())
        low = F.interpolate(blurred, scale_factor=1.0 / SCALE, mode="bicubic",
                            align_corners=False, antialias=True).clamp(0, 1)
        low_u8 = to_uint8_images(low)
    else:
        low_u8 = lr
    if degradation.noise > 0:
        chosen = rng.random(n) < degradation.prob
        std = rng.uniform(0, degradation.noise, n) * chosen * 255.0
        noisy = low_u8.astype(np.float32) + rng.standard_normal(low_u8.shape).astype(
            np.float32) * std.astype(np.float32).reshape(-1, 1, 1, 1)
        low_u8 = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if degradation.jpeg > 0:
        qualities: list[int | None] = [
            int(rng.integers(degradation.jpeg, MAX_JPEG_QUALITY + 1))
            if rng.random() < degradation.prob else None
            for _ in range(n)
        ]
        low_u8 = jpeg_roundtrip(low_u8, qualities)
    return to_tensor(low_u8, device)
