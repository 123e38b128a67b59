"""Data preparation on real images (small fixtures made from scikit-image's photos)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from training.data import cli
from training.data.arrays import PreparedDataError, load_prepared
from training.data.images import (
    centre_square,
    decode_rgb,
    displayed_size,
    load_centre_crop,
    to_rgb,
)
from training.data.prepare import PrepareError, find_sources, prepare


def _alpha_astronaut() -> Image.Image:
    rgba = Image.fromarray(skdata.astronaut()).convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, :128] = 0  # a fully transparent strip on the left
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per tricky source kind: RGB JPEG, grey PNG, RGBA, CMYK JPEG, palette PNG,
    16-bit grey, a wide panorama and a photo with an EXIF rotation."""
    root = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(skdata.astronaut())
    files = {
        "rgb_jpeg": root / "astronaut.jpg",
        "grey_png": root / "camera.png",
        "rgba_png": root / "astronaut_alpha.png",
        "cmyk_jpeg": root / "chelsea_cmyk.jpg",
        "palette_png": root / "coffee_palette.png",
        "grey16_png": root / "camera16.png",
        "panorama_jpeg": root / "panorama.jpg",
        "rotated_jpeg": root / "rotated.jpg",
    }
    astronaut.save(files["rgb_jpeg"], quality=92)
    Image.fromarray(skdata.camera()).save(files["grey_png"])
    _alpha_astronaut().save(files["rgba_png"])
    Image.fromarray(skdata.chelsea()).convert("CMYK").save(files["cmyk_jpeg"], quality=92)
    Image.fromarray(skdata.coffee()).convert("P", palette=Image.Palette.ADAPTIVE).save(
        files["palette_png"])
    Image.fromarray(skdata.camera().astype(np.uint16) * 257).save(files["grey16_png"])
    coffee = skdata.coffee()  # 400 x 600: a 3:1 panorama from its middle rows
    Image.fromarray(np.ascontiguousarray(coffee[100:300])).save(files["panorama_jpeg"],
                                                                 quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(skdata.coffee()).save(files["rotated_jpeg"], quality=92, exif=exif)
    return files


@pytest.mark.parametrize("kind", ["rgb_jpeg", "grey_png", "rgba_png", "cmyk_jpeg",
                                  "palette_png", "grey16_png"])
def test_every_mode_decodes_to_rgb(sources: dict[str, Path], kind: str) -> None:
    image = decode_rgb(sources[kind])
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    assert array.mean() > 40  # real content, not a black frame


def test_grey_sources_stay_grey_and_16_bit_is_scaled(sources: dict[str, Path]) -> None:
    grey = np.asarray(decode_rgb(sources["grey_png"])).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    grey16 = np.asarray(decode_rgb(sources["grey16_png"])).astype(int)
    assert np.abs(grey16 - grey).max() <= 1


def test_transparency_is_composited_on_white_not_black(sources: dict[str, Path]) -> None:
    array = np.asarray(decode_rgb(sources["rgba_png"]))
    assert (array[:, :128] == 255).all()
    assert np.array_equal(array[:, 200:], skdata.astronaut()[:, 200:])
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(sources: dict[str, Path]) -> None:
    assert displayed_size(sources["rotated_jpeg"]) == (400, 600)
    assert decode_rgb(sources["rotated_jpeg"]).size == (400, 600)


def test_fast_centre_crop_matches_a_full_decode(sources: dict[str, Path]) -> None:
    """draft() + reduce + BICUBIC agrees with a full decode + LANCZOS resize (> 30 dB)."""
    fast = load_centre_crop(sources["rgb_jpeg"], 96).astype(np.float64)
    full = Image.open(sources["rgb_jpeg"]).convert("RGB")
    naive = np.asarray(full.resize((96, 96), Image.Resampling.LANCZOS,
                                   box=centre_square(*full.size))).astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((fast - naive) ** 2))
    assert fast.shape == (96, 96, 3)
    assert psnr > 30


