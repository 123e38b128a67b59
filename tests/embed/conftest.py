"""Fixtures for the Embedding service's vocabulary, vectors and noun index: real data only.

The 82,115 noun vectors come from the cache (``python -m services.embed.word_vectors build``)
when it is there. Without it the tests build real MiniLM vectors for a subset of about 500
synsets (every dog, the golden retriever's neighbours, random others) in a few seconds,
and the checks that need all 82,115 rows are skipped with a reason.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from percept.v1 import embed_pb2_grpc
from services import client
from services.common.server import RunningServer, start_in_thread
from services.embed.word_vectors import (
    TextEncoder,
    build_noun_vectors,
    load_noun_keyed_vectors,
    noun_vectors_path,
)
from services.embed.wordnet import NounVocabulary, load_vocabulary
from tests.conftest import server_config

DOG = "n02084071"
GOLDEN_RETRIEVER = "n02099601"
ANIMAL = "n00015388"
CAR = "n02958343"
SUBSET_RANDOM = 150


@dataclass(frozen=True)
class NounVectors:
    """Noun vectors for ``rows`` of the full vocabulary (all of them when ``full``)."""

    vocab: NounVocabulary  # the full vocabulary
    rows: np.ndarray  # int64 indices into ``vocab``; row r of ``matrix`` is synset rows[r]
    matrix: np.ndarray  # (len(rows), 384) float32
    full: bool


@pytest.fixture(scope="session")
def vocab() -> NounVocabulary:
    return load_vocabulary()


@pytest.fixture(scope="session")
def encoder() -> Iterator[TextEncoder]:
    yield TextEncoder(batch_size=128)


@pytest.fixture(scope="module")
def embed_server() -> Iterator[RunningServer]:
    """A real Embedding server on the committed models, one per test module."""
    running = start_in_thread(server_config("embed", max_batch=8, max_wait_ms=20), timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(embed_server: RunningServer) -> embed_pb2_grpc.EmbeddingStub:
    return embed_pb2_grpc.EmbeddingStub(client.connect(embed_server.target))


def subset_rows(vocab: NounVocabulary, extra: int = SUBSET_RANDOM, seed: int = 0) -> np.ndarray:
    """Every dog, everything within 2 hops of the golden retriever and of a car, and
    ``extra`` random synsets: a real, small, hard neighbourhood."""
    rows = set(vocab.hyponym_closure(DOG))
    rows |= set(vocab.neighbourhood(GOLDEN_RETRIEVER, 2)) | set(vocab.neighbourhood(CAR, 2))
    rest = sorted(set(range(len(vocab))) - rows)
    rows |= set(random.Random(seed).sample(rest, extra))
    return np.array(sorted(rows), dtype=np.int64)


@pytest.fixture(scope="session")
def noun_vectors(vocab: NounVocabulary, encoder: TextEncoder) -> NounVectors:
    path = noun_vectors_path(vocab, encoder)
    if path.is_file():
        kv = load_noun_keyed_vectors(path, vocab)
        return NounVectors(vocab, np.arange(len(vocab), dtype=np.int64),
                           np.ascontiguousarray(kv.vectors, dtype=np.float32), full=True)
    rows = subset_rows(vocab)
    matrix = build_noun_vectors(vocab, encoder, progress=False, rows=rows.tolist())
    return NounVectors(vocab, rows, matrix, full=False)


def bad_request_field(error: grpc.RpcError) -> str | None:
    """The field the google.rpc.BadRequest of a failed call names (None: no BadRequest)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return None
