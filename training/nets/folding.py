"""Inference-time rewrites that compute exactly the same function with less work.

Resize-convolution (nearest-neighbour x2, then a 3x3 stride-1 convolution; Odena et al.
2016) is what keeps our upsampling free of checkerboards, but it convolves the 4x larger
upsampled image, whose pixels come in identical 2x2 blocks. For each of the four output
parities ``(a, b)`` the 3x3 kernel only ever sees a 2x2 window of *low-resolution*
pixels, with taps that are sums of the original ones:

- row parity 0 reads low-resolution rows ``p-1, p`` with kernel rows ``[w0, w1 + w2]``;
- row parity 1 reads rows ``p, p+1`` with kernel rows ``[w0 + w1, w2]``;

and the same for columns. So one 2x2 convolution with four times the output channels at the
low resolution, followed by interleaving its four parity groups, is the same layer with
16 instead of 36 multiply-adds per (output pixel quad, channel pair): 2.25x fewer, and no
upsampled copy of the input and no padding at the high resolution.

Padding: reflection (or replication) padding of 1 around the upsampled image equals
nearest-upsampling the low-resolution image replicate-padded by 1 (row -1 of the upsampled
image is its row 1, which is low-resolution row 0), so the rewrite is exact at the borders
too. The weights are the artifact's; only the arithmetic is regrouped, so outputs agree to
float rounding (tests/training/test_folding.py).

Trainers never fold; services do, through :func:`fold_for_inference`, after loading.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FoldedResizeConv", "fold_for_inference"]

# (row parity, column parity) of each group of output channels of the folded kernel.
_PARITIES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _parity_taps(weight: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """3-tap kernel along ``dim`` -> the 2-tap kernels for parity 0 and parity 1."""
    w0, w1, w2 = (weight.select(dim, i) for i in range(3))
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


class FoldedResizeConv(nn.Module):
    """``conv(pad(nearest_x2(x)))`` computed at the low resolution (see the module doc).

    ``conv`` must be a 3x3, stride-1, undilated, ungrouped convolution whose input was
    padded by 1 with reflection or replication (either gives the same result here).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.groups != 1):
            raise ValueError("only a 3x3, stride-1, undilated, ungrouped convolution folds; "
                             f"got {conv}")
        weight = conv.weight.detach()
        kernels: list[Tensor] = []
        for row_kernel in _parity_taps(weight, 2):
            kernels.extend(_parity_taps(row_kernel, 3))
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(torch.cat(kernels, 0).contiguous(), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias)
        o = self.out_channels
        crops = [y[:, g * o:(g + 1) * o, a:a + h, b:b + w] for g, (a, b) in enumerate(_PARITIES)]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Interleave in NHWC so the result is channels_last without another copy.
            out = y.new_empty((n, h, 2, w, 2, o))
            for (a, b), crop in zip(_PARITIES, crops, strict=True):
                out[:, :, a, :, b, :] = crop.permute(0, 2, 3, 1)
            return out.view(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
        rows = [torch.stack(crops[0:2], dim=-1), torch.stack(crops[2:4], dim=-1)]
        return torch.stack(rows, dim=3).reshape(n, o, 2 * h, 2 * w)


@torch.no_grad()
def fold_for_inference(module: nn.Module) -> nn.Module:
    """Applies every sub-module's ``fold_for_inference()`` (layers that know an exact,
    cheaper form of themselves) in place, and returns ``module``."""
    for child in list(module.modules()):
        fold = getattr(child, "fold_for_inference", None)
        if callable(fold):
            fold()
    return module
