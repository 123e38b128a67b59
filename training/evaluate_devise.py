"""``percept eval devise``: image -> WordNet noun labelling, DeViSE vs ConSE, hit@k.

Both methods embed a photo into the 384-d noun-vector space and label it with the nearest
of all 82,115 WordNet 3.0 noun synsets (cosine, :class:`services.embed.noun_index.NounIndex`):

- **devise**: the trained linear map (Frome et al. 2013) applied to EfficientNet-Lite0's
  pooled features;
- **conse**: the convex combination of the classifier's top-T class vectors (Norouzi et al.
  2014), no training;
- **classifier** (reference only): the classifier's own top-k ImageNet classes as labels.
  It can only ever name 1000 synsets; it shows what the word space adds.

The word space is the one the artifact was trained against (config.json ``noun_vectors``):
MiniLM, or the word2vec/GloVe/fastText file, found at its recorded path or given with
``--word-vectors PATH``; a file whose sha256 or dimension differs is refused.

The evaluation photos are ``training/evalsets/photos`` (labels.json: file -> wnid), resized
(shortest side 224) and centre-cropped. Variants, each as hit@k (the fraction of photos
whose true synset is among the top k; k = 1, 2, 5, 10, 20):

- **flat**: all 82,115 synsets are candidates (with ``--word-vectors``, those the file
  covers); a hit is the exact true synset.
- **zero-shot**: the photo's class is taken away from what the models know. The "masked
  classes" of a photo are the ImageNet-1k classes that are its label or a kind of it (the
  hyponym closure: all 118 dog breeds for ``dog``, ``tabby`` for the tabby). ConSE: their
  probabilities are set to zero before the top-T (Norouzi et al.'s unseen-class setting).
  Both methods: the candidates are the 81,115 synsets that are *not* ImageNet-1k classes
  (the DeViSE and ConSE papers' zero-shot label sets exclude the 1000 training labels), plus
  the photo's own label when that is an ImageNet class (otherwise it could never be hit).
  DeViSE's map is not retrained per photo (it was trained on the training photos only,
  whose teacher labels cover a few dozen classes), so its masking is the candidate set.
- **hierarchical**: flat candidates; a hit is any returned synset within ``--hops`` (2)
  undirected hypernym/hyponym edges of the true one (``NounVocabulary.neighbourhood``),
  the "close enough" idea of the DeViSE paper's hierarchical precision@k (sec. 4.2).
- **zero-shot hierarchical**: the zero-shot ranking scored the hierarchical way.

The better method is the one with the higher mean hit@k over the flat, zero-shot and
hierarchical variants; it should be the service's default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.assets import REPO_ROOT
from training.cli_devise import DEFAULT_TOP_T
from training.devise_features import compute_features
from training.export import load_exported, update_metrics
from training.files import write_text_atomically
from training.loop import check_flag_minimums
from training.nets import devise as _devise_net  # noqa: F401  (registers "devise-linear")
from training.nets.devise import conse_embed

LABELS_FILE = "labels.json"
METHODS = ("devise", "conse")
VARIANTS = ("flat", "zero_shot", "hierarchical", "zero_shot_hierarchical")
SCORED_VARIANTS = ("flat", "zero_shot", "hierarchical")


class EvalSetError(ValueError):
    """The evaluation set is missing or inconsistent."""


@dataclass(frozen=True)
class EvalSet:
    folder: Path
    files: list[Path]
    wnids: list[str]
    lemmas: list[str]


def load_eval_set(folder: Path, vocab: Any | None = None) -> EvalSet:
    """Reads ``labels.json``; every file must exist and (given ``vocab``) every wnid must be a
    noun synset of the vocabulary."""
    labels_path = Path(folder) / LABELS_FILE
    if not labels_path.is_file():
        raise EvalSetError(f"{labels_path} not found")
    try:
        labels = json.loads(labels_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise EvalSetError(f"{labels_path} is not JSON ({error})") from error
    if not isinstance(labels, dict):
        raise EvalSetError(f"{labels_path} must map each photo's file name to its wnid (or "
                           "to an object with a \"wnid\"), not hold a "
                           f"{type(labels).__name__}")
    files, wnids, lemmas, problems = [], [], [], []
    for name in sorted(labels):
        # "file": "n02084071", or "file": {"wnid": "n02084071", "lemma": "dog", ...}
        entry = labels[name] if isinstance(labels[name], dict) else {"wnid": labels[name]}
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: file missing")
        else:
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - the header is read here
            except (OSError, SyntaxError, ValueError) as error:
                problems.append(f"{name}: not a readable image ({error})")
        if vocab is not None and entry.get("wnid") not in vocab:
            problems.append(f"{name}: {entry.get('wnid')!r} is not a WordNet noun synset")
        files.append(path)
        wnids.append(str(entry.get("wnid")))
        lemmas.append(str(entry.get("lemma")))
    if problems:
        raise EvalSetError(f"{labels_path}: " + "; ".join(problems))
    if not files:
        raise EvalSetError(f"{labels_path} lists no photos")
    return EvalSet(Path(folder), files, wnids, lemmas)


# -- scoring --------------------------------------------------------------------------------
def hits_at_k(ranked: np.ndarray, accepted: Sequence[Iterable[int]],
              ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose first k ranked ids contain an accepted id, for each k.

    ``ranked``: (N, K) ids best first (-1 = padding, never accepted); ``accepted[i]``: the
    ids that count as correct for row i (the true id for flat hit@k; its neighbourhood for
    the hierarchical variant).
    """
    if len(ranked) != len(accepted):
        raise ValueError(f"{len(ranked)} rankings but {len(accepted)} answer sets")
    if not len(ranked):
        return {int(k): float("nan") for k in ks}
    first_hit = np.full(len(ranked), np.inf)
    for row, (ids, good) in enumerate(zip(ranked, accepted, strict=True)):
        good_set = set(int(g) for g in good)
        for position, candidate in enumerate(ids):
            if int(candidate) in good_set:
                first_hit[row] = position
                break
    return {int(k): float(np.mean(first_hit < k)) for k in ks}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def masked_classes(vocab: Any, wnid: str, imagenet_rows: np.ndarray) -> np.ndarray:
    """Output indices (0..999) of the ImageNet classes that are ``wnid`` or a kind of it."""
    closure = vocab.hyponym_closure(wnid)
    return np.flatnonzero(np.isin(imagenet_rows, np.fromiter(closure, dtype=np.int64)))


