"""StyleTransfer: fixed-style feed-forward networks and optimisation-based transfer."""

from __future__ import annotations

import asyncio
import difflib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import torch

from percept.v1 import server_pb2, style_pb2, style_pb2_grpc
from services.common.alpha import ALPHA_FORMATS, fill_transparent, over_white
from services.common.artifacts import (
    Artifact,
    check_artifact_name,
    invalid_field,
    list_artifacts,
    load_artifact,
)
from services.common.batching import MicroBatcher
from services.common.device import choose_device, describe, dtype_name
from services.common.errors import Busy, InvalidArgument, NotFound, Unimplemented, shown
from services.common.image_model import RequestSlot, TiledImageModel
from services.common.images import (
    check_output_size,
    decode_image,
    decode_mask,
    encode_image,
    output_format_enum,
    output_format_name,
    validate_quality,
)
from services.common.metrics import REJECTED, REQUEST_SLOTS
from services.common.rpc import stream_errors, time_remaining, unary_errors
from services.common.server import ServiceModule, StartupError
from services.common.server_info import model_info
from services.common.tensors import to_uint8
from services.style.optimisation import OptimisationJob, parse_request
from services.style.postprocess import finish, is_identity
from training.nets.vgg19 import load_vgg19
from training.perceptual.gatys import GatysProgress, StopRequested, stylize_with_image

log = logging.getLogger("percept.style")

# Fast style nets use instance normalisation: big tiles keep the statistics close to the
# whole image's, and a wide feathered overlap hides what difference remains. The tile side
# is --style-tile (default 1024 + 64: images up to 1088 px go through whole, a 2048 px side
# needs 2 tiles); every extra tile costs its overlap twice and a blend.
OVERLAP = 64
# Full tiles per forward pass: two of 1088 px (fp32 activations near 1 GB on the CPU);
# smaller images batch up to --max-batch.
MAX_BATCH_PIXELS = 2 * 1088 * 1088


