"""``percept data prepare``: contiguous uint8 training arrays, made fast.

For each source image the job list holds one centre crop (resize the shortest side, then
centre-crop: never padding) and, for sources bigger than the target, ``crops_per_image - 1``
random square crops at random scales (:func:`training.data.images.random_square`). The job
list is shuffled once with ``seed`` and written in that order to one ``.npy`` memmap per size,
shape (N, S, S, 3), so that training reads contiguous, already-shuffled memory.

The largest size is cut from the source; every smaller size is made from that crop by
BICUBIC downscaling, so the arrays are exact pairs (item i of ``72.npy`` is the bicubic 4x
reduction of item i of ``288.npy``: super-resolution pairs).

Speed (DESIGN.md, "Fast data preparation"): pillow-simd resampling, JPEG ``draft()``
decoding at the smallest DCT scale that still covers the smallest crop, ``reduce()`` before
BICUBIC, and a ``multiprocessing`` pool over every core whose workers write straight into
the memmaps (one task per source image, so each image is decoded once).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from services.common.cpus import available_cpus
from training.assets import REPO_ROOT, sha256_of
from training.command import command_line
from training.data.arrays import MANIFEST, PreparedDataError, load_prepared
from training.data.folders import unwritable_reason
from training.data.heldout import check_not_held_out
from training.data.images import (
    Box,
    centre_square,
    decode_rgb,
    displayed_size,
    draft_request,
    is_image_file,
    random_square,
    resize_box,
    scale_box,
)
from training.files import listed, other_files, read_json_object

FORMAT = "percept-prepared/1"


class PrepareError(RuntimeError):
    """Bad sources or an unusable output folder; the message says which."""


def array_name(size: int) -> str:
    return f"images_{size}.npy"


@dataclass
class SourceTask:
    """One source image and the crops to cut from it (indices into the shuffled arrays)."""

    path: str
    original: tuple[int, int]
    crops: list[tuple[int, Box]] = field(default_factory=list)


def find_sources(paths: Sequence[Path], allow_heldout: bool = False) -> list[Path]:
    """Every image file under ``paths`` (recursively), sorted. Files inside a ``heldout``
    folder are refused unless ``allow_heldout``: held-out photos are never trained on."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise PrepareError(f"source {path} does not exist")
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if is_image_file(p))
        elif is_image_file(path):
            found.append(path)
        else:
            raise PrepareError(f"source {path} is not an image file")
    if not found:
        raise PrepareError(f"no image files under {', '.join(map(str, paths))}")
    # A link to a photo that is also found under its own name is one photo, not two.
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in sorted(set(found)):
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    found = unique
    if not allow_heldout:
        heldout = [p for p in found if "heldout" in p.parts]
        if heldout:
            raise PrepareError(f"{len(heldout)} source(s) are held-out photos (e.g. {heldout[0]});"
                               " pass --allow-heldout only for evaluation data")
        try:  # a copy under another name or folder, too
            check_not_held_out(found)
        except ValueError as error:
            raise PrepareError(f"{error}; pass --allow-heldout only for evaluation data"
                               ) from error
    return found


def plan(sources: Sequence[Path], size: int, crops_per_image: int,
         seed: int) -> tuple[list[SourceTask], list[tuple[int, int, Box]]]:
    """The crop boxes per source and the shuffled output order.

    Returns the per-source tasks and, in output order, (source index, crop index, box).
    Everything random happens here, in one seeded generator, so the arrays do not depend
    on how the pool schedules its work.
    """
    rng = np.random.default_rng(seed)
    jobs: list[tuple[int, int, Box]] = []
    tasks: list[SourceTask] = []
    for source_index, path in enumerate(sources):
        try:
            width, height = displayed_size(path)
        except (OSError, SyntaxError, ValueError) as error:
            raise PrepareError(f"cannot read image {path}: {error}") from error
        tasks.append(SourceTask(str(path), (width, height)))
        count = crops_per_image if min(width, height) > size else 1
        for crop_index in range(count):
            box = centre_square(width, height) if crop_index == 0 else \
                random_square(width, height, size, rng)
            jobs.append((source_index, crop_index, box))
    order = rng.permutation(len(jobs))
    shuffled = [jobs[i] for i in order]
    for out_index, (source_index, _, box) in enumerate(shuffled):
        tasks[source_index].crops.append((out_index, box))
    return tasks, shuffled


# Per-worker memmaps, opened once per process.
_OUTPUTS: dict[int, np.ndarray] = {}
_SIZES: list[int] = []


def _init_worker(out_dir: str, sizes: Sequence[int]) -> None:
    _SIZES[:] = list(sizes)
    _OUTPUTS.clear()
    for size in sizes:
        _OUTPUTS[size] = np.load(Path(out_dir) / array_name(size), mmap_mode="r+")


