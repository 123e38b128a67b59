"""``percept train devise``: trains DeViSE's linear map from image features into word space.

Frome et al. 2013, "DeViSE: A Deep Visual-Semantic Embedding Model" (NIPS), sec. 3.3: the
softmax layer of a pretrained ImageNet CNN is replaced by a linear map M
(:class:`training.nets.devise.DeViSEMap`) from its penultimate features v(x) into the word
space, trained with the hinge rank loss (eq. 1)

    loss(x, label) = sum_{j != label} max(0, margin - t_label . M v(x) + t_j . M v(x))

where t are the unit label vectors and M v(x) is unit-normalised here, so the dot products
are cosine similarities. As in the paper, the sum runs over a random sample of wrong labels
(``--negatives``, drawn from the 1000 ImageNet class vectors or from all 82,115 nouns). The
backbone (EfficientNet-Lite0) stays frozen, so its features are computed once and cached
(:mod:`training.devise_features`), and training is a few hundred Adam steps on a 1280x384
matrix.

Two kinds of labels:

- ``--images DIR``: an ImageFolder tree whose subfolders are wnids (``n02084071``) or noun
  lemmas (``golden_retriever``), resolved through the WordNet vocabulary
  (:func:`parse_image_folder`); the label's noun vector is the target.
- default: the training photos (``data/photos/train``; never the held-out ones, never the
  evaluation photos), cut into random crops, with the backbone's own 1000-way classifier as
  the teacher. Each crop's target is the word vector of the classifier's **top-1** class.
  Why top-1 and not the probability-weighted mean of the top-k: the hinge rank loss ranks
  one correct label above wrong ones (a label vector that is a mixture is not any label and
  cannot be "ranked"), and the probability-weighted mean of the top-k label vectors *is*
  ConSE's embedding, so training on it would only distil ConSE into a linear map instead of
  giving the DeViSE method the paper describes, its own results to compare against ConSE.

With 23 photos the teacher names only a few dozen classes, so a map learnt from scratch
sees a tiny part of the label space. ``--init classifier`` (the default) therefore starts M
at the classifier's own linear read-out into word space, M0 v = sum_c (l_c(v) - mean_c l(v))
t_c with l = W_fc v + b_fc (the logit-weighted sum of the 1000 class vectors; centring the
logits removes the component shared by every class), and the hinge rank loss then adjusts
it; ``--init random`` is the paper's setting. ``--weight-decay`` pulls M back towards M0.

The word space is the MiniLM noun vectors by default, or with ``--word-vectors PATH`` a
word2vec / GloVe / fastText ``.vec`` file (:func:`services.embed.word_vectors.load_noun_space`;
format read from the file or ``--word-vectors-format``). Its coverage (synsets with a
vector, overall and of the 1000 ImageNet classes) is printed; crops whose label has no
vector are left out, and negatives are drawn from labels that have one.

Outputs: ``models/NAME/`` (:func:`training.export.export_artifact`: fp16 weights,
config.json with ``"task": "devise"``, the word space, the backbone and the vector source
under ``"noun_vectors"``: the recipe and encoder for MiniLM, or the file's path, sha256,
format, dimension and coverage, which the Embedding service and ``percept eval devise``
check before they use the map; metrics.json, provenance.json) and ``runs/NAME/``
(loss.png, history.json). NAME defaults to ``devise-minilm``, or ``devise-<file stem>``
with ``--word-vectors``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from training.assets import REPO_ROOT, efficientnet_lite0_weights_path
from training.data.folders import check_folder_to_make
from training.data.images import is_image_file
from training.devise_features import BACKBONE_NAME, FeatureCache, compute_features
from training.export import (
    NonFiniteWeights,
    check_output_folder,
    command_line,
    data_entry,
    export_artifact,
)
from training.loop import TrainingDiverged, check_flag_minimums, choose_device, finite_weights
from training.nets.devise import DeViSEMap
from training.nets.efficientnet_lite import HEAD_CHANNELS, load_efficientnet_lite0

if TYPE_CHECKING:  # the services import stays lazy at run time
    from services.embed.word_vectors import Coverage, NounSpace
    from services.embed.wordnet import NounVocabulary

TASK = "devise"
ARCHITECTURE_TYPE = "devise-linear"
_WNID = re.compile(r"^n\d{8}$")


class ImageFolderError(ValueError):
    """An ImageFolder tree that cannot be used; the message says why (e.g. which names are
    not WordNet nouns)."""


# -- labels ---------------------------------------------------------------------------------
def lemma_lookup(vocab: NounVocabulary) -> dict[str, list[int]]:
    """Case-folded lemma (underscores for spaces) -> the synsets it names, in file order."""
    lookup: dict[str, list[int]] = {}
    for index, synset in enumerate(vocab.synsets):
        for lemma in synset.lemmas:
            rows = lookup.setdefault(lemma.lower(), [])
            if not rows or rows[-1] != index:
                rows.append(index)
    return lookup


def resolve_class_name(name: str, vocab: NounVocabulary, lookup: dict[str, list[int]],
                       preferred: Iterable[str] = ()) -> tuple[str, list[str]] | None:
    """The wnid an ImageFolder class folder names, and the other senses it could mean.

    ``n02084071`` must be a noun synset of the vocabulary. A lemma (``golden_retriever``,
    ``Golden Retriever``; case-insensitive, spaces or dashes as underscores) picks among its
    senses, in order: one of ``preferred`` (the ImageNet classes), a synset whose first
    lemma it is (its head word), then the first in WordNet's file order. None: unknown.
    """
    if _WNID.match(name):
        return (name, []) if name in vocab else None
    key = re.sub(r"[\s]+", "_", name.strip()).lower()
    rows = lookup.get(key) or lookup.get(key.replace("-", "_"))
    if not rows:
        return None
    wnids = [vocab.synsets[r].wnid for r in rows]
    chosen_set = set(preferred)
    chosen = next((w for w in wnids if w in chosen_set), None)
    if chosen is None:
        chosen = next((vocab.synsets[r].wnid for r in rows
                       if vocab.synsets[r].lemmas[0].lower() == key), wnids[0])
    return chosen, [w for w in wnids if w != chosen]


@dataclass(frozen=True)
class LabelledImages:
    """An ImageFolder tree: every image with the wnid of its class folder."""

    root: Path
    paths: list[Path]
    wnids: list[str]
    classes: dict[str, str]  # folder name -> wnid
    ambiguous: dict[str, list[str]]  # folder name -> the other senses of its lemma


def parse_image_folder(root: Path, vocab: NounVocabulary,
                       preferred: Iterable[str] = ()) -> LabelledImages:
    """Reads ``root/<class>/**/<image>``; ``<class>`` is a wnid or a noun lemma.

    Raises :class:`ImageFolderError` listing every folder name that is not a WordNet noun,
    and when there are no class folders or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"--images {root}: not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ImageFolderError(f"--images {root}: no class subfolders (expected "
                               "ROOT/<wnid or lemma>/<images>)")
    lookup = lemma_lookup(vocab)
    preferred = list(preferred)
    classes: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    unknown: list[str] = []
    for folder in folders:
        resolved = resolve_class_name(folder.name, vocab, lookup, preferred)
        if resolved is None:
            unknown.append(folder.name)
            continue
        classes[folder.name], others = resolved
        if others:
            ambiguous[folder.name] = others
    if unknown:
        raise ImageFolderError(
            f"--images {root}: {len(unknown)} class folder(s) are not WordNet 3.0 nouns "
            f"(neither a noun wnid like n02084071 nor a noun lemma like golden_retriever): "
            + ", ".join(unknown))
    paths: list[Path] = []
    wnids: list[str] = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        paths.extend(files)
        wnids.extend([classes[folder.name]] * len(files))
    if not paths:
        raise ImageFolderError(f"--images {root}: the class folders hold no images")
    return LabelledImages(root, paths, wnids, classes, ambiguous)


