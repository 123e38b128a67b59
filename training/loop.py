"""What the trainers' loops share: the device, the autocast dtype, the learning-rate
schedule, checkpoints (written atomically, checked when resumed) and the provenance of
the prepared arrays they read."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from training.assets import sha256_of
from training.data.arrays import PreparedArrays
from training.export import data_entry

CHECKPOINT_NAME = "checkpoint.pt"


def choose_device(name: str) -> torch.device:
    """``--device``: ``auto`` -> CUDA when present, else the CPU. ``cuda`` without a CUDA
    device exits with status 2 and says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is available (use --device auto "
              "or cpu)", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return torch.device(name)


def check_flag_minimums(args: Any, minimums: Mapping[str, float],
                        above: Collection[str] = ()) -> None:
    """ValueError ``--flag must be >= low, got value`` for the first flag (by destination
    name) whose value is set and not a finite number of at least its minimum (more than
    it, for the flags named in ``above``). Trainers run it before anything loads, so a bad
    number fails at once and says which flag."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is None:
            continue
        strict = name in above
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>' if strict else '>='} "
                             f"{low:g}, got {value:g}")


#: The largest --seed (NumPy's and PyTorch's generators take 32 bits without complaint).
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> None:
    """ValueError unless ``--seed`` is 0..MAX_SEED (a negative or huge one failed only once
    the data had loaded, with NumPy's or PyTorch's message naming no flag)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be 0..{MAX_SEED}, got {seed}")


#: Steps in a row whose loss may overflow under fp16 autocast (the gradient scaler skips
#: them) before a run counts as diverged.
MAX_OVERFLOWS_IN_A_ROW = 20


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: nothing is exported."""


#: What to do about a diverged run. Not --resume: it may not change --lr or the loss
#: weights, and with the same ones it diverges the same way.
START_AGAIN = ("lower --lr or the loss weights, and start again in another --run-dir (or "
               "delete the checkpoint this one holds, if the run saved one)")


def check_finite(loss: float, terms: Mapping[str, float], step: int) -> None:
    """TrainingDiverged, naming the terms, when the loss of ``step`` is not finite."""
    if not math.isfinite(loss):
        shown = ", ".join(f"{key} {value:.3g}" for key, value in terms.items())
        raise TrainingDiverged(
            f"the loss is {loss} at step {step} ({shown}): the run diverged, so nothing is "
            f"exported; {START_AGAIN}")


def finite_weights(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class LossGuard:
    """Which steps to skip for a loss that is not finite: under fp16 autocast, the few
    overflows the gradient scaler skips; anything else, or too many in a row, is a
    diverged run (TrainingDiverged)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.in_a_row = 0

    def skips(self, loss: float, terms: Mapping[str, float], step: int) -> bool:
        if math.isfinite(loss):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if not self.scaler.is_enabled() or self.in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
            check_finite(loss, terms, step)
        return True


def save_finite_checkpoint(path: Path, model: nn.Module, snapshot: Callable[[], Any],
                           step: int) -> None:
    """``snapshot()`` saved to ``path``, unless the weights stopped being finite: a diverged
    state is never saved over a good one (TrainingDiverged)."""
    if not finite_weights(model):
        raise TrainingDiverged(
            f"the weights hold NaN or infinite values at step {step}: the run diverged, so "
            f"nothing is exported; {START_AGAIN}")
    save_checkpoint(path, snapshot())


#: What the first Ctrl-C or SIGTERM of a training loop prints.
STOPPING = "[train] stopping: this step ends and a checkpoint is saved (Ctrl-C again stops at once)"


#: What a Ctrl-C or SIGTERM prints once the training loop has ended
#: (:meth:`StopRequest.finish_first`), and what the run says after its export then.
FINISHING = ("[train] the run has ended: its export finishes first (Ctrl-C again stops at "
             "once, and the artifact there before stays as it was)")
FINISHED_FIRST = "[train] exported before stopping, as the stop request came after training"


def stopped_note(step: int, steps: int, checkpoint: Path) -> str:
    return (f"[train] stopped at step {step} of {steps}; the checkpoint is in {checkpoint} and "
            "nothing was exported: run the same command with --resume to go on")


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM during :func:`stop_requests`: the loop finishes
    its step, saves a checkpoint and ends; a second one stops at once."""

    def __init__(self, message: str) -> None:
        self.signal: int | None = None
        self.message = message  # what the first one prints

    def finish_first(self) -> None:
        """From now on (the run's evaluation and export) a first stop request lets the
        run finish, and is only noted: :data:`FINISHED_FIRST` says so after the export."""
        self.message = FINISHING

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)


@contextlib.contextmanager
def stop_requests(message: str) -> Iterator[StopRequest]:
    """Catches SIGINT and SIGTERM for a training loop (from the main thread only): the
    first prints ``message`` and sets the request; a second stops the process at once
    (KeyboardInterrupt for SIGINT, the signal's own default for SIGTERM)."""
    request = StopRequest(message)

    def handle(signum: int, frame: FrameType | None) -> None:
        if request:  # the second: at once, as the signal would without this handler
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        request.signal = signum
        print(f"\n{request.message}", file=sys.stderr, flush=True)

    try:
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield request
        return
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16); the CPU trains in fp32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lr_factor(step: float, steps: int, warmup: int, final: float = 0.01) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final`` x the base LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LearningRateClock:
    """The learning-rate factor of a step: :func:`lr_factor`'s warm-up and cosine, run
    with ``by_clock`` (--time-schedule) on whichever is further along, the step or the
    wall clock's share of ``budget_seconds`` (--max-minutes), so that a run the clock
    stops, at a step rate nobody knew beforehand (a borrowed GPU), still ends annealed.
    The clock counts the time of the runs a --resume continues (:meth:`start`)."""

    def __init__(self, steps: int, warmup: int, budget_seconds: float,
                 by_clock: bool) -> None:
        self.steps, self.warmup = steps, warmup
        self.budget = budget_seconds if by_clock else 0.0
        self.started = time.monotonic()

    def start(self, elapsed_before: float = 0.0) -> None:
        """The run starts now, after ``elapsed_before`` seconds of the runs it resumes."""
        self.started = time.monotonic() - elapsed_before

    def position(self, step: int) -> float:
        if self.budget <= 0:
            return step
        return max(step, (time.monotonic() - self.started) / self.budget * self.steps)

    def factor(self, step: int) -> float:
        return lr_factor(self.position(step), self.steps, self.warmup)


def use_threads(threads: int) -> None:
    """``--threads``: torch's CPU threads (0: torch's choice); ValueError when negative."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def check_time_schedule(args: Any) -> None:
    """--time-schedule needs the clock budget it anneals by."""
    if getattr(args, "time_schedule", False) and not args.max_minutes:
        raise ValueError("--time-schedule anneals by the clock: it needs --max-minutes")


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` to ``path`` through a temporary file: a run killed while saving
    keeps its previous checkpoint."""
    partial = path.with_suffix(".partial")
    torch.save(dict(payload), partial)
    partial.replace(path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed as asked (the trainers exit 2 with its message)."""


#: What every trainer's checkpoint holds (restore_training_state reads them all).
CHECKPOINT_KEYS = ("architecture", "model", "optimizer", "scheduler", "scaler", "step")


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The dictionary a checkpoint file holds, on ``device``; CheckpointError when there is
    no file, or it is unreadable or no dictionary."""
    if not path.is_file():
        raise CheckpointError(f"--resume but {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # any file can be named, and torch raises many types
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or another "
                              f"kind of file: {type(error).__name__}: {error}); remove it and "
                              "start a new run without --resume, or start one in another "
                              "--run-dir") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (it holds a "
                              f"{type(state).__name__})")
    return state


def read_checkpoint(path: Path, device: torch.device, architecture: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues from. CheckpointError when there is none, it
    is unreadable (truncated, not a checkpoint at all), lacks what a resume needs, or holds
    another architecture."""
    state = _load_checkpoint(path, device)
    if "architecture" in state and state["architecture"] != architecture:
        raise CheckpointError(f"{path} holds {state['architecture']}, not {architecture}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (no "
                              f"{', '.join(missing)})")
    return state


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                     may_change: Collection[str]) -> list[str]:
    """``--flag saved -> current`` for each setting recorded in both ``saved`` and
    ``current`` (parsed flags by destination) that differs and is not in ``may_change``:
    what a resumed run would silently do differently from the run it continues."""
    return [f"--{key.replace('_', '-')} {saved[key]!r} -> {current[key]!r}"
            for key in sorted(set(saved) & set(current))
            if key not in may_change and saved[key] != current[key]]


#: Flags every trainer's --resume may change: how long it runs, how often it writes, where
#: its outputs go, the machine. The rest (loss, data, sizes, schedule) define the run.
RESUMABLE_FLAGS = frozenset({
    "steps", "max_minutes", "max_cpu_minutes", "checkpoint_every", "sample_every", "threads",
    "quiet", "out", "run_dir", "resume", "resume_if_present", "device", "channels_last",
    "name", "command",
    "train_command", "func", "command_line", "given_flags"})


def recorded_flags(args: Any) -> dict[str, Any]:
    """The parsed flags a checkpoint records, without the handler function argparse keeps
    there (pickled by reference, it would tie the checkpoint to the module that ran it:
    one saved under ``python -m training.cli_style`` could not be loaded anywhere else)."""
    return {key: value for key, value in vars(args).items() if not callable(value)}


def resuming(checkpoint: Path, args: Any) -> bool:
    """Whether this run continues ``checkpoint``: with ``--resume``, or with
    ``--resume-if-present`` when there is one (a Kubernetes Job retried after an eviction
    continues where it was; its first try starts afresh). Sets ``args.resume`` to match."""
    args.resume = bool(args.resume or (getattr(args, "resume_if_present", False)
                                       and checkpoint.is_file()))
    return bool(args.resume)


def _as_flag(key: str, value: Any) -> str:
    """A parsed flag as it would be given in a shell: ``--data data/prepared/sr288``,
    ``--time-schedule``, ``--style-layer-weight relu1_2=1 relu2_2=2``."""
    flag = f"--{key.replace('_', '-')}"
    if value is True:
        return flag
    if value is None or value is False:
        return f"{flag} (left out)"
    values = value if isinstance(value, list | tuple) else [value]
    return " ".join([flag, *(shlex.quote(str(v)) for v in values)])


#: The checkpoint key holding the directory the run was started (or last resumed) in: its
#: relative path flags name files from there.
WORKING_DIR = "cwd"


def working_dir() -> dict[str, str]:
    """The checkpoint entry that records this process's working directory."""
    return {WORKING_DIR: os.getcwd()}


def _from_dir(value: Any, started_in: str | None) -> Any:
    """A path flag's value (a string or a list of them) given in ``started_in``, as this
    process names the same files: unchanged when it is absolute, or when the run was
    started here or in an unknown directory (an older checkpoint); else relative to here
    when it lies below, and absolute otherwise."""
    if isinstance(value, list | tuple):
        return type(value)(_from_dir(v, started_in) for v in value)
    if not isinstance(value, str) or not started_in or Path(value).is_absolute():
        return value
    here = Path.cwd().resolve()
    there = (Path(started_in) / value).resolve()
    if Path(started_in).resolve() == here:
        return value
    return str(there.relative_to(here)) if there.is_relative_to(here) else str(there)


def carry_resumed_flags(args: Any, checkpoint: Path, may_change: Collection[str],
                        paths: Collection[str] = ()) -> None:
    """With ``--resume``, the flags that define the run (those outside ``may_change``) and
    were left out of this command take the values the run was started with, not their
    defaults, and are printed; the ones given are kept, for :func:`check_resumed_run` to
    compare. The flags named in ``paths`` are files or folders: a relative one given where
    the run started is carried as the same file seen from here (resuming from another
    directory). A namespace that does not say which flags were given (``args.given_flags``,
    set by training.command.track_given_flags) is left as it is."""
    given = getattr(args, "given_flags", None)
    if not args.resume or given is None:
        return
    state = _load_checkpoint(checkpoint, torch.device("cpu"))
    saved = state.get("args", {})
    carried = []
    for key in sorted(saved):
        if key in may_change or key in given or not hasattr(args, key):
            continue
        value = _from_dir(saved[key], state.get(WORKING_DIR)) if key in paths else saved[key]
        if getattr(args, key) != value:
            setattr(args, key, value)
            carried.append(_as_flag(key, value))
    if carried:
        print(f"[train] resuming {checkpoint} with the flags it was started with: "
              f"{', '.join(carried)}", flush=True)


def check_new_run(checkpoint: Path, resume: bool) -> None:
    """A run without --resume must not overwrite the checkpoint of an earlier one."""
    if checkpoint.is_file() and not resume:
        raise CheckpointError(f"{checkpoint} holds an earlier run: pass --resume to continue "
                              "it, or give another --run-dir (or remove that one) to start "
                              "afresh")


def check_resumed_run(checkpoint: Path, state: Mapping[str, Any], args: Mapping[str, Any],
                      may_change: Collection[str], steps: int,
                      resolved: Mapping[str, Any] | None = None,
                      paths: Collection[str] = ()) -> None:
    """CheckpointError when ``--resume`` would continue ``state`` with other settings than
    it was started with, or when the checkpoint is already past ``steps``.

    The flags outside ``may_change`` are compared by the values the run used: ``resolved``
    holds the defaults a trainer filled in for flags left unset (they may differ from one
    device to another), and the flags named in ``paths`` are compared as the folders or
    files they name (``data/prepared/sr288`` is the absolute default when run from the
    repository), each from the directory its run was in."""
    saved, current = dict(state.get("args", {})), dict(args)
    if resolved is not None and "resolved" in state:  # older checkpoints: the raw flags
        saved.update(state["resolved"])
        current.update(resolved)
    started_in = state.get(WORKING_DIR)
    for key in paths:
        for values, folder in ((saved, started_in), (current, None)):
            if isinstance(values.get(key), str):
                values[key] = str(Path(folder or ".", values[key]).resolve())
    changed = changed_settings(saved, current, may_change)
    if changed:
        raise CheckpointError(f"--resume would continue the run in {checkpoint} with other "
                              f"settings: {'; '.join(changed)}. Resume with the settings it "
                              "was started with, or start a new run in another --run-dir")
    if int(state["step"]) > steps:
        raise CheckpointError(f"{checkpoint} is at step {state['step']}, past --steps {steps}: "
                              f"give --steps {state['step']} or more")


def restore_training_state(state: Mapping[str, Any], model: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           scaler: torch.amp.GradScaler) -> int:
    """Loads the model, optimiser, schedule and gradient scaler; returns the step reached."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        # the rate of the next step under this run's schedule (a longer --steps moves it);
        # the optimiser's saved rate is the old schedule's
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
    return int(state["step"])


def earlier_commands(state: Mapping[str, Any]) -> list[str]:
    """The commands of the runs a checkpoint holds, first first (what a resume continues;
    a checkpoint from before they were kept names only the run that saved it)."""
    commands = state.get("commands")
    if isinstance(commands, list):
        return [str(c) for c in commands]
    saved = state.get("args", {}).get("command_line")
    return [str(saved)] if saved else []


def prepared_data_digest(prepared: PreparedArrays) -> str:
    """The sha256 of the prepared folder's manifest, which names its arrays, their sizes,
    seed and crops, and the photos they came from: what a checkpoint records, so that a
    resume refuses arrays prepared again under the same --data path."""
    return sha256_of(prepared.path / "manifest.json")


def check_same_data(checkpoint: Path, state: Mapping[str, Any],
                    prepared: PreparedArrays) -> None:
    """CheckpointError when ``--resume`` would go on with other arrays than the run began
    on (a checkpoint from before the digest was kept is not checked)."""
    saved = state.get("data_sha256")
    if saved is not None and saved != prepared_data_digest(prepared):
        raise CheckpointError(
            f"--resume would continue the run in {checkpoint} on other data: {prepared.path} "
            "was prepared again since the run began (its manifest.json differs). Resume on "
            "the arrays it began on, or start a new run in another --run-dir")


def prepared_data_provenance(prepared: PreparedArrays, extra: list[Path]
                             ) -> list[dict[str, Any]]:
    """Provenance entries: the prepared arrays, their manifest, the source photos it names,
    and ``extra`` files (weights)."""
    entries = [data_entry(f, kind="prepared array") for f in prepared.files()]
    entries.append(data_entry(prepared.path / "manifest.json", kind="prepared manifest"))
    for source in prepared.manifest.get("sources", []):
        entries.append({"path": source["path"], "sha256": source["sha256"],
                        "kind": "source photo"})
    entries.extend(data_entry(p, kind="weights") for p in extra)
    return entries
