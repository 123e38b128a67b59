"""``percept eval superres``: SR models against bicubic and Lanczos on held-out photos.

Each held-out photo's shortest side is resized to ``--resize-to`` (512; smaller photos to
the largest multiple of the tile size that fits, so nothing is upscaled), centre-cropped
to a square and cut into ``--hr-size`` tiles (256). The low-res input of a tile is its PIL
BICUBIC 4x reduction (64 px), exactly as the training pairs are made. Every method
upscales it back to 256 px:

- ``bicubic`` and ``lanczos``: PIL's resamplers (the baselines);
- each model artifact, in eval mode (output clamped to [0, 1], rounded to 8 bits).

Measures (:mod:`training.image_quality`): Y (BT.601) PSNR and SSIM (Wang et al. 2004)
with 4 pixels shaved, and sharpness: the Laplacian variance and the gradient energy, the
latter also relative to the original tile (1.0 = as sharp as the original; bicubic is far
below). Writes ``metrics.json``, ``comparison.png`` (bicubic | models | original, every
tile) and prints a Markdown table; ``--figure`` saves a small crop comparison (for the
README) and ``--update-metrics`` stores the held-out numbers in each model's metrics.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.data.folders import check_writable
from training.data.images import is_image_file, load_centre_crop
from training.export import command_line, load_exported, update_metrics
from training.image_batches import to_tensor, to_uint8_images
from training.image_quality import (
    gradient_energy,
    laplacian_variance,
    rgb_to_y,
    shave,
    y_psnr_ssim,
)
from training.loop import use_threads
from training.plots import image_grid, save_image_grid
from training.sr_data import SCALE

BORDER = 4  # pixels shaved for 4x SR (the SR convention)


@dataclass(frozen=True)
class Tile:
    photo: str
    index: int
    hr: np.ndarray  # (H, W, 3) uint8
    lr: np.ndarray  # (H/4, W/4, 3) uint8


def downscale(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """PIL BICUBIC reduction by ``scale`` (the same operation that made the training LR)."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // scale, h // scale),
                                                    Image.Resampling.BICUBIC))


def upscale(image: np.ndarray, method: Image.Resampling, scale: int = SCALE) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), method))


def photo_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if is_image_file(p))
        elif is_image_file(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is not an image file or folder; run "
                                    "`percept data photos` for data/photos/heldout")
    if not files:
        raise FileNotFoundError(f"no images under {', '.join(map(str, paths))}")
    return files


#: The smallest --hr-size: the scores shave BORDER px off each side of a tile.
MIN_HR_SIZE = 32


def check_tile_sizes(hr_size: int, resize_to: int) -> None:
    """ValueError naming the flag for tile sizes that cannot make a tile."""
    if hr_size < MIN_HR_SIZE or hr_size % SCALE:
        raise ValueError(f"--hr-size must be a multiple of {SCALE}, at least {MIN_HR_SIZE} "
                         f"px, got {hr_size}")
    if resize_to < hr_size:
        raise ValueError(f"--resize-to {resize_to} is smaller than --hr-size {hr_size}: no "
                         "tile would fit")