# -- word space -----------------------------------------------------------------------------
@dataclass
class WordSpace:
    """Unit noun vectors for every synset (row i = synset i; zero rows where ``covered`` is
    False), the rows of the ImageNet classes, and where the vectors came from."""

    vocab: NounVocabulary
    vectors: np.ndarray  # (82115, D) float32, unit rows where covered
    covered: np.ndarray  # (82115,) bool
    imagenet_rows: np.ndarray  # (1000,) int64, vocabulary rows in classifier output order
    coverage: Coverage
    source: dict[str, Any]  # services.embed.word_vectors.NounSpace.source
    paths: list[Path]  # the files the vectors came from
    noun_space: NounSpace

    @property
    def name(self) -> str:
        """``sentence-transformers/all-MiniLM-L6-v2`` or ``word-vectors:FILE@SHA12``."""
        from services.embed.word_vectors import space_name

        return space_name(self.source)

    @property
    def imagenet_covered(self) -> np.ndarray:
        """(1000,) bool: which ImageNet classes have a vector."""
        return self.covered[self.imagenet_rows]

    def describe(self) -> dict[str, Any]:
        """The ``"noun_vectors"`` block of config.json: the vector source (for a word-vector
        file its path, sha256, format, dimension) and its coverage."""
        return {**self.source, "synsets": int(self.vectors.shape[0]),
                "wordnet_data_noun_sha256": self.vocab.sha256,
                "coverage": self.coverage.as_dict()}

    def files(self) -> list[Path]:
        """The files the vectors came from (cached KeyedVectors, or the word-vector file)."""
        return list(self.paths)


