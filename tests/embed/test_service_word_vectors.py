"""``percept serve embed --word-vectors``: the Embedding service over real gRPC in the space
of a real (tiny) GloVe file, serving only a DeViSE map trained against that file."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from percept.v1 import embed_pb2, embed_pb2_grpc
from services import client
from services.common.config import ServerConfig, add_server_arguments, config_from_args
from services.common.server import RunningServer, start_in_thread
from services.embed.word_vectors import load_noun_space
from services.embed.wordnet import NounVocabulary, imagenet_wnids
from tests.conftest import REPO, encode, server_config
from tests.embed.conftest import GOLDEN_RETRIEVER, bad_request_field
from training.export import export_artifact
from training.nets.devise import DeViSEMap

DIM = 8


def write_glove(path: Path, vocab: NounVocabulary, omit: frozenset[str] = frozenset()
                ) -> Path:
    """Every ImageNet class's first lemma (but those in ``omit``), "golden_retriever" as
    a known unit vector, and "golden" / "retriever": seeded random 8-d GloVe rows."""
    rng = np.random.default_rng(0)
    words = [w for w in dict.fromkeys(vocab[x].lemmas[0] for x in imagenet_wnids())
             if w != "golden_retriever" and w not in omit]
    rows = [f"{w} {' '.join(f'{x:.5f}' for x in rng.standard_normal(DIM))}"
            for w in [*words, "golden", "retriever"]]
    rows.append("golden_retriever " + " ".join(["1"] + ["0"] * (DIM - 1)))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_vectors(tmp_path_factory: pytest.TempPathFactory, vocab: NounVocabulary) -> Path:
    return write_glove(tmp_path_factory.mktemp("vectors") / "glove.tiny.txt", vocab)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, vocab: NounVocabulary,
           tiny_vectors: Path) -> Path:
    """``devise-a-minilm`` (the committed MiniLM map, listed first) and ``devise-b-tiny``
    (an untrained map whose config.json records the tiny file, as training writes it)."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "devise-minilm", folder / "devise-a-minilm")
    space = load_noun_space(vocab, tiny_vectors)
    torch.manual_seed(0)
    export_artifact(folder / "devise-b-tiny", name="devise-b-tiny", task="devise",
                    architecture={"type": "devise-linear", "in_features": 1280,
                                  "out_features": DIM},
                    module=DeViSEMap(1280, DIM), metrics={}, data=[], command="test",
                    device="cpu", config_extra={
                        "space": space.name, "default_method": "devise",
                        "noun_vectors": {**space.source, "synsets": len(vocab)}})
    return folder


@pytest.fixture(scope="module")
def covered(vocab: NounVocabulary, tiny_vectors: Path) -> np.ndarray:
    return load_noun_space(vocab, tiny_vectors).covered


def start(models_dir: Path, vectors: Path) -> RunningServer:
    return start_in_thread(server_config("embed", models_dir=models_dir,
                                         word_vectors=str(vectors)), timeout=600)


@pytest.fixture(scope="module")
def stub(models: Path, tiny_vectors: Path) -> Iterator[embed_pb2_grpc.EmbeddingStub]:
    running = start(models, tiny_vectors)
    yield embed_pb2_grpc.EmbeddingStub(client.connect(running.target))
    running.stop()


