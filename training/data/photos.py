"""``percept data photos``: assembles the curated training photos into ``data/photos/``.

DESIGN.md, "Offline assets": the training photos come only from the Debian packages
``plasma-workspace-wallpapers`` and ``mate-backgrounds`` (``apt-get download`` then
``dpkg-deb -x``) and from scikit-image's bundled photos. Only *real photographs* are used:
the allow-lists below were curated by looking at every image in those sources. Left out:

- plasma-workspace-wallpapers: the vector/low-poly/3D renders (Altai, Canopee, Cascade,
  Cluster, Elarun, Flow, FlyingKonqui, Honeywave, IceCold, Kay, Kokkini, MilkyWay, Opal,
  PastelHills, Patak, Shell, Volna), the paintings/illustrations (Autumn, SafeLanding) and
  every ``screenshot.*`` thumbnail; each photo is taken once (its other file names are
  symlinks to the same 2560x1600 file).
- mate-backgrounds: everything in ``abstract/`` (renders, a painting) and ``desktop/``
  (logos, stripes, defocused light blurs with no detail).
- scikit-image: textures and non-photos (brick, grass, gravel, coins, page, text, colour
  wheel, cells, retina, moon, Hubble, horse silhouette, ...); ``motorcycle_right`` is a
  near-copy of ``motorcycle_left``.

A fixed, listed ~20% of the photos (:data:`HELDOUT`) goes to ``data/photos/heldout/`` for
evaluation and is never trained on; the rest goes to ``data/photos/train/``. The manifest
``data/photos/manifest.json`` records each file's source package, original path, size and
sha256.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from training.assets import sha256_of
from training.data.folders import unwritable_reason
from training.files import listed, read_json_object

PLASMA = "plasma-workspace-wallpapers"
MATE = "mate-backgrounds"
SKIMAGE = "scikit-image"
DEBIAN_PACKAGES = (PLASMA, MATE)


@dataclass(frozen=True)
class Photo:
    """One curated photo: where it comes from and the name it gets in ``data/photos``."""

    name: str
    package: str
    original_path: str  # inside the package (Debian: from its root; skimage: skimage/data/...)
    subject: str


def _plasma(name: str, subject: str) -> Photo:
    return Photo(f"plasma-{name}", PLASMA,
                 f"usr/share/wallpapers/{name}/contents/images/2560x1600.jpg", subject)


def _mate(name: str, subject: str) -> Photo:
    return Photo(f"mate-{name}", MATE, f"usr/share/backgrounds/mate/nature/{name}.jpg", subject)


def _skimage(name: str, file: str, subject: str) -> Photo:
    return Photo(f"skimage-{name}", SKIMAGE, f"skimage/data/{file}", subject)


#: Every real photograph in the training sources (looked at one by one).
PHOTOS: tuple[Photo, ...] = (
    _plasma("BytheWater", "wooden jetty planks by a lake, trees on the far shore"),
    _plasma("ColdRipple", "black-and-white pier in fog"),
    _plasma("ColorfulCups", "stacked coloured plastic cups from above"),
    _plasma("DarkestHour", "misty lake at dusk, tree line"),
    _plasma("EveningGlow", "rowing boats on a pebble shore at sunset, clouds, hills"),
    _plasma("FallenLeaf", "autumn maple leaves, shallow depth of field"),
    _plasma("Grey", "grey architectural facade, woven metal bands"),
    _plasma("Kite", "kite in a blue sky with clouds"),
    _plasma("OneStandsOut", "moss from above, one orange sprig"),
    _plasma("Path", "forest path between spruce trunks"),
    _plasma("summer_1am", "lake at dawn, reeds"),
    _mate("Aqua", "water drop crown splash"),
    _mate("Blinds", "backlit green leaf veins"),
    _mate("Dune", "dune grass against the sea"),
    _mate("FreshFlower", "orange flower petals, macro"),
    _mate("Garden", "red and yellow marigold, bokeh"),
    _mate("GreenMeadow", "young grass blades, macro"),
    _mate("LadyBird", "ladybird on a grass stalk, forget-me-nots"),
    _mate("RainDrops", "rain drops on leaves"),
    _mate("Storm", "storm clouds over fields from a moving train"),
    _mate("TwoWings", "dandelion seeds against orange bokeh"),
    _mate("Wood", "weathered wooden planks"),
    _mate("YellowFlower", "yellow daisy petals, macro"),
    _skimage("astronaut", "astronaut.png", "portrait of astronaut Eileen Collins"),
    _skimage("camera", "camera.png", "cameraman on a lawn (greyscale)"),
    _skimage("chelsea", "chelsea.png", "tabby cat's face"),
    _skimage("coffee", "coffee.png", "espresso cup on a wooden table"),
    _skimage("motorcycle_left", "motorcycle_left.png", "motorcycle in a garage"),
    _skimage("rocket", "rocket.jpg", "rocket on the launch pad at dusk"),
)

#: The fixed evaluation split (~20%): never trained on.
HELDOUT: frozenset[str] = frozenset({
    "mate-Dune", "mate-LadyBird", "plasma-EveningGlow", "plasma-Path", "skimage-chelsea",
    "skimage-coffee",
})


class PhotosError(RuntimeError):
    """A source is missing or a directory is unusable; the message says which."""


def split_of(photo: Photo) -> str:
    return "heldout" if photo.name in HELDOUT else "train"


def skimage_root() -> Path:
    """scikit-image's install folder (located without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise PhotosError("scikit-image, which provides the bundled photos, is not installed "
                          "(a checkout's make setup installs it)")
    return Path(spec.origin).parent.parent