def load_word_space(recipe: str | None = None, vectors_dir: Path | None = None,
                    progress: bool = True, word_vectors: Path | str | None = None,
                    word_vectors_format: str = "auto") -> WordSpace:
    """The WordNet vocabulary and its noun vectors: MiniLM (from the cache, or built once)
    or, with ``word_vectors``, a word2vec/GloVe/fastText file (its coverage is printed)."""
    from services.embed import word_vectors as wv
    from services.embed.wordnet import imagenet_indices, load_vocabulary

    vocab = load_vocabulary()
    space = wv.load_noun_space(vocab, word_vectors, word_vectors_format, cache_dir=vectors_dir,
                               recipe_name=recipe or wv.DEFAULT_RECIPE, progress=progress,
                               log=lambda line: print(f"[devise] {line}", flush=True))
    return WordSpace(vocab=vocab, vectors=space.matrix, covered=space.covered,
                     imagenet_rows=imagenet_indices(vocab), coverage=space.coverage,
                     source=space.source, paths=space.files, noun_space=space)


def teacher_targets(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 ImageNet class (N,) int64, its softmax probability (N,) float32)."""
    logits64 = logits.astype(np.float64)
    shifted = logits64 - logits64.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return top.astype(np.int64), probs[np.arange(len(top)), top].astype(np.float32)


# -- loss -----------------------------------------------------------------------------------
def hinge_rank_loss(embedded: Tensor, positive: Tensor, negatives: Tensor, margin: float,
                    mask: Tensor | None = None) -> Tensor:
    """DeViSE's hinge rank loss (Frome et al. 2013, eq. 1), averaged over the batch:

        mean_i sum_j max(0, margin - t_label(i) . e_i + t_j . e_i)

    ``embedded`` e: (B, D) (the map's output); ``positive``: (B, D) label vectors;
    ``negatives``: (B, K, D) wrong-label vectors; ``mask`` (B, K) bool drops negatives
    (e.g. a sample that drew the true label).
    """
    if embedded.shape != positive.shape or negatives.dim() != 3 \
            or negatives.shape[0] != embedded.shape[0] or negatives.shape[2] != embedded.shape[1]:
        raise ValueError(f"shapes do not match: embedded {tuple(embedded.shape)}, positive "
                         f"{tuple(positive.shape)}, negatives {tuple(negatives.shape)}")
    positive_score = (embedded * positive).sum(dim=1, keepdim=True)  # (B, 1)
    negative_score = torch.einsum("bd,bkd->bk", embedded, negatives)  # (B, K)
    violation = F.relu(margin - positive_score + negative_score)
    if mask is not None:
        violation = violation * mask.to(violation.dtype)
    return violation.sum(dim=1).mean()


def sample_negatives(targets: Tensor, pool: Tensor, count: int,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``count`` label rows per example drawn uniformly (with replacement) from ``pool``,
    and a mask that is False where a draw hit the example's own label."""
    picks = torch.randint(0, len(pool), (len(targets), count), generator=generator,
                          device=pool.device)
    rows = pool[picks]
    return rows, rows != targets[:, None]


# -- training -------------------------------------------------------------------------------
def classifier_init(module: DeViSEMap, fc_weight: Tensor, fc_bias: Tensor,
                    class_vectors: Tensor, features: Tensor | None = None) -> None:
    """Sets M0 v = s * sum_c (l_c(v) - mean_c l(v)) t_c with l = W_fc v + b_fc, i.e.
    weight = s T^T (W_fc - mean_c W_fc), bias = s T^T (b_fc - mean b_fc); ``s`` scales the
    mean output norm over ``features`` to 1 (the output is normalised anyway; the scale
    only sets how far an Adam step moves it)."""
    weight = class_vectors.T @ (fc_weight - fc_weight.mean(dim=0, keepdim=True))
    bias = class_vectors.T @ (fc_bias - fc_bias.mean())
    scale = 1.0
    if features is not None and len(features):
        scale = 1.0 / float((features @ weight.T + bias).norm(dim=1).mean().clamp_min(1e-12))
    with torch.no_grad():
        module.linear.weight.copy_(weight * scale)
        if module.linear.bias is not None:
            module.linear.bias.copy_(bias * scale)


@dataclass
class TrainSettings:
    margin: float = 0.1
    negatives: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def train_map(module: DeViSEMap, features: Tensor, targets: Tensor, label_vectors: Tensor,
              negative_pool: Tensor, settings: TrainSettings, progress: bool = True,
              ) -> list[float]:
    """Adam on the hinge rank loss; returns the loss of every step.

    ``features`` (N, F); ``targets`` (N,) rows of ``label_vectors`` (L, D);
    ``negative_pool`` the rows negatives are drawn from. Minibatches are drawn without
    replacement within an epoch (reshuffled each epoch). ``weight_decay`` adds
    ``wd * ||W - W0||^2`` (a pull towards the initial map).
    """
    if len(features) != len(targets) or len(features) == 0:
        raise ValueError("features and targets must be non-empty and the same length")
    generator = torch.Generator(device=features.device).manual_seed(settings.seed)
    optimiser = torch.optim.Adam(module.parameters(), lr=settings.lr)
    initial = [p.detach().clone() for p in module.parameters()]
    history: list[float] = []
    order = torch.randperm(len(features), generator=generator, device=features.device)
    cursor = 0
    batch = min(settings.batch_size, len(features))
    module.train()
    with tqdm(range(settings.steps), desc="devise", unit="step", disable=not progress) as bar:
        for _ in bar:
            if cursor + batch > len(order):
                order = torch.randperm(len(features), generator=generator,
                                       device=features.device)
                cursor = 0
            rows = order[cursor:cursor + batch]
            cursor += batch
            label_rows = targets[rows]
            negative_rows, mask = sample_negatives(label_rows, negative_pool,
                                                   settings.negatives, generator)
            embedded = module(features[rows])
            loss = hinge_rank_loss(embedded, label_vectors[label_rows],
                                   label_vectors[negative_rows], settings.margin, mask)
            total = loss
            if settings.weight_decay > 0:
                total = total + settings.weight_decay * sum(
                    ((p - p0) ** 2).sum() for p, p0 in zip(module.parameters(), initial,
                                                         strict=True))
            value = float(total.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the hinge rank loss is {value} at step {len(history) + 1}: the run "
                    "diverged, so nothing is exported; lower --lr and start again")
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            try:
                optimiser.step()
            except RuntimeError as error:  # e.g. a step size beyond float32 (a huge --lr)
                raise TrainingDiverged(f"the Adam step failed at step {len(history) + 1} "
                                       f"({error}): nothing is exported; lower --lr and "
                                       "start again") from error
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    module.eval()
    if not finite_weights(module):
        raise TrainingDiverged(f"the map's weights hold NaN or infinite values after "
                               f"{settings.steps} steps: the run diverged, so nothing is "
                               "exported; lower --lr and start again")
    return history


@torch.no_grad()
def teacher_agreement(module: DeViSEMap, features: Tensor, logits: np.ndarray,
                      class_vectors: Tensor, allowed: Tensor | None = None) -> dict[str, float]:
    """How often the map's nearest ImageNet class vector is the classifier's top-1 class
    (``top1``), and lies in the classifier's top-5 (``in_top5``). ``allowed`` (1000,) bool:
    the classes that have a vector (the others are never the nearest)."""
    if len(features) == 0:
        return {"top1": float("nan"), "in_top5": float("nan")}
    scores = module(features) @ class_vectors.T
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    nearest = scores.argmax(dim=1).cpu().numpy()
    order = np.argsort(-logits, axis=1)
    return {"top1": float(np.mean(nearest == order[:, 0])),
            "in_top5": float(np.mean([n in row[:5] for n, row in zip(nearest, order,
                                                                    strict=True)]))}


def _photo_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found; run `percept data photos`")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise FileNotFoundError(f"no photos in {folder}; run `percept data photos`")
    return files


def check_training_photos(paths: Sequence[Path]) -> None:
    """Refuses held-out and evaluation photos as training data."""
    from training.data.heldout import check_not_held_out

    evalsets = (REPO_ROOT / "training" / "evalsets").resolve()
    for path in paths:
        resolved = path.resolve()
        if "heldout" in resolved.parts or resolved.is_relative_to(evalsets):
            raise ValueError(f"{path} is a held-out/evaluation photo and is never trained on")
    check_not_held_out(paths)  # a copy under another name or folder


def _class_names() -> list[str]:
    from training.nets.efficientnet_lite import imagenet_labels

    return [names[0] for _, names in imagenet_labels()]


#: The least value of each numeric flag (``--steps 0`` exports the initial map, untrained).
FLAG_MINIMUMS = {
    **dict.fromkeys(("crops_per_image", "val_crops", "negatives", "batch_size", "top_t"), 1),
    **dict.fromkeys(("steps", "margin", "lr", "weight_decay", "threads", "seed"), 0),
}
#: ConSE's T combines at most every ImageNet class.
MAX_TOP_T = 1000


def _within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _check_held_out(val_files: list[Path], train_files: list[Path] | None,
                    images: Path | None) -> None:
    """ValueError when a validation photo is also trained on: the same file, or the same
    bytes under another name (for ``--photos``, by sha256), or a file inside ``--images``;
    its agreement would then be measured on training data."""
    from training.assets import sha256_of

    if images is not None:
        inside = [f for f in val_files if _within(f, images)]
        if inside:
            raise ValueError(f"--val-photos {inside[0]} is inside --images {images}: "
                             "validation photos must be held out")
        return
    trained = {sha256_of(f): f for f in train_files or []}
    shared = [(f, trained[digest]) for f in val_files if (digest := sha256_of(f)) in trained]
    if shared:
        val, train = shared[0]
        raise ValueError(f"--val-photos holds {len(shared)} of the training photos (--photos): "
                         f"{val} is {train}; validation photos must be held out")


def check_paths(args: argparse.Namespace, out: Path, run_dir: Path) -> None:
    """Before anything loads: ValueError / FileNotFoundError for an input that is not
    there (``--images``, ``--photos``, ``--val-photos``, ``--word-vectors``), and for outputs
    that cannot be written or would land in the data (``--run-dir`` or ``--out`` inside an
    input folder, where loss.png would become a training image) or in each other."""
    inputs: list[tuple[str, Path]] = []
    if args.images:
        images = Path(args.images)
        if not images.is_dir():
            raise ImageFolderError(f"--images {images}: not a directory")
        inputs.append(("--images", images))
    else:
        photos = Path(args.photos)
        check_training_photos(_photo_files(photos))
        inputs.append(("--photos", photos))
    if args.val_photos:
        val_files = _photo_files(Path(args.val_photos))
        inputs.append(("--val-photos", Path(args.val_photos)))
        _check_held_out(val_files, None if args.images else _photo_files(Path(args.photos)),
                        Path(args.images) if args.images else None)
    if args.vectors_dir:
        check_folder_to_make(Path(args.vectors_dir), "--vectors-dir")
    word_vectors = getattr(args, "word_vectors", None)
    if word_vectors and not Path(word_vectors).is_file():
        raise FileNotFoundError(f"word-vector file not found: {word_vectors}")
    check_folder_to_make(run_dir, "--run-dir")
    if args.cache_dir:
        check_folder_to_make(Path(args.cache_dir), "--cache-dir")
    if run_dir.resolve() == out.resolve():
        raise ValueError(f"--run-dir {run_dir} is the artifact folder --out {out}: the run's "
                         "logs (history.json) do not belong in an artifact; choose another")
    for flag, folder in (("--out", out), ("--run-dir", run_dir)):
        for source, data in inputs:
            if _within(folder, data):
                raise ValueError(f"{flag} {folder} is inside {source} {data}: what the run "
                                 "writes there would become training data; choose a folder "
                                 "outside it")


def train(args: argparse.Namespace) -> int:
    """Runs ``percept train devise`` with parsed flags."""
    check_flag_minimums(args, FLAG_MINIMUMS)  # before anything loads
    if args.top_t > MAX_TOP_T:
        raise ValueError(f"--top-t must be <= {MAX_TOP_T} (the ImageNet classes), got "
                         f"{args.top_t}")
    started = time.perf_counter()
    word_vectors = getattr(args, "word_vectors", None)
    name = args.name or default_name(word_vectors)
    out = Path(args.out) if args.out else REPO_ROOT / "models" / name
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    export_plan = check_output_folder(out, name)  # (needs no data, so it is said first)
    check_paths(args, out, run_dir)
    print(f"[devise] exports {export_plan}", flush=True)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.quiet
    cache_dir = Path(args.cache_dir) if args.cache_dir else None

    space = load_word_space(args.recipe, Path(args.vectors_dir) if args.vectors_dir else None,
                            progress=progress, word_vectors=word_vectors,
                            word_vectors_format=getattr(args, "word_vectors_format", "auto"))
    imagenet_wnids = [space.vocab.synsets[int(r)].wnid for r in space.imagenet_rows]
    data_entries: list[dict[str, Any]] = []
    if args.images:
        labelled = parse_image_folder(Path(args.images), space.vocab, preferred=imagenet_wnids)
        for name, others in sorted(labelled.ambiguous.items()):
            print(f"[devise] class {name!r} -> {labelled.classes[name]} "
                  f"({', '.join(space.vocab[labelled.classes[name]].names)}); other senses: "
                  f"{', '.join(others)} (name the folder by wnid to choose)", flush=True)
        images = labelled.paths
        image_rows = space.vocab.indices_of(labelled.wnids)
        mode = f"imagefolder:{labelled.root}"
        data_entries += [data_entry(p, kind="training image",
                                    wnid=labelled.wnids[i]) for i, p in enumerate(images)]
    else:
        images = _photo_files(Path(args.photos))
        check_training_photos(images)
        image_rows = None
        mode = "teacher-top1"
        data_entries += [data_entry(p, kind="training photo") for p in images]

    feature_start = time.perf_counter()
    cache = compute_features(images, crops_per_image=args.crops_per_image, seed=args.seed,
                             device=str(device), cache_dir=cache_dir, progress=progress,
                             desc="train crops")
    val: FeatureCache | None = None
    if args.val_photos:
        val_files = _photo_files(Path(args.val_photos))
        val = compute_features(val_files, crops_per_image=args.val_crops, seed=args.seed + 1,
                               device=str(device), cache_dir=cache_dir, progress=progress,
                               desc="val crops")
        data_entries += [data_entry(p, kind="validation photo (not trained on)")
                         for p in val_files]
    feature_seconds = time.perf_counter() - feature_start

    teacher_class, teacher_prob = teacher_targets(cache.logits)
    if image_rows is None:
        targets_np = space.imagenet_rows[teacher_class]
    else:
        targets_np = image_rows[cache.image_index]
    # Crops whose label has no vector in this space cannot be ranked: they are left out.
    keep = space.covered[targets_np]
    dropped = int((~keep).sum())
    if dropped:
        missing = sorted({space.vocab.synsets[int(r)].names[0] for r in targets_np[~keep]})
        print(f"[devise] {dropped} of {len(keep)} crops left out: their label has no vector "
              f"in these word vectors ({', '.join(missing[:10])}"
              f"{', ...' if len(missing) > 10 else ''})", flush=True)
    if not keep.any():
        raise ValueError("no training crop has a label with a vector in these word vectors "
                         f"({space.coverage})")
    targets_np = targets_np[keep]
    train_features, train_logits = cache.features[keep], cache.logits[keep]
    label_vectors = torch.from_numpy(space.vectors).to(device)
    class_vectors = label_vectors[torch.from_numpy(space.imagenet_rows).to(device)]
    class_allowed = torch.from_numpy(space.imagenet_covered).to(device)
    pool_rows = (space.imagenet_rows[space.imagenet_covered] if args.negatives_from == "imagenet"
                 else np.flatnonzero(space.covered))
    pool = torch.from_numpy(np.asarray(pool_rows, dtype=np.int64)).to(device)
    features = torch.from_numpy(train_features).to(device)
    targets = torch.from_numpy(np.asarray(targets_np, dtype=np.int64)).to(device)

    architecture = {"type": ARCHITECTURE_TYPE, "in_features": HEAD_CHANNELS,
                    "out_features": int(space.vectors.shape[1])}
    module = DeViSEMap(HEAD_CHANNELS, int(space.vectors.shape[1])).to(device)
    if args.init == "classifier":
        backbone = load_efficientnet_lite0("cpu")
        classifier_init(module, backbone._fc.weight.detach().to(device),
                        backbone._fc.bias.detach().to(device), class_vectors, features)
    settings = TrainSettings(margin=args.margin, negatives=args.negatives, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed)
    before_train = teacher_agreement(module, features, train_logits, class_vectors,
                                     class_allowed)
    before_val = (teacher_agreement(module, torch.from_numpy(val.features).to(device),
                                    val.logits, class_vectors, class_allowed)
                  if val is not None else None)
    train_start = time.perf_counter()
    history = train_map(module, features, targets, label_vectors, pool, settings,
                        progress=progress)
    train_seconds = time.perf_counter() - train_start
    after_train = teacher_agreement(module, features, train_logits, class_vectors,
                                    class_allowed)
    after_val = (teacher_agreement(module, torch.from_numpy(val.features).to(device),
                                   val.logits, class_vectors, class_allowed)
                 if val is not None else None)

    from training.plots import save_loss_plot

    run_dir.mkdir(parents=True, exist_ok=True)
    save_loss_plot({"hinge rank loss": history}, run_dir / "loss.png",
                   title=f"DeViSE hinge rank loss (margin {args.margin}, "
                         f"{args.negatives} negatives)")
    (run_dir / "history.json").write_text(json.dumps({"loss": history}) + "\n")

    names = _class_names()
    tail = max(1, len(history) // 10)
    classes = Counter(int(c) for c in teacher_class)
    metrics: dict[str, Any] = {
        "mode": mode, "images": len(images), "crops": len(targets_np),
        "crops_without_vector": dropped, "word_space": space.name,
        "coverage": space.coverage.as_dict(),
        "crops_per_image": args.crops_per_image, "steps": args.steps,
        "batch_size": settings.batch_size, "lr": args.lr, "margin": args.margin,
        "negatives": args.negatives, "negatives_from": args.negatives_from,
        "init": args.init, "weight_decay": args.weight_decay, "seed": args.seed,
        "loss_first": float(np.mean(history[:tail])) if history else None,
        "loss_last": float(np.mean(history[-tail:])) if history else None,
        "teacher_agreement_train": {"before": before_train, "after": after_train},
        "teacher_agreement_val": ({"before": before_val, "after": after_val}
                                  if val is not None else None),
        "val_crops": len(val) if val is not None else 0,
        "distinct_targets": len(set(targets_np.tolist())),
        "teacher_mean_top1_probability": float(teacher_prob.mean()),
        "teacher_top_classes": [{"class": names[c], "crops": n}
                                for c, n in classes.most_common(15)],
        "feature_seconds": round(feature_seconds, 1), "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": str(device), "threads": torch.get_num_threads(),
        "feature_cache": cache.key,
    }
    if word_vectors:  # its sha256 is already known (hashing a 3.6 GB file twice is slow)
        data_entries.append({"path": space.source["path"], "sha256": space.source["sha256"],
                             "kind": "word vectors", "format": space.source["format"]})
    else:
        data_entries += [data_entry(p, kind="noun vectors") for p in space.files()]
    if space.vocab.source is not None:
        data_entries.append(data_entry(space.vocab.source, kind="WordNet 3.0 data.noun"))
    data_entries.append(data_entry(efficientnet_lite0_weights_path(), kind="backbone weights"))
    config_extra = {
        "space": space.name, "backbone": BACKBONE_NAME,
        "backbone_sha256": data_entries[-1]["sha256"], "input_size": 224,
        "noun_vectors": space.describe(), "default_method": args.default_method,
        "methods": {"devise": {"normalised": True},
                    "conse": {"top_t": args.top_t}},
        "training": {"mode": mode, "target": "teacher top-1 class vector"
                     if image_rows is None else "ImageFolder label vector",
                     "loss": "hinge rank (Frome et al. 2013, eq. 1)", "init": args.init},
    }
    export_artifact(out, name=name, task=TASK, architecture=architecture,
                    module=module.cpu(), metrics=metrics, data=data_entries,
                    command=getattr(args, "command_line", None) or command_line(),
                    device=str(device), config_extra=config_extra)
    shutil.copyfile(run_dir / "loss.png", out / "loss.png")
    losses = (f"loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}" if history
              else "no training (the initial map)")
    print(f"[devise] {len(targets_np)} crops of {len(images)} images, {args.steps} steps: "
          f"{losses}; teacher agreement "
          f"train {after_train['top1']:.2f}"
          + (f", val {after_val['top1']:.2f} (top-5 {after_val['in_top5']:.2f})"
             if after_val is not None else "")
          + f"; {metrics['wall_seconds']:.0f} s; artifact {out}", flush=True)
    return 0


def default_name(word_vectors: Path | str | None) -> str:
    """``devise-minilm``, or ``devise-<file stem>`` for a word-vector file (``glove.6B.50d.txt``
    -> ``devise-glove-6b-50d``), so a map for other vectors never overwrites the default."""
    from training.cli_devise import DEFAULT_NAME

    if not word_vectors:
        return DEFAULT_NAME
    stem = Path(word_vectors).name
    for suffix in (".gz", ".bz2", ".txt", ".vec", ".bin"):
        stem = stem.removesuffix(suffix)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return f"devise-{slug or 'word-vectors'}"


def command(args: argparse.Namespace) -> int:
    """``percept train devise``."""
    from training.assets import AssetMissingError

    try:
        return train(args)
    except (TrainingDiverged, NonFiniteWeights) as error:  # a failed run, not a usage error
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except (ImageFolderError, AssetMissingError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\n[devise] stopped: nothing was exported", file=sys.stderr, flush=True)
        return 130


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``devise`` to the ``percept train`` subparsers (see training.cli_devise)."""
    from training.cli_devise import register_train

    return register_train(subparsers)
