"""An image model in its serving precision (services/common/device.py serving_dtype).

bfloat16 keeps 8 bits of mantissa: too few for the input itself. A pixel k/255 rounds
by up to half a grey level, and the first convolution spreads that over its whole
kernel. So in bfloat16 the convolution that reads the RGB image stays float32 (it takes
the float32 image and hands bfloat16 on). On a 2-core Zen 4 that cost about 4% of a
256 px style pass. On the six held-out photos at 256 px it took the style outputs from
52.0-54.8 dB PSNR against float32 and 4-7 grey levels off at worst to 52.6-55.1 dB and
2-5 levels, and the super-resolution outputs from 53-54 dB to 64-68 dB
(scripts/bf16_fidelity_figure.py, README.md). float16, which keeps 11 bits, converts the
whole net.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

_PROBE_SIDE = 32


class Float32Conv(nn.Module):
    """A convolution kept in float32 inside a net that runs in ``out_dtype``."""

    def __init__(self, conv: nn.Conv2d, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = conv.float()
        self.out_dtype = out_dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.float()).to(self.out_dtype)


def first_convolution(module: nn.Module) -> nn.Conv2d | None:
    """The first ``nn.Conv2d`` that runs in a forward pass of a small RGB image (found by
    running one: the order modules are declared in need not be the order they run in),
    or None if the first one does not read the image's three channels."""
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(m))  # type: ignore[misc]
             for m in module.modules() if isinstance(m, nn.Conv2d)]
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    if not order or order[0].in_channels != 3:
        return None
    return order[0]


def _replace(module: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in module.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError("the module to replace is not inside the net")


def to_serving_precision(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, torch.dtype]:
    """``module`` (float32, eval mode) converted to ``dtype`` in place, and the dtype its
    input must have: in bfloat16 the convolution that reads the image stays float32 and
    the input is float32 (see the module doc); otherwise the input is ``dtype``."""
    if dtype != torch.bfloat16:
        return module.to(dtype=dtype), dtype
    first = first_convolution(module)
    if first is None:
        return module.to(dtype=dtype), dtype
    kept = copy.deepcopy(first)  # before its weights are rounded
    module.to(dtype=dtype)
    _replace(module, first, Float32Conv(kept, dtype))
    return module, torch.float32
