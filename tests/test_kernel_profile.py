"""benchmarks.kernel_profile on the CPU: a real small network, profiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.kernel_profile import top_kernels


def test_the_convolution_dominates_a_conv_net_and_shares_add_up() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 32, 3,
                                                                            padding=1)).eval()
    x = torch.rand(1, 3, 96, 96)
    found = top_kernels(net, x, torch.device("cpu"), passes=3, top=5)
    assert found["passes"] == 3 and found["total_us_per_pass"] > 0
    kernels = found["kernels"]
    assert 1 <= len(kernels) <= 5
    assert [k["us_per_pass"] for k in kernels] == sorted((k["us_per_pass"] for k in kernels),
                                                         reverse=True)
    assert 0 < sum(k["share"] for k in kernels) <= 1 + 1e-9
    assert "conv" in kernels[0]["name"]  # two convolutions and a ReLU: a conv is on top
    assert kernels[0]["calls_per_pass"] >= 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="passes and top"):
        top_kernels(nn.Identity(), torch.zeros(1), torch.device("cpu"), passes=0)


def test_work_on_another_thread_is_profiled() -> None:
    """A served request runs its network on the batcher's worker thread; the profile must
    still see it (without the all-threads option it measured no time at all)."""
    from concurrent.futures import ThreadPoolExecutor

    net = nn.Conv2d(3, 16, 5, padding=2).eval()
    x = torch.rand(1, 3, 64, 64)
    with ThreadPoolExecutor(1) as worker:
        found = top_kernels(lambda image: worker.submit(net, image).result(), x,
                            torch.device("cpu"), passes=2, top=3)
    assert found["total_us_per_pass"] > 0
    assert any("conv" in k["name"] for k in found["kernels"])


def test_on_cuda_only_the_devices_own_events_count() -> None:
    """An operator reports the device time of the kernels it launched as its own too: on
    CUDA only kernels, copies and memsets count, or the total doubles."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.kernel_profile import _counts

    operator = SimpleNamespace(device_type=DeviceType.CPU)
    kernel = SimpleNamespace(device_type=DeviceType.CUDA)
    assert not _counts(operator, torch.device("cuda"))
    assert _counts(kernel, torch.device("cuda"))
    assert _counts(operator, torch.device("cpu"))
