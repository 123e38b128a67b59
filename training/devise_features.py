"""Backbone features and logits for DeViSE, computed once per image list and cached.

DeViSE (Frome et al. 2013, sec. 3.3) trains only the linear map M on top of a frozen
pretrained CNN, and ConSE (Norouzi et al. 2014) needs only the CNN's probabilities, so every
image (or crop) goes through EfficientNet-Lite0 once: its 1280-d pooled features and its
1000 ImageNet logits are stored as ``.npy`` under ``runs/devise-cache/<key>/``. The key is a
hash of the image files' sha256s, the crop plan (crops per image, size, seed, flips), the
backbone weights' sha256 and :data:`CACHE_VERSION`, so a changed photo, recipe or backbone
never reuses stale arrays.

Crops follow DESIGN.md's "Fast data preparation" (:mod:`training.data.images`): JPEG
``draft()`` decoding, forced 3-channel RGB, and square boxes resized to ``size`` (resize the
shortest side and crop; never padding). Crop 0 of each image is the centre square (the
classic resize-shortest-side + centre-crop); crops 1..N-1 are random squares with a
log-uniform side between ``size`` native pixels and the shortest side, at random positions,
each mirrored with probability 1/2: the random-crop augmentation that turns ~25 photos into
many distinct training inputs.

A photo that cannot be read or decoded raises :class:`ImageReadError` naming the file
(:func:`check_decodable` finds one before any model loads); a cache entry that cannot be
read (a truncated ``.npy``, another shape) is a miss: a warning names the file, and the
arrays are computed and written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training.assets import REPO_ROOT, efficientnet_lite0_weights_path, sha256_of
from training.data.images import (
    Box,
    centre_square,
    decode_rgb,
    displayed_size,
    draft_request,
    random_square,
    resize_box,
    scale_box,
)
from training.nets.efficientnet_lite import INPUT_SIZE, load_efficientnet_lite0

#: Bump when the way crops or features are computed changes (invalidates every cache).
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = REPO_ROOT / "runs" / "devise-cache"
BACKBONE_NAME = "efficientnet-lite0"
#: The widths of the cached arrays: the pooled features and the ImageNet logits.
FEATURE_WIDTH, LOGIT_WIDTH = 1280, 1000


class ImageReadError(ValueError):
    """A photo that cannot be read (no image header) or decoded (a damaged or truncated
    body); the message names the file."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_decodable(path: Path) -> None:
    """ImageReadError unless ``path`` is an image whose header reads and whose pixels decode
    to the end (a JPEG at its smallest ``draft()`` scale, 1/8, which still reads every
    byte, so a truncated body fails here in a few milliseconds). The same errors that
    :func:`plan_crops` and :func:`render_crops` raise, found before any model loads."""
    try:
        displayed_size(path)
    except Exception as error:  # whatever a decoder raises on a file that is not an image
        raise ImageReadError(f"cannot read image {path}: {_one_line(error)}") from None
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:  # whatever a decoder raises on damaged data
        raise ImageReadError(f"cannot decode image {path}: {_one_line(error)}") from None


@dataclass(frozen=True)
class Crop:
    """One crop of one image: ``box`` in displayed pixels, mirrored when ``flip``."""

    image: int  # index into the image list
    box: Box
    flip: bool


@dataclass
class FeatureCache:
    """Backbone outputs for every crop, row ``i`` from ``crops[i]`` of ``images``."""

    images: list[Path]
    crops: list[Crop]
    features: np.ndarray  # (M, 1280) float32, the pooled penultimate layer
    logits: np.ndarray  # (M, 1000) float32, ImageNet logits
    key: str
    folder: Path

    @property
    def image_index(self) -> np.ndarray:
        """(M,) int64: which image each row comes from."""
        return np.fromiter((c.image for c in self.crops), dtype=np.int64, count=len(self.crops))

    def __len__(self) -> int:
        return len(self.crops)


