"""The WordNet 3.0 noun vocabulary: real data.noun, real counts, real graph."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.embed.wordnet import (
    NOUN_LEMMAS,
    NOUN_SENSES,
    NOUN_SYNSETS,
    NounVocabulary,
    imagenet_indices,
    imagenet_wnids,
    load_vocabulary,
    parse_data_line,
    wordnet_noun_path,
)
from tests.embed.conftest import ANIMAL, CAR, DOG, GOLDEN_RETRIEVER
from training.assets import AssetMissingError


def test_counts_are_wordnet_3_0(vocab: NounVocabulary) -> None:
    assert len(vocab) == NOUN_SYNSETS == 82_115
    # DESIGN.md's 117,798 "lemmas" are unique noun strings, case-folded (index.noun).
    assert vocab.lemma_count() == NOUN_LEMMAS == 117_798
    assert vocab.sense_count() == NOUN_SENSES
    assert vocab.sha256 is not None


def test_all_imagenet_classes_are_noun_synsets(vocab: NounVocabulary) -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids[0] == "n01440764"  # tench: output 0 of the classifier
    assert all(w in vocab for w in wnids)
    rows = imagenet_indices(vocab)
    assert [vocab.synsets[i].wnid for i in rows] == wnids
    assert vocab[DOG].lemmas == ("dog", "domestic_dog", "Canis_familiaris")


def test_golden_retriever_is_a_dog(vocab: NounVocabulary) -> None:
    golden = vocab[GOLDEN_RETRIEVER]
    assert golden.lemmas == ("golden_retriever",)
    assert golden.names == ("golden retriever",)
    assert golden.gloss.startswith("an English breed")
    assert vocab.index[DOG] in vocab.hypernym_closure(GOLDEN_RETRIEVER)
    chain: list[str] = []
    current = GOLDEN_RETRIEVER
    while current != DOG and len(chain) < 10:  # follow the first hypernyms
        current = vocab[current].hypernyms[0]
        chain.append(vocab[current].lemmas[0])
    assert chain == ["retriever", "sporting_dog", "hunting_dog", "dog"]


def test_hyponym_closure_of_animal(vocab: NounVocabulary) -> None:
    animals = vocab.hyponym_closure(ANIMAL)
    assert vocab.index[ANIMAL] in animals
    assert vocab.index[DOG] in animals and vocab.index[GOLDEN_RETRIEVER] in animals
    assert vocab.index[CAR] not in animals
    assert 3_000 < len(animals) < 10_000
    assert len(vocab.hyponym_closure("n00001740")) == len(vocab)  # entity covers all


def test_instance_hypernyms_are_edges(vocab: NounVocabulary) -> None:
    # Mark Twain (n11089036 "Clemens, Samuel Langhorne Clemens, Mark Twain") is an instance
    # of writer (n10794014).
    twain = next(s for s in vocab.synsets if "Mark_Twain" in s.lemmas)
    assert twain.hypernyms
    parent = twain.hypernyms[0]
    assert vocab.index[twain.wnid] in vocab.hyponym_closure(parent)


def test_hops_within_two(vocab: NounVocabulary) -> None:
    retriever = vocab[GOLDEN_RETRIEVER].hypernyms[0]
    assert vocab.hops(GOLDEN_RETRIEVER, GOLDEN_RETRIEVER) == 0
    assert vocab.hops(GOLDEN_RETRIEVER, retriever) == 1
    sibling = next(vocab.synsets[c].wnid for c in vocab.children(vocab.index[retriever])
                   if vocab.synsets[c].wnid != GOLDEN_RETRIEVER)
    assert vocab.hops(GOLDEN_RETRIEVER, sibling) == 2  # up then down
    assert vocab.within_hops(sibling, GOLDEN_RETRIEVER)
    assert vocab.hops(GOLDEN_RETRIEVER, DOG) is None  # four hops away
    assert vocab.hops(GOLDEN_RETRIEVER, DOG, max_hops=4) == 4
    assert not vocab.within_hops(GOLDEN_RETRIEVER, CAR)


def test_parse_record_with_markers_and_pointers() -> None:
    line = ("02099601 05 n 02 golden_retriever 0 Goldie(p) 1 003 @ 02099029 n 0000 "
            "@i 09999999 n 0000 ~ 01234567 n 0000 | an English breed; \"a dog\"  ")
    synset = parse_data_line(line)
    assert synset.wnid == "n02099601"
    assert synset.lemmas == ("golden_retriever", "Goldie")
    assert synset.hypernyms == ("n02099029", "n09999999")
    assert synset.gloss == 'an English breed; "a dog"'
    with pytest.raises(ValueError):
        parse_data_line(line.replace(" n 02 ", " v 02 ", 1))


def test_crlf_file_parses_the_same(tmp_path: Path, vocab: NounVocabulary) -> None:
    source = wordnet_noun_path().read_text().splitlines()[:200]
    crlf = tmp_path / "data.noun"
    crlf.write_bytes("\r\n".join(source).encode() + b"\r\n")
    small = NounVocabulary.from_file(crlf)
    assert len(small) == sum(1 for line in source if not line.startswith(" "))
    assert small.synsets == vocab.synsets[: len(small)]


def test_missing_asset_says_run_make_setup(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEPT_ASSETS_DIR", str(tmp_path))
    with pytest.raises(AssetMissingError, match="make setup"):
        wordnet_noun_path()
    with pytest.raises(AssetMissingError):
        load_vocabulary()


def test_wrong_wordnet_version_is_refused(tmp_path: Path) -> None:
    small = tmp_path / "data.noun"
    small.write_text("\n".join(wordnet_noun_path().read_text().splitlines()[:100]) + "\n")
    with pytest.raises(ValueError, match=r"not WordNet 3\.0"):
        load_vocabulary(small)
