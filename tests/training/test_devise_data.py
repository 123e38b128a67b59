"""DeViSE data: ImageFolder labels through WordNet, the evaluation photos, hit@k."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.embed.wordnet import NounVocabulary, imagenet_indices, load_vocabulary
from training.evalsets.build_photos import EVALSET_DIR, MAX_SIDE
from training.evaluate_devise import hits_at_k, load_eval_set, masked_classes, mean_score
from training.train_devise import ImageFolderError, check_training_photos, parse_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vocab() -> NounVocabulary:
    return load_vocabulary()


def write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)


def test_image_folder_accepts_wnids_and_lemmas(tmp_path: Path, vocab: NounVocabulary) -> None:
    write_image(tmp_path / "n02084071" / "a.png", (200, 10, 10))
    write_image(tmp_path / "golden_retriever" / "b.jpg", (10, 200, 10))
    write_image(tmp_path / "golden_retriever" / "nested" / "c.png", (10, 10, 200))
    write_image(tmp_path / "Giant Panda" / "d.png", (90, 90, 90))
    (tmp_path / "golden_retriever" / "notes.txt").write_text("not an image")
    parsed = parse_image_folder(tmp_path, vocab)
    assert parsed.classes == {"n02084071": "n02084071", "golden_retriever": "n02099601",
                              "Giant Panda": "n02510455"}
    assert [p.name for p in parsed.paths] == ["d.png", "b.jpg", "c.png", "a.png"]
    assert parsed.wnids == ["n02510455", "n02099601", "n02099601", "n02084071"]


def test_ambiguous_lemma_prefers_the_imagenet_sense(tmp_path: Path,
                                                    vocab: NounVocabulary) -> None:
    write_image(tmp_path / "crane" / "a.png", (1, 2, 3))
    imagenet = [vocab.synsets[int(i)].wnid for i in imagenet_indices(vocab)]
    parsed = parse_image_folder(tmp_path, vocab, preferred=imagenet)
    assert parsed.classes["crane"] in imagenet  # the bird or the machine, both ImageNet
    assert len(parsed.ambiguous["crane"]) >= 3  # the other senses are reported


def test_unknown_class_names_are_listed(tmp_path: Path, vocab: NounVocabulary) -> None:
    write_image(tmp_path / "dog" / "a.png", (1, 2, 3))
    write_image(tmp_path / "flibbertigibbetzz" / "b.png", (1, 2, 3))
    write_image(tmp_path / "n99999999" / "c.png", (1, 2, 3))
    with pytest.raises(ImageFolderError) as error:
        parse_image_folder(tmp_path, vocab)
    message = str(error.value)
    assert "flibbertigibbetzz" in message and "n99999999" in message and "2 class" in message
    assert "dog," not in message


def test_empty_trees_are_errors(tmp_path: Path, vocab: NounVocabulary) -> None:
    with pytest.raises(ImageFolderError, match="no class subfolders"):
        parse_image_folder(tmp_path, vocab)
    (tmp_path / "dog").mkdir()
    with pytest.raises(ImageFolderError, match="no images"):
        parse_image_folder(tmp_path, vocab)


def test_held_out_and_evaluation_photos_are_refused_for_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never trained on"):
        check_training_photos([tmp_path / "heldout" / "x.jpg"])
    with pytest.raises(ValueError, match="never trained on"):
        check_training_photos([EVALSET_DIR / "darknet-dog.jpg"])
    # a real training photo passes; a renamed copy of an evaluation photo does not
    (tmp_path / "train").mkdir()
    Image.new("RGB", (16, 16), (30, 60, 90)).save(tmp_path / "train" / "x.jpg")
    check_training_photos([tmp_path / "train" / "x.jpg"])
    (tmp_path / "train" / "dog.jpg").write_bytes((EVALSET_DIR / "darknet-dog.jpg").read_bytes())
    with pytest.raises(ValueError, match="is the held-out/evaluation photo"):
        check_training_photos([tmp_path / "train" / "dog.jpg"])


def test_eval_set_labels_are_wordnet_nouns_and_files_exist(vocab: NounVocabulary) -> None:
    evalset = load_eval_set(EVALSET_DIR, vocab)
    assert 20 <= len(evalset.files) <= 40
    labels = json.loads((EVALSET_DIR / "labels.json").read_text())
    total = 0
    for path, wnid, lemma in zip(evalset.files, evalset.wnids, evalset.lemmas, strict=True):
        assert lemma.lower() in {x.lower() for x in vocab[wnid].lemmas}, (path.name, lemma)
        entry = labels[path.name]
        assert len(entry["sha256_of_original"]) == 64 and entry["source"]
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) <= MAX_SIDE
        total += path.stat().st_size
    assert total < 2_000_000
    assert (EVALSET_DIR / "README.md").is_file()


def test_eval_set_is_disjoint_from_the_training_photos() -> None:
    labels = json.loads((EVALSET_DIR / "labels.json").read_text())
    originals = {entry["sha256_of_original"] for entry in labels.values()}
    from training.data.photos import HELDOUT, PHOTOS

    training_names = {p.original_path.rsplit("/", 1)[-1] for p in PHOTOS
                      if p.name not in HELDOUT and p.package == "scikit-image"}
    used = {entry["source"].rsplit("/", 1)[-1] for entry in labels.values()
            if entry["source"].startswith("scikit-image")}
    assert not used & training_names
    manifest = REPO / "data" / "photos" / "manifest.json"
    if manifest.is_file():
        trained = {p["sha256"] for p in json.loads(manifest.read_text())["photos"]
                   if p["split"] == "train"}
        assert not originals & trained


def test_load_eval_set_reports_missing_files_and_bad_wnids(tmp_path: Path,
                                                           vocab: NounVocabulary) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({
        "a.jpg": {"wnid": "n02084071", "lemma": "dog"},
        "b.jpg": {"wnid": "n00000001", "lemma": "nothing"}}))
    write_image(tmp_path / "b.jpg", (1, 2, 3))
    with pytest.raises(ValueError, match=r"a\.jpg: file missing.*n00000001"):
        load_eval_set(tmp_path, vocab)


def test_hits_at_k_by_hand() -> None:
    ranked = np.array([[5, 3, 9, 1],    # truth 3 at position 1
                       [2, 4, 6, 8],    # truth 7 absent
                       [7, 0, 0, 0],    # truth 7 at position 0
                       [-1, -1, -1, -1]])
    truth = [{3}, {7}, {7}, {1}]
    assert hits_at_k(ranked, truth, [1, 2, 4]) == {1: 0.25, 2: 0.5, 4: 0.5}
    # hierarchical: any accepted neighbour counts
    near = [{3, 9}, {8, 7}, {7}, {1}]
    assert hits_at_k(ranked, near, [1, 2, 4]) == {1: 0.25, 2: 0.5, 4: 0.75}
    with pytest.raises(ValueError):
        hits_at_k(ranked, truth[:2], [1])
    assert mean_score({"flat": {1: 0.0, 5: 0.5}, "zero_shot": {1: 0.25, 5: 0.25},
                       "hierarchical": {1: 1.0, 5: 1.0}}) == pytest.approx(0.5)


def test_masked_classes_are_the_label_and_its_imagenet_kinds(vocab: NounVocabulary) -> None:
    rows = imagenet_indices(vocab)
    tabby = masked_classes(vocab, "n02123045", rows)
    assert [vocab.synsets[int(rows[i])].wnid for i in tabby] == ["n02123045"]
    assert len(masked_classes(vocab, "n02084071", rows)) == 118  # every dog breed
    assert len(masked_classes(vocab, "n02439033", rows)) == 0  # giraffe: not in ImageNet-1k
