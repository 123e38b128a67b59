"""A picture of the dashboard (deploy/dashboard.py) over a real run: every panel's queries,
asked of a real Prometheus that scraped a real percept server under a scripted load, and
drawn with matplotlib (the same queries Grafana runs; not a Grafana screenshot).

    python -m deploy.dashboard_preview [--seconds 150] [--out docs/images/dashboard.png]

It starts `percept serve all` in this process on loopback (queues of 4 requests, so that
the burst below is answered busy), a Prometheus (Debian's `prometheus` package, which
`make setup` installs) that scrapes its /metrics every 2 s, and this load:
- all along: upscales, stylisations, labels and text searches, one call in ten bad input
  (an undecodable image, an unknown style);
- from 35 % to 55 % of the run: a burst of 192 px upscales from 8 clients at once, past
  the queue (RESOURCE_EXHAUSTED, each client sending again after 0.1 s);
- from 65 % to 80 %: upscales whose 50 ms deadline is too short (DEADLINE_EXCEEDED);
- images added to the search index at the start and half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import math
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deploy.dashboard import ROWS, Panel
from deploy.local_prometheus import prometheus as local_prometheus
from deploy.render import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "dashboard.png"
NAMESPACE = "preview"
POD = "percept-all-0"
SCRAPE_SECONDS = 2
#: Grafana's $__rate_interval for that scrape interval: four scrapes, and a margin
RATE_INTERVAL = f"{4 * SCRAPE_SECONDS + 2}s"
#: the run's phases, as fractions of its length
BURST = (0.35, 0.55)
SHORT_DEADLINES = (0.65, 0.80)

log = logging.getLogger("percept.dashboard_preview")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _png(size: int, seed: int) -> bytes:
    """A photo-like test image: scikit-image's 'astronaut', cropped and resized."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = data.astronaut()
    y, x = rng.integers(0, photo.shape[0] - 256, 2)
    crop = Image.fromarray(photo[y:y + 256, x:x + 256]).resize((size, size))
    out = io.BytesIO()
    crop.save(out, "PNG")
    return out.getvalue()


# -- the server and Prometheus --------------------------------------------------------------


@contextmanager
def _server(data_dir: Path, metrics_port: int) -> Iterator[str]:
    from services.common.config import ServerConfig
    from services.common.server import start_in_thread

    config = ServerConfig(service="all", host="127.0.0.1", port=0, metrics_port=metrics_port,
                          device="cpu", models_dir=REPO_ROOT / "models", data_dir=data_dir,
                          log_format="text", log_level="warning", max_queue=4,
                          drain_seconds=5.0)
    running = start_in_thread(config, timeout=900)
    try:
        yield running.target
    finally:
        running.stop()


# -- the load -------------------------------------------------------------------------------


