"""``percept train style``: trains a fast style-transfer network for one style image.

Johnson, Alahi & Fei-Fei 2016, "Perceptual Losses for Real-Time Style Transfer and
Super-Resolution" (ECCV), sec. 3 and 4.1: an image-transformation network
(:mod:`training.nets.transformer`) is trained on photos to minimise, for each photo y_c,

    content_weight * l_feat^{relu2_2}(y_hat, y_c)                      (eq. 2)
  + style_weight   * sum_l w_l ||G_l(y_hat) - G_l(y_s)||_F^2            (eqs. 3-4)
  + tv_weight      * TV(y_hat)                                         (sec. 3.3)
  + grid_weight    * grid(y_hat, y_c)                                  (ours, off by default)
  + tile_weight    * ||f(y_c[window]) - y_hat[window]||^2               (ours, off by default)

with the Gram matrices of the one style image y_s at relu1_2, relu2_2, relu3_3 and relu4_3
of VGG (here VGG19), each style layer with its own weight w_l (the lecture's per-layer
style weights). The losses are :mod:`training.perceptual.losses`; ``grid`` is our penalty
on period-2 and period-4 spectral peaks that the output has and the photo has not
(:func:`training.perceptual.losses.grid_loss`); ``tile`` asks the net f to paint on a window
of the crop what it painted there on the whole crop (:func:`tile_consistency`), which is
what tiled serving needs of an instance-normalised net.

Content photos are the prepared arrays of the training photos (``percept data prepare``;
never the held-out ones: :func:`training.data.arrays.load_prepared` refuses them), cut
into random-scale square crops resized to ``--size`` and randomly flipped. Adam with a
linear warm-up and a cosine decay; on CUDA, bf16 (or fp16 with loss scaling) autocast and
channels_last, with the Gram and loss arithmetic kept in fp32. The run folder (``--run-dir``,
default ``runs/style-NAME``) gets a checkpoint every ``--checkpoint-every`` steps
(``--resume`` continues from it), sample grids (content | output | style) and a loss plot;
the artifact goes to ``--out`` (default ``models/style-NAME``).

Needs only torch, numpy and pillow, the prepared arrays, the VGG19 weights file and the
style image, so it runs on a bare GPU box. Never imports ``services``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from training import nets
from training.assets import REPO_ROOT, STYLE_IMAGES, sha256_of, style_image_path
from training.cli_style import (
    CPU_LR,
    CPU_RECIPE,
    DEFAULT_STYLE_LAYER_WEIGHTS,
    GPU_LR,
    GPU_RECIPE,
)
from training.data.arrays import PreparedArrays, load_prepared
from training.data.folders import check_folder_to_make
from training.export import check_output_folder, command_line, data_entry, export_artifact
from training.image_batches import predict_images, to_tensor
from training.loop import (
    CHECKPOINT_NAME,
    FINISHED_FIRST,
    RESUMABLE_FLAGS,
    STOPPING,
    LearningRateClock,
    LossGuard,
    TrainingDiverged,
    autocast_dtype,
    carry_resumed_flags,
    check_flag_minimums,
    check_new_run,
    check_resumed_run,
    check_same_data,
    check_seed,
    check_time_schedule,
    choose_device,
    earlier_commands,
    prepared_data_digest,
    prepared_data_provenance,
    read_checkpoint,
    recorded_flags,
    restore_training_state,
    resuming,
    save_finite_checkpoint,
    stop_requests,
    stopped_note,
    working_dir,
)
from training.nets.transformer import TransformerNet
from training.plots import save_image_grid, save_loss_plot

TASK = "style"
ARCHITECTURE = "johnson-transformer"


# -- style images -------------------------------------------------------------------------
@dataclass(frozen=True)
class StyleSource:
    """A style image and what config.json says about it."""

    name: str
    title: str
    path: Path
    source: str
    licence: str

    def describe(self) -> dict[str, str]:
        """The ``"style"`` block of config.json."""
        return {"name": self.name, "title": self.title, "source": self.source,
                "licence": self.licence, "sha256": sha256_of(self.path)}


_DEBIAN_LICENCE = "public domain (the painter died more than 70 years ago)"

#: The third default style: scikit-image's bundled immunohistochemistry micrograph.
SKIMAGE_STYLES = {
    "stained-tissue": {
        "file": "ihc.png",
        "title": "Stained tissue (immunohistochemistry micrograph of colonic glands)",
        "source": "scikit-image 0.26 bundled data, skimage/data/ihc.png "
                  "(skimage.data.immunohistochemistry(); acquired at the Center for "
                  "Microscopy And Molecular Imaging, CMMI)",
        "licence": "no known copyright restrictions (scikit-image data README / docstring)",
    },
}


def bundled_styles() -> list[str]:
    """Every style name ``--style`` accepts."""
    return sorted({*STYLE_IMAGES, *SKIMAGE_STYLES})


def _skimage_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-image is not installed; it provides this style image")
    return Path(spec.origin).parent / "data"


def resolve_style(name: str) -> StyleSource:
    """A bundled style by name: the Debian paintings of :mod:`training.assets`, or a
    scikit-image bundled image (:data:`SKIMAGE_STYLES`)."""
    if name in STYLE_IMAGES:
        asset = STYLE_IMAGES[name]
        return StyleSource(name=name, title=asset.title, path=style_image_path(name),
                           source=f"Debian package {asset.package}, "
                                  f"{asset.member.lstrip('./').lstrip('/')}",
                           licence=_DEBIAN_LICENCE)
    if name in SKIMAGE_STYLES:
        entry = SKIMAGE_STYLES[name]
        path = _skimage_data_dir() / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"scikit-image's {entry['file']} not found at {path}")
        return StyleSource(name=name, title=entry["title"], path=path,
                           source=entry["source"], licence=entry["licence"])
    raise ValueError(f"unknown style {name!r}; bundled styles: {', '.join(bundled_styles())} "
                     "(or pass --style-image PATH --name NAME)")


def style_from_args(args: argparse.Namespace) -> StyleSource:
    """The style named by ``--style``, or ``--style-image`` with ``--name``."""
    if args.style:
        source = resolve_style(args.style)
        if args.name or args.title or args.licence:
            source = StyleSource(name=args.name or source.name,
                                 title=args.title or source.title, path=source.path,
                                 source=source.source, licence=args.licence or source.licence)
        return source
    path = Path(args.style_image)
    if path.is_dir():
        raise ValueError(f"--style-image {path} is a folder; give one image file")
    if not path.is_file():
        raise FileNotFoundError(f"--style-image {path} does not exist")
    name = args.name or path.stem.lower().replace("_", "-").replace(" ", "-")
    return StyleSource(name=name, title=args.title or name, path=path,
                       source=f"user-supplied file {path.name}",
                       licence=args.licence or "unknown (user-supplied image)")


#: Shortest side a style image (after --style-size) may have: relu4_3, the deepest default
#: style layer, sits after three 2x2 poolings, so 32 px leaves it a 4x4 map to take Gram
#: statistics of.
MIN_STYLE_SIDE = 32
#: The smallest crop: two stride-2 downsamplings leave 2 px for the residual blocks'
#: reflection padding.
MIN_CROP = 8
#: The most reflected pixels --edge-margin may add on each side at inference.
MAX_EDGE_MARGIN = 128


def load_style_image(path: Path, longest: int) -> np.ndarray:
    """The style image as (H, W, 3) uint8 RGB with its longest side resized to ``longest``
    (never upscaled). ValueError for a file that is not a whole image, or one too small to
    have style statistics."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # unidentified, truncated, corrupt
        raise ValueError(f"style image {path} is not a readable image "
                         f"({type(error).__name__}: {error})") from error
    scale = longest / max(rgb.size)
    if scale < 1:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    if min(rgb.size) < MIN_STYLE_SIDE:
        raise ValueError(f"style image {path} is {rgb.width}x{rgb.height} px at --style-size "
                         f"{longest}; its shorter side needs at least {MIN_STYLE_SIDE} px for "
                         "the VGG style layers")
    return np.array(rgb)


