"""argparse front end for ``percept train superres`` and ``percept eval superres``.

``services/cli.py`` creates the ``train`` and ``eval`` command groups (shared with the other
trainers) and passes their subparsers to :func:`register_train` and :func:`register_eval`.
Registering imports only the standard library; torch loads when a command runs. Each
parser stores its handler as ``func`` (``args.func(args) -> exit code``).
"""

from __future__ import annotations

import argparse

from training.assets import REPO_ROOT
from training.command import TIME_SCHEDULE_HELP, run_task_cli, track_given_flags


def _train(args: argparse.Namespace) -> int:
    from training import train_superres

    return train_superres.command(args)


def _evaluate(args: argparse.Namespace) -> int:
    from training import evaluate_superres

    return evaluate_superres.command(args)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=str(REPO_ROOT / "data/prepared/sr288"),
                      help="prepared folder from `percept data prepare --sizes 288 72` "
                           "(default: data/prepared/sr288)")
    data.add_argument("--crop", type=int, default=96,
                      help="high-res training crop in pixels, a multiple of 4 (default: 96; "
                           "the low-res input is crop/4)")
    data.add_argument("--detail-oversample", type=int, default=2,
                      help="draw K x batch crops and keep the batch with the most texture "
                           "(default: 2; 1 = uniform crops)")
    data.add_argument("--blur", type=float, default=0.0,
                      help="max Gaussian blur sigma (HR px) before downscaling (default: off)")
    data.add_argument("--noise", type=float, default=0.0,
                      help="max Gaussian noise std on the [0,1] scale (default: off)")
    data.add_argument("--jpeg", type=int, default=0,
                      help="lowest JPEG quality for low-res re-encoding, 1..95: each image's "
                           "is drawn up to 95 (default: 0, off)")
    data.add_argument("--degrade-prob", type=float, default=0.5,
                      help="probability of each degradation per image (default: 0.5)")
    data.add_argument("--val-items", type=int, default=16,
                      help="fixed items for the sample grid and validation (default: 16)")
    model = parser.add_argument_group("model")
    model.add_argument("--width", type=int, default=32, help="trunk channels (default: 32)")
    model.add_argument("--blocks", type=int, default=5, help="residual blocks (default: 5)")
    model.add_argument("--tail-width", type=int, default=0,
                       help="full-resolution channels (default: width/2)")
    model.add_argument("--upsample", choices=["nearest", "pixelshuffle"], default="nearest",
                       help="resize-convolution or ICNR sub-pixel convolution "
                            "(default: nearest)")
    model.add_argument("--init-from", default=None,
                       help="start from an exported artifact's weights (same architecture), "
                            "e.g. fine-tune models/superres-psnr with the perceptual loss")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--pixel-weight", type=float, default=1.0, help="default: 1.0")
    loss.add_argument("--pixel-loss", choices=["l1", "mse"], default="l1", help="default: l1")
    loss.add_argument("--perceptual-weight", type=float, default=0.0,
                      help="weight of the VGG19 relu2_2 feature loss (default: 0)")
    loss.add_argument("--tv-weight", type=float, default=0.0,
                      help="weight of total variation (default: 0)")
    loss.add_argument("--grid-weight", type=float, default=0.0,
                      help="weight of the lattice penalty: how far the output's spectral "
                           "peaks at periods 2 and 4 (where the two x2 upsamplings put a "
                           "checkerboard) rise above the target's, as a log ratio that is 0 "
                           "while they do not (default: 0; e.g. 0.1 for a long perceptual "
                           "fine-tune)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=str(REPO_ROOT / "models/superres-psnr"),
                     help="artifact folder models/NAME (default: models/superres-psnr)")
    run.add_argument("--name", default=None, help="artifact name (default: the --out folder)")
    run.add_argument("--run-dir", default=None,
                     help="checkpoints, samples and loss plot (default: runs/NAME)")
    run.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: 2000)")
    run.add_argument("--batch-size", type=int, default=16, help="default: 16")
    run.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate "
                                                           "(default: 1e-3)")
    run.add_argument("--warmup", type=int, default=None,
                     help="warm-up steps (default: steps/20, at most 100)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="default: auto (CUDA when present)")
    run.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                     help="NHWC memory format (default: auto = on; measured faster on "
                          "CPU and CUDA for this net)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: torch's choice)")
    run.add_argument("--seed", type=int, default=0, help="default: 0")
    run.add_argument("--checkpoint-every", type=int, default=200, help="default: 200")
    run.add_argument("--sample-every", type=int, default=200,
                     help="write samples.png and loss.png every N steps (default: 200)")
    run.add_argument("--max-minutes", type=float, default=0.0,
                     help="stop (and export) after this much wall time (default: no limit)")
    run.add_argument("--time-schedule", action="store_true",
                     help=TIME_SCHEDULE_HELP)
    run.add_argument("--max-cpu-minutes", type=float, default=0.0,
                     help="stop (and export) after this much process CPU time, all threads "
                          "(default: no limit)")
    run.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR/checkpoint.pt with the flags it was started "
                          "with: one left out is taken from the checkpoint (and named), one "
                          "given that differs is named and refused; only --steps, "
                          "--max-minutes, --max-cpu-minutes, --out, --name, --run-dir, "
                          "--checkpoint-every, --sample-every, --threads, --device and "
                          "--channels-last may change. Without "
                          "--resume, an existing checkpoint in RUN_DIR is refused, not "
                          "overwritten")
    run.add_argument("--resume-if-present", action="store_true",
                     help="--resume when RUN_DIR holds a checkpoint, a new run when it does "
                          "not: for a Kubernetes Job, whose retry after an eviction then "
                          "continues where it stopped")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", nargs="+", default=[str(REPO_ROOT / "data/photos/heldout")],
                        help="held-out photos (default: data/photos/heldout)")
    parser.add_argument("--models", nargs="+",
                        default=[str(REPO_ROOT / "models/superres-mse"),
                                 str(REPO_ROOT / "models/superres-psnr"),
                                 str(REPO_ROOT / "models/superres-perceptual")],
                        help="artifact folders to compare (default: the committed three: "
                             "pixel MSE, pixel L1, perceptual)")
    parser.add_argument("--hr-size", type=int, default=256,
                        help="high-res tile size (default: 256 -> 64 px low-res)")
    parser.add_argument("--resize-to", type=int, default=512,
                        help="resize each photo's shortest side to this, centre-crop a square "
                             "and cut it into hr-size tiles (default: 512 -> 4 tiles)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out/eval/superres"),
                        help="folder for metrics.json and comparison.png "
                             "(default: out/eval/superres)")
    parser.add_argument("--figure", default=None,
                        help="also save a small comparison picture here (e.g. "
                             "docs/images/superres_comparison.png)")
    parser.add_argument("--figure-photos", nargs="*",
                        default=["skimage-chelsea", "skimage-coffee"],
                        help="photos (file stems) shown in --figure, one row each "
                             "(default: skimage-chelsea skimage-coffee)")
    parser.add_argument("--update-metrics", action="store_true",
                        help="write the held-out numbers into each model's metrics.json")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; use 1 on a busy CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: auto (CUDA when present)")


def register_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``superres`` to the ``percept train`` subparsers."""
    parser = subparsers.add_parser(
        "superres", help="train the 4x super-resolution net",
        description="Train the 4x SR net (pixel / VGG relu2_2 perceptual / TV losses) on "
                    "prepared arrays and export models/NAME.")
    add_train_arguments(parser)
    track_given_flags(parser)
    parser.set_defaults(func=_train)
    return parser


def register_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``superres`` to the ``percept eval`` subparsers."""
    parser = subparsers.add_parser(
        "superres", help="Y-PSNR/SSIM/sharpness of SR models vs bicubic and Lanczos",
        description="Evaluate SR artifacts on the held-out photos: Y (BT.601) PSNR and SSIM "
                    "with 4 px shaved, sharpness, and a side-by-side comparison picture.")
    add_eval_arguments(parser)
    parser.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli_superres {train,eval} ...``: ``percept {train,eval} superres``."""
    groups = {"train": register_train, "eval": register_eval}
    return run_task_cli("training.cli_superres", "superres", groups, argv)


if __name__ == "__main__":
    raise SystemExit(main())