class Load:
    """The scripted calls, on threads, until :meth:`stop`; ``phase()`` is the fraction of
    the run gone by."""

    def __init__(self, target: str, seconds: float) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.started = time.monotonic()
        self.seconds = seconds
        self.done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.small = [_png(48, seed) for seed in range(8)]
        self.large = [_png(192, seed) for seed in range(4)]

    def phase(self) -> float:
        return (time.monotonic() - self.started) / self.seconds

    def _loop(self, call: Callable[[int], Any], pause: float,
              during: tuple[float, float] = (0.0, 1.0)) -> None:
        for n in itertools.count():
            if self.done.is_set():
                return
            if during[0] <= self.phase() < during[1]:
                with contextlib.suppress(self.grpc.RpcError):  # what the picture counts
                    call(n)
            self.done.wait(pause)

    def start(self) -> None:
        from percept.v1 import (
            embed_pb2,
            embed_pb2_grpc,
            search_pb2,
            search_pb2_grpc,
            style_pb2,
            style_pb2_grpc,
            superres_pb2,
            superres_pb2_grpc,
        )

        upscale = superres_pb2_grpc.SuperResolutionStub(self.channel).Upscale
        style = style_pb2_grpc.StyleTransferStub(self.channel)
        label = embed_pb2_grpc.EmbeddingStub(self.channel).LabelImage
        search = search_pb2_grpc.ImageSearchStub(self.channel)
        styles = [s.name for s in style.ListStyles(style_pb2.ListStylesRequest(),
                                                   timeout=60).styles]
        words = ["cat", "astronaut", "flag", "rocket", "face", "dog"]

        def add_images(first: int) -> None:
            requests = (search_pb2.AddImageRequest(id=f"preview-{first + i}", image=data)
                        for i, data in enumerate(self.small))
            for _ in search.AddImages(requests, timeout=300):
                pass

        def steady_upscale(n: int) -> None:
            data = b"not an image" if n % 10 == 9 else self.small[n % len(self.small)]
            upscale(superres_pb2.UpscaleRequest(image=data), timeout=60)

        def stylize(n: int) -> None:
            name = "no-such-style" if n % 10 == 9 else styles[n % len(styles)]
            style.Stylize(style_pb2.StylizeRequest(image=self.small[n % 8], style=name),
                          timeout=60)

        def label_image(n: int) -> None:
            label(embed_pb2.LabelImageRequest(image=self.small[n % 8], k=5), timeout=60)

        def search_text(n: int) -> None:
            search.SearchByText(search_pb2.SearchByTextRequest(text=words[n % len(words)],
                                                               k=5), timeout=60)

        def burst(n: int) -> None:
            upscale(superres_pb2.UpscaleRequest(image=self.large[n % 4]), timeout=60)

        def short_deadline(n: int) -> None:
            upscale(superres_pb2.UpscaleRequest(image=self.large[n % 4]), timeout=0.05)

        add_images(0)
        loops: list[tuple[Callable[[int], Any], float, tuple[float, float]]] = [
            (steady_upscale, 0.1, (0, 1)), (stylize, 0.3, (0, 1)),
            (label_image, 0.3, (0, 1)), (search_text, 0.5, (0, 1)),
            *[(burst, 0.1, BURST)] * 8, *[(short_deadline, 0.1, SHORT_DEADLINES)] * 3,
        ]
        for call, pause, during in loops:
            thread = threading.Thread(target=self._loop, args=(call, pause, during),
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        half = threading.Thread(target=self._at_half, args=(add_images,), daemon=True)
        half.start()
        self.threads.append(half)

    def _at_half(self, add_images: Callable[[int], None]) -> None:
        while self.phase() < 0.5:
            if self.done.wait(0.5):
                return
        try:
            add_images(len(self.small))
        except self.grpc.RpcError as error:
            log.warning("adding images half-way: %s", error.code().name)

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(90)
        self.channel.close()


# -- the drawing ----------------------------------------------------------------------------


def _get(prometheus: str, path: str, **params: Any) -> Any:
    import json

    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = json.load(answer)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def _concrete(expr: str, namespace: str) -> str:
    return expr.replace("$namespace", namespace).replace("$__rate_interval", RATE_INTERVAL)


def _legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace(POD, "pod") or "value"


_UNIT_LABELS = {"reqps": "calls/s", "s": "seconds", "short": "", "none": ""}


def _draw_series(ax: Any, prometheus: str, panel: Panel, start: float, end: float,
                 namespace: str) -> None:
    plotted = 0
    for query in panel.queries:
        data = _get(prometheus, "query_range", query=_concrete(query.expr, namespace),
                    start=start,
                    end=end, step=SCRAPE_SECONDS)
        for series in data["result"]:
            times = [float(t) - start for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            values = [v if math.isfinite(v) else math.nan for v in values]
            ax.plot(times, values, linewidth=1.4,
                    label=_legend(query.legend, series["metric"]))
            plotted += 1
    for phase, colour in ((BURST, "#f4a261"), (SHORT_DEADLINES, "#8ab6d6")):
        ax.axvspan(phase[0] * (end - start), phase[1] * (end - start), color=colour,
                   alpha=0.12, linewidth=0)
    ax.set_xlim(0, end - start)
    ax.set_ylabel(_UNIT_LABELS.get(panel.unit, panel.unit), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    low, high = ax.get_ylim()
    lowest = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    if plotted and low < 0 and not any((values < 0).any() for values in lowest):
        ax.set_ylim(0, max(high, 1))
    if plotted:
        ax.legend(fontsize=6.5, loc="upper left", ncol=2 if plotted > 4 else 1,
                  framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="grey")


def _draw_table(ax: Any, prometheus: str, panel: Panel, end: float, namespace: str) -> None:
    (query,) = panel.queries
    rows = [series["metric"] for series in
            _get(prometheus, "query", query=_concrete(query.expr, namespace),
                 time=end)["result"]]
    ax.axis("off")
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    columns = [c for c in rows[0] if c != "__name__"]
    cells = [[row.get(c, "").replace(POD, "pod").removeprefix("percept.v1.")
              for c in columns]
             for row in sorted(rows, key=lambda r: tuple(r.get(c, "") for c in columns))]
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(columns))))
    table.scale(1, 1.15)