# -- content crops ------------------------------------------------------------------------
class ContentSampler:
    """Random-scale square crops of the prepared training photos, resized to ``size`` and
    randomly flipped (seeded)."""

    def __init__(self, prepared: PreparedArrays, size: int, min_scale: float = 0.5,
                 seed: int = 0) -> None:
        self.images = prepared.arrays[prepared.sizes[0]]
        self.source_size = int(self.images.shape[1])
        if size > self.source_size:
            raise ValueError(f"--size {size} is larger than the prepared images "
                             f"({self.source_size} px)")
        if not 0 < min_scale <= 1:
            raise ValueError(f"--min-scale must be in (0, 1], got {min_scale}")
        self.size = size
        self.min_side = max(size, round(min_scale * self.source_size))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _resize(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[0] == self.size:
            return np.ascontiguousarray(crop)
        return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=2.0))

    def sample(self, batch: int) -> np.ndarray:
        """(batch, size, size, 3) uint8."""
        crops = []
        for _ in range(batch):
            index = int(self.rng.integers(0, len(self)))
            side = int(self.rng.integers(self.min_side, self.source_size + 1))
            top, left = self.rng.integers(0, self.source_size - side + 1, 2)
            crop = self._resize(self.images[index, top:top + side, left:left + side])
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            crops.append(crop)
        return np.stack(crops)

    def fixed(self, count: int) -> np.ndarray:
        """The first ``count`` items (the arrays are already shuffled), whole but resized to
        ``size``: a fixed batch for the sample grid."""
        return np.stack([self._resize(self.images[i]) for i in range(min(count, len(self)))])


