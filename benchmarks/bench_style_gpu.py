"""The style network on a CUDA GPU: fp32 eager PyTorch against half precision with
channels_last, the inference rewrites, torch.compile and CUDA graphs, at 512 and 1024 px.

    python -m benchmarks.bench_style_gpu [--sizes 512 1024] [--budget-s 240]

Every variant runs the same weights on the same real photo, batch of one, whole image in
one forward pass. Times are CUDA-event medians after warm-up. The baseline is plain fp32
eager in NCHW with PyTorch's defaults (cudnn.benchmark off; cuDNN may use TF32 for
convolutions); fp32 eager with cudnn.benchmark on (every other variant has it on) is a
second, tuned baseline, and fp32 with TF32 off (IEEE single precision throughout, as
cuDNN's own fp32 kernels compute it) a third, timed with cudnn.benchmark off and on.
TF32 rounds each convolution's inputs to a 10-bit mantissa, so the plain baseline already
computes in reduced precision; the no-TF32 baseline is the one whose numbers are fp32's.
Each variant's output is compared with the strict fp32 output (PSNR and largest error in
8-bit levels), so a fast variant that computes something else shows.

Nets: one committed model per architecture (nearest and bilinear upsampling), plus the
paper's width 32 with random weights (speed only: time does not depend on the weights).
Variants that compile are skipped once ``--budget-s`` has passed. Last come the served
form (``TiledImageModel``: tiles, micro-batcher, uint8 in and out, host copies) and
``Stylize`` over gRPC on loopback (PNG in and out).
Needs a CUDA device; ``--device cpu`` runs the same code without CUDA graphs, as a check.

The result is saved after each net and size to ``--out`` (default results/style_gpu.json,
merged with the saved one: ``merge``), or under ``make bench`` to where benchmarks.run
says; it records the command that re-runs it (``command_line``). The exit status is 1 when
a baseline, a variant or a served measurement raised (``failures``) or an output is under
the fidelity floor (benchmarks/image_models.py), what was measured saved all the same.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.common import RESULTS, ResultFile, fidelity_failures, machine, markdown_table
from benchmarks.image_models import (
    FIDELITY_FLOOR_DB,
    ServedNetwork,
    one_per_architecture,
    photo,
)
from benchmarks.kernel_profile import top_kernels
from services.common.artifacts import load_artifact, read_config
from training import nets
from training.assets import REPO_ROOT
from training.nets.folding import (
    ChannelPaddedConv,
    FoldedUpsampleConv,
    SpaceToDepthConv,
    fold_for_inference,
    for_compile_on_cuda,
)
from training.nets.transformer import ConvLayer, TransformerNet

Forward = Callable[[Tensor], Tensor]
BASELINE = "fp32 eager (plain PyTorch defaults)"
TUNED = "fp32 eager, cudnn.benchmark on"
STRICT = "fp32 eager, cudnn.benchmark on, TF32 off"
TRACED = "folded, output layer traced"
PROFILE_ROWS_SHOWN = 6
SERVED_COMPILED = f"{TRACED}, first layer space-to-depth (served form compiled on CUDA)"
# The folded forms compiled in the main pass: --forms name -> (variant label, the output
# layer's form, the first layer's form (see prepared()), also timed without a CUDA graph).
COMPILED_FORMS = {
    "eager-output": ("folded, output layer eager", "eager", "plain", True),
    "traced": (TRACED, "traced", "plain", True),
    "unfolded-output": ("folded, output layer unfolded", "unfolded", "plain", False),
    "padded-input": (f"{TRACED}, input padded to 8 channels", "traced", "padded", True),
    # training.nets.folding.for_compile_on_cuda: what the services compile on CUDA
    "served": (SERVED_COMPILED, "traced", "space-to-depth", True),
}
IEEE = "fp32 eager, TF32 off (cudnn.benchmark off)"


# -- what runs ------------------------------------------------------------------------------
def style_nets(models: Path, paper_width: bool) -> list[tuple[str, nn.Module]]:
    """(label, fp32 eval module) in run order (what a cut-short run should have measured
    first): the committed nearest-upsampling model, the paper's width-32 net with seeded
    random weights, then the other committed architectures."""
    result = [(f"{name} ({_describe(read_config(models / name)['architecture'])})",
               load_artifact(models, name, torch.device("cpu")).module)
              for name in served_models(models)]
    if paper_width:
        torch.manual_seed(0)
        architecture = {"type": "johnson-transformer", "width": 32, "blocks": 5}
        module = nets.build(architecture).eval().requires_grad_(False)
        result.insert(min(1, len(result)),
                      (f"paper width ({_describe(architecture)}, random weights)", module))
    return result


def served_models(models: Path) -> list[str]:
    """One committed model per architecture, nearest upsampling (the default) first."""
    return sorted(one_per_architecture("style"),
                  key=lambda name: "upsample" in read_config(models / name)["architecture"])


def served_model(models: Path, labels: list[str]) -> str:
    """The committed model the served rows time: one whose plain fp32 eager net is among
    the nets measured (``labels``), so that it is their baseline in the same run."""
    committed = served_models(models)
    return next((name for name in committed
                 if any(label.startswith(f"{name} ") for label in labels)), committed[0])


def _describe(architecture: dict[str, Any]) -> str:
    return (f"width {architecture.get('width', 32)}, "
            f"{architecture.get('upsample', 'nearest')} upsampling")


def multiply_adds(module: nn.Module, side: int) -> int:
    """Convolution multiply-adds of one forward pass at side x side (the unfolded net)."""
    total = 0

    def count(layer: nn.Module, _inputs: Any, output: Tensor) -> None:
        nonlocal total
        assert isinstance(layer, nn.Conv2d)
        kernel = math.prod(layer.kernel_size) * layer.in_channels // layer.groups
        total += output.numel() * kernel

    hooks = [m.register_forward_hook(count) for m in module.modules()
             if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            module(torch.rand(1, 3, side, side))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def prepared(module: nn.Module, device: torch.device, dtype: torch.dtype, *,
             channels_last: bool, fold: bool, output: str = "eager",
             first: str = "plain") -> nn.Module:
    """A copy of ``module`` in ``dtype`` (folded if ``fold``). ``output`` says what becomes
    of the folded output layer (FoldedUpsampleConv) under torch.compile: "eager" (run
    between the compiled parts), "traced" (compiled with the rest) or "unfolded" (the
    last resize-convolution stays folded, its norm and the 9x9 output convolution run at
    full resolution, compiled with the rest). ``first`` is the first convolution's form:
    "plain", "padded" (its 3 input channels get 5 zero ones: ChannelPaddedConv) or
    "space-to-depth" (SpaceToDepthConv). "traced" with "space-to-depth" is
    for_compile_on_cuda, the services' own rewrite for torch.compile on CUDA."""
    variant = copy.deepcopy(module)
    if fold:
        fold_for_inference(variant)
        if (output, first) == ("traced", "space-to-depth"):
            return _placed(for_compile_on_cuda(variant), device, dtype, channels_last)
        for layer in variant.modules():
            if isinstance(layer, FoldedUpsampleConv):
                layer.traced_by_compile = output == "traced"
        if output == "unfolded" and isinstance(variant, TransformerNet):
            variant.folded_output = None
    if first != "plain" and isinstance(variant, TransformerNet):
        layer = variant.encoder[0][0]  # type: ignore[index]
        assert isinstance(layer, ConvLayer)
        form = ChannelPaddedConv if first == "padded" else SpaceToDepthConv
        layer.conv = form(layer.conv)  # type: ignore[assignment]
    return _placed(variant, device, dtype, channels_last)


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype,
            channels_last: bool) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def as_input(image: np.ndarray, device: torch.device, dtype: torch.dtype,
             channels_last: bool) -> Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def cuda_graphed(forward: Forward, example: Tensor) -> Forward:
    """One captured CUDA graph of ``forward`` on a static copy of ``example``: each call
    copies its input in, replays the graph and returns the static output."""
    static_input = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            forward(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_output = forward(static_input)

    def replay(x: Tensor) -> Tensor:
        static_input.copy_(x)
        graph.replay()
        return static_output

    return replay


# -- timing -------------------------------------------------------------------------------
def median_ms(forward: Forward, x: Tensor, device: torch.device, repeats: int,
              warmup: int = 3) -> float:
    """Median of ``repeats`` forward passes: CUDA events on a GPU, else a host clock."""
    with torch.inference_mode():
        for _ in range(warmup):
            forward(x)
        if device.type != "cuda":
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                forward(x)
                times.append((time.perf_counter() - started) * 1000)
            return statistics.median(times)
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(repeats)]
        for start, end in pairs:
            start.record()
            forward(x)
            end.record()
        torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def agreement(output: Tensor, reference: Tensor) -> dict[str, float]:
    """PSNR (dB) and largest error (8-bit levels) of ``output`` against ``reference``."""
    a = output.detach().float().clamp(0, 1).cpu()
    b = reference.detach().float().clamp(0, 1).cpu()
    mse = float(((a - b) ** 2).mean())
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
            "max_error_levels": float((a - b).abs().max()) * 255}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.deadline