def make_tiles(files: list[Path], hr_size: int, resize_to: int) -> list[Tile]:
    """Square tiles of ``hr_size`` from each photo's centre (see the module docstring)."""
    check_tile_sizes(hr_size, resize_to)
    tiles: list[Tile] = []
    for path in files:
        try:
            with Image.open(path) as image:
                shortest = min(image.size)
            side = min(resize_to, shortest // hr_size * hr_size)
            if side < hr_size:
                print(f"[eval] skipping {path.name}: shorter than {hr_size} px",
                      file=sys.stderr)
                continue
            square = load_centre_crop(path, side)
        except (OSError, SyntaxError, ValueError) as error:  # Pillow's failures on a bad file
            raise ValueError(f"{path}: not a readable image ({error})") from error
        per_row = side // hr_size
        for index in range(per_row * per_row):
            top, left = (index // per_row) * hr_size, (index % per_row) * hr_size
            hr = np.ascontiguousarray(square[top:top + hr_size, left:left + hr_size])
            tiles.append(Tile(path.stem, index, hr, downscale(hr)))
    return tiles


def run_artifact(module: torch.nn.Module, lrs: np.ndarray, device: torch.device,
                 batch: int = 8) -> np.ndarray:
    outputs = []
    with torch.no_grad():
        for start in range(0, len(lrs), batch):
            outputs.append(to_uint8_images(module(to_tensor(lrs[start:start + batch], device))))
    return np.concatenate(outputs)


def score(hr: np.ndarray, out: np.ndarray) -> dict[str, float]:
    y_psnr, y_ssim = y_psnr_ssim(hr, out, border=BORDER)
    y_out = shave(rgb_to_y(out), BORDER)
    y_ref = shave(rgb_to_y(hr), BORDER)
    energy = gradient_energy(y_out)
    return {"y_psnr": y_psnr, "y_ssim": y_ssim, "laplacian_var": laplacian_variance(y_out),
            "gradient_energy": energy,
            "gradient_energy_rel": energy / max(gradient_energy(y_ref), 1e-12)}


def summarise(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def markdown_table(summary: dict[str, dict[str, float]], tiles: int, photos: int) -> str:
    lines = [f"Held-out: {photos} photos, {tiles} tiles; Y (BT.601), {BORDER} px shaved.", "",
             "| method | Y-PSNR (dB) | Y-SSIM | Laplacian var | gradient energy (x original) |",
             "|---|---:|---:|---:|---:|"]
    for method, values in summary.items():
        lines.append(f"| {method} | {values['y_psnr']:.2f} | {values['y_ssim']:.4f} | "
                     f"{values['laplacian_var']:.1f} | {values['gradient_energy_rel']:.3f} |")
    return "\n".join(lines)


def figure_rows(tiles: list[Tile], outputs: dict[str, np.ndarray], methods: list[str],
                rows: int, crop: int, photos: list[str] | None = None) -> list[list[np.ndarray]]:
    """Centre crops of one tile per photo (its most detailed tile): method columns, then the
    original. Photos are ``photos`` where given and present, else the most detailed tiles."""
    energy = [gradient_energy(rgb_to_y(t.hr)) for t in tiles]
    ranked = [int(i) for i in np.argsort(energy)[::-1]]
    wanted = [p for p in (photos or []) if any(t.photo == p for t in tiles)]
    chosen: list[int] = [next(i for i in ranked if tiles[i].photo == p) for p in wanted][:rows]
    seen = {tiles[i].photo for i in chosen}
    for i in ranked:
        if len(chosen) >= rows:
            break
        if tiles[i].photo not in seen:
            chosen.append(i)
            seen.add(tiles[i].photo)
    result = []
    for i in chosen:
        size = tiles[i].hr.shape[0]
        start = (size - crop) // 2
        window = (slice(start, start + crop), slice(start, start + crop))
        result.append([outputs[m][i][window] for m in methods] + [tiles[i].hr[window]])
    return result


def check_outputs(args: argparse.Namespace) -> None:
    """ValueError naming the flag when --out (a folder) or --figure (a file) could not be
    written, or the tile sizes make no tile: checked before any model runs, not after."""
    check_tile_sizes(args.hr_size, args.resize_to)
    for model_dir in args.models:
        config_path = Path(model_dir) / "config.json"
        if config_path.is_file():
            task = json.loads(config_path.read_text()).get("task")
            if task != "superres":
                raise ValueError(f"--models {model_dir} is a {task} artifact, not a "
                                 "super-resolution one")
    check_writable(Path(args.out), "--out", folder=True)
    if args.figure:
        check_writable(Path(args.figure), "--figure")


def model_labels(models: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """The column and summary key of each artifact: its name, or where two share one (a
    retrained model beside the committed one), ``name@version``, or the folder when the
    versions match too. The same folder twice is refused: it would be scored twice."""
    folders = [path.resolve() for path, _ in models]
    repeated = sorted({str(f) for f in folders if folders.count(f) > 1})
    if repeated:
        raise ValueError(f"--models names {', '.join(repeated)} more than once")
    names = [str(config["name"]) for _, config in models]
    versioned = [f"{name}@{config.get('version', '?')}" for name, (_, config)
                 in zip(names, models, strict=True)]
    labels = []
    for (path, _), name, with_version in zip(models, names, versioned, strict=True):
        if names.count(name) == 1 and name not in ("bicubic", "lanczos"):
            labels.append(name)
        elif versioned.count(with_version) == 1:
            labels.append(with_version)
        else:
            labels.append(str(path))
    return labels


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    check_outputs(args)
    use_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    files = photo_files([Path(p) for p in args.photos])
    tiles = make_tiles(files, args.hr_size, args.resize_to)
    if not tiles:
        raise FileNotFoundError("no photo is large enough for one tile")
    lrs = np.stack([t.lr for t in tiles])
    outputs: dict[str, np.ndarray] = {
        "bicubic": np.stack([upscale(t.lr, Image.Resampling.BICUBIC) for t in tiles]),
        "lanczos": np.stack([upscale(t.lr, Image.Resampling.LANCZOS) for t in tiles]),
    }
    model_paths: dict[str, Path] = {}
    loaded = []
    for model_dir in args.models:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found (train it with "
                                    "`percept train superres --out {path}`)")
        loaded.append((path, *load_exported(path, device)))
    labels = model_labels([(path, config) for path, _, config in loaded])
    for (path, module, _), label in zip(loaded, labels, strict=True):
        outputs[label] = run_artifact(module, lrs, device)
        model_paths[label] = path

    per_tile = {method: [score(t.hr, out) for t, out in zip(tiles, outs, strict=True)]
                for method, outs in outputs.items()}
    summary = {method: summarise(scores) for method, scores in per_tile.items()}
    photos = sorted({t.photo for t in tiles})
    report: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None) or command_line(),
        "photos": photos, "tiles": len(tiles), "hr_size": args.hr_size,
        "lr_size": args.hr_size // SCALE, "resize_to": args.resize_to, "border": BORDER,
        "luma": "BT.601 Y in [16, 235]", "ssim": "Wang et al. 2004, 11x11 Gaussian sigma 1.5",
        "summary": summary,
        "per_photo": {method: {photo: summarise([s for t, s in zip(tiles, scores, strict=True)
                                                 if t.photo == photo]) for photo in photos}
                      for method, scores in per_tile.items()},
        "device": str(device),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    methods = ["bicubic", *model_paths]
    save_image_grid([[outputs[m][i] for m in methods] + [t.hr] for i, t in enumerate(tiles)],
                    out / "comparison.png", labels=[*methods, "original"])
    if args.figure:
        figure = Path(args.figure)
        figure.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(figure_rows(tiles, outputs, methods, rows=2, crop=128,
                                      photos=args.figure_photos),
                          labels=[*methods, "original"])
        grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST) \
            .save(figure, optimize=True)
    if args.update_metrics:
        for name, path in model_paths.items():
            values = summary[name]
            update_metrics(path, {"heldout": {
                "photos": len(photos), "tiles": len(tiles), "hr_size": args.hr_size,
                "y_psnr": round(values["y_psnr"], 3), "y_ssim": round(values["y_ssim"], 4),
                "bicubic_y_psnr": round(summary["bicubic"]["y_psnr"], 3),
                "bicubic_y_ssim": round(summary["bicubic"]["y_ssim"], 4),
                "y_psnr_gain_over_bicubic_db": round(values["y_psnr"] -
                                                     summary["bicubic"]["y_psnr"], 3),
                "gradient_energy_rel": round(values["gradient_energy_rel"], 3),
                "command": report["command"],
            }})
    print(markdown_table(summary, len(tiles), len(photos)))
    return report


def command(args: argparse.Namespace) -> int:
    """``percept eval superres``."""
    try:
        evaluate(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``superres`` to the ``percept eval`` subparsers (see training.cli_superres)."""
    from training.cli_superres import register_eval

    return register_eval(subparsers)
