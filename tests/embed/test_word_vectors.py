"""Noun vectors: the real MiniLM encoder, the gensim cache, and word2vec / GloVe / fastText
files written in every format and read through gensim."""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from services.embed.noun_index import brute_force_search
from services.embed.word_vectors import (
    DEFAULT_RECIPE,
    EMBEDDING_DIM,
    PHRASE_RECIPES,
    TextEncoder,
    WordVectorEncoder,
    WordVectorsError,
    _gensim_readers,
    detect_format,
    load_external_vectors,
    load_noun_keyed_vectors,
    load_noun_space,
    load_or_build_noun_vectors,
    main,
    noun_phrases,
    noun_vectors_path,
    resolve_lemma,
    synset_phrase,
    vector_space_mismatch,
    vectors_for_vocab,
    vectors_for_vocab_with_coverage,
)
from services.embed.wordnet import NounVocabulary, imagenet_indices
from tests.embed.conftest import ANIMAL, CAR, DOG, GOLDEN_RETRIEVER, NounVectors


def test_phrases(vocab: NounVocabulary) -> None:
    assert synset_phrase(vocab, GOLDEN_RETRIEVER, "lemmas") == "golden retriever"
    assert synset_phrase(vocab, DOG, "lemmas") == "dog, domestic dog, Canis familiaris"
    assert synset_phrase(vocab, GOLDEN_RETRIEVER, "lemmas+hypernym") == \
        "golden retriever (retriever)"
    assert synset_phrase(vocab, GOLDEN_RETRIEVER, "lemmas+gloss") == \
        "golden retriever: an English breed having a long silky golden coat"
    # the gloss stops before the usage examples and after 12 words
    dog = synset_phrase(vocab, DOG, "lemmas+gloss")
    assert '"' not in dog and len(dog.split(": ", 1)[1].split()) <= 12
    with pytest.raises(ValueError, match="unknown phrase recipe"):
        synset_phrase(vocab, DOG, "nope")


def test_default_recipe_separates_homonyms(vocab: NounVocabulary) -> None:
    """Lemmas alone give crane-the-bird and crane-the-machine the same phrase."""
    assert DEFAULT_RECIPE in PHRASE_RECIPES
    cranes = [s.wnid for s in vocab.synsets if s.lemmas == ("crane",)]
    assert len(cranes) >= 2
    assert len({synset_phrase(vocab, w, "lemmas") for w in cranes}) == 1
    assert len({synset_phrase(vocab, w, DEFAULT_RECIPE) for w in cranes}) == len(cranes)
    phrases = noun_phrases(vocab)
    assert len(phrases) == len(vocab) and all(phrases)


def test_encoder_is_offline_normalised_and_lazy(encoder: TextEncoder) -> None:
    assert encoder.dimension == EMBEDDING_DIM
    assert "all-MiniLM-L6-v2" in encoder.name
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)
    vectors = encoder.encode(["golden retriever", "dog", "tax return"])
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.2
    with pytest.raises(TypeError):
        encoder.encode("one string")  # type: ignore[arg-type]


def test_coverage_is_complete(noun_vectors: NounVectors) -> None:
    """MiniLM embeds any phrase: every synset gets a finite unit vector."""
    matrix = noun_vectors.matrix
    assert matrix.shape == (len(noun_vectors.rows), EMBEDDING_DIM)
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)


def test_full_cache_covers_every_synset(noun_vectors: NounVectors, vocab: NounVocabulary,
                                        encoder: TextEncoder) -> None:
    if not noun_vectors.full:
        pytest.skip("no cached 82,115 noun vectors; build them with "
                    "`python -m services.embed.word_vectors build` (the subset was checked)")
    kv = load_noun_keyed_vectors(noun_vectors_path(vocab, encoder), vocab)
    assert len(kv.index_to_key) == len(vocab) == 82_115
    assert kv.vector_size == EMBEDDING_DIM
    assert np.array_equal(kv[GOLDEN_RETRIEVER], noun_vectors.matrix[vocab.index[GOLDEN_RETRIEVER]])


