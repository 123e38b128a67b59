"""DeViSE training: the hinge rank loss, negatives, the feature cache and a short real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from training.devise_features import compute_features, plan_crops, render_crops
from training.nets.devise import DeViSEMap
from training.train_devise import (
    TrainSettings,
    classifier_init,
    hinge_rank_loss,
    sample_negatives,
    teacher_targets,
    train_map,
)

torch.set_num_threads(1)


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_hinge_rank_loss_is_zero_when_the_margin_is_met() -> None:
    embedded = unit([1.0, 0.0, 0.0])
    positive = unit([1.0, 0.0, 0.0])  # score 1
    negatives = unit([0.0, 1.0, 0.0], [0.0, 0.0, 1.0])[None]  # scores 0 < 1 - 0.1
    assert float(hinge_rank_loss(embedded, positive, negatives, margin=0.1)) == 0.0


def test_hinge_rank_loss_by_hand_when_violated() -> None:
    embedded = unit([1.0, 0.0])
    positive = unit([0.6, 0.8])  # score 0.6
    negatives = unit([0.8, 0.6], [0.0, 1.0])[None]  # scores 0.8 and 0.0
    # max(0, 0.1 - 0.6 + 0.8) + max(0, 0.1 - 0.6 + 0.0) = 0.3
    loss = hinge_rank_loss(embedded, positive, negatives, margin=0.1)
    assert float(loss) == pytest.approx(0.3, abs=1e-6)
    mask = torch.tensor([[False, True]])  # drop the violating negative
    assert float(hinge_rank_loss(embedded, positive, negatives, 0.1, mask)) == 0.0


def test_hinge_rank_gradient_pulls_towards_the_label_and_away_from_the_negative() -> None:
    module = DeViSEMap(4, 2)
    features = torch.tensor([[1.0, 0.5, 0.0, 2.0]])
    positive = unit([1.0, 0.0])
    negatives = unit([0.0, 1.0])[None]
    with torch.no_grad():  # start closer to the negative than to the label
        module.linear.weight.copy_(torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        module.linear.bias.zero_()
    optimiser = torch.optim.SGD(module.parameters(), lr=0.05)
    before = module(features).detach()
    loss = hinge_rank_loss(module(features), positive, negatives, margin=0.1)
    assert float(loss.detach()) > 0
    loss.backward()
    optimiser.step()
    after = module(features).detach()
    assert float(after @ positive.T) > float(before @ positive.T)
    assert float(after @ negatives[0].T) < float(before @ negatives[0].T)


def test_sampled_negatives_come_from_the_pool_and_mask_the_label() -> None:
    pool = torch.tensor([3, 5, 7])
    targets = torch.tensor([5, 9])
    rows, mask = sample_negatives(targets, pool, 50, torch.Generator().manual_seed(0))
    assert rows.shape == mask.shape == (2, 50)
    assert set(rows.unique().tolist()) <= {3, 5, 7}
    assert torch.equal(mask, rows != targets[:, None])
    assert not bool(mask[0][rows[0] == 5].any()) and bool(mask[1].all())


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        image = Image.fromarray(getattr(data, name)())
        image.thumbnail((160, 160))
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def test_crops_stay_inside_the_image_and_are_never_padded(tiny_photos: list[Path]) -> None:
    crops = plan_crops(tiny_photos, crops_per_image=4, size=64, seed=3)
    assert len(crops) == 12 and [c.image for c in crops[:4]] == [0, 0, 0, 0]
    for crop in crops:
        width, height = Image.open(tiny_photos[crop.image]).size
        left, top, right, bottom = crop.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == pytest.approx(bottom - top)  # square
    pixels = render_crops(tiny_photos[0], crops[:4], 64)
    assert pixels.shape == (4, 64, 64, 3) and pixels.dtype == np.uint8
    assert (pixels.reshape(4, -1, 3).max(axis=1) > 30).all()  # no black fill


def test_features_are_cached_and_a_short_run_lowers_the_loss(tiny_photos: list[Path],
                                                             tmp_path: Path) -> None:
    first = compute_features(tiny_photos, crops_per_image=3, size=96, cache_dir=tmp_path,
                             progress=False)
    assert first.features.shape == (9, 1280) and first.logits.shape == (9, 1000)
    assert (first.folder / "features.npy").is_file()
    again = compute_features(tiny_photos, crops_per_image=3, size=96, cache_dir=tmp_path,
                             progress=False)
    assert again.key == first.key
    np.testing.assert_array_equal(again.features, first.features)
    other = compute_features(tiny_photos[:2], crops_per_image=3, size=96, cache_dir=tmp_path,
                             progress=False)
    assert other.key != first.key

    # The teacher's top-1 classes are the labels; the label space is 1000 seeded unit vectors.
    classes, confidence = teacher_targets(first.logits)
    assert classes.shape == (9,) and ((confidence > 0) & (confidence <= 1)).all()
    label_vectors = torch.nn.functional.normalize(
        torch.randn(1000, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    features = torch.from_numpy(first.features)
    targets = torch.from_numpy(classes)
    module = DeViSEMap(1280, 32)
    torch.manual_seed(0)
    history = train_map(module, features, targets, label_vectors, torch.arange(1000),
                        TrainSettings(margin=0.1, negatives=16, steps=20, batch_size=9,
                                      lr=1e-2, seed=0), progress=False)
    assert len(history) == 20
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])


def test_classifier_init_is_the_centred_logit_weighted_sum_of_class_vectors() -> None:
    generator = torch.Generator().manual_seed(0)
    fc_weight, fc_bias = torch.randn(5, 8, generator=generator), torch.randn(5, generator=generator)
    class_vectors = torch.nn.functional.normalize(torch.randn(5, 3, generator=generator), dim=1)
    features = torch.rand(4, 8, generator=generator)
    module = DeViSEMap(8, 3)
    classifier_init(module, fc_weight, fc_bias, class_vectors, features)
    logits = features @ fc_weight.T + fc_bias
    expected = (logits - logits.mean(dim=1, keepdim=True)) @ class_vectors
    torch.testing.assert_close(module(features),
                               torch.nn.functional.normalize(expected, dim=1))


def test_an_out_holding_another_artifact_is_refused_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from training import cli_devise

    other = tmp_path / "models" / "devise-minilm"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"name": "devise-minilm", "version": 4}))
    assert cli_devise.main(["train", "--name", "devise-mine", "--out", str(other),
                            "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                            "--quiet"]) == 2
    assert ("holds the artifact 'devise-minilm', and the export of devise-mine would replace "
            "it") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # was a NaN map, exported
    (["--negatives", "0"], "--negatives must be >= 1, got 0"),  # was a loss of 0, no training
    (["--margin", "-1"], "--margin must be >= 0, got -1"),
    (["--top-t", "0"], "--top-t must be >= 1, got 0"),
    (["--crops-per-image", "0"], "--crops-per-image must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0"),  # was the initial map, exported as trained
    (["--seed", "-1"], "--seed must be >= 0, got -1"),  # was 'expected non-negative integer'
    (["--seed", "4294967296"], "--seed must be 0..4294967295, got 4294967296"),
])
def test_bad_numbers_are_refused_before_anything_loads(
        tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    from training import cli_devise

    out, run = tmp_path / "out", tmp_path / "run"
    assert cli_devise.main(["train", *flags, "--out", str(out), "--run-dir", str(run),
                            "--photos", str(tmp_path / "missing"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not out.exists() and not run.exists()


@pytest.mark.parametrize("flags, message", [
    (["--k", "0", "5"], "--k must be >= 1, got 0 5"),
    (["--hops", "-1"], "--hops must be >= 0, got -1"),
    (["--top-t", "0"], "--top-t must be >= 1, got 0"),
])
def test_eval_refuses_bad_numbers(tmp_path: Path, flags: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from training import cli_devise

    out = tmp_path / "metrics.json"
    assert cli_devise.main(["eval", *flags, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not out.exists()


def test_eval_refuses_a_cache_dir_that_is_a_file_and_another_kind_of_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training import cli_devise

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "metrics.json"
    assert cli_devise.main(["eval", "--cache-dir", str(blocker), "--out", str(out)]) == 2
    assert f"--cache-dir {blocker}: {blocker} is a file" in capsys.readouterr().err
    style = Path(__file__).resolve().parents[2] / "models" / "style-starry-night"
    assert cli_devise.main(["eval", "--model", str(style), "--out", str(out)]) == 2
    assert "is a style artifact, not a DeViSE map" in capsys.readouterr().err


@pytest.mark.parametrize("labels, message", [
    ('{"a.png": "n02084071", "b.png": {"wnid": "n02121808"}}', None),
    ("not json", "is not JSON"),
    ('["a.png"]', "must map each photo's file name to its wnid"),
])
def test_eval_sets_take_either_label_form_and_name_what_is_wrong(
        tmp_path: Path, labels: str, message: str | None) -> None:
    from PIL import Image

    from training.evaluate_devise import EvalSetError, load_eval_set

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "labels.json").write_text(labels)
    if message is None:
        assert load_eval_set(tmp_path).wnids == ["n02084071", "n02121808"]
    else:
        with pytest.raises(EvalSetError, match=message):
            load_eval_set(tmp_path)
    (tmp_path / "b.png").write_bytes(b"not an image")
    if message is None:
        with pytest.raises(EvalSetError, match=r"b.png: not a readable image"):
            load_eval_set(tmp_path)


def test_the_loss_plot_of_a_run_without_steps_says_so(tmp_path: Path) -> None:
    """An empty history (the trainer now refuses `--steps 0`, but the plot of a run with
    no steps must still draw) gives a plot without a curve and without a warning."""
    import warnings

    from training.plots import save_loss_plot

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save_loss_plot({"hinge rank loss": []}, tmp_path / "loss.png")
    assert path.stat().st_size > 0
