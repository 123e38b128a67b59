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

The run folder (``--run-dir``, default ``runs/NAME``) gets a checkpoint every
``--checkpoint-every`` steps, at the end, and when Ctrl-C or SIGTERM stops the run (exit 130 /
143, nothing exported); ``--resume`` continues it bit for bit (:class:`MapTraining` holds
the map, Adam's moments, the generator of the batches and negatives, the shuffled order and
its cursor, the initial map, the losses), and refuses other flags or other data (the
feature-cache keys of the photos, the word vectors' sha256, the labels), as the other
trainers do (:mod:`training.loop`). A photo that cannot be decoded is refused before any
model loads.

Outputs: ``models/NAME/`` (:func:`training.export.export_artifact`: fp16 weights,
config.json with ``"task": "devise"``, the word space, the backbone and the vector source
under ``"noun_vectors"``: the recipe and encoder for MiniLM, or the file's path, sha256,
format, dimension and coverage, which the Embedding service and ``percept eval devise``
check before they use the map; metrics.json, provenance.json) and ``runs/NAME/``
(checkpoint.pt, loss.png, history.json). NAME defaults to ``devise-minilm``, or
``devise-<file stem>`` with ``--word-vectors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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
from training.devise_features import (
    BACKBONE_NAME,
    FeatureCache,
    FeaturePlan,
    ImageReadError,
    check_decodable,
    compute_features,
    plan_features,
)
from training.export import (
    NonFiniteWeights,
    check_output_folder,
    command_line,
    data_entry,
    export_artifact,
    next_version,
)
from training.loop import (
    CHECKPOINT_NAME,
    FINISHED_FIRST,
    RESUMABLE_FLAGS,
    STOPPING,
    CheckpointError,
    TrainingDiverged,
    carry_resumed_flags,
    check_flag_minimums,
    check_new_run,
    check_resumed_run,
    check_seed,
    choose_device,
    earlier_commands,
    finite_weights,
    read_checkpoint,
    recorded_flags,
    resuming,
    save_finite_checkpoint,
    stop_requests,
    stopped_note,
    working_dir,
)
from training.nets.devise import DeViSEMap
from training.nets.efficientnet_lite import HEAD_CHANNELS, load_efficientnet_lite0
from training.plots import save_loss_plot

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


def class_folders(root: Path) -> list[Path]:
    """The class folders of an ImageFolder tree: its subfolders, hidden ones left out."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_images(folder: Path) -> list[Path]:
    """The images anywhere under one class folder, in a fixed order."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def parse_image_folder(root: Path, vocab: NounVocabulary,
                       preferred: Iterable[str] = ()) -> LabelledImages:
    """Reads ``root/<class>/**/<image>``; ``<class>`` is a wnid or a noun lemma.

    Raises :class:`ImageFolderError` listing every folder name that is not a WordNet noun,
    and when there are no class folders or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"--images {root}: not a directory")
    folders = class_folders(root)
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
        files = folder_images(folder)
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
    and a mask that is False where a draw hit the example's own label. The draws come from
    ``generator`` on its own device (the default one: the CPU) and move to ``pool``'s."""
    picks = torch.randint(0, len(pool), (len(targets), count), generator=generator,
                          device=generator.device if generator is not None else None
                          ).to(pool.device)
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


#: What to do about a diverged run (not --resume: it may not change --lr, and with the same
#: rate it diverges the same way; loop.START_AGAIN names loss weights this trainer has not).
START_AGAIN = ("lower --lr (or --weight-decay), and start again in another --run-dir (or "
               "delete the checkpoint this one holds, if the run saved one)")


@dataclass
class TrainSettings:
    margin: float = 0.1
    negatives: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