# -- the loss -----------------------------------------------------------------------------
class PerceptualStyleLoss(nn.Module):
    """Johnson et al. 2016's loss for one style: weighted VGG19 content loss, per-layer Gram
    style loss and total variation, plus our grid penalty when ``grid_weight`` > 0. Returns
    the total and each weighted term. The Gram and loss arithmetic runs in fp32 even under
    autocast."""

    def __init__(self, style_image: Tensor, device: torch.device, *, content_layer: str,
                 style_layers: Mapping[str, float], content_weight: float,
                 style_weight: float, tv_weight: float, pooling: str = "max",
                 grid_weight: float = 0.0) -> None:
        super().__init__()
        from training.nets.vgg19 import check_layers, load_vgg19
        from training.perceptual.losses import gram_matrix

        check_layers([content_layer, *style_layers])
        if min(content_weight, style_weight, tv_weight, grid_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if not any(w > 0 for w in style_layers.values()) and style_weight > 0:
            raise ValueError("every style layer weight is zero")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.vgg = load_vgg19(device, pooling="avg" if pooling == "avg" else "max")
        self.content_layer = content_layer
        self.style_layers = {k: float(v) for k, v in style_layers.items() if v > 0}
        self.content_weight = content_weight
        self.style_weight = style_weight
        self.tv_weight = tv_weight
        self.grid_weight = grid_weight
        self.layers = sorted({content_layer, *self.style_layers},
                             key=lambda name: (int(name[4]), int(name[6])))
        with torch.no_grad():
            features = self.vgg(style_image.to(device).float(), list(self.style_layers))
            self.target_grams = {k: gram_matrix(v.float()) for k, v in features.items()}

    def unweighted(self, output: Tensor, content: Tensor) -> dict[str, Tensor]:
        """Content loss, per-layer Gram distances (``style/<layer>``), TV and (with a grid
        weight) the grid penalty, unweighted."""
        from training.perceptual.losses import (
            content_loss,
            gram_distance,
            gram_matrix,
            grid_loss,
            total_variation_loss,
        )

        with torch.no_grad():
            target = self.vgg(content, [self.content_layer])[self.content_layer]
        features = self.vgg(output, self.layers)
        with torch.autocast(output.device.type, enabled=False):
            terms = {"content": content_loss(features[self.content_layer].float(),
                                             target.float())}
            for layer in self.style_layers:
                terms[f"style/{layer}"] = gram_distance(gram_matrix(features[layer].float()),
                                                        self.target_grams[layer])
            terms["tv"] = total_variation_loss(output.float())
            if self.grid_weight > 0:
                terms["grid"] = grid_loss(output.float(), content.float())
        return terms

    def forward(self, output: Tensor, content: Tensor) -> tuple[Tensor, dict[str, float],
                                                                 dict[str, float]]:
        """(weighted total, weighted terms, unweighted terms) for a batch."""
        raw = self.unweighted(output, content)
        style = sum((w * raw[f"style/{k}"] for k, w in self.style_layers.items()),
                    start=torch.zeros((), device=output.device))
        weighted = {"content": self.content_weight * raw["content"],
                    "style": self.style_weight * style,
                    "tv": self.tv_weight * raw["tv"]}
        if "grid" in raw:
            weighted["grid"] = self.grid_weight * raw["grid"]
        total = sum(weighted.values(), start=torch.zeros((), device=output.device))
        plain = {k: float(v.detach()) for k, v in raw.items()}
        plain["style"] = float(style.detach())
        return total, {k: float(v.detach()) for k, v in weighted.items()}, plain


# -- training -----------------------------------------------------------------------------
def resolve_recipe(args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """Fills the size flags left unset: the paper's recipe on CUDA, the committed models'
    reduced recipe on CPU."""
    recipe = GPU_RECIPE if device.type == "cuda" else CPU_RECIPE
    values = {key: getattr(args, key) if getattr(args, key) is not None else default
              for key, default in recipe.items()}
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    return values


def _recipe_note(recipe: dict[str, int], steps_run: int, stopped_by: str | None,
                 device: str = "a GPU") -> str:
    """How a run's sizes (with the steps it ran) compare with the paper's recipe (the GPU
    defaults), on ``device``."""
    ran = {**recipe, "steps": steps_run}
    changed = [f"{key.replace('_', ' ')} {value} (paper: {GPU_RECIPE[key]})"
               for key, value in ran.items() if value != GPU_RECIPE[key]]
    note = f"trained on {device} with the paper's sizes" if not changed \
        else f"trained on {device} at changed sizes: " + ", ".join(changed)
    return note + (f"; stopped by {stopped_by}" if stopped_by else "")


def style_layer_weights(pairs: list[tuple[str, float]] | None) -> dict[str, float]:
    """``--style-layer-weight`` pairs (they replace the defaults), else the defaults."""
    if not pairs:
        return dict(DEFAULT_STYLE_LAYER_WEIGHTS)
    weights: dict[str, float] = {}
    for layer, weight in pairs:
        weights[layer] = weight
    return weights


def save_samples(model: nn.Module, content: np.ndarray, style: np.ndarray, path: Path,
                 device: torch.device, channels_last: bool) -> Path:
    """A grid with one row per content item: content | output | style image."""
    output = predict_images(model, content, device, channels_last)
    side = content.shape[1]
    thumb = Image.fromarray(style)
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    style_cell = np.asarray(thumb)
    rows = [[c, o, style_cell] for c, o in zip(content, output, strict=True)]
    return save_image_grid(rows, path, labels=["content", "output", "style"])


def grid_artifacts(model: nn.Module, content: np.ndarray, device: torch.device,
                   channels_last: bool) -> dict[str, float]:
    """Mean Nyquist (period 2) and quarter-frequency (period 4) ratios of the model's
    outputs over its inputs (training.evaluate_style): how much grid-locked pattern the
    upsampling stages paint. Near 1 = none; a visible grid measures several times more."""
    from training.evaluate_style import nyquist_ratio, quarter_ratio

    output = predict_images(model, content, device, channels_last)
    pairs = list(zip(output, content, strict=True))
    return {"nyquist_ratio": float(np.mean([nyquist_ratio(o, c) for o, c in pairs])),
            "quarter_ratio": float(np.mean([quarter_ratio(o, c) for o, c in pairs]))}


def load_initial_weights(model: nn.Module, path: Path, architecture: dict[str, Any]
                         ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``--init-from``: loads an exported artifact's weights into ``model``; returns what
    metrics.json records of it, its provenance entry (taken now: the export may later
    overwrite that very file) and its ``edge_margin``."""
    from training.export import WEIGHTS, data_entry, load_exported

    try:
        source, config = load_exported(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"--init-from {path}: not a loadable artifact "
                         f"({type(error).__name__}: {error})") from error
    if config.get("task") != TASK:
        raise ValueError(f"--init-from {path} is a {config.get('task')!r} artifact "
                         f"({config['architecture'].get('type')}), not a style network")
    # edge_margin only changes inference, and upsample only the interpolation before the
    # decoder's convolutions: the weights have the same shapes either way (a fine-tune can
    # move a bilinear net to the cheaper-to-serve nearest upsampling, training/nets/folding.py)
    def weight_shapes(arch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in arch.items() if k not in ("edge_margin", "upsample")}

    theirs = weight_shapes(config["architecture"])
    if theirs != weight_shapes(architecture):
        raise ValueError(f"--init-from {path} holds {theirs}, not the "
                         f"{weight_shapes(architecture)} being trained (set --width and "
                         "--blocks to match)")
    their_upsample = config["architecture"].get("upsample", "nearest")
    our_upsample = architecture.get("upsample", "nearest")
    if their_upsample != our_upsample:
        print(f"[train] --init-from {path} upsampled with {their_upsample}; this run trains "
              f"it with {our_upsample} upsampling", flush=True)
    model.load_state_dict(source.state_dict())
    tag = f"{config['name']}@{config['version']}"
    metrics = json.loads((path / "metrics.json").read_text()) \
        if (path / "metrics.json").is_file() else {}
    info = {"artifact": tag, "steps": metrics.get("selected_step", metrics.get("steps")),
            "device": metrics.get("device")}
    if their_upsample != our_upsample:
        info["upsample"] = their_upsample
    entry = data_entry(path / config.get("weights", WEIGHTS), kind="initial weights",
                       artifact=tag)
    return info, entry, int(config["architecture"].get("edge_margin", 0))


#: tile_consistency: the window's side as a fraction of the crop, and the pixels along its
#: edges left out of the comparison (where the window's own reflection padding shows).
TILE_FRACTION = 5 / 8
TILE_MARGIN = 16


def tile_window_side(crop: int) -> int:
    """The side of :func:`tile_consistency`'s window for crops of ``crop`` px (ValueError
    when the window would have nothing left to compare)."""
    side = int(crop * TILE_FRACTION) // 4 * 4
    if side <= 2 * TILE_MARGIN:
        raise ValueError(f"--tile-weight compares windows of 5/8 of the crop, less "
                         f"{TILE_MARGIN} px along their edges: crops of {crop} px are too "
                         "small")
    return side


def tile_consistency(model: nn.Module, content: Tensor, output: Tensor,
                     rng: np.random.Generator) -> Tensor:
    """Mean squared difference between the net's output for a random window of ``content``
    (``TILE_FRACTION`` of its side, at a multiple of 4 px) and ``output``, its output for
    the whole crop, over the same region less ``TILE_MARGIN`` px along the window's edges.
    Instance normalisation makes the two differ (each sees its own statistics): this is
    what tiled serving changes, and the term trains the net to depend on it less. The whole
    crop's output is the target (no gradient through it)."""
    height, width = content.shape[-2:]
    side = tile_window_side(min(height, width))
    y0 = int(rng.integers(0, (height - side) // 4 + 1)) * 4
    x0 = int(rng.integers(0, (width - side) // 4 + 1)) * 4
    window = model(content[..., y0:y0 + side, x0:x0 + side])
    inner = slice(TILE_MARGIN, side - TILE_MARGIN)
    target = output[..., y0:y0 + side, x0:x0 + side].detach()
    return F.mse_loss(window[..., inner, inner].float(), target[..., inner, inner].float())


def _use_channels_last(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


#: Flags a --resume may change beyond training.loop.RESUMABLE_FLAGS: which checked state
#: it exports, and what only inference or the artifact's labels use.
RESUMABLE_CHANGES = RESUMABLE_FLAGS | {"grid_check_every", "grid_margin", "edge_margin",
                                       "title", "licence", "init_from"}
#: The flags that name files or folders, compared (and carried) by the files they name.
PATH_FLAGS = ("data", "style_image")


def check_run_flags(args: argparse.Namespace) -> None:
    """Refuses flag values that mean nothing or would fail only later (after the data and
    VGG have loaded, or mid-run), before anything loads."""
    check_flag_minimums(args, {
        **dict.fromkeys(("lr", "threads", "max_minutes", "max_cpu_minutes", "warmup",
                         "grid_margin", "checkpoint_every", "sample_every", "tile_weight",
                         "grid_weight", "content_weight", "style_weight", "tv_weight"), 0),
        "val_items": 1, "grid_check_every": 1, "style_size": MIN_STYLE_SIDE, "size": MIN_CROP},
        above={"lr"})
    check_seed(args.seed)
    if args.content_weight == args.style_weight == args.tv_weight == 0:
        raise ValueError("every loss weight is 0 (--content-weight, --style-weight, "
                         "--tv-weight): there is nothing to train against")
    check_time_schedule(args)
    if args.edge_margin is not None and not 0 <= args.edge_margin <= MAX_EDGE_MARGIN:
        raise ValueError(f"--edge-margin must be 0..{MAX_EDGE_MARGIN} px, got {args.edge_margin}")
    if args.warmup is not None and args.steps is not None and args.warmup > args.steps:
        raise ValueError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps}):"
                         " the learning rate would never reach --lr")


def train(args: argparse.Namespace) -> int:
    """Runs the training described by the parsed ``percept train style`` flags."""
    style = style_from_args(args)
    name = f"style-{style.name}"
    out = Path(args.out) if args.out else REPO_ROOT / "models" / name
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    checkpoint = run_dir / CHECKPOINT_NAME
    if resuming(checkpoint, args):
        carry_resumed_flags(args, checkpoint, RESUMABLE_CHANGES, PATH_FLAGS)
    check_run_flags(args)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = resolve_recipe(args, device)
    if args.warmup is not None and args.warmup > recipe["steps"]:  # --steps left to default
        raise ValueError(f"--warmup {args.warmup} is longer than the run ({recipe['steps']} "
                         f"steps, --steps' default on {device.type}): the learning rate "
                         "would never reach --lr")
    if args.tile_weight:
        tile_window_side(recipe["size"])  # refuses crops too small now, not at step 1
    for flag in ("grid_weight", "grid_margin"):
        if getattr(args, flag) and recipe["size"] % 4:
            raise ValueError(f"--{flag.replace('_', '-')} measures period-4 patterns: --size "
                             f"must be a multiple of 4, got {recipe['size']}")
    if out.resolve() == run_dir.resolve():  # given, or by default (runs/NAME, models/NAME)
        raise ValueError(f"--out and --run-dir are both {out}: they must be different folders "
                         "(the run folder holds checkpoints, the artifact folder what is "
                         "served)")
    export_plan = check_output_folder(out, name)
    check_folder_to_make(run_dir, "--run-dir")
    check_new_run(checkpoint, args.resume)

    prepared = load_prepared(Path(args.data))
    sampler = ContentSampler(prepared, recipe["size"], args.min_scale, seed=args.seed)
    val_content = sampler.fixed(args.val_items)
    style_rgb = load_style_image(style.path, args.style_size)

    architecture: dict[str, Any] = {"type": ARCHITECTURE, "width": recipe["width"],
                                    "blocks": args.blocks}
    if args.upsample != "nearest":  # keeps the committed nearest models' configs unchanged
        architecture["upsample"] = args.upsample
    model = nets.build(architecture)
    init_from: dict[str, Any] | None = None
    init_entries: list[dict[str, Any]] = []
    if args.init_from:
        if args.resume:
            raise ValueError("--init-from starts a new run from an artifact; --resume "
                             "continues a run from its checkpoint: give one of them")
        init_from, entry, edge_margin = load_initial_weights(model, Path(args.init_from),
                                                             architecture)
        init_entries.append(entry)
        print(f"[train] starting from the weights of {init_from['artifact']}", flush=True)
    else:
        edge_margin = 0
    if args.edge_margin is not None:
        edge_margin = args.edge_margin
    channels_last = _use_channels_last(args.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    layer_weights = style_layer_weights(args.style_layer_weight)
    criterion = PerceptualStyleLoss(
        to_tensor(style_rgb[None], device), device, content_layer=args.content_layer,
        style_layers=layer_weights, content_weight=args.content_weight,
        style_weight=args.style_weight, tv_weight=args.tv_weight, pooling=args.vgg_pooling,
        grid_weight=args.grid_weight)
    lr = args.lr if args.lr is not None else (GPU_LR if device.type == "cuda" else CPU_LR)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = recipe["steps"]
    state: dict[str, Any] = {}
    if args.resume:
        state = read_checkpoint(checkpoint, device, architecture)
    # a resumed run keeps the warm-up it started with, whatever --steps is now (one
    # from before the warm-up was recorded: the default of the steps it was started with)
    first_steps = state.get("args", {}).get("steps") or steps
    default_warmup = state.get("resolved", {}).get("warmup", max(1, min(100, first_steps // 20)))
    warmup = args.warmup if args.warmup is not None else int(default_warmup)
    # the values of the flags left to the device's defaults, for --resume to compare
    resolved = {**{k: v for k, v in recipe.items() if k != "steps"}, "lr": lr,
                "warmup": warmup}
    compared = resolved  # a checkpoint from before the warm-up was recorded: not compared
    if args.resume and "warmup" not in state.get("resolved", {"warmup": None}):
        compared = {k: v for k, v in resolved.items() if k != "warmup"}
    clock = LearningRateClock(steps, warmup, args.max_minutes * 60, args.time_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, clock.factor)
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    history: dict[str, list[float]] = {"total": []}
    raw_history: dict[str, list[float]] = {}
    elapsed_before = cpu_before = 0.0
    style_sha = sha256_of(style.path)
    this_command = getattr(args, "command_line", None) or command_line()
    earlier: list[str] = []  # the commands of the runs this one continues
    if args.resume:
        if state.get("style_sha256") != style_sha:
            raise ValueError(f"{checkpoint} was trained on another style image")
        # the sizes left to the device's default differ between a CPU and a CUDA run
        check_resumed_run(checkpoint, state, vars(args), RESUMABLE_CHANGES, steps,
                          resolved=compared, paths=PATH_FLAGS)
        check_same_data(checkpoint, state, prepared)
        earlier = earlier_commands(state)
        # a fine-tune's origin (its weights are in the checkpoint now) stays in metrics.json
        init_from = state.get("init_from")
        init_entries = list(state.get("init_entries", []))
        step = restore_training_state(state, model, optimizer, scheduler, scaler)
        history, raw_history = state["history"], state["raw_history"]
        if args.edge_margin is None:
            edge_margin = int(state.get("edge_margin", 0))
        elapsed_before = float(state["elapsed"])
        cpu_before = float(state.get("cpu_seconds", 0.0))
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"[train] resumed from {checkpoint} at step {step}", flush=True)

    # Inference only (eval-mode forward: the sample grids, the grid checks, the export)
    cast(TransformerNet, model).edge_margin = edge_margin
    started, cpu_started = time.monotonic(), time.process_time()
    clock.start(elapsed_before)

    def snapshot() -> dict[str, Any]:
        return {"architecture": architecture, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "history": history,
                "data_sha256": prepared_data_digest(prepared),
                "commands": [*earlier, this_command],
                "raw_history": raw_history, "style_sha256": style_sha,
                "elapsed": elapsed_before + time.monotonic() - started,
                "cpu_seconds": cpu_before + time.process_time() - cpu_started,
                "sampler_rng": sampler.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "args": recorded_flags(args),
                **working_dir(), "resolved": resolved, "init_from": init_from,
                "init_entries": init_entries, "grid_checks": grid_checks,
                "passing_state": passing_state, "edge_margin": edge_margin}

    def pictures() -> None:
        save_samples(model, val_content, style_rgb, run_dir / "samples.png", device,
                     channels_last)
        save_loss_plot({k: v for k, v in history.items() if v}, run_dir / "loss.png",
                       title=f"{name}: weighted loss terms")

    # both budgets count the runs a --resume continues
    deadline = started + args.max_minutes * 60 - elapsed_before if args.max_minutes \
        else math.inf
    cpu_deadline = cpu_started + args.max_cpu_minutes * 60 - cpu_before \
        if args.max_cpu_minutes else math.inf
    stopped_by: str | None = None
    # Model selection against grid artifacts: every --grid-check-every steps the outputs on
    # the fixed content items are measured; the export is the last checked state whose
    # period-2 and period-4 ratios both stay under --grid-margin (style losses keep falling
    # while the net learns to paint texture on its upsampling grid).
    grid_checks: list[dict[str, Any]] = list(state.get("grid_checks", [])) if args.resume \
        else []
    passing_state: dict[str, Tensor] | None = state.get("passing_state") if args.resume \
        else None
    # the state kept is that of the last check that passed under the margin it ran with
    passing_step = None if passing_state is None else \
        max((int(c["step"]) for c in grid_checks if c["passed"]), default=None)
    for check in grid_checks:  # a --resume may change --grid-margin: judged by the new one
        check["passed"] = _under_margin(check, args.grid_margin)
    if passing_step is not None and not any(c["passed"] and c["step"] == passing_step
                                            for c in grid_checks):
        passing_state = passing_step = None

    def grid_check() -> None:
        nonlocal passing_state, passing_step
        measured = grid_artifacts(model, val_content, device, channels_last)
        check = {"step": step, **measured}
        check["passed"] = _under_margin(check, args.grid_margin)
        grid_checks.append(check)
        if check["passed"]:
            passing_state = {k: v.detach().to("cpu", copy=True)
                             for k, v in model.state_dict().items()}
            passing_step = step

    def checkpoint_now() -> None:
        save_finite_checkpoint(checkpoint, model, snapshot, step)

    def train_step() -> bool:
        """One optimiser step; False (and no step) when the loss overflowed under fp16
        autocast, which the gradient scaler skips."""
        content = to_tensor(sampler.sample(recipe["batch_size"]), device)
        if channels_last:
            content = content.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=amp_dtype) \
            if amp_dtype is not None else contextlib.nullcontext()
        with autocast:
            output = model(content)
            loss, terms, raw = criterion(output, content)
            if args.tile_weight > 0:
                # the sampler's generator: checkpointed, so --resume picks the same windows
                tile = tile_consistency(model, content, output, sampler.rng)
                loss = loss + args.tile_weight * tile
                terms["tile"] = args.tile_weight * float(tile.detach())
                raw["tile"] = float(tile.detach())
        value = float(loss.detach())
        if guard.skips(value, terms, step + 1):
            return False
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        history["total"].append(value)
        for key, term in terms.items():
            history.setdefault(key, []).append(term)
        for key, term in raw.items():
            raw_history.setdefault(key, []).append(term)
        return True

    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[train] exports {export_plan}", flush=True)
    bar = tqdm(total=steps, initial=step, unit="step", desc=f"train {name}",
               disable=args.quiet, dynamic_ncols=True)
    guard = LossGuard(scaler)
    with stop_requests(STOPPING) as stop:
        while step < steps and not stop:
            if time.monotonic() > deadline:
                stopped_by = "the clock (--max-minutes)"
                break
            if time.process_time() > cpu_deadline:
                stopped_by = "the CPU clock (--max-cpu-minutes)"
                break
            if not train_step():
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{history['total'][-1]:.3g}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if args.sample_every and step % args.sample_every == 0:
                pictures()
            if args.grid_margin and args.grid_check_every and \
                    step % args.grid_check_every == 0:
                grid_check()
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoint_now()
        bar.close()
        if stop:
            checkpoint_now()
            pictures()
            print(stopped_note(step, steps, checkpoint), file=sys.stderr, flush=True)
            return stop.exit_code
        stop.finish_first()
        selected_step = step
        if args.grid_margin and (not grid_checks or grid_checks[-1]["step"] != step):
            grid_check()
        checkpoint_now()  # the state the run reached, which --resume continues
        if args.grid_margin and not grid_checks[-1]["passed"]:
            if passing_state is not None and passing_step is not None:
                selected_step = passing_step
                print(f"[train] step {step} paints a grid ({grid_checks[-1]}); exporting the "
                      f"last state under the {args.grid_margin} margin, step {selected_step}",
                      flush=True)
                model.load_state_dict(passing_state)
            else:
                print(f"[train] warning: no checked state stayed under the grid margin "
                      f"{args.grid_margin} (or, after a --resume that narrowed it, none whose "
                      "weights were kept); exporting the last one", flush=True)
        train_seconds = elapsed_before + time.monotonic() - started
        cpu_seconds = cpu_before + time.process_time() - cpu_started
        pictures()

        tail = max(1, min(50, len(history["total"])))
        # The exported state's losses: the window ending at the selected step (the final
        # window when no earlier state was selected for its grid).
        selected_tail = max(1, min(50, selected_step))
        on_cpu = device.type == "cpu"
        metrics: dict[str, Any] = {
            "task": TASK,
            "style": style.name,
            "device": "cpu, reduced size" if on_cpu
                      else f"{device} ({torch.cuda.get_device_name()})",
            "note": _recipe_note(recipe, step, stopped_by, "a CPU") + "; train on a GPU with "
                    "the default flags for full quality"
            if on_cpu else _recipe_note(recipe, step, stopped_by),
            "steps": step, "steps_planned": steps, "stopped_early": stopped_by is not None,
            "selected_step": selected_step, "grid_margin": args.grid_margin,
            "grid_checks": grid_checks,
            "batch_size": recipe["batch_size"], "crop": recipe["size"],
            "min_scale": args.min_scale, "style_size": args.style_size,
            "width": recipe["width"], "blocks": args.blocks,
            "lr": lr, "warmup": warmup, "seed": args.seed, "time_schedule": args.time_schedule,
            "final_lr": scheduler.get_last_lr()[0],
            "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": channels_last,
            "loss_weights": {"content": args.content_weight, "content_layer": args.content_layer,
                             "style": args.style_weight, "style_layers": layer_weights,
                             "tv": args.tv_weight, "grid": args.grid_weight,
                             "tile": args.tile_weight,
                             "vgg_pooling": args.vgg_pooling},
            "train_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, step), 3),
            "threads": torch.get_num_threads(),
            "final_loss_weighted": _window_means(history, len(history["total"]), tail),
            "final_loss_unweighted": _window_means(raw_history, len(history["total"]), tail),
            "final_loss_window": tail,
            "selected_loss_weighted": _window_means(history, selected_step, selected_tail),
            "selected_loss_unweighted": _window_means(raw_history, selected_step, selected_tail),
            "selected_loss_window": selected_tail,
        }
        if init_from is not None:
            metrics["init_from"] = init_from
            metrics["note"] += (f"; fine-tuned from {init_from['artifact']} ({init_from['steps']} "
                                f"steps on {init_from['device']}), whose weights it started from")
            if "upsample" in init_from:
                metrics["note"] += (f" ({init_from['upsample']} upsampling there, "
                                    f"{args.upsample} here)")
        config_extra = {
            "style": style.describe(),
            "input": "RGB float in [0, 1], (N, 3, H, W), any H and W",
            "output": "RGB float in [0, 1], same size as the input",
            "description": "Johnson et al. 2016 image-transformation net (reflection padding, "
                           "instance norm, resize-convolution upsampling, tanh output)",
            "loss": {"content_layer": args.content_layer, "style_layers": layer_weights,
                     "content_weight": args.content_weight, "style_weight": args.style_weight,
                     "tv_weight": args.tv_weight, "grid_weight": args.grid_weight,
                     "tile_weight": args.tile_weight,
                     "style_size": args.style_size,
                     "vgg_pooling": args.vgg_pooling},
        }
        from training.assets import vgg19_weights_path

        used = prepared.files()[0].name  # only the largest array is trained on
        data = [entry for entry in prepared_data_provenance(prepared, [vgg19_weights_path()])
                if entry["kind"] != "prepared array" or entry["path"].endswith(used)]
        data.append(data_entry(style.path, kind="style image", source=style.source))
        data.extend(init_entries)
        if edge_margin:
            architecture = {**architecture, "edge_margin": edge_margin}
        export_artifact(out, name=name, task=TASK, architecture=architecture,
                        module=model.to("cpu").float(), metrics=metrics, data=data,
                        command=this_command, device=str(device), config_extra=config_extra,
                        earlier_commands=earlier,
                        pictures={p: run_dir / p for p in ("samples.png", "loss.png")})
        print(f"[train] {name}: {step} steps in {train_seconds / 60:.1f} min "
              f"({cpu_seconds / 60:.1f} CPU min) -> {out}", flush=True)
        if stop:
            print(FINISHED_FIRST, file=sys.stderr, flush=True)
        print(json.dumps({"final_loss_unweighted": metrics["final_loss_unweighted"]}), flush=True)
        return 0


def _under_margin(check: Mapping[str, Any], margin: float) -> bool:
    """Whether a grid check's period-2 and period-4 ratios both stay under ``margin``."""
    return bool(max(check["nyquist_ratio"], check["quarter_ratio"]) < margin)


def _window_means(history: dict[str, list[float]], end_step: int,
                  window: int) -> dict[str, float]:
    """Each loss averaged over the ``window`` steps ending at ``end_step`` (1-based; the
    histories hold one value per step from step 1)."""
    return {key: float(np.mean(values[max(0, end_step - window):end_step]))
            for key, values in history.items() if values}


def command(args: argparse.Namespace) -> int:
    """``percept train style``."""
    from training.assets import AssetMissingError
    from training.data.arrays import PreparedDataError

    try:
        return train(args)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except (PreparedDataError, AssetMissingError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``style`` to the ``percept train`` subparsers (see training.cli_style)."""
    from training.cli_style import register_train

    return register_train(subparsers)
