"""argparse front end for ``percept train devise`` and ``percept eval devise``.

``services/cli.py`` creates the ``train`` and ``eval`` command groups (shared with the other
trainers) and passes their subparsers to :func:`register_train` and :func:`register_eval`
(also reachable as ``training.train_devise.register`` and
``training.evaluate_devise.register``). Registering imports only the standard library;
torch, faiss and the word vectors load when a command runs. Each parser stores its handler
as ``func`` (``args.func(args) -> exit code``).
"""

from __future__ import annotations

import argparse

from training.assets import REPO_ROOT
from training.command import run_task_cli, track_given_flags

DEFAULT_NAME = "devise-minilm"
#: Hinge rank loss margin (Frome et al. 2013 used 0.1 with unit-norm vectors).
DEFAULT_MARGIN = 0.1
#: Negative labels sampled per example (the paper sums over all wrong labels but stops at
#: the first violation; a fixed random sample keeps each step's cost constant).
DEFAULT_NEGATIVES = 64
#: ConSE's T (Norouzi et al. 2014 report T = 10 as their best).
DEFAULT_TOP_T = 10
#: Steps between checkpoints (a step takes milliseconds on a CPU; a checkpoint is a 2 MB
#: map plus Adam's moments).
DEFAULT_CHECKPOINT_EVERY = 100
#: hit@k cut-offs of the evaluation.
DEFAULT_KS = (1, 2, 5, 10, 20)


def _train(args: argparse.Namespace) -> int:
    from training import train_devise

    return train_devise.command(args)


def _evaluate(args: argparse.Namespace) -> int:
    from training import evaluate_devise

    return evaluate_devise.command(args)


