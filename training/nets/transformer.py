"""The image-transformation network for fast style transfer.

Johnson, Alahi & Fei-Fei 2016, "Perceptual Losses for Real-Time Style Transfer and
Super-Resolution" (ECCV), sec. 3.1 and the supplementary material (table 1): a 9x9
stride-1 convolution, two stride-2 3x3 convolutions, five residual blocks at 1/4
resolution, two x2 upsampling stages and a 9x9 output convolution with a scaled tanh.

With the fixes learned since the paper:

- Reflection padding on every convolution (instead of zero padding, or the paper's
  unpadded convolutions with cropped residual shortcuts), which avoids dark borders.
- Instance normalisation (Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The
  Missing Ingredient for Fast Stylization") instead of batch normalisation, with learned
  affine parameters.
- Residual blocks conv-IN-ReLU-conv-IN followed by the add, with **no activation after
  the add** (Gross & Wilber 2016, "Training and investigating Residual Nets"; the
  supplementary material of Johnson et al. shows the same block).
- Upsampling by nearest-neighbour x2 followed by a stride-1 convolution
  ("resize-convolution"; Odena, Dumoulin & Olah 2016, "Deconvolution and Checkerboard
  Artifacts", Distill) instead of a stride-1/2 transposed convolution, whose uneven
  kernel overlap paints checkerboard patterns.

Input and output: RGB in [0, 1], shape (N, 3, H, W), any H and W >= 1. Sizes that are not
a multiple of 4 (or smaller than 8) are padded reflectively and the output is cropped
back, so the output always has the input's size.

``edge_margin`` (inference only, 0 by default): a net trained on crops can still paint a
frame along the image border (the GPU-trained starry-night darkens its outer 3-5 px by up
to 50 levels); the input is then reflected by this many more pixels on each side and the
frame cropped away with them (8 px bring that frame to about 5 levels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.nets import register
from training.nets.folding import (
    FoldedBilinearResizeConv,
    FoldedResizeConv,
    FoldedUpsampleConv,
    InferenceInstanceNorm,
)

#: Interpolation before each upsampling convolution. Both put no energy at the new Nyquist
#: frequency; bilinear (a triangle kernel) also damps the spectral images near it, which
#: nearest (a box) leaves for the convolution and the ReLU to turn into a grid pattern.
UPSAMPLE_MODES = ("nearest", "bilinear")

#: The two stride-2 stages downsample by this factor; inputs are padded to a multiple.
DOWNSAMPLE = 4
#: Smallest padded side: the 1/4-resolution map must be at least 2 px for reflection pads.
MIN_PADDED_SIDE = 8


def _relu_in_place(x: Tensor) -> Tensor:
    return F.relu(x, inplace=True)


class ConvLayer(nn.Module):
    """Reflection padding + convolution (no zero padding anywhere in the network)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pad(x))