def test_golden_retriever_text_finds_its_synset(noun_vectors: NounVectors,
                                                encoder: TextEncoder) -> None:
    query = encoder.encode(["golden retriever"])
    _, top = brute_force_search(noun_vectors.matrix, query, 5)
    wnids = [noun_vectors.vocab.synsets[noun_vectors.rows[i]].wnid for i in top[0]]
    assert GOLDEN_RETRIEVER in wnids, wnids


def test_cache_round_trip(tmp_path: Path, vocab: NounVocabulary, encoder: TextEncoder) -> None:
    """load_or_build writes gensim KeyedVectors keyed by wnid, then reads them back."""
    small = vocab.subset(range(40))
    first = load_or_build_noun_vectors(small, tmp_path, encoder=encoder, progress=False)
    path = noun_vectors_path(small, encoder, cache_dir=tmp_path)
    assert path.is_file() and path.name.startswith("nouns-") and path.suffix == ".kv"
    kv = load_noun_keyed_vectors(path, small)
    assert list(kv.index_to_key) == small.wnids
    again = load_or_build_noun_vectors(small, tmp_path, encoder=encoder, progress=False)
    np.testing.assert_array_equal(first, again)
    # the key changes with the recipe, so another recipe gets another file
    assert noun_vectors_path(small, encoder, "lemmas", tmp_path) != path
    assert noun_vectors_path(vocab, encoder).parent.name == "vectors"


def test_a_cache_that_cannot_be_written_costs_only_the_cache(
        tmp_path: Path, vocab: NounVocabulary, encoder: TextEncoder,
        caplog: pytest.LogCaptureFixture) -> None:
    """Under a read-only image (a file where the cache folder would be stands in for it, as
    root may write anywhere) the vectors are still built and returned, with a warning."""
    small = vocab.subset(range(12))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with caplog.at_level("WARNING", logger="services.embed.word_vectors"):
        matrix = load_or_build_noun_vectors(small, blocked, encoder=encoder, progress=False)
    expected = load_or_build_noun_vectors(small, tmp_path, encoder=encoder, progress=False)
    np.testing.assert_array_equal(matrix, expected)
    assert "could not be cached" in caplog.text


def _write_word2vec_text(path: Path, rows: dict[str, list[float]]) -> None:
    dim = len(next(iter(rows.values())))
    lines = [f"{len(rows)} {dim}"] + [f"{w} {' '.join(map(str, v))}" for w, v in rows.items()]
    path.write_text("\n".join(lines) + "\n")


WORDS = {
    "golden_retriever": [1.0, 0.0, 0.0, 0.0],
    "dog": [0.0, 1.0, 0.0, 0.0],
    "Canis": [0.0, 0.0, 1.0, 0.0],
    "familiaris": [0.0, 0.0, 0.0, 1.0],
    "car": [0.5, 0.5, 0.0, 0.0],
    "Retriever": [0.5, 0.0, 0.5, 0.0],  # only "retriever" is a lemma: found by its case
}


def test_external_word2vec_text(tmp_path: Path, vocab: NounVocabulary) -> None:
    path = tmp_path / "vectors.txt"
    _write_word2vec_text(path, WORDS)
    kv = load_external_vectors(path)
    assert kv.vector_size == 4 and len(kv.index_to_key) == len(WORDS)
    vector, route = resolve_lemma(kv, "golden_retriever")
    assert route == "token" and vector is not None and vector[0] == 1.0
    assert resolve_lemma(kv, "Dog")[1] == "case"
    vector, route = resolve_lemma(kv, "Canis_familiaris")  # not a token: mean of words
    assert route == "words" and vector is not None
    np.testing.assert_allclose(vector, [0, 0, 0.5, 0.5])
    assert resolve_lemma(kv, "domestic_dog") == (None, "none")  # "domestic" is missing

    matrix, covered = vectors_for_vocab(vocab, kv)
    assert matrix.shape == (len(vocab), 4) and covered.dtype == bool
    dog = vocab.index[DOG]
    assert covered[dog] and covered[vocab.index[GOLDEN_RETRIEVER]]
    # dog = mean of the unit vectors of "dog" (token) and "Canis familiaris" (mean of
    # words), renormalised; "domestic dog" has no vector
    words = np.array([0, 0, 0.5, 0.5]) / np.linalg.norm([0, 0, 0.5, 0.5])
    expected = np.array([0, 1, 0, 0]) + words
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(matrix[dog], expected, atol=1e-6)
    assert not covered.all() and (matrix[~covered] == 0).all()
    _, _, report = vectors_for_vocab_with_coverage(vocab, kv)
    assert report.synsets == len(vocab) and report.covered == int(covered.sum())
    assert report.routes["token"] > 0 and report.routes["case"] > 0
    assert 0 < report.fraction < 0.01
    assert "synsets" in str(report)