def mean_score(results: Mapping[str, Mapping[int, float]]) -> float:
    """Mean hit@k over :data:`SCORED_VARIANTS` and every k: the method ranking score."""
    values = [v for variant in SCORED_VARIANTS for v in results[variant].values()]
    return float(np.mean(values))


# -- evaluation -----------------------------------------------------------------------------
def _search_each(index: Any, queries: np.ndarray, k: int,
                 excludes: Sequence[np.ndarray | None]) -> np.ndarray:
    rows = []
    for query, exclude in zip(queries, excludes, strict=True):
        _, ids = index.search(query[None, :], k, exclude=exclude)
        rows.append(ids[0])
    return np.stack(rows)


def evaluate(model_dir: Path, photos: Path, *, top_t: int | None = None,
             ks: Sequence[int] = (1, 2, 5, 10, 20), hops: int = 2, backend: str = "flat",
             cache_dir: Path | None = None, device: str = "cpu",
             progress: bool = True, word_vectors: Path | str | None = None,
             word_vectors_format: str = "auto") -> dict[str, Any]:
    """Runs every method and variant; returns the JSON report.

    The word space is ``word_vectors`` (a word2vec/GloVe/fastText file) when given, else the
    one the artifact records (MiniLM, or the word-vector file it was trained against). A
    map trained against other vectors (another file, sha256 or dimension) is refused
    (ValueError). Synsets without a vector are not candidates, and ConSE combines only
    classes that have one.
    """
    from services.embed.word_vectors import (
        SOURCE_WORD_VECTORS,
        describe_source,
        vector_space_mismatch,
    )
    from training.train_devise import load_word_space

    module, config = load_exported(model_dir, device=device)
    recorded: dict[str, Any] = config.get("noun_vectors", {})
    if word_vectors is None and recorded.get("source") == SOURCE_WORD_VECTORS:
        word_vectors = Path(str(recorded.get("path")))
        word_vectors_format = str(recorded.get("format", "auto"))
        if not word_vectors.is_file():
            raise FileNotFoundError(
                f"{model_dir} was trained against the word vectors {word_vectors}, which are "
                "not there; pass --word-vectors PATH (the same file: its sha256 is checked)")
    space = load_word_space(recorded.get("recipe"), progress=progress,
                            word_vectors=word_vectors, word_vectors_format=word_vectors_format)
    reason = vector_space_mismatch(recorded, space.source)
    if reason is not None:
        raise ValueError(f"{model_dir} cannot be evaluated with {describe_source(space.source)}"
                         f": {reason}")
    trained_on = recorded.get("cache_file")
    if trained_on and trained_on != space.source.get("cache_file"):
        print(f"[eval] warning: the map was trained against {trained_on}, evaluating "
              f"against {space.source.get('cache_file')}", file=sys.stderr, flush=True)
    vocab = space.vocab
    evalset = load_eval_set(photos, vocab)
    top_t = int(top_t or config.get("methods", {}).get("conse", {}).get("top_t",
                                                                        DEFAULT_TOP_T))
    kmax = max(ks)

    cache = compute_features(evalset.files, crops_per_image=1, device=device,
                             cache_dir=cache_dir, progress=progress, desc="eval photos")
    probs = softmax(cache.logits)
    conse_probs = probs * space.imagenet_covered  # ConSE: only classes with a vector
    class_vectors = torch.from_numpy(space.vectors[space.imagenet_rows])
    truth = vocab.indices_of(evalset.wnids)
    imagenet_set = set(space.imagenet_rows.tolist())
    masks = [masked_classes(vocab, w, space.imagenet_rows) for w in evalset.wnids]
    zero_probs = conse_probs.copy()
    for row, masked in enumerate(masks):
        zero_probs[row, masked] = 0.0
    neighbourhoods = [set(vocab.neighbourhood(w, hops)) for w in evalset.wnids]

    with torch.no_grad():
        queries = {
            "devise": module(torch.from_numpy(cache.features).to(device)).cpu().numpy(),
            "conse": conse_embed(torch.from_numpy(conse_probs), class_vectors,
                                 top_t).numpy(),
        }
        zero_queries = {
            "devise": queries["devise"],
            "conse": conse_embed(torch.from_numpy(zero_probs), class_vectors, top_t).numpy(),
        }
    index = space.noun_space.index(backend=backend)  # only the synsets with a vector
    zero_excludes = []
    for row in range(len(truth)):
        exclude = space.imagenet_rows
        if int(truth[row]) in imagenet_set:
            exclude = exclude[exclude != truth[row]]
        zero_excludes.append(exclude)

    exact = [{int(t)} for t in truth]
    results: dict[str, dict[str, dict[int, float]]] = {}
    rankings: dict[str, dict[str, np.ndarray]] = {}
    for method in METHODS:
        _, flat = index.search(queries[method], kmax)
        zero = _search_each(index, zero_queries[method], kmax, zero_excludes)
        rankings[method] = {"flat": flat, "zero_shot": zero}
        results[method] = {
            "flat": hits_at_k(flat, exact, ks),
            "zero_shot": hits_at_k(zero, exact, ks),
            "hierarchical": hits_at_k(flat, neighbourhoods, ks),
            "zero_shot_hierarchical": hits_at_k(zero, neighbourhoods, ks),
        }
    classifier_ranked = space.imagenet_rows[np.argsort(-probs, axis=1, kind="stable")[:, :kmax]]
    reference = {"flat": hits_at_k(classifier_ranked, exact, ks),
                 "hierarchical": hits_at_k(classifier_ranked, neighbourhoods, ks)}
    # the photos whose label no ImageNet class is: what "zero-shot" means to a user
    outside = [row for row in range(len(truth)) if int(truth[row]) not in imagenet_set]
    ranked_by = {**{m: rankings[m]["flat"] for m in METHODS}, "classifier": classifier_ranked}
    outside_results = {
        who: {"flat": hits_at_k(ranked[outside], [exact[r] for r in outside], ks),
              "hierarchical": hits_at_k(ranked[outside], [neighbourhoods[r] for r in outside],
                                        ks)}
        for who, ranked in ranked_by.items()} if outside else {}

    scores = {m: mean_score(results[m]) for m in METHODS}
    better = max(METHODS, key=lambda m: scores[m])

    def names(ids: Iterable[int], n: int = 5) -> list[str]:
        return [f"{vocab.synsets[int(i)].names[0]} ({vocab.synsets[int(i)].wnid})"
                for i in list(ids)[:n] if int(i) >= 0]

    per_image = []
    for row, path in enumerate(evalset.files):
        per_image.append({
            "file": path.name, "wnid": evalset.wnids[row], "lemma": evalset.lemmas[row],
            "masked_imagenet_classes": len(masks[row]),
            "classifier_top3": names(classifier_ranked[row], 3),
            **{f"{m}_{v}": names(rankings[m][v][row]) for m in METHODS
               for v in ("flat", "zero_shot")},
        })
    from training.evalsets.build_photos import labels_digest

    return {
        "eval_set": {"path": _display(evalset.folder), "photos": len(evalset.files),
                     "labels_sha256": labels_digest(evalset.folder / LABELS_FILE),
                     "imagenet_labelled": int(sum(int(t) in imagenet_set for t in truth)),
                     "labels_without_vector": int((~space.covered[truth]).sum())},
        "model": {"path": _display(model_dir), "name": config.get("name"),
                  "version": config.get("version"), "space": config.get("space"),
                  "noun_vectors": space.source.get("cache_file") or space.name},
        "word_space": {"name": space.name, "source": describe_source(space.source),
                       "coverage": space.coverage.as_dict()},
        "candidates": len(index), "top_t": top_t, "k": list(ks), "hops": hops,
        "backend": backend,
        "results": {m: {v: {str(k): r for k, r in results[m][v].items()} for v in VARIANTS}
                    for m in METHODS},
        "reference_classifier": {v: {str(k): r for k, r in reference[v].items()}
                                 for v in reference},
        "labels_outside_imagenet": {
            "photos": len(outside),
            "results": {who: {v: {str(k): r for k, r in rows[v].items()} for v in rows}
                        for who, rows in outside_results.items()}},
        "mean_hit": scores, "better": better,
        "protocol": {
            "flat": "every synset with a vector (all 82,115 with MiniLM) is a candidate; "
                    "exact synset",
            "zero_shot": "ImageNet-1k classes in the label's hyponym closure zeroed in the "
                         "classifier's probabilities before ConSE's top-T; candidates for "
                         "both methods exclude the 1000 ImageNet synsets (the label itself "
                         "stays a candidate); DeViSE's map is unchanged",
            "hierarchical": f"flat candidates; a hit is any synset within {hops} "
                            "hypernym/hyponym hops of the label",
        },
        "per_image": per_image,
    }


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def markdown_table(report: Mapping[str, Any]) -> str:
    """The hit@k table (methods x variants), with the classifier reference rows."""
    ks = report["k"]
    header = "| method | variant | " + " | ".join(f"hit@{k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (len(ks) + 2)]
    for method in METHODS:
        for variant in VARIANTS:
            row = report["results"][method][variant]
            lines.append(f"| {method} | {variant.replace('_', '-')} | "
                         + " | ".join(f"{row[str(k)]:.2f}" for k in ks) + " |")
    for variant, row in report["reference_classifier"].items():
        lines.append(f"| classifier (1k only) | {variant} | "
                     + " | ".join(f"{row[str(k)]:.2f}" for k in ks) + " |")
    outside = report.get("labels_outside_imagenet", {})
    for who, rows in outside.get("results", {}).items():
        for variant, row in rows.items():
            lines.append(f"| {who} | {variant}, the {outside['photos']} labels outside "
                         "ImageNet | " + " | ".join(f"{row[str(k)]:.2f}" for k in ks) + " |")
    return "\n".join(lines)


#: Keys every report of :func:`evaluate` holds: an existing --out file without them is not
#: an earlier report, and is never replaced.
REPORT_KEYS = ("eval_set", "results", "mean_hit")
#: ConSE's T combines at most every ImageNet class.
MAX_TOP_T = 1000


def check_report_path(out: Path, keys: Sequence[str], flag: str = "--out") -> None:
    """ValueError before the evaluation runs when the report ``out`` could not be written,
    is a folder, or is a file other than an earlier report (one with ``keys``), such as an
    artifact's metrics.json."""
    from training.data.folders import check_folder_to_make

    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give the report's file name "
                         f"({out / 'metrics.json'})")
    check_folder_to_make(out.parent, flag, out)
    if out.exists() or out.is_symlink():
        try:
            held = json.loads(out.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{flag} {out} exists and is not an earlier report "
                             f"({error}); choose another file") from error
        if not (isinstance(held, dict) and all(key in held for key in keys)):
            raise ValueError(f"{flag} {out} exists and is not an earlier report of this "
                             "command (an artifact's metrics.json?); choose another file")


