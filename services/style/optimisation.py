"""Request parsing for StylizeWithImage: a protobuf request -> a validated Gatys job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from percept.v1 import style_pb2
from services.common.alpha import ALPHA_FORMATS, over_white, resize_with_alpha
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument, field_of
from services.common.images import (
    decode_image,
    decode_mask,
    output_format_enum,
    output_format_name,
    resize_longest_side,
    validate_quality,
)
from services.common.tensors import to_tensor
from training.perceptual.gatys import GatysOptions, GatysProgress, min_image_side

DEFAULT_ITERATIONS = 300
DEFAULT_MAX_SIZE = 256
MIN_SIZE, MAX_SIZE = 32, 1024
DEFAULT_PROGRESS_EVERY = 10

_INITS = {
    style_pb2.STYLE_INIT_UNSPECIFIED: "content",
    style_pb2.STYLE_INIT_CONTENT: "content",
    style_pb2.STYLE_INIT_BLURRED_NOISE: "noise",
}
_OPTIMIZERS = {
    style_pb2.STYLE_OPTIMIZER_UNSPECIFIED: "lbfgs",
    style_pb2.STYLE_OPTIMIZER_LBFGS: "lbfgs",
    style_pb2.STYLE_OPTIMIZER_ADAM: "adam",
}


@dataclass
class OptimisationJob:
    """One validated StylizeWithImage request, ready for the optimiser thread."""

    content: torch.Tensor  # (1, 3, H, W) in [0, 1]
    style: torch.Tensor  # (1, 3, h, w) in [0, 1]
    mask: torch.Tensor | None  # (1, 1, H, W) in [0, 1]
    alpha: np.ndarray | None  # content alpha at working size, reattached to the result
    options: GatysOptions
    progress_every: int
    output_format: int
    quality: int
    on_progress: Callable[[GatysProgress], None] | None = None
    should_stop: Callable[[], bool] = field(default=lambda: False)


def _optional(request: style_pb2.StylizeWithImageRequest, name: str,
              default: float | None) -> float | None:
    return getattr(request, name) if request.HasField(name) else default


#: The request fields GatysOptions.validate names in its messages, first match first.
_VALIDATED_FIELDS = ("style_layer_weights", "style layer", "content_weight", "style_weight",
                     "tv_weight", "seed", "iterations", "init", "optimizer")


def _field_named_in(message: str) -> str | None:
    """The request field a GatysOptions error is about (google.rpc.BadRequest)."""
    for name in _VALIDATED_FIELDS:
        if message.startswith(name) or f" {name}" in message:
            return "style_layer_weights" if name == "style layer" else name
    return None


def noise_seed(seed: int) -> int:
    """The noise start's seed for a request's int64 ``seed``: every int64 is one, a negative
    one taken as the unsigned 64-bit value of its bits (-1 is 2**64 - 1), as
    torch.Generator.manual_seed itself takes it; 0 stays 0, the default seed. The same seed
    always gives the same noise (GatysOptions refuses a negative seed, hence the mapping)."""
    return seed % 2**64


def parse_request(request: style_pb2.StylizeWithImageRequest,
                  config: ServerConfig) -> OptimisationJob:
    """Validates every field; raises InvalidArgument with a precise message."""
    iterations = request.iterations or DEFAULT_ITERATIONS
    if not 1 <= iterations <= config.max_iterations:
        if request.iterations == 0:  # the caller asked for nothing: name what 0 stands for
            raise InvalidArgument(
                f"iterations is 0, which means the default, {DEFAULT_ITERATIONS}, over this "
                f"server's --max-iterations of {config.max_iterations}: set iterations to "
                f"1..{config.max_iterations} (percept stylize --iterations N)",
                field="iterations")
        raise InvalidArgument(f"iterations must be 1..{config.max_iterations} (this server's "
                              f"--max-iterations), got {request.iterations}",
                              field="iterations")
    max_size = request.max_size or DEFAULT_MAX_SIZE
    if not MIN_SIZE <= max_size <= MAX_SIZE:
        raise InvalidArgument(f"max_size must be {MIN_SIZE}..{MAX_SIZE}, got {request.max_size}",
                              field="max_size")
    if request.init not in _INITS:
        raise InvalidArgument(f"unknown init {request.init}", field="init")
    if request.optimizer not in _OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {request.optimizer}", field="optimizer")
    progress_every = request.progress_every or DEFAULT_PROGRESS_EVERY
    if progress_every < 1:
        raise InvalidArgument(f"progress_every must be >= 1, got {request.progress_every}",
                              field="progress_every")

    defaults = GatysOptions()
    weights = dict(request.style_layer_weights) or dict(defaults.style_layer_weights)
    values = {"content_weight": _optional(request, "content_weight", defaults.content_weight),
              "style_weight": _optional(request, "style_weight", defaults.style_weight),
              "tv_weight": _optional(request, "tv_weight", defaults.tv_weight)}
    for name, value in values.items():
        if value is None or not np.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number", field=name)
    options = GatysOptions(
        iterations=iterations, init=_INITS[request.init],  # type: ignore[arg-type]
        style_layer_weights=weights, content_weight=float(values["content_weight"] or 0.0),
        style_weight=float(values["style_weight"] or 0.0),
        tv_weight=float(values["tv_weight"] or 0.0),
        optimizer=_OPTIMIZERS[request.optimizer],  # type: ignore[arg-type]
        preserve_color=request.preserve_color, seed=noise_seed(request.seed))
    try:
        options.validate()
    except ValueError as error:
        raise InvalidArgument(str(error), field=_field_named_in(str(error))) from error

    output_format = output_format_enum(request.output_format)
    output_format_name(output_format)  # an unknown format fails now, not after the run
    quality = validate_quality(request.quality)

    # both in sRGB, as VGG's statistics and the result are (a tagged image is converted)
    content = decode_image(request.content_image, max_pixels=config.max_pixels,
                           what="content image", srgb=True)
    style = decode_image(request.style_image, max_pixels=config.max_pixels, what="style image",
                         srgb=True)
    longest = min(max_size, max(content.width, content.height))
    if content.alpha is not None and output_format_name(output_format) in ALPHA_FORMATS:
        # the hidden colour is kept out of the visible edge, at the working size
        content_rgb, _ = resize_with_alpha(content.rgb, content.alpha, longest)
    else:  # a JPEG result: the image as seen on white
        content_rgb = resize_longest_side(over_white(content.rgb, content.alpha), longest)
    style_longest = min(longest, max(style.width, style.height))
    # the painting as seen on white, not the colour hidden under its transparent parts
    style_rgb = resize_longest_side(over_white(style.rgb, style.alpha), style_longest)
    min_side = min_image_side(options)
    for what, rgb in (("content image", content_rgb), ("style image", style_rgb)):
        if min(rgb.shape[:2]) < min_side:
            raise InvalidArgument(
                f"{what} is {rgb.shape[1]}x{rgb.shape[0]} px at the working size (longest "
                f"side {longest}; the style image no larger than the content); the VGG layers "
                f"used need at least {min_side} px on each side", reason="IMAGE_TOO_SMALL",
                field=field_of(what))
    height, width = content_rgb.shape[:2]
    alpha = None
    if content.alpha is not None:
        alpha = resize_longest_side(np.dstack([content.alpha] * 3), longest)[..., 0]
    mask = None
    if request.mask:
        mask_array = decode_mask(request.mask, max_pixels=config.max_pixels,
                                 size=(width, height), image_size=(content.width, content.height))
        mask = torch.from_numpy(mask_array)[None, None]
    return OptimisationJob(
        content=to_tensor(content_rgb), style=to_tensor(style_rgb), mask=mask, alpha=alpha,
        options=options, progress_every=progress_every,
        output_format=output_format, quality=quality)