def backbone_sha256() -> str:
    """sha256 of the EfficientNet-Lite0 weights file (part of every cache key)."""
    return sha256_of(efficientnet_lite0_weights_path())


def plan_crops(images: Sequence[Path], crops_per_image: int, size: int = INPUT_SIZE,
               seed: int = 0) -> list[Crop]:
    """The centre square of every image, then ``crops_per_image - 1`` random squares each
    (log-uniform side, uniform position, random mirror); deterministic for a ``seed``."""
    if crops_per_image < 1:
        raise ValueError("crops_per_image must be at least 1")
    rng = np.random.default_rng(seed)
    crops: list[Crop] = []
    for index, path in enumerate(images):
        try:
            width, height = displayed_size(path)
        except Exception as error:  # whatever a decoder raises on a file that is not an image
            raise ImageReadError(f"cannot read image {path}: {_one_line(error)}") from None
        crops.append(Crop(index, centre_square(width, height), False))
        for _ in range(crops_per_image - 1):
            box = random_square(width, height, size, rng)
            crops.append(Crop(index, box, bool(rng.integers(0, 2))))
    return crops


def cache_key(image_hashes: Sequence[str], crops: Sequence[Crop], size: int,
              backbone: str) -> str:
    """Hash of what the arrays depend on: images, crop plan, input size, backbone, version."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}\n{BACKBONE_NAME}\n{backbone}\nsize={size}\n".encode())
    for image_hash in image_hashes:
        digest.update(f"image {image_hash}\n".encode())
    for crop in crops:
        box = ",".join(f"{v:.3f}" for v in crop.box)
        digest.update(f"crop {crop.image} {box} {int(crop.flip)}\n".encode())
    return digest.hexdigest()[:20]


def render_crops(path: Path, crops: Sequence[Crop], size: int) -> np.ndarray:
    """(len(crops), size, size, 3) uint8: each box of one image, resized to ``size``.

    The image is decoded once, with JPEG ``draft()`` at the smallest scale that keeps every
    box at least ``size`` pixels across.
    """
    try:
        original = displayed_size(path)
    except Exception as error:  # whatever a decoder raises on a file that is not an image
        raise ImageReadError(f"cannot read image {path}: {_one_line(error)}") from None
    out = np.empty((len(crops), size, size, 3), dtype=np.uint8)
    try:  # the header read; a truncated or damaged body fails only here
        image = decode_rgb(path, need=draft_request(original, [c.box for c in crops], size))
        for row, crop in enumerate(crops):
            tile = np.asarray(resize_box(image, scale_box(crop.box, original, image.size),
                                         size))
            out[row] = tile[:, ::-1] if crop.flip else tile
    except Exception as error:  # whatever a decoder raises on damaged data
        raise ImageReadError(f"cannot decode image {path}: {_one_line(error)}") from None
    return out


def _batches(crops: Sequence[Crop], images: Sequence[Path], size: int,
             batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Rendered crops grouped by image (each image decoded once), lazily."""
    by_image: dict[int, list[int]] = {}
    for row, crop in enumerate(crops):
        by_image.setdefault(crop.image, []).append(row)
    for image, rows in by_image.items():
        pixels = render_crops(images[image], [crops[r] for r in rows], size)
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size], pixels[start:start + batch_size]