def crop_pyramid(image: Image.Image, box: Box, sizes: Sequence[int]) -> list[np.ndarray]:
    """The crop at ``sizes[0]`` and each smaller size made from it by BICUBIC reduction."""
    top = resize_box(image, box, sizes[0])
    arrays = [np.asarray(top)]
    for size in sizes[1:]:
        arrays.append(np.asarray(top.resize((size, size), Image.Resampling.BICUBIC)))
    return arrays


def _process(task: SourceTask) -> int:
    size = _SIZES[0]
    boxes = [box for _, box in task.crops]
    try:  # the header read in plan(); a truncated or damaged body fails only here
        image = decode_rgb(Path(task.path), need=draft_request(task.original, boxes, size))
        crops = [crop_pyramid(image, scale_box(box, task.original, image.size), _SIZES)
                 for _, box in task.crops]
    except Exception as error:  # whatever a decoder raises on damaged data
        raise PrepareError(f"cannot decode image {task.path}: {error}") from None
    for (out_index, _), pyramid in zip(task.crops, crops, strict=True):
        for level, array in zip(_SIZES, pyramid, strict=True):
            _OUTPUTS[level][out_index] = array
    for array in _OUTPUTS.values():
        if isinstance(array, np.memmap):
            array.flush()
    return len(task.crops)


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def prepare(sources: Sequence[Path], out: Path, sizes: Sequence[int], crops_per_image: int = 1,
            seed: int = 0, workers: int | None = None, command: str | None = None,
            progress: bool = True) -> dict[str, object]:
    """Writes ``out/images_<size>.npy`` for every size plus ``out/manifest.json``.

    ``sizes`` are square side lengths; the largest is cut from the sources and the others
    are bicubic reductions of it. Returns the manifest.
    """
    sizes = _checked(sizes, crops_per_image, seed, workers)
    if (reason := unwritable_reason(out)) is not None:
        raise PrepareError(f"cannot write to {out}: {reason}")
    check_out_folder(out)

    tasks, order = plan(sources, sizes[0], crops_per_image, seed)
    count = len(order)
    check_room(out, count, sizes)
    # An interrupted run must not leave the old manifest vouching for half-written arrays.
    (out / MANIFEST).unlink(missing_ok=True)
    arrays = {}
    for size in sizes:
        arrays[str(size)] = {"file": array_name(size), "shape": [count, size, size, 3],
                             "dtype": "uint8"}
        np.lib.format.open_memmap(out / array_name(size), mode="w+", dtype=np.uint8,
                                  shape=(count, size, size, 3)).flush()

    # every CPU this process may use: its affinity and its container's quota, not the
    # host's core count (a 2-CPU pod on a 64-core node would start 64 decoders)
    workers = max(1, min(workers or available_cpus(), len(tasks)))
    # Big sources first, so the pool does not end waiting on one large image.
    queue = sorted(tasks, key=lambda t: -t.original[0] * t.original[1] * len(t.crops))
    bar = tqdm(total=count, unit="img", desc=f"prepare {'/'.join(map(str, sizes))}",
               disable=not progress)
    try:
        if workers == 1:
            _init_worker(str(out), sizes)
            for task in queue:
                bar.update(_process(task))
        else:
            with _pool_context().Pool(workers, initializer=_init_worker,
                                      initargs=(str(out), sizes)) as pool:
                for done in pool.imap_unordered(_process, queue):
                    bar.update(done)
    except BaseException:
        _OUTPUTS.clear()
        for size in sizes:  # half-written arrays, which no manifest vouches for
            (out / array_name(size)).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    _OUTPUTS.clear()

    manifest: dict[str, object] = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command or "training.data.prepare.prepare(...)",
        "seed": seed,
        "sizes": sizes,
        "crops_per_image": crops_per_image,
        "count": count,
        "pairing": "each smaller size is the PIL BICUBIC reduction of the largest size's item",
        "arrays": arrays,
        "sources": _source_entries(tasks),
        "items": _items(order),
        "items_columns": ["source", "crop", "left", "top", "right", "bottom"],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


#: The largest square a prepared array may hold (the trainers crop 96-288 px).
MAX_SIZE = 2048
#: Room left free on the disk besides the arrays.
SPARE_BYTES = 1 << 30


