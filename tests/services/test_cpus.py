"""The CPUs a server may use: its affinity, capped by its cgroup's quota (cgroup v2 and
v1 files written to a temporary root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.cpus import available_cpus, quota_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", None), ("150000 100000", 1.5),
                                               ("50000 100000", 0.5), ("garbage", None)])
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, expected: float | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert quota_cpus(tmp_path) == expected


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert quota_cpus(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert quota_cpus(tmp_path) is None
    assert available_cpus(tmp_path) == _affinity()


def test_the_quota_caps_the_affinity_and_rounds_up(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(_affinity() + 8) * 100000} 100000\n")
    assert available_cpus(tmp_path) == _affinity()  # a generous quota: the affinity
    if _affinity() >= 2:
        (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads
        assert available_cpus(tmp_path) == 2
