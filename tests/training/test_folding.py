"""The inference-time resize-convolution fold (training.nets.folding) computes the same
function as the layers it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from training import nets
from training.nets.folding import (
    ChannelPaddedConv,
    FoldedBilinearResizeConv,
    FoldedResizeConv,
    FoldedUpsampleConv,
    InferenceInstanceNorm,
    SpaceToDepthConv,
    _gathered_pad_groups,
    _reflect_pad_groups,
    fold_for_inference,
    for_compile_on_cuda,
)

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


def _affine_norm(channels: int) -> nn.InstanceNorm2d:
    """An instance norm whose affine parameters matter (not their init)."""
    norm = nn.InstanceNorm2d(channels, affine=True)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm


def _bilinear_resize_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return conv(F.pad(up, (1, 1, 1, 1), mode="reflect"))


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 5, 1, 3), (1, 5, 2, 2), (1, 5, 1, 1),
                                   (1, 5, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bilinear_resize_convolution_folds_exactly(shape: tuple[int, ...],
                                                   channels_last: bool) -> None:
    """Borders included: the outermost rows and columns, where the layer's reflection
    differs from the folded form's replication, are computed exactly."""
    torch.manual_seed(3)
    conv = nn.Conv2d(shape[1], 6, 3)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _bilinear_resize_conv(conv, x)
    with torch.inference_mode():
        folded = FoldedBilinearResizeConv(conv)(x)
    assert folded.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    if channels_last and shape[2] * shape[3] > 1:  # a 1x1 map is both formats at once
        assert folded.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 4, 10, 7), (1, 4, 3, 3)])