def _run(command: list[str], cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as error:
        raise PhotosError(f"`{command[0]}` not found: this needs a Debian system with "
                          "apt-get and dpkg-deb") from error
    except subprocess.CalledProcessError as error:
        raise PhotosError(f"`{' '.join(command)}` failed ({error.returncode}): "
                          f"{error.stderr.strip()}") from error


def fetch_package(package: str, cache: Path, quiet: bool = False) -> tuple[Path, Path]:
    """``apt-get download`` the package into ``cache/debs`` (unless a .deb is already there)
    and ``dpkg-deb -x`` it into ``cache/extract/<package>``; returns (deb, extracted root)."""
    cache = cache.resolve()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        if not quiet:
            print(f"[photos] apt-get download {package}", flush=True)
        _run(["apt-get", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise PhotosError(f"apt-get download {package} produced no .deb in {debs}")
    deb = found[-1]
    root = cache / "extract" / package
    stamp = root / ".extracted-from"
    if not stamp.is_file() or stamp.read_text() != deb.name:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        if not quiet:
            print(f"[photos] dpkg-deb -x {deb.name}", flush=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=cache)
        stamp.write_text(deb.name)
    return deb, root


def _deb_version(deb: Path) -> str:
    # Debian file names are NAME_VERSION_ARCH.deb with ':' in the version escaped as %3a.
    return deb.name.split("_")[1].replace("%3a", ":")


def _previously_written(out: Path) -> set[Path]:
    """The photo files ``out/manifest.json`` lists (what an earlier run wrote), if it is a
    photos manifest; else none."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        return {out / str(entry["file"]) for entry in manifest["photos"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_out_folder(out: Path) -> None:
    """PhotosError, before anything is fetched, when ``out`` holds files this command did
    not write: a manifest.json of another kind, or files in ``train/`` or ``heldout/`` that
    neither the allow-list names nor an earlier manifest lists (a re-run replaces what it
    wrote and removes what a previous allow-list put there, and would remove those)."""
    manifest = out / "manifest.json"
    if manifest.exists():
        held = read_json_object(manifest)
        if not (held is not None and isinstance(held.get("photos"), list)):
            raise PhotosError(f"{out} holds a manifest.json that is not a photos manifest: "
                              "choose a new or empty --out")
    known = _previously_written(out) | {out / split_of(p) / p.name for p in PHOTOS}
    foreign = []
    for split in ("train", "heldout"):
        folder = out / split
        if folder.is_dir():
            foreign += [f for f in sorted(folder.iterdir())
                        if f.with_suffix("") not in known and f not in known
                        and not f.name.startswith(".")]
    if foreign:
        shown = listed([str(f.relative_to(out)) for f in foreign])
        raise PhotosError(f"{out} holds files this command did not write ({len(foreign)}: "
                          f"{shown}): choose a new or empty --out")


def assemble(out: Path, cache: Path, quiet: bool = False) -> dict[str, object]:
    """Copies every curated photo into ``out/train`` or ``out/heldout`` (bytes unchanged)
    and writes ``out/manifest.json``; returns the manifest."""
    if (reason := unwritable_reason(out)) is not None:
        raise PhotosError(f"cannot write to {out}: {reason}")
    check_out_folder(out)

    roots: dict[str, Path] = {SKIMAGE: skimage_root()}
    packages: dict[str, dict[str, str]] = {}
    for package in DEBIAN_PACKAGES:
        deb, root = fetch_package(package, cache, quiet=quiet)
        roots[package] = root
        packages[package] = {"version": _deb_version(deb), "deb": deb.name,
                             "deb_sha256": sha256_of(deb)}
    packages[SKIMAGE] = {"version": importlib.metadata.version(SKIMAGE)}

    missing = [f"{p.package}: {p.original_path}" for p in PHOTOS
               if not (roots[p.package] / p.original_path).is_file()]
    if missing:
        raise PhotosError("curated photos missing from their sources:\n  " + "\n  ".join(missing))

    wanted: set[Path] = set()
    entries = []
    for photo in PHOTOS:
        source = roots[photo.package] / photo.original_path
        split = split_of(photo)
        target = out / split / f"{photo.name}{source.suffix.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # follows the packages' symlinks
        wanted.add(target)
        with Image.open(target) as image:
            width, height = image.size
            mode = image.mode
        entries.append({
            "file": str(target.relative_to(out)), "split": split, "package": photo.package,
            "package_version": packages[photo.package]["version"],
            "original_path": photo.original_path, "subject": photo.subject,
            "width": width, "height": height, "mode": mode, "bytes": target.stat().st_size,
            "sha256": sha256_of(target),
        })
    written = _previously_written(out)
    for split in ("train", "heldout"):  # drop files a previous allow-list put there
        for stale in sorted((out / split).iterdir()):
            if stale.is_file() and stale not in wanted and stale in written:
                stale.unlink()
    manifest: dict[str, object] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "packages": packages,
        "counts": {split: sum(e["split"] == split for e in entries)
                   for split in ("train", "heldout")},
        "photos": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def command(args: argparse.Namespace) -> int:
    """``percept data photos``."""
    try:
        manifest = assemble(Path(args.out), Path(args.cache), quiet=args.quiet)
    except PhotosError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    counts = manifest["counts"]
    assert isinstance(counts, dict)
    print(f"[photos] {counts['train']} training and {counts['heldout']} held-out photos in "
          f"{args.out} (manifest.json lists sources and sha256)")
    return 0