def add_word_vector_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                              *, for_eval: bool = False) -> None:
    """``--word-vectors PATH`` and ``--word-vectors-format``."""
    default = ("default: the vectors the artifact records (MiniLM, or the word-vector file "
               "it was trained against)" if for_eval else
               "default: the all-MiniLM-L6-v2 noun vectors, which cover every synset")
    parser.add_argument("--word-vectors", default=None, metavar="PATH",
                        help="a word2vec (text or binary), GloVe or fastText .vec file "
                             "(.gz/.bz2 too) whose vectors are the word space: a lemma is "
                             "its underscore token (golden_retriever), else the mean of its "
                             "words' vectors; synsets with none are left out and the "
                             f"coverage is printed ({default})")
    parser.add_argument("--word-vectors-format", default="auto",
                        choices=["auto", "word2vec", "word2vec-binary", "glove", "fasttext"],
                        help="format of --word-vectors (default: auto, read from the file: a "
                             "'COUNT DIM' header or not, text or binary records)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--images", default=None, metavar="DIR",
                      help="ImageFolder tree whose subfolders are wnids (n02084071) or noun "
                           "lemmas (golden_retriever); each label's word vector is the "
                           "target. Default: the training photos (data/photos/train) "
                           "labelled by the backbone's own classifier (top-1 class)")
    data.add_argument("--photos", default=str(REPO_ROOT / "data/photos/train"),
                      help="training photos for the default (teacher) mode "
                           "(default: data/photos/train; held-out photos are refused)")
    data.add_argument("--crops-per-image", type=int, default=48,
                      help="crops per photo: the centre square plus random squares at random "
                           "scales, randomly mirrored (default: 48)")
    data.add_argument("--val-photos", default=str(REPO_ROOT / "data/photos/heldout"),
                      help="held-out photos for the teacher-agreement check, never trained "
                           "on ('' skips it; default: data/photos/heldout)")
    data.add_argument("--val-crops", type=int, default=8, help="crops per validation photo "
                                                                "(default: 8)")
    data.add_argument("--cache-dir", default=str(REPO_ROOT / "runs/devise-cache"),
                      help="feature cache (default: runs/devise-cache)")
    vectors = parser.add_argument_group("word space")
    vectors.add_argument("--recipe", default=None,
                         help="phrase recipe of the noun vectors (default: "
                              "services.embed.word_vectors.DEFAULT_RECIPE)")
    vectors.add_argument("--vectors-dir", default=None,
                         help="noun-vector cache folder (default: assets/vectors)")
    add_word_vector_arguments(vectors)
    loss = parser.add_argument_group("hinge rank loss (Frome et al. 2013, eq. 1)")
    loss.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                      help=f"default: {DEFAULT_MARGIN}")
    loss.add_argument("--negatives", type=int, default=DEFAULT_NEGATIVES,
                      help=f"negative labels sampled per example (default: {DEFAULT_NEGATIVES})")
    loss.add_argument("--negatives-from", choices=["imagenet", "nouns"], default="imagenet",
                      help="draw negatives from the 1000 ImageNet class vectors or from all "
                           "82,115 noun vectors (default: imagenet)")
    run = parser.add_argument_group("run")
    run.add_argument("--init", choices=["classifier", "random"], default="classifier",
                     help="start M from the classifier (M0 v = sum_c (l_c(v) - mean l) t_c, "
                          "the logit-weighted class vectors) or from small random weights "
                          "(default: classifier)")
    run.add_argument("--steps", type=int, default=600,
                     help="Adam steps, at least 1 (default: 600); with --resume, the total "
                          "over the runs it continues")
    run.add_argument("--batch-size", type=int, default=128, help="default: 128")
    run.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    run.add_argument("--weight-decay", type=float, default=0.0,
                     help="L2 pull towards the initial map (default: 0)")
    run.add_argument("--default-method", choices=["conse", "devise"], default="conse",
                     help="the method config.json names as the service default (default: "
                          "conse, the better one in `percept eval devise`)")
    run.add_argument("--top-t", type=int, default=DEFAULT_TOP_T,
                     help=f"ConSE's T recorded in config.json (default: {DEFAULT_TOP_T})")
    run.add_argument("--name", default=None,
                     help=f"default: {DEFAULT_NAME}, or devise-<file stem> with --word-vectors")
    run.add_argument("--out", default=None, help="artifact folder (default: models/NAME)")
    run.add_argument("--run-dir", default=None,
                     help="checkpoint, loss plot and logs (default: runs/NAME)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="default: auto (CUDA when present)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: torch's choice; use 1 on a busy CPU)")
    run.add_argument("--seed", type=int, default=0, help="default: 0")
    run.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                     help="write RUN_DIR/checkpoint.pt every N steps (default: "
                          f"{DEFAULT_CHECKPOINT_EVERY}; 0: only at the end of the run and when "
                          "Ctrl-C or SIGTERM stops it)")
    run.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR/checkpoint.pt with the flags it was started "
                          "with: one left out is taken from the checkpoint (and named), one "
                          "given that differs is named and refused, on the same photos and "
                          "word vectors; only --steps, --out, --name, --run-dir, "
                          "--checkpoint-every, --cache-dir, --vectors-dir, --default-method, "
                          "--top-t, --threads, --device and --quiet may change. Without "
                          "--resume, an existing checkpoint in RUN_DIR is refused, not "
                          "overwritten")
    run.add_argument("--resume-if-present", action="store_true",
                     help="--resume when RUN_DIR holds a checkpoint, a new run when it does "
                          "not: for a Kubernetes Job, whose retry after an eviction then "
                          "continues where it stopped")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / DEFAULT_NAME),
                        help=f"DeViSE artifact folder (default: models/{DEFAULT_NAME})")
    parser.add_argument("--photos", default=str(REPO_ROOT / "training/evalsets/photos"),
                        help="labelled photo folder with labels.json (default: "
                             "training/evalsets/photos)")
    parser.add_argument("--top-t", type=int, default=None,
                        help="ConSE's T (default: the artifact's, else "
                             f"{DEFAULT_TOP_T})")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS),
                        help="hit@k cut-offs (default: 1 2 5 10 20)")
    parser.add_argument("--hops", type=int, default=2,
                        help="hierarchical hit: within this many WordNet hops (default: 2)")
    add_word_vector_arguments(parser, for_eval=True)
    parser.add_argument("--backend", default="flat",
                        choices=["flat", "hnsw", "ivf", "torch", "numpy"],
                        help="noun index backend (flat, hnsw, ivf, torch, numpy; default: flat)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out/eval/devise/metrics.json"),
                        help="JSON report file, replaced only when it is an earlier report "
                             "(default: out/eval/devise/metrics.json)")
    parser.add_argument("--cache-dir", default=str(REPO_ROOT / "runs/devise-cache"),
                        help="feature cache (default: runs/devise-cache)")
    parser.add_argument("--update-metrics", action="store_true",
                        help="also write the results into the artifact's metrics.json")
    parser.add_argument("--show", type=int, default=3,
                        help="print each photo's top-N labels per method (default: 3; 0: none)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: auto (CUDA when present)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice)")


def register_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``devise`` to the ``percept train`` subparsers."""
    parser = subparsers.add_parser(
        "devise", help="train the DeViSE linear map into word space (Frome et al. 2013)",
        description="Train DeViSE's linear map M from EfficientNet-Lite0's pooled features "
                    "into the MiniLM noun-vector space (or a word2vec/GloVe/fastText file's, "
                    "--word-vectors) with the hinge rank loss, on an ImageFolder tree "
                    "(--images) or, by default, on crops of the training photos labelled by "
                    "the backbone's own classifier; export models/devise-minilm (or "
                    "models/devise-<file stem>).")
    add_train_arguments(parser)
    track_given_flags(parser)
    parser.set_defaults(func=_train)
    return parser


def register_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``devise`` to the ``percept eval`` subparsers."""
    parser = subparsers.add_parser(
        "devise", help="hit@k of DeViSE and ConSE over all 82,115 WordNet nouns",
        description="Label the evaluation photos with DeViSE and ConSE over every WordNet "
                    "noun: flat, zero-shot and hierarchical (within 2 hops) hit@k; prints "
                    "a Markdown table and writes JSON.")
    add_eval_arguments(parser)
    parser.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli_devise {train,eval} ...``: ``percept {train,eval} devise``."""
    groups = {"train": register_train, "eval": register_eval}
    return run_task_cli("training.cli_devise", "devise", groups, argv)


if __name__ == "__main__":
    raise SystemExit(main())