def test_external_glove_and_binary(tmp_path: Path, vocab: NounVocabulary) -> None:
    glove = tmp_path / "glove.txt"  # GloVe: no "count dim" header
    glove.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in WORDS.items()))
    kv = load_external_vectors(glove)
    assert len(kv.index_to_key) == len(WORDS) and "golden_retriever" in kv.key_to_index
    binary = tmp_path / "vectors.bin"
    kv.save_word2vec_format(str(binary), binary=True)
    again = load_external_vectors(binary)
    np.testing.assert_allclose(again["dog"], kv["dog"])
    fasttext = tmp_path / "wiki.vec"  # fastText .vec: word2vec text with a header
    _write_word2vec_text(fasttext, WORDS)
    assert len(load_external_vectors(fasttext, "fasttext").index_to_key) == len(WORDS)
    with pytest.raises(FileNotFoundError):
        load_external_vectors(tmp_path / "absent.vec")


# -------------------------------------------------------------------- word-vector files

#: A tiny real vector file: the token "golden_retriever", its words, "dog" and "Canis"
#: ("familiaris" is missing). "golden" and "retriever" are not unit length on purpose.
TINY = {
    "golden_retriever": [1.0, 0.0, 0.0, 0.0],
    "golden": [0.0, 3.0, 0.0, 0.0],
    "retriever": [0.0, 0.0, 2.0, 0.0],
    "dog": [0.0, 0.0, 0.0, 1.0],
    "Canis": [0.6, 0.8, 0.0, 0.0],
}
#: Exact coverage of TINY over WordNet 3.0's 82,115 noun synsets (checked against an
#: independent count in test_coverage_is_exact_and_reported); without the token
#: "golden_retriever" the coverage is the same and that one synset moves to "words".
TINY_COVERED, TINY_IMAGENET_COVERED = 196, 24


def write_vectors(path: Path, rows: dict[str, list[float]], fmt: str) -> Path:
    """Writes ``rows`` as a real file of ``fmt`` (by hand, not through gensim): word2vec
    text and fastText .vec (a "COUNT DIM" header), GloVe (no header), word2vec binary
    (header, then word, a space and DIM little-endian float32 per record); a name ending
    in .gz is gzipped."""
    dim = len(next(iter(rows.values())))
    header = f"{len(rows)} {dim}\n".encode()
    if fmt == "word2vec-binary":
        body = b"".join(w.encode() + b" " + struct.pack(f"<{dim}f", *v) + b"\n"
                        for w, v in rows.items())
        data = header + body
    else:
        text = "".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in rows.items())
        data = (b"" if fmt == "glove" else header) + text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


FORMATS = [  # file name, --word-vectors-format, what auto-detection must find
    ("vectors.txt", "word2vec", "word2vec"),
    ("GoogleNews-vectors-negative300.bin", "word2vec-binary", "word2vec-binary"),
    ("vectors.data", "word2vec-binary", "word2vec-binary"),  # binary without a .bin name
    ("glove.6B.4d.txt", "glove", "glove"),
    ("glove.6B.4d.txt.gz", "glove", "glove"),
    ("wiki.en.vec", "fasttext", "word2vec"),
]


