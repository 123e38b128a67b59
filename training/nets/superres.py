"""4x super-resolution network (Johnson et al. 2016, "Perceptual Losses for Real-Time Style
Transfer and Super-Resolution", sec. 3.1 and supplementary table 2), registered as
``"superres-resnet"``.

Layout, as in Johnson's SR net: a 9x9 input convolution, residual blocks that compute at
the *low* resolution (He et al. 2016; no activation after the residual add), two 2x
upsampling stages, and a 9x9 output convolution. Every convolution pads by reflection.
Following EDSR (Lim et al. 2017) there is no batch norm (it hurts SR), no activation after
the input convolution, and a long skip around the residual blocks; the upsampling stages
use LeakyReLU(0.2) as ESRGAN's (Wang et al. 2018) do.

Upsampling never uses transposed convolutions, whose uneven kernel overlap draws
checkerboards (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts"):

- ``"nearest"`` (default, the lecture's choice): resize-convolution, nearest-neighbour x2
  then a stride-1 3x3 convolution. Nearest x2 puts no energy at the new Nyquist frequency
  (each pixel pair is equal), and the convolution cannot add any, so the only source of a
  period-2 pattern is the non-linearity.
- ``"pixelshuffle"``: sub-pixel convolution (Shi et al. 2016) with ICNR initialisation
  (Aitken et al. 2017, "Checkerboard artifact free sub-pixel convolution"): each group of
  four output sub-pixels starts with identical weights, so the freshly initialised layer
  equals resize-convolution.

Output: ``bicubic(x) + residual`` rather than Johnson's scaled tanh. The network then only
has to learn the missing high frequencies (global residual learning: Kim et al. 2016,
VDSR), it starts out *as good as bicubic* (the output convolution starts small), and it
trains far faster, which matters for the CPU budget the default models are trained in. A
tanh output has to relearn the whole image, colours included, before it beats bicubic. In
eval mode the output is clamped to [0, 1].

Input and output: RGB float in [0, 1], (N, 3, h, w) -> (N, 3, 4h, 4w). Inputs must be at
least 5x5 pixels (reflection padding of the 9x9 convolution).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.nets import register
from training.nets.folding import FoldedResizeConv, FoldedUpsampleConv

Upsample = Literal["nearest", "pixelshuffle"]
NEGATIVE_SLOPE = 0.2


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                     padding_mode="reflect")


class ResidualBlock(nn.Module):
    """conv3x3 - ReLU - conv3x3, added to the input; no activation after the add
    (Johnson et al. 2016, supplementary; Lim et al. 2017)."""

    def __init__(self, channels: int, residual_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 3)
        self.conv2 = _conv(channels, channels, 3)
        self.residual_scale = residual_scale

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLU: the convolution's backward does not need its output.
        residual = self.conv2(F.relu(self.conv1(x), inplace=True))
        if self.residual_scale != 1.0:  # skip a full-size multiply by one
            residual = residual * self.residual_scale
        return x + residual


def icnr_(weight: Tensor, scale: int = 2) -> None:
    """ICNR init (Aitken et al. 2017) in place: a sub-pixel conv weight of shape
    (C * scale^2, C_in, k, k) gets the same kernel for each of the scale^2 sub-pixels."""
    out_channels, in_channels, kh, kw = weight.shape
    subkernel = torch.empty(out_channels // (scale * scale), in_channels, kh, kw)
    nn.init.kaiming_normal_(subkernel, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
    with torch.no_grad():
        weight.copy_(subkernel.repeat_interleave(scale * scale, dim=0))


def _leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, NEGATIVE_SLOPE)


class Upsample2x(nn.Module):
    """x2 upsampling followed by LeakyReLU(0.2): resize-convolution or ICNR sub-pixel
    convolution. Leaky, as in ESRGAN's resize-convolution upsampler (Wang et al. 2018): with
    a plain ReLU the stage feeding the output convolution dies in the first steps (the
    untrained residual only hurts, and zeroing every unit is the quickest way to silence it),
    after which nothing can learn."""

    def __init__(self, channels: int, mode: Upsample, out_channels: int | None = None) -> None:
        super().__init__()
        if mode not in ("nearest", "pixelshuffle"):
            raise ValueError(f"upsample must be 'nearest' or 'pixelshuffle', got {mode!r}")
        self.mode = mode
        out_channels = out_channels or channels
        if mode == "nearest":
            self.conv = _conv(channels, out_channels, 3)
        else:
            self.conv = _conv(channels, out_channels * 4, 3)
            icnr_(self.conv.weight)
            assert self.conv.bias is not None
            nn.init.zeros_(self.conv.bias)

        self.folded: FoldedResizeConv | None = None

    def fold_for_inference(self) -> None:
        """Resize-convolution computed at the low resolution (training.nets.folding):
        the same output, 2.25x fewer multiply-adds. Inference only."""
        if self.mode == "nearest" and self.folded is None:
            self.folded = FoldedResizeConv(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.folded is not None and not self.training:
            y = self.folded(x)
        elif self.mode == "nearest":
            y = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        return F.leaky_relu(y, NEGATIVE_SLOPE)


class SuperResolutionNet(nn.Module):
    """Residual 4x SR network: features at low resolution, two x2 upsamplings, 9x9 out.

    Args:
        width: channels of the low-resolution trunk and of the first (x2) upsampling stage.
        blocks: number of residual blocks.
        tail_width: channels at full resolution (the second upsampling stage, which feeds
            the 9x9 output convolution); default ``width // 2``. Full resolution is 16x the
            pixels of the trunk, so this is where most of the compute goes.
        upsample: ``"nearest"`` (resize-convolution) or ``"pixelshuffle"`` (ICNR).
        residual_scale: multiplier on each block's residual branch (EDSR).
        output_init_scale: the output convolution's initial weights are scaled by this, so
            that the untrained network is close to plain bicubic upsampling.
    """

    scale = 4

    def __init__(self, width: int = 32, blocks: int = 5, upsample: Upsample = "nearest",
                 tail_width: int | None = None, residual_scale: float = 1.0,
                 output_init_scale: float = 0.1) -> None:
        super().__init__()
        tail_width = tail_width or max(1, width // 2)
        if width < 1 or blocks < 0 or tail_width < 1:
            raise ValueError(f"width and tail_width must be >= 1 and blocks >= 0, got "
                             f"{width}, {tail_width}, {blocks}")
        self.head = _conv(3, width, 9)
        self.blocks = nn.Sequential(*(ResidualBlock(width, residual_scale) for _ in range(blocks)))
        self.body_out = _conv(width, width, 3)
        self.up1 = Upsample2x(width, upsample)
        self.up2 = Upsample2x(width, upsample, tail_width)
        self.tail = _conv(tail_width, 3, 9)
        with torch.no_grad():
            self.tail.weight.mul_(output_init_scale)
            assert self.tail.bias is not None
            self.tail.bias.zero_()
        self.folded_tail: FoldedUpsampleConv | None = None

    def fold_for_inference(self) -> None:
        """The second upsampling and the output convolution computed on the parity groups
        at the trunk's 2x resolution (training.nets.folding.FoldedUpsampleConv): the
        full-resolution activation is never built. Inference only."""
        self.up2.fold_for_inference()
        if self.up2.folded is not None and self.folded_tail is None:
            self.folded_tail = FoldedUpsampleConv.from_padded_conv(
                self.up2.folded, self.tail, activation=_leaky_relu)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, h, w) RGB batch, got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 5:
            raise ValueError(f"input must be at least 5x5 pixels, got {tuple(x.shape[-2:])}")
        base = bicubic_upscale(x, self.scale)
        features = self.head(x)  # no activation before the long skip (EDSR)
        features = features + self.body_out(self.blocks(features))  # long skip (EDSR)
        if self.folded_tail is not None and not self.training:
            residual = self.folded_tail(self.up1(features))
        else:
            residual = self.tail(self.up2(self.up1(features)))
        out = base + residual.to(base.dtype)
        return out if self.training else out.clamp(0.0, 1.0)


def bicubic_upscale(x: Tensor, scale: int) -> Tensor:
    """``x`` (N, C, h, w) upscaled ``scale`` times by bicubic interpolation, in ``x``'s
    memory format. PyTorch's CPU bicubic kernel is faster on an NCHW-contiguous input
    than on a channels_last one (the served layout), for the same numbers bit for bit: a
    channels_last input is made contiguous for it and the result put back in
    channels_last, so that the residual added to it shares its layout. With both copies,
    a 272-pixel tile's base was 1.3-1.7x faster on the 2-core CPU (1-2 threads; level to
    1.6x at 64 px). Other inputs, and CUDA ones (not measured there: the two copies are
    not taken on faith), go as they are."""
    channels_last = (x.device.type == "cpu" and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last))
    source = x.contiguous() if channels_last else x
    base = F.interpolate(source, scale_factor=float(scale), mode="bicubic", align_corners=False)
    return base.contiguous(memory_format=torch.channels_last) if channels_last else base


@register("superres-resnet")
def superres_resnet(width: int = 32, blocks: int = 5, upsample: Upsample = "nearest",
                    tail_width: int | None = None, residual_scale: float = 1.0,
                    output_init_scale: float = 0.1) -> SuperResolutionNet:
    """``{"type": "superres-resnet", "width": 32, "blocks": 5, "upsample": "nearest"}``."""
    return SuperResolutionNet(width=width, blocks=blocks, upsample=upsample,
                              tail_width=tail_width, residual_scale=residual_scale,
                              output_init_scale=output_init_scale)
