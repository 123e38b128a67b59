"""``percept eval style``: quality checks of fast style-transfer artifacts on held-out photos.

For every ``models/style-*`` artifact and every held-out photo it measures:

- **Style-loss ratio**: the Gram style loss (Gatys et al. 2016, eqs. 4-5) of the stylised
  photo against the style image, divided by that of the photo itself, with the model's own
  loss network from its config.json (VGG pooling, style layers, per-layer weights,
  style-image size). Below 1 means the network moved the photo's feature statistics
  towards the style. **Gram ratios**: the same per layer (relu1_2 ... relu4_3) with the
  standard max-pooling VGG19 and no weights, and their mean.
- **Content loss** at relu2_2 (the training layer) and relu3_3 (Johnson et al. 2016,
  eq. 2) of the stylised photo against the photo, and as a ratio to the content loss of the
  style image (resized to the photo) against the photo: the output must stay far closer to
  the photo's content than the painting is.
- **Nyquist ratio** (checkerboard check; Odena, Dumoulin & Olah 2016, "Deconvolution and
  Checkerboard Artifacts"): the spectral power at the Nyquist frequency (the 2D FFT's
  highest frequency along each axis) relative to its neighbouring frequencies, in the
  output over the same in the photo (:func:`nyquist_ratio`). A transposed convolution's
  uneven overlap paints a period-2 pattern, a spike at Nyquist; resize-convolution does
  not. The plain share of power at Nyquist (:func:`nyquist_energy_ratio`) is reported too.
  A freshly initialised network is measured as a baseline.
- **Tiling agreement** (``--tiling PX``): the service stylises a large image in
  overlapping tiles, and each tile is instance-normalised by its own statistics, so the
  tiled result differs a little from one pass over the whole image. Each photo is resized
  to 1100x700 and stylised both ways, in PX-px tiles with the service's tiler
  (``services.common.tiling``, 64 px feathered overlaps) and whole: the PSNR of one against
  the other, and the bar it must clear, the PSNR of the whole-image result against itself
  shifted by 2 px (``tiling_gap`` is the difference; the service test asks for 3 dB on
  chelsea in 576 px tiles).

It prints a table, writes ``metrics.json`` under ``--out`` (and, with
``--update-metrics``, a ``heldout`` block into each artifact's metrics.json), and saves a
grid: held-out photos x every style, plus one column with the colour preserved
(luminance-only transfer, Gatys et al. 2016b). By default the grid is the README's
(``docs/images/style_grid.png``) only when the default models are measured on the default
photos; with ``--models`` or ``--photos`` it goes to ``--out`` (:func:`grid_path`).

Each model is measured against the style image it was trained on: the one whose sha256
its config.json records (:meth:`StyleModel.find_style_image`; ``--style-image`` supplies
it when it is neither bundled under the style's name nor where provenance.json says).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from training import image_quality
from training.assets import REPO_ROOT
from training.data.folders import check_writable

#: Photos of the held-out split that scikit-image bundles (training.data.photos.HELDOUT),
#: used when data/photos/heldout has not been assembled.
SKIMAGE_HELDOUT = ("chelsea", "coffee")
#: The default ``--photos`` folder (``percept data`` assembles it).
HELDOUT_PHOTOS = REPO_ROOT / "data/photos/heldout"
#: The grid the README shows, written by default only for the default models and photos.
README_GRID = REPO_ROOT / "docs/images/style_grid.png"
#: The grid's file name under ``--out`` otherwise.
GRID_NAME = "style_grid.png"
#: Preferred rows of the README grid (held-out photos), in order.
GRID_PREFERENCE = ("skimage-chelsea", "plasma-EveningGlow", "mate-LadyBird", "plasma-Path",
                   "mate-Dune", "skimage-coffee")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


#: The tiling check (``--tiling``): photos resized to this (width, height), tiles
#: overlapping by the style service's 64 px, and the shift that sets the bar.
TILING_IMAGE = (1100, 700)
TILING_OVERLAP = 64
TILING_SHIFT = 2
#: PSNR reported for identical images (a net without instance normalisation tiles exactly).
PSNR_IDENTICAL = 100.0

#: ``--size``, a multiple of 4 in this range: the measures need whole periods of 4 px;
#: VGG19's relu4_3 (after three 2x2 poolings) sees 2x2 at 16 px, and at 8 px the bands
#: beside the Nyquist and quarter-frequency lines reach the DC and Nyquist lines. VGG19
#: on a 4096 px photo already holds several GB per first-block activation.
SIZE_RANGE = (16, 4096)
#: ``--grid-cell``'s range, and ``--zoom-crop``'s minimum (its maximum is ``--size``).
GRID_CELL_RANGE = (16, 1024)
MIN_ZOOM_CROP = 8


# -- the checkerboard measure -------------------------------------------------------------
def _luma(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float [0, 1] -> float64 BT.601 luma on [0, 1]."""
    data = image.astype(np.float64)
    if image.dtype == np.uint8:
        data /= 255.0
    return data @ np.array([0.299, 0.587, 0.114]) if data.ndim == 3 else data


