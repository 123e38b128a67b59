"""The GPU style benchmark as a picture: the network's variants against fp32 eager, and the
service's TiledImageModel in each serving configuration.

    python -m benchmarks.plot_gpu [--results benchmarks/results/style_gpu.json]
                                  [--out docs/images/style_gpu.png]

Reads what ``benchmarks/bench_style_gpu.py`` saved; measures nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.bench_style_gpu import SERVED_COMPILED, companions
from benchmarks.common import RESULTS
from training.assets import REPO_ROOT
from training.plots import save_figure

#: The variant every other is compared with, in its own run.
BASELINE = "fp32 eager (plain PyTorch defaults)"
#: The y axis: that baseline in benchmarks/README.md's words. PyTorch's defaults let cuDNN
#: run the fp32 convolutions in TF32, so it is not IEEE fp32 ("fp32 eager, TF32 off" is).
BASELINE_LABEL = ("fp32 eager with PyTorch's defaults (TF32 convolutions)\n"
                  "of the same run, median CUDA-event times")
#: (label on the chart, variant in the results) for the network panel, in bar order.
NETWORK_VARIANTS = [
    ("fp32 eager, TF32 off", "fp32 eager, TF32 off (cudnn.benchmark off)"),
    ("fp16 eager", "fp16 channels_last eager, folded (served eager form)"),
    ("fp16 + CUDA graph (served default)", "fp16 channels_last eager + CUDA graph, folded"),
    ("fp16 + compile + CUDA graph, output layer eager",
     "fp16 channels_last + torch.compile + CUDA graph, folded, output layer eager"),
    ("fp16 + compile + CUDA graph, served compiled form",
     "fp16 channels_last + torch.compile + CUDA graph, " + SERVED_COMPILED),
]
#: The style issue's target at 1024 px, against fp32 eager.
TARGET_SPEEDUP = 8.0


def network_bars(result: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    """(group labels "net, px", {variant label: speed-up per group}): each variant's time
    against fp32 eager's in the same run, never another's (machines drift between runs).
    The run's own rows first, then those of its companions (later runs of other variants,
    saved apart, each with its own baseline) for variants the run lacks. Variants measured
    nowhere get no bar."""
    speedups: dict[tuple[str, int, str], float] = {}
    for _, companion in reversed(companions(result)):
        speedups.update(_speedups(companion))
    speedups.update(_speedups(result))
    groups = sorted({(net, size) for net, size, _ in speedups},
                    key=lambda group: (group[0], -group[1]))
    labels = [f"{net.split(' (')[0]}\n{size} px" for net, size in groups]
    bars = {label: [speedups.get((net, size, variant), float("nan")) for net, size in groups]
            for label, variant in NETWORK_VARIANTS}
    return labels, {label: values for label, values in bars.items()
                    if any(value == value for value in values)}  # NaN != NaN


def _speedups(result: dict[str, Any]) -> dict[tuple[str, int, str], float]:
    """fp32 eager's time over each variant's, per (net, size, variant), within one run."""
    times = {(r["net"], r["size"], r["variant"]): r["ms"] for r in result["rows"] if "ms" in r}
    return {(net, size, variant): times[(net, size, BASELINE)] / ms
            for (net, size, variant), ms in times.items()
            if variant != BASELINE and (net, size, BASELINE) in times}


def served_bars(result: dict[str, Any]) -> tuple[list[str], dict[str, list[float]],
                                                   dict[str, float]]:
    """(sizes, {config: ms per size}, {config: first request at the largest size, s})."""
    rows = result.get("served_form")
    if not isinstance(rows, list) or not rows:
        return [], {}, {}
    sizes = sorted(dict.fromkeys(r["size"] for r in rows), key=pixels_of)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    ms = {(r["config"], r["size"]): r["ms"] for r in rows}
    largest = sizes[-1]
    first = {r["config"]: r["first_request_s"] for r in rows if r["size"] == largest}
    return sizes, {c: [ms.get((c, s), float("nan")) for s in sizes] for c in configs}, first


def pixels_of(size: str) -> int:
    height, width = (int(v) for v in size.split("x"))
    return height * width


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels, bars = network_bars(result)
    sizes, served, first = served_bars(result)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12.8, 5.2), dpi=100,
                                         gridspec_kw={"width_ratios": [3, 2]})
    try:
        width = 0.8 / len(bars)
        for index, (label, values) in enumerate(bars.items()):
            xs = [i + (index - (len(bars) - 1) / 2) * width for i in range(len(labels))]
            left.bar(xs, values, width, label=label)
        left.axhline(1.0, color="black", linewidth=0.8)
        left.axhline(TARGET_SPEEDUP, color="grey", linewidth=0.8, linestyle="--")
        left.text(len(labels) - 0.5, TARGET_SPEEDUP, f" {TARGET_SPEEDUP:g}x target (1024 px)",
                  fontsize=7, va="bottom", ha="right", color="grey")
        left.set_xticks(range(len(labels)), labels, fontsize=8)
        left.set_ylabel(f"x {BASELINE_LABEL}", fontsize=8)
        left.set_title("style network alone, batch 1: speed-up over fp32 eager", fontsize=10)
        left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3)
        if served:
            width = 0.8 / len(served)
            for index, (config, values) in enumerate(served.items()):
                xs = [i + (index - (len(served) - 1) / 2) * width for i in range(len(sizes))]
                right.bar(xs, values, width,
                          label=f"{config} (first at a new size: {first.get(config, 0):.1f} s)")
            right.set_xticks(range(len(sizes)), [f"{s} px" for s in sizes], fontsize=8)
            right.set_ylabel("ms per request (median)")
            right.set_title("served form (TiledImageModel) per configuration",
                            fontsize=10)
            right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                         ncols=1)
        gpu = result.get("gpu", {}).get("name", result.get("device", "?"))
        figure.suptitle(f"{gpu}, torch {result.get('torch', '?')}, "
                        f"{result.get('date', '?')}", fontsize=10)
    except BaseException:
        plt.close(figure)
        raise
    return save_figure(figure, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS / "style_gpu.json")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "docs" / "images" / "style_gpu.png")
    args = parser.parse_args()
    if not args.results.is_file():
        parser.error(f"{args.results} not found: run `python -m benchmarks.bench_style_gpu` "
                     "on a CUDA machine first")
    print(plot(json.loads(args.results.read_text()), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
