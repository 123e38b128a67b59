"""argparse front end for ``percept eval search`` (word -> image retrieval).

``services/cli.py`` passes the ``percept eval`` subparsers to :func:`register_eval`, as it
does for the trainers' front ends; search has no model of its own to train, so there is no
``register_train``. Registering imports only the standard library; torch, faiss and the
embedding models load when the command runs. The parser stores its handler as ``func``
(``args.func(args) -> exit code``).
"""

from __future__ import annotations

import argparse

from training.assets import REPO_ROOT
from training.command import run_task_cli

#: Cut-offs of recall@k and relevant_recall@k.
DEFAULT_KS = (1, 5, 10)


def _evaluate(args: argparse.Namespace) -> int:
    from training import evaluate_search

    return evaluate_search.command(args)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", default=str(REPO_ROOT / "training/evalsets/photos"),
                        help="labelled photo folder with labels.json (file -> wnid; default: "
                             "training/evalsets/photos, the DeViSE evaluation set)")
    parser.add_argument("--method", choices=["conse", "devise", "both"], default=None,
                        help="image embedding the index is built with (default: the embed "
                             "service's default, from the DeViSE artifact's config.json)")
    parser.add_argument("--models-dir", default=str(REPO_ROOT / "models"),
                        help="where the embed service finds its DeViSE artifact "
                             "(default: models)")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS),
                        help="recall@k cut-offs (default: 1 5 10)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out/eval/search"),
                        help="folder for metrics.json and per_query.md "
                             "(default: out/eval/search)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON report instead of the tables")
    parser.add_argument("--update-metrics", action="store_true",
                        help="also write the results into the DeViSE artifact's metrics.json "
                             "(eval_search)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: auto (CUDA when present)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; use 1 on a busy CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``search`` to the ``percept eval`` subparsers."""
    parser = subparsers.add_parser(
        "search", help="word -> image search: MRR and recall@k against chance",
        description="Index the labelled evaluation photos with the search service's parts "
                    "(embedding service, SQLite store, FAISS index; a temporary data dir), "
                    "search each distinct label by its word and score the rankings: MRR, "
                    "recall@k and relevant_recall@k, beside the exact expectation of a "
                    "random ranking. A photo is relevant when its label is the query's "
                    "synset or a kind of it (WordNet hyponym).")
    add_eval_arguments(parser)
    parser.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cli_search eval ...``: ``percept eval search``."""
    return run_task_cli("training.cli_search", "search", {"eval": register_eval}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
