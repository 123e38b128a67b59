"""Noun vectors: the real MiniLM encoder, the gensim cache, external word2vec files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.embed.noun_index import brute_force_search
from services.embed.word_vectors import (
    DEFAULT_RECIPE,
    EMBEDDING_DIM,
    PHRASE_RECIPES,
    TextEncoder,
    load_external_vectors,
    load_noun_keyed_vectors,
    load_or_build_noun_vectors,
    noun_phrases,
    noun_vectors_path,
    resolve_lemma,
    synset_phrase,
    vectors_for_vocab,
    vectors_for_vocab_with_coverage,
)
from services.embed.wordnet import NounVocabulary
from tests.embed.conftest import DOG, GOLDEN_RETRIEVER, NounVectors


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
