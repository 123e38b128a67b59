"""services.common.precision: a net in its serving precision, the layer that reads the
image kept float32 in bfloat16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from services.common.precision import Float32Conv, first_convolution, to_serving_precision


class DeclaredOutOfOrder(nn.Module):
    """Declares its output convolution first; the input one runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.output = nn.Conv2d(8, 3, 3, padding=1)
        self.input = nn.Conv2d(3, 8, 5, padding=2)
        self.norm = nn.InstanceNorm2d(8, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.output(torch.relu(self.norm(self.input(x)))))


def _net() -> DeclaredOutOfOrder:
    torch.manual_seed(0)
    net = DeclaredOutOfOrder().eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def test_the_first_convolution_is_the_one_that_runs_first() -> None:
    net = _net()
    assert first_convolution(net) is net.input


class Doubled(nn.Module):
    """Its first convolution reads six channels (the image twice), not the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.cat([x, x], dim=1))


def test_a_first_convolution_that_does_not_read_the_image_is_not_kept() -> None:
    assert first_convolution(Doubled().eval()) is None
    served, input_dtype = to_serving_precision(Doubled().eval(), torch.bfloat16)
    assert input_dtype == torch.bfloat16
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}


def test_bfloat16_keeps_the_input_convolution_float32_and_exact() -> None:
    net = _net()
    original = copy.deepcopy(net.input)
    served, input_dtype = to_serving_precision(net, torch.bfloat16)
    assert input_dtype == torch.float32
    assert isinstance(served.input, Float32Conv)
    assert served.input.conv.weight.dtype == torch.float32
    # the kept weights are the float32 ones, not bfloat16 ones widened back
    assert torch.equal(served.input.conv.weight, original.weight)
    assert served.output.weight.dtype == torch.bfloat16
    assert served.norm.weight.dtype == torch.bfloat16
    x = torch.rand(2, 3, 24, 20)
    with torch.inference_mode():
        y = served(x)
        reference = _net()(x)
    assert y.dtype == torch.bfloat16 and y.shape == reference.shape
    assert (y.float() - reference).abs().max() < 0.05  # bfloat16 after the first layer


def test_float16_and_float32_convert_the_whole_net() -> None:
    for dtype in (torch.float16, torch.float32):
        served, input_dtype = to_serving_precision(_net(), dtype)
        assert input_dtype == dtype
        assert {p.dtype for p in served.parameters()} == {dtype}
        assert not any(isinstance(m, Float32Conv) for m in served.modules())


def test_a_net_that_does_not_start_with_a_convolution_converts_whole() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).eval()
    served, input_dtype = to_serving_precision(net, torch.bfloat16)
    assert input_dtype == torch.bfloat16
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("bad", [nn.Conv2d(3, 4, 3)])
def test_replacing_a_module_outside_the_net_is_an_error(bad: nn.Module) -> None:
    from services.common.precision import _replace

    with pytest.raises(ValueError, match="not inside the net"):
        _replace(_net(), bad, nn.Identity())
