"""SuperResolution: 4x upscaling with a perceptual-loss-trained network (Johnson et al. 2016),
tiled so that any image size runs in bounded memory, tiles batched across requests."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import numpy as np
from PIL import Image

from percept.v1 import server_pb2, superres_pb2, superres_pb2_grpc
from services.common.alpha import ALPHA_FORMATS, fill_transparent, over_white
from services.common.artifacts import list_artifacts, load_artifact
from services.common.batching import MicroBatcher
from services.common.device import choose_device, describe, dtype_name
from services.common.errors import InvalidArgument, NotFound, Unimplemented, shown
from services.common.image_model import TiledImageModel
from services.common.images import (
    check_output_size,
    decode_image,
    encode_image,
    output_format_enum,
    output_format_name,
    validate_quality,
)
from services.common.rpc import time_remaining, unary_errors
from services.common.server import ServiceModule, StartupError
from services.common.server_info import model_info

log = logging.getLogger("percept.superres")

SCALE = 4
# Input pixels. 256 + 16: images up to 272 px go through in one piece, and a 512 or 1024 px
# side needs 2 or 4 tiles, not 3 or 5 (tiles overlap, so a power-of-two tile wastes most
# of a row of tiles on a power-of-two image).
TILE = 272
# Input pixels each side: about the receptive-field radius of the committed nets (width
# 32, 5 blocks: 16.75 input px), and the feathering weights a tile's outer pixels least;
# tiled and untiled outputs differ by at most 2 levels at 272-560 px (bf16 and fp32).
OVERLAP = 16
# At most 3 tiles (3 x 272^2 input px, 3.5 megapixels out) per forward pass: on a 2048 px
# input the fp32 activations of one pass stay near 1 GB (benchmarks: peak RSS).
MAX_BATCH_PIXELS = 3 * TILE * TILE
MIN_SIDE = 8
PREFERRED_DEFAULTS = ("superres-perceptual", "superres-psnr")
def upscale_alpha(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
    """The alpha channel resized to the output's ``width`` x ``height`` (bicubic)."""
    return np.asarray(Image.fromarray(alpha).resize((width, height), Image.Resampling.BICUBIC))


