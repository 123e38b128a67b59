"""Preprocessing throughput: the fast pipeline against the naive loop, in the same run.

Task (DESIGN.md, "Fast data preparation"): resize the shortest side to 224 and centre-crop,
3-channel RGB, on JPEGs of about 2 MP (1700x1150, quality 90), generated once from the
training photos into ``.cache/bench-preprocess``.

- naive: one process; full JPEG decode, ``convert("RGB")``, LANCZOS resize of the whole
  image, then crop. Timed twice:
  - on **stock Pillow** (the version ``requirements.txt`` pins, installed on first use under
    ``.cache/stock-pillow`` and run in a subprocess): the loop a user writes without any of
    the fast pipeline's parts, pillow-simd being one of them. This is the headline ratio.
  - on the **same pillow-simd build** as the fast pipeline, so that the ratio of the
    pipeline alone (draft decoding, reduce, the pool) is shown too.
- fast: ``training.data.images.load_centre_crop`` (JPEG ``draft()`` reduced-DCT decoding,
  ``reduce()`` + BICUBIC on the crop box in one pass) on pillow-simd, over a
  ``multiprocessing`` pool on every core; also timed in one process, to separate the
  per-image gain from the cores.

Each pipeline runs ``repeats`` times, interleaved, and the best time counts (other processes
share this machine).

``python -m benchmarks.bench_preprocess [--quick]`` prints a table and saves
``benchmarks/results/preprocess.json`` (``--quick``: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from training.assets import REPO_ROOT
from training.data.images import IMAGE_SUFFIXES, load_centre_crop

SIZE = 224
JPEG_SIZE = (1700, 1150)
CACHE = REPO_ROOT / ".cache" / "bench-preprocess"
STOCK_PILLOW = REPO_ROOT / ".cache" / "stock-pillow"


def _photo_sources() -> list[Path]:
    folders = [REPO_ROOT / "data" / "photos" / "train", REPO_ROOT / "data" / "photos" / "heldout"]
    found = [p for folder in folders if folder.is_dir() for p in sorted(folder.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    big = []
    for path in found:
        with Image.open(path) as image:
            if image.size[0] >= JPEG_SIZE[0] and image.size[1] >= JPEG_SIZE[1]:
                big.append(path)
    if big:
        return big
    # No `percept data photos` yet: fall back to scikit-image's (small) photos, upscaled.
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent / "data"
    return [root / name for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]


def make_jpegs(count: int, folder: Path = CACHE, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of 1700x1150 (q90): random crops at random scales of the photos."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"bench_{i:04d}.jpg" for i in range(count)]
    if all(p.is_file() for p in paths):
        return paths
    sources = _photo_sources()
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    for i, path in enumerate(paths):
        if path.is_file():
            continue
        with Image.open(sources[i % len(sources)]) as opened:
            image = opened.convert("RGB")
        scale = max(width / image.size[0], height / image.size[1])
        if scale > 1:  # small fallback photos only
            image = image.resize((int(image.size[0] * scale) + 1,
                                  int(image.size[1] * scale) + 1), Image.Resampling.BICUBIC)
        zoom = rng.uniform(1.0, min(image.size[0] / width, image.size[1] / height))
        box_w, box_h = width * zoom, height * zoom
        left = rng.uniform(0, image.size[0] - box_w)
        top = rng.uniform(0, image.size[1] - box_h)
        crop = image.resize(JPEG_SIZE, Image.Resampling.BICUBIC,
                            box=(left, top, left + box_w, top + box_h))
        crop.save(path, quality=90)
    return paths


def naive_centre_crop(path: Path, size: int = SIZE) -> np.ndarray:
    """The baseline: full decode, LANCZOS resize of the whole image, then crop."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.Resampling.LANCZOS)
    left = (resized.size[0] - size) // 2
    top = (resized.size[1] - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def _fast(path: Path) -> np.ndarray:
    return load_centre_crop(path, SIZE)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, all threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time(run: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds, output) of one run."""
    cpu = _cpu_seconds()
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, _cpu_seconds() - cpu, out


def _serial(function: Callable[[Path], np.ndarray], paths: list[Path]) -> np.ndarray:
    return np.stack([function(p) for p in paths])


def _pooled(paths: list[Path], workers: int) -> np.ndarray:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = context.Pool(workers)
    try:
        result = np.stack(pool.map(_fast, paths, chunksize=8))
    finally:
        pool.close()
        pool.join()  # joined workers count in RUSAGE_CHILDREN
    return result


def stock_pillow_version() -> str:
    """The stock Pillow version requirements.txt pins (pillow-simd replaces it in .venv)."""
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == "pillow" and version:
            return version.strip()
    raise RuntimeError("requirements.txt pins no pillow version")


def install_stock_pillow(folder: Path = STOCK_PILLOW) -> Path:
    """Stock Pillow (the pinned version) in ``folder``, installed with pip on first use."""
    version = stock_pillow_version()
    if not (folder / f"pillow-{version}.dist-info").is_dir():
        print(f"[bench] installing stock Pillow {version} into {folder} (naive baseline)",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--upgrade", "--target", str(folder), f"pillow=={version}"],
                       check=True)
    return folder


def _naive_in_stock_pillow(paths: list[Path], stock: Path) -> tuple[float, float, np.ndarray,
                                                                    str]:
    """The naive loop in a subprocess that imports stock Pillow from ``stock``: (wall
    seconds, CPU seconds, output, Pillow version), timed inside the subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        listing, out = Path(tmp) / "paths.txt", Path(tmp) / "out.npy"
        listing.write_text("\n".join(str(p) for p in paths))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(stock), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_preprocess",
                               "--naive-worker", str(listing), str(out)],
                              env=env, cwd=REPO_ROOT, check=True, capture_output=True,
                              text=True)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return report["seconds"], report["cpu_seconds"], np.load(out), report["pil"]


