"""Embedding service on the CPU: LabelImage latency (served vs the direct in-process call),
EmbedImages throughput with micro-batching vs batching off, resident memory, and the
decode of a large JPEG (full vs the served reduced-size decode).

python -m benchmarks.bench_embed [--quick]
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from typing import Any

from PIL import Image

from benchmarks.common import (
    alternated_bursts,
    interleaved_medians,
    machine,
    markdown_table,
    peak_rss_mb,
    run_as_script,
    served,
    server_process,
)
from benchmarks.image_models import photo, png
from percept.v1 import embed_pb2, embed_pb2_grpc
from services import client
from services.common.config import ServerConfig
from services.common.images import decode_image
from services.embed.preprocess import DECODE_MIN_SIDE, preprocess
from training.image_quality import psnr


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return (statistics.median(ordered) * 1000,
            ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000)


def label_latency(requests: int) -> list[dict[str, Any]]:
    data = png(photo(224))
    rows = []
    with served("embed", compile="off") as server:
        module: Any = server.server.modules[0]  # the EmbeddingService
        channel = client.connect(server.target)
        served_times, direct_times = [], []
        client.label_image(channel, data)
        for _ in range(requests):
            started = time.perf_counter()
            client.label_image(channel, data, k=5)
            served_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            vector = asyncio.run_coroutine_threadsafe(module.embed_images([data]),
                                                      server.loop).result()[0]
            module.index.search(vector[None], 5)
            direct_times.append(time.perf_counter() - started)
    for name, times in (("LabelImage over gRPC", served_times),
                        ("in-process embed + search (baseline)", direct_times)):
        p50, p99 = _percentiles(times)
        rows.append({"variant": name, "requests": requests, "p50_ms": p50, "p99_ms": p99})
    return rows


def batching_throughput(requests: int) -> list[dict[str, Any]]:
    """Bursts of ``requests`` concurrent EmbedImages calls to two servers at the default
    --max-wait-ms, without and with micro-batching, in alternating rounds."""
    images = [png(photo(224 + i)) for i in range(4)]
    variants = (("no batching (max_batch=1)", 1), ("micro-batching (max_batch=16)", 16))
    with served("embed", max_batch=1) as plain, served("embed", max_batch=16) as batched:
        stubs = {variants[0][0]: embed_pb2_grpc.EmbeddingStub(client.connect(plain.target)),
                 variants[1][0]: embed_pb2_grpc.EmbeddingStub(client.connect(batched.target))}

        def caller(stub: Any) -> Any:
            def call(i: int) -> None:
                stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[images[i % 4]]),
                                 timeout=600)
            return call

        calls = {name: caller(stub) for name, stub in stubs.items()}
        for call in calls.values():
            call(0)  # warm
        bursts = alternated_bursts(calls, requests)
    rows: list[dict[str, Any]] = [
        {"variant": name, "concurrency": 16, "requests": requests,
         "images_per_s": bursts[name]["per_s"], "rounds_per_s": bursts[name]["rounds"]}
        for name, _ in variants]
    rows[1]["speedup"] = bursts[variants[1][0]]["x"]
    return rows


def resident_memory(requests: int = 20) -> dict[str, Any]:
    with server_process("embed") as (process, channel):
        data = png(photo(512))
        for _ in range(requests):
            client.label_image(channel, data)
        return {"peak_rss_mb": peak_rss_mb(process.pid), "target_mb": 1536,
                "after": f"start-up + {requests} LabelImage calls"}


def large_jpeg_decode(repeats: int, width: int = 2560, height: int = 1600) -> dict[str, Any]:
    """What an image request's decoding costs for a ``width`` x ``height`` JPEG (q90): the
    full decode (the baseline) against the reduced-size one the service runs (libjpeg's
    scaled DCT, at least DECODE_MIN_SIDE px a side), each followed by the service's crop
    and resize to the 224-pixel input, timed in alternating rounds; and the PSNR between
    the two 224-pixel squares."""
    buffer = io.BytesIO()
    Image.fromarray(photo(width, height)).save(buffer, "JPEG", quality=90)
    data, max_pixels = buffer.getvalue(), ServerConfig(service="embed").max_pixels

    def square(draft_min_side: int | None) -> Any:
        return preprocess(decode_image(data, max_pixels=max_pixels, srgb=True,
                                       draft_min_side=draft_min_side).rgb)

    names = ("full decode (baseline)", f"reduced decode, >= {DECODE_MIN_SIDE} px (served)")
    seconds = interleaved_medians({names[0]: lambda: square(None),
                                   names[1]: lambda: square(DECODE_MIN_SIDE)}, repeats)
    return {"size": f"{width}x{height}", "psnr_db": psnr(square(None), square(DECODE_MIN_SIDE)),
            "rows": [{"variant": name, "ms": seconds[name] * 1000,
                      "speedup": seconds[names[0]] / seconds[name]} for name in names]}


def run(quick: bool = False) -> dict[str, Any]:
    return {"machine": machine(), "latency": label_latency(20 if quick else 100),
            "batching": batching_throughput(32 if quick else 96),
            "memory": resident_memory(), "large_jpeg": large_jpeg_decode(7 if quick else 21)}


def markdown(result: dict[str, Any]) -> str:
    memory = result["memory"]
    return "\n".join([
        "### Embedding service (EfficientNet-Lite0 + ConSE, 224 px)", "",
        markdown_table(["variant", "requests", "p50 ms", "p99 ms"],
                       [(r["variant"], r["requests"], r["p50_ms"], r["p99_ms"])
                        for r in result["latency"]]), "",
        "EmbedImages: bursts of concurrent calls to two servers at the default "
        "--max-wait-ms, without and with batching; the median of alternating rounds, and the "
        "median of the per-round ratios:", "",
        markdown_table(["EmbedImages", "concurrency", "requests", "images/s", "x"],
                       [(r["variant"], r["concurrency"], r["requests"], r["images_per_s"],
                         r.get("speedup", 1.0)) for r in result["batching"]]), "",
        f"Resident memory of `percept serve embed`: peak {memory['peak_rss_mb']:.0f} MB "
        f"after {memory['after']} (target < {memory['target_mb']} MB).",
        *_large_jpeg_markdown(result.get("large_jpeg"))])


def _large_jpeg_markdown(large: dict[str, Any] | None) -> list[str]:
    """The large-JPEG decode table (none for a result saved before it was measured)."""
    if large is None:
        return []
    return ["", f"Decoding a {large['size']} JPEG for the 224-pixel input (decode, crop and "
                "resize; medians of alternating rounds); the two squares agree to "
                f"{large['psnr_db']:.1f} dB PSNR:", "",
            markdown_table(["decode", "ms", "x"],
                           [(r["variant"], r["ms"], r["speedup"]) for r in large["rows"]])]


if __name__ == "__main__":
    raise SystemExit(run_as_script("embed", __doc__, run, markdown))