@torch.inference_mode()
def run_backbone(pixels: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(features (B, 1280), logits (B, 1000)) float32 for (B, H, W, 3) uint8 crops."""
    model = load_efficientnet_lite0(device)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    features = model.features(x)
    logits = model._fc(features)
    return (features.float().cpu().numpy().astype(np.float32),
            logits.float().cpu().numpy().astype(np.float32))


@dataclass(frozen=True)
class FeaturePlan:
    """The crops of an image list and the cache key of their arrays, known before any
    backbone runs (a resumed training run compares the key with its checkpoint's)."""

    images: list[Path]
    crops: list[Crop]
    size: int
    seed: int
    crops_per_image: int
    key: str


def plan_features(images: Sequence[Path], crops_per_image: int = 1, size: int = INPUT_SIZE,
                  seed: int = 0) -> FeaturePlan:
    """The crop plan of ``images`` and its cache key (image headers and sha256s only)."""
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no images to compute features for")
    crops = plan_crops(paths, crops_per_image, size, seed)
    key = cache_key([sha256_of(p) for p in paths], crops, size, backbone_sha256())
    return FeaturePlan(paths, crops, size, seed, crops_per_image, key)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_cached(folder: Path, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (features, logits) in ``folder``, or None when it holds none. An entry
    that cannot be used (a file missing, truncated or not an array, or arrays of another
    shape or type) is a miss too, and a warning names the file."""
    if not (folder / "logits.npy").is_file():  # logits.npy lands last: no entry
        return None
    arrays = []
    for name, width in (("features", FEATURE_WIDTH), ("logits", LOGIT_WIDTH)):
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as error:  # truncated, not an array, unreadable: numpy raises many
            _warn(f"the feature cache {path} cannot be read ({type(error).__name__}: "
                  f"{_one_line(error)}); computing the features again")
            return None
        if array.shape != (rows, width) or array.dtype != np.float32:
            _warn(f"the feature cache {path} holds {array.dtype} {array.shape}, not float32 "
                  f"({rows}, {width}); computing the features again")
            return None
        arrays.append(array)
    return arrays[0], arrays[1]


def compute_features(images: Sequence[Path], *, crops_per_image: int = 1,
                     size: int = INPUT_SIZE, seed: int = 0, batch_size: int = 32,
                     device: str = "cpu", cache_dir: Path | None = DEFAULT_CACHE_DIR,
                     progress: bool = True, desc: str = "backbone",
                     plan: FeaturePlan | None = None) -> FeatureCache:
    """Features and logits of every crop of ``images``, from the cache when it has them
    (an unreadable cache entry is computed again, with a warning naming the file).

    ``cache_dir=None`` computes without reading or writing a cache. ``plan``: the
    :func:`plan_features` of the same arguments, when the caller already has it.
    """
    if plan is None:
        plan = plan_features(images, crops_per_image, size, seed)
    images, crops, key = plan.images, plan.crops, plan.key
    size, seed, crops_per_image = plan.size, plan.seed, plan.crops_per_image
    folder = (Path(cache_dir) / key) if cache_dir is not None else Path()
    if cache_dir is not None:
        cached = load_cached(folder, len(crops))
        if cached is not None:
            return FeatureCache(images, crops, cached[0], cached[1], key, folder)
    features = np.empty((len(crops), FEATURE_WIDTH), dtype=np.float32)
    logits = np.empty((len(crops), LOGIT_WIDTH), dtype=np.float32)
    with tqdm(total=len(crops), desc=desc, unit="crop", disable=not progress) as bar:
        for rows, pixels in _batches(crops, images, size, batch_size):
            f, g = run_backbone(pixels, device)
            features[rows] = f
            logits[rows] = g
            bar.update(len(rows))
    if cache_dir is not None:
        _save(folder, images, crops, features, logits, size, seed, crops_per_image)
    return FeatureCache(images, crops, features, logits, key, folder)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())


def _save(folder: Path, images: Sequence[Path], crops: Sequence[Crop], features: np.ndarray,
          logits: np.ndarray, size: int, seed: int, crops_per_image: int) -> None:
    """Writes the arrays and an index (atomically: logits.npy, the completeness marker,
    lands last)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "version": CACHE_VERSION, "backbone": BACKBONE_NAME, "size": size, "seed": seed,
        "crops_per_image": crops_per_image, "images": [_display(p) for p in images],
        "crops": [{"image": c.image, "box": [round(v, 3) for v in c.box], "flip": c.flip}
                  for c in crops],
    }
    (folder / "index.json").write_text(json.dumps(index) + "\n")
    for name, array in (("features", features), ("logits", logits)):
        partial = folder / f".{name}.{os.getpid()}.npy"
        np.save(partial, array)
        partial.replace(folder / f"{name}.npy")
