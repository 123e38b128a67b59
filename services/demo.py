"""The `make run` demo: exercises every service through the real gRPC client and writes
its pictures to ``out/``. A step whose model is not installed yet is reported, not faked."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from percept.v1 import search_pb2, style_pb2
from services import client
from services.common.tls import ClientTls
from services.contact_sheet import contact_sheet

# scikit-image's bundled photos: small, real, and installed with the package.
SAMPLES = {"cat": "chelsea", "coffee": "coffee", "astronaut": "astronaut", "rocket": "rocket"}


@dataclass
class DemoReport:
    lines: list[str] = field(default_factory=list)
    pictures: list[tuple[str, Path]] = field(default_factory=list)
    failures: int = 0

    def ok(self, step: str, text: str) -> None:
        self.lines.append(f"  ok    {step}: {text}")
        print(self.lines[-1], flush=True)

    def skipped(self, step: str, error: grpc.RpcError) -> None:
        self.lines.append(f"  skip  {step}: {error.code().name}: {error.details()}")
        print(self.lines[-1], flush=True)

    def failed(self, step: str, error: BaseException) -> None:
        self.failures += 1
        detail = (f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError)
                  else repr(error))
        self.lines.append(f"  FAIL  {step}: {detail}")
        print(self.lines[-1], flush=True)


def write_samples(out_dir: Path, longest: int = 256) -> dict[str, Path]:
    """Saves the sample photos as PNG (longest side ``longest``) and returns their paths."""
    from skimage import data

    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, loader in SAMPLES.items():
        image: Image.Image = Image.fromarray(np.asarray(getattr(data, loader)())).convert("RGB")
        image.thumbnail((longest, longest), Image.Resampling.LANCZOS)
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


def _step(report: DemoReport, name: str, action: Callable[[], None]) -> None:
    try:
        action()
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            report.skipped(name, error)
        else:
            report.failed(name, error)
    except Exception as error:  # a demo step must not hide a crash
        report.failed(name, error)


def run_demo(out_dir: Path, targets: Mapping[str, str], *,
             gatys_iterations: int | None = None, gatys_size: int = 128,
             tls: ClientTls | None = None) -> DemoReport:
    """Runs every demo step against ``targets`` (service -> host:port), over ``tls``
    (default: as ``PERCEPT_TLS_*`` say, :func:`client.default_tls`)."""
    report = DemoReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = write_samples(out_dir)
    cat = samples["cat"]
    report.pictures.append(("content", cat))
    iterations = gatys_iterations or int(os.environ.get("PERCEPT_DEMO_ITERATIONS", "100"))
    channels = {name: client.connect(target, tls) for name, target in targets.items()}

    def info() -> None:
        # one line per server process (the local cluster runs one per service)
        seen: set[str] = set()
        for name, channel in channels.items():
            if targets[name] in seen:
                continue
            seen.add(targets[name])
            answer = client.server_info(channel)
            models = ", ".join(m.artifact + (" (default)" if m.is_default else "")
                               for m in answer.models) or "no models"
            services = ", ".join(s.removeprefix("percept.v1.") for s in answer.services)
            report.ok(f"info {targets[name]}", f"{services}: {models}")

    def upscale() -> None:
        with Image.open(cat) as image:
            small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        small.save(buffer, "PNG")
        small.save(out_dir / "upscale_input.png")
        response = client.upscale(channels["superres"], buffer.getvalue())
        (out_dir / "upscaled.png").write_bytes(response.image)
        report.pictures.append((f"input, {small.width}x{small.height}",
                                out_dir / "upscale_input.png"))
        report.pictures.append(("upscaled 4x", out_dir / "upscaled.png"))
        report.ok("upscale", f"{out_dir / 'upscaled.png'} {response.width}x{response.height} "
                             f"({response.model})")

    def stylize(name: str, *, preserve_color: bool = False) -> None:
        response = client.stylize(channels["style"], style_pb2.StylizeRequest(
            image=cat.read_bytes(), style=name, preserve_color=preserve_color))
        suffix = "-preserve-color" if preserve_color else ""
        path = out_dir / f"style-{name}{suffix}.png"
        path.write_bytes(response.image)
        report.pictures.append((name + (" (colour kept)" if preserve_color else ""), path))
        report.ok(f"stylize --style {name}{' --preserve-color' if preserve_color else ''}",
                  f"{path} {response.width}x{response.height} ({response.model})")

    def fixed_styles() -> None:
        styles = client.list_styles(channels["style"])
        if not styles:
            report.ok("styles", "no fixed styles installed")
            return
        report.ok("styles", ", ".join(style.name for style in styles))
        # One step per style: a style that fails does not hide the others.
        for style in styles:
            _step(report, f"stylize --style {style.name}", partial(stylize, style.name))
        _step(report, f"stylize --style {styles[0].name} --preserve-color",
              partial(stylize, styles[0].name, preserve_color=True))

    def gatys() -> None:
        from training.assets import style_image_path

        started = time.perf_counter()
        request = style_pb2.StylizeWithImageRequest(
            content_image=cat.read_bytes(),
            style_image=style_image_path("starry-night").read_bytes(),
            iterations=iterations, max_size=gatys_size)
        response = client.stylize_with_image(channels["style"], request)
        path = out_dir / "gatys_starry_night.png"
        path.write_bytes(response.image)
        report.pictures.append((f"Gatys: Starry Night, {response.width}x{response.height}",
                                path))
        report.ok("stylize --style-image starry_night.jpg",
                  f"{path} {response.width}x{response.height}, {iterations} iterations "
                  f"in {time.perf_counter() - started:.1f} s")

    def label() -> None:
        for zero_shot in (False, True):
            response = client.label_image(channels["embed"], cat.read_bytes(), k=5,
                                          zero_shot=zero_shot)
            words = ", ".join(f"{lbl.lemmas[0]} ({lbl.score:.2f})" for lbl in response.labels)
            report.ok(f"label {cat}{' --zero-shot' if zero_shot else ''}", words)
            if not zero_shot:  # the overview's first picture says what it was labelled
                top = ", ".join(lbl.lemmas[0] for lbl in response.labels[:3])
                report.pictures[0] = (f"content, labelled: {top}", cat)

    def search() -> None:
        items = [search_pb2.AddImageRequest(id=name, uri=str(path.resolve()),
                                            image=path.read_bytes())
                 for name, path in samples.items()]
        added = sum(len(ack.added) for ack in client.add_images(channels["search"], items))
        stored = sum(1 for _ in client.list_images(channels["search"]))
        response = client.search_by_text(channels["search"], "cat", k=3)
        hits = ", ".join(f"{hit.id} ({hit.score:.2f})" for hit in response.hits)
        for rank, hit in enumerate(response.hits, 1):  # word -> image, in the overview
            if hit.id in samples:
                report.pictures.append((f"search 'cat' #{rank}: {hit.id} ({hit.score:.2f})",
                                        samples[hit.id]))
        report.ok("index + search 'cat'", f"{added} images indexed ({stored} in the index); "
                                          f"hits: {hits}")

    print(f"demo: writing pictures to {out_dir}/", flush=True)
    for name, action in [("info", info), ("upscale", upscale), ("styles", fixed_styles),
                         ("stylize --style-image", gatys), ("label", label),
                         ("index + search", search)]:
        _step(report, name, action)
    contact_sheet(report.pictures, out_dir / "demo.png")
    print(f"demo: overview picture {out_dir / 'demo.png'}; {report.failures} failures",
          flush=True)
    return report


if __name__ == "__main__":  # pragma: no cover - manual use against a running cluster
    from services.common.config import SERVICES

    result = run_demo(Path("out"), {name: client.default_target(name) for name in SERVICES})
    sys.exit(1 if result.failures else 0)
