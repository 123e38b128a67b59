"""Speed of an image-to-image model artifact: the served gRPC path against plain fp32 eager
PyTorch of the same network in the same run, plus batching on and off."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import (
    alternated_bursts,
    interleaved_medians,
    machine,
    markdown_table,
    served,
    server_process,
)
from services import client
from services.common.artifacts import load_artifact
from services.common.device import dtype_name
from training.assets import REPO_ROOT
from training.image_quality import psnr


def one_per_architecture(task: str) -> list[str]:
    """The first committed model of ``task`` for each distinct architecture (models of one
    architecture differ only in weights, which do not change the time)."""
    from services.common.artifacts import list_artifacts, read_config

    models = REPO_ROOT / "models"
    chosen: dict[str, str] = {}
    for model in list_artifacts(models, task):
        key = json.dumps(read_config(models / model)["architecture"], sort_keys=True)
        chosen.setdefault(key, model)
    return list(chosen.values())


def photo(size: int, height: int | None = None) -> np.ndarray:
    """scikit-image's astronaut, ``size`` px wide and ``height`` (default ``size``) high (a
    held-out photo where scikit-image is not installed, as on a bare GPU machine)."""
    try:
        from skimage import data

        image = Image.fromarray(np.asarray(data.astronaut()))
    except ImportError:
        path = min((REPO_ROOT / "data" / "photos" / "heldout").glob("*.jpg"))
        image = Image.open(path).convert("RGB")
    # np.array: a writable copy (torch.from_numpy warns on Pillow's read-only buffer)
    return np.array(image.resize((size, height or size), Image.Resampling.BICUBIC))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


#: The least PSNR (dB) against fp32 eager a faster variant may give: bfloat16 or float16
#: rounding lands near 52 dB here; a variant under the floor computes something else, and
#: `make bench` fails (benchmarks/run.py) instead of reporting its speed as a win.
FIDELITY_FLOOR_DB = 40.0


def fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """PSNR (dB, 8-bit peak) and largest error (levels) of ``output`` against the fp32
    eager ``reference``: what a faster variant gives up, if anything; and whether that
    stays above :data:`FIDELITY_FLOOR_DB`."""
    error = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    db = psnr(reference, output)
    return {"psnr_db": db, "max_error_levels": float(error.max()),
            "fidelity_ok": bool(db >= FIDELITY_FLOOR_DB)}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def eager_forward(module: torch.nn.Module, array: np.ndarray) -> np.ndarray:
    """The baseline: fp32, NCHW, the whole image in one eager forward pass."""
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        y = module(x).clamp(0, 1)
    return (y[0].permute(1, 2, 0) * 255 + 0.5).byte().numpy()


CPU = torch.device("cpu")


class ServedNetwork:
    """The service's own TiledImageModel (same tiles, rewrites and batch caps) on its own
    event loop, without gRPC or image codecs: how much of the served time is the network
    and how much is the request around it."""

    def __init__(self, service: str, model: str, device: torch.device = CPU,
                 compile: str = "off", cuda_graphs: bool = True) -> None:
        from services.common.config import ServerConfig
        from services.common.image_model import TiledImageModel

        config = ServerConfig(service=service, compile=compile, cuda_graphs=cuda_graphs)
        if service == "superres":
            from services.superres import service as module

            scale, tile = module.SCALE, module.TILE
        else:
            from services.style import service as module  # type: ignore[no-redef]

            scale, tile = 1, config.style_tile
        self.model = TiledImageModel(load_artifact(REPO_ROOT / "models", model, device),
                                     device, config, scale=scale, tile=tile,
                                     overlap=module.OVERLAP,
                                     max_batch_pixels=module.MAX_BATCH_PIXELS)
        self.loop = asyncio.new_event_loop()

        async def start() -> None:
            self.model.start()

        self.loop.run_until_complete(start())

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB -> the service's output for it."""
        return self.loop.run_until_complete(self.model.apply(image))

    def warmup(self) -> None:
        self.loop.run_until_complete(self.model.warmup())

    def close(self) -> None:
        self.loop.run_until_complete(self.model.stop())
        self.loop.close()


