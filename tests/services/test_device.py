"""services.common.device: the CPU flag reader and the serving precision (--cpu-dtype)."""

from __future__ import annotations

import argparse

import pytest
import torch

from services.common.config import ServerConfig, add_server_arguments
from services.common.device import cpu_flags, dtype_name, has_native_bf16, serving_dtype

ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SKYLAKE = frozenset({"avx2", "avx512f", "avx512bw"})
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse2
"""


def test_cpu_flags_reads_the_first_cpus_flags_line() -> None:
    assert cpu_flags(CPUINFO) == frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_flags("processor\t: 0\n") == frozenset()


def test_cpu_flags_of_this_machine_is_a_set_of_words() -> None:
    flags = cpu_flags()
    assert all(flag and " " not in flag for flag in flags)


def test_native_bf16_needs_the_instructions() -> None:
    assert not has_native_bf16(SKYLAKE)
    assert not has_native_bf16(frozenset())
    # oneDNN on this torch build knows bf16 wherever the CPU does (x86-64 with AVX-512).
    assert has_native_bf16(ZEN4) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize(("cpu_dtype", "flags", "expected"), [
    ("float32", ZEN4, torch.float32), ("bfloat16", SKYLAKE, torch.bfloat16),
    ("auto", SKYLAKE, torch.float32)])
def test_serving_dtype_on_the_cpu(cpu_dtype: str, flags: frozenset[str],
                                  expected: torch.dtype) -> None:
    assert serving_dtype(torch.device("cpu"), cpu_dtype, flags) == expected


def test_auto_picks_bfloat16_with_native_instructions() -> None:
    expected = torch.bfloat16 if has_native_bf16(ZEN4) else torch.float32
    assert serving_dtype(torch.device("cpu"), "auto", ZEN4) == expected


def test_cuda_serves_float16_whatever_the_cpu_dtype() -> None:
    for cpu_dtype in ("auto", "float32", "bfloat16"):
        assert serving_dtype(torch.device("cuda"), cpu_dtype) == torch.float16
    assert dtype_name(torch.device("cuda")) == "float16"


def test_an_unknown_cpu_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        serving_dtype(torch.device("cpu"), "int8")


def test_the_flag_parses_and_defaults_to_auto() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert ServerConfig(service="style").cpu_dtype == "auto"
    assert parser.parse_args(["--cpu-dtype", "bfloat16"]).cpu_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpu-dtype", "float16"])
