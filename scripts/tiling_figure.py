"""How much a style net's tiled output differs from its one-pass output, for two versions of
a committed style: the version in an earlier commit and the one in the working tree. Each
row is one version on one held-out photo at 1100x700 (the size `percept eval style
--tiling` uses): the whole image in one pass, the same image in 576 px tiles through the
service's tiler, and their difference amplified. Writes an image and prints the PSNRs.

    .venv/bin/python scripts/tiling_figure.py --style starry-night --before 2221abf \
        [--photo data/photos/heldout/mate-Dune.jpg] [--gain 4] [--out PNG]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.evaluate_style import (
    TILING_IMAGE,
    TILING_SHIFT,
    load_style_model,
    whole_and_tiled,
)
from training.image_quality import psnr
from training.plots import save_image_grid

REPO = Path(__file__).resolve().parents[1]
ARTIFACT_FILES = ("config.json", "weights.safetensors")


def artifact_at(revision: str, folder: str, into: Path) -> Path:
    """The artifact ``folder`` (relative to the repository) as committed at ``revision``."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACT_FILES:
        blob = subprocess.run(["git", "show", f"{revision}:{folder}/{name}"], cwd=REPO,
                              check=True, capture_output=True).stdout
        (into / name).write_bytes(blob)
    return into


def amplified(a: np.ndarray, b: np.ndarray, gain: float) -> np.ndarray:
    """Mid-grey where the two agree; ``gain`` times their difference around it."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    return np.clip(128 + gain * difference, 0, 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", default="starry-night", help="committed style name")
    parser.add_argument("--before", required=True, metavar="REV",
                        help="git revision whose models/style-STYLE is the earlier version")
    parser.add_argument("--photo", type=Path,
                        default=REPO / "data" / "photos" / "heldout" / "mate-Dune.jpg")
    parser.add_argument("--tile", type=int, default=576)
    parser.add_argument("--gain", type=float, default=4.0)
    parser.add_argument("--scale", type=float, default=0.4,
                        help="size of the figure's cells against the 1100x700 images")
    parser.add_argument("--out", type=Path,
                        default=REPO / "docs" / "images" / "style_tiling_versions.jpg",
                        help="PNG or JPEG, by the suffix (default: a JPEG; this texture "
                        "made a 2.5 MB PNG)")
    args = parser.parse_args()

    folder = f"models/style-{args.style}"
    photo = np.asarray(Image.open(args.photo).convert("RGB"))
    image = np.asarray(Image.fromarray(photo).resize(TILING_IMAGE, Image.Resampling.BICUBIC))
    cell = (round(TILING_IMAGE[0] * args.scale), round(TILING_IMAGE[1] * args.scale))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        versions = [(f"{args.before}", artifact_at(args.before, folder, Path(scratch))),
                    ("working tree", REPO / folder)]
        for label, path in versions:
            whole, tiled = whole_and_tiled(load_style_model(path).module, image, args.tile)
            shift = psnr(whole, np.roll(whole, TILING_SHIFT, axis=1))
            print(f"{args.style} at {label}: tiled vs whole {psnr(tiled, whole):.2f} dB, "
                  f"whole vs itself shifted {TILING_SHIFT} px {shift:.2f} dB")
            rows.append([np.asarray(Image.fromarray(x).resize(cell, Image.Resampling.LANCZOS))
                         for x in (whole, tiled, amplified(tiled, whole, args.gain))])
    labels = ["one pass", f"{args.tile} px tiles", f"difference x{args.gain:g}"]
    save_image_grid(rows, args.out, labels)
    print(f"wrote {args.out} (rows: {args.before}, then the working tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
