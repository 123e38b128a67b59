"""Optimisation-based style transfer (Gatys, Ecker & Bethge 2016, "Image Style Transfer
Using Convolutional Neural Networks", CVPR) with the lecture's tweaks.

The pixels of an image are optimised so that its VGG19 features match the content image
at one layer (content loss, eq. 1) and its Gram matrices match the style image's over
several layers (style loss, eqs. 4-5), plus a small total-variation term (Johnson et al.
2016). The total is ``content_weight * L_content + style_weight * sum_l w_l E_l +
tv_weight * L_tv`` (Gatys et al. 2016, eq. 7, with per-layer weights ``w_l``).

Tweaks (lecture; Gatys et al. 2016b, "Preserving Color in Neural Artistic Style
Transfer"):

- ``init="noise"``: start from uniform noise blurred with a Gaussian (smoother results than
  raw noise), or ``init="content"``: start from the content image;
- per-layer style weights (``style_layer_weights``);
- ``preserve_color``: luminance-only transfer (Gatys et al. 2016b, sec. 3): the style
  image is turned into luminance matched to the content's luminance mean and deviation,
  only the luminance is optimised, and the content's chroma (Cb, Cr) is put back;
- ``mask``: stylise part of the image. The optimised image is composited with the content
  through the mask before VGG sees it, so the unmasked region stays the content, the style
  statistics are measured on the masked region only (masked Grams), and the seam is
  optimised in context.

"iterations" counts objective evaluations (forward + backward passes through VGG), also
for L-BFGS, which evaluates the objective several times per step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from training.nets.vgg19 import TAP_STRIDE, VGG19_LAYERS, VGG19Features
from training.perceptual.colour import (
    blend_with_mask,
    combine_luma_chroma,
    luminance,
    match_luminance_statistics,
)
from training.perceptual.losses import (
    content_loss,
    gram_matrix,
    style_loss,
    total_variation_loss,
)

#: Standard deviation, in pixels, of the Gaussian that blurs the noise of ``init="noise"``.
NOISE_BLUR_SIGMA = 2.0
#: Adam learning rate on the [0, 1] pixel scale.
ADAM_LEARNING_RATE = 0.02
#: L-BFGS history size.
LBFGS_HISTORY = 50
#: Pixels of canvas optimised around the image on every side and cut off at the end
#: (the content extended by reflection). VGG's zero padding makes a border pixel's
#: features unlike an inside pixel's, and the style loss then paints a frame along the
#: edges (strongest on the left and top: in a 128 px run the outer two columns were 33
#: grey levels off their neighbours, against 1 in the photo; 5 with this margin). The
#: frame forms in the margin instead. 16 px: one feature pixel of relu5_1.
CANVAS_MARGIN = 16

_INITS = ("content", "noise")
_OPTIMIZERS = ("lbfgs", "adam")


def _default_style_layers() -> dict[str, float]:
    return {"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0, "relu4_1": 1.0, "relu5_1": 1.0}


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class GatysOptions:
    """Settings of one optimisation-based stylisation (see the module docstring).

    The weights are scale-free: the content term is the feature MSE divided by the mean
    squared content feature, and each style layer's squared Gram distance is divided by the
    squared norm of the style image's Gram at that layer. Without this, VGG layers whose
    activations differ by orders of magnitude (relu4_1's Gram distance is ~1e5x relu1_1's)
    would make equal per-layer weights meaningless. With the defaults (content 1, style 1,
    TV 10, each style layer 1) a 256 px photo becomes a recognisable Starry Night rendering
    in 300 L-BFGS evaluations.

    - ``iterations``: objective evaluations (forward + backward passes), >= 1.
    - ``init``: ``"content"`` (start from the content image) or ``"noise"`` (uniform
      noise blurred with a Gaussian of ``NOISE_BLUR_SIGMA`` pixels; lecture tweak).
    - ``style_layer_weights``: VGG tap -> weight (lecture tweak: one weight per layer).
    - ``content_layer``: the VGG tap compared with the content image.
    - ``content_weight``, ``style_weight``, ``tv_weight``: the terms' weights, >= 0.
    - ``optimizer``: ``"lbfgs"`` (as Gatys et al.) or ``"adam"``.
    - ``preserve_color``: luminance-only transfer (Gatys et al. 2016b).
    - ``seed``: seeds the noise of ``init="noise"``; results are deterministic.
    """

    iterations: int = 300
    init: Literal["content", "noise"] = "content"
    style_layer_weights: Mapping[str, float] = field(default_factory=_default_style_layers)
    content_layer: str = "relu4_2"
    content_weight: float = 1.0
    style_weight: float = 1.0
    tv_weight: float = 10.0
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    preserve_color: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError with a precise message for the first invalid setting."""
        valid = ", ".join(VGG19_LAYERS)
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) \
                or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {', '.join(_INITS)}, got {self.init!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if not isinstance(self.style_layer_weights, Mapping):
            raise ValueError("style_layer_weights must be a mapping of layer name -> weight, "
                             f"got {type(self.style_layer_weights).__name__}")
        unknown = [name for name in self.style_layer_weights if name not in VGG19_LAYERS]
        if unknown:
            raise ValueError(f"unknown style layer(s) {', '.join(map(repr, unknown))}; "
                             f"valid layers: {valid}")
        if self.content_layer not in VGG19_LAYERS:
            raise ValueError(f"unknown content_layer {self.content_layer!r}; "
                             f"valid layers: {valid}")
        for name, weight in self.style_layer_weights.items():
            if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"style_layer_weights[{name!r}] must be a finite number >= 0, "
                                 f"got {weight!r}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.style_weight > 0 and not any(w > 0 for w in self.style_layer_weights.values()):
            raise ValueError(
                f"style_weight is {self.style_weight:g} but every style layer weight is zero "
                "(or none is given): give at least one layer in style_layer_weights a "
                "positive weight, or set style_weight=0"
            )
        if self.content_weight == 0 and self.style_weight == 0 and self.tv_weight == 0:
            raise ValueError("content_weight, style_weight and tv_weight are all zero: "
                             "there is nothing to optimise")
        if not isinstance(self.preserve_color, bool):
            raise ValueError(f"preserve_color must be a bool, got {self.preserve_color!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def active_style_layers(self) -> dict[str, float]:
        """The style layers that contribute (positive weight, and style_weight > 0)."""
        if self.style_weight == 0:
            return {}
        return {name: float(w) for name, w in self.style_layer_weights.items() if w > 0}

    def required_layers(self) -> list[str]:
        """The VGG taps the objective reads, shallow to deep."""
        needed = set(self.active_style_layers())
        if self.content_weight > 0:
            needed.add(self.content_layer)
        return [name for name in VGG19_LAYERS if name in needed]


@dataclass(frozen=True)
class GatysProgress:
    """One progress report. The losses are already multiplied by their weights, so
    ``total_loss = content_loss + style_loss + tv_loss``."""

    iteration: int
    iterations: int
    total_loss: float
    content_loss: float
    style_loss: float
    tv_loss: float


class StopRequested(Exception):
    """Raised by :func:`stylize_with_image` when ``should_stop()`` returns True."""


class _BudgetSpent(Exception):
    """Internal: the evaluation budget is used up (stops L-BFGS mid-step)."""


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflection padding."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded_h = min(radius, image.shape[-2] - 1)
    padded_w = min(radius, image.shape[-1] - 1)
    x = F.pad(image, [padded_w, padded_w, padded_h, padded_h], mode="reflect")
    # Pad with replication if the image is smaller than the kernel radius.
    x = F.pad(x, [radius - padded_w, radius - padded_w, radius - padded_h, radius - padded_h],
              mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(),
                 groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(),
                    groups=channels)


def generator_seed(seed: int) -> int:
    """The 32-bit seed the noise generator gets for a seed of up to 64 bits. Torch's CPU
    generator (mt19937) keeps only a seed's low 32 bits, so 1 and 1 + 2**32 made the same
    noise: a seed from 2**32 up is mixed (the splitmix64 finaliser) so that its high bits
    count too. Seeds below 2**32 are kept, and with them their noise. A 32-bit generator
    still has 2**32 starts: two seeds share one by chance, not by their low bits."""
    if seed < 2**32:
        return seed
    mask = 2**64 - 1
    mixed = seed & mask
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & mask
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & mask
    return (mixed ^ (mixed >> 31)) >> 32


def blurred_noise(shape: tuple[int, ...], seed: int, sigma: float = NOISE_BLUR_SIGMA,
                  device: str | torch.device = "cpu") -> Tensor:
    """Uniform noise blurred with a Gaussian (the lecture's starting image), each channel
    stretched back to [0, 1]. Deterministic for a seed; the high bits of a 64-bit seed count
    too (:func:`generator_seed`)."""
    generator = torch.Generator().manual_seed(generator_seed(seed))
    noise = torch.rand(shape, generator=generator, dtype=torch.float32)
    smooth = _gaussian_blur(noise, sigma)
    low = smooth.amin(dim=(-2, -1), keepdim=True)
    high = smooth.amax(dim=(-2, -1), keepdim=True)
    return ((smooth - low) / (high - low).clamp_min(1e-6)).to(device)


def _check_image(name: str, image: Tensor, channels: int) -> None:
    if not isinstance(image, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != channels:
        raise ValueError(f"{name} must have shape (1, {channels}, H, W), got "
                         f"{tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _energy(value: Tensor) -> float:
    """A positive normaliser from a squared-magnitude statistic."""
    return max(float(value), 1e-12)


def min_image_side(options: GatysOptions) -> int:
    """The shortest side, in pixels, that the content and style images need for the
    deepest VGG layer ``options`` use (its stride: one feature pixel at least)."""
    deepest = options.required_layers()[-1] if options.required_layers() else "relu1_1"
    return TAP_STRIDE[deepest]


def stylize_with_image(
    vgg: VGG19Features,
    content: Tensor,
    style: Tensor,
    options: GatysOptions,
    *,
    mask: Tensor | None = None,
    on_progress: Callable[[GatysProgress], None] | None = None,
    progress_every: int = 10,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Renders ``content`` in the style of ``style`` by optimising the pixels.

    Args:
        vgg: the (frozen) VGG19 feature extractor, e.g. ``load_vgg19(device)``.
        content: (1, 3, H, W) RGB in [0, 1].
        style: (1, 3, h, w) RGB in [0, 1], any size (already at a scale comparable to the
            content's).
        options: see :class:`GatysOptions`; validated first.
        mask: optional (1, 1, H, W) in [0, 1]; 1 = stylise, 0 = keep the content.
        on_progress: called every ``progress_every`` evaluations and after the last one.
        should_stop: checked before every evaluation; when it returns True,
            :class:`StopRequested` is raised.

    Returns:
        (1, 3, H, W) RGB in [0, 1] on ``content``'s device: the lowest-loss image seen,
        with the content's chroma when ``preserve_color`` and the content outside ``mask``.

    Raises:
        ValueError: invalid options or inputs. StopRequested: ``should_stop()`` was True.
    """
    options.validate()
    if not isinstance(progress_every, int) or progress_every < 1:
        raise ValueError(f"progress_every must be an integer >= 1, got {progress_every!r}")
    _check_image("content", content, 3)
    _check_image("style", style, 3)
    if mask is not None:
        _check_image("mask", mask, 1)
        if mask.shape[-2:] != content.shape[-2:]:
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the content's "
                             f"{tuple(content.shape[-2:])}")
    min_size = min_image_side(options)
    for name, image in (("content", content), ("style", style)):
        if min(image.shape[-2:]) < min_size:
            raise ValueError(f"{name} is {tuple(image.shape[-2:])} pixels; the layers used "
                             f"need at least {min_size} pixels per side")

    output_device = content.device
    device = next(vgg.parameters()).device
    content = content.detach().to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
    style = style.detach().to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
    given_mask = None if mask is None else \
        mask.detach().to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
    # The optimised canvas: the content with CANVAS_MARGIN px of its reflection around it,
    # cut off at the end, so that the frame VGG's padding draws falls outside the image.
    original_content = content
    content = _with_margin(content)
    soft_mask = None if given_mask is None else _with_margin(given_mask)

    # Luminance-only transfer (Gatys et al. 2016b): optimise one luminance channel against a
    # style luminance whose mean and deviation are matched to the content's.
    if options.preserve_color:
        content_luma = luminance(content)
        target_image = content_luma
        style_image = match_luminance_statistics(luminance(style), content_luma)
        to_rgb: Callable[[Tensor], Tensor] = lambda image: image.expand(-1, 3, -1, -1)  # noqa: E731
    else:
        target_image = content
        style_image = style
        to_rgb = lambda image: image  # noqa: E731

    style_layers = options.active_style_layers()
    layers = options.required_layers()
    with torch.no_grad():
        content_target = vgg(to_rgb(target_image), [options.content_layer])[
            options.content_layer] if options.content_weight > 0 else None
        style_features = vgg(to_rgb(style_image), list(style_layers)) if style_layers else {}
        style_grams = {name: gram_matrix(fmap) for name, fmap in style_features.items()}
        del style_features
        # Scale-free weights: each term is divided by its target's size, so that the layers
        # (whose activations differ by orders of magnitude) contribute comparably.
        content_scale = options.content_weight / _energy(content_target.pow(2).mean()) \
            if content_target is not None else 0.0
        layer_scales = {name: options.style_weight * weight
                        / _energy(style_grams[name].pow(2).sum())
                        for name, weight in style_layers.items()}

    if options.init == "noise":
        start = blurred_noise(tuple(target_image.shape), options.seed, device=device)
    else:
        start = target_image.clone(memory_format=torch.contiguous_format)
    pixels = start.contiguous().requires_grad_(True)

    def composite(image: Tensor) -> Tensor:
        return image if soft_mask is None else target_image + soft_mask * (image - target_image)

    evaluations = 0
    best_loss = math.inf
    best_pixels = pixels.detach().clone()

    def evaluate() -> Tensor:
        nonlocal evaluations, best_loss, best_pixels
        if evaluations >= options.iterations:
            raise _BudgetSpent
        if should_stop is not None and should_stop():
            raise StopRequested(f"stopped after {evaluations} of {options.iterations} iterations")
        with torch.no_grad():
            pixels.clamp_(0.0, 1.0)
        image = composite(pixels)
        features = vgg(to_rgb(image), layers) if layers else {}
        zero = image.new_zeros(())
        c_loss = content_scale * content_loss(features[options.content_layer], content_target) \
            if content_target is not None else zero
        s_loss = style_loss(features, style_grams, layer_scales, mask=soft_mask) \
            if style_layers else zero
        tv = options.tv_weight * total_variation_loss(image) if options.tv_weight > 0 else zero
        total = c_loss + s_loss + tv
        if pixels.grad is not None:
            pixels.grad = None
        total.backward()
        evaluations += 1
        value = float(total.detach())
        if value < best_loss:
            best_loss = value
            best_pixels = pixels.detach().clone()
        if on_progress is not None and (evaluations % progress_every == 0
                                        or evaluations == options.iterations):
            on_progress(GatysProgress(iteration=evaluations, iterations=options.iterations,
                                      total_loss=value, content_loss=float(c_loss.detach()),
                                      style_loss=float(s_loss.detach()),
                                      tv_loss=float(tv.detach())))
        return total

    with torch.enable_grad():
        if options.optimizer == "lbfgs":
            lbfgs = torch.optim.LBFGS([pixels], lr=1.0, max_iter=options.iterations,
                                      max_eval=options.iterations,
                                      history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")
            try:
                while evaluations < options.iterations:
                    lbfgs.step(evaluate)
            except _BudgetSpent:
                pass
        else:
            adam = torch.optim.Adam([pixels], lr=ADAM_LEARNING_RATE)
            while evaluations < options.iterations:
                evaluate()
                adam.step()

    with torch.no_grad():
        result = _without_margin(composite(best_pixels.clamp(0.0, 1.0)))
        if options.preserve_color:
            result = combine_luma_chroma(result, original_content)
        if given_mask is not None:
            result = blend_with_mask(result, original_content, given_mask)
        return result.clamp(0.0, 1.0).to(output_device)


def _with_margin(image: Tensor) -> Tensor:
    """``image`` extended by CANVAS_MARGIN px on every side, by reflection (by repeating
    the edge where the image is too small to reflect that far)."""
    margin = CANVAS_MARGIN
    mode = "reflect" if min(image.shape[-2:]) > margin else "replicate"
    return F.pad(image, [margin] * 4, mode=mode)


def _without_margin(image: Tensor) -> Tensor:
    margin = CANVAS_MARGIN
    return image[..., margin:-margin, margin:-margin] if margin else image
