"""``percept train superres``: trains the 4x super-resolution network.

Johnson et al. 2016 ("Perceptual Losses for Real-Time Style Transfer and
Super-Resolution", sec. 4.2) train SR with a feature reconstruction loss on VGG relu2_2
(Keras ``block2_conv2``, the lecture's layer) plus total variation, and show that plain
per-pixel loss gives blurry output. The loss here is a weighted sum, each weight a flag:

- pixel: L1 (default) or MSE between the output and the high-res target;
- perceptual: ``content_loss`` (normalised squared error) of VGG19 relu2_2 features;
- tv: total variation of the output (Johnson et al. 2016, sec. 3.3);
- grid: how far the output's spectral peaks at periods 2 and 4, where the two x2
  upsampling stages put a lattice-locked pattern, rise above the target's
  (``training.perceptual.losses.grid_loss``; zero while they do not). A long perceptual
  fine-tune otherwise buys part of its detail as a checkerboard.

Low-res inputs are the bicubic 4x reductions stored beside the high-res arrays (exact
pairs, :mod:`training.sr_data`), optionally blurred/noised/JPEG-compressed. Adam with a
linear warm-up and a cosine decay; on CUDA, bf16 (or fp16 with loss scaling) autocast
and channels_last. The run folder (``--run-dir``, default ``runs/<name>``) gets a
checkpoint every ``--checkpoint-every`` steps (``--resume`` continues from it), sample
grids (low-res bicubic | output | target) and a loss plot; the artifact goes to ``--out``.

Needs only torch, numpy and pillow, the prepared arrays and (for the perceptual loss) the
VGG19 weights file, so it runs on a bare GPU box. Never imports ``services``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from training import nets
from training.assets import REPO_ROOT
from training.data.arrays import load_prepared
from training.data.folders import check_folder_to_make
from training.export import (
    check_output_folder,
    command_line,
    data_entry,
    export_artifact,
    load_exported,
)
from training.image_batches import predict_images, to_tensor
from training.image_quality import y_psnr_ssim
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
from training.plots import save_image_grid, save_loss_plot
from training.sr_data import MAX_JPEG_QUALITY, SCALE, Degradation, PairSampler, degrade

PERCEPTUAL_LAYER = "relu2_2"  # Keras block2_conv2: Johnson et al. 2016's SR layer
TASK = "superres"


@dataclass(frozen=True)
class LossWeights:
    pixel: float = 1.0
    perceptual: float = 0.0
    tv: float = 0.0
    pixel_loss: str = "l1"
    grid: float = 0.0


class SuperResLoss(nn.Module):
    """Weighted pixel + VGG relu2_2 feature + total-variation + grid loss; returns the total
    and each weighted term (for the plots)."""

    def __init__(self, weights: LossWeights, device: torch.device) -> None:
        super().__init__()
        if weights.pixel_loss not in ("l1", "mse"):
            raise ValueError(f"pixel loss must be 'l1' or 'mse', got {weights.pixel_loss!r}")
        self.weights = weights
        self.vgg: nn.Module | None = None
        if weights.perceptual > 0:
            from training.nets.vgg19 import load_vgg19

            self.vgg = load_vgg19(device)

    def forward(self, output: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        from training.perceptual.losses import content_loss, grid_loss, total_variation_loss

        w = self.weights
        terms: dict[str, Tensor] = {}
        if w.pixel > 0:
            pixel = F.l1_loss(output, target) if w.pixel_loss == "l1" else \
                F.mse_loss(output, target)
            terms["pixel"] = w.pixel * pixel.float()
        if self.vgg is not None:
            with torch.no_grad():
                target_features = self.vgg(target, [PERCEPTUAL_LAYER])[PERCEPTUAL_LAYER]
            features = self.vgg(output, [PERCEPTUAL_LAYER])[PERCEPTUAL_LAYER]
            terms["perceptual"] = w.perceptual * content_loss(features.float(),
                                                              target_features.float())
        if w.tv > 0:
            terms["tv"] = w.tv * total_variation_loss(output.float())
        if w.grid > 0:
            terms["grid"] = w.grid * grid_loss(output.float(), target.float())
        if not terms:
            raise ValueError("every loss weight is zero")
        total = torch.stack(list(terms.values())).sum()
        return total, {k: float(v.detach()) for k, v in terms.items()}


def bicubic_upscale(lr: np.ndarray) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, 4h, 4w, 3) uint8 with PIL BICUBIC (the baseline)."""
    return np.stack([np.asarray(Image.fromarray(img).resize(
        (img.shape[1] * SCALE, img.shape[0] * SCALE), Image.Resampling.BICUBIC)) for img in lr])