class SuperResolutionService(ServiceModule, superres_pb2_grpc.SuperResolutionServicer):
    name = "superres"
    full_name = "percept.v1.SuperResolution"

    models: dict[str, TiledImageModel]
    default: str

    def add_to_server(self, server: grpc.aio.Server) -> None:
        superres_pb2_grpc.add_SuperResolutionServicer_to_server(self, server)

    async def load(self) -> None:
        self.device = choose_device(self.config.device)
        self.models = {}
        for name in list_artifacts(self.config.models_dir, "superres"):
            artifact = await asyncio.to_thread(load_artifact, self.config.models_dir, name,
                                               self.device)
            model = TiledImageModel(artifact, self.device, self.config, scale=SCALE, tile=TILE,
                                    overlap=OVERLAP, max_batch_pixels=MAX_BATCH_PIXELS,
                                    max_output_pixels=2 * self.config.max_pixels,
                                    max_output_source="2 x --max-pixels",
                                    min_side=MIN_SIDE)
            model.start()
            self.models[name] = model
        if not self.models and self.config.service == "superres":
            # a process that serves only this could do nothing, yet report ready (a load
            # balancer would send it traffic); under `serve all` the others still serve
            raise StartupError(
                f"no super-resolution artifact under --models-dir {self.config.models_dir}: "
                "this server would answer every Upscale UNIMPLEMENTED while reporting ready "
                "(a load balancer would send it traffic); point --models-dir at the models "
                "(the repository's models/), export one with `percept train superres`, or "
                "serve only the services you have models for (percept serve style)")
        requested = self.config.default_model
        if requested and requested not in self.models:
            what = ("is not a super-resolution artifact"
                    if (self.config.models_dir / requested / "config.json").is_file()
                    else f"is not under {self.config.models_dir}")
            raise StartupError(f"--default-model {requested!r} {what}; the super-resolution "
                               f"artifacts there: {', '.join(sorted(self.models)) or 'none'}")
        fallback = [n for n in PREFERRED_DEFAULTS if n in self.models] + sorted(self.models)
        self.default = requested or (fallback[0] if fallback else "")
        if not self.models:
            log.warning("no super-resolution artifacts: every Upscale is answered "
                        "UNIMPLEMENTED (NO_MODEL_INSTALLED); the other services serve",
                        extra={"models_dir": str(self.config.models_dir)})
        elif not requested and self.default != PREFERRED_DEFAULTS[0]:
            log.warning(f"{PREFERRED_DEFAULTS[0]} is not installed: {self.default} is the "
                        "default model", extra={"models_dir": str(self.config.models_dir)})
        log.info("superres loaded", extra={"device": describe(self.device),
                                           "models": sorted(self.models),
                                           "default": self.default,
                                           "dtype": dtype_name(self.device, self.config.cpu_dtype)})

    async def warmup(self) -> None:
        for model in self.models.values():
            await model.warmup()

    def model_infos(self) -> list[server_pb2.ModelInfo]:
        return [model_info(self.full_name, name, model.artifact.name, model.artifact.version,
                           is_default=name == self.default)
                for name, model in self.models.items()]

    def batchers(self) -> list[MicroBatcher[Any, Any]]:
        return [model.batcher for model in getattr(self, "models", {}).values()]

    async def close(self) -> None:
        for model in getattr(self, "models", {}).values():
            await model.stop()

    @unary_errors
    async def Upscale(self, request: superres_pb2.UpscaleRequest,
                      context: grpc.aio.ServicerContext) -> superres_pb2.UpscaleResponse:
        if not self.models:  # under `serve all` only: `serve superres` does not start
            raise Unimplemented("no super-resolution model is installed in this server's "
                                "--models-dir; train one with `percept train superres`")
        if request.scale not in (0, SCALE):
            raise InvalidArgument(f"scale must be {SCALE} (or 0 for the default), "
                                  f"got {request.scale}", field="scale")
        name = request.model or self.default
        if name not in self.models:
            raise NotFound(f"unknown model {shown(name)}; "
                           f"available: {', '.join(sorted(self.models))}",
                           reason="MODEL_NOT_FOUND", field="model",
                           metadata={"available": ",".join(sorted(self.models))})
        fmt = output_format_enum(request.output_format)
        # an unknown format fails now, not after every tile has run
        keeps_alpha = output_format_name(fmt) in ALPHA_FORMATS
        quality = validate_quality(request.quality)
        model = self.models[name]
        # busy, too small or too elongated: refused from the header
        async with model.admission(request.image, self.config.max_pixels) as slot:
            decoded = await slot.to_thread(decode_image, request.image,
                                           max_pixels=self.config.max_pixels)
            # what the header could not say (EXIF may turn it, too)
            model.check_min_side(decoded.width, decoded.height)
            model.check_output(decoded.width, decoded.height)
            # a side the format cannot hold: now, not after every tile has run
            check_output_size(decoded.width * SCALE, decoded.height * SCALE, fmt)
            remaining = time_remaining(context)
            deadline = None if remaining is None else time.monotonic() + remaining
            # Off the event loop: on a large image each takes a good part of a second.
            source, alpha = decoded.rgb, decoded.alpha if keeps_alpha else None
            if alpha is not None:
                source = await slot.to_thread(fill_transparent, source, alpha)
            elif decoded.alpha is not None:  # a JPEG result: the image as seen on white
                source = await slot.to_thread(over_white, source, decoded.alpha)
            rgb = await model.apply(source, deadline, slot_held=True)
            if alpha is not None:
                alpha = await slot.to_thread(upscale_alpha, alpha, rgb.shape[1], rgb.shape[0])
            # a grey picture comes back grey: the network sees three equal channels and
            # adds a residual of its own to each, which would tint it
            data = await slot.to_thread(encode_image, rgb, alpha=alpha, fmt=fmt,
                                        quality=quality, icc_profile=decoded.icc_profile,
                                        max_reply_bytes=self.config.max_message_bytes,
                                        grey=decoded.grey)
        return superres_pb2.UpscaleResponse(image=data, width=rgb.shape[1], height=rgb.shape[0],
                                            model=model.artifact.tag, format=fmt)
