"""What one client's flood does to another client's calls, with --fair-share (the
default) and without it (the baseline), timed in the same run.

Two scenarios, each with two `percept serve superres` processes, one with shares and one
without, listening on :: so that 127.0.0.1 and ::1 are two clients:
- at the call limit (--max-concurrent-rpcs 8): the flood holds more calls than the
  limit, and the shares decide who is admitted;
- below it (the default --max-concurrent-rpcs, 64): every call is admitted, and the
  shares decide the order in the model's queue (small requests take turns by client).
Against each server in turn (alternating, twice), for the same time:
- the flood: FLOOD_CALLERS threads from 127.0.0.1, each sending 64 px upscales one after
  the other, and on a busy answer sending again after the server's pushback (as
  percept's clients do);
- the light client: one thread from ::1, one 48 px upscale at a time (another batch key
  than the flood's), retrying the same way.
Measured: the light client's time from its first try to the answer (median, p95), its
busy answers per call, the flood's upscales per second, and the input pixels upscaled per
second (what the shares cost the server). Where that cost goes: the batches the model ran
and the share of the time it was busy running them (the server's percept_batch_size and
percept_batch_seconds histograms, read from /metrics before and after each phase). The
light client's requests are alone in theirs (its 48 px is a batch key of its own, and it
has one call out at a time), so the flood's batches and their mean size follow. On a
2-core CPU a batch was running nearly all the time under both servers (99.6 % in
both scenarios on 2026-11-29): what the shares cost is the batch time the light
client's one-image batches take, not idle time. (A batch's time is wall time, on cores
that the server's codecs and gRPC and these client threads share: it says a batch ran,
not what limited it.)

python -m benchmarks.bench_fairness [--quick]
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import free_port, machine, markdown_table, run_as_script, server_process
from benchmarks.image_models import photo
from percept.v1 import superres_pb2, superres_pb2_grpc
from services.common.config import ServerConfig
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.images import encode_image

LIMIT = 8
FLOOD_CALLERS = 24
MODES = ("without shares", "fair share")


class Caller:
    """Upscales in a loop until ``stop``, each retried after the pushback while busy."""

    def __init__(self, target: str, image: bytes, stop: threading.Event) -> None:
        self.channel = grpc.insecure_channel(target)
        self.upscale = superres_pb2_grpc.SuperResolutionStub(self.channel).Upscale
        self.request = superres_pb2.UpscaleRequest(image=image)
        self.stop = stop
        self.latencies: list[float] = []
        self.busy = 0
        self.failures: list[str] = []

    def one(self) -> None:
        started = time.perf_counter()
        while not self.stop.is_set():
            try:
                self.upscale(self.request, timeout=60)
            except grpc.RpcError as error:
                pushback = dict(error.trailing_metadata() or ()).get(  # type: ignore[attr-defined]
                    RETRY_PUSHBACK_KEY)
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or pushback is None:
                    self.failures.append(f"{error.code().name}: {error.details()}")  # type: ignore[attr-defined]
                    return
                self.busy += 1
                self.stop.wait(int(pushback) / 1000)
                continue
            self.latencies.append(time.perf_counter() - started)
            return

    def loop(self) -> None:
        while not self.stop.is_set():
            self.one()

    def close(self) -> None:
        self.channel.close()


def _batches_so_far(metrics_port: int) -> tuple[float, float, float]:
    """(batches run, images in them, seconds they ran) by the server whose /metrics is on
    ``metrics_port``, over all its queues."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    batches = images = seconds = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "percept_batch_size_count":
                batches += sample.value
            elif sample.name == "percept_batch_size_sum":
                images += sample.value
            elif sample.name == "percept_batch_seconds_sum":
                seconds += sample.value
    return batches, images, seconds