# The eager baseline in a process of its own, given `percept serve --retain-memory`'s
# allocator settings before anything else allocates; one forward pass per line of stdin
# (the image size), answered by a line.
_RETAINED_EAGER_WORKER = """
import sys
from services.common.allocator import retain_freed_memory
retained = retain_freed_memory()
import torch
from benchmarks.image_models import eager_forward, photo
from services.common.artifacts import load_artifact
from training.assets import REPO_ROOT
torch.set_num_threads(int(sys.argv[2]))
eager = load_artifact(REPO_ROOT / "models", sys.argv[1], torch.device("cpu")).module.float().eval()
images = {}
print("ready" if retained else "not retained", flush=True)
for line in sys.stdin:
    size = int(line)
    image = images.setdefault(size, photo(size))
    eager_forward(eager, image)
    print("done", flush=True)
"""
RETAINED_EAGER = "eager fp32, allocator retained (own process)"
#: Untimed pause before each timed call (benchmarks.common.interleaved_medians).
SETTLE_S = 0.05


class RetainedEager:
    """The fp32 eager baseline in its own process with the server's allocator settings
    (services/common/allocator.py), timed in the same round-robin as the rest: its ratio to
    the plain baseline is what the allocator alone is worth, and the served path's ratio to
    it is what the rest of the serving work is worth."""

    def __init__(self, model: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _RETAINED_EAGER_WORKER, model, str(torch.get_num_threads())],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        status = self.stdout.readline().strip()
        if status != "ready":
            self.close()
            raise RuntimeError(f"the retained-allocator baseline did not start: {status!r}")

    def __call__(self, size: int) -> None:
        self.stdin.write(f"{size}\n")
        self.stdin.flush()
        if self.stdout.readline().strip() != "done":
            raise RuntimeError("the retained-allocator baseline stopped")

    def close(self) -> None:
        self.stdin.close()
        self.process.wait(60)


def latency(service: str, model: str, sizes: list[int], repeats: int, call: Any,
            compile_too: bool, server_processes: bool = False) -> list[dict[str, Any]]:
    """Median latency per size: eager fp32 vs the served path (and compiled, if asked), and
    the served form of the network alone (no gRPC, no PNG). With ``server_processes`` the
    servers are `percept serve` processes, as deployed (their allocator settings,
    ``--retain-memory``, apply there and not to the baseline in this process); otherwise
    they run in this process."""
    artifact = load_artifact(REPO_ROOT / "models", model, torch.device("cpu"))
    eager = artifact.module.float().eval()
    network = ServedNetwork(service, model)
    rows = []
    # The served default (--cpu-dtype auto: bf16 on CPUs with native bf16), and where that
    # is not fp32, the fp32 served path too (the same rewrites, no precision given up).
    configs: dict[str, dict[str, str]] = {"served": {"compile": "off"}}
    if dtype_name(CPU) != "float32":
        configs["served, --cpu-dtype float32"] = {"compile": "off", "cpu_dtype": "float32"}
    if compile_too:
        configs["served+compile"] = {"compile": "on"}
    servers: dict[str, Any] = {
        name: (server_process(service, *(f"--{key.replace('_', '-')}={value}"
                                         for key, value in cfg.items()))
               if server_processes else served(service, **cfg))
        for name, cfg in configs.items()}
    entered = {name: ctx.__enter__() for name, ctx in servers.items()}
    # server_process yields (process, channel); served yields a RunningServer.
    running = {name: value[1] if server_processes else client.connect(value.target)
               for name, value in entered.items()}
    retained: RetainedEager | None = None
    try:
        if server_processes:
            retained = RetainedEager(model)
        for size in sizes:
            image = photo(size)
            data = png(image)
            actions: dict[str, Callable[[], object]] = {
                "eager fp32": functools.partial(eager_forward, eager, image),
                "network only (served form, no gRPC/PNG)": functools.partial(network, image)}
            if retained is not None:
                actions[RETAINED_EAGER] = functools.partial(retained, size)
            for name, channel in running.items():
                actions[name] = functools.partial(call, channel, data)
            # A 256 px image takes a tenth of a second: three times the repeats there cost
            # little and steady the medians most exposed to the machine's noise.
            # The variants run in up to four processes: a pause before each lets the
            # previous one's OpenMP workers stop spinning first.
            medians = interleaved_medians(actions, repeats * 3 if size <= 256 else repeats,
                                          settle_s=SETTLE_S)
            # Outputs of the variants that compute differently from the baseline, against it.
            reference = eager_forward(eager, image)
            outputs = {name: decode(call(channel, data)) for name, channel in running.items()}
            outputs["network only (served form, no gRPC/PNG)"] = network(image)
            for name, seconds in medians.items():
                row = {"size": size, "variant": name, "ms": seconds * 1000,
                       "speedup_vs_eager": medians["eager fp32"] / seconds}
                if RETAINED_EAGER in medians:
                    row["speedup_vs_retained_eager"] = medians[RETAINED_EAGER] / seconds
                if name in outputs:
                    row.update(fidelity(outputs[name], reference))
                rows.append(row)
    finally:
        for ctx in servers.values():
            ctx.__exit__(None, None, None)
        network.close()
        if retained is not None:
            retained.close()
    return rows


