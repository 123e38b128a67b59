"""--retain-memory: glibc keeps what a pass frees for the next one (services/common/allocator.py).

The settings are process-wide, so each case runs in a fresh interpreter: a worker thread
(as the batcher's) allocates, writes and frees a 64 MB block three times. Counted: how much
of the block the process still holds after freeing it, and the minor page faults of the
last round (few either way where transparent huge pages back a fresh 64 MB mapping, so
the memory held is the test that tells the two apart)."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import add_server_arguments, config_from_args

REPO = Path(__file__).resolve().parents[2]
ROUNDS = """
import resource, sys, threading
import numpy as np
from services.common.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "on" else False
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
faults, held = [], []
def work():
    for _ in range(3):
        before, rss = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, rss_kb()
        block = np.ones(16 << 20, np.float32)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        held.append(rss_kb() - rss)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(applied, held[0] // 1024, faults[-1])
"""


def _rounds(setting: str) -> tuple[str, int, int]:
    """(applied, MB still held after the first round's free, faults of the last round)."""
    result = subprocess.run([sys.executable, "-c", ROUNDS, setting], cwd=REPO, check=True,
                            capture_output=True, text=True)
    applied, held_mb, faults = result.stdout.split()
    return applied, int(held_mb), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_freed_blocks_are_kept_and_reused_instead_of_faulted_back_in() -> None:
    """64 MB is over glibc's largest dynamic mmap threshold (32 MB): by default each round
    maps fresh memory and gives it back when freed; retained, the process keeps it and the
    last round reuses the first round's pages (16,384 of 4 kB) without faulting them in."""
    applied, held_mb, _ = _rounds("off")
    assert applied == "False"
    assert held_mb < 8, "glibc's default returns a freed 64 MB block to the kernel"
    applied, held_mb, faults = _rounds("on")
    assert applied == "True"
    assert held_mb > 56, "the retained block stays in the process"
    assert faults < 1_000


def test_the_flag_is_on_by_default_and_can_be_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert config_from_args("style", parser.parse_args([])).retain_memory is True
    assert config_from_args("style", parser.parse_args(["--retain-memory", "off"])
                            ).retain_memory is False
    monkeypatch.setenv("PERCEPT_RETAIN_MEMORY", "off")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert config_from_args("style", parser.parse_args([])).retain_memory is False


RELEASE = """
import sys
import numpy as np
from services.common.allocator import release_free_memory, retain_freed_memory
assert retain_freed_memory()
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
block = np.ones(16 << 20, np.float32)
above = np.ones(1 << 18, np.float32) if sys.argv[1] == "middle" else None
del block
kept = rss_kb()
released = release_free_memory()
print(released, (kept - rss_kb()) // 1024)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
@pytest.mark.parametrize("where", ["top", "middle"])
def test_releasing_gives_a_retained_free_block_back_wherever_it_lies(where: str) -> None:
    """After a burst of large requests the server releases what the retained heap holds
    free: a 64 MB block freed at the top of the heap (kept there below the 2 GiB trim
    threshold) or below a block still in use goes back to the kernel."""
    result = subprocess.run([sys.executable, "-c", RELEASE, where], cwd=REPO, check=True,
                            capture_output=True, text=True)
    released, dropped_mb = result.stdout.split()
    assert released == "True"
    assert int(dropped_mb) > 56, f"{dropped_mb} MB of the 64 MB block went back"