def test_the_flags_reach_the_config(tiny_vectors: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args(["--word-vectors", str(tiny_vectors),
                              "--word-vectors-format", "glove"])
    config = config_from_args("embed", args)
    assert (config.word_vectors, config.word_vectors_format) == (str(tiny_vectors), "glove")
    assert ServerConfig(service="embed").word_vectors == ""  # default: MiniLM


def test_labels_and_texts_live_in_the_word_vector_space(
        stub: embed_pb2_grpc.EmbeddingStub, photo: np.ndarray, vocab: NounVocabulary,
        covered: np.ndarray) -> None:
    for method in (embed_pb2.EMBEDDING_METHOD_DEVISE, embed_pb2.EMBEDDING_METHOD_CONSE,
                   embed_pb2.EMBEDDING_METHOD_UNSPECIFIED):
        response = stub.LabelImage(embed_pb2.LabelImageRequest(
            image=encode(photo), k=20, method=method), timeout=60)
        assert len(response.labels) == 20
        # only synsets with a vector in the file are in the noun index
        assert all(covered[vocab.index[label.wnid]] for label in response.labels)
    assert response.method == embed_pb2.EMBEDDING_METHOD_DEVISE  # the map's default_method
    texts = stub.EmbedText(embed_pb2.EmbedTextRequest(texts=["golden retriever"]), timeout=60)
    assert texts.dimension == DIM and texts.space.startswith("word-vectors:glove.tiny.txt@")
    np.testing.assert_allclose(texts.embeddings[0].values, [1] + [0] * (DIM - 1), atol=1e-6)
    images = stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[encode(photo)]), timeout=60)
    assert images.dimension == DIM and len(images.embeddings[0].values) == DIM
    # the golden retriever (no hyponyms, covered by its token) is in the index
    labels = stub.LabelImage(embed_pb2.LabelImageRequest(
        image=encode(photo), k=1, under_wnid=GOLDEN_RETRIEVER), timeout=60).labels
    assert [label.wnid for label in labels] == [GOLDEN_RETRIEVER]
    with pytest.raises(grpc.RpcError) as error:
        stub.EmbedText(embed_pb2.EmbedTextRequest(texts=["tax return"]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "none of its words is in the word vectors" in error.value.details()


@pytest.mark.parametrize("texts, field", [(["tax return"], "texts[0]"),
                                          (["golden retriever", "tax return"], "texts[1]")])
def test_a_phrase_the_vectors_lack_names_its_field(
        stub: embed_pb2_grpc.EmbeddingStub, tiny_vectors: Path, texts: list[str],
        field: str) -> None:
    """As the other text errors do (and image.proto promises of INVALID_ARGUMENT), with
    the space as EmbedTextResponse.space names it, not the file's folder on the server."""
    with pytest.raises(grpc.RpcError) as error:
        stub.EmbedText(embed_pb2.EmbedTextRequest(texts=texts), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(error.value) == field
    details = error.value.details()
    what = "text" if len(texts) == 1 else f"text {field[6:-1]}"
    assert details.startswith(f"{what} 'tax return': none of its words is in the word "
                              "vectors of word-vectors:glove.tiny.txt@"), details
    assert str(tiny_vectors.parent) not in details


def test_a_map_for_other_vectors_is_refused(models: Path, tiny_vectors: Path,
                                            tmp_path: Path, photo: np.ndarray,
                                            vocab: NounVocabulary,
                                            covered: np.ndarray) -> None:
    only_minilm = tmp_path / "models"
    shutil.copytree(models / "devise-a-minilm", only_minilm / "devise-minilm")
    running = start(only_minilm, tiny_vectors)
    try:
        stub = embed_pb2_grpc.EmbeddingStub(client.connect(running.target))
        with pytest.raises(grpc.RpcError) as error:
            stub.LabelImage(embed_pb2.LabelImageRequest(
                image=encode(photo), method=embed_pb2.EMBEDDING_METHOD_DEVISE), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.value.details()
        assert "devise-minilm" in details and "maps into 384-d vectors" in details
        assert "glove.tiny.txt" in details and "percept train devise --word-vectors" in details
        assert str(tiny_vectors.parent) not in details  # no server folders to a client
        # ConSE (the default without a usable map) still labels, in the file's space
        response = stub.LabelImage(embed_pb2.LabelImageRequest(image=encode(photo), k=5),
                                   timeout=60)
        assert response.method == embed_pb2.EMBEDDING_METHOD_CONSE
        assert all(covered[vocab.index[label.wnid]] for label in response.labels)
        # ServerInfo lists ConSE, the default, and not the refused map
        served = client.server_info(client.connect(running.target)).models
        assert [(m.name, m.is_default) for m in served] == [
            ("conse-efficientnet-lite0-top10", True)]
    finally:
        running.stop()


def test_a_phrase_the_vectors_lack_fails_only_its_own_request_of_a_batch() -> None:
    """Requests batched together: one whose phrase has no word in the vectors gets its
    INVALID_ARGUMENT, the others their vectors."""
    import functools
    import types

    from services.common.errors import InvalidArgument
    from services.embed.service import EmbeddingService
    from services.embed.word_vectors import UnknownWords

    class Words:
        name = "word-vectors:w.txt@abababababab"

        def encode(self, texts: list[str]) -> np.ndarray:
            if "tax return" in texts:
                raise UnknownWords("'tax return': none of its words is in the word vectors "
                                   "/srv/w.txt", texts.index("tax return"), "tax return")
            return np.arange(len(texts) * 2, dtype=np.float32).reshape(len(texts), 2)

    fake = types.SimpleNamespace(text=Words())
    fake._encode_one_request = functools.partial(
        EmbeddingService._encode_one_request, fake)  # type: ignore[arg-type]
    fake._encode = functools.partial(EmbeddingService._encode, fake)  # type: ignore[arg-type]
    results = EmbeddingService._encode_requests(
        fake, [("a dog", "a cat"), ("tax return",), ("a cow",)])  # type: ignore[arg-type]
    assert [r.shape for r in results[::2]] == [(2, 2), (1, 2)]  # type: ignore[union-attr]
    assert isinstance(results[1], InvalidArgument)
    assert "none of its words" in str(results[1]) and results[1].field == "texts[0]"
    assert "/srv/" not in str(results[1])
    [alone] = EmbeddingService._encode_requests(fake, [("a", "tax return")])  # type: ignore[arg-type]
    assert isinstance(alone, InvalidArgument) and alone.field == "texts[1]"
    together = EmbeddingService._encode_requests(fake, [("a", "b"), ("c",)])  # type: ignore[arg-type]
    assert [r.tolist() for r in together] == [[[0, 1], [2, 3]], [[4, 5]]]  # type: ignore[union-attr]


def test_conse_combines_the_most_probable_classes_the_word_vectors_cover(
        tmp_path: Path, vocab: NounVocabulary, photo: np.ndarray) -> None:
    """With a word-vector file that lacks the photo's ten most probable ImageNet classes,
    ConSE combines the ten most probable classes it has vectors for: the lacking classes'
    zero vectors would otherwise take the places of the top ten (and leave the embedding
    zero)."""
    from services.embed.preprocess import preprocess
    from services.embed.service import CONSE_TOP_T, serving_backbone
    from services.embed.wordnet import imagenet_indices
    from training.nets.devise import conse_embed

    backbone = serving_backbone(torch.device("cpu"))
    pixels = torch.from_numpy(np.array(preprocess(photo))).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        probabilities = torch.softmax(backbone._fc(backbone.features(pixels)), dim=1)
    top = probabilities[0].argsort(descending=True)[:CONSE_TOP_T].tolist()
    wnids = imagenet_wnids()
    # their lemmas and the words in them (a phrase is covered by its words' vectors)
    lemmas = {lemma for i in top for lemma in vocab[wnids[i]].lemmas}
    path = write_glove(tmp_path / "glove.lacking.txt", vocab, omit=frozenset(
        lemmas | {word for lemma in lemmas for word in lemma.split("_")}))
    space = load_noun_space(vocab, path, progress=False)
    rows = imagenet_indices(vocab)
    covered = torch.from_numpy(space.covered[rows].astype(np.float32))
    assert not covered[top].any(), "the file still covers one of the photo's top classes"
    expected = conse_embed(probabilities * covered, torch.from_numpy(space.matrix[rows]),
                           CONSE_TOP_T)[0].numpy()
    empty = tmp_path / "models"
    empty.mkdir()
    running = start(empty, path)
    try:
        stub = embed_pb2_grpc.EmbeddingStub(client.connect(running.target))
        served = stub.EmbedImages(embed_pb2.EmbedImagesRequest(
            images=[encode(photo)], method=embed_pb2.EMBEDDING_METHOD_CONSE), timeout=60)
    finally:
        running.stop()
    vector = np.asarray(served.embeddings[0].values)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
    assert float(vector @ expected) > 0.99, float(vector @ expected)