def validate(model: nn.Module, lr: np.ndarray, hr: np.ndarray, device: torch.device,
             channels_last: bool) -> dict[str, float]:
    """Mean Y-PSNR/SSIM (4 px shaved) of the model and of bicubic on a fixed batch."""
    output = predict_images(model, lr, device, channels_last)
    bicubic = bicubic_upscale(lr)
    model_scores = [y_psnr_ssim(h, o) for h, o in zip(hr, output, strict=True)]
    bicubic_scores = [y_psnr_ssim(h, b) for h, b in zip(hr, bicubic, strict=True)]
    result = {
        "y_psnr_model": float(np.mean([s[0] for s in model_scores])),
        "y_psnr_bicubic": float(np.mean([s[0] for s in bicubic_scores])),
        "y_ssim_model": float(np.mean([s[1] for s in model_scores])),
        "y_ssim_bicubic": float(np.mean([s[1] for s in bicubic_scores])),
    }
    result["y_psnr_gain_db"] = result["y_psnr_model"] - result["y_psnr_bicubic"]
    return result


def save_samples(model: nn.Module, lr: np.ndarray, hr: np.ndarray, path: Path,
                 device: torch.device, channels_last: bool, rows: int = 4) -> Path:
    output = predict_images(model, lr[:rows], device, channels_last)
    bicubic = bicubic_upscale(lr[:rows])
    grid = [[b, o, h] for b, o, h in zip(bicubic, output, hr[:rows], strict=True)]
    return save_image_grid(grid, path, labels=["low-res (bicubic)", "output", "target"])


def build_architecture(args: argparse.Namespace) -> dict[str, Any]:
    architecture: dict[str, Any] = {"type": "superres-resnet", "width": args.width,
                                    "blocks": args.blocks, "upsample": args.upsample}
    if args.tail_width:
        architecture["tail_width"] = args.tail_width
    return architecture


def _use_channels_last(mode: str, device: torch.device) -> bool:
    # Measured on this 2-core CPU: channels_last halves the step time of this net (the 9x9,
    # 3-output-channel convolution is ~3x faster in oneDNN's NHWC path), so 'auto' uses it
    # on CPU as well as on CUDA (where it enables the tensor-core NHWC kernels).
    return mode == "on" or (mode == "auto" and device.type in ("cuda", "cpu"))


#: The smallest value of each numeric flag (checked before anything loads).
FLAG_MINIMUMS = {
    **dict.fromkeys(("steps", "batch_size", "val_items", "width", "blocks",
                     "detail_oversample"), 1),
    **dict.fromkeys(("threads", "lr", "warmup", "checkpoint_every", "sample_every",
                     "max_minutes", "max_cpu_minutes", "blur", "noise", "jpeg", "degrade_prob",
                     "tail_width", "pixel_weight", "perceptual_weight", "tv_weight",
                     "grid_weight"), 0),
    "crop": 4 * SCALE,
}


#: The flags that name files or folders, compared (and carried) by the files they name.
PATH_FLAGS = ("data", "init_from")
#: The flags that size a run, compared with their defaults in metrics.json's note.
SIZE_FLAGS = ("width", "blocks", "crop", "batch_size", "steps")