def _phase(port: int, metrics_port: int, images: tuple[bytes, bytes],
           seconds: float) -> dict[str, Any]:
    """One flood and one light client against the server on ``port`` for ``seconds``."""
    before, since = _batches_so_far(metrics_port), time.monotonic()
    stop = threading.Event()
    flood_image, light_image = images
    flood = [Caller(f"127.0.0.1:{port}", flood_image, stop) for _ in range(FLOOD_CALLERS)]
    light = Caller(f"[::1]:{port}", light_image, stop)
    threads = [threading.Thread(target=c.loop, daemon=True) for c in (*flood, light)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    for caller in (*flood, light):
        caller.close()
    failures = [f for c in (*flood, light) for f in c.failures]
    if failures:
        raise RuntimeError(f"calls failed: {failures[:3]}")
    batches, batch_images, batch_seconds = (
        after - earlier for after, earlier in zip(_batches_so_far(metrics_port), before,
                                                  strict=True))
    between_reads = time.monotonic() - since  # the calls in flight at the end finished
    return {"light": light.latencies, "light_busy": light.busy,
            "flood_calls": sum(len(c.latencies) for c in flood), "seconds": seconds,
            "batches": batches, "batch_images": batch_images, "batch_seconds": batch_seconds,
            "between_reads": between_reads}


#: (name, --max-concurrent-rpcs): the flood over the call limit, and under it.
SCENARIOS = (("at the call limit", LIMIT),
             ("below the call limit", ServerConfig.max_concurrent_rpcs))


def _scenario(limit: int, images: tuple[bytes, bytes], sides: tuple[int, int],
              seconds: float) -> dict[str, Any]:
    """``sides``: the flood's and the light client's image sides (px), for the pixels
    the server upscaled per second (the two sizes' upscales are not alike)."""
    phases: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with ExitStack() as servers:
        ports = {}
        for mode in MODES:
            flag = "on" if mode == "fair share" else "off"
            metrics_port = free_port()
            process, channel = servers.enter_context(server_process(
                "superres", f"--max-concurrent-rpcs={limit}", f"--fair-share={flag}",
                f"--metrics-port={metrics_port}", host="::"))
            channel.close()
            ports[mode] = process.percept_port, metrics_port
        for round_index in range(2):
            for mode in MODES if round_index == 0 else MODES[::-1]:
                phases[mode].append(_phase(*ports[mode], images, seconds))
    rows = []
    for mode in MODES:
        light = [s for phase in phases[mode] for s in phase["light"]]
        # from the first read of /metrics to the last: the calls and batches counted
        # include those in flight at the stop, which finished after it
        total = sum(phase["between_reads"] for phase in phases[mode])
        batches = sum(phase["batches"] for phase in phases[mode])
        batch_images = sum(phase["batch_images"] for phase in phases[mode])
        batch_seconds = sum(phase["batch_seconds"] for phase in phases[mode])
        # the light client's calls each ran alone in a batch (a key of its own)
        flood_batches = batches - len(light)
        rows.append({
            "mode": mode,
            "light_calls": len(light),
            "light_median_ms": statistics.median(light) * 1000 if light else None,
            "light_p95_ms": (statistics.quantiles(light, n=20)[-1] * 1000
                             if len(light) >= 20 else None),
            "light_busy_per_call": (sum(p["light_busy"] for p in phases[mode])
                                    / max(1, len(light))),
            "flood_per_s": sum(p["flood_calls"] for p in phases[mode]) / total,
            "total_kpixels_per_s": (sum(p["flood_calls"] for p in phases[mode]) * sides[0] ** 2
                                    + len(light) * sides[1] ** 2) / total / 1000,
            "batches_per_s": batches / total,
            "flood_batches_per_s": flood_batches / total,
            "flood_images_per_batch": ((batch_images - len(light)) / flood_batches
                                       if flood_batches > 0 else None),
            "model_busy": batch_seconds / total,
        })
    base, fair = rows
    return {"limit": limit, "rows": rows,
            "light_median_x": _ratio(base["light_median_ms"], fair["light_median_ms"]),
            "light_p95_x": _ratio(base["light_p95_ms"], fair["light_p95_ms"]),
            "light_calls_x": _ratio(fair["light_calls"], base["light_calls"]),
            "flood_rate_x": fair["flood_per_s"] / base["flood_per_s"],
            "total_rate_x": fair["total_kpixels_per_s"] / base["total_kpixels_per_s"]}


def run(quick: bool = False) -> dict[str, Any]:
    # the light client's images are of another size: another batch key than the flood's
    sides = 64, 48
    images = encode_image(photo(sides[0])), encode_image(photo(sides[1]))
    seconds = 5.0 if quick else 20.0
    return {"machine": machine(), "flood_callers": FLOOD_CALLERS,
            "seconds_per_mode": 2 * seconds,
            "image": (f"the flood's 64 x 64 PNG of {len(images[0])} bytes, the light "
                      f"client's 48 x 48 PNG of {len(images[1])} bytes"),
            "scenarios": [{"name": name, **_scenario(limit, images, sides, seconds)}
                          for name, limit in SCENARIOS]}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _batch_rates(row: dict[str, Any]) -> str:
    if "batches_per_s" not in row:  # a result from before batches were counted
        return "-"
    return f"{row['batches_per_s']:.1f} ({row['flood_batches_per_s']:.1f})"


def _busy(row: dict[str, Any]) -> str:
    value = row.get("model_busy")
    return "-" if value is None else f"{value:.1%}"


def _per_batch(row: dict[str, Any]) -> str:
    value = row.get("flood_images_per_batch")
    return "-" if value is None else f"{value:.1f}"


def _scenario_markdown(scenario: dict[str, Any]) -> str:
    table = markdown_table(
        ["server", "light client's calls", "its median ms", "its p95 ms",
         "busy answers per call", "flood upscales/s", "input kpixels upscaled/s",
         "batches/s (the flood's)", "flood images per batch", "model busy"],
        [(r["mode"], r["light_calls"], _ms(r["light_median_ms"]), _ms(r["light_p95_ms"]),
          f"{r['light_busy_per_call']:.1f}", f"{r['flood_per_s']:.1f}",
          f"{r['total_kpixels_per_s']:.0f}", _batch_rates(r), _per_batch(r), _busy(r))
         for r in scenario["rows"]])

    def times(key: str) -> str:
        value = scenario.get(key)
        return f"{value:.1f}x" if value else "not measured"

    return (f"{scenario['name'].capitalize()} (`--max-concurrent-rpcs "
            f"{scenario['limit']}`):\n\n{table}\n\nWith shares, against the server without "
            f"them: the light client's median {times('light_median_x')} and its p95 "
            f"{times('light_p95_x')} shorter, {times('light_calls_x')} the calls done; the "
            f"flood keeps {scenario['flood_rate_x']:.2f}x its rate, and the server "
            f"{scenario['total_rate_x']:.2f}x its throughput (input pixels upscaled)."
            f"{_batches_markdown(scenario['rows'])}")


def _batches_markdown(rows: list[dict[str, Any]]) -> str:
    """Where the throughput went: the batches each server ran (absent from results saved
    before they were counted)."""
    base, fair = rows
    if "batches_per_s" not in base:
        return ""
    light_base = base["batches_per_s"] - base["flood_batches_per_s"]
    light_fair = fair["batches_per_s"] - fair["flood_batches_per_s"]
    return (f" The model ran {light_fair:.1f} of the light client's one-image batches a "
            f"second with shares against {light_base:.1f} without, and "
            f"{fair['flood_batches_per_s']:.1f} of the flood's against "
            f"{base['flood_batches_per_s']:.1f}, which held "
            f"{_per_batch(fair)} images each against {_per_batch(base)}; the model ran "
            f"batches {_busy(fair)} of the time against {_busy(base)}.")


def markdown(result: dict[str, Any]) -> str:
    scenarios = "\n\n".join(_scenario_markdown(s) for s in result["scenarios"])
    return (f"### One client's flood against another client's calls (--fair-share)\n\n"
            f"Machine: {result['machine']}; `percept serve superres`; "
            f"{result['flood_callers']} flood callers from 127.0.0.1, one light caller from "
            f"::1, {result['seconds_per_mode']:.0f} s per server (alternated); "
            f"{result['image']}\n\n{scenarios}")


if __name__ == "__main__":
    raise SystemExit(run_as_script("fairness", __doc__, run, markdown))
