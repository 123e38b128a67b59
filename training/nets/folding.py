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

The convolution *after* an upsampling (the super-resolution network's 9x9 output layer)
gains from the same view (:class:`FoldedUpsampleConv`). A KxK convolution of the
2x-resolution image, read through its four parity groups, is a ``(2Q+1)x(2Q+1)`` convolution
at the low resolution from 4x the channels to 4x the channels, ``Q = (K//2 + 1) // 2``
(5x5 for K = 9), whose outputs are the output's parity groups (``pixel_shuffle`` order). It
does 1.2x the multiply-adds (zero taps included), but oneDNN runs a 64 -> 12 channel
convolution far better than a 16 -> 3 one (2 cores, AVX2: 72 vs 120 ms for a 512x512
output), better still with 4 zero output channels added (64 -> 16, a multiple of the
8-float vector; 38 vs 55 ms at 256x256), and the upsampled activation is never
interleaved or padded at full resolution.
Reflection padding maps onto each parity group exactly: reflecting a row index keeps its
parity, so a group's padded row is another row of the same group (reflected on one side,
mirrored with the edge repeated on the other).

Bilinear x2 upsampling (:class:`FoldedBilinearResizeConv`) folds the same way: each
upsampled row is 0.75 of one input row and 0.25 of its neighbour, so a 3x3 kernel over
upsampled rows is, per output parity, a 3x3 kernel over input rows. That saves no
multiply-adds, only the 4x larger upsampled copy, and gives the convolution 4x the output
channels at a quarter of the pixels.

Trainers never fold; services do, through :func:`fold_for_inference`, after loading.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ChannelPaddedConv",
    "FoldedBilinearResizeConv",
    "FoldedResizeConv",
    "FoldedUpsampleConv",
    "InferenceInstanceNorm",
    "SpaceToDepthConv",
    "fold_for_inference",
    "for_compile_on_cuda",
]

# (row parity, column parity) of each group of output channels of the folded kernel.
_PARITIES = ((0, 0), (0, 1), (1, 0), (1, 1))
# Folded output convolutions get zero output channels up to a multiple of this.
_CHANNEL_MULTIPLE = 8


def _parity_taps(weight: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """3-tap kernel along ``dim`` -> the 2-tap kernels for parity 0 and parity 1."""
    w0, w1, w2 = (weight.select(dim, i) for i in range(3))
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def _resize_conv_weight(conv: nn.Conv2d) -> Tensor:
    """The weight of a resize-convolution that folds: 3x3, stride 1, undilated, ungrouped."""
    if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.dilation != (1, 1)
            or conv.groups != 1):
        raise ValueError("only a 3x3, stride-1, undilated, ungrouped convolution folds; "
                         f"got {conv}")
    return conv.weight.detach()


