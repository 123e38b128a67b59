"""``percept train devise`` / ``percept eval devise`` with ``--word-vectors``: a real tiny
GloVe file, a real (tiny) training run on real photos, the artifact's record of the vector
source, and the evaluation refusing vectors the map was not trained against."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from services.embed.word_vectors import load_external_vectors, vectors_for_vocab_with_coverage
from services.embed.wordnet import NounVocabulary, imagenet_wnids, load_vocabulary
from training import cli_devise
from training.devise_features import compute_features
from training.export import load_exported
from training.train_devise import default_name, teacher_targets

DIM = 8
CROPS = 2


@pytest.fixture(scope="module")
def vocab() -> NounVocabulary:
    return load_vocabulary()


def write_glove(path: Path, words: list[str], dim: int = DIM, seed: int = 0) -> Path:
    """A GloVe-format file (no header) with a seeded random vector per word."""
    rng = np.random.default_rng(seed)
    path.write_text("".join(f"{w} {' '.join(f'{x:.5f}' for x in rng.standard_normal(dim))}\n"
                            for w in words))
    return path


def class_tokens(vocab: NounVocabulary) -> list[str]:
    """The first lemma (an underscore token) of every ImageNet class, once each."""
    return list(dict.fromkeys(vocab[w].lemmas[0] for w in imagenet_wnids()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devise-wv")


@pytest.fixture(scope="module")
def photos(workdir: Path) -> Path:
    folder = workdir / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        image = Image.fromarray(getattr(data, name)())
        image.thumbnail((160, 160))
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


def train_args(workdir: Path, photos: Path, vectors: Path, out: str) -> list[str]:
    return ["train", "--word-vectors", str(vectors), "--photos", str(photos),
            "--crops-per-image", str(CROPS), "--val-photos", "", "--cache-dir",
            str(workdir / "cache"), "--steps", "4", "--batch-size", "4", "--negatives", "8",
            "--out", str(workdir / out), "--run-dir", str(workdir / "runs" / out),
            "--device", "cpu", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(workdir: Path, photos: Path, vocab: NounVocabulary,
            one_torch_thread: None) -> Iterator[Path]:
    vectors = write_glove(workdir / "glove.tiny.8d.txt",
                          [*class_tokens(vocab), "golden", "retriever"])
    assert cli_devise.main(train_args(workdir, photos, vectors, "devise-tiny")) == 0
    yield vectors


def test_training_records_the_vector_source_and_its_coverage(
        trained: Path, workdir: Path, vocab: NounVocabulary) -> None:
    out = workdir / "devise-tiny"
    config = json.loads((out / "config.json").read_text())
    sha = hashlib.sha256(trained.read_bytes()).hexdigest()
    _, covered, report = vectors_for_vocab_with_coverage(vocab, load_external_vectors(trained))
    assert report.imagenet_covered == 1000  # every class's first lemma is a token
    recorded = config["noun_vectors"]
    assert {k: recorded[k] for k in ("source", "path", "sha256", "format", "dimension",
                                     "words", "synsets")} == {
        "source": "word-vectors", "path": str(trained.resolve()), "sha256": sha,
        "format": "glove", "dimension": DIM, "words": len(class_tokens(vocab)) + 2,
        "synsets": 82_115}
    assert recorded["coverage"] == report.as_dict()
    assert recorded["coverage"]["covered"] == int(covered.sum())
    assert config["space"] == f"word-vectors:{trained.name}@{sha[:12]}"
    assert config["architecture"] == {"type": "devise-linear", "in_features": 1280,
                                      "out_features": DIM}
    module, _ = load_exported(out)
    assert module.linear.weight.shape == (DIM, 1280)  # type: ignore[union-attr]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["crops"] == 3 * CROPS and metrics["crops_without_vector"] == 0
    assert metrics["coverage"] == report.as_dict()
    provenance = json.loads((out / "provenance.json").read_text())
    assert {"path": str(trained.resolve()), "sha256": sha, "kind": "word vectors",
            "format": "glove"} in provenance["data"]


def test_a_resume_takes_the_word_vectors_from_the_checkpoint(
        trained: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume without --word-vectors goes on in the run's own word space (and names the
    artifact after it), not in the default MiniLM one."""
    out = workdir / "devise-tiny-resumed"
    assert cli_devise.main(["train", "--run-dir", str(workdir / "runs" / "devise-tiny"),
                            "--out", str(out), "--cache-dir", str(workdir / "cache"),
                            "--steps", "5", "--resume", "--device", "cpu", "--threads", "1",
                            "--quiet"]) == 0
    assert f"--word-vectors {trained}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "devise-glove-tiny-8d"
    assert config["noun_vectors"]["path"] == str(trained.resolve())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