def test_prepare_shapes_and_exact_pairs(sources: dict[str, Path], tmp_path: Path) -> None:
    files = sorted(sources.values())
    manifest = prepare(files, tmp_path, sizes=[16, 64], crops_per_image=3, seed=1, workers=2,
                       progress=False)
    prepared = load_prepared(tmp_path)
    hr, lr = prepared.arrays[64], prepared.arrays[16]
    # every source is bigger than 64 px, so each gives 3 crops
    assert hr.shape == (3 * len(files), 64, 64, 3) and lr.shape == (3 * len(files), 16, 16, 3)
    assert hr.dtype == np.uint8 and manifest["sizes"] == [64, 16]
    for i in range(len(hr)):
        expected = np.asarray(Image.fromarray(hr[i]).resize((16, 16), Image.Resampling.BICUBIC))
        assert np.array_equal(lr[i], expected), "LR must be the bicubic reduction of HR"


def test_no_black_padding(tmp_path: Path) -> None:
    """Photos with no dark pixel at all (levels 70-255), in wide, tall and square shapes:
    any dark border row in a crop would be padding."""
    photos = tmp_path / "bright"
    photos.mkdir()
    bright = (70 + skdata.astronaut().astype(np.float64) * (185 / 255)).astype(np.uint8)
    Image.fromarray(bright).save(photos / "square.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(bright[150:310])).save(photos / "wide.png")
    Image.fromarray(np.ascontiguousarray(bright[:, 200:330])).save(photos / "tall.png")
    prepare(sorted(photos.iterdir()), tmp_path / "out", sizes=[96, 24], crops_per_image=4,
            seed=2, workers=1, progress=False)
    for size in (96, 24):
        for crop in load_prepared(tmp_path / "out").arrays[size]:
            for border in (crop[0], crop[-1], crop[:, 0], crop[:, -1]):
                assert border.min() > 40, "a dark border row: the crop was padded"


def test_panorama_is_centre_cropped_not_padded(sources: dict[str, Path], tmp_path: Path) -> None:
    prepare([sources["panorama_jpeg"]], tmp_path, sizes=[64], crops_per_image=1, seed=0,
            workers=1, progress=False)
    crop = load_prepared(tmp_path).arrays[64][0]
    panorama = Image.open(sources["panorama_jpeg"]).convert("RGB")
    assert panorama.size == (600, 200)
    expected = np.asarray(panorama.resize((64, 64), Image.Resampling.BICUBIC,
                                          box=(200, 0, 400, 200)))
    assert np.abs(crop.astype(int) - expected.astype(int)).mean() < 3


def test_order_is_deterministic_for_a_seed(sources: dict[str, Path], tmp_path: Path) -> None:
    files = [sources["rgb_jpeg"], sources["grey_png"], sources["palette_png"]]
    first = prepare(files, tmp_path / "a", sizes=[32], crops_per_image=4, seed=7, workers=2,
                    progress=False)
    second = prepare(files, tmp_path / "b", sizes=[32], crops_per_image=4, seed=7, workers=1,
                     progress=False)
    other = prepare(files, tmp_path / "c", sizes=[32], crops_per_image=4, seed=8, workers=2,
                    progress=False)
    a, b, c = (load_prepared(tmp_path / d).arrays[32] for d in "abc")
    assert first["items"] == second["items"] and np.array_equal(a, b)
    assert first["items"] != other["items"] and not np.array_equal(a, c)
    # the order is shuffled, not grouped by source
    items = first["items"]
    assert isinstance(items, list)
    assert [item[0] for item in items] != sorted(item[0] for item in items)


def test_manifest_records_sources_and_sha256(sources: dict[str, Path], tmp_path: Path) -> None:
    files = [sources["rgb_jpeg"], sources["cmyk_jpeg"]]
    prepare(files, tmp_path, sizes=[32, 8], crops_per_image=2, seed=3, workers=1,
            progress=False, command="percept data prepare --test")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["command"] == "percept data prepare --test"
    assert manifest["arrays"]["32"]["shape"] == [4, 32, 32, 3]
    for entry, path in zip(manifest["sources"], sorted(files), strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["path"].endswith(path.name)
    assert len(manifest["items"]) == 4


def test_heldout_photos_are_refused(tmp_path: Path, sources: dict[str, Path]) -> None:
    heldout = tmp_path / "photos" / "heldout"
    heldout.mkdir(parents=True)
    (heldout / "a.jpg").write_bytes(sources["rgb_jpeg"].read_bytes())
    with pytest.raises(PrepareError, match="held-out"):
        find_sources([tmp_path / "photos"])
    assert find_sources([tmp_path / "photos"], allow_heldout=True) == [heldout / "a.jpg"]
    prepare([heldout / "a.jpg"], tmp_path / "out", sizes=[32], progress=False, workers=1)
    with pytest.raises(PreparedDataError, match="held-out"):
        load_prepared(tmp_path / "out")


@pytest.mark.parametrize("which", ["evaluation photo", "scikit-image's held-out sample"])
def test_a_copy_of_a_held_out_photo_under_another_name_is_refused(
        tmp_path: Path, which: str) -> None:
    """The folder's name is not the guard: a held-out or evaluation photo's bytes are
    refused as training data wherever they are and whatever they are called."""
    from training.data.photos import skimage_root

    original = (Path(__file__).resolve().parents[2] / "training" / "evalsets" / "photos"
                / "darknet-dog.jpg") if which == "evaluation photo" else (
        skimage_root() / "skimage" / "data" / "chelsea.png")
    photos = tmp_path / "my-photos"
    photos.mkdir()
    (photos / "renamed.jpg").write_bytes(original.read_bytes())
    with pytest.raises(PrepareError, match=r"renamed.jpg is the held-out/evaluation photo"):
        find_sources([photos])
    assert find_sources([photos], allow_heldout=True) == [photos / "renamed.jpg"]


def test_cli_reports_errors_and_exits_non_zero(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prepare", "--photos", str(tmp_path / "missing"), "--out",
                     str(tmp_path / "out"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.new("RGB", (40, 40), (90, 120, 200)).save(empty / "blue.png")
    assert cli.main(["prepare", "--photos", str(empty), "--out", str(blocker / "sub"),
                     "--quiet"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert cli.main(["prepare", "--photos", str(empty), "--out", str(tmp_path / "ok"),
                     "--sizes", "16", "--quiet", "--workers", "1"]) == 0
    assert load_prepared(tmp_path / "ok").arrays[16].shape == (1, 16, 16, 3)


def test_an_up_to_date_folder_is_left_alone_and_anything_else_rebuilt(
        sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for key in ("rgb_jpeg", "grey_png"):
        (photos / sources[key].name).write_bytes(sources[key].read_bytes())
    out = tmp_path / "out"
    args = ["prepare", "--photos", str(photos), "--out", str(out), "--sizes", "32", "8",
            "--crops-per-image", "2", "--workers", "1", "--quiet"]

    def run(*extra: str) -> str:
        assert cli.main([*args, *extra]) == 0
        return capsys.readouterr().out

    def stamps() -> list[int]:
        return [(out / name).stat().st_mtime_ns
                for name in ("manifest.json", "images_32.npy", "images_8.npy")]

    assert "up to date" not in run()
    before = stamps()
    assert "[prepare] up to date: 4 items x sizes [32, 8] from 2 images" in run()
    assert stamps() == before  # not rewritten
    assert "up to date" not in run("--force")
    assert "up to date" not in run("--seed", "1")  # other crops
    assert load_prepared(out).manifest["seed"] == 1
    assert "up to date" not in run()  # back to seed 0
    with Image.open(photos / sources["grey_png"].name) as image:  # same name, new pixels
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / sources["grey_png"].name)
    assert "up to date" not in run()
    assert "up to date" in run()
    np.save(out / "images_8.npy", np.zeros((3, 8, 8, 3), np.uint8))  # a damaged array
    assert "up to date" not in run()
    assert load_prepared(out).arrays[8].shape == (4, 8, 8, 3)
    (out / "manifest.json").unlink()  # as an interrupted run leaves it
    assert "up to date" not in run()


def test_a_rebuild_first_removes_the_manifest(sources: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted rebuild must not leave the old manifest vouching for new arrays."""
    from training.data import prepare as prepare_module

    files = [sources["rgb_jpeg"]]
    prepare(files, tmp_path, sizes=[32], crops_per_image=2, seed=0, workers=1, progress=False)

    def interrupted(task: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, tmp_path, sizes=[32], crops_per_image=2, seed=1, workers=1,
                progress=False)
    with pytest.raises(PreparedDataError, match="not found"):
        load_prepared(tmp_path)


def test_a_truncated_image_is_named_and_leaves_no_arrays(
        sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its header reads, its body does not: was a worker traceback and half-written arrays."""
    photos = tmp_path / "photos"
    photos.mkdir()
    good = sources["rgb_jpeg"].read_bytes()
    (photos / "good.jpg").write_bytes(good)
    (photos / "cut.jpg").write_bytes(good[:len(good) // 3])
    out = tmp_path / "out"
    for workers in ("1", "2"):
        assert cli.main(["prepare", "--photos", str(photos), "--out", str(out), "--sizes",
                         "32", "8", "--workers", workers, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"cannot decode image {photos / 'cut.jpg'}" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == []


def test_an_out_holding_other_files_is_refused_and_left_alone(
        sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--out data/photos` replaced the photos' own manifest.json with the arrays'."""
    photos = tmp_path / "photos"
    (photos / "train").mkdir(parents=True)
    (photos / "train" / "a.jpg").write_bytes(sources["rgb_jpeg"].read_bytes())
    manifest = photos / "manifest.json"
    manifest.write_text('{"photos": []}\n')
    for out in (photos, photos / "train"):
        assert cli.main(["prepare", "--photos", str(photos / "train"), "--out", str(out),
                         "--sizes", "16", "--workers", "1", "--quiet"]) == 2
        assert f"--out {out} holds other files" in capsys.readouterr().err
    assert manifest.read_text() == '{"photos": []}\n'
    assert sorted(p.name for p in photos.rglob("*")) == ["a.jpg", "manifest.json", "train"]
    lone = tmp_path / "lone"  # only a foreign manifest.json
    lone.mkdir()
    (lone / "manifest.json").write_text('{"photos": []}\n')
    assert cli.main(["prepare", "--photos", str(photos / "train"), "--out", str(lone),
                     "--sizes", "16", "--workers", "1", "--quiet"]) == 2
    assert "not a prepared-arrays manifest" in capsys.readouterr().err
    assert (lone / "manifest.json").read_text() == '{"photos": []}\n'


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"),  # was a numpy traceback
    (["--workers", "-2"], "--workers must be >= 1, got -2"),  # was silently 1
])
def test_bad_numbers_are_refused(tmp_path: Path, sources: dict[str, Path], flags: list[str],
                                 message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prepare", "--photos", str(sources["rgb_jpeg"]), "--out",
                     str(tmp_path / "out"), "--sizes", "16", "--quiet", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_arrays_too_large_for_the_disk_or_the_trainers_are_refused_before_any_is_made(
        tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--sizes 100000 once made a 690 GB sparse file and then ground on; now the size is
    capped, and arrays that would not fit on the disk are refused with their size."""
    import shutil
    from collections import namedtuple

    from training.data import prepare as prepare_module

    out = tmp_path / "out"
    base = ["prepare", "--photos", str(sources["rgb_jpeg"]), "--out", str(out), "--quiet"]
    assert cli.main([*base, "--sizes", "100000"]) == 2
    assert "--sizes 100000 is over 2048 px" in capsys.readouterr().err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**29, 2**29))
    assert cli.main([*base, "--sizes", "64", "--crops-per-image", "4"]) == 2
    assert "GiB free: prepare fewer --crops-per-image" in capsys.readouterr().err
    assert not list(out.glob("*.npy")) and prepare_module.SPARE_BYTES == 2**30


def test_a_link_to_a_photo_found_anyway_is_one_photo(sources: dict[str, Path],
                                                     tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(sources["rgb_jpeg"].read_bytes())
    (photos / "b.jpg").symlink_to("a.jpg")
    (photos / "gone.jpg").symlink_to("missing.jpg")  # a dangling link is no photo
    found = find_sources([photos])
    assert found == [photos / "a.jpg"]


def test_a_large_jpeg_is_draft_decoded_at_the_smallest_scale_that_is_enough(
        tmp_path: Path) -> None:
    """The lecture's reduced-size DCT decoding: a 2048 x 1536 JPEG needed at 300 x 200 is
    decoded at 1/4 (512 x 384; 1/8 would be under 300 wide), never whole; at 200 x 150,
    at 1/8."""
    path = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1536, 2048, 3), np.uint8)).save(path, quality=80)
    assert decode_rgb(path, need=(300, 200)).size == (512, 384)
    assert decode_rgb(path, need=(200, 150)).size == (256, 192)
    assert decode_rgb(path).size == (2048, 1536)  # nothing needed: the whole image
