"""Rebuilds ``training/evalsets/photos/``: the labelled real photos DeViSE/ConSE are scored on.

``python -m training.evalsets.build_photos`` downloads (``apt-get download`` + ``dpkg-deb
-x``, through :func:`training.data.photos.fetch_package`) the Debian packages ``darknet`` and
``opencv-doc``, takes the photos listed in :data:`EVAL_PHOTOS` (plus scikit-image's held-out
``chelsea`` and ``coffee`` and its Hubble deep field), optionally crops one object out of a
photo, resizes the longest side to at most :data:`MAX_SIDE` pixels and writes JPEG q90 and
``labels.json`` (file -> wnid, lemma, source, sha256 of the original file).

Each label is the most specific WordNet 3.0 noun synset that was verified by looking at the
photo (e.g. the swallowtail in ``butterfly.jpg`` is labelled ``butterfly``: WordNet 3.0 has
no swallowtail-butterfly synset). The set is disjoint from the training photos: none of
these files is in ``plasma-workspace-wallpapers``, ``mate-backgrounds`` or the training part
of scikit-image's photos (astronaut, camera, motorcycle, rocket are training photos and are
not used; chelsea and coffee are in the held-out split, never trained on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from training.assets import REPO_ROOT, sha256_of

EVALSET_DIR = REPO_ROOT / "training" / "evalsets" / "photos"
LABELS_FILE = "labels.json"
MAX_SIDE = 320
JPEG_QUALITY = 90

DARKNET = "darknet"
OPENCV_DOC = "opencv-doc"
SKIMAGE = "scikit-image"

_SOURCE_DIRS = {
    DARKNET: "usr/share/darknet/data",
    OPENCV_DOC: "usr/share/doc/opencv-doc/examples/data",
    SKIMAGE: "skimage/data",
}


@dataclass(frozen=True)
class EvalPhoto:
    """One labelled photo: its source file, an optional crop box (original pixels), and the
    WordNet 3.0 noun synset it shows."""

    name: str
    package: str
    file: str
    wnid: str
    lemma: str
    crop: tuple[int, int, int, int] | None = None


EVAL_PHOTOS: tuple[EvalPhoto, ...] = (
    EvalPhoto("darknet-dog", DARKNET, "dog.jpg", "n02084071", "dog"),
    EvalPhoto("darknet-dog-bicycle", DARKNET, "dog.jpg", "n02834778", "bicycle",
              crop=(280, 120, 580, 430)),
    EvalPhoto("darknet-eagle", DARKNET, "eagle.jpg", "n01613294", "eagle"),
    EvalPhoto("darknet-giraffe", DARKNET, "giraffe.jpg", "n02439033", "giraffe"),
    EvalPhoto("darknet-giraffe-zebra", DARKNET, "giraffe.jpg", "n02391049", "zebra",
              crop=(235, 190, 440, 460)),
    EvalPhoto("darknet-horses", DARKNET, "horses.jpg", "n02374451", "horse"),
    EvalPhoto("darknet-kite", DARKNET, "kite.jpg", "n09217230", "beach"),
    EvalPhoto("darknet-person", DARKNET, "person.jpg", "n00007846", "person"),
    EvalPhoto("opencv-aero1", OPENCV_DOC, "aero1.jpg", "n08524735", "city"),
    EvalPhoto("opencv-aloeL", OPENCV_DOC, "aloeL.jpg", "n12436677", "aloe"),
    EvalPhoto("opencv-apple", OPENCV_DOC, "apple.jpg", "n07739125", "apple"),
    EvalPhoto("opencv-baboon", OPENCV_DOC, "baboon.jpg", "n02486908", "mandrill"),
    EvalPhoto("opencv-board", OPENCV_DOC, "board.jpg", "n04004210", "printed_circuit"),
    EvalPhoto("opencv-building", OPENCV_DOC, "building.jpg", "n02913152", "building"),
    EvalPhoto("opencv-butterfly", OPENCV_DOC, "butterfly.jpg", "n02274259", "butterfly"),
    EvalPhoto("opencv-chicky", OPENCV_DOC, "chicky_512.png", "n02084071", "dog"),
    EvalPhoto("opencv-ela_original", OPENCV_DOC, "ela_original.jpg", "n06415419", "notebook"),
    EvalPhoto("opencv-graf1", OPENCV_DOC, "graf1.png", "n03451798", "graffito"),
    EvalPhoto("opencv-home", OPENCV_DOC, "home.jpg", "n02913152", "building"),
    EvalPhoto("opencv-fruits", OPENCV_DOC, "fruits.jpg", "n07705931", "edible_fruit"),
    EvalPhoto("opencv-leuvenA", OPENCV_DOC, "leuvenA.jpg", "n04334599", "street"),
    EvalPhoto("opencv-licenseplate", OPENCV_DOC, "licenseplate_motion.jpg", "n02958343", "car"),
    EvalPhoto("opencv-messi5", OPENCV_DOC, "messi5.jpg", "n10618342", "soccer_player"),
    EvalPhoto("opencv-orange", OPENCV_DOC, "orange.jpg", "n07747607", "orange"),
    EvalPhoto("opencv-squirrel", OPENCV_DOC, "squirrel_cls.jpg", "n02357401",
              "American_red_squirrel"),
    EvalPhoto("skimage-chelsea", SKIMAGE, "chelsea.png", "n02123045", "tabby"),
    EvalPhoto("skimage-coffee", SKIMAGE, "coffee.png", "n07920052", "espresso"),
    EvalPhoto("skimage-hubble_deep_field", SKIMAGE, "hubble_deep_field.jpg", "n08271042",
              "galaxy"),
)


def source_roots(cache: Path) -> dict[str, Path]:
    """The folder holding each source's photos (Debian packages extracted into ``cache``)."""
    from training.data.photos import fetch_package, skimage_root

    roots = {SKIMAGE: skimage_root() / _SOURCE_DIRS[SKIMAGE]}
    for package in (DARKNET, OPENCV_DOC):
        _, extracted = fetch_package(package, cache)
        roots[package] = extracted / _SOURCE_DIRS[package]
    return roots


