"""The controlled comparison behind `percept train style --tile-weight`: *the-scream*
version 1 fine-tuned by the recipe of version 2 (240 steps of 2 crops at 256 px, learning
rate 5e-4, `--grid-weight 5e3`) with only the tile weight changed, then every result and
version 1 itself evaluated on the held-out photos with the tiling measure
(`percept eval style --tiling 576`). Writes ``sweep.json`` under --work-dir, and the plot
with the same numbers beside it (``--plot`` with ``.json``), to commit together.

About 8 minutes per weight on 2 otherwise idle CPU threads, plus about 3 for the
evaluation; a weight whose model is already under --work-dir is not trained again.

    .venv/bin/python scripts/tile_weight_sweep.py [--weights 0 1e6 4e6 1.6e7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The commit whose models/style-the-scream is version 1 (the last before version 2).
VERSION_1_COMMIT = "8bdb2d3"
ARTIFACT_FILES = ("config.json", "metrics.json", "weights.safetensors", "provenance.json")
RECIPE = ["--style", "the-scream", "--width", "16", "--size", "256", "--batch-size", "2",
          "--steps", "240", "--warmup", "10", "--lr", "5e-4", "--grid-weight", "5e3",
          "--grid-check-every", "80", "--grid-margin", "1.5", "--sample-every", "80",
          "--checkpoint-every", "80", "--device", "cpu", "--quiet"]


def label(weight: float) -> str:
    """1e6 for 1e+06: the weight as a folder name and tick label."""
    return f"{weight:g}".replace("e+0", "e").replace("e+", "e")


def percept(*args: str) -> None:
    command = [str(REPO / ".venv/bin/percept"), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def version_1(work: Path) -> Path:
    """models/style-the-scream as of VERSION_1_COMMIT, written under ``work``."""
    out = work / "version-1"
    out.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACT_FILES:
        data = subprocess.run(["git", "show", f"{VERSION_1_COMMIT}:models/style-the-scream/{name}"],
                              cwd=REPO, check=True, capture_output=True).stdout
        (out / name).write_bytes(data)
    return out


def plot(rows: list[dict[str, float]], version1: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = [label(r["weight"]) for r in rows]
    xs = range(len(rows))
    figure, (tiling, style) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=100)
    tiling.plot(xs, [r["mean_tiling_gap"] for r in rows], "o-", label="mean over 6 photos")
    tiling.plot(xs, [r["min_tiling_gap"] for r in rows], "s--", label="worst photo")
    tiling.axhline(version1["mean_tiling_gap"], color="C0", linewidth=0.8, linestyle=":",
                   label="version 1, mean")
    tiling.axhline(version1["min_tiling_gap"], color="C1", linewidth=0.8, linestyle=":",
                   label="version 1, worst")
    tiling.axhline(3.0, color="grey", linewidth=0.8, label="service test's bar (chelsea)")
    tiling.set_ylabel("tiled vs whole, over a 2 px shift (dB)")
    tiling.set_title("tiling in 576 px tiles at 1100x700")
    style.plot(xs, [r["mean_style_loss_ratio"] for r in rows], "o-", label="style ratio")
    style.plot(xs, [r["mean_quarter_ratio"] for r in rows], "s--", label="period-4 ratio")
    style.plot(xs, [r["mean_content_relu2_2_ratio"] for r in rows], "^:",
               label="content / painting's")
    style.axhline(version1["mean_style_loss_ratio"], color="C0", linewidth=0.8, linestyle=":",
                  label="version 1, style ratio")
    style.set_title("held-out measures (lower: more style, less grid)")
    for axis in (tiling, style):
        axis.set_xticks(list(xs), labels)
        axis.set_xlabel("--tile-weight")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("the-scream version 1 + 240 steps of the version 2 recipe, tile weight "
                    "alone varied", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 1e6, 4e6, 1.6e7])
    parser.add_argument("--work-dir", type=Path, default=REPO / "out/tile-weight-sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=REPO / "docs/images/tile_weight_sweep.png")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    base = version_1(work)
    models = {}
    for weight in sorted(args.weights):
        out = work / f"tile-{label(weight)}"
        if not (out / "weights.safetensors").exists():
            percept("train", "style", *RECIPE, "--threads", str(args.threads), "--init-from",
                    str(base), "--tile-weight", label(weight), "--out", str(out),
                    "--run-dir", str(work / f"run-{label(weight)}"))
        models[weight] = out
    percept("eval", "style", "--models", str(base), *map(str, models.values()), "--grid", "",
            "--tiling", "576", "--device", "cpu", "--out", str(work / "eval"))
    report = json.loads((work / "eval" / "metrics.json").read_text())
    summaries = {Path(entry["path"]).resolve(): entry["summary"]
                 for entry in report["models"].values()}
    keys = ("mean_style_loss_ratio", "mean_gram_ratio_mean", "mean_content_relu2_2_ratio",
            "mean_nyquist_ratio", "mean_quarter_ratio", "mean_tiling_psnr",
            "mean_tiling_shift_psnr", "mean_tiling_gap", "min_tiling_gap")
    rows = [{"weight": weight, **{k: summaries[path.resolve()][k] for k in keys}}
            for weight, path in models.items()]
    version1 = {k: summaries[base.resolve()][k] for k in keys}
    record = json.dumps({"version_1": version1, "runs": rows}, indent=2) + "\n"
    (work / "sweep.json").write_text(record)
    # the plot's numbers beside it, to commit with it (out/ is not kept)
    args.plot.with_suffix(".json").write_text(record)
    print(f"{'tile weight':>11} " + " ".join(f"{k.removeprefix('mean_'):>18}" for k in keys))
    for name, row in [("version 1", version1), *((label(r["weight"]), r) for r in rows)]:
        print(f"{name:>11} " + " ".join(f"{row[k]:>18.3f}" for k in keys))
    plot(rows, version1, args.plot)
    print(f"wrote {work / 'sweep.json'}, {args.plot} and {args.plot.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
