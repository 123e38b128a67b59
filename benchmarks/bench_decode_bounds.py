"""Hostile images: what a small request costs the server's decoding
(`services.common.images.decode_image`) against plain Pillow in the same run.

Baseline: ``Image.open`` and ``convert("RGB")`` of the first frame into a numpy array,
what a naive server calls to feed a model, with Pillow's own decoders (its run-length
BMP decoder included). Each hostile file is
one the test suite uses (tests/fixtures/bad_images.py), sized here so that Pillow takes
about a second; the bounds scale with the file (a request may be 64 MB), and some of
these grow with the square of it in Pillow. Ours either refuses the file from its
structure (INVALID_ARGUMENT) or decodes it at a cost that follows its size. Ordinary
images come last: there the walks that bound the cost must cost next to nothing.

python -m benchmarks.bench_decode_bounds [--quick]
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import interleaved_medians, machine, markdown_table, run_as_script
from benchmarks.image_models import photo
from services.common.errors import InvalidArgument
from services.common.images import decode_image
from tests.fixtures import bad_images
from tests.fixtures.pillow_decoders import pillows_own_decoders

CAP = 64_000_000
EOL, EOB = b"\x00\x00", b"\x00\x01"


def pillow(data: bytes) -> np.ndarray:
    with pillows_own_decoders(), Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def ours(data: bytes) -> str:
    try:
        decode_image(data, max_pixels=CAP)
    except InvalidArgument as error:
        return f"refused: {str(error).split(' (')[0].split(':')[0]}"
    return "decoded"


def hostile(quick: bool) -> dict[str, bytes]:
    """name -> bytes. The scale factor keeps --quick short."""
    scale = 0.25 if quick else 1.0
    small = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    side = int(3000 * scale ** 0.5)
    return {
        "PNG, empty chunks before the pixels": bad_images.png_with_empty_chunks(
            small, int(400_000 * scale)),
        "GIF, a comment in 1-byte pieces": bad_images.gif_with_extensions(
            small, bad_images.gif_comment(b"x" * int(300_000 * scale ** 0.5), sub_block=1), 1),
        "GIF, empty comments": bad_images.gif_with_extensions(
            small, b"\x21\xfe\x00", int(300_000 * scale ** 0.5)),
        "JPEG 2048 px, empty scans": bad_images.jpeg_with_empty_scans(
            photo(2048), int(3000 * scale)),
        "JPEG, empty comment segments": bad_images.jpeg_with_empty_comments(
            small, int(250_000 * scale)),
        "JPEG, 0xFF fill bytes before a marker": bad_images.jpeg_with_padding(
            small, b"\xff", int(2_000_000 * scale)),
        "TIFF, uncompressed, a row per strip": bad_images.uncompressed_tiff(
            np.zeros((int(300_000 * scale), 8), np.uint8)),
        "TIFF, a directory of 65,000 tags": bad_images.uncompressed_tiff(
            small[..., 0], 8, extra_tags=65_000),
        f"BMP RLE8 {side} px, a pixel and an end of line a row": bad_images.bmp_rle(
            side, side, (b"\x01\x05" + EOL) * side + EOB),
        f"BMP RLE4 {side} px, runs of 255": bad_images.bmp_rle(
            side, side, (b"\xff\x12" * (side // 255) + EOL) * side + EOB, rle4=True),
    }


def ordinary() -> dict[str, bytes]:
    pixels = photo(2048)
    image = Image.fromarray(pixels)
    return {
        "PNG 2048 px": bad_images.save(image, "PNG", compress_level=1),
        "JPEG 2048 px": bad_images.save(image, "JPEG", quality=90),
        "JPEG 2048 px, progressive": bad_images.save(image, "JPEG", quality=90,
                                                     progressive=True),
        "GIF 2048 px": bad_images.save(image.convert("P"), "GIF"),
        "TIFF 2048 px, uncompressed": bad_images.save(image, "TIFF"),
        "BMP 2048 px": bad_images.save(image, "BMP"),
    }


def run(quick: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for kind, files, repeats in (("hostile", hostile(quick), 1 if quick else 3),
                                 ("ordinary", ordinary(), 3 if quick else 7)):
        for name, data in files.items():
            actions: dict[str, Callable[[], object]] = {
                "pillow": functools.partial(pillow, data),
                "ours": functools.partial(ours, data)}
            if kind == "hostile":
                # Pillow's decode of these takes seconds, so it gets no warm-up round; ours
                # gets one of its own, so that neither pays a first call's one-time costs
                # (the RLE decoder's first use took 115 ms against 5-9 ms later)
                ours(data)
            medians = interleaved_medians(actions, repeats, warmup=0 if kind == "hostile" else 1)
            rows.append({"kind": kind, "file": name, "mb": len(data) / 1e6,
                         "pillow_ms": medians["pillow"] * 1000,
                         "ours_ms": medians["ours"] * 1000, "ours": ours(data),
                         "speedup": medians["pillow"] / medians["ours"]})
            print(f"  {name}: Pillow {medians['pillow'] * 1000:.1f} ms, ours "
                  f"{medians['ours'] * 1000:.1f} ms", flush=True)
    return {"machine": machine(), "quick": quick, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["kind", "file", "MB", "Pillow to RGB array, ms", "decode_image, ms", "ours",
         "x Pillow"],
        [(r["kind"], r["file"], r["mb"], r["pillow_ms"], r["ours_ms"], r["ours"],
          r["speedup"]) for r in result["rows"]])
    return ("### Decoding hostile images\n\n"
            f"Machine: {result['machine']}. Medians of interleaved runs; Pillow is the "
            "baseline (its own decoders), ours is the services' decode_image (a refusal "
            "from the file's structure, or a decode).\n\n" + table)


if __name__ == "__main__":
    raise SystemExit(run_as_script("decode_bounds", __doc__, run, markdown))