Build = Callable[[], tuple[nn.Module, torch.dtype, bool]]


def builder(module: nn.Module, device: torch.device, dtype: torch.dtype, *,
            channels_last: bool, fold: bool, output: str = "eager", first: str = "plain"
            ) -> Build:
    """-> (prepared module, input dtype, channels_last), built when called."""
    return lambda: (prepared(module, device, dtype, channels_last=channels_last, fold=fold,
                             output=output, first=first), dtype, channels_last)


def half_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def eager_variants(module: nn.Module, device: torch.device, half: torch.dtype
                   ) -> list[tuple[str, Build]]:
    """The eager variants in run order (the strict reference first)."""
    fp32 = builder(module, device, torch.float32, channels_last=False, fold=False)
    name = half_name(half)
    return [
        (STRICT, fp32),
        (IEEE, fp32),
        (BASELINE, fp32),
        (TUNED, fp32),
        (f"{name} channels_last eager",
         builder(module, device, half, channels_last=True, fold=False)),
        ("bf16 channels_last eager",
         builder(module, device, torch.bfloat16, channels_last=True, fold=False)),
        (f"{name} channels_last eager, folded (served eager form)",
         builder(module, device, half, channels_last=True, fold=True)),
    ]


class SizeRun:
    """The rows of one net at one size, against its strict fp32 output."""

    def __init__(self, label: str, module: nn.Module, size: int, device: torch.device,
                 repeats: int, profile: bool = False) -> None:
        self.label, self.module, self.size = label, module, size
        self.device, self.repeats = device, repeats
        self.image = photo(size)
        self.macs = multiply_adds(module, size)
        self.reference: Tensor | None = None
        # With ``profile``: the kernels of each folded form compiled in the default mode,
        # profiled straight after it was timed (see compiled()).
        self.profile = profile
        self.profiles: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []

    def row(self, variant: str, **extra: Any) -> dict[str, Any]:
        row = {"net": self.label, "size": self.size, "variant": variant,
               "gmac": self.macs / 1e9, **extra}
        self.rows.append(row)
        return row

    def time(self, variant: str, forward: Forward, x: Tensor, **extra: Any) -> None:
        with torch.inference_mode():
            output = forward(x).float().clone()
        ms = median_ms(forward, x, self.device, self.repeats)
        if variant == STRICT:
            self.reference = output
        row = self.row(variant, ms=ms, tflops=2 * self.macs / (ms / 1000) / 1e12, **extra)
        if self.reference is not None:
            row.update(agreement(output, self.reference))
            # the CPU benchmarks' check (benchmarks/image_models.py), against strict fp32
            row["fidelity_ok"] = bool(row["psnr_db"] >= FIDELITY_FLOOR_DB)
        print(f"[gpu-bench] {self.label} {self.size}px {variant}: {ms:.2f} ms", flush=True)

    def attempt(self, variant: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # one failing variant is reported, the rest still run
            self.row(variant, error=f"{type(error).__name__}: {error}"[:400])
            print(f"[gpu-bench] {self.label} {self.size}px {variant}: {error}", flush=True)

    def eager(self, variant: str, build: Build) -> None:
        def action() -> None:
            torch.backends.cudnn.allow_tf32 = variant not in (STRICT, IEEE)
            torch.backends.cudnn.benchmark = variant not in (BASELINE, IEEE)
            try:
                net, dtype, channels_last = build()
                self.time(variant, net, as_input(self.image, self.device, dtype,
                                                 channels_last))
            finally:
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cudnn.benchmark = True

        self.attempt(variant, action)

    def graphed_eager(self, build: Build, dtype_name: str) -> None:
        """``build`` uncompiled, replayed from one CUDA graph (launch gaps removed)."""
        def action() -> None:
            net, dtype, channels_last = build()
            x = as_input(self.image, self.device, dtype, channels_last)
            self.time(variant, cuda_graphed(net, x), x)

        variant = f"{dtype_name} channels_last eager + CUDA graph, folded"
        self.attempt(variant, action)

    def compiled(self, build: Build, what: str, plain_too: bool, mode: str | None = None
                 ) -> None:
        """torch.compile of ``build`` (static shapes; ``mode`` as torch.compile's), timed
        as is (if ``plain_too``) and replayed from one CUDA graph."""
        net, dtype, channels_last = build()
        name = f"{half_name(dtype)} channels_last + torch.compile"
        if mode:
            name += f" ({mode})"
        x = as_input(self.image, self.device, dtype, channels_last)
        state: dict[str, Any] = {}

        def compile_once() -> None:
            # Every net here shares TransformerNet.forward, and dynamo keeps one cache per
            # code object: past its recompile limit (8) it silently runs eager. A fresh
            # cache per compiled variant keeps each one compiled.
            torch._dynamo.reset()
            started = time.monotonic()
            forward = torch.compile(net, dynamic=False, mode=mode)
            with torch.inference_mode():
                forward(x)
            state["forward"], state["compile_s"] = forward, time.monotonic() - started
            if plain_too:
                self.time(f"{name}, {what}", forward, x, compile_s=state["compile_s"])
            if self.profile and mode is None and what.startswith("folded"):
                # Now, while this compiled graph is the live one: after the next variant's
                # torch._dynamo.reset() it would be traced again, and past the recompile
                # limit run eager under its torch.compile label.
                self.profiles.append(compiled_profile(self.label, self.size, what, forward,
                                                      x, self.device))

        self.attempt(f"{name}, {what}", compile_once)
        if "forward" not in state:
            return
        graph_variant = f"{name} + CUDA graph, {what.split(' (')[0]}"
        if self.device.type != "cuda":
            self.row(graph_variant, skipped="CUDA graphs need a CUDA device")
            return
        self.attempt(graph_variant, lambda: self.time(
            graph_variant, cuda_graphed(state["forward"], x), x,
            compile_s=state["compile_s"]))

    def finish(self) -> None:
        times = {r["variant"]: r["ms"] for r in self.rows if "ms" in r}
        for row in self.rows:
            if "ms" in row:
                for key, variant in (("speedup_vs_fp32_eager", BASELINE),
                                     ("speedup_vs_tuned_fp32", TUNED),
                                     ("speedup_vs_fp32_no_tf32", IEEE)):
                    row[key] = times[variant] / row["ms"] if variant in times else None


Progress = Callable[[list["SizeRun"]], None]


def measure(nets_to_run: list[tuple[str, nn.Module]], sizes: list[int],
            device: torch.device, repeats: int, budget: Budget, save: Progress,
            forms: list[str] | None = None, baselines_only: bool = False,
            profile: bool = False) -> list[SizeRun]:
    """Every eager variant (with ``baselines_only``, the fp32 ones alone) and each of
    ``forms`` (COMPILED_FORMS; default all) compiled, with and without a CUDA graph, for
    each net and size; with ``profile``, each compiled form's kernels too."""
    forms = list(COMPILED_FORMS) if forms is None else forms
    half = torch.float16 if device.type == "cuda" else torch.float32
    runs: list[SizeRun] = []
    for label, module in nets_to_run:
        for size in sizes:
            run = SizeRun(label, module, size, device, repeats, profile)
            runs.append(run)
            for variant, build in eager_variants(module, device, half):
                if not baselines_only or variant in (STRICT, IEEE, BASELINE, TUNED):
                    run.eager(variant, build)
            folded = builder(module, device, half, channels_last=True, fold=True)
            if device.type == "cuda" and not baselines_only:
                run.graphed_eager(folded, half_name(half))
            for form in forms:
                if not budget.left():
                    run.row("compiled variants", skipped="time budget spent")
                    break
                what, output, first, plain_too = COMPILED_FORMS[form]
                run.compiled(builder(module, device, half, channels_last=True, fold=True,
                                     output=output, first=first), what, plain_too=plain_too)
            save(runs)
    return runs


def measure_more(runs: list[SizeRun], device: torch.device, budget: Budget, autotune: bool,
                 save: Progress) -> None:
    """While the budget lasts: the unfolded net compiled, or with ``autotune`` the folded
    net compiled with max-autotune (Triton convolution templates and GEMM choices
    benchmarked per layer: minutes of compiling)."""
    half = torch.float16
    for run in runs:
        if not (budget.left() and device.type == "cuda"):
            return
        if autotune:
            folded = builder(run.module, device, half, channels_last=True, fold=True)
            run.compiled(folded, "folded", plain_too=True, mode="max-autotune-no-cudagraphs")
        else:
            unfolded = builder(run.module, device, half, channels_last=True, fold=False)
            run.compiled(unfolded, "unfolded", plain_too=False)
        save(runs)


def all_rows(runs: list[SizeRun]) -> list[dict[str, Any]]:
    for run in runs:
        run.finish()
    return [row for run in runs for row in run.rows]


def fp32_baseline(baselines: dict[tuple[str, int], float], model: str,
                  size: int) -> float | None:
    """The plain fp32 eager time of ``model``'s net at ``size`` from the network rows."""
    return next((ms for (label, s), ms in baselines.items()
                 if s == size and label.startswith(model)), None)


#: Serving configurations compared on the device: (label, --compile, --cuda-graphs).
SERVED_CONFIGS = [
    ("eager, no CUDA graphs", "off", False),
    ("torch.compile, no CUDA graphs", "on", False),
    ("CUDA graphs of the eager net", "off", True),
    ("CUDA graphs of the compiled net", "on", True),
]
#: A size no other measurement uses: what the first requests at a new size cost.
ODD_SIZE = (720, 960)


def _request_times(network: ServedNetwork, image: np.ndarray, repeats: int
                   ) -> tuple[float, float, float]:
    """(first s, second s, median ms of ``repeats`` more) for ``image``."""
    started = time.monotonic()
    network(image)  # a new shape: compiles if compiled, runs eager if graphed
    first = time.monotonic() - started
    started = time.monotonic()
    network(image)  # recurs: captured if graphed
    second = time.monotonic() - started
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        network(image)
        times.append((time.perf_counter() - began) * 1000)
    return first, second, statistics.median(times)


def served_form(models: Path, name: str, sizes: list[int], device: torch.device, repeats: int,
                baselines: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    """The style service's TiledImageModel on this device in each serving configuration,
    uint8 image in and out: what one Stylize costs besides gRPC and the codecs."""
    rows = []
    configs = SERVED_CONFIGS if device.type == "cuda" else SERVED_CONFIGS[:2]
    for label, compile_mode, graphs in configs:
        torch._dynamo.reset()  # see SizeRun.compiled
        started = time.monotonic()
        network = ServedNetwork("style", name, device, compile=compile_mode,
                                cuda_graphs=graphs)
        try:
            network.warmup()
            warmup_s = time.monotonic() - started
            for height, width in [*((size, size) for size in sizes), ODD_SIZE]:
                image = photo(width, height)
                first, second, ms = _request_times(network, image, repeats)
                base = fp32_baseline(baselines, name, height) if height == width else None
                rows.append({"model": name, "config": label, "size": f"{height}x{width}",
                             "warmup_s": warmup_s, "first_request_s": first,
                             "second_request_s": second, "ms": ms,
                             "speedup_vs_fp32_eager": None if base is None else base / ms})
                print(f"[gpu-bench] served form {label} {height}x{width}: {ms:.2f} ms "
                      f"(first {first:.2f} s, second {second:.2f} s)", flush=True)
        finally:
            network.close()
    return rows


def served_superres(models: Path, device: torch.device, repeats: int
                    ) -> list[dict[str, Any]]:
    """The super-resolution service's TiledImageModel with and without CUDA graphs
    (272 px tiles, small convolutions: launch-bound on a GPU), against plain fp32 eager
    of its network on the whole image, timed here."""
    from services.common.artifacts import list_artifacts

    name = next(iter(list_artifacts(models, "superres")), None)
    if name is None or device.type != "cuda":
        return []
    eager = load_artifact(models, name, torch.device("cpu")).module.float().eval().to(device)
    rows = []
    for label, compile_mode, graphs in (SERVED_CONFIGS[0], SERVED_CONFIGS[2]):
        network = ServedNetwork("superres", name, device, compile=compile_mode,
                                cuda_graphs=graphs)
        try:
            started = time.monotonic()
            network.warmup()
            warmup_s = time.monotonic() - started
            for size in (128, 256, 512):
                image = photo(size)
                torch.backends.cudnn.benchmark = False
                base = median_ms(eager, as_input(image, device, torch.float32, False), device,
                                 repeats)
                torch.backends.cudnn.benchmark = True
                first, second, ms = _request_times(network, image, repeats)
                rows.append({"model": name, "config": label, "size": f"{size}x{size}",
                             "warmup_s": warmup_s, "first_request_s": first,
                             "second_request_s": second, "ms": ms, "fp32_eager_ms": base,
                             "speedup_vs_fp32_eager": base / ms})
                print(f"[gpu-bench] served form {name} {label} {size}px: {ms:.2f} ms "
                      f"(fp32 eager {base:.2f} ms)", flush=True)
        finally:
            network.close()
    return rows


def served_grpc(models: Path, name: str, sizes: list[int], device: torch.device, repeats: int,
                baselines: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    """``Stylize`` end to end through an in-process gRPC server on this device with the
    default flags: PNG in, PNG out, as a client sees it; with the host's PNG decode and
    encode of the same image timed alone, for scale."""
    from benchmarks.common import served
    from benchmarks.image_models import png
    from percept.v1 import style_pb2
    from services import client
    from services.common.images import decode_image, encode_image

    style = str(read_config(models / name)["style"]["name"])
    torch._dynamo.reset()  # see SizeRun.compiled
    started = time.monotonic()
    rows = []
    with served("style", device=device.type) as server:
        startup_s = time.monotonic() - started
        channel = client.connect(server.target)
        for size in sorted({256, *sizes}):
            image = photo(size)
            data = png(image)
            request = style_pb2.StylizeRequest(image=data, style=style)
            started = time.monotonic()
            client.stylize(channel, request, timeout=900)  # a new shape may compile
            first_s = time.monotonic() - started
            times = []
            for _ in range(repeats + 1):  # the first of these captures a CUDA graph
                began = time.perf_counter()
                client.stylize(channel, request, timeout=900)
                times.append((time.perf_counter() - began) * 1000)
            ms = statistics.median(times[1:])
            codec = []
            for _ in range(5):
                began = time.perf_counter()
                encode_image(decode_image(data, max_pixels=64_000_000).rgb)
                codec.append((time.perf_counter() - began) * 1000)
            base = fp32_baseline(baselines, name, size)
            rows.append({"model": name, "size": size, "server_start_s": startup_s,
                         "first_request_s": first_s, "ms": ms,
                         "png_decode_encode_ms": statistics.median(codec),
                         "speedup_vs_fp32_eager": None if base is None else base / ms})
            print(f"[gpu-bench] gRPC Stylize {name} {size}px: {ms:.2f} ms", flush=True)
    return rows


def unavailable() -> str | None:
    """Why this benchmark cannot run here (``make bench`` then shows the saved result)."""
    return None if torch.cuda.is_available() else "no CUDA device"


def run(quick: bool = False, out: ResultFile | None = None) -> dict[str, Any]:
    """``make bench``'s entry: the defaults on the CUDA device. ``out`` (benchmarks.run's,
    which also saves the final result) receives the run's progress."""
    return measure_all([1024, 512], torch.device("cuda"), 10 if quick else 30, 240.0,
                       not quick, out)


def triton_checked(found: dict[str, Any], device: torch.device, what: str) -> dict[str, Any]:
    """``found``, a profile (top_kernels) of a form run under torch.compile, marked with
    whether it holds compiled code. On CUDA inductor's kernels are Triton's (triton_poi_...,
    triton_red_...): a profile without one is of eager code (dynamo past its recompile
    limit runs the net eager, silently), so it is marked ``compiled_kernels_found``: false,
    with a warning, and not shown as the compiled form's. On a CPU inductor writes C++, and
    nothing is marked."""
    if "error" in found or device.type != "cuda":
        return found
    found["compiled_kernels_found"] = found.get("triton_kernels", 0) > 0
    if not found["compiled_kernels_found"]:
        print(f"[gpu-bench] WARNING: the profile of {what} holds no Triton kernel: it ran "
              "eager, and is marked invalid", file=sys.stderr, flush=True)
    return found


def compiled_profile(label: str, size: int, what: str, forward: Forward, x: Tensor,
                     device: torch.device) -> dict[str, Any]:
    """The kernels that take the compiled ``what`` form's time
    (benchmarks/kernel_profile.py), to show what stands between it and the target; call it
    while ``forward``'s compiled graph is live (before another torch._dynamo.reset())."""
    variant = f"torch.compile, {what}, no CUDA graph"
    try:
        found = triton_checked(top_kernels(forward, x, device), device,
                               f"{label} at {size} px, {variant}")
    except Exception as error:  # reported (and fails the run); the timings still count
        found = {"error": f"{type(error).__name__}: {error}"[:400]}
    return {"net": label, "size": size, "variant": variant, **found}


def served_profile(models: Path, name: str, size: int, device: torch.device, repeats: int
                   ) -> dict[str, Any]:
    """One ``size`` px request to the style service's TiledImageModel with the default
    serving flags (on CUDA: CUDA graphs of the eager net): its median wall time, and the
    device's busy time and top kernels (copies included) per request. Wall minus busy is
    what the host adds: uint8 stacking, pageable copies, the batcher's thread hop."""
    network = ServedNetwork("style", name, device, compile="auto",
                            cuda_graphs=device.type == "cuda")
    try:
        network.warmup()
        image = photo(size)
        _, _, wall_ms = _request_times(network, image, repeats)
        found = top_kernels(network, image, device, passes=5)
    finally:
        network.close()
    return {"model": name, "size": size, "config": "default serving flags",
            "device": device.type, "wall_ms": wall_ms, **found}


def command_line(sizes: list[int], device: torch.device, repeats: int, budget_s: float,
                 paper_width: bool, only: list[str] | None = None, autotune: bool = False,
                 profile: bool = False, served: bool = True, forms: list[str] | None = None,
                 baselines_only: bool = False, out: Path | None = None) -> str:
    """The ``python -m benchmarks.bench_style_gpu`` command that measures what
    :func:`measure_all` with these arguments does (whoever called it: ``make bench``'s
    own command line would re-run nothing of it)."""
    words = ["python", "-m", "benchmarks.bench_style_gpu", "--device", device.type,
             "--sizes", *map(str, sizes), "--repeats", str(repeats), "--budget-s",
             f"{budget_s:g}"]
    if not paper_width:
        words.append("--no-paper-width")
    if only:
        words += ["--only", *only]
    if forms is not None:
        words += ["--forms", *forms]
    words += [flag for flag, on in (("--autotune", autotune), ("--profile", profile),
                                    ("--networks-only", not served),
                                    ("--baselines-only", baselines_only)) if on]
    if out is not None and out.resolve() != (RESULTS / "style_gpu.json").resolve():
        path, root = out.resolve(), REPO_ROOT.resolve()
        words += ["--out", str(path.relative_to(root) if path.is_relative_to(root) else path)]
    return shlex.join(words)


def measure_all(sizes: list[int], device: torch.device, repeats: int, budget_s: float,
                paper_width: bool, out: ResultFile | None, only: list[str] | None = None,
                autotune: bool = False, profile: bool = False, served: bool = True,
                forms: list[str] | None = None, baselines_only: bool = False
                ) -> dict[str, Any]:
    """Measures everything, saving the result to ``out`` after each net and size (a run cut
    short still leaves what it measured); the caller saves the final result."""
    torch.backends.cudnn.benchmark = True
    models = REPO_ROOT / "models"
    budget = Budget(budget_s)
    command = command_line(sizes, device, repeats, budget_s, paper_width, only, autotune,
                           profile, served, forms, baselines_only,
                           out.path.resolve() if out else None)
    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "command": command,
                              "machine": machine(), "device": str(device),
                              "torch": torch.__version__,
                              "cudnn": torch.backends.cudnn.version(), "sizes": sizes,
                              "repeats": repeats, "budget_s": budget_s, "rows": []}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result["gpu"] = {"name": properties.name, "multiprocessors":
                         properties.multi_processor_count,
                         "memory_gib": properties.total_memory / 2**30}

    def save(runs: list[SizeRun]) -> None:
        result["rows"] = all_rows(runs)
        if profile:
            result["kernel_profile"] = [found for run in runs for found in run.profiles]
        if out is not None:
            out.save(result)

    nets_to_run = [(label, module) for label, module in style_nets(models, paper_width)
                   if not only or any(word in label for word in only)]
    served_name = served_model(models, [label for label, _ in nets_to_run])
    result["served_model"] = served_name
    runs = measure(nets_to_run, sizes, device, repeats, budget, save, forms, baselines_only,
                   profile)
    if profile and served:
        try:
            result["served_profile"] = served_profile(models, served_name, max(sizes),
                                                      device, min(repeats, 10))
        except Exception as error:  # reported (and fails the run); the timings still count
            result["served_profile"] = {"error": f"{type(error).__name__}: {error}"[:400]}
        save(runs)
    result["rows"] = all_rows(runs)
    baselines = {(r["net"], r["size"]): r["ms"] for r in result["rows"]
                 if r["variant"] == BASELINE and "ms" in r}
    for key, measure_served in (("served_form", served_form), ("grpc", served_grpc),
                                ("superres_served", lambda models, _name, _sizes, device,
                                 repeats, _baselines: served_superres(models, device,
                                                                      repeats))
                                ) if served else ():
        try:
            result[key] = measure_served(models, served_name, sizes, device,
                                         min(repeats, 10), baselines)
        except Exception as error:  # reported (and fails the run); the rest still runs
            result[key] = {"error": f"{type(error).__name__}: {error}"[:400]}
        save(runs)
    if forms is None:  # a run that names its forms wants those alone
        measure_more(runs, device, budget, autotune, save)
    save(runs)
    return result


def failures(result: dict[str, Any]) -> list[str]:
    """What of a run failed (``make bench`` and ``main`` then exit 1; the result is saved
    all the same): a network row that raised (a baseline or a variant; a skipped one is no
    failure), the served, gRPC, super-resolution or profile measurements that raised.
    Outputs under the fidelity floor are benchmarks.common.fidelity_failures's."""
    found = [f"{r['net']} at {r['size']} px, {r['variant']}: {r['error']}"
             for r in result.get("rows", []) if "error" in r]
    for key in ("served_form", "grpc", "superres_served", "served_profile"):
        value = result.get(key)
        if isinstance(value, dict) and "error" in value:
            found.append(f"{key}: {value['error']}")
    found += [f"kernel profile of {p['net']} at {p['size']} px, {p['variant']}: {p['error']}"
              for p in result.get("kernel_profile", []) if "error" in p]
    return found


#: The earlier run's note, carried into the result that replaces it (see merge()).
CARRIED_NOTE = "From the result this run replaced"


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with what the saved result carries that no run measures: the later runs of
    some variants it names (``companions``, saved apart: the README and the plot show them
    after it) and its ``note``, kept under the date and command of the run it was about."""
    merged = dict(new)
    if saved.get("companions") and "companions" not in new:
        merged["companions"] = saved["companions"]
    note = saved.get("note")
    if note and "note" not in new:
        merged["note"] = note if note.startswith(CARRIED_NOTE) else (
            f"{CARRIED_NOTE} ({saved.get('date', '?')}, `{saved.get('command', '?')}`): {note}")
    return merged


def _kernel_rows(found: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A top_kernels result's rows for a markdown table."""
    return [(k["name"], k["calls_per_pass"], k["us_per_pass"], k["share"])
            for k in found["kernels"]]


def markdown(result: dict[str, Any]) -> str:
    gpu = result.get("gpu", {}).get("name", result["device"])
    lines = [f"### Style network on {gpu} (torch {result['torch']}, cuDNN {result['cudnn']})",
             "", *_network_tables(result)]
    lines += _served_tables(result)
    for name, companion in companions(result):
        lines += ["", f"#### Later run ({name})", "", *_network_tables(companion)]
    return "\n".join(lines)


def companions(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(file name, result) of the later runs of some variants that ``result`` names,
    saved apart in RESULTS (those present), in the order named."""
    found = []
    for name in result.get("companions", []):
        path = RESULTS / name
        if path.is_file():
            found.append((name, json.loads(path.read_text())))
    return found


def _network_tables(result: dict[str, Any]) -> list[str]:
    """The network rows of a run, and its kernel profiles."""
    lines = [f"Measured {result.get('date', '?')}: `{result.get('command', '?')}`.", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += ["Batch of one, whole image per pass, CUDA-event medians. x plain = fp32 "
             "eager with PyTorch's defaults (cudnn.benchmark off; TF32 convolutions) / "
             "variant; x tuned = fp32 eager with cudnn.benchmark on / variant; x no-TF32 = "
             "fp32 eager with TF32 off and cudnn.benchmark off (IEEE fp32) / variant. PSNR "
             "and max error against fp32 with TF32 off.",
             ""]
    table: list[tuple[Any, ...]] = []
    for r in result["rows"]:
        if "ms" not in r:
            table.append((r["net"], r["size"], r["variant"], r.get("skipped")
                          or r.get("error", "?"), "", "", "", "", "", ""))
            continue
        nan = float("nan")
        # Runs saved before the no-TF32 baseline existed have no such ratio.
        no_tf32 = r.get("speedup_vs_fp32_no_tf32") or "not timed"
        table.append((r["net"], r["size"], r["variant"], r["ms"],
                      r["speedup_vs_fp32_eager"] or nan, r["speedup_vs_tuned_fp32"] or nan,
                      no_tf32, r["tflops"], r.get("psnr_db", nan),
                      r.get("max_error_levels", nan)))
    lines.append(markdown_table(["net", "px", "variant", "median ms", "x plain fp32",
                                 "x tuned fp32", "x no-TF32 fp32", "TFLOP/s", "PSNR dB",
                                 "max err (levels)"], table))
    # The profiles of the first net at the largest size, their top kernels (the JSON keeps
    # every net and size, 15 kernels each).
    profiles = result.get("kernel_profile", [])
    for found in profiles:
        if (found["net"], found["size"]) != (profiles[0]["net"], max(result["sizes"])):
            continue
        lines += ["", f"Kernels of {found['net']} at {found['size']} px, {found['variant']}:"]
        if "error" in found:
            lines.append(found["error"])
            continue
        if not _holds_compiled_code(found, result):
            lines.append("not shown: the profile holds no Triton kernel, so what ran was "
                         "eager code, not the compiled form")
            continue
        lines += [f"{found['total_us_per_pass']:.0f} us of kernel time per pass.", "",
                  markdown_table(["kernel", "calls/pass", "us/pass", "share"],
                                 _kernel_rows(found)[:PROFILE_ROWS_SHOWN])]
    return lines


def _holds_compiled_code(found: dict[str, Any], result: dict[str, Any]) -> bool:
    """Whether a kernel profile of a compiled form is of compiled code (triton_checked();
    for a profile saved before that mark, whether a Triton kernel is among its top ones)."""
    if "compiled_kernels_found" in found:
        return bool(found["compiled_kernels_found"])
    if not str(found.get("variant", "")).startswith("torch.compile") \
            or not str(result.get("device", "")).startswith("cuda"):
        return True
    return any("triton" in kernel["name"] for kernel in found.get("kernels", []))


#: The ratio cell of a size the networks were not timed at in the run (the odd size,
#: there for its first-request cost), which has no baseline to divide by.
NO_BASELINE = "no fp32 eager at this size"


def _served_tables(result: dict[str, Any]) -> list[str]:
    """The served form's, gRPC's and super-resolution's rows of a run, and its profile
    of one served request."""
    lines: list[str] = []
    nan = float("nan")
    sections: list[tuple[str, str, list[str], Callable[[dict[str, Any]], tuple[Any, ...]]]] = [
        ("served_form", "Served form (TiledImageModel: uint8 in/out, host copies, batcher), "
         "per serving configuration; first and second request at each size in s:",
         ["model", "config", "px", "median ms", "x vs fp32 eager", "first s", "second s",
          "warm-up s"],
         lambda r: (r["model"], r.get("config", "compile auto"), r["size"], r["ms"],
                    r["speedup_vs_fp32_eager"] or NO_BASELINE, r["first_request_s"],
                    r.get("second_request_s", nan), r["warmup_s"])),
        ("superres_served", "Super-resolution served form (input px; fp32 eager = the "
         "network on the whole image, same run):",
         ["model", "config", "input px", "median ms", "fp32 eager ms", "x vs fp32 eager",
          "first s", "second s"],
         lambda r: (r["model"], r["config"], r["size"], r["ms"], r["fp32_eager_ms"],
                    r["speedup_vs_fp32_eager"], r["first_request_s"], r["second_request_s"])),
        ("grpc", "Stylize over gRPC (PNG in and out, default flags); PNG decode + encode of "
         "the same image on the host alone, for scale:",
         ["model", "px", "median ms", "x vs plain fp32 network", "PNG codecs ms",
          "first request s", "server start s"],
         lambda r: (r["model"], r["size"], r["ms"], r["speedup_vs_fp32_eager"] or NO_BASELINE,
                    r.get("png_decode_encode_ms", nan), r["first_request_s"],
                    r["server_start_s"])),
    ]
    for key, title, headers, row in sections:
        value = result.get(key)
        if isinstance(value, list) and value:
            lines += ["", title, "", markdown_table(headers, [row(r) for r in value])]
        elif value:
            lines += ["", f"{title.split(' (')[0]}: {value}"]
    served = result.get("served_profile")
    if served:
        lines += ["", "One served request, where its time goes:"]
        if "error" in served:
            lines.append(served["error"])
        else:
            busy_ms = served["total_us_per_pass"] / 1000
            busy = ("of GPU time, the rest is the host's" if served.get("device") == "cuda"
                    else "of operators' own time (CPU: a check of the code path)")
            lines += [f"{served['model']} at {served['size']} px, {served['config']}: "
                      f"{served['wall_ms']:.2f} ms wall, {busy_ms:.2f} ms {busy}.", "",
                      markdown_table(["kernel or copy", "calls/request", "us/request",
                                      "share"], _kernel_rows(served))]
    return lines


def arguments() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.bench_style_gpu`` (command_line() writes
    one)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="no new compiled variant starts after this many seconds")
    parser.add_argument("--no-paper-width", action="store_true",
                        help="skip the width-32 random-weight net")
    parser.add_argument("--only", nargs="+", metavar="WORD",
                        help="measure only the nets whose label has one of these words "
                        "(e.g. starry-night, paper); the served rows still run")
    parser.add_argument("--autotune", action="store_true",
                        help="after the main variants, compile the folded net with "
                        "max-autotune (instead of the unfolded net with the default mode)")
    parser.add_argument("--profile", action="store_true",
                        help="after the main variants, profile the compiled served form "
                        "of each net and size: the kernels that take its time; and one "
                        "served request at the largest size: wall against device time")
    parser.add_argument("--networks-only", action="store_true",
                        help="time the networks alone: skip the served form, Stylize over "
                        "gRPC and super-resolution")
    parser.add_argument("--forms", nargs="+", choices=list(COMPILED_FORMS),
                        help="the folded forms to compile (default: all)")
    parser.add_argument("--baselines-only", action="store_true",
                        help="of the eager variants, time only the fp32 baselines")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to save the result (default results/style_gpu.json, "
                        "merged with what is saved there: merge())")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu to check the code path)")
    # The command saved with the result is command_line()'s, from what is measured.
    out = ResultFile("style_gpu", quick=False, command="", merge=merge, out=args.out)
    outcome = measure_all(args.sizes, torch.device(args.device), args.repeats, args.budget_s,
                          not args.no_paper_width, out, args.only, args.autotune,
                          args.profile, served=not args.networks_only, forms=args.forms,
                          baselines_only=args.baselines_only)
    outcome = out.save(outcome)
    print(markdown(outcome))
    problems = failures(outcome) + [f"output under the fidelity floor: {f}"
                                    for f in fidelity_failures(outcome)]
    for problem in problems:
        print(f"[gpu-bench] FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