def check_room(out: Path, count: int, sizes: Sequence[int]) -> None:
    """PrepareError, before any array is made, when the arrays would not fit on the disk
    under ``out`` with a GiB to spare (they are written whole, as .npy files)."""
    import shutil

    needed = sum(count * size * size * 3 for size in sizes)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    # arrays already there are replaced: their room counts as free
    free += sum(f.stat().st_size for f in out.glob("images_*.npy")) if out.is_dir() else 0
    if needed + SPARE_BYTES > free:
        raise PrepareError(f"the arrays would take {needed / 2**30:.1f} GiB ({count} items at "
                           f"{', '.join(map(str, sizes))} px), and {existing} has "
                           f"{free / 2**30:.1f} GiB free: prepare fewer --crops-per-image or "
                           "smaller --sizes, or another --out")


def _checked(sizes: Sequence[int], crops_per_image: int, seed: int = 0,
             workers: int | None = None) -> list[int]:
    """The sizes, largest first; PrepareError for bad sizes, crop counts, seeds or worker
    counts."""
    ordered = sorted({int(s) for s in sizes}, reverse=True)
    if not ordered or ordered[-1] < 1:
        raise PrepareError(f"sizes must be positive integers, got {list(sizes)}")
    if ordered[0] > MAX_SIZE:
        raise PrepareError(f"--sizes {ordered[0]} is over {MAX_SIZE} px: the trainers take "
                           "crops of a few hundred pixels")
    if crops_per_image < 1:
        raise PrepareError(f"--crops-per-image must be >= 1, got {crops_per_image}")
    if seed < 0:
        raise PrepareError(f"--seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    return ordered


_ARRAY_FILE = re.compile(r"^images_\d+\.npy$")


def check_out_folder(out: Path) -> None:
    """PrepareError when ``out`` holds anything but prepared arrays and their manifest
    (photos, another command's manifest.json): a rebuild removes the manifest and
    replaces the arrays, so it must never run in someone else's folder."""
    others = other_files(out, lambda name: name == MANIFEST or bool(_ARRAY_FILE.match(name)))
    if others:
        raise PrepareError(f"--out {out} holds other files ({len(others)}: {listed(others)}), not "
                           "prepared arrays: choose a new or empty folder")
    manifest = out / MANIFEST
    if manifest.exists():
        held = read_json_object(manifest)
        if not (held is not None and held.get("format") == FORMAT):
            raise PrepareError(f"--out {out} holds a {MANIFEST} that is not a prepared-arrays "
                               f"manifest ({FORMAT}): choose a new or empty folder")


def _source_entries(tasks: Sequence[SourceTask]) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for task in tasks:
        path = Path(task.path)
        with Image.open(path) as image:
            mode = image.mode
        entries.append({"path": _display_path(path), "sha256": sha256_of(path),
                        "width": task.original[0], "height": task.original[1],
                        "mode": mode, "bytes": path.stat().st_size, "crops": len(task.crops)})
    return entries


def _items(order: Sequence[tuple[int, int, Box]]) -> list[list[float]]:
    return [[s, c, *(round(v, 2) for v in box)] for s, c, box in order]


def up_to_date(sources: Sequence[Path], out: Path, sizes: Sequence[int],
               crops_per_image: int = 1, seed: int = 0) -> dict[str, Any] | None:
    """The manifest of ``out`` when the folder already holds what :func:`prepare` would
    write there (the same photos by content, sizes, crops, seed and crop boxes, and whole
    arrays of the listed shapes), else None."""
    try:
        manifest: dict[str, Any] = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    sizes = _checked(sizes, crops_per_image)
    tasks, order = plan(sources, sizes[0], crops_per_image, seed)
    expected = {"format": FORMAT, "seed": seed, "sizes": sizes,
                "crops_per_image": crops_per_image, "count": len(order),
                "items": _items(order), "sources": _source_entries(tasks)}
    if any(manifest.get(key) != value for key, value in expected.items()):
        return None
    try:
        load_prepared(out, allow_heldout=True)  # every array there, of its listed shape
    except (PreparedDataError, OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def _display_path(path: Path) -> str:
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def command(args: argparse.Namespace) -> int:
    """``percept data prepare``."""
    try:
        _checked(args.sizes, args.crops_per_image, args.seed, args.workers)
        check_out_folder(Path(args.out))
        sources = find_sources([Path(p) for p in args.photos], allow_heldout=args.allow_heldout)
        current = None if args.force else up_to_date(
            sources, Path(args.out), args.sizes, args.crops_per_image, args.seed)
        if current is not None:
            print(f"[prepare] up to date: {current['count']} items x sizes {current['sizes']} "
                  f"from {len(sources)} images in {args.out} (--force rebuilds)")
            return 0
        manifest = prepare(sources, Path(args.out), args.sizes, args.crops_per_image,
                           args.seed, args.workers, command=command_line(),
                           progress=not args.quiet)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"[prepare] {manifest['count']} items x sizes {manifest['sizes']} from "
          f"{len(sources)} images -> {args.out}")
    return 0