@pytest.mark.parametrize("progress", [False, True], ids=["plain", "progress-bar"])
@pytest.mark.parametrize("name, fmt, detected", FORMATS)
def test_every_format_loads_through_gensim(tmp_path: Path, name: str, fmt: str,
                                           detected: str, progress: bool,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_vectors(tmp_path / name, TINY, "glove" if fmt == "glove" else
                         "word2vec-binary" if fmt == "word2vec-binary" else "word2vec")
    assert detect_format(path) == detected
    for given in ("auto", fmt):
        kv = load_external_vectors(path, given, progress=progress)
        assert kv.vector_size == 4 and list(kv.index_to_key) == list(TINY)
        for word, vector in TINY.items():
            np.testing.assert_allclose(kv[word], vector, atol=1e-6)
    # with progress, gensim's own readers run over a counting reader: a byte progress bar
    # (the installed gensim has the readers; without them the file loads without a bar)
    assert _gensim_readers() is not None
    bar = capsys.readouterr().err
    assert (f"reading {name}: 100%" in bar) == progress


@pytest.mark.parametrize("content, fmt, message", [
    (b"", "auto", "the file is empty"),
    (b"\xba\x16\x4f\x2f" + bytes(range(256)), "auto",  # a fastText .bin model
     "not a word2vec, GloVe or fastText .vec file"),
    (b"0 4\n", "auto", "the header says 0 words"),
    (b"2 4\ndog 1 2 3 4\ncat 1 2\n", "auto", "cannot be read as word2vec"),
    (b"dog 1 2 3 4\ncat 1 2 3 4\n", "word2vec-binary", "cannot be read as word2vec-binary"),
    (b"2 4\ndog 1 2 3 4\ncat 1 2 3 4\n", "glove", "cannot be read as glove"),
    (b"dog 1 2 3 4\n", "word2vec-ascii", "unknown format 'word2vec-ascii'"),
])
@pytest.mark.parametrize("progress", [False, True], ids=["plain", "progress-bar"])
def test_unreadable_files_give_clear_errors(tmp_path: Path, content: bytes, fmt: str,
                                            message: str, progress: bool) -> None:
    path = tmp_path / "vectors.txt"
    path.write_bytes(content)
    with pytest.raises(WordVectorsError, match=re.escape(message)) as error:
        load_external_vectors(path, fmt, progress=progress)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="word-vector file not found"):
        load_external_vectors(tmp_path / "absent.vec")