def test_crops_whose_label_has_no_vector_are_left_out(
        trained: Path, workdir: Path, photos: Path, vocab: NounVocabulary,
        capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(photos.iterdir())
    cache = compute_features(files, crops_per_image=CROPS, seed=0, device="cpu",
                             cache_dir=workdir / "cache", progress=False)  # cached by training
    teacher, _ = teacher_targets(cache.logits)
    wnids = imagenet_wnids()
    dropped_class = int(np.bincount(teacher).argmax())
    tokens = [t for t in class_tokens(vocab) if t != vocab[wnids[dropped_class]].lemmas[0]]
    vectors = write_glove(workdir / "fewer.txt", tokens, seed=1)
    _, covered, _ = vectors_for_vocab_with_coverage(vocab, load_external_vectors(vectors))
    rows = vocab.indices_of(wnids)
    assert not covered[rows[dropped_class]]  # that class really has no vector now
    expected = int((~covered[rows[teacher]]).sum())
    assert expected >= 1
    capsys.readouterr()
    assert cli_devise.main(train_args(workdir, photos, vectors, "devise-fewer")) == 0
    printed = capsys.readouterr().out
    assert f"{expected} of {3 * CROPS} crops left out" in printed
    assert "ImageNet classes (99." in printed  # the coverage line
    metrics = json.loads((workdir / "devise-fewer" / "metrics.json").read_text())
    assert metrics["crops_without_vector"] == expected
    assert metrics["crops"] == 3 * CROPS - expected


def test_eval_uses_the_recorded_vectors_and_refuses_others(
        trained: Path, workdir: Path, photos: Path, vocab: NounVocabulary,
        capsys: pytest.CaptureFixture[str]) -> None:
    evalset = workdir / "evalset"
    evalset.mkdir(exist_ok=True)
    labels = {"chelsea.jpg": ("n02123045", "tabby"), "coffee.jpg": ("n07920052", "espresso"),
              "astronaut.jpg": ("n09818022", "astronaut")}
    for name in labels:
        (evalset / name).write_bytes((photos / name).read_bytes())
    (evalset / "labels.json").write_text(json.dumps(
        {name: {"wnid": wnid, "lemma": lemma} for name, (wnid, lemma) in labels.items()}))
    _, covered, report = vectors_for_vocab_with_coverage(vocab, load_external_vectors(trained))
    common = ["--model", str(workdir / "devise-tiny"), "--photos", str(evalset),
              "--cache-dir", str(workdir / "cache"), "--device", "cpu", "--threads", "1",
              "--show", "0"]
    for extra, name in (([], "recorded.json"), (["--word-vectors", str(trained)], "given.json")):
        out = workdir / name
        assert cli_devise.main(["eval", *common, *extra, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["candidates"] == report.covered == int(covered.sum())
        assert result["word_space"]["coverage"] == report.as_dict()
        truth = vocab.indices_of([wnid for wnid, _ in labels.values()])
        assert result["eval_set"]["labels_without_vector"] == int((~covered[truth]).sum())
        ranked = [item.split("(")[-1].rstrip(")") for entry in result["per_image"]
                  for key in ("devise_flat", "conse_flat", "conse_zero_shot")
                  for item in entry[key]]
        assert ranked and all(covered[vocab.index[w]] for w in ranked)
        # astronaut is the one label no ImageNet class is: the classifier, the baseline,
        # can never name it, whatever its ranking
        outside = result["labels_outside_imagenet"]
        assert outside["photos"] == 1
        assert set(outside["results"]) == {"devise", "conse", "classifier"}
        assert set(outside["results"]["classifier"]["flat"].values()) == {0.0}
        assert set(result["reference_classifier"]) == {"flat", "hierarchical"}

    capsys.readouterr()
    other = write_glove(workdir / "other.txt", class_tokens(vocab), seed=7)  # same words
    assert cli_devise.main(["eval", *common, "--word-vectors", str(other),
                            "--out", str(workdir / "x.json")]) == 2
    error = capsys.readouterr().err
    assert "was trained against the word vectors" in error and str(trained.resolve()) in error
    wide = write_glove(workdir / "wide.txt", class_tokens(vocab), dim=DIM + 1)
    assert cli_devise.main(["eval", *common, "--word-vectors", str(wide),
                            "--out", str(workdir / "x.json")]) == 2
    assert f"maps into {DIM}-d vectors" in capsys.readouterr().err
    # the committed MiniLM map against the file
    assert cli_devise.main(["eval", *common[2:], "--model", "models/devise-minilm",
                            "--word-vectors", str(trained), "--out",
                            str(workdir / "x.json")]) == 2
    assert "maps into 384-d vectors" in capsys.readouterr().err


def test_default_names_never_overwrite_the_minilm_map() -> None:
    assert default_name(None) == "devise-minilm"
    assert default_name("/data/glove.6B.300d.txt") == "devise-glove-6b-300d"
    assert default_name("GoogleNews-vectors-negative300.bin.gz") == \
        "devise-googlenews-vectors-negative300"
    assert default_name("wiki.en.vec") == "devise-wiki-en"