def check_inputs(args: argparse.Namespace) -> None:
    """Before anything loads: the numbers, the artifact, the photos, the word-vector file
    and the report path."""
    check_flag_minimums(args, {"top_t": 1, "hops": 0, "show": 0, "threads": 0})
    if min(args.k) < 1:
        raise ValueError(f"--k must be >= 1, got {' '.join(map(str, args.k))}")
    if args.top_t is not None and args.top_t > MAX_TOP_T:
        raise ValueError(f"--top-t must be <= {MAX_TOP_T} (the ImageNet classes), got "
                         f"{args.top_t}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json there (not an artifact)")
    if not (Path(args.photos) / LABELS_FILE).is_file():
        raise EvalSetError(f"--photos {args.photos}: {LABELS_FILE} not found")
    word_vectors = getattr(args, "word_vectors", None)
    if word_vectors and not Path(word_vectors).is_file():
        raise FileNotFoundError(f"word-vector file not found: {word_vectors}")
    check_report_path(Path(args.out), REPORT_KEYS)
    if args.cache_dir:
        from training.data.folders import check_folder_to_make

        check_folder_to_make(Path(args.cache_dir), "--cache-dir")
    model_config = Path(args.model) / "config.json"
    if model_config.is_file():
        task = json.loads(model_config.read_text()).get("task")
        if task != "devise":
            raise ValueError(f"--model {args.model} is a {task} artifact, not a DeViSE map")