def test_golden_retriever_uses_its_token_then_the_mean_of_its_words(
        tmp_path: Path, vocab: NounVocabulary) -> None:
    row = vocab.index[GOLDEN_RETRIEVER]
    assert vocab[GOLDEN_RETRIEVER].lemmas == ("golden_retriever",)
    kv = load_external_vectors(write_vectors(tmp_path / "with.txt", TINY, "glove"))
    vector, route = resolve_lemma(kv, "golden_retriever")
    assert route == "token" and vector is not None
    np.testing.assert_allclose(vector, [1, 0, 0, 0])
    matrix, covered = vectors_for_vocab(vocab, kv)
    assert covered[row]
    np.testing.assert_allclose(matrix[row], [1, 0, 0, 0], atol=1e-6)

    without = {w: v for w, v in TINY.items() if w != "golden_retriever"}
    kv = load_external_vectors(write_vectors(tmp_path / "without.txt", without, "glove"))
    vector, route = resolve_lemma(kv, "golden_retriever")
    assert route == "words" and vector is not None  # mean of the unit "golden", "retriever"
    np.testing.assert_allclose(vector, [0, 0.5, 0.5, 0], atol=1e-6)
    matrix, covered = vectors_for_vocab(vocab, kv)
    assert covered[row]
    np.testing.assert_allclose(matrix[row], [0, 2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    # a lemma with a missing word resolves only when partial words are allowed
    assert resolve_lemma(kv, "Canis_familiaris") == (None, "none")
    vector, route = resolve_lemma(kv, "Canis_familiaris", partial=True)
    assert route == "partial" and vector is not None
    np.testing.assert_allclose(vector, [0.6, 0.8, 0, 0], atol=1e-6)
    # "dog" resolves as a token, so the dog synset does not use its partial lemma
    np.testing.assert_allclose(matrix[vocab.index[DOG]], [0, 0, 0, 1], atol=1e-6)
    # "hunting dog" has no token and only one of its words: the partial mean
    hunting_dog = vocab.index["n02087122"]
    assert vocab.synsets[hunting_dog].lemmas == ("hunting_dog",)
    np.testing.assert_allclose(matrix[hunting_dog], [0, 0, 0, 1], atol=1e-6)


def _independent_coverage(vocab: NounVocabulary, words: set[str]) -> set[int]:
    """Synsets with a lemma that is a token (any case) or has a word that is one."""
    def present(token: str) -> bool:
        return bool({token, token.lower(), token.capitalize(), token.title(),
                     token.upper()} & words)

    return {i for i, synset in enumerate(vocab.synsets)
            if any(present(lemma) or any(present(w) for w in re.split(r"[_\s\-]+", lemma) if w)
                   for lemma in synset.lemmas)}


def test_coverage_is_exact_and_reported(tmp_path: Path, vocab: NounVocabulary,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_vectors(tmp_path / "glove.txt", TINY, "glove")
    kv = load_external_vectors(path)
    matrix, covered, report = vectors_for_vocab_with_coverage(vocab, kv)
    assert set(np.flatnonzero(covered).tolist()) == _independent_coverage(vocab, set(TINY))
    assert (report.synsets, report.covered) == (82_115, TINY_COVERED) == \
        (len(vocab), int(covered.sum()))
    imagenet = imagenet_indices(vocab)
    assert (report.imagenet_classes, report.imagenet_covered) == (1000, TINY_IMAGENET_COVERED)
    assert report.imagenet_covered == int(covered[imagenet].sum())
    assert report.routes == {"token": 10, "case": 0, "words": 0, "partial": 186}
    assert sum(report.routes.values()) == report.covered
    assert (matrix[~covered] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(matrix[covered], axis=1), 1.0, atol=1e-5)
    assert report.as_dict() == {
        "synsets": 82_115, "covered": 196, "percent": 0.24, "imagenet_classes": 1000,
        "imagenet_covered": 24, "imagenet_percent": 2.4,
        "routes": {"token": 10, "case": 0, "words": 0, "partial": 186}}
    assert str(report).startswith("196 of 82,115 WordNet noun synsets (0.2%), 24 of 1,000 "
                                  "ImageNet classes (2.4%)")
    # the command-line report
    assert main(["coverage", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"word vectors {path} (glove, 5 words, 4-d): 196 of 82,115 WordNet noun " \
           "synsets (0.2%), 24 of 1,000 ImageNet classes (2.4%)" in out
    assert main(["coverage", str(tmp_path / "absent.txt")]) == 2
    assert "word-vector file not found" in capsys.readouterr().err


def test_small_vocabulary_coverage_by_hand(tmp_path: Path, vocab: NounVocabulary) -> None:
    small = vocab.subset([vocab.index[w] for w in (DOG, GOLDEN_RETRIEVER, CAR, ANIMAL)])
    kv = load_external_vectors(write_vectors(tmp_path / "v.txt", TINY, "word2vec"))
    _, covered, report = vectors_for_vocab_with_coverage(
        small, kv, imagenet_rows=np.array([small.index[GOLDEN_RETRIEVER], small.index[CAR]]))
    # dog and golden retriever by token; car and animal have no word in the file
    assert covered.tolist() == [small.wnids[i] in (DOG, GOLDEN_RETRIEVER)
                                for i in range(len(small))]
    assert (report.synsets, report.covered, report.imagenet_classes,
            report.imagenet_covered) == (4, 2, 2, 1)
    assert report.routes == {"token": 2, "case": 0, "words": 0, "partial": 0}


def test_noun_space_leaves_uncovered_synsets_out_of_the_index(tmp_path: Path,
                                                               vocab: NounVocabulary) -> None:
    path = write_vectors(tmp_path / "tiny.vec", TINY, "word2vec")
    lines: list[str] = []
    space = load_noun_space(vocab, path, log=lines.append)
    assert space.source == {
        "source": "word-vectors", "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "format": "word2vec",
        "dimension": 4, "words": 5, "coverage": space.coverage.as_dict(),
        "space": f"word-vectors:tiny.vec@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"}
    assert space.coverage.covered == TINY_COVERED and space.files == [path]
    assert lines == [f"word vectors {path} (word2vec, 5 words, 4-d): {space.coverage}"]
    index = space.index()
    assert len(index) == TINY_COVERED and index.dimension == 4
    scores, rows = index.search(np.array([1.0, 0, 0, 0], dtype=np.float32), TINY_COVERED + 5)
    assert rows[0, 0] == vocab.index[GOLDEN_RETRIEVER] and scores[0, 0] == pytest.approx(1.0)
    assert set(rows[0, :TINY_COVERED].tolist()) == set(space.covered_rows.tolist())
    assert (rows[0, TINY_COVERED:] == -1).all()  # nothing else is in the index
    _, rows = index.search(np.array([1.0, 0, 0, 0], dtype=np.float32), 3,
                           exclude=[vocab.index[GOLDEN_RETRIEVER]])
    assert vocab.index[GOLDEN_RETRIEVER] not in rows[0]
    # an explicit format is recorded as given
    assert load_noun_space(vocab, path, "fasttext").source["format"] == "fasttext"


def test_text_in_a_word_vector_space(tmp_path: Path) -> None:
    kv = load_external_vectors(write_vectors(tmp_path / "v.txt", TINY, "glove"))
    encoder = WordVectorEncoder(kv, {"path": "v.txt", "sha256": "ab" * 32,
                                     "source": "word-vectors"})
    vectors = encoder.encode(["golden retriever", "Golden Retriever", "a golden", "dog"])
    np.testing.assert_allclose(vectors, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0],
                                         [0, 0, 0, 1]], atol=1e-6)
    assert encoder.dimension == 4 and encoder.name == "word-vectors:v.txt@abababababab"
    with pytest.raises(ValueError, match="none of its words is in the word vectors"):
        encoder.encode(["dog", "tax return"])


def test_a_map_is_only_used_with_the_vectors_it_was_trained_against() -> None:
    minilm = {"source": "minilm", "encoder": "sentence-transformers/all-MiniLM-L6-v2",
              "dimension": 384}
    legacy = {"recipe": "lemmas+hypernym", "encoder": "sentence-transformers/all-MiniLM-L6-v2",
              "dimension": 384}  # the committed devise-minilm config.json has no "source"
    glove = {"source": "word-vectors", "path": "/v/glove.6B.300d.txt", "sha256": "a" * 64,
             "format": "glove", "dimension": 300}
    assert vector_space_mismatch(legacy, minilm) is None
    assert vector_space_mismatch(glove, dict(glove, path="/elsewhere/copy.txt")) is None
    reason = vector_space_mismatch(legacy, glove)
    assert reason is not None and "384-d" in reason and "300-d" in reason
    other = dict(glove, sha256="b" * 64)
    reason = vector_space_mismatch(glove, other)
    assert reason is not None and "aaaaaaaaaaaa" in reason and "bbbbbbbbbbbb" in reason
    reason = vector_space_mismatch(dict(glove, dimension=384), minilm)
    assert reason is not None and "was trained against /v/glove.6B.300d.txt" in reason


def test_loading_the_text_model_writes_no_progress_bar(capfd: pytest.CaptureFixture[str]
                                                       ) -> None:
    """transformers draws a "Loading weights" bar on stderr as it loads; in a server it
    would break the JSON log lines (--log-format json)."""
    TextEncoder().encode(["a cat"])
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err