class ConvNormReLU(nn.Sequential):
    """ConvLayer -> InstanceNorm (affine) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1) -> None:
        super().__init__(
            ConvLayer(in_channels, out_channels, kernel_size, stride),
            nn.InstanceNorm2d(out_channels, affine=True),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))``: two 3x3 convolutions and nothing after the add
    (Johnson et al. 2016 supplementary, fig. 1; Gross & Wilber 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
            ConvLayer(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResizeConv(nn.Module):
    """Nearest-neighbour x``scale`` upsampling, then a stride-1 ConvLayer -> IN -> ReLU
    (resize-convolution; Odena et al. 2016). Every output pixel sees the same number of
    kernel taps, so there is no checkerboard."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 scale: int = 2, mode: str = "nearest") -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.scale = scale
        self.mode = mode
        self.block = ConvNormReLU(in_channels, out_channels, kernel_size)
        self.folded: FoldedResizeConv | FoldedBilinearResizeConv | None = None

    def fold_for_inference(self) -> None:
        """The upsampling and convolution computed at the low resolution
        (training.nets.folding): the same output, without the upsampled copy (and with
        2.25x fewer multiply-adds for nearest). Inference only; x2 with a 3x3 kernel."""
        if self.scale == 2 and self.folded is None:
            conv_layer = self.block[0]
            assert isinstance(conv_layer, ConvLayer)
            if conv_layer.conv.kernel_size == (3, 3):
                fold = FoldedResizeConv if self.mode == "nearest" else FoldedBilinearResizeConv
                self.folded = fold(conv_layer.conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.folded is not None and not self.training:
            norm, relu = self.block[1], self.block[2]
            return relu(norm(self.folded(x)))
        if self.mode == "bilinear":
            up = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.block(up)


def _pad_amounts(size: int) -> tuple[int, int]:
    """(before, after) padding that takes ``size`` to a multiple of 4 and at least 8."""
    target = max(MIN_PADDED_SIDE, -(-size // DOWNSAMPLE) * DOWNSAMPLE)
    extra = target - size
    return extra // 2, extra - extra // 2


class TransformerNet(nn.Module):
    """Johnson et al. 2016's image-transformation network (see the module docstring).

    ``width`` is the channel count of the full-resolution layers (32 in the paper); the
    1/2- and 1/4-resolution layers have 2x and 4x as many. ``blocks`` residual blocks (5 in
    the paper) run at 1/4 resolution.
    """

    def __init__(self, width: int = 32, blocks: int = 5, upsample: str = "nearest",
                 edge_margin: int = 0) -> None:
        super().__init__()
        if width < 1 or blocks < 0 or edge_margin < 0:
            raise ValueError("width must be >= 1, blocks and edge_margin >= 0, got "
                             f"{width}, {blocks}, {edge_margin}")
        self.width = width
        self.blocks = blocks
        self.upsample = upsample
        self.edge_margin = edge_margin
        self.encoder = nn.Sequential(
            ConvNormReLU(3, width, 9),
            ConvNormReLU(width, 2 * width, 3, stride=2),
            ConvNormReLU(2 * width, 4 * width, 3, stride=2),
        )
        self.residuals = nn.Sequential(*(ResidualBlock(4 * width) for _ in range(blocks)))
        self.decoder = nn.Sequential(
            ResizeConv(4 * width, 2 * width, mode=upsample),
            ResizeConv(2 * width, width, mode=upsample),
        )
        self.output = ConvLayer(width, 3, 9)
        self.folded_output: FoldedUpsampleConv | None = None

    def fold_for_inference(self) -> None:
        """Inference-only rewrites (training.nets.folding), outputs equal to float rounding:
        instance normalisation as one reduction and one multiply-add in any memory format,
        and the last upsampling, its normalisation and the 9x9 output convolution computed
        on the parity groups at half the resolution (the full-resolution activation is
        never built)."""
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.InstanceNorm2d):
                    setattr(module, name, InferenceInstanceNorm(child))
        last = self.decoder[-1]
        assert isinstance(last, ResizeConv)
        last.fold_for_inference()
        norm = last.block[1]
        if last.folded is not None and self.folded_output is None and \
                isinstance(norm, InferenceInstanceNorm):
            self.folded_output = FoldedUpsampleConv(
                last.folded, self.output.conv, pad=int(self.output.pad.padding[0]),
                activation=_relu_in_place, norm=norm.norm)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> stylised (N, 3, H, W) RGB in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) RGB batch, got shape {tuple(x.shape)}")
        margin = 0 if self.training else self.edge_margin
        if margin:
            # A separate constant pad (not folded into the multiple-of-4 one below): its
            # shape arithmetic stays simple enough for torch.compile's dynamic shapes
            # (folded together, inductor's CPU code generation failed on it).
            height, width = x.shape[-2:]
            mode = "reflect" if margin < min(height, width) else "replicate"
            y = self._any_size(F.pad(x, (margin, margin, margin, margin), mode=mode))
            return y[..., margin:margin + height, margin:margin + width]
        return self._any_size(x)

    def _any_size(self, x: Tensor) -> Tensor:
        """The net on any H x W: padded to a multiple of 4 (at least 8) and cropped back."""
        height, width = x.shape[-2:]
        top, bottom = _pad_amounts(height)
        left, right = _pad_amounts(width)
        padded = top or bottom or left or right
        if padded:
            # Reflection needs the pad to be smaller than the side; tiny inputs replicate.
            mode = "reflect" if max(top, bottom) < height and max(left, right) < width \
                else "replicate"
            x = F.pad(x, (left, right, top, bottom), mode=mode)
        features = self.residuals(self.encoder(x))
        if self.folded_output is not None and not self.training:
            y = self.folded_output(self.decoder[0](features))
        else:
            y = self.output(self.decoder(features))
        # Scaled tanh (Johnson et al. 2016, sec. 3.1), mapped to the [0, 1] pixel range.
        y = 0.5 * (torch.tanh(y) + 1.0)
        if padded:
            y = y[..., top:top + height, left:left + width]
        return y


@register("johnson-transformer")
def johnson_transformer(width: int = 32, blocks: int = 5, upsample: str = "nearest",
                        edge_margin: int = 0) -> TransformerNet:
    """``{"type": "johnson-transformer", "width": 32, "blocks": 5, "upsample": "nearest",
    "edge_margin": 0}`` (``upsample``: ``"nearest"`` or ``"bilinear"`` before each
    resize-convolution; ``edge_margin``: reflected pixels added on each side at inference
    and cropped away)."""
    return TransformerNet(width=width, blocks=blocks, upsample=upsample,
                          edge_margin=edge_margin)