def command(args: argparse.Namespace) -> int:
    """``percept eval devise``."""
    from training.assets import AssetMissingError

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    started = time.perf_counter()
    try:
        check_inputs(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        report = evaluate(Path(args.model), Path(args.photos), top_t=args.top_t, ks=args.k,
                          hops=args.hops, backend=args.backend,
                          cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                          device=device, word_vectors=getattr(args, "word_vectors", None),
                          word_vectors_format=getattr(args, "word_vectors_format", "auto"))
    except (EvalSetError, AssetMissingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")
    if args.show:
        for item in report["per_image"]:
            print(f"{item['file']:32s} {item['lemma']:22s} devise: "
                  f"{', '.join(n.split(' (')[0] for n in item['devise_flat'][:args.show])} | "
                  f"conse: {', '.join(n.split(' (')[0] for n in item['conse_flat'][:args.show])}")
    print()
    print(f"{report['eval_set']['photos']} photos, {report['candidates']} candidate synsets "
          f"({report['word_space']['source']}), ConSE T={report['top_t']}, hierarchical = "
          f"within {report['hops']} hops")
    print()
    print(markdown_table(report))
    print()
    scores = report["mean_hit"]
    print(f"better: {report['better']} (mean hit@k over flat, zero-shot, hierarchical: "
          + ", ".join(f"{m} {scores[m]:.3f}" for m in METHODS) + f"); report {out}")
    if args.update_metrics:
        update_metrics(Path(args.model), {"eval_photos": {
            "eval_set": report["eval_set"], "top_t": report["top_t"],
            "results": report["results"],
            "reference_classifier": report["reference_classifier"],
            "labels_outside_imagenet": report["labels_outside_imagenet"],
            "mean_hit": scores, "better": report["better"]}})
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``devise`` to the ``percept eval`` subparsers (see training.cli_devise)."""
    from training.cli_devise import register_eval

    return register_eval(subparsers)
