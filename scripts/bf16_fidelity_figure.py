"""What `percept serve --cpu-dtype bfloat16` does to the pictures: each committed style net
served in float32 and in bfloat16 (the service's own TiledImageModel, same tiles and
rewrites) on one held-out photo, with the difference amplified, and the PSNR between the
two on every held-out photo. Writes docs/images/cpu_bf16_fidelity.png and prints a table.

    .venv/bin/python scripts/bf16_fidelity_figure.py [--size 256] [--gain 32]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.common.artifacts import list_artifacts, load_artifact
from services.common.config import ServerConfig
from services.common.image_model import TiledImageModel
from services.style.service import OVERLAP
from training.image_quality import psnr
from training.plots import save_image_grid

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
PHOTOS = REPO / "data" / "photos" / "heldout"


def served(name: str, cpu_dtype: str) -> TiledImageModel:
    config = ServerConfig(service="style", compile="off", cpu_dtype=cpu_dtype)
    artifact = load_artifact(MODELS, name, torch.device("cpu"))
    return TiledImageModel(artifact, torch.device("cpu"), config, scale=1,
                           tile=config.style_tile, overlap=OVERLAP)


def outputs(models: list[TiledImageModel], images: list[np.ndarray]
            ) -> list[list[np.ndarray]]:
    """Every model's output for every image, as the service computes them."""
    async def run() -> list[list[np.ndarray]]:
        for model in models:
            model.start()
        try:
            return [[await model.apply(image) for image in images] for model in models]
        finally:
            for model in models:
                await model.stop()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="photos resized to this side")
    parser.add_argument("--gain", type=float, default=32.0,
                        help="the difference image shows |bf16 - fp32| times this")
    parser.add_argument("--out", type=Path, default=REPO / "docs/images/cpu_bf16_fidelity.png")
    args = parser.parse_args()
    photos = sorted(p for p in PHOTOS.glob("*") if p.suffix.lower() in {".jpg", ".png"})
    if not photos:
        raise SystemExit(f"no held-out photos under {PHOTOS}: run `make data` first")
    images = [np.asarray(Image.open(p).convert("RGB").resize((args.size, args.size),
                                                             Image.Resampling.BICUBIC))
              for p in photos]
    rows, labels = [], ["photo", "served float32", "served bfloat16",
                        f"|difference| x {args.gain:g}"]
    print("| style | PSNR bf16 vs fp32, per photo (dB) | largest error (levels) |")
    print("|---|---|---|")
    for name in list_artifacts(MODELS, "style"):
        f32s, bf16s = outputs([served(name, "float32"), served(name, "bfloat16")], images)
        pairs = list(zip(f32s, bf16s, strict=True))
        values = [psnr(b, f) for f, b in pairs]
        worst = max(int(np.abs(b.astype(int) - f).max()) for f, b in pairs)
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {worst} |")
        f32, bf16 = pairs[0]
        difference = np.clip(np.abs(bf16.astype(np.float64) - f32) * args.gain, 0, 255)
        rows.append([images[0], f32, bf16, difference.astype(np.uint8)])
    print(f"photos: {', '.join(p.name for p in photos)}; the figure shows {photos[0].name}")
    print("wrote", save_image_grid(rows, args.out, labels))


if __name__ == "__main__":
    main()