class MapTraining:
    """Adam on the hinge rank loss, one step at a time, holding everything a checkpoint needs
    for a resumed run to go on bit for bit as if it had never stopped: the map, Adam's
    moments, the generator that shuffles the crops and draws the negatives, the shuffled
    order and its cursor, the initial map M0 (``weight_decay`` adds ``wd * ||W - W0||^2``,
    a pull towards it) and the loss of every step.

    ``features`` (N, F); ``targets`` (N,) rows of ``label_vectors`` (L, D);
    ``negative_pool`` the rows negatives are drawn from. Minibatches are drawn without
    replacement within an epoch (reshuffled each epoch); a batch holds
    ``min(batch_size, N)`` crops (:attr:`batch`). The generator lives on the CPU whatever
    the device, so a checkpoint resumes on another one.
    """

    def __init__(self, module: DeViSEMap, features: Tensor, targets: Tensor,
                 label_vectors: Tensor, negative_pool: Tensor, settings: TrainSettings) -> None:
        if len(features) != len(targets) or len(features) == 0:
            raise ValueError("features and targets must be non-empty and the same length")
        self.module, self.features, self.targets = module, features, targets
        self.label_vectors, self.negative_pool, self.settings = (label_vectors, negative_pool,
                                                                 settings)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.optimiser = torch.optim.Adam(module.parameters(), lr=settings.lr)
        self.initial = [p.detach().clone() for p in module.parameters()]
        self.history: list[float] = []
        self.batch = min(settings.batch_size, len(features))
        self.order = torch.randperm(len(features), generator=self.generator)
        self.cursor = 0

    @property
    def step(self) -> int:
        """The steps taken (over every run a resume continues)."""
        return len(self.history)

    def train_step(self) -> float:
        """One Adam step; returns its hinge rank loss. TrainingDiverged when the loss is
        not finite or the step fails."""
        module, step = self.module, self.step + 1
        if self.cursor + self.batch > len(self.order):
            self.order = torch.randperm(len(self.features), generator=self.generator)
            self.cursor = 0
        rows = self.order[self.cursor:self.cursor + self.batch].to(self.features.device)
        self.cursor += self.batch
        label_rows = self.targets[rows]
        negative_rows, mask = sample_negatives(label_rows, self.negative_pool,
                                               self.settings.negatives, self.generator)
        embedded = module(self.features[rows])
        loss = hinge_rank_loss(embedded, self.label_vectors[label_rows],
                               self.label_vectors[negative_rows], self.settings.margin, mask)
        total = loss
        if self.settings.weight_decay > 0:
            total = total + self.settings.weight_decay * sum(
                ((p - p0) ** 2).sum() for p, p0 in zip(module.parameters(), self.initial,
                                                     strict=True))
        value = float(total.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the hinge rank loss is {value} at step {step}: the run diverged, so "
                f"nothing is exported; {START_AGAIN}")
        self.optimiser.zero_grad(set_to_none=True)
        total.backward()
        try:
            self.optimiser.step()
        except RuntimeError as error:  # e.g. a step size beyond float32 (a huge --lr)
            raise TrainingDiverged(f"the Adam step failed at step {step} ({error}): nothing "
                                   f"is exported; {START_AGAIN}") from error
        self.history.append(float(loss.detach()))
        return self.history[-1]

    def finish(self) -> None:
        """Evaluation mode; TrainingDiverged when the weights are not finite."""
        self.module.eval()
        if not finite_weights(self.module):
            raise TrainingDiverged(f"the map's weights hold NaN or infinite values after "
                                   f"{self.step} steps: the run diverged, so nothing is "
                                   f"exported; {START_AGAIN}")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the training (tensors on the CPU except the map's and
        Adam's, which :func:`torch.save` copies)."""
        return {"model": self.module.state_dict(), "optimizer": self.optimiser.state_dict(),
                "generator": self.generator.get_state(), "order": self.order.cpu(),
                "cursor": self.cursor, "initial": [p.cpu() for p in self.initial],
                "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues the training ``state`` (:meth:`state_dict`) holds."""
        order = torch.as_tensor(state["order"]).cpu().long()
        if len(order) != len(self.features) or not 0 <= int(state["cursor"]) <= len(order):
            raise CheckpointError(f"the checkpoint shuffles {len(order)} crops, not "
                                  f"{len(self.features)}")
        device = self.features.device
        self.module.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimizer"])
        self.generator.set_state(torch.as_tensor(state["generator"]).cpu())
        self.order, self.cursor = order, int(state["cursor"])
        self.initial = [torch.as_tensor(t).to(device) for t in state["initial"]]
        self.history = [float(v) for v in state["history"]]


def train_map(module: DeViSEMap, features: Tensor, targets: Tensor, label_vectors: Tensor,
              negative_pool: Tensor, settings: TrainSettings, progress: bool = True,
              ) -> list[float]:
    """``settings.steps`` steps of :class:`MapTraining` in one go (no checkpoints); returns
    the loss of every step."""
    training = MapTraining(module, features, targets, label_vectors, negative_pool, settings)
    module.train()
    with tqdm(range(settings.steps), desc="devise", unit="step", disable=not progress) as bar:
        for _ in bar:
            bar.set_postfix(loss=f"{training.train_step():.4f}", refresh=False)
    training.finish()
    return training.history


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


#: The least value of each numeric flag. ``--steps`` is at least 1: a run of no steps would
#: export the initial map (random weights under ``--init random``) as a trained model.
FLAG_MINIMUMS = {
    **dict.fromkeys(("steps", "crops_per_image", "val_crops", "negatives", "batch_size",
                     "top_t"), 1),
    **dict.fromkeys(("margin", "lr", "weight_decay", "threads", "seed", "checkpoint_every"),
                    0),
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


def check_images_decode(flag: str, files: Iterable[Path]) -> None:
    """ImageReadError (``FLAG: cannot read/decode image PATH: why``) for the first of
    ``files`` that is not an image or whose pixels do not decode to the end: a damaged or
    truncated photo, found in milliseconds (:func:`check_decodable`) before any model loads
    instead of as a decoder's traceback halfway through the features. As ``percept data
    prepare`` does, a bad photo stops the run: left out silently, it would change the
    training data without anyone choosing to."""
    for path in files:
        try:
            check_decodable(path)
        except ImageReadError as error:
            raise ImageReadError(f"{flag}: {error}") from None


def check_paths(args: argparse.Namespace, out: Path, run_dir: Path) -> None:
    """Before anything loads: ValueError / FileNotFoundError for an input that is not
    there (``--images``, ``--photos``, ``--val-photos``, ``--word-vectors``), and for outputs
    that cannot be written or would land in the data (``--run-dir`` or ``--out`` inside an
    input folder, where loss.png would become a training image) or in each other; then
    ImageReadError for a photo that cannot be decoded (:func:`check_images_decode`)."""
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
    if args.images:
        check_images_decode("--images", (f for folder in class_folders(Path(args.images))
                                         for f in folder_images(folder)))
    else:
        check_images_decode("--photos", _photo_files(Path(args.photos)))
    if args.val_photos:
        check_images_decode("--val-photos", _photo_files(Path(args.val_photos)))


#: What ``--resume`` may change besides the flags of every trainer's (loop.RESUMABLE_FLAGS):
#: where the features are cached and the MiniLM vectors kept (the data check compares what
#: they hold), and what only config.json records (the default method, ConSE's T).
MAY_CHANGE_ON_RESUME = RESUMABLE_FLAGS | {"cache_dir", "vectors_dir", "default_method",
                                          "top_t"}
#: The flags that name files or folders, compared (and carried) by the files they name.
PATH_FLAGS = ("photos", "images", "val_photos", "word_vectors", "vectors_dir", "cache_dir")
#: What each entry of a checkpoint's ``"data"`` identifies, for the refusal of a resume.
DATA_NAMES = {"features": "the training images (--photos / --images: their bytes or crops)",
              "val_features": "the validation photos (--val-photos)",
              "word_space": "the word vectors", "word_space_sha256": "the word vectors",
              "targets_sha256": "the training labels"}


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a checkpoint records and a resume compares (loop.recorded_flags), with
    ``--val-photos ''`` as None: the empty string is no path to resolve."""
    flags = recorded_flags(args)
    flags["val_photos"] = flags.get("val_photos") or None
    return flags


def word_space_sha256(space: WordSpace) -> str:
    """The word vectors' identity: a word-vector file's sha256, or for the MiniLM vectors
    (one recipe, rebuilt or not) the sha256 of the matrix itself."""
    if space.source.get("sha256"):
        return str(space.source["sha256"])
    return hashlib.sha256(np.ascontiguousarray(space.vectors).data).hexdigest()


def check_same_run_data(checkpoint: Path, state: Mapping[str, Any],
                        current: Mapping[str, Any]) -> None:
    """CheckpointError when ``--resume`` would go on with other data than the run began on:
    other photo bytes or crops (the feature-cache keys), other word vectors, other labels.
    The flags may be the same while the files they name are not. (loop.check_same_data
    does this for the prepared arrays of the other trainers; the DeViSE map trains on
    cached backbone features instead.)"""
    saved = state.get("data", {})
    differ = list(dict.fromkeys(DATA_NAMES[key] for key, value in current.items()
                                if key in saved and saved[key] != value))
    if differ:
        words = ""
        if "word_space" in current and saved.get("word_space") != current["word_space"]:
            words = f" (word space {saved.get('word_space')} -> {current['word_space']})"
        raise CheckpointError(
            f"--resume would continue the run in {checkpoint} on other data: "
            f"{' and '.join(differ)} differ from those it began on{words}. Resume on the "
            "data it began on, or start a new run in another --run-dir")


def train(args: argparse.Namespace) -> int:
    """Runs ``percept train devise`` with parsed flags."""
    started = time.perf_counter()
    word_vectors = getattr(args, "word_vectors", None)
    name = args.name or default_name(word_vectors)
    out = Path(args.out) if args.out else REPO_ROOT / "models" / name
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    checkpoint = run_dir / CHECKPOINT_NAME
    if resuming(checkpoint, args):
        carry_resumed_flags(args, checkpoint, MAY_CHANGE_ON_RESUME, PATH_FLAGS)
        # a --word-vectors carried over names the artifact (the run folder stays where
        # the checkpoint was found)
        word_vectors = getattr(args, "word_vectors", None)
        name = args.name or default_name(word_vectors)
        out = Path(args.out) if args.out else REPO_ROOT / "models" / name
    check_flag_minimums(args, FLAG_MINIMUMS, above={"lr"})  # before anything loads
    check_seed(args.seed)
    if args.top_t > MAX_TOP_T:
        raise ValueError(f"--top-t must be <= {MAX_TOP_T} (the ImageNet classes), got "
                         f"{args.top_t}")
    export_plan = check_output_folder(out, name)  # (needs no data, so it is said first)
    check_paths(args, out, run_dir)
    check_new_run(checkpoint, args.resume)
    print(f"[devise] will export {export_plan}", flush=True)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.quiet
    cache_dir = Path(args.cache_dir) if args.cache_dir else None

    space = load_word_space(args.recipe, Path(args.vectors_dir) if args.vectors_dir else None,
                            progress=progress, word_vectors=word_vectors,
                            word_vectors_format=getattr(args, "word_vectors_format", "auto"))
    architecture = {"type": ARCHITECTURE_TYPE, "in_features": HEAD_CHANNELS,
                    "out_features": int(space.vectors.shape[1])}
    flags = run_flags(args)
    state: dict[str, Any] | None = None
    if args.resume:
        state = read_checkpoint(checkpoint, device, architecture)
        check_resumed_run(checkpoint, state, flags, MAY_CHANGE_ON_RESUME, args.steps,
                          paths=PATH_FLAGS)
    imagenet_wnids = [space.vocab.synsets[int(r)].wnid for r in space.imagenet_rows]
    data_entries: list[dict[str, Any]] = []
    if args.images:
        labelled = parse_image_folder(Path(args.images), space.vocab, preferred=imagenet_wnids)
        for folder, others in sorted(labelled.ambiguous.items()):
            print(f"[devise] class {folder!r} -> {labelled.classes[folder]} "
                  f"({', '.join(space.vocab[labelled.classes[folder]].names)}); other senses: "
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

    # What the run trains on, known before any backbone runs: a resume on other data is
    # refused before the features are computed.
    train_plan = plan_features(images, crops_per_image=args.crops_per_image, seed=args.seed)
    val_files = _photo_files(Path(args.val_photos)) if args.val_photos else []
    val_plan: FeaturePlan | None = (plan_features(val_files, crops_per_image=args.val_crops,
                                                  seed=args.seed + 1) if val_files else None)
    identity: dict[str, Any] = {
        "features": train_plan.key, "val_features": val_plan.key if val_plan else None,
        "word_space": space.name, "word_space_sha256": word_space_sha256(space)}
    if state is not None:
        check_same_run_data(checkpoint, state, identity)

    feature_start = time.perf_counter()
    cache = compute_features(images, device=str(device), cache_dir=cache_dir,
                             progress=progress, desc="train crops", plan=train_plan)
    val: FeatureCache | None = None
    if val_plan is not None:
        val = compute_features(val_files, device=str(device), cache_dir=cache_dir,
                               progress=progress, desc="val crops", plan=val_plan)
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
    identity["targets_sha256"] = hashlib.sha256(
        np.ascontiguousarray(targets_np, dtype=np.int64).tobytes()
        + np.packbits(keep).tobytes()).hexdigest()
    if state is not None:
        check_same_run_data(checkpoint, state, identity)
    train_features, train_logits = cache.features[keep], cache.logits[keep]
    label_vectors = torch.from_numpy(space.vectors).to(device)
    class_vectors = label_vectors[torch.from_numpy(space.imagenet_rows).to(device)]
    class_allowed = torch.from_numpy(space.imagenet_covered).to(device)
    pool_rows = (space.imagenet_rows[space.imagenet_covered] if args.negatives_from == "imagenet"
                 else np.flatnonzero(space.covered))
    pool = torch.from_numpy(np.asarray(pool_rows, dtype=np.int64)).to(device)
    features = torch.from_numpy(train_features).to(device)
    targets = torch.from_numpy(np.asarray(targets_np, dtype=np.int64)).to(device)

    module = DeViSEMap(HEAD_CHANNELS, int(space.vectors.shape[1])).to(device)
    if state is not None:  # the initial map the run began from (the classifier's, or random)
        with torch.no_grad():
            for parameter, value in zip(module.parameters(), state["initial"], strict=True):
                parameter.copy_(value)
    elif args.init == "classifier":
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
    training = MapTraining(module, features, targets, label_vectors, pool, settings)
    this_command = getattr(args, "command_line", None) or command_line()
    earlier: list[str] = []  # the commands of the runs this one continues
    elapsed_before = 0.0
    if state is not None:
        training.load_state_dict(state)
        earlier = earlier_commands(state)
        elapsed_before = float(state.get("elapsed", 0.0))
        print(f"[devise] resumed from {checkpoint} at step {training.step}", flush=True)
        state = None  # the tensors it holds are not needed any more

    loop_started = time.monotonic()

    def snapshot() -> dict[str, Any]:
        # no learning-rate schedule (a constant --lr) and no gradient scaler (fp32): the
        # keys every trainer's checkpoint holds (loop.CHECKPOINT_KEYS) are None
        return {"architecture": architecture, **training.state_dict(), "scheduler": None,
                "scaler": None, "step": training.step, "data": identity, "args": flags,
                **working_dir(), "commands": [*earlier, this_command],
                "elapsed": elapsed_before + time.monotonic() - loop_started}

    run_dir.mkdir(parents=True, exist_ok=True)
    module.train()
    bar = tqdm(total=args.steps, initial=training.step, desc="devise", unit="step",
               disable=not progress)
    with stop_requests(STOPPING) as stop:
        while training.step < args.steps and not stop:
            bar.set_postfix(loss=f"{training.train_step():.4f}", refresh=False)
            bar.update(1)
            if args.checkpoint_every and training.step % args.checkpoint_every == 0:
                save_finite_checkpoint(checkpoint, module, snapshot, training.step)
        bar.close()
        train_seconds = elapsed_before + time.monotonic() - loop_started
        save_finite_checkpoint(checkpoint, module, snapshot, training.step)
        if stop:
            print(stopped_note(training.step, args.steps, checkpoint), file=sys.stderr,
                  flush=True)
            return stop.exit_code
        # as the other trainers do: a first Ctrl-C or SIGTERM from here on lets the
        # evaluation and the export finish (a second one stops at once)
        stop.finish_first()
        training.finish()
        history = training.history
        after_train = teacher_agreement(module, features, train_logits, class_vectors,
                                        class_allowed)
        after_val = (teacher_agreement(module, torch.from_numpy(val.features).to(device),
                                       val.logits, class_vectors, class_allowed)
                     if val is not None else None)
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
            "crops_per_image": args.crops_per_image, "steps": training.step,
            # the crops a batch held: fewer than asked for when there are fewer crops
            "batch_size": training.batch, "batch_size_requested": args.batch_size,
            "lr": args.lr, "margin": args.margin,
            "negatives": args.negatives, "negatives_from": args.negatives_from,
            "init": args.init, "weight_decay": args.weight_decay, "seed": args.seed,
            "loss_first": float(np.mean(history[:tail])),
            "loss_last": float(np.mean(history[-tail:])),
            "teacher_agreement_train": {"before": before_train, "after": after_train},
            "teacher_agreement_val": ({"before": before_val, "after": after_val}
                                      if val is not None else None),
            "val_crops": len(val) if val is not None else 0,
            "distinct_targets": len(set(targets_np.tolist())),
            "teacher_mean_top1_probability": float(teacher_prob.mean()),
            "teacher_top_classes": [{"class": names[c], "crops": n}
                                    for c, n in classes.most_common(15)],
            "feature_seconds": round(feature_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "device": str(device), "threads": torch.get_num_threads(),
            "feature_cache": cache.key,
        }
        data_entries += _vector_provenance(space, word_vectors)
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
        version = next_version(out, name)
        try:  # from here on, "nothing was exported" may be false
            export_artifact(out, name=name, task=TASK, architecture=architecture,
                            module=module.cpu(), metrics=metrics, data=data_entries,
                            command=this_command, device=str(device), version=version,
                            config_extra=config_extra, earlier_commands=earlier,
                            pictures={"loss.png": run_dir / "loss.png"})
            print(f"[devise] exported {name}@{version} to {out}", flush=True)
            if stop:
                print(FINISHED_FIRST, file=sys.stderr, flush=True)
            print(f"[devise] {len(targets_np)} crops of {len(images)} images, "
                  f"{training.step} steps: loss {metrics['loss_first']:.4f} -> "
                  f"{metrics['loss_last']:.4f}; teacher agreement train "
                  f"{after_train['top1']:.2f}"
                  + (f", val {after_val['top1']:.2f} (top-5 {after_val['in_top5']:.2f})"
                     if after_val is not None else "")
                  + f"; {metrics['wall_seconds']:.0f} s", flush=True)
            return 0
        except KeyboardInterrupt:  # the second Ctrl-C, during or just after the export
            if next_version(out, name) > version:  # the swap had happened
                print(f"\n[devise] stopped just after the export: {out} holds "
                      f"{name}@{version}", file=sys.stderr, flush=True)
                return 130
            print(f"\n[devise] stopped during the export to {out}: an export is all or "
                  f"nothing, so {out} holds what it held before; the trained map is in "
                  f"{checkpoint}: run the same command with --resume to export it",
                  file=sys.stderr, flush=True)
            return 130


def _vector_provenance(space: WordSpace, word_vectors: Path | str | None
                       ) -> list[dict[str, Any]]:
    """Provenance of the word space, WordNet and the backbone weights (last)."""
    entries: list[dict[str, Any]] = []
    if word_vectors:  # its sha256 is already known (hashing a 3.6 GB file twice is slow)
        entries.append({"path": space.source["path"], "sha256": space.source["sha256"],
                        "kind": "word vectors", "format": space.source["format"]})
    else:
        entries += [data_entry(p, kind="noun vectors") for p in space.files()]
    if space.vocab.source is not None:
        entries.append(data_entry(space.vocab.source, kind="WordNet 3.0 data.noun"))
    entries.append(data_entry(efficientnet_lite0_weights_path(), kind="backbone weights"))
    return entries


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
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1
    except (ImageFolderError, AssetMissingError, ValueError, FileNotFoundError) as error:
        # CheckpointError and ImageReadError are ValueErrors
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # train() says so itself once the export has begun
        print("\n[devise] stopped: nothing was exported", file=sys.stderr, flush=True)
        return 130


def one_line(error: BaseException) -> str:
    """An error's message on one line (a checkpoint torch cannot read can give several)."""
    return " ".join(str(error).split())


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``devise`` to the ``percept train`` subparsers (see training.cli_devise)."""
    from training.cli_devise import register_train

    return register_train(subparsers)
