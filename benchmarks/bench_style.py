"""`StyleTransfer.Stylize` on the CPU: served path vs plain fp32 eager of the same network,
batching on/off; and the optimisation-based `StylizeWithImage` at 256 px, against the
fast network's served `Stylize` at that size in the same run (what Johnson et al.'s
feed-forward network saves over Gatys et al.'s optimisation).

python -m benchmarks.bench_style [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import machine, run_as_script, served
from benchmarks.image_models import bench, one_per_architecture, photo, png, report
from percept.v1 import style_pb2
from services import client
from services.common.artifacts import read_config
from training.assets import REPO_ROOT, style_image_path


def gatys(iterations: int, size: int) -> dict[str, Any]:
    """Wall time of one StylizeWithImage run (L-BFGS) through the served path, and the
    time of an iteration: the difference from a run of a sixth as many iterations, over
    the iterations it adds, so that what every request does once (decoding, the style
    image's Gram matrices, encoding the result) is not spread over the iterations. An
    untimed run of the short length comes first, so that neither timed run pays what only
    a first call costs (kernels set up for the request's shapes, the allocator's first
    requests)."""
    short = max(2, iterations // 6)
    with served("style") as server:
        channel = client.connect(server.target)

        def timed(count: int) -> float:
            request = style_pb2.StylizeWithImageRequest(
                content_image=png(photo(size)),
                style_image=style_image_path("starry-night").read_bytes(),
                iterations=count, max_size=size)
            started = time.perf_counter()
            client.stylize_with_image(channel, request)
            return time.perf_counter() - started

        timed(short)  # warm-up, not counted
        short_seconds = timed(short)
        seconds = timed(iterations)
    per_iteration = (seconds - short_seconds) / (iterations - short)
    return {"size": size, "iterations": iterations, "seconds": seconds,
            "short_iterations": short, "short_seconds": short_seconds,
            "warmup_iterations": short,
            "ms_per_iteration": per_iteration * 1000,
            "setup_seconds": max(0.0, seconds - per_iteration * iterations)}


def run(quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine()}
    models = REPO_ROOT / "models"
    # One model per distinct architecture (the styles share the network shape, but
    # nearest and bilinear upsampling fold into different serving forms).
    chosen = one_per_architecture("style")
    result["fast"] = [] if chosen else {"skipped": "no models/style-* installed"}
    for model in chosen:
        name = str(read_config(models / model).get("style", {}).get(
            "name", model.removeprefix("style-")))

        def call(channel: Any, data: bytes, name: str = name) -> bytes:
            return client.stylize(channel, style_pb2.StylizeRequest(image=data, style=name),
                                  timeout=3600).image

        # The served rows come from `percept serve style` processes, as deployed.
        entry = bench("style", model, call, sizes=[256, 512] if quick else [256, 512, 1024],
                      repeats=3 if quick else 5, compile_too=not quick, batching_size=128,
                      server_processes=True)
        entry["architecture"] = read_config(models / model)["architecture"]
        result["fast"].append(entry)
    result["gatys"] = gatys(20 if quick else 60, 256)
    return result


def markdown(result: dict[str, Any]) -> str:
    fast = result["fast"]
    if isinstance(fast, dict):  # skipped (or a result saved before one entry per net)
        text = (f"### Fast style transfer\n\nskipped: {fast['skipped']}" if "skipped" in fast
                else report(f"Fast style transfer (Stylize, {fast['model']})", fast))
    else:
        text = "\n\n".join(report(f"Fast style transfer (Stylize, {entry['model']}, "
                                   f"{entry['architecture']})", entry) for entry in fast)
    g = result["gatys"]
    line = (f"\n\nStylizeWithImage (Gatys, L-BFGS, VGG19): {g['size']} px, "
            f"{g['iterations']} iterations in {g['seconds']:.1f} s "
            f"({g['ms_per_iteration']:.0f} ms/iteration")
    if "setup_seconds" in g:  # results from before the short run was timed have none
        line += (f", from the {g['short_iterations']}-iteration run's {g['short_seconds']:.1f}"
                 f" s; {g['setup_seconds']:.1f} s of each request is not iterations")
    line += ")"
    fast_ms = _served_ms(fast, g["size"])
    if fast_ms is not None:
        line += (f"; the fast network's served Stylize at {g['size']} px in the same run: "
                 f"{fast_ms:.1f} ms, {g['seconds'] * 1000 / fast_ms:,.0f}x faster than "
                 "these iterations")
    return text + line


def _served_ms(fast: Any, size: int) -> float | None:
    """The first fast model's default served Stylize time at ``size`` px, if measured."""
    if not isinstance(fast, list) or not fast:
        return None
    return next((float(row["ms"]) for row in fast[0].get("latency", [])
                 if row["size"] == size and row["variant"] == "served"), None)


if __name__ == "__main__":
    raise SystemExit(run_as_script("style", __doc__, run, markdown))