def draw(prometheus: str, start: float, end: float, out: Path,
         namespace: str = NAMESPACE) -> None:
    """Every panel of the dashboard over [start, end] (Unix times), for the pods of
    ``namespace``, into one PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_rows = sum(-(-len(row.panels) // 2) for row in ROWS)
    fig = plt.figure(figsize=(13, 2.7 * grid_rows + 0.6 * len(ROWS)))
    spec = fig.add_gridspec(grid_rows, 2, hspace=0.55, wspace=0.18, top=0.965, bottom=0.02,
                            left=0.05, right=0.98)
    at = 0
    for row in ROWS:
        for i, panel in enumerate(row.panels):
            ax = fig.add_subplot(spec[at + i // 2, i % 2])
            title = f"{row.title}: {panel.title}" if i == 0 else panel.title
            ax.set_title(title, fontsize=9.5, loc="left",
                         fontweight="bold" if i == 0 else "normal")
            if panel.kind == "table":
                _draw_table(ax, prometheus, panel, end, namespace)
            else:
                _draw_series(ax, prometheus, panel, start, end, namespace)
                ax.set_xlabel("seconds into the run (shaded: busy burst, short deadlines)",
                              fontsize=7)
        at += -(-len(row.panels) // 2)
    fig.suptitle("percept dashboard: its queries over a real run (percept serve all, 2-core "
                 "CPU), drawn with matplotlib", fontsize=11, y=0.995)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # a palette PNG: a few hundred KB instead of MB, the lines unchanged to the eye
    image = Image.open(buffer).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)


# -- the command ----------------------------------------------------------------------------


def preview(seconds: float, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="percept-dashboard-") as tmp:
        workdir = Path(tmp)
        (workdir / "search").mkdir()
        metrics_port = _free_port()
        print("starting percept serve all and Prometheus ...", file=sys.stderr)
        with _server(workdir / "search", metrics_port) as target, \
                local_prometheus(workdir, _free_port(), metrics_port,
                                 labels={"namespace": NAMESPACE, "pod": POD},
                                 scrape_seconds=SCRAPE_SECONDS) as running:
            prometheus = running.url
            load = Load(target, seconds)
            start = time.time()
            load.start()
            from tqdm import tqdm

            with tqdm(total=round(seconds), unit="s", desc="load") as bar:
                while load.phase() < 1:
                    time.sleep(1)
                    bar.update(min(1, round(seconds) - bar.n))
            load.stop()
            time.sleep(2 * SCRAPE_SECONDS)  # the last scrape of the run
            end = time.time()
            draw(prometheus, start, end, out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.dashboard_preview",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0,
                        help="how long the load runs (default 150)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the PNG to write (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if args.seconds < 10:
        parser.error("--seconds must be at least 10 (a rate needs a few scrapes)")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must be a .png file, not {args.out}")
    try:
        preview(args.seconds, args.out)
    except RuntimeError as error:  # no prometheus, or it would not start
        print(f"dashboard preview: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