def batching(service: str, call: Any, size: int, requests: int,
             max_batch: int) -> list[dict[str, Any]]:
    """Throughput of bursts of `requests` concurrent calls to two servers at the service's
    default --max-wait-ms, one without micro-batching and one with it, in alternating
    rounds (benchmarks.common.alternated_bursts)."""
    data = png(photo(size))
    variants = (("no batching", 1), (f"max_batch={max_batch}", max_batch))
    with served(service, max_batch=1, compile="off") as plain, \
            served(service, max_batch=max_batch, compile="off") as batched:
        channels = {variants[0][0]: client.connect(plain.target),
                    variants[1][0]: client.connect(batched.target)}
        for channel in channels.values():
            call(channel, data)  # warm
        def caller(channel: Any) -> Callable[[int], object]:
            return lambda _: call(channel, data)

        bursts = alternated_bursts({name: caller(channel) for name, channel in channels.items()},
                                   requests)
    rows = [{"variant": name, "requests": requests, "size": size,
             "req_per_s": bursts[name]["per_s"], "rounds_per_s": bursts[name]["rounds"]}
            for name, _ in variants]
    rows[1]["speedup_vs_unbatched"] = bursts[variants[1][0]]["x"]
    return rows


def report(title: str, result: dict[str, Any]) -> str:
    rows = result["latency"]
    headers = ["input px", "variant", "median ms", "x vs eager fp32"]
    columns = ["size", "variant", "ms", "speedup_vs_eager"]
    if all("speedup_vs_retained_eager" in r for r in rows):  # served by processes
        headers.append("x vs eager fp32, allocator retained")
        columns.append("speedup_vs_retained_eager")
    if any("psnr_db" in r for r in rows):  # results saved before fidelity was measured lack it
        headers += ["PSNR vs eager fp32 (dB)", "max err (levels)"]
        columns += ["psnr_db", "max_error_levels"]
    lines = [f"### {title}", "", f"Machine: {result['machine']}", "",
             markdown_table(headers, [[r.get(c, "") for c in columns] for r in rows])]
    if result.get("batching"):
        batches = result["batching"]
        lines += ["", f"Micro-batching: bursts of {batches[0]['requests']} concurrent "
                  "requests (16 in flight) to servers in the benchmark's process, with and "
                  "without batching, at the default --max-wait-ms; the median of "
                  f"{len(batches[0].get('rounds_per_s', [0]))} alternating round(s), and the "
                  "median of the per-round ratios:", "",
                  markdown_table(["variant", "requests", "input px", "req/s", "x"],
                                     [(r["variant"], r["requests"], r["size"], r["req_per_s"],
                                       r.get("speedup_vs_unbatched", 1.0)) for r in batches])]
    return "\n".join(lines)


def bench(service: str, model: str, call: Any, *, sizes: list[int], repeats: int,
          compile_too: bool, batching_size: int, server_processes: bool = False
          ) -> dict[str, Any]:
    return {"machine": machine(), "model": model, "server_processes": server_processes,
            "latency": latency(service, model, sizes, repeats, call, compile_too,
                               server_processes),
            "batching": batching(service, call, batching_size, 32, 8)}
