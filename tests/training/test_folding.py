"""The inference-time resize-convolution fold (training.nets.folding) computes the same
function as the layers it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from training import nets
from training.nets.folding import FoldedResizeConv, fold_for_inference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _resize_conv(conv: nn.Conv2d, x: torch.Tensor, mode: str) -> torch.Tensor:
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return conv(F.pad(up, (1, 1, 1, 1), mode=mode))


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 5, 1, 3), (1, 5, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_layer_equals_resize_convolution(mode: str, shape: tuple[int, ...],
                                                channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 6, 3)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _resize_conv(conv, x, mode)
    folded = FoldedResizeConv(conv)(x)
    assert folded.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert folded.is_contiguous(memory_format=torch.channels_last)


def test_only_3x3_stride_1_convolutions_fold() -> None:
    with pytest.raises(ValueError, match="3x3, stride-1"):
        FoldedResizeConv(nn.Conv2d(4, 4, 5))
    with pytest.raises(ValueError, match="3x3, stride-1"):
        FoldedResizeConv(nn.Conv2d(4, 4, 3, stride=2))


@pytest.mark.parametrize("architecture", [
    {"type": "superres-resnet", "width": 8, "blocks": 2},
    {"type": "johnson-transformer", "width": 8, "blocks": 2},
])
def test_folded_networks_match_the_trained_form(architecture: dict[str, object]) -> None:
    torch.manual_seed(0)
    net = nets.build(architecture).eval()
    for module in net.modules():  # make the convolutions matter (not just their init)
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
    x = torch.rand(2, 3, 21, 30)
    tolerance = {"rtol": 1e-4, "atol": 1e-3}  # float rounding; an 8-bit step is 3.9e-3
    with torch.inference_mode():
        expected = net(x)
    folded = fold_for_inference(net)
    assert sum(isinstance(m, FoldedResizeConv) for m in folded.modules()) == 2
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), expected, **tolerance)
        cl = folded.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)),
                                   expected, **tolerance)


def test_training_mode_uses_the_unfolded_layers() -> None:
    net = fold_for_inference(nets.build({"type": "superres-resnet", "width": 8,
                                         "blocks": 1}).eval())
    net.train()
    loss = net(torch.rand(1, 3, 8, 8)).mean()
    loss.backward()
    assert net.up1.conv.weight.grad is not None


def test_bilinear_resize_convolutions_are_left_unfolded() -> None:
    """Only nearest-neighbour resize-convolution has the exact low-resolution form."""
    torch.manual_seed(0)
    net = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1,
                      "upsample": "bilinear"}).eval()
    x = torch.rand(1, 3, 20, 24)
    with torch.inference_mode():
        expected = net(x)
        folded = fold_for_inference(net)
        assert not any(isinstance(m, FoldedResizeConv) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected)
    with pytest.raises(ValueError, match="upsample"):
        nets.build({"type": "johnson-transformer", "upsample": "bicubic"})
