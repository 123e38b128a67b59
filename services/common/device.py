"""Device choice (CUDA when present or asked for, else the CPU) and the precision image
models are served in on it (--cpu-dtype)."""

from __future__ import annotations

import functools

import torch

from services.common.config import CPU_DTYPES


def choose_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda")
    if preference != "auto":
        raise ValueError(f"unknown device {preference!r}: choose auto, cpu or cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# /proc/cpuinfo flags of x86 instructions that compute bfloat16 dot products natively
# (AVX512_BF16: Cooper Lake, Zen 4 and later; AMX-BF16: Sapphire Rapids and later).
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _proc_cpuinfo() -> str:
    """/proc/cpuinfo, read once per process (every image model asks for its dtype)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return file.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (default: this machine's
    ``/proc/cpuinfo``; empty where there is none)."""
    if cpuinfo is None:
        cpuinfo = _proc_cpuinfo()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively and oneDNN will use it. Elsewhere
    oneDNN emulates bfloat16 (or PyTorch falls back to reference loops), slower than
    float32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & _NATIVE_BF16_FLAGS) and torch.backends.mkldnn.is_available() \
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def serving_dtype(device: torch.device, cpu_dtype: str = "auto",
                  flags: frozenset[str] | None = None) -> torch.dtype:
    """The precision an image model is served in: float16 on CUDA; on a CPU ``cpu_dtype``,
    where ``auto`` is bfloat16 when the CPU has native bfloat16 instructions (twice the
    convolution throughput of float32 on a 2-core Zen 4: 0.85 vs 1.7 ms for a 64-channel
    3x3 convolution at 68x68; with the layer that reads the image kept in float32,
    services/common/precision.py, the style outputs stay 52-55 dB PSNR from float32's and
    the super-resolution ones 64-68 dB, README.md)
    and float32 otherwise."""
    if cpu_dtype not in CPU_DTYPES:
        raise ValueError(f"--cpu-dtype must be one of {', '.join(CPU_DTYPES)}, got "
                         f"{cpu_dtype!r}")
    if device.type == "cuda":
        return torch.float16
    if cpu_dtype == "auto":
        return torch.bfloat16 if has_native_bf16(flags) else torch.float32
    return torch.bfloat16 if cpu_dtype == "bfloat16" else torch.float32


def dtype_name(device: torch.device, cpu_dtype: str = "auto") -> str:
    """:func:`serving_dtype` as a word for logs: ``bfloat16``, ``float32``, ``float16``."""
    return str(serving_dtype(device, cpu_dtype)).removeprefix("torch.")
