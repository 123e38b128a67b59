"""argparse front end for data preparation: ``percept data photos`` and ``percept data
prepare``.

``services/cli.py`` calls :func:`register` with its top-level subparsers. Each command's
handler is stored as ``func`` (``args.func(args) -> exit code``); registering imports only
the standard library, and the heavy modules (numpy, PIL) load when a command runs.
"""

from __future__ import annotations

import argparse
import sys

from training.assets import REPO_ROOT


def _photos(args: argparse.Namespace) -> int:
    from training.data import photos

    return photos.command(args)


def _prepare(args: argparse.Namespace) -> int:
    from training.data import prepare

    return prepare.command(args)


def add_photos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(REPO_ROOT / "data" / "photos"),
                        help="destination folder (default: data/photos)")
    parser.add_argument("--cache", default=str(REPO_ROOT / ".cache" / "photo-sources"),
                        help="where the .deb files are downloaded and extracted "
                             "(default: .cache/photo-sources)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", nargs="+", default=[str(REPO_ROOT / "data/photos/train")],
                        help="image files or folders (default: data/photos/train)")
    parser.add_argument("--out", default=str(REPO_ROOT / "data/prepared/sr288"),
                        help="output folder for images_<size>.npy and manifest.json "
                             "(default: data/prepared/sr288)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[288, 72],
                        help="square sizes; the largest is cut from the photos, the others "
                             "are its bicubic reductions (default: 288 72)")
    parser.add_argument("--crops-per-image", type=int, default=1,
                        help="crops per photo bigger than the largest size: one centre crop "
                             "plus random crops at random scales (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and crop seed (default: 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: every core)")
    parser.add_argument("--allow-heldout", action="store_true",
                        help="accept photos from a heldout/ folder (evaluation data only)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when --out already holds these arrays (by default "
                             "an up-to-date folder is left as it is)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``data {photos,prepare}`` to a CLI's subparsers; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="assemble training photos and prepare arrays",
                                 description="Training data preparation: the curated photos, "
                                             "and the uint8 arrays every trainer reads "
                                             "(training/data/prepare.py).")
    commands = data.add_subparsers(dest="data_command", metavar="{photos,prepare}")
    commands.required = True
    photos_parser = commands.add_parser(
        "photos", help="copy the curated real photos into data/photos/{train,heldout}",
        description="apt-get download + dpkg-deb -x plasma-workspace-wallpapers and "
                    "mate-backgrounds, take the allow-listed real photos (plus "
                    "scikit-image's), hold ~20% out, and write manifest.json.")
    add_photos_arguments(photos_parser)
    photos_parser.set_defaults(func=_photos)
    prepare_parser = commands.add_parser(
        "prepare", help="make contiguous uint8 arrays (resize, crop, shuffle) on all cores",
        description="Resize the shortest side and crop (never pad), force RGB, shuffle once, "
                    "and write images_<size>.npy memmaps plus manifest.json.")
    add_prepare_arguments(prepare_parser)
    prepare_parser.set_defaults(func=_prepare)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m training.data.cli {photos,prepare} ...`` (the same as ``percept data``)."""
    parser = argparse.ArgumentParser(prog="python -m training.data.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
