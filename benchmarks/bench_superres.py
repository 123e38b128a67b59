"""`SuperResolution.Upscale` on the CPU: served path vs plain fp32 eager, batching on/off,
and the server's peak memory for a 2048x2048 input.

python -m benchmarks.bench_superres [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import peak_rss_mb, run_as_script, server_process
from benchmarks.image_models import bench, photo, png, report
from services import client
from services.common.artifacts import list_artifacts
from training.assets import REPO_ROOT

MODEL = "superres-perceptual"


def call(channel: Any, data: bytes) -> bytes:
    return client.upscale(channel, data, model=MODEL, timeout=3600).image


def memory_2048() -> dict[str, Any]:
    """Upscales a 2048x2048 photo through a `percept serve superres` subprocess and reads
    the server's peak resident memory (VmHWM)."""
    with server_process("superres") as (server, channel):
        baseline = peak_rss_mb(server.pid)
        data = png(photo(2048))
        started = time.perf_counter()
        response = client.upscale(channel, data, model=MODEL, timeout=3600)
        seconds = time.perf_counter() - started
        return {"input": "2048x2048", "output": f"{response.width}x{response.height}",
                "seconds": seconds, "peak_rss_mb": peak_rss_mb(server.pid),
                "rss_after_start_mb": baseline, "target_mb": 3000}


def run(quick: bool = False) -> dict[str, Any]:
    if MODEL not in list_artifacts(REPO_ROOT / "models", "superres"):
        return {"skipped": f"models/{MODEL} is not installed"}
    # The served rows come from `percept serve superres` processes, as deployed.
    result = bench("superres", MODEL, call, sizes=[128, 256] if quick else [128, 256, 512],
                   repeats=3 if quick else 5, compile_too=not quick, batching_size=64,
                   server_processes=True)
    if not quick:
        result["memory"] = memory_2048()
    return result


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"### Super-resolution\n\nskipped: {result['skipped']}"
    text = report("Super-resolution (Upscale, 4x)", result)
    if "memory" in result:
        m = result["memory"]
        text += (f"\n\n2048x2048 -> {m['output']}: {m['seconds']:.0f} s, server peak RSS "
                 f"{m['peak_rss_mb']:.0f} MB (target < {m['target_mb']} MB; "
                 f"{m['rss_after_start_mb']:.0f} MB after start-up)")
    return text


if __name__ == "__main__":
    raise SystemExit(run_as_script("superres", __doc__, run, markdown))