def _power_spectrum(image: np.ndarray) -> np.ndarray:
    luma = _luma(image)
    height, width = luma.shape
    if height % 2 or width % 2:
        raise ValueError(f"the Nyquist measures need an even-sized image, got {height}x{width}")
    return np.abs(np.fft.fft2(luma - luma.mean())) ** 2


def _nyquist_lines(power: np.ndarray) -> float:
    """Mean power on the Nyquist row and column (each counted once)."""
    height, width = power.shape
    total = power[height // 2, :].sum() + power[:, width // 2].sum() \
        - power[height // 2, width // 2]
    return float(total / (height + width - 1))


def _line_peak(power: np.ndarray, row: int, col: int, band: int | None) -> float:
    """Mean power on row ``row`` and column ``col`` of the spectrum over the mean power
    on the ``band`` rows and columns on either side of them (the training loss's measure,
    :func:`training.perceptual.losses.spectral_line_peak`, in float64)."""
    from training.perceptual.losses import spectral_line_peak

    return float(spectral_line_peak(torch.from_numpy(power), row, col, band))


def nyquist_energy(image: np.ndarray) -> float:
    """Mean power of the luma's 2D FFT on the Nyquist row and column (the highest frequency
    along each axis), as a multiple of the mean AC power of the whole spectrum."""
    power = _power_spectrum(image)
    mean_ac = power.sum() / max(1, power.size - 1)
    return _nyquist_lines(power) / mean_ac if mean_ac > 0 else 0.0


def nyquist_peak(image: np.ndarray, band: int | None = None) -> float:
    """Mean FFT power on the Nyquist row and column over the mean power on the ``band``
    rows and columns next to them (default: 1/32 of the shorter side, at least 2).

    Photos and painted textures have a smooth spectrum there (about 1); a period-2
    checkerboard (a transposed convolution's overlap pattern) is a spike exactly at
    Nyquist (measured: >10 for a freshly initialised net with transposed convolutions).
    Dividing by the neighbouring band, not by the total power, keeps a stylised image's
    legitimately richer high frequencies from reading as a checkerboard.
    """
    power = _power_spectrum(image)
    height, width = power.shape
    return _line_peak(power, height // 2, width // 2, band)


def quarter_peak(image: np.ndarray, band: int | None = None) -> float:
    """:func:`nyquist_peak` at a quarter of the sampling frequency (period 4, where two x2
    upsampling stages put their pattern); H and W should be multiples of 4."""
    power = _power_spectrum(image)
    height, width = power.shape
    return _line_peak(power, height // 4, width // 4, band)


def quarter_ratio(output: np.ndarray, content: np.ndarray) -> float:
    """:func:`quarter_peak` of ``output`` over that of ``content``."""
    return float(quarter_peak(output) / max(quarter_peak(content), 1e-12))


def nyquist_ratio(output: np.ndarray, content: np.ndarray) -> float:
    """:func:`nyquist_peak` of ``output`` over that of ``content``: about 1 when the output
    has no more of a Nyquist spike than the photo; a checkerboard makes it large."""
    return float(nyquist_peak(output) / max(nyquist_peak(content), 1e-12))


def nyquist_energy_ratio(output: np.ndarray, content: np.ndarray) -> float:
    """:func:`nyquist_energy` of ``output`` over that of ``content`` (the share of power at
    the Nyquist frequency; it also grows with legitimate fine texture)."""
    return float(nyquist_energy(output) / max(nyquist_energy(content), 1e-12))


# -- photos -------------------------------------------------------------------------------
def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shortest side to ``size`` (Lanczos) and centre-crops H and W to
    multiples of 4 (the Nyquist and quarter-frequency measures need whole periods)."""
    pil = Image.fromarray(image)
    scale = size / min(pil.size)
    if scale != 1:
        pil = pil.resize((max(2, round(pil.width * scale)), max(2, round(pil.height * scale))),
                         Image.Resampling.LANCZOS)
    array = np.asarray(pil)
    height, width = array.shape[0] // 4 * 4, array.shape[1] // 4 * 4
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return np.ascontiguousarray(array[top:top + height, left:left + width])


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
    """Shortest side to ``size``, then the centre ``size`` x ``size`` square."""
    resized = resize_short_side(image, size)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def _read_rgb(path: Path) -> np.ndarray:
    """The RGB pixels of the image file ``path``; a ValueError naming it when it cannot be
    opened or decoded."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1024, 1024))
            return np.array(image.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read photo {path}: {error}") from error


def skimage_heldout_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled held-out photos (chelsea, coffee)."""
    from skimage import data

    return [(f"skimage-{name}", np.asarray(getattr(data, name)())) for name in SKIMAGE_HELDOUT]


def load_photos(paths: Sequence[str | Path] | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) for every image file in ``paths`` (files or folders), sorted by
    name. A path that does not exist, a folder with no images (:data:`IMAGE_SUFFIXES`) and
    a file that cannot be decoded are errors naming it. ``None`` (no ``--photos``): the
    images in :data:`HELDOUT_PHOTOS`, or scikit-image's held-out photos when that folder
    is absent."""
    if paths is None:
        if not HELDOUT_PHOTOS.exists():
            return skimage_heldout_photos()
        paths = [HELDOUT_PHOTOS]
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = [p for p in sorted(entry.iterdir())
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            if not found:
                raise ValueError(f"photos folder {entry} holds no images "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"--photos {entry}: no such file or folder")
    return [(path.stem, _read_rgb(path)) for path in sorted(files, key=lambda p: p.stem)]


def grid_order(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in the grid's preferred order (others after, by name)."""
    rank = {name: i for i, name in enumerate(GRID_PREFERENCE)}
    return sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), names[i]))


# -- models -------------------------------------------------------------------------------
@dataclass
class StyleModel:
    """A loaded fast style artifact."""

    path: Path
    name: str
    style_name: str
    title: str
    module: nn.Module
    config: dict[str, Any]
    #: The style image measured against (:meth:`find_style_image`; found when first used).
    style_path: Path | None = None

    @property
    def style_layers(self) -> dict[str, float]:
        from training.cli_style import DEFAULT_STYLE_LAYER_WEIGHTS

        loss = self.config.get("loss", {})
        return dict(loss.get("style_layers", DEFAULT_STYLE_LAYER_WEIGHTS))

    @property
    def vgg_pooling(self) -> str:
        return str(self.config.get("loss", {}).get("vgg_pooling", "max"))

    @property
    def style_size(self) -> int:
        return int(self.config.get("loss", {}).get("style_size", 256))

    def _provenance_style_images(self) -> list[Path]:
        """The style image files provenance.json names (none when it has none)."""
        try:
            provenance = json.loads((self.path / "provenance.json").read_text())
        except (OSError, ValueError):
            return []
        data = provenance.get("data", []) if isinstance(provenance, dict) else []
        paths = [Path(e["path"]) for e in data
                 if isinstance(e, dict) and e.get("kind") == "style image" and "path" in e]
        return [p if p.is_absolute() else REPO_ROOT / p for p in paths]

    def find_style_image(self, candidates: Sequence[Path] = ()) -> Path:
        """The file of the style image this model was trained on.

        When config.json records the image's sha256 (every export does), the first file
        with that sha256 of: the bundled style of the model's style name, the file
        provenance.json names, ``candidates`` (``--style-image``); none is a ValueError
        asking for ``--style-image``. A model trained with ``--style-image`` under a
        bundled style's name is thus never measured against the bundled painting. Without
        a sha256: the bundled style of that name, else the provenance file.
        """
        from training.assets import sha256_of
        from training.train_style import resolve_style

        expected = self.config.get("style", {}).get("sha256")
        found: list[Path] = []
        bundled_error: Exception | None = None
        try:
            found.append(resolve_style(self.style_name).path)
        except (ValueError, FileNotFoundError) as error:  # not bundled, or not fetched
            bundled_error = error
        found.extend(self._provenance_style_images())
        if not expected:
            existing = [p for p in found if p.is_file()]
            if existing:
                return existing[0]
            if bundled_error is not None:
                raise bundled_error
            raise FileNotFoundError(f"{self.path}: style image {self.style_name!r} not found")
        found = list(dict.fromkeys(found))
        for path in dict.fromkeys([*found, *candidates]):
            if path.is_file() and sha256_of(path) == expected:
                return path
        looked = ", ".join(str(p) for p in found) or "no bundled style or provenance file"
        raise ValueError(
            f"{self.path}: config.json records style image {self.style_name!r} with sha256 "
            f"{expected[:12]}..., and no file has it (looked at {looked}"
            + (f" and {len(candidates)} --style-image file(s)" if candidates else "")
            + "); pass --style-image PATH with the image it was trained on")

    def style_image(self) -> np.ndarray:
        """The style image this model was trained on (:meth:`find_style_image`, or
        :attr:`style_path` when set), at its training size."""
        from training.train_style import load_style_image

        if self.style_path is None:
            self.style_path = self.find_style_image()
        return load_style_image(self.style_path, self.style_size)


def default_model_dirs(models_dir: Path = REPO_ROOT / "models") -> list[Path]:
    """Every ``models/style-*`` folder with a config.json of task ``style``."""
    found = []
    for path in sorted(models_dir.glob("style-*")):
        if (path / "config.json").is_file() and _read_config(path).get("task") == "style":
            found.append(path)
    return found


def _read_config(path: Path) -> dict[str, Any]:
    """An artifact folder's config.json; errors name the folder or the file."""
    config_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found ({path} is not an exported model "
                                "folder)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    return config


def _state_dict_problem(error: RuntimeError) -> str:
    """The first line of torch's multi-line ``load_state_dict`` error, shortened."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    first = lines[0] if lines else str(error)
    first = first if len(first) <= 200 else first[:197] + "..."
    return first + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def load_style_model(path: Path, device: torch.device | str = "cpu") -> StyleModel:
    """Loads the style artifact in folder ``path``. Every way the folder can be unusable is
    a FileNotFoundError or ValueError naming the file: no config.json, a config.json that is
    not JSON, of another task, or without ``name`` or ``architecture``, weights that are
    missing, unreadable, or do not fit the architecture."""
    from safetensors import SafetensorError

    from training.export import WEIGHTS, load_exported

    config_path = path / "config.json"
    config = _read_config(path)
    if config.get("task") != "style":
        task = config.get("task") or f"none in {config_path}"
        raise ValueError(f"{path} is not a style model (task: {task})")
    for key in ("name", "architecture"):
        if key not in config:
            raise ValueError(f"{config_path} has no {key!r}")
    weights = path / str(config.get("weights", WEIGHTS))
    try:
        module, config = load_exported(path, device)
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from error
    except RuntimeError as error:
        if "state_dict" not in str(error):  # not load_state_dict's: not the files' fault
            raise
        raise ValueError(f"{weights} does not fit the architecture in {config_path}: "
                         f"{_state_dict_problem(error)}") from error
    style = config.get("style", {})
    return StyleModel(path=path, name=config["name"],
                      style_name=style.get("name", config["name"].removeprefix("style-")),
                      title=style.get("title", config["name"]), module=module, config=config)


def to_batch(image: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 255.0


def to_image(batch: Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return batch[0].detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0) \
        .cpu().numpy()


def stylise_image(module: nn.Module, image: np.ndarray,
                  device: torch.device | str = "cpu") -> np.ndarray:
    with torch.no_grad():
        return to_image(module(to_batch(image, device)))


def stylise_checked(model: StyleModel, name: str, photo: np.ndarray,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`stylise_image` of photo ``name`` by ``model``, refusing an output that is
    not finite: :func:`to_image` would turn NaN into a black image, which the measures
    score as clean (no power at Nyquist). A ValueError naming the model and the photo."""
    with torch.no_grad():
        output = model.module(to_batch(photo, device))
    finite = torch.isfinite(output)
    if not bool(finite.all()):
        share = 1.0 - float(finite.float().mean())
        raise ValueError(f"{model.path}: its output on photo {name} is not finite (NaN or "
                         f"infinity in {share:.0%} of the values); the model is broken "
                         "(weights with NaN or infinity, or a diverged training run)")
    return to_image(output)


# -- the measures -------------------------------------------------------------------------
class StyleMeasures:
    """Style and content losses on VGG19, shared by every model.

    The style loss uses each model's own loss network (its VGG pooling, style layers and
    per-layer weights from config.json), so the ratio is the objective it was trained on;
    the per-layer Gram ratios and the content losses use the standard max-pooling VGG19.
    """

    CONTENT_LAYERS = ("relu2_2", "relu3_3")
    GRAM_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._grams: dict[tuple[str, str, tuple[str, ...]], dict[str, Tensor]] = {}

    def vgg(self, pooling: str = "max") -> nn.Module:
        from training.nets.vgg19 import load_vgg19

        return load_vgg19(self.device, pooling="avg" if pooling == "avg" else "max")

    def features(self, image: np.ndarray, layers: Sequence[str],
                 pooling: str = "max") -> dict[str, Tensor]:
        with torch.no_grad():
            result: dict[str, Tensor] = self.vgg(pooling)(to_batch(image, self.device),
                                                          list(layers))
        return result

    def style_grams(self, key: str, style: np.ndarray, layers: Sequence[str],
                    pooling: str = "max") -> dict[str, Tensor]:
        from training.perceptual.losses import gram_matrix

        cache_key = (key, pooling, tuple(layers))
        if cache_key not in self._grams:
            features = self.features(style, layers, pooling)
            self._grams[cache_key] = {k: gram_matrix(v) for k, v in features.items()}
        return self._grams[cache_key]

    def style_loss(self, image: np.ndarray, grams: Mapping[str, Tensor],
                   weights: Mapping[str, float], pooling: str = "max") -> float:
        from training.perceptual.losses import style_loss

        return float(style_loss(self.features(image, list(grams), pooling), grams, weights))

    def gram_distances(self, image: np.ndarray, grams: Mapping[str, Tensor]
                       ) -> dict[str, float]:
        """Per-layer squared Frobenius Gram distance to ``grams`` (max-pooling VGG)."""
        from training.perceptual.losses import gram_distance, gram_matrix

        features = self.features(image, list(grams))
        return {k: float(gram_distance(gram_matrix(v), grams[k])) for k, v in features.items()}

    def content_losses(self, image: np.ndarray, content: np.ndarray) -> dict[str, float]:
        from training.perceptual.losses import content_loss

        a = self.features(image, self.CONTENT_LAYERS)
        b = self.features(content, self.CONTENT_LAYERS)
        return {layer: float(content_loss(a[layer], b[layer])) for layer in self.CONTENT_LAYERS}


def measure(model: StyleModel, photo: np.ndarray, measures: StyleMeasures,
            style: np.ndarray, output: np.ndarray | None = None) -> dict[str, float]:
    """Every measure of ``model`` on one photo (see the module docstring)."""
    if output is None:
        output = stylise_image(model.module, photo, measures.device)
    weights = {k: v for k, v in model.style_layers.items() if v > 0}
    pooling = model.vgg_pooling
    grams = measures.style_grams(model.name, style, list(weights), pooling)
    style_output = measures.style_loss(output, grams, weights, pooling)
    style_photo = measures.style_loss(photo, grams, weights, pooling)
    standard = measures.style_grams(model.name, style, StyleMeasures.GRAM_LAYERS)
    gram_output = measures.gram_distances(output, standard)
    gram_photo = measures.gram_distances(photo, standard)
    content_output = measures.content_losses(output, photo)
    painting = np.asarray(Image.fromarray(style).resize((photo.shape[1], photo.shape[0]),
                                                        Image.Resampling.BICUBIC))
    content_painting = measures.content_losses(painting, photo)
    result = {
        "style_loss_output": style_output,
        "style_loss_photo": style_photo,
        "style_loss_ratio": style_output / max(style_photo, 1e-12),
    }
    for layer in StyleMeasures.GRAM_LAYERS:
        result[f"gram_ratio_{layer}"] = gram_output[layer] / max(gram_photo[layer], 1e-12)
    result["gram_ratio_mean"] = float(np.mean([result[f"gram_ratio_{layer}"]
                                               for layer in StyleMeasures.GRAM_LAYERS]))
    for layer in StyleMeasures.CONTENT_LAYERS:
        result[f"content_{layer}_output"] = content_output[layer]
        result[f"content_{layer}_style_image"] = content_painting[layer]
        result[f"content_{layer}_ratio"] = content_output[layer] / max(content_painting[layer],
                                                                        1e-12)
    result["nyquist_ratio"] = nyquist_ratio(output, photo)
    result["nyquist_energy_ratio"] = nyquist_energy_ratio(output, photo)
    result["quarter_ratio"] = quarter_ratio(output, photo)
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (:data:`PSNR_IDENTICAL` when they are equal)."""
    return min(PSNR_IDENTICAL, image_quality.psnr(a, b))


def check_tiling_tile(tile: int) -> None:
    """``--tiling``'s tile must leave room for the overlaps and need tiles both ways."""
    width, height = TILING_IMAGE
    if not 2 * TILING_OVERLAP < tile < height:
        raise ValueError(f"--tiling takes a tile side over {2 * TILING_OVERLAP} px (twice the "
                         f"overlap) and under {height} px (so a {width}x{height} image needs "
                         f"tiles both ways), got {tile}")


def whole_and_tiled(module: nn.Module, image: np.ndarray, tile: int,
                    device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``image`` stylised in one pass, and in ``tile``-px tiles by the service's tiler
    (overlap ``TILING_OVERLAP``)."""
    from services.common.tiling import tiled_apply

    whole = stylise_image(module, image, device)

    async def process(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [stylise_image(module, t, device) for t in tiles]

    tiled = asyncio.run(tiled_apply(image, process, scale=1, tile=tile, overlap=TILING_OVERLAP))
    return whole, tiled


def tiling_agreement(module: nn.Module, photo: np.ndarray, tile: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """The tiling measures of one photo (see the module docstring): ``tiling_psnr`` (tiled
    against whole), ``tiling_shift_psnr`` (whole against itself shifted) and their
    difference ``tiling_gap``."""
    check_tiling_tile(tile)
    image = np.asarray(Image.fromarray(photo).resize(TILING_IMAGE, Image.Resampling.BICUBIC))
    whole, tiled = whole_and_tiled(module, image, tile, device)
    agreement = psnr(tiled, whole)
    bar = psnr(whole, np.roll(whole, TILING_SHIFT, axis=1))
    return {"tiling_psnr": agreement, "tiling_shift_psnr": bar, "tiling_gap": agreement - bar}


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every measure over photos, the worst (max) of the ratios and the worst
    (min) tiling gap."""
    keys = rows[0].keys()
    summary = {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in keys}
    for key in ("style_loss_ratio", "gram_ratio_mean", "nyquist_ratio", "quarter_ratio",
                "content_relu2_2_ratio", "content_relu3_3_ratio"):
        summary[f"max_{key}"] = float(np.max([r[key] for r in rows]))
    if "tiling_gap" in keys:
        summary["min_tiling_gap"] = float(np.min([r["tiling_gap"] for r in rows]))
    return summary


def fresh_baseline(architecture: Mapping[str, Any], photos: Sequence[np.ndarray],
                   seed: int = 0) -> dict[str, list[float]]:
    """Nyquist and quarter-frequency ratios of a freshly initialised (untrained) network
    of ``architecture`` on ``photos``."""
    from training import nets

    torch.manual_seed(seed)
    module = nets.build(architecture).eval()
    outputs = [stylise_image(module, photo) for photo in photos]
    return {"nyquist_ratio": [nyquist_ratio(o, p) for o, p in zip(outputs, photos, strict=True)],
            "quarter_ratio": [quarter_ratio(o, p) for o, p in zip(outputs, photos, strict=True)]}


# -- the grid -----------------------------------------------------------------------------
#: Enlargement of ``--zoom``'s crops.
ZOOM = 3


def style_grid(models: Sequence[StyleModel], photos: Sequence[tuple[str, np.ndarray]],
               cell: int, rows: int, device: torch.device | str = "cpu") -> Image.Image:
    """README grid: a header row of style images, then one row per photo with the photo,
    each style, and the first style with the colour preserved."""
    from training.perceptual.colour import preserve_colour
    from training.plots import image_grid

    order = grid_order([name for name, _ in photos])[:rows]
    blank = np.full((cell, cell, 3), 255, np.uint8)
    header = [blank] + [centre_square(m.style_image(), cell) for m in models]
    if models:
        header.append(header[1])
    grid_rows = [header]
    for index in order:
        photo = centre_square(photos[index][1], cell)
        row = [photo]
        stylised = [stylise_image(m.module, photo, device) for m in models]
        row.extend(stylised)
        if models:
            kept = preserve_colour(to_batch(stylised[0]), to_batch(photo))
            row.append(to_image(kept))
        grid_rows.append(row)
    labels = ["photo / style"] + [m.style_name for m in models]
    if models:
        labels.append(f"{models[0].style_name}, colour kept")
    return image_grid(grid_rows, labels=labels)


def zoom_strip(models: Sequence[StyleModel], photo: np.ndarray, crop: int, zoom: int,
               device: torch.device | str = "cpu") -> Image.Image:
    """The centre ``crop`` px of ``photo`` and of each model's output for the whole photo,
    each enlarged ``zoom`` times with nearest neighbours (every output pixel a visible
    square): where a pattern locked to the network's pixel lattice shows, at the size the
    measures above were taken."""
    from training.plots import image_grid

    height, width = photo.shape[:2]
    if not 0 < crop <= min(height, width) or zoom < 1:
        raise ValueError(f"--zoom-crop must be 1..{min(height, width)} px and the zoom >= 1, "
                         f"got {crop} and {zoom}")
    top, left = (height - crop) // 2, (width - crop) // 2

    def enlarge(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(
            image[top:top + crop, left:left + crop].repeat(zoom, 0).repeat(zoom, 1))

    cells = [enlarge(photo)] + [enlarge(stylise_image(m.module, photo, device)) for m in models]
    labels = ["photo"] + [f"{m.name}@{m.config.get('version', 1)}" for m in models]
    return image_grid([cells], labels=labels)


# -- the command --------------------------------------------------------------------------
def _format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Means over the photos (worst photo in brackets for the checkerboard measure)."""
    header = (f"{'model':<26} {'style ratio':>11} {'gram ratio':>10} {'content r2_2':>12} "
              f"{'r2_2/paint':>10} {'r3_3/paint':>10} {'nyquist (max)':>14} "
              f"{'quarter (max)':>14}")
    lines = [header, "-" * len(header)]
    for name, entry in results.items():
        s = entry["summary"]
        lines.append(f"{name:<26} {s['mean_style_loss_ratio']:>11.3f} "
                     f"{s['mean_gram_ratio_mean']:>10.3f} "
                     f"{s['mean_content_relu2_2_output']:>12.4g} "
                     f"{s['mean_content_relu2_2_ratio']:>10.3f} "
                     f"{s['mean_content_relu3_3_ratio']:>10.3f} "
                     f"{s['mean_nyquist_ratio']:>7.3f} ({s['max_nyquist_ratio']:.2f}) "
                     f"{s['mean_quarter_ratio']:>7.3f} ({s['max_quarter_ratio']:.2f})")
    tiled = {name: entry["summary"] for name, entry in results.items()
             if "mean_tiling_gap" in entry["summary"]}
    if tiled:
        header = (f"{'model':<26} {'tiled vs whole dB':>17} {'2 px shift dB':>13} "
                  f"{'gap dB (min)':>14}")
        lines += ["", header, "-" * len(header)]
        lines += [f"{name:<26} {s['mean_tiling_psnr']:>17.2f} {s['mean_tiling_shift_psnr']:>13.2f} "
                  f"{s['mean_tiling_gap']:>7.2f} ({s['min_tiling_gap']:.2f})"
                  for name, s in tiled.items()]
    return "\n".join(lines)


def grid_path(args: argparse.Namespace) -> Path | None:
    """Where the grid goes: ``--grid`` when given ('' = nowhere); by default the README's
    :data:`README_GRID` for the default models on the default photos (no ``--models``, no
    ``--photos``), else :data:`GRID_NAME` under ``--out``, so evaluating other models or
    photos never overwrites the tracked README image."""
    if args.grid is not None:
        return Path(args.grid) if args.grid else None
    if args.models or args.photos is not None:
        return Path(args.out) / GRID_NAME
    return README_GRID


def _check_range(flag: str, value: int, low: int, high: int, note: str = "") -> None:
    """ValueError ``FLAG must be LOW..HIGH px`` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ValueError(f"{flag} must be {low}..{high} px{note}, got {value}")


def check_eval_flags(args: argparse.Namespace) -> None:
    """Refuses flag values that would fail only after every model was measured (some
    after metrics.json was written), crash, or exhaust the memory, before anything loads:
    ValueErrors naming the flag and the values it takes."""
    low, high = SIZE_RANGE
    if not (low <= args.size <= high and args.size % 4 == 0):
        raise ValueError(f"--size must be a multiple of 4 from {low} to {high} px (the "
                         f"measures need whole 4 px periods), got {args.size}")
    low, high = GRID_CELL_RANGE
    if not (low <= args.grid_cell <= high and args.grid_cell % 4 == 0):
        raise ValueError(f"--grid-cell must be a multiple of 4 from {low} to {high} px (the "
                         f"photos are cropped to multiples of 4), got {args.grid_cell}")
    if args.grid_photos < 1:
        raise ValueError("--grid-photos must be at least 1 (--grid '' writes no grid), "
                         f"got {args.grid_photos}")
    if args.zoom:
        _check_range("--zoom-crop", args.zoom_crop, MIN_ZOOM_CROP, args.size,
                     " (at most --size)")
    if args.tiling:
        check_tiling_tile(args.tiling)
    check_writable(Path(args.out), "--out", folder=True)
    grid_file = grid_path(args)
    if grid_file is not None:
        check_writable(grid_file, "--grid")
    if args.zoom:
        check_writable(Path(args.zoom), "--zoom")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from training.loop import choose_device, use_threads

    check_eval_flags(args)
    use_threads(args.threads)
    device = choose_device(args.device)
    model_dirs = [Path(p) for p in args.models] if args.models else default_model_dirs()
    if not model_dirs:
        raise FileNotFoundError("no style artifacts found (models/style-*); train one with "
                                "`percept train style --style NAME`")
    models = [load_style_model(path, device) for path in model_dirs]
    candidates = [Path(p) for p in args.style_image or []]
    for candidate in candidates:
        if not candidate.is_file():
            raise FileNotFoundError(f"--style-image {candidate} does not exist")
    for model in models:
        model.style_path = model.find_style_image(candidates)
    raw_photos = load_photos(args.photos)
    photos = [(name, resize_short_side(image, args.size)) for name, image in raw_photos]
    grid_file = grid_path(args)
    measures = StyleMeasures(device)
    results: dict[str, Any] = {}
    names = [m.name for m in models]
    # one step per (model, photo) measured, and per tiled comparison with --tiling
    bar = tqdm(total=len(models) * len(photos) * (2 if args.tiling else 1), desc="eval style",
               unit="photo", disable=True if getattr(args, "quiet", False) else None)
    # (None: shown on a terminal only, so a log or a captured stderr holds just the result)
    for model in models:
        key = model.name if names.count(model.name) == 1 else str(model.path)
        bar.set_postfix_str(model.name)
        style = model.style_image()
        per_photo = {}
        for name, photo in photos:
            per_photo[name] = measure(model, photo, measures, style,
                                      stylise_checked(model, name, photo, device))
            bar.update()
        if args.tiling:
            for name, raw in raw_photos:
                per_photo[name].update(tiling_agreement(model.module, raw, args.tiling, device))
                bar.update()
        results[key] = {"style": model.style_name, "path": str(model.path),
                        "style_image": str(model.style_path), "per_photo": per_photo,
                        "summary": summarise(list(per_photo.values()))}
    bar.close()
    architecture = dict(models[0].config["architecture"])
    fresh = fresh_baseline(architecture, [p for _, p in photos])
    report: dict[str, Any] = {
        "photos": [name for name, _ in photos], "size": args.size, "device": str(device),
        "tiling": ({"image": list(TILING_IMAGE), "tile": args.tiling, "overlap": TILING_OVERLAP,
                    "shift": TILING_SHIFT} if args.tiling else None),
        "models": results,
        "fresh_init": {"architecture": architecture, "seed": 0,
                       **{f"{key}_{stat}": float(fn(values)) for key, values in fresh.items()
                          for stat, fn in (("mean", np.mean), ("max", np.max))}},
    }
    print(_format_table(results), flush=True)
    print(f"freshly initialised {architecture}: Nyquist ratio mean "
          f"{np.mean(fresh['nyquist_ratio']):.3f} (max {np.max(fresh['nyquist_ratio']):.2f}), "
          f"quarter ratio mean {np.mean(fresh['quarter_ratio']):.3f} "
          f"(max {np.max(fresh['quarter_ratio']):.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[eval] wrote {out / 'metrics.json'}", flush=True)
    if grid_file is not None:
        grid = style_grid(models, raw_photos, args.grid_cell, args.grid_photos, device)
        grid_file.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_file, optimize=True)
        print(f"[eval] wrote {grid_file} ({grid.width}x{grid.height}, "
              f"{grid_file.stat().st_size / 1e3:.0f} kB)", flush=True)
    if args.zoom:
        name, photo = photos[grid_order([n for n, _ in photos])[0]]
        strip = zoom_strip(models, photo, args.zoom_crop, ZOOM, device)
        zoom_path = Path(args.zoom)
        zoom_path.parent.mkdir(parents=True, exist_ok=True)
        strip.save(zoom_path, optimize=True)
        print(f"[eval] wrote {zoom_path} (the centre {args.zoom_crop} px of {name} at "
              f"{args.size} px, x{ZOOM})", flush=True)
    if args.update_metrics:
        from training.export import update_metrics

        for model, entry in zip(models, results.values(), strict=True):
            summary = entry["summary"]
            update_metrics(model.path, {"heldout": {
                "photos": report["photos"], "size": args.size,
                **{k: round(v, 6) if abs(v) < 1e3 else float(f"{v:.6g}")
                   for k, v in summary.items()}}})
    return report


def command(args: argparse.Namespace) -> int:
    """``percept eval style``."""
    from training.assets import AssetMissingError

    try:
        evaluate(args)
    except (AssetMissingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``style`` to the ``percept eval`` subparsers (see training.cli_style)."""
    from training.cli_style import register_eval

    return register_eval(subparsers)
