"""argparse front end for ``percept train style`` and ``percept eval style``.

``services/cli.py`` creates the ``train`` and ``eval`` command groups (shared with the other
trainers) and passes their subparsers to :func:`register_train` and :func:`register_eval`
(also reachable as ``training.train_style.register`` and
``training.evaluate_style.register``). Registering imports only the standard library;
torch loads when a command runs. Each parser stores its handler as ``func``
(``args.func(args) -> exit code``).
"""

from __future__ import annotations

import argparse

from training.assets import REPO_ROOT
from training.command import TIME_SCHEDULE_HELP, run_task_cli, track_given_flags

#: Johnson et al. 2016 (sec. 4.1): content at relu2_2, style at these four layers. The
#: default per-layer weights make each layer's Gram distance between a training photo and
#: a painting about equal (measured with the average-pooling VGG19 on the three default
#: styles: median raw distances 1.2e9, 2e8, 1.7e9 and 8e7).
DEFAULT_STYLE_LAYER_WEIGHTS = {"relu1_2": 1.0, "relu2_2": 4.0, "relu3_3": 0.5, "relu4_3": 10.0}
DEFAULT_CONTENT_LAYER = "relu2_2"

#: Defaults of the size flags: the paper's recipe on CUDA; on a CPU the reduced recipe the
#: first committed CPU models were trained with. The committed models were then fine-tuned
#: with other flags (each one's provenance.json holds its exact commands).
GPU_RECIPE = {"size": 256, "width": 32, "steps": 40000, "batch_size": 4}
CPU_RECIPE = {"size": 128, "width": 16, "steps": 540, "batch_size": 2}
GPU_LR, CPU_LR = 1e-3, 2e-3


def _train(args: argparse.Namespace) -> int:
    from training import train_style

    return train_style.command(args)


def _evaluate(args: argparse.Namespace) -> int:
    from training import evaluate_style

    return evaluate_style.command(args)