def size_note(args: argparse.Namespace, steps_run: int, device: torch.device) -> str:
    """How the run's sizes (with the steps it ran) compare with the trainer's defaults,
    and where it ran: "trained on cpu at changed sizes: width 8 (default: 32), ..."."""
    from training.cli_superres import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    defaults = parser.parse_args([])
    ran = {**{flag: getattr(args, flag) for flag in SIZE_FLAGS}, "steps": steps_run}
    changed = [f"{flag.replace('_', ' ')} {value} (default: {getattr(defaults, flag)})"
               for flag, value in ran.items() if value != getattr(defaults, flag)]
    where = "cpu" if device.type == "cpu" else str(device)
    return (f"trained on {where} at the default sizes" if not changed
            else f"trained on {where} at changed sizes: " + ", ".join(changed))


def train(args: argparse.Namespace) -> int:
    """Runs the training described by the parsed ``percept train superres`` flags."""
    out = Path(args.out)
    name = args.name or out.name
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    checkpoint = run_dir / CHECKPOINT_NAME
    if resuming(checkpoint, args):
        carry_resumed_flags(args, checkpoint, RESUMABLE_FLAGS, PATH_FLAGS)
    check_flag_minimums(args, FLAG_MINIMUMS, above={"lr"})
    check_seed(args.seed)
    check_time_schedule(args)
    if args.jpeg > MAX_JPEG_QUALITY:
        raise ValueError(f"--jpeg must be at most {MAX_JPEG_QUALITY} (the lowest quality of "
                         f"qualities drawn up to {MAX_JPEG_QUALITY}; 0: no JPEG degradation), "
                         f"got {args.jpeg}")
    if args.degrade_prob > 1:
        raise ValueError(f"--degrade-prob must be at most 1, got {args.degrade_prob:g}")
    if args.crop % SCALE:
        raise ValueError(f"--crop must be a multiple of {SCALE} (the low-res input is crop/"
                         f"{SCALE}), got {args.crop}")
    if args.warmup is not None and args.warmup > args.steps:
        raise ValueError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps}):"
                         " the learning rate would never reach --lr")
    if args.pixel_weight == args.perceptual_weight == args.tv_weight == 0:
        raise ValueError("every loss weight is 0 (--pixel-weight, --perceptual-weight, "
                         "--tv-weight): there is nothing to train against")
    if args.init_from and not args.resume and not (Path(args.init_from) / "config.json").is_file():
        raise ValueError(f"--init-from {args.init_from}: no exported artifact there (no "
                         "config.json)")
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out and --run-dir must be different folders (the run folder "
                         "holds checkpoints, the artifact folder what is served)")
    export_plan = check_output_folder(out, name)
    check_folder_to_make(run_dir, "--run-dir")
    check_new_run(checkpoint, args.resume)

    prepared = load_prepared(Path(args.data))
    sampler = PairSampler(prepared, args.crop, seed=args.seed)
    val_lr, val_hr = sampler.fixed(args.val_items)
    degradation = Degradation(blur=args.blur, noise=args.noise, jpeg=args.jpeg,
                              prob=args.degrade_prob)
    degrade_rng = np.random.default_rng(args.seed + 1)

    architecture = build_architecture(args)
    model = nets.build(architecture)
    init_files: list[Path] = []
    # the weights a fine-tune started from, as they were then (a resumed run takes them
    # from its checkpoint, not from --init-from, which its own export may have replaced)
    init_entries: list[dict[str, Any]] = []
    if args.init_from and not args.resume:
        init_model, init_config = load_exported(Path(args.init_from))
        if init_config["architecture"] != architecture:
            raise ValueError(f"--init-from {args.init_from} has architecture "
                             f"{init_config['architecture']}, not {architecture}")
        model.load_state_dict(init_model.state_dict())
        init_entries.append(data_entry(
            Path(args.init_from) / init_config.get("weights", "weights.safetensors"),
            kind="initial weights", artifact=f"{init_config['name']}@{init_config['version']}"))
    channels_last = _use_channels_last(args.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    weights = LossWeights(pixel=args.pixel_weight, perceptual=args.perceptual_weight,
                          tv=args.tv_weight, pixel_loss=args.pixel_loss,
                          grid=args.grid_weight)
    criterion = SuperResLoss(weights, device)
    if criterion.vgg is not None:
        from training.assets import vgg19_weights_path

        init_files.append(vgg19_weights_path())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    warmup = args.warmup if args.warmup is not None else max(1, min(100, args.steps // 20))
    clock = LearningRateClock(args.steps, warmup, args.max_minutes * 60, args.time_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, clock.factor)
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    history: dict[str, list[float]] = {"total": []}
    elapsed_before = 0.0
    cpu_before = 0.0
    this_command = getattr(args, "command_line", None) or command_line()
    earlier: list[str] = []  # the commands of the runs this one continues
    if args.resume:
        state = read_checkpoint(checkpoint, device, architecture)
        check_resumed_run(checkpoint, state, vars(args), RESUMABLE_FLAGS, args.steps,
                          paths=PATH_FLAGS)
        check_same_data(checkpoint, state, prepared)
        earlier = earlier_commands(state)
        init_entries = list(state.get("init_entries", []))
        step = restore_training_state(state, model, optimizer, scheduler, scaler)
        if args.warmup is None and "warmup" in state:  # kept when --steps grows
            warmup = int(state["warmup"])  # the schedule's lambda reads it from here
        history = state["history"]
        elapsed_before = float(state["elapsed"])
        cpu_before = float(state.get("cpu_elapsed", 0.0))
        sampler.rng.bit_generator.state = state["sampler_rng"]
        degrade_rng.bit_generator.state = state["degrade_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"[train] resumed from {checkpoint} at step {step}", flush=True)

    def snapshot() -> dict[str, Any]:
        return {"architecture": architecture, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "history": history,
                "data_sha256": prepared_data_digest(prepared),
                "commands": [*earlier, this_command],
                "elapsed": elapsed_before + time.monotonic() - started,
                "cpu_elapsed": cpu_before + time.process_time() - cpu_started,
                "sampler_rng": sampler.rng.bit_generator.state,
                "degrade_rng": degrade_rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "args": recorded_flags(args),
                **working_dir(), "warmup": warmup, "init_entries": init_entries}

    def pictures() -> None:
        save_samples(model, val_lr, val_hr, run_dir / "samples.png", device, channels_last)
        save_loss_plot({k: v for k, v in history.items() if v}, run_dir / "loss.png",
                       title=f"{name}: weighted loss terms; L1(output)/L1(bicubic)")

    def checkpoint_now() -> None:
        save_finite_checkpoint(checkpoint, model, snapshot, step)

    def train_step() -> bool:
        """One optimiser step; False (and no step) when the loss overflowed under fp16
        autocast, which the gradient scaler skips."""
        lr_u8, hr_u8 = sampler.sample(args.batch_size, detail=args.detail_oversample)
        hr = to_tensor(hr_u8, device)
        lr = degrade(lr_u8, hr, degradation, degrade_rng) if degradation.active else \
            to_tensor(lr_u8, device)
        if channels_last:
            hr = hr.contiguous(memory_format=torch.channels_last)
            lr = lr.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=amp_dtype) \
            if amp_dtype is not None else contextlib.nullcontext()
        with autocast:
            output = model(lr)
            loss, terms = criterion(output, hr)
        value = float(loss.detach())
        if guard.skips(value, terms, step + 1):
            return False
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        history["total"].append(value)
        with torch.no_grad():  # progress that batch difficulty does not hide
            bicubic = F.interpolate(lr.float(), scale_factor=float(SCALE), mode="bicubic",
                                    align_corners=False)
            history.setdefault("l1_vs_bicubic", []).append(
                float(F.l1_loss(output.float(), hr) / F.l1_loss(bicubic, hr).clamp_min(1e-8)))
        for key, term in terms.items():
            history.setdefault(key, []).append(term)
        return True

    started = time.monotonic()
    cpu_started = time.process_time()
    clock.start(elapsed_before)
    # both budgets count the runs a --resume continues
    deadline = started + args.max_minutes * 60 - elapsed_before if args.max_minutes \
        else math.inf
    cpu_deadline = cpu_started + args.max_cpu_minutes * 60 - cpu_before \
        if args.max_cpu_minutes else math.inf
    stopped_early = False
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[train] exports {export_plan}", flush=True)
    bar = tqdm(total=args.steps, initial=step, unit="step", desc=f"train {name}",
               disable=args.quiet, dynamic_ncols=True)
    guard = LossGuard(scaler)
    with stop_requests(STOPPING) as stop:
        while step < args.steps and not stop:
            if time.monotonic() > deadline or time.process_time() > cpu_deadline:
                stopped_early = True
                break
            if not train_step():
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{history['total'][-1]:.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if args.sample_every and step % args.sample_every == 0:
                pictures()
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoint_now()
        bar.close()
        train_seconds = elapsed_before + time.monotonic() - started
        cpu_seconds = cpu_before + time.process_time() - cpu_started
        checkpoint_now()
        pictures()
        if stop:
            print(stopped_note(step, args.steps, checkpoint), file=sys.stderr, flush=True)
            return stop.exit_code
        stop.finish_first()

        validation = validate(model, val_lr, val_hr, device, channels_last)
        tail = max(1, min(50, len(history["total"])))
        metrics: dict[str, Any] = {
            "task": TASK,
            "note": size_note(args, step, device),
            "device": "cpu" if device.type == "cpu"
                      else f"{device} ({torch.cuda.get_device_name(device)})",
            "final_loss_window": tail,
            "steps": step, "steps_planned": args.steps, "stopped_early": stopped_early,
            "batch_size": args.batch_size, "detail_oversample": args.detail_oversample,
            "crop_hr": args.crop, "crop_lr": args.crop // SCALE,
            "lr": args.lr, "final_lr": scheduler.get_last_lr()[0], "warmup": warmup,
            "seed": args.seed, "time_schedule": args.time_schedule,
            "loss_weights": {"pixel": weights.pixel, "pixel_loss": weights.pixel_loss,
                             "perceptual": weights.perceptual,
                             "perceptual_layer": PERCEPTUAL_LAYER, "tv": weights.tv,
                             **({"grid": weights.grid} if weights.grid else {})},
            "degradation": {"blur": degradation.blur, "noise": degradation.noise,
                            "jpeg": degradation.jpeg, "prob": degradation.prob},
            "init_from": args.init_from,
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, step), 3),
            "threads": torch.get_num_threads(),
            "final_loss": {k: float(np.mean(v[-tail:])) for k, v in history.items() if v},
            "validation_train_arrays": {
                **{k: round(v, 4) for k, v in validation.items()},
                "items": len(val_lr), "crop_hr": args.crop,
                "note": "centre crops of the first items of the training arrays (not held-out); "
                        "held-out numbers come from `percept eval superres`",
            },
        }
        config_extra = {
            "scale": SCALE,
            "input": "RGB float in [0, 1], (N, 3, h, w), h and w >= 5",
            "output": "RGB float in [0, 1], (N, 3, 4h, 4w)",
            "description": "bicubic upsampling plus a learned residual; " +
                           ("pixel loss only" if weights.perceptual == 0 else
                            f"VGG19 {PERCEPTUAL_LAYER} perceptual loss"),
        }
        export_artifact(out, name=name, task=TASK, architecture=architecture,
                        module=model.to("cpu").float(), metrics=metrics,
                        data=[*prepared_data_provenance(prepared, init_files),
                              *init_entries],
                        command=this_command, device=str(device), config_extra=config_extra,
                        earlier_commands=earlier,
                        pictures={p: run_dir / p for p in ("samples.png", "loss.png")})
        if stop:
            print(FINISHED_FIRST, file=sys.stderr, flush=True)
        print(f"[train] {name}: {step} steps in {train_seconds / 60:.1f} min; validation Y-PSNR "
              f"{validation['y_psnr_model']:.2f} dB vs bicubic {validation['y_psnr_bicubic']:.2f} "
              f"dB -> {out}", flush=True)
        print(json.dumps(metrics["validation_train_arrays"]), flush=True)
        return 0


def command(args: argparse.Namespace) -> int:
    """``percept train superres``."""
    from training.data.arrays import PreparedDataError

    try:
        return train(args)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except (PreparedDataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``superres`` to the ``percept train`` subparsers (see training.cli_superres)."""
    from training.cli_superres import register_train

    return register_train(subparsers)
