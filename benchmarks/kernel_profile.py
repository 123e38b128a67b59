"""Where one forward pass spends its time: the kernels (on CUDA) or operators (on a CPU)
that take the most of it, from torch.profiler, per pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

NAME_CHARS = 140


def _self_time_us(event: Any, device: torch.device) -> float:
    """An averaged event's own time on ``device`` in microseconds, summed over its calls
    (``self_device_time_total`` in torch >= 2.4, ``self_cuda_time_total`` before)."""
    if device.type != "cuda":
        return float(event.self_cpu_time_total)
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _counts(event: Any, device: torch.device) -> bool:
    """Whether an averaged event's own time is counted. On a CPU every operator nests
    inside others, and only own time counts, which self time already is. On CUDA only the
    device's own events (kernels, copies, memsets) count: an operator such as
    ``aten::cudnn_convolution`` reports the time of the kernels it launched as its own
    device time too, and counting both doubled the total (seen on an H200, 27 Nov)."""
    if device.type != "cuda":
        return True
    return getattr(event, "device_type", None) != DeviceType.CPU


def _all_threads_config() -> Any:
    """The profiler option that records operators of every thread (a served request runs
    its network on the batcher's worker thread), or None where this torch lacks it; CUDA
    kernels are recorded from every thread either way."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def top_kernels(forward: Callable[[Any], Any], x: Tensor | Any, device: torch.device,
                passes: int = 10, top: int = 15) -> dict[str, Any]:
    """Profiles ``passes`` forward passes after one untimed pass, and returns the ``top``
    kernels by own time per pass: name, calls per pass, microseconds per pass and share of
    the profiled time, plus that total per pass (on CUDA, the kernels' busy time; the gap
    to a pass's wall time is launch overhead and idle time) and ``triton_kernels``, how
    many distinct Triton kernels all the counted events hold. On a CPU the rows are
    operators' own times, a check of the code path more than a measure: code that
    torch.compile generated is no operator, and its time can land on a neighbouring one
    (a 64 px pass of a compiled style net put 11 of its 19 ms on one aten::split).
    ``forward`` may be a whole served request (``x`` a uint8 image): on CUDA its host-device
    copies are then rows too (``Memcpy HtoD``, ``Memcpy DtoH``)."""
    if passes < 1 or top < 1:
        raise ValueError(f"passes and top must be >= 1, got {passes} and {top}")
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities, experimental_config=_all_threads_config()
                     ) as profiler:
            for _ in range(passes):
                forward(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    events = [(event, _self_time_us(event, device)) for event in profiler.key_averages()
              if _counts(event, device)]
    events = [(event, us) for event, us in events if us > 0]
    total = sum(us for _, us in events)
    events.sort(key=lambda pair: pair[1], reverse=True)
    rows = [{"name": event.key[:NAME_CHARS], "calls_per_pass": event.count / passes,
             "us_per_pass": us / passes, "share": us / total if total else 0.0}
            for event, us in events[:top]]
    # Distinct Triton kernels among all counted events, not only the top ones: on CUDA,
    # code that torch.compile (inductor) generated runs as Triton kernels, and a compiled
    # form whose profile holds none ran eager (benchmarks/bench_style_gpu.py).
    triton = sum(1 for event, _ in events if "triton" in event.key)
    return {"passes": passes, "total_us_per_pass": total / passes, "kernels": rows,
            "triton_kernels": triton}
