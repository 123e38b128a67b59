"""LabelImage's ``under_wnid``: the nouns under a wnid (a walk of the WordNet graph in pure
Python, up to 32 ms for the root) are found in a worker thread, never on the server's event
loop, only once the image has decoded, and cached per wnid (a bounded LRU,
NounVocabulary.hyponym_rows); the labels are the same as with the uncached closure."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from percept.v1 import embed_pb2, embed_pb2_grpc
from services.common.server import RunningServer
from services.embed.service import EmbeddingService
from services.embed.wordnet import HYPONYM_ROWS_CACHE_SIZE, NounVocabulary, load_vocabulary
from tests.conftest import encode

ENTITY = "n00001740"  # the root: all 82,115 nouns
ANIMAL = "n00015388"
DOG = "n02084071"
FELINE = "n02120997"
GOLDEN_RETRIEVER = "n02099601"  # a leaf
WNIDS = [ENTITY, ANIMAL, DOG, FELINE, GOLDEN_RETRIEVER]


@pytest.fixture(scope="module")
def vocab() -> NounVocabulary:
    return load_vocabulary()


def _service(running: RunningServer) -> EmbeddingService:
    [service] = [m for m in running.server.modules if isinstance(m, EmbeddingService)]
    return service


def _record_closures(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """Every graph walk from now on records the thread it ran on."""
    threads: list[threading.Thread] = []
    walk = NounVocabulary._closure

    def recording(start: int, edges: Sequence[Sequence[int]]) -> set[int]:
        threads.append(threading.current_thread())
        return walk(start, edges)

    monkeypatch.setattr(NounVocabulary, "_closure", staticmethod(recording))
    return threads


@pytest.mark.parametrize("wnid", WNIDS)
def test_the_cached_rows_are_the_closure(vocab: NounVocabulary, wnid: str) -> None:
    rows = vocab.hyponym_rows(wnid)
    assert rows.dtype == np.int32 and not rows.flags.writeable
    assert rows.tolist() == sorted(vocab.hyponym_closure(wnid))
    assert vocab.hyponym_rows(wnid) is rows  # cached


def test_the_cache_is_bounded(vocab: NounVocabulary, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = NounVocabulary(vocab.synsets)  # a cache of its own
    fresh.hyponym_rows(ENTITY)
    threads = _record_closures(monkeypatch)
    fresh.hyponym_rows(ENTITY)
    assert threads == []  # a hit walks nothing
    for wnid in fresh.wnids[-HYPONYM_ROWS_CACHE_SIZE:]:  # not ENTITY (the first synset)
        fresh.hyponym_rows(wnid)
    info = fresh._hyponym_rows.cache_info()
    assert info.maxsize == HYPONYM_ROWS_CACHE_SIZE
    assert info.currsize == HYPONYM_ROWS_CACHE_SIZE
    walked = len(threads)
    fresh.hyponym_rows(ENTITY)  # the least recently used: dropped, walked again
    assert len(threads) == walked + 1
    with pytest.raises(KeyError):
        fresh.hyponym_rows("n99999999")
    assert fresh._hyponym_rows.cache_info().currsize == HYPONYM_ROWS_CACHE_SIZE


@pytest.mark.parametrize("one_per_word", [False, True])
def test_the_same_nouns_as_with_the_uncached_closure(embed_server: RunningServer,
                                                     one_per_word: bool) -> None:
    service = _service(embed_server)
    vectors = np.random.default_rng(0).standard_normal((3, service.index.dimension))
    for vector in vectors.astype(np.float32):
        for wnid in WNIDS:
            closure = service.vocab.hyponym_closure(wnid)
            expected = service._nearest_nouns(vector, 10, closure, None, one_per_word)
            assert service._nouns_under(vector, 10, wnid, None, one_per_word) == expected
            assert all(row in closure for _, row in expected)


def test_the_same_labels_as_with_the_uncached_closure(
        embed_server: RunningServer, stub: embed_pb2_grpc.EmbeddingStub,
        photo: np.ndarray) -> None:
    """LabelImage end to end against a search of the image's embedding restricted to the
    uncached closure."""
    service = _service(embed_server)
    image = encode(photo)
    [embedding] = stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[image]),
                                   timeout=60).embeddings
    vector = np.asarray(embedding.values, dtype=np.float32)
    for wnid in [ENTITY, ANIMAL, FELINE]:
        expected = service._nearest_nouns(vector, 10, service.vocab.hyponym_closure(wnid),
                                          None, False)
        for _ in range(2):  # the first walks the graph, the second takes the cache
            labels = stub.LabelImage(embed_pb2.LabelImageRequest(
                image=image, k=10, under_wnid=wnid), timeout=60).labels
            assert [lbl.wnid for lbl in labels] == [service.vocab[r].wnid for _, r in expected]
            np.testing.assert_allclose([lbl.score for lbl in labels],
                                       [score for score, _ in expected], atol=1e-5)


def test_the_closure_is_walked_off_the_loop_and_only_for_an_image_that_decodes(
        embed_server: RunningServer, stub: embed_pb2_grpc.EmbeddingStub,
        photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(embed_server)
    service.vocab._hyponym_rows.cache_clear()
    threads = _record_closures(monkeypatch)
    with pytest.raises(grpc.RpcError) as error:
        stub.LabelImage(embed_pb2.LabelImageRequest(image=b"not an image", under_wnid=ENTITY),
                        timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert threads == [], "the nouns were found for an image that does not decode"
    labels = stub.LabelImage(embed_pb2.LabelImageRequest(
        image=encode(photo), k=5, under_wnid=ENTITY), timeout=60).labels
    assert len(labels) == 5
    assert threads, "no walk of the graph recorded"
    assert embed_server.thread not in threads, "the graph was walked on the event loop"