class FoldedResizeConv(nn.Module):
    """``conv(pad(nearest_x2(x)))`` computed at the low resolution (see the module doc).

    ``conv`` must be a 3x3, stride-1, undilated, ungrouped convolution whose input was
    padded by 1 with reflection or replication (either gives the same result here).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight = _resize_conv_weight(conv)
        kernels: list[Tensor] = []
        for row_kernel in _parity_taps(weight, 2):
            kernels.extend(_parity_taps(row_kernel, 3))
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(torch.cat(kernels, 0).contiguous(), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    #: Where group ``g``'s ``h x w`` window starts inside :meth:`parity_groups`' output.
    offsets = _PARITIES

    def parity_groups(self, x: Tensor) -> Tensor:
        """(N, 4 * out, h + 1, w + 1): output pixel ``(2i + a, 2j + b)`` of group
        ``g = 2a + b`` is at ``[:, g * out + c, i + a, j + b]``."""
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return _interleave(self.parity_groups(x), self.offsets, x)


def _interleave(y: Tensor, offsets: tuple[tuple[int, int], ...], x: Tensor) -> Tensor:
    """The 2x-resolution image whose parity group ``g`` is the ``h x w`` window of ``y``'s
    channels ``g * C ...`` at ``offsets[g]`` (``x``: the low-resolution input, whose size
    and memory format the result follows)."""
    n, _, h, w = x.shape
    o = y.shape[1] // 4
    crops = [y[:, g * o:(g + 1) * o, a:a + h, b:b + w] for g, (a, b) in enumerate(offsets)]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # Interleave in NHWC so the result is channels_last without another copy.
        out = y.new_empty((n, h, 2, w, 2, o))
        for (a, b), crop in zip(_PARITIES, crops, strict=True):
            out[:, :, a, :, b, :] = crop.permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    rows = [torch.stack(crops[0:2], dim=-1), torch.stack(crops[2:4], dim=-1)]
    return torch.stack(rows, dim=3).reshape(n, o, 2 * h, 2 * w)


# Bilinear x2 (align_corners=False) makes output row 2i + a of 0.75 X[i] and 0.25 of the
# neighbour on side a (clamped at the edges); a 3-tap kernel over the upsampled rows
# 2i + a - 1 ... 2i + a + 1 therefore reads low-resolution rows i - 1, i, i + 1 with taps
# _BILINEAR_TAPS[a] @ (w0, w1, w2) (rows: rows i - 1, i, i + 1; columns: w0, w1, w2).
_BILINEAR_TAPS = (
    ((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25)),
    ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75)),
)


class FoldedBilinearResizeConv(nn.Module):
    """``conv(reflect_pad(bilinear_x2(x)))`` computed at the low resolution: per output
    parity ``(a, b)`` a 3x3 convolution of the replicate-padded input with the kernel
    ``T_a w T_b^T`` (:data:`_BILINEAR_TAPS`), four parities as one convolution with 4x
    the output channels. The same multiply-adds as the layer it replaces, but no 4x larger
    upsampled copy, and a wide convolution at the low resolution.

    Replicate padding of the input equals *replicate* padding of the upsampled image, not
    the reflection the layer uses, so the outermost output rows and columns (row 0, row
    2h - 1, column 0, column 2w - 1) are computed again exactly, from the two input rows or
    columns they depend on, upsampled and convolved as in the original layer."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight = _resize_conv_weight(conv)
        taps = weight.new_tensor(_BILINEAR_TAPS)  # (parity, 3 input rows, 3 kernel rows)
        kernels = [torch.einsum("yk,oikl,xl->oiyx", taps[a], weight, taps[b])
                   for a, b in _PARITIES]
        self.out_channels = conv.out_channels
        self.conv = conv  # for the border rows and columns
        self.weight = nn.Parameter(torch.cat(kernels, 0).contiguous(), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    #: Every group's window starts at (0, 0) of :meth:`parity_groups`' output.
    offsets = ((0, 0),) * 4

    def _exact(self, strip: Tensor) -> Tensor:
        up = F.interpolate(strip, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(F.pad(up, (1, 1, 1, 1), mode="reflect"))

    def parity_groups(self, x: Tensor) -> Tensor:
        """(N, 4 * out, h, w): output pixel ``(2i + a, 2j + b)`` of group ``g = 2a + b`` is
        at ``[:, g * out + c, i, j]``."""
        h, w = x.shape[-2:]
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias)
        o = self.out_channels
        top, bottom = self._exact(x[:, :, :2]), self._exact(x[:, :, -2:])
        left, right = self._exact(x[:, :, :, :2]), self._exact(x[:, :, :, -2:])
        for g, (a, b) in enumerate(_PARITIES):
            group = y[:, g * o:(g + 1) * o]
            if a == 0:
                group[:, :, 0, :] = top[:, :, 0, b::2]
            else:
                group[:, :, h - 1, :] = bottom[:, :, -1, b::2]
            if b == 0:
                group[:, :, :, 0] = left[:, :, a::2, 0]
            else:
                group[:, :, :, w - 1] = right[:, :, a::2, -1]
        return y

    def forward(self, x: Tensor) -> Tensor:
        return _interleave(self.parity_groups(x), self.offsets, x)


def _reflected_border_rows(size: int, parity: int, pad: int) -> list[tuple[int, int]]:
    """``(padded row, source row)`` for the ``2 * pad`` border rows of parity group
    ``parity`` (``size`` rows, padded by ``pad`` each side) once the 2x-resolution image
    (``2 * size`` rows) is reflection-padded; both in padded coordinates."""
    border = []
    for row in (*range(-pad, 0), *range(size, size + pad)):
        high = 2 * row + parity
        high = -high if high < 0 else 2 * (2 * size - 1) - high
        if not 0 <= high < 2 * size:
            raise ValueError(f"a {2 * size}-pixel side is too small to reflect by {2 * pad}")
        border.append((row + pad, (high - parity) // 2 + pad))  # reflection keeps the parity
    return border


def _parity_conv_weight(weight: Tensor, pad: int) -> Tensor:
    """A KxK stride-1 convolution of a 2x-resolution image (padded by ``pad``) as a
    ``(2Q+1)x(2Q+1)`` convolution of its four parity groups, ``Q = (pad + 1) // 2``.

    Input channel ``g * C_in + c`` is channel ``c`` of parity group ``g = 2a + b`` (pixel
    ``(2i + a, 2j + b)`` at ``(i, j)``); output channel ``c * 4 + g``
    (``F.pixel_shuffle``'s order). Taps that fall outside the original kernel are zero."""
    c_out, c_in = weight.shape[:2]
    reach = (pad + 1) // 2
    span = 2 * reach + 1
    folded = weight.new_zeros((c_out, 2, 2, 4, c_in, span, span))
    for out_row, out_col, in_row, in_col in itertools.product(range(2), repeat=4):
        group = 2 * in_row + in_col
        for offset_y in range(-reach, reach + 1):
            dy = 2 * offset_y + in_row - out_row
            if abs(dy) > pad:
                continue
            for offset_x in range(-reach, reach + 1):
                dx = 2 * offset_x + in_col - out_col
                if abs(dx) > pad:
                    continue
                folded[:, out_row, out_col, group, :, offset_y + reach, offset_x + reach] = \
                    weight[:, :, dy + pad, dx + pad]
    return folded.reshape(4 * c_out, 4 * c_in, span, span).contiguous()


def _reflect_pad_groups(groups: list[Tensor], q: int,
                        affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The four parity groups (NHWC, ``(N, h, w, C)`` each, in :data:`_PARITIES` order) of
    a ``2h x 2w`` image, each padded by ``q`` as the image reflection-padded by ``2q``
    would pad it, side by side in one ``(N, h + 2q, w + 2q, 4C)`` NHWC tensor: the
    interior is one copy per group, then the border rows and columns are copied from
    inside (rows first, so the corners follow).

    ``affine`` = ``(scale, shift)``, each ``(N, 4C)``: the interior becomes
    ``group * scale + shift`` (a per-channel normalisation), in one pass over all four
    groups' channels once they are copied, before the borders are. Applied per group while
    copying, a bfloat16 addcmul into each C-channel window took 2.0 ms for the style net's
    last layer at 256 px (four 16-channel windows, 2 Zen 4 cores) against 0.55 ms for the
    copies and one pass; in float32 the two took the same time."""
    if len(groups) != len(_PARITIES):
        raise ValueError(f"expected {len(_PARITIES)} parity groups, got {len(groups)}")
    n, h, w, c = groups[0].shape
    padded = groups[0].new_empty((n, h + 2 * q, w + 2 * q, 4 * c))
    interior = padded[:, q:q + h, q:q + w]
    for g, group in enumerate(groups):
        interior[..., g * c:(g + 1) * c].copy_(group)
    if affine is not None:
        scale, shift = (t[:, None, None, :] for t in affine)
        torch.addcmul(shift, interior, scale, out=interior)
    for g, (a, b) in enumerate(_PARITIES):
        channels = slice(g * c, (g + 1) * c)
        for index, source in _reflected_border_rows(h, a, q):
            padded[:, index, q:q + w, channels] = padded[:, source, q:q + w, channels]
        for index, source in _reflected_border_rows(w, b, q):
            padded[:, :, index, channels] = padded[:, :, source, channels]
    return padded


def _gathered_pad_groups(groups: list[Tensor], q: int,
                         affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """What :func:`_reflect_pad_groups` returns, computed without writing into slices:
    each group gathers its padded rows and columns by index, and the four are
    concatenated. Functional code that torch.compile traces whole (the in-place version's
    ``out=`` into a channel window is a graph break) and can fuse into one pass."""
    if len(groups) != len(_PARITIES):
        raise ValueError(f"expected {len(_PARITIES)} parity groups, got {len(groups)}")
    h, w = groups[0].shape[1:3]
    parts = []
    for group, (a, b) in zip(groups, _PARITIES, strict=True):
        rows = torch.tensor(_padded_sources(h, a, q), device=group.device)
        cols = torch.tensor(_padded_sources(w, b, q), device=group.device)
        parts.append(group.index_select(1, rows).index_select(2, cols))
    padded = torch.cat(parts, dim=-1)
    if affine is not None:
        scale, shift = (t[:, None, None, :] for t in affine)
        padded = torch.addcmul(shift, padded, scale)
    return padded


def _padded_sources(size: int, parity: int, pad: int) -> list[int]:
    """For each of the ``size + 2 * pad`` padded rows of parity group ``parity``, the
    unpadded row it holds (:func:`_reflected_border_rows` for the border)."""
    sources = [row - pad for row in range(size + 2 * pad)]
    for index, source in _reflected_border_rows(size, parity, pad):
        sources[index] = source - pad
    return sources


class ChannelPaddedConv(nn.Module):
    """A convolution whose input gets zero channels up to a multiple of ``multiple`` (and
    its weight zero input channels to match): the same output. cuDNN's fp16 NHWC kernels
    for a 3-channel input (the style net's 9x9 first layer) are slow, indexed kernels;
    with 8 channels the input is aligned for the tensor cores' fast paths. On the CPU it
    only adds work."""

    def __init__(self, conv: nn.Conv2d, multiple: int = _CHANNEL_MULTIPLE) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or multiple < 1:
            raise ValueError(f"only an ungrouped, zero-padded convolution pads; got {conv}")
        self.spare = -conv.in_channels % multiple
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        weight = F.pad(conv.weight.detach(), (0, 0, 0, 0, 0, self.spare))
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(),
                                                                requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.spare:
            x = F.pad(x, (0, 0, 0, 0, 0, self.spare))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class SpaceToDepthConv(nn.Module):
    """A KxK stride-1 convolution (K odd, no padding of its own: the layer before pads)
    computed on the input's 2x2 pixel-unshuffled form, which has 4x the channels at half
    the resolution, as a ``(K//2 + 1)``-square convolution to 4x the output channels,
    then pixel-shuffled back: the same sums (zero taps added). Output pixel
    ``(2i + a, 2j + b)`` reads input rows ``2i + a + dy``, which is row ``i + m`` of
    parity group ``r`` for ``a + dy = 2m + r``.

    For the style net's 9x9 first layer (3 input channels) this is a 12 -> 4 * width
    convolution with 5x5 taps: 1.23x the multiply-adds (1.65x with the zero channels
    below), in a shape the tensor cores run well, where cuDNN runs the 3-channel one with
    a slow indexed kernel. The unshuffled channels get zero ones up to a multiple of 8
    (12 -> 16: fp16 tensor-core kernels want 16-byte rows). Inputs with an odd side take
    the original convolution. On the CPU it took twice the original's time (2 cores, fp32,
    1024 px)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding != (0, 0)):
            raise ValueError("only an odd square, stride-1, undilated, ungrouped, unpadded "
                             f"convolution goes to space-to-depth; got {conv}")
        self.conv = conv
        weight = conv.weight.detach()
        c_out, c_in = weight.shape[:2]
        span = k // 2 + 1
        folded = weight.new_zeros((c_out, 2, 2, c_in, 2, 2, span, span))
        for a, b, ry, rx in itertools.product(range(2), repeat=4):
            for my, mx in itertools.product(range(span), repeat=2):
                dy, dx = 2 * my + ry - a, 2 * mx + rx - b
                if 0 <= dy < k and 0 <= dx < k:
                    folded[:, a, b, :, ry, rx, my, mx] = weight[:, :, dy, dx]
        self.spare = -4 * c_in % _CHANNEL_MULTIPLE
        folded = F.pad(folded.reshape(4 * c_out, 4 * c_in, span, span),
                       (0, 0, 0, 0, 0, self.spare))
        self.weight = nn.Parameter(folded.contiguous(), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat_interleave(4)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            return self.conv(x)
        x = F.pixel_unshuffle(x, 2)
        if self.spare:
            x = F.pad(x, (0, 0, 0, 0, 0, self.spare))
        return F.pixel_shuffle(F.conv2d(x, self.weight, self.bias), 2)


class InferenceInstanceNorm(nn.Module):
    """``nn.InstanceNorm2d`` (no running statistics) as batch normalisation in training mode
    of one sample at a time, which *is* instance normalisation for a batch of one.
    PyTorch's instance norm makes a channels_last input contiguous and back (two copies
    per layer); its batch norm has a channels_last CPU kernel: 0.9 vs 10.5 ms for a
    64x128x128 activation on 2 AVX2 cores."""

    def __init__(self, norm: nn.InstanceNorm2d) -> None:
        super().__init__()
        if norm.track_running_stats:
            raise ValueError("only instance normalisation without running statistics folds")
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return self.norm(x)
        norm = self.norm
        samples = [F.batch_norm(x[i:i + 1], None, None, norm.weight, norm.bias, training=True,
                                momentum=0.0, eps=norm.eps) for i in range(x.shape[0])]
        return samples[0] if len(samples) == 1 else torch.cat(samples)


class FoldedUpsampleConv(nn.Module):
    """``conv(reflect_pad(activation(norm(resize_conv(x)))))`` with everything after ``x``
    at the low resolution, on the four parity groups (see the module doc).

    ``resize`` is the folded resize-convolution; ``conv`` a stride-1, undilated,
    ungrouped convolution with an odd square kernel, whose input is reflection-padded by
    ``pad`` = half the kernel (the output layer of either network); ``norm`` an optional
    instance normalisation (its statistics span all four groups); ``activation`` is
    elementwise.
    """

    def __init__(self, resize: FoldedResizeConv | FoldedBilinearResizeConv, conv: nn.Conv2d,
                 *, pad: int,
                 activation: Callable[[Tensor], Tensor],
                 norm: nn.InstanceNorm2d | None = None) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1 or pad != k // 2
                or conv.in_channels != resize.out_channels):
            raise ValueError("only an odd square, stride-1, undilated, ungrouped, reflection-"
                             f"padded convolution of the upsampled channels folds; got {conv} "
                             f"with padding {pad}")
        if norm is not None and norm.track_running_stats:
            raise ValueError("only instance normalisation without running statistics folds")
        self.resize = resize
        self.activation = activation
        self.norm = norm
        self.pad = pad
        self.reach = (pad + 1) // 2  # Q: low-resolution rows on each side
        self.in_channels = conv.in_channels
        # Output channel c * 4 + 2a + b: F.pixel_shuffle's order, then zero channels up to a
        # multiple of 8 (the AVX2 vector width; oneDNN ran 64 -> 16 in 38 ms against 55 ms
        # for 64 -> 12 at 256x256 on 2 cores), which forward() drops again.
        weight = _parity_conv_weight(conv.weight.detach(), pad)
        self.channels = weight.shape[0]
        spare = -self.channels % _CHANNEL_MULTIPLE
        self.weight = nn.Parameter(F.pad(weight, (0, 0, 0, 0, 0, 0, 0, spare)).contiguous(),
                                   requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat_interleave(4)
        self.bias = None if bias is None else nn.Parameter(F.pad(bias, (0, spare)),
                                                           requires_grad=False)

    @classmethod
    def from_padded_conv(cls, resize: FoldedResizeConv | FoldedBilinearResizeConv,
                         conv: nn.Conv2d, *,
                         activation: Callable[[Tensor], Tensor],
                         norm: nn.InstanceNorm2d | None = None) -> FoldedUpsampleConv:
        """For a convolution that pads itself (``padding_mode="reflect"``)."""
        if conv.padding_mode != "reflect" or conv.padding[0] != conv.padding[-1]:
            raise ValueError("only an odd square, stride-1, undilated, ungrouped, reflection-"
                             f"padded convolution of the upsampled channels folds; got {conv}")
        return cls(resize, conv, pad=int(conv.padding[0]), activation=activation, norm=norm)

    def _norm_affine(self, groups: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Instance norm of the upsampled image, as a per-sample, per-channel ``(scale,
        shift)`` (each ``(N, 4C)``) for its parity groups: each channel's statistics pool
        the valid ``h x w`` window of all four groups. Per group, the fast batch-norm
        statistics of the whole map, less (when the map is ``(h+1) x (w+1)``,
        :class:`FoldedResizeConv`) the row and column outside its window, pooled in float64
        (exact to float rounding). Applied while the groups are padded
        (:func:`_reflect_pad_groups`), as batch norm applies its statistics:
        ``x * (weight / std) + (bias - mean * weight / std)``."""
        assert self.norm is not None
        c = self.in_channels
        map_h, map_w = groups.shape[-2:]
        count = map_h * map_w
        scales, shifts = [], []
        for sample in groups.split(1):
            if torch.compiler.is_compiling():
                # batch_norm_update_stats is no inductor op: on CUDA it stayed a separate
                # kernel that read the map at a tenth of the memory bandwidth.
                var, mean = torch.var_mean(sample.float(), dim=(0, 2, 3), correction=0)
            else:
                mean, var = torch.batch_norm_update_stats(sample, None, None, 0.0)  # biased
            mean, var = mean.double(), var.double()
            sums = mean * count
            squares = (var + mean * mean) * count
            if (map_h, map_w) != (h, w):
                for g, (a, b) in enumerate(self.resize.offsets):
                    channels = slice(g * c, (g + 1) * c)
                    row = sample[0, channels, 0 if a else h, :].double()  # (C, w+1)
                    col = sample[0, channels, :, 0 if b else w].double()  # (C, h+1)
                    corner = sample[0, channels, 0 if a else h, 0 if b else w].double()
                    sums[channels] -= row.sum(1) + col.sum(1) - corner
                    squares[channels] -= ((row * row).sum(1) + (col * col).sum(1)
                                          - corner * corner)
            pooled_mean = sums.view(4, c).sum(0) / (4 * h * w)
            pooled_var = (squares.view(4, c).sum(0) / (4 * h * w)
                          - pooled_mean * pooled_mean).clamp_(min=0.0)
            scale = (pooled_var + self.norm.eps).rsqrt()
            if self.norm.weight is not None:
                scale = scale * self.norm.weight.double()
            shift = -pooled_mean * scale
            if self.norm.bias is not None:
                shift = shift + self.norm.bias.double()
            scales.append(scale.repeat(4))
            shifts.append(shift.repeat(4))
        return (torch.stack(scales).to(groups.dtype), torch.stack(shifts).to(groups.dtype))

    #: Whether torch.compile traces this layer (True) or runs it eagerly between the
    #: compiled parts around it (False, the default). On the CPU, inductor turned the
    #: window gathers below into slow code: 0.7x eager for the SR net, 2.1x with this layer
    #: left eager and the rest compiled. ``benchmarks/bench_style_gpu.py`` times both.
    traced_by_compile = False

    def forward(self, x: Tensor) -> Tensor:
        if self.traced_by_compile:
            return self._forward(x)
        return self._forward_eagerly(x)

    @torch.compiler.disable
    def _forward_eagerly(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        groups = self.resize.parity_groups(x)  # (N, 4C, h+1, w+1) or (N, 4C, h, w)
        affine = None if self.norm is None else self._norm_affine(groups, h, w)
        c, q = self.in_channels, self.reach
        # Each group's reflection-padded window, in NHWC: the interior is one slice copy
        # (the group's offset inside ``groups`` is resize.offsets[g]) that also applies the
        # normalisation, then the 2q border rows and columns are copied from inside the
        # window (rows first, so the corners follow). The activation acts pixel by pixel,
        # so it can come after.
        nhwc = groups.permute(0, 2, 3, 1)
        pad_groups = _gathered_pad_groups if torch.compiler.is_compiling() \
            else _reflect_pad_groups
        padded = pad_groups(
            [nhwc[:, a:a + h, b:b + w, g * c:(g + 1) * c]
             for g, (a, b) in enumerate(self.resize.offsets)], q, affine)
        padded = self.activation(padded)
        out = F.conv2d(padded.permute(0, 3, 1, 2), self.weight, self.bias)
        return F.pixel_shuffle(out[:, :self.channels], 2)


_FOLDS = (FoldedResizeConv, FoldedBilinearResizeConv, FoldedUpsampleConv, SpaceToDepthConv)


@torch.no_grad()
def for_compile_on_cuda(module: nn.Module) -> nn.Module:
    """Rewrites, in place, of a folded net (:func:`fold_for_inference`) that torch.compile
    runs faster on CUDA, outputs equal to float rounding: every
    :class:`FoldedUpsampleConv` traced with the rest of the graph, and every unpadded,
    odd-kernel, stride-1 convolution of at most 4 input channels (the style net's 9x9
    first layer) as a :class:`SpaceToDepthConv`. Returns ``module``.

    On an H200 (fp16, channels_last, compiled, one CUDA graph; 27 Nov 2026,
    benchmarks/README.md) the paper-width style net at 1024 px took 2.87 ms with the
    output layer left eager, 2.17-2.27 ms traced and 1.94 ms traced with the first layer
    space-to-depth. Not for the CPU: there inductor made the traced output layer slower
    (see FoldedUpsampleConv)."""
    for layer in module.modules():
        if isinstance(layer, FoldedUpsampleConv):
            layer.traced_by_compile = True
    for parent in list(module.modules()):
        if isinstance(parent, _FOLDS):
            continue
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Conv2d and child.in_channels <= 4
                    and child.stride == (1, 1) and child.padding == (0, 0)
                    and child.dilation == (1, 1) and child.groups == 1
                    and child.kernel_size[0] == child.kernel_size[1] > 1
                    and child.kernel_size[0] % 2 == 1):
                setattr(parent, name, SpaceToDepthConv(child))
    return module


@torch.no_grad()
def fold_for_inference(module: nn.Module) -> nn.Module:
    """Applies every sub-module's ``fold_for_inference()`` (layers that know an exact,
    cheaper form of themselves) in place, and returns ``module``."""
    for child in list(module.modules()):
        fold = getattr(child, "fold_for_inference", None)
        if callable(fold):
            fold()
    return module