class StyleTransferService(ServiceModule, style_pb2_grpc.StyleTransferServicer):
    name = "style"
    full_name = "percept.v1.StyleTransfer"

    styles: dict[str, TiledImageModel]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        style_pb2_grpc.add_StyleTransferServicer_to_server(self, server)

    async def load(self) -> None:
        self.device = choose_device(self.config.device)
        self.vgg = await asyncio.to_thread(load_vgg19, self.device)
        self.styles = {}
        for name in list_artifacts(self.config.models_dir, "style"):
            artifact = await asyncio.to_thread(load_artifact, self.config.models_dir, name,
                                               self.device)
            style = style_name(artifact)
            if style in self.styles:  # one would hide the other: say so, do not pick one
                raise StartupError(
                    f"two style artifacts are both named {style!r}: "
                    f"{self.styles[style].artifact.path} and {artifact.path}; remove one, or "
                    "retrain one with another --name")
            model = TiledImageModel(artifact, self.device, self.config, scale=1,
                                    tile=self.config.style_tile, overlap=OVERLAP,
                                    max_batch_pixels=MAX_BATCH_PIXELS)
            model.start()
            self.styles[style] = model
        if not self.styles:
            log.warning("no style artifacts: every Stylize is answered UNIMPLEMENTED "
                        "(NO_MODEL_INSTALLED) and ListStyles lists none; StylizeWithImage "
                        "(any style image) works",
                        extra={"models_dir": str(self.config.models_dir)})
        # Optimisation runs are long: one at a time, a short bounded queue behind it. A
        # request holds a place from before its images are decoded, so a burst past the
        # limit is refused at once instead of after decoding up to 64 MP each.
        self.optimisations_admitted = 0
        self.optimiser = MicroBatcher("style-optimise", self._run_optimisations, max_batch=1,
                                      max_wait_ms=0, max_queue=self.config.max_optimisations)
        self.optimiser.start()
        dtype = dtype_name(self.device, self.config.cpu_dtype)
        log.info("style service loaded", extra={"device": describe(self.device),
                                                "dtype": dtype, "styles": sorted(self.styles)})

    async def warmup(self) -> None:
        def run() -> None:
            with torch.no_grad():
                self.vgg(torch.rand(1, 3, 64, 64, device=self.device), ["relu5_1"])
        await asyncio.to_thread(run)
        for model in self.styles.values():
            await model.warmup()

    async def close(self) -> None:
        if hasattr(self, "optimiser"):
            await self.optimiser.stop()
        for model in getattr(self, "styles", {}).values():
            await model.stop()

    def model_infos(self) -> list[server_pb2.ModelInfo]:
        return [model_info(self.full_name, name, model.artifact.name, model.artifact.version)
                for name, model in self.styles.items()]

    def batchers(self) -> list[MicroBatcher[Any, Any]]:
        """The fast styles' (an optimisation runs for minutes: it never stalls)."""
        return [model.batcher for model in getattr(self, "styles", {}).values()]

    # -- fixed styles ------------------------------------------------------------------
    @unary_errors
    async def ListStyles(self, request: style_pb2.ListStylesRequest,
                         context: grpc.aio.ServicerContext) -> style_pb2.ListStylesResponse:
        return style_pb2.ListStylesResponse(styles=[
            style_pb2.StyleInfo(name=name, version=str(model.artifact.version),
                                title=model.artifact.config.get("style", {}).get("title", name))
            for name, model in sorted(self.styles.items())])

    @unary_errors
    async def Stylize(self, request: style_pb2.StylizeRequest,
                      context: grpc.aio.ServicerContext) -> style_pb2.StylizeResponse:
        if not self.styles:
            raise Unimplemented(
                "no fast style networks are installed in this server's --models-dir; "
                "train one with `percept train style`, or use "
                "StylizeWithImage (`percept stylize --style-image`)")
        available = ", ".join(sorted(self.styles))
        if not request.style:
            raise InvalidArgument(f"style is required; available: {available}", field="style")
        if request.style not in self.styles:
            close = difflib.get_close_matches(request.style.strip().lower(), self.styles, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NotFound(f"unknown style {shown(request.style)}{hint}; available: {available}",
                           reason="STYLE_NOT_FOUND", field="style",
                           metadata={"available": ",".join(sorted(self.styles))})
        strength = request.strength if request.HasField("strength") else 1.0
        if not 0.0 <= strength <= 1.0:
            raise InvalidArgument(f"strength must be 0..1, got {strength!r}", field="strength")
        fmt = output_format_enum(request.output_format)
        output_format_name(fmt)  # an unknown format fails now, not after the forward pass
        quality = validate_quality(request.quality)
        model = self.styles[request.style]
        # busy, or too elongated: refused from the header
        async with model.admission(request.image, self.config.max_pixels) as slot:
            decoded = await slot.to_thread(decode_image, request.image,
                                           max_pixels=self.config.max_pixels, srgb=True)
            check_output_size(decoded.width, decoded.height, fmt)  # before the forward pass
            mask = None
            if request.mask:
                mask = await slot.to_thread(decode_mask, request.mask,
                                            max_pixels=self.config.max_pixels,
                                            size=(decoded.width, decoded.height))
            remaining = time_remaining(context)
            deadline = None if remaining is None else time.monotonic() + remaining
            alpha = decoded.alpha if output_format_name(fmt) in ALPHA_FORMATS else None
            content = decoded.rgb
            if decoded.alpha is not None and alpha is None:  # a JPEG result: as seen on white
                content = await slot.to_thread(over_white, content, decoded.alpha)
            if strength == 0.0 or (mask is not None and not mask.any()):
                rgb = content  # nothing of the stylisation would show: skip the network
            else:
                if alpha is not None:
                    # the colour hidden under alpha 0 must not bleed into the visible edge
                    content = await slot.to_thread(fill_transparent, content, alpha)
                stylised = await model.apply(content, deadline, slot_held=True)
                rgb = stylised
                if not is_identity(preserve_color=request.preserve_color, strength=strength,
                                   mask=mask):
                    rgb = await slot.to_thread(finish, content, stylised,
                                               preserve_color=request.preserve_color,
                                               strength=strength, mask=mask)
            data = await slot.to_thread(encode_image, rgb, alpha=alpha, fmt=fmt,
                                        quality=quality,
                                        max_reply_bytes=self.config.max_message_bytes)
        return style_pb2.StylizeResponse(image=data, width=rgb.shape[1], height=rgb.shape[0],
                                         model=model.artifact.tag, format=fmt)

    # -- optimisation-based (Gatys) ------------------------------------------------------
    def _run_optimisations(self, jobs: Sequence[OptimisationJob]) -> list[object]:
        results: list[object] = []
        for job in jobs:
            try:
                output = stylize_with_image(
                    self.vgg, job.content.to(self.device), job.style.to(self.device),
                    job.options, mask=None if job.mask is None else job.mask.to(self.device),
                    on_progress=job.on_progress, progress_every=job.progress_every,
                    should_stop=job.should_stop)
                results.append(output.cpu())
            except StopRequested as stop:
                # the traceback holds this frame, whose results hold the exception: a cycle
                # that kept the optimisation's tensors until a full collection
                results.append(stop.with_traceback(None))
        return results

    @stream_errors
    async def StylizeWithImage(self, request: style_pb2.StylizeWithImageRequest,
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[style_pb2.StylizeWithImageResponse]:
        if self.optimisations_admitted >= self.config.max_optimisations:
            REJECTED.labels(self.optimiser.name).inc()
            raise Busy(f"{self.optimiser.name} queue is full ({self.config.max_optimisations} "
                       "requests); retry with backoff",
                       retry_after_ms=self.optimiser.retry_after_ms)
        self.optimisations_admitted += 1
        REQUEST_SLOTS.labels(self.optimiser.name).inc()
        # held until the request ends and the decodes it started on threads have ended too
        # (a client that hangs up during a large image's decode must not free its place)
        slot = RequestSlot(self._optimisation_done)
        try:
            async for response in self._stylize_with_image(request, context, slot):
                yield response
        finally:
            slot.close()

    def _optimisation_done(self) -> None:
        self.optimisations_admitted -= 1
        REQUEST_SLOTS.labels(self.optimiser.name).dec()

    async def _stylize_with_image(self, request: style_pb2.StylizeWithImageRequest,
                                  context: grpc.aio.ServicerContext, slot: RequestSlot
                                  ) -> AsyncIterator[style_pb2.StylizeWithImageResponse]:
        job = await slot.to_thread(parse_request, request, self.config)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[GatysProgress] = asyncio.Queue()
        stop = threading.Event()
        def report(update: GatysProgress) -> None:
            loop.call_soon_threadsafe(progress.put_nowait, update)

        job.on_progress = report
        job.should_stop = stop.is_set
        task = asyncio.ensure_future(self.optimiser.submit(job, timeout=time_remaining(context)))
        getter: asyncio.Future[GatysProgress] | None = None
        try:
            while not task.done() or not progress.empty():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield style_pb2.StylizeWithImageResponse(progress=_progress_message(
                        getter.result()))
                else:
                    getter.cancel()
            try:
                output = cast(torch.Tensor, task.result())
            except StopRequested:  # the caller went away
                return
            rgb = to_uint8(output)
            data = await slot.to_thread(encode_image, rgb, alpha=job.alpha,
                                        fmt=job.output_format, quality=job.quality,
                                        max_reply_bytes=self.config.max_message_bytes)
            yield style_pb2.StylizeWithImageResponse(result=style_pb2.StylizeResponse(
                image=data, width=rgb.shape[1], height=rgb.shape[0],
                model="gatys-vgg19@1", format=job.output_format))
        finally:
            stop.set()
            for pending in (task, getter):
                if pending is not None and not pending.done():
                    pending.cancel()


def style_name(artifact: Artifact) -> str:
    """The name clients ask for a style by: config.json's ``style.name``, else the
    artifact's folder name; ArtifactError where it is not a name."""
    section = artifact.config.get("style", {})
    name = section.get("name", artifact.path.name) if isinstance(section, dict) else None
    if not isinstance(name, str):
        raise invalid_field(artifact.path, f"'style' is {section!r}: it must be an object "
                                           "whose 'name' is a string")
    check_artifact_name(name, artifact.path / "config.json", "style name")
    return name


def _progress_message(p: GatysProgress) -> style_pb2.StylizeProgress:
    return style_pb2.StylizeProgress(
        iteration=p.iteration, iterations=p.iterations, total_loss=p.total_loss,
        content_loss=p.content_loss, style_loss=p.style_loss, tv_loss=p.tv_loss)