def test_the_output_layer_folds_after_a_bilinear_resize_convolution(
        shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    resize, norm, output = nn.Conv2d(4, 6, 3), _affine_norm(6), nn.Conv2d(6, 3, 9)
    x = torch.randn(shape)
    with torch.inference_mode():
        up = F.relu(norm(_bilinear_resize_conv(resize, x)))
        expected = output(F.pad(up, (4, 4, 4, 4), mode="reflect"))
        folded = FoldedUpsampleConv(FoldedBilinearResizeConv(resize), output, pad=4,
                                    activation=F.relu, norm=norm)(x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [3, 5, 7, 9])
@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 4, 3, 3), (1, 4, 12, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_convolution_after_the_upsampling_folds_onto_the_parity_groups(
        kernel: int, shape: tuple[int, ...], channels_last: bool) -> None:
    """The output layer computed on the four parity groups at the low resolution equals
    conv(reflect_pad(activation(resize_conv(x)))) at the 2x resolution, borders included."""
    torch.manual_seed(kernel)
    resize = nn.Conv2d(shape[1], 5, 3)
    output = nn.Conv2d(5, 3, kernel, padding=kernel // 2, padding_mode="reflect")
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def activation(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, 0.2)

    expected = output(activation(_resize_conv(resize, x, "reflect")))
    folded = FoldedUpsampleConv.from_padded_conv(FoldedResizeConv(resize), output,
                                                 activation=activation)(x)
    assert folded.shape == expected.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


def test_only_reflection_padded_odd_convolutions_fold_after_the_upsampling() -> None:
    resize = FoldedResizeConv(nn.Conv2d(4, 4, 3))
    for conv in (nn.Conv2d(4, 3, 9, padding=4),  # zero padding
                 nn.Conv2d(4, 3, 4, padding=2, padding_mode="reflect"),  # even kernel
                 nn.Conv2d(4, 3, 9, padding=4, padding_mode="reflect", stride=2),
                 nn.Conv2d(5, 3, 9, padding=4, padding_mode="reflect")):  # channel mismatch
        with pytest.raises(ValueError, match="odd square"):
            FoldedUpsampleConv.from_padded_conv(resize, conv, activation=F.relu)
    # A 2-pixel-wide upsampled image cannot be reflected by 4 (nor can the unfolded layer).
    folded = FoldedUpsampleConv.from_padded_conv(
        resize, nn.Conv2d(4, 3, 9, padding=4, padding_mode="reflect"), activation=F.relu)
    with pytest.raises(ValueError, match="too small to reflect"):
        folded(torch.rand(1, 4, 1, 8))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_instance_norm_equals_instance_norm(affine: bool,
                                                      channels_last: bool) -> None:
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(6, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(3, 6, 9, 11) * 4 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(InferenceInstanceNorm(norm)(x), norm(x), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        InferenceInstanceNorm(nn.InstanceNorm2d(6, track_running_stats=True))


def test_the_output_layer_folds_with_instance_norm_between() -> None:
    """The style net's last stage: resize-conv, instance norm over the whole upsampled image
    (all four parity groups), ReLU, reflection-padded 9x9 convolution."""
    torch.manual_seed(1)
    resize, norm, output = nn.Conv2d(4, 6, 3), _affine_norm(6), nn.Conv2d(6, 3, 9)
    x = torch.randn(2, 4, 10, 7)
    with torch.inference_mode():
        up = F.relu(norm(_resize_conv(resize, x, "reflect")))
        expected = output(F.pad(up, (4, 4, 4, 4), mode="reflect"))
        folded = FoldedUpsampleConv(FoldedResizeConv(resize), output, pad=4, activation=F.relu,
                                    norm=norm)(x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", [FoldedResizeConv, FoldedBilinearResizeConv])
def test_only_3x3_stride_1_convolutions_fold(fold: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match="3x3, stride-1"):
        fold(nn.Conv2d(4, 4, 5))
    with pytest.raises(ValueError, match="3x3, stride-1"):
        fold(nn.Conv2d(4, 4, 3, stride=2))


@pytest.mark.parametrize("architecture", [
    {"type": "superres-resnet", "width": 8, "blocks": 2},
    {"type": "johnson-transformer", "width": 8, "blocks": 2},
    {"type": "johnson-transformer", "width": 8, "blocks": 2, "upsample": "bilinear"},
])
def test_folded_networks_match_the_trained_form(architecture: dict[str, object]) -> None:
    torch.manual_seed(0)
    net = nets.build(architecture).eval()
    for module in net.modules():  # make the layers matter (not just their init)
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
        if isinstance(module, nn.InstanceNorm2d):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    x = torch.rand(2, 3, 21, 30)
    tolerance = {"rtol": 1e-4, "atol": 1e-3}  # float rounding; an 8-bit step is 3.9e-3
    with torch.inference_mode():
        expected = net(x)
    folded = fold_for_inference(net)
    resize_kind = FoldedBilinearResizeConv if architecture.get("upsample") == "bilinear" \
        else FoldedResizeConv
    assert sum(isinstance(m, resize_kind) for m in folded.modules()) == 2
    # The output layer too (after the last upsampling; the style net's with its norm).
    assert sum(isinstance(m, FoldedUpsampleConv) for m in folded.modules()) == 1
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


def test_unknown_upsampling_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="upsample"):
        nets.build({"type": "johnson-transformer", "upsample": "bicubic"})


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
def test_gathered_padding_equals_the_in_place_one(q: int, affine: bool) -> None:
    """The functional padding the traced layer uses (one gather per group) writes what the
    in-place one writes: interior, reflected borders, corners and the normalisation."""
    torch.manual_seed(q)
    groups = [torch.randn(2, 5, 7, 3) for _ in range(4)]
    scale_shift = (torch.randn(2, 12), torch.randn(2, 12)) if affine else None
    expected = _reflect_pad_groups(groups, q, scale_shift)
    gathered = _gathered_pad_groups(groups, q, scale_shift)
    assert gathered.shape == expected.shape == (2, 5 + 2 * q, 7 + 2 * q, 12)
    torch.testing.assert_close(gathered, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_the_traced_output_layer_compiles_whole_and_equals_the_eager_one(upsample: str
                                                                         ) -> None:
    """``traced_by_compile`` lets torch.compile take the folded output layer into the graph
    (one graph, no break), with the same output as the default layer run eagerly."""
    torch.manual_seed(0)
    net = fold_for_inference(nets.build({"type": "johnson-transformer", "width": 4,
                                         "blocks": 1, "upsample": upsample}).eval())
    for module in net.modules():
        if isinstance(module, InferenceInstanceNorm):
            nn.init.normal_(module.norm.weight)
            nn.init.normal_(module.norm.bias)
    x = torch.rand(1, 3, 20, 28)
    with torch.inference_mode():
        expected = net(x)
    layer = net.folded_output
    assert layer is not None
    assert _graphs_and_breaks(net, x)[1] == 1  # the eager layer
    layer.traced_by_compile = True
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert _graphs_and_breaks(net, x) == (1, 0)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(net, dynamic=False)(x), expected,
                                   rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize(("in_channels", "stride", "padding"), [(3, 1, 0), (3, 2, 4), (8, 1, 1)])
def test_a_convolution_with_padded_input_channels_is_the_same_convolution(
        in_channels: int, stride: int, padding: int) -> None:
    torch.manual_seed(in_channels)
    conv = nn.Conv2d(in_channels, 5, 9 if in_channels == 3 else 3, stride=stride,
                     padding=padding)
    x = torch.randn(2, in_channels, 21, 17)
    padded = ChannelPaddedConv(conv)
    assert padded.weight.shape[1] == 8
    with torch.inference_mode():
        torch.testing.assert_close(padded(x), conv(x), rtol=1e-5, atol=1e-5)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(padded(channels_last), conv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ungrouped"):
        ChannelPaddedConv(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize(("kernel", "shape"), [(9, (2, 3, 20, 26)), (3, (1, 4, 8, 6)),
                                               (9, (1, 3, 19, 26))])
def test_space_to_depth_convolution_is_the_same_convolution(kernel: int,
                                                            shape: tuple[int, ...]) -> None:
    """Odd sides (the last case) take the original convolution."""
    torch.manual_seed(kernel)
    conv = nn.Conv2d(shape[1], 5, kernel)
    x = torch.randn(shape)
    folded = SpaceToDepthConv(conv)
    channels = -(-4 * shape[1] // 8) * 8  # up to a multiple of 8
    assert folded.weight.shape == (20, channels, kernel // 2 + 1, kernel // 2 + 1)
    with torch.inference_mode():
        expected = conv(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(x.contiguous(memory_format=torch.channels_last)),
                                   expected, rtol=1e-5, atol=1e-5)
    for refused in (nn.Conv2d(3, 5, 4), nn.Conv2d(3, 5, 9, stride=2),
                    nn.Conv2d(3, 5, 9, padding=4)):
        with pytest.raises(ValueError, match="space-to-depth"):
            SpaceToDepthConv(refused)


def test_the_cuda_compile_forms_compile_whole_and_equal_the_folded_net() -> None:
    """for_compile_on_cuda: the output layer traced and the 3-channel 9x9 first layer as
    space-to-depth; one graph under torch.compile, the folded net's output, and a second
    call changes nothing."""
    torch.manual_seed(2)
    net = fold_for_inference(nets.build({"type": "johnson-transformer", "width": 8,
                                         "blocks": 1}).eval())
    x = torch.rand(1, 3, 24, 20)
    with torch.inference_mode():
        expected = net(x)
    for_compile_on_cuda(net)
    for_compile_on_cuda(net)
    first = net.encoder[0][0].conv
    assert isinstance(first, SpaceToDepthConv) and type(first.conv) is nn.Conv2d
    assert sum(isinstance(m, SpaceToDepthConv) for m in net.modules()) == 1
    assert net.folded_output is not None and net.folded_output.traced_by_compile
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert _graphs_and_breaks(net, x) == (1, 0)


def _graphs_and_breaks(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(graphs, graph breaks) torch.compile's dynamo makes of ``net`` on ``x``."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(net)(x)
    finally:
        torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count
