"""PNG encoding of the services' outputs: `services/common/png.py` against Pillow's encoder
in the same run.

Baselines: Pillow's `save(..., "PNG")` at its default level (6), what a naive server
calls, and at level 1. Then our encoder (Up filter, parallel bands) deflating with zlib
(the fallback where isal is missing) and with ISA-L (the default), on one thread and on
every core; and the lossy formats a client may ask for instead, JPEG and WebP at the
services' quality 95.

python -m benchmarks.bench_png [--quick]
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import interleaved_medians, machine, markdown_table, run_as_script
from benchmarks.image_models import photo
from percept.v1 import image_pb2
from services.common import png
from services.common.images import encode_image


def _pillow(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


def _ours(pixels: np.ndarray, threads: int, isal: bool) -> bytes:
    saved = png._isal
    if not isal:
        png._isal = None
    try:
        return png.encode_png(pixels, level=1, threads=threads)
    finally:
        png._isal = saved


def run(quick: bool = False) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    if png._isal is None:
        raise RuntimeError("isal is not installed (requirements.txt): nothing to compare")
    rows: list[dict[str, Any]] = []
    for size in [256, 1024] if quick else [256, 1024, 4096]:
        pixels = photo(size)
        encoders: dict[str, Callable[[], bytes]] = {
            "Pillow, level 6 (its default)": functools.partial(_pillow, pixels, 6),
            "Pillow, level 1": functools.partial(_pillow, pixels, 1),
            "ours, zlib level 1, 1 thread": functools.partial(_ours, pixels, 1, False),
            f"ours, zlib level 1, {cores} threads": functools.partial(_ours, pixels, cores,
                                                                     False),
            "ours, ISA-L level 1, 1 thread": functools.partial(_ours, pixels, 1, True),
            f"ours, ISA-L level 1, {cores} threads (served)":
                functools.partial(_ours, pixels, cores, True),
        }
        for encode in encoders.values():  # every output decodes to the same pixels
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode()))), pixels)
        # the lossy outputs a client may ask for instead (output_format), as served
        encoders.update({
            "JPEG quality 95 (served, lossy)": functools.partial(
                encode_image, pixels, fmt=image_pb2.IMAGE_FORMAT_JPEG, quality=95),
            "WebP quality 95 (served, lossy)": functools.partial(
                encode_image, pixels, fmt=image_pb2.IMAGE_FORMAT_WEBP, quality=95)})
        repeats = 3 if size >= 4096 else 5 if quick else 15
        medians = interleaved_medians(encoders, repeats)
        baseline = medians["Pillow, level 6 (its default)"]
        for name, seconds in medians.items():
            rows.append({"size": size, "encoder": name, "ms": seconds * 1000,
                         "bytes": len(encoders[name]()),
                         "mb_per_s": pixels.nbytes / seconds / 1e6,
                         "speedup_vs_pillow_default": baseline / seconds,
                         "speedup_vs_pillow_level1":
                             medians["Pillow, level 1"] / seconds})
    return {"machine": machine(), "image": "scikit-image astronaut, resized (bicubic)",
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["px", "encoder", "median ms", "MB/s (raw)", "kB", "x Pillow default",
         "x Pillow level 1"],
        [(r["size"], r["encoder"], r["ms"], r["mb_per_s"], r["bytes"] / 1000,
          r["speedup_vs_pillow_default"], r["speedup_vs_pillow_level1"])
         for r in result["rows"]])
    return (f"### PNG encoding of service outputs\n\nMachine: {result['machine']}; "
            f"image: {result['image']}\n\n{table}")


if __name__ == "__main__":
    raise SystemExit(run_as_script("png", __doc__, run, markdown))