def parse_layer_weight(text: str) -> tuple[str, float]:
    """``relu1_2=0.5`` -> ("relu1_2", 0.5) (an argparse ``type``)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected LAYER=WEIGHT (e.g. relu3_3=0.1), got {text!r}")
    try:
        weight = float(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"weight in {text!r} is not a number") from error
    if not weight >= 0 or weight == float("inf"):
        raise argparse.ArgumentTypeError(f"weight in {text!r} must be finite and >= 0")
    return name.strip(), weight


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    style = parser.add_argument_group("style (one of --style or --style-image)")
    chosen = style.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--style", default=None, metavar="NAME",
                        help="a bundled style image by name (starry-night, the-scream, "
                             "stained-tissue); the model is named style-NAME")
    chosen.add_argument("--style-image", default=None, metavar="PATH",
                        help="any style image file (the name defaults to its file stem; "
                             "--name sets another)")
    style.add_argument("--name", default=None,
                       help="style name (the artifact is models/style-NAME); default: the "
                            "--style name, else the --style-image file stem")
    style.add_argument("--title", default=None, help="display title (default: from the "
                                                     "bundled style, else NAME)")
    style.add_argument("--licence", default=None,
                       help="licence recorded in config.json (default: the bundled "
                            "style's, else 'unknown')")
    style.add_argument("--style-size", type=int, default=384,
                       help="shrink the style image so its longest side is at most this "
                            "many pixels; a smaller image is used as it is, never enlarged "
                            "(sets the brush-stroke scale; default: 384, at least 32)")
    data = parser.add_argument_group("content data")
    data.add_argument("--data", default=str(REPO_ROOT / "data/prepared/sr288"),
                      help="prepared folder of training photos from `percept data prepare` "
                           "(its largest size is used; default: data/prepared/sr288)")
    data.add_argument("--size", type=int, default=None,
                      help="square training crop in pixels (default: 256 on CUDA as in "
                           f"Johnson et al., {CPU_RECIPE['size']} on CPU)")
    data.add_argument("--min-scale", type=float, default=0.5,
                      help="smallest crop side as a fraction of the prepared image before "
                           "resizing to --size (default: 0.5)")
    data.add_argument("--val-items", type=int, default=3,
                      help="fixed content items for the sample grid (default: 3)")
    model = parser.add_argument_group("model")
    model.add_argument("--width", type=int, default=None,
                       help="full-resolution channels (default: 32 on CUDA as in the paper, "
                            f"{CPU_RECIPE['width']} on CPU)")
    model.add_argument("--blocks", type=int, default=5, help="residual blocks (default: 5)")
    model.add_argument("--upsample", choices=("nearest", "bilinear"), default="nearest",
                       help="interpolation before each upsampling convolution "
                            "(default: nearest)")
    model.add_argument("--init-from", metavar="ARTIFACT", default=None,
                       help="fine-tune: start from the weights of this exported style "
                            "artifact (a folder such as models/style-NAME, whose "
                            "--width and --blocks must match; --upsample may differ, the "
                            "weights carry over) instead of a fresh net")
    model.add_argument("--edge-margin", type=int, default=None, metavar="PX",
                       help="inference-only reflected border, cropped away again, written to "
                            "config.json (default: that of the --init-from artifact, else 0; "
                            "8 hides the dark frame a net trained on crops can paint; at most "
                            "128)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--content-weight", type=float, default=1.0,
                      help=f"weight of the {DEFAULT_CONTENT_LAYER} content loss (default: 1)")
    loss.add_argument("--style-weight", type=float, default=7e-5,
                      help="weight of the summed per-layer Gram losses (default: 7e-5)")
    loss.add_argument("--style-layer-weight", type=parse_layer_weight, action="append",
                      default=None, metavar="LAYER=W",
                      help="per-layer style weight, repeatable; given layers replace the "
                           "defaults (" + ", ".join(f"{k}={v:g}" for k, v in
                                                    DEFAULT_STYLE_LAYER_WEIGHTS.items()) + ")")
    loss.add_argument("--content-layer", default=DEFAULT_CONTENT_LAYER,
                      help=f"default: {DEFAULT_CONTENT_LAYER} (Johnson et al.)")
    loss.add_argument("--vgg-pooling", choices=["max", "avg"], default="avg",
                      help="VGG19 pooling in the loss network: avg (default; Gatys et al. "
                           "2016) spreads the gradient over each 2x2 window, where max "
                           "pooling's gradient hits one pixel in four and teaches the net "
                           "periodic artifacts (Odena et al. 2016)")
    loss.add_argument("--tv-weight", type=float, default=4e6,
                      help="weight of total variation (default: 4e6; it is what keeps the "
                           "net from painting period-2/period-4 texture on the upsampling "
                           "grid, which the Nyquist check of `percept eval style` measures)")
    loss.add_argument("--grid-weight", type=float, default=0.0,
                      help="weight of the grid penalty: how far the output's spectral peaks "
                           "at periods 2 and 4 (the network's pixel lattice) rise above the "
                           "photo's, as a log ratio (default: 0 = off, the paper's loss; "
                           "5e3 took starry-night's period-4 ratio from 4.05 to 0.67 in a "
                           "300-step fine-tune, its style ratio unchanged)")
    loss.add_argument("--tile-weight", type=float, default=0.0,
                      help="weight of the tile-consistency term: the net run on a window "
                           "of 5/8 of the crop should paint what it painted there on the "
                           "whole crop (mean squared difference, 16 px from the window's "
                           "edges), so that tiled serving agrees with one pass (default: 0 "
                           "= off)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None,
                     help="artifact folder (default: models/style-NAME)")
    run.add_argument("--run-dir", default=None,
                     help="checkpoints, samples and loss plot (default: runs/style-NAME)")
    run.add_argument("--steps", type=int, default=None,
                     help="optimiser steps (default: 40000 on CUDA as in Johnson et al., "
                          f"{CPU_RECIPE['steps']} on CPU)")
    run.add_argument("--batch-size", type=int, default=None,
                     help=f"default: 4 on CUDA, {CPU_RECIPE['batch_size']} on CPU")
    run.add_argument("--lr", type=float, default=None,
                     help="peak Adam learning rate (default: 1e-3 on CUDA as in Johnson et "
                          f"al., {CPU_LR:g} on CPU for the short run)")
    run.add_argument("--warmup", type=int, default=None,
                     help="warm-up steps (default: steps/20, at most 100)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="default: auto (CUDA when present)")
    run.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                     help="NHWC memory format (default: auto = CUDA only)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: torch's choice)")
    run.add_argument("--seed", type=int, default=0, help="default: 0")
    run.add_argument("--checkpoint-every", type=int, default=200,
                     help="write RUN_DIR/checkpoint.pt every N steps, and at the end "
                          "(default: 200; 0 = only at the end)")
    run.add_argument("--sample-every", type=int, default=200,
                     help="write samples.png and loss.png every N steps, and at the end "
                          "(default: 200; 0 = only at the end)")
    run.add_argument("--max-minutes", type=float, default=0.0,
                     help="stop (and export) after this much wall time, counting the runs a "
                          "--resume continues (default: no limit)")
    run.add_argument("--time-schedule", action="store_true",
                     help=TIME_SCHEDULE_HELP)
    run.add_argument("--grid-check-every", type=int, default=30,
                     help="with --grid-margin above 0, measure grid artifacts on the sample "
                          "items every N steps (default: 30)")
    run.add_argument("--grid-margin", type=float, default=0.0,
                     help="export the last checked state whose period-2 and period-4 "
                          "spectral ratios (output over content) on the sample items stay "
                          "under this, e.g. 1.5; 0 (the default) exports the final state. Off "
                          "by default: on the 3 small training crops of a CPU run the ratios "
                          "swing between checks (starry-night 2.2-8.2 over 540 steps) and "
                          "disagree with held-out photos, so they are not measured unless "
                          "asked for)")
    run.add_argument("--max-cpu-minutes", type=float, default=0.0,
                     help="stop (and export) after this much process CPU time, counting "
                          "the runs a --resume continues (default: no limit)")
    run.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR/checkpoint.pt with the flags it was started "
                          "with: one left out is taken from the checkpoint (and named), one "
                          "given that differs is named and refused; only --steps, --max-minutes, "
                          "--max-cpu-minutes, --out, --run-dir, --checkpoint-every, "
                          "--sample-every, --grid-check-every, --grid-margin, --edge-margin, "
                          "--threads, --device, --channels-last, --name, --title and --licence may "
                          "change (a longer --steps stretches the cosine decay; the warm-up "
                          "stays). Without --resume, an existing checkpoint in RUN_DIR is "
                          "refused, not overwritten. Ctrl-C or SIGTERM ends the step, saves "
                          "a checkpoint and exits (130 / 143) without exporting")
    run.add_argument("--resume-if-present", action="store_true",
                     help="--resume when RUN_DIR holds a checkpoint, a new run when it does "
                          "not: for a Kubernetes Job, whose retry after an eviction then "
                          "continues where it stopped")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--models", nargs="+", default=None,
                        help="artifact folders (default: every models/style-*)")
    parser.add_argument("--photos", nargs="+", default=None,
                        help="held-out photos or folders; a path that does not exist, a "
                             "folder with no images or a file that cannot be decoded is an "
                             "error (default: data/photos/heldout, and only when that folder "
                             "is absent scikit-image's held-out chelsea and coffee)")
    parser.add_argument("--size", type=int, default=256,
                        help="resize each photo's shortest side to this and centre-crop "
                             "both sides to multiples of 4 (the period-4 measure needs whole "
                             "periods); a multiple of 4 from 16 to 4096 (default: 256)")
    parser.add_argument("--grid-photos", type=int, default=3,
                        help="content photos (rows) in the grid, at least 1 (--grid '' "
                             "writes no grid; default: 3)")
    parser.add_argument("--grid-cell", type=int, default=160,
                        help="grid cell size in pixels, a multiple of 4 from 16 to 1024 "
                             "(default: 160)")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="grid image of photos x styles ('' skips it; default: the README's "
                             "docs/images/style_grid.png when measuring the default models on "
                             "the default photos, i.e. without --models and --photos, else "
                             "style_grid.png in the --out folder)")
    parser.add_argument("--zoom", default="", metavar="PNG",
                        help="also write the centre of the grid's first photo and of every "
                             "model's output for it, enlarged 3x (no smoothing: a period-4 "
                             "grid shows), to this file (default: none)")
    parser.add_argument("--zoom-crop", type=int, default=96, metavar="PX",
                        help="side of --zoom's centre crop at --size, from 8 px to --size "
                             "(default: 96)")
    parser.add_argument("--tiling", type=int, default=0, metavar="PX",
                        help="also resize each photo to 1100x700 and stylise it in PX-px "
                             "tiles with the service's tiler and whole: PSNR of one against "
                             "the other, and against the whole result shifted 2 px "
                             "(576 as the service test; default: 0, off)")
    parser.add_argument("--style-image", nargs="+", default=None, metavar="PATH",
                        help="style image files for models trained with `percept train style "
                             "--style-image`: each model is measured against the image whose "
                             "sha256 its config.json records, which is looked for as the "
                             "bundled style of its name, the file provenance.json names, then "
                             "these; none matching is an error")
    parser.add_argument("--out", default=str(REPO_ROOT / "out/eval/style"),
                        help="folder for metrics.json (and the grid when not the README's; "
                             "default: out/eval/style)")
    parser.add_argument("--update-metrics", action="store_true",
                        help="write the held-out numbers into each model's metrics.json")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; use 1 on a busy CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: auto (CUDA when present)")


def register_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``style`` to the ``percept train`` subparsers."""
    parser = subparsers.add_parser(
        "style", help="train a fast style-transfer net (Johnson et al. 2016)",
        description="Train Johnson et al.'s image-transformation net against the VGG19 "
                    "perceptual loss (relu2_2 content, Gram style at relu1_2/2_2/3_3/4_3 "
                    "with per-layer weights, TV) on prepared training photos, and export "
                    "models/style-NAME.")
    add_train_arguments(parser)
    track_given_flags(parser)
    parser.set_defaults(func=_train)
    return parser


def register_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``style`` to the ``percept eval`` subparsers."""
    parser = subparsers.add_parser(
        "style", help="style-loss ratio, content loss and checkerboard check of style nets",
        description="Evaluate fast style artifacts on held-out photos: how far each moves "
                    "the Gram statistics towards its style, how much content it keeps, and "
                    "the Nyquist (checkerboard) energy; writes JSON and a README grid.")
    add_eval_arguments(parser)
    parser.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli_style {train,eval} ...``: ``percept {train,eval} style``."""
    groups = {"train": register_train, "eval": register_eval}
    return run_task_cli("training.cli_style", "style", groups, argv)


if __name__ == "__main__":
    raise SystemExit(main())