def _naive_worker(listing: Path, out: Path) -> None:
    """Body of the stock-Pillow subprocess: times the naive loop, saves its output."""
    paths = [Path(line) for line in listing.read_text().splitlines()]
    seconds, cpu, output = _time(lambda: _serial(naive_centre_crop, paths))
    np.save(out, output)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "pil": PIL.__version__}))


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Measures both pipelines (best of ``repeats``) and returns the numbers."""
    count = 40 if quick else 200
    repeats = repeats or (1 if quick else 2)
    workers = os.cpu_count() or 1
    paths = make_jpegs(count)
    for path in paths:  # warm the page cache so that neither pipeline pays for disk reads
        path.read_bytes()
    try:
        stock: Path | None = install_stock_pillow()
        stock_error = ""
    except (subprocess.CalledProcessError, OSError) as error:
        stock, stock_error = None, f"stock Pillow could not be installed: {error}"
        print(f"[bench] {stock_error}; the stock-Pillow baseline is skipped", flush=True)
    timings: dict[str, list[float]] = {"naive_stock_pillow": [], "naive": [],
                                       "fast_1_process": [], "fast_pool": []}
    if stock is None:
        del timings["naive_stock_pillow"]
    cpu_times: dict[str, list[float]] = {name: [] for name in timings}
    outputs: dict[str, np.ndarray] = {}
    stock_version = ""
    for _ in range(repeats):
        if stock is not None:
            seconds, cpu, outputs["naive_stock_pillow"], stock_version = \
                _naive_in_stock_pillow(paths, stock)
            timings["naive_stock_pillow"].append(seconds)
            cpu_times["naive_stock_pillow"].append(cpu)
        for name, job in (("naive", lambda: _serial(naive_centre_crop, paths)),
                          ("fast_1_process", lambda: _serial(_fast, paths)),
                          ("fast_pool", lambda: _pooled(paths, workers))):
            seconds, cpu, outputs[name] = _time(job)
            timings[name].append(seconds)
            cpu_times[name].append(cpu)

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        diff = a.astype(np.float64) - b.astype(np.float64)
        return round(10 * np.log10(255.0**2 / max(float(np.mean(diff**2)), 1e-12)), 2)
    result: dict[str, Any] = {
        "benchmark": "preprocess",
        "task": f"resize shortest side to {SIZE} + centre crop, RGB uint8",
        "images": count, "image_size": list(JPEG_SIZE), "jpeg_quality": 90,
        "megapixels": round(JPEG_SIZE[0] * JPEG_SIZE[1] / 1e6, 2),
        "workers": workers, "repeats": repeats,
        "pipelines": {},
        "fast_vs_naive_psnr_db": psnr(outputs["naive"], outputs["fast_pool"]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "pil": PIL.__version__,
                    "stock_pil": stock_version or stock_error,
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_preprocess" + (" --quick" if quick else "")
                   + (f" --repeats {repeats}" if repeats != (1 if quick else 2) else ""),
        "target_ratio": 8.0,
    }
    for name, values in timings.items():
        best = min(values)
        cpu = min(cpu_times[name])
        result["pipelines"][name] = {"seconds": round(best, 3),
                                     "img_per_s": round(count / best, 1),
                                     "cpu_seconds": round(cpu, 3),
                                     "img_per_cpu_s": round(count / cpu, 1),
                                     "all_seconds": [round(v, 3) for v in values]}
    pipelines = result["pipelines"]
    # Headline: against the naive loop on stock Pillow (or on pillow-simd, if stock Pillow
    # could not be installed). Same-library ratios are kept next to it.
    baseline = "naive_stock_pillow" if stock is not None else "naive"
    result["baseline"] = baseline
    if stock is not None:
        result["stock_vs_simd_naive_psnr_db"] = psnr(outputs["naive_stock_pillow"],
                                                     outputs["naive"])
    for suffix, base in (("", baseline), ("_same_library", "naive")):
        rate = pipelines[base]["img_per_s"]
        result["ratio" + suffix] = round(pipelines["fast_pool"]["img_per_s"] / rate, 2)
        result["ratio_1_process" + suffix] = round(
            pipelines["fast_1_process"]["img_per_s"] / rate, 2)
        # What the cores would give if no other process competed for them: per-CPU-second
        # throughput times the worker count, against the baseline's per-CPU-second rate.
        result["ratio_projected_idle_cores" + suffix] = round(
            pipelines["fast_pool"]["img_per_cpu_s"] * workers /
            pipelines[base]["img_per_cpu_s"], 2)
    return result


def table(result: dict[str, Any]) -> str:
    p = result["pipelines"]
    machine = result["machine"]
    stock = "naive_stock_pillow" in p
    simd = p["naive"]["img_per_s"]
    base = p[result.get("baseline", "naive")]["img_per_s"]

    def row(label: str, name: str) -> str:
        rate = p[name]["img_per_s"]
        return f"| {label} | {rate:.1f} | {rate / base:.2f} | {rate / simd:.2f} |"

    rows = [
        f"{result['images']} JPEGs of {result['image_size'][0]}x{result['image_size'][1]} "
        f"(q90) -> {SIZE}x{SIZE}; {result['workers']} cores; pillow-simd {machine['pil']}"
        + (f", stock Pillow {machine['stock_pil']}" if stock else ""),
        "",
        "| pipeline | img/s | x naive (stock Pillow) | x naive (pillow-simd) |"
        if stock else "| pipeline | img/s | x naive | x naive |",
        "|---|---:|---:|---:|",
    ]
    if stock:
        rows.append(row("naive: full decode + LANCZOS, 1 process, stock Pillow",
                        "naive_stock_pillow"))
    rows += [
        row("naive: full decode + LANCZOS, 1 process, pillow-simd", "naive"),
        row("fast: draft + reduce/BICUBIC, 1 process", "fast_1_process"),
        row(f"fast: draft + reduce/BICUBIC, pool of {result['workers']}", "fast_pool"),
        "",
        f"target: {result['target_ratio']:.0f}x against the naive loop"
        + (" on stock Pillow" if stock else f" ({machine.get('stock_pil', '')})"),
        f"per CPU-second: naive {p[result.get('baseline', 'naive')]['img_per_cpu_s']:.1f}, "
        f"fast {p['fast_pool']['img_per_cpu_s']:.1f} img/s -> "
        f"x{result['ratio_projected_idle_cores']} with {result['workers']} idle cores",
        f"fast vs naive output agreement: {result['fast_vs_naive_psnr_db']} dB PSNR"
        + (f" (stock vs pillow-simd naive: {result['stock_vs_simd_naive_psnr_db']} dB)"
           if stock else "")
        + f"; load average at the end: {machine['load_average_at_end']}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 images, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/preprocess.json (--quick: "
                        "benchmarks/results/quick/preprocess.json)")
    parser.add_argument("--naive-worker", nargs=2, metavar=("LIST", "OUT"),
                        help=argparse.SUPPRESS)  # the stock-Pillow subprocess
    args = parser.parse_args(argv)
    if args.naive_worker:
        _naive_worker(Path(args.naive_worker[0]), Path(args.naive_worker[1]))
        return 0
    result = run(quick=args.quick, repeats=args.repeats)
    print(table(result))
    # here, not at the top: the stock-Pillow worker above imports this module too
    from benchmarks.common import ResultFile, script_command

    target = ResultFile("preprocess", quick=args.quick, out=args.out, command=script_command(
        "benchmarks.bench_preprocess", sys.argv[1:] if argv is None else argv))
    target.save(result)
    print(f"saved {target.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