def render(source: Path, crop: tuple[int, int, int, int] | None) -> Image.Image:
    """The (cropped) photo in RGB with its longest side at most :data:`MAX_SIDE`."""
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    if crop is not None:
        image = image.crop(crop)
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def build(out: Path, cache: Path) -> dict[str, dict[str, object]]:
    roots = source_roots(cache)
    out.mkdir(parents=True, exist_ok=True)
    labels: dict[str, dict[str, object]] = {}
    for photo in EVAL_PHOTOS:
        source = roots[photo.package] / photo.file
        target = out / f"{photo.name}.jpg"
        render(source, photo.crop).save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
        entry: dict[str, object] = {
            "wnid": photo.wnid, "lemma": photo.lemma,
            "source": f"{photo.package}: {_SOURCE_DIRS[photo.package]}/{photo.file}",
            "sha256_of_original": sha256_of(source),
        }
        if photo.crop is not None:
            entry["crop"] = list(photo.crop)
        labels[target.name] = entry
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def labels_digest(labels_path: Path) -> str:
    """sha256 over labels.json and every photo it lists (the evaluation's data hash)."""
    digest = hashlib.sha256(labels_path.read_bytes())
    for name in sorted(json.loads(labels_path.read_text())):
        digest.update(sha256_of(labels_path.parent / name).encode())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evalsets.build_photos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EVALSET_DIR)
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "evalset-sources")
    args = parser.parse_args(argv)
    labels = build(args.out, args.cache)
    total = sum((args.out / name).stat().st_size for name in labels)
    print(f"{len(labels)} photos, {total / 1e6:.2f} MB, in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
