"""The fast style network (training.nets.transformer): shapes, structure, registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training import nets
from training.nets.transformer import ConvLayer, ResidualBlock, ResizeConv, TransformerNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net() -> TransformerNet:
    torch.manual_seed(0)
    module = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 2})
    assert isinstance(module, TransformerNet)
    return module.eval()


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 9), (16, 16), (33, 18), (50, 31)])
def test_output_has_the_input_size_and_pixel_range(net: TransformerNet,
                                                   size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_rejects_non_rgb_input(net: TransformerNet) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.rand(1, 1, 16, 16))


def test_padding_for_odd_sizes_is_cropped_back_consistently(net: TransformerNet) -> None:
    """The padded forward pass equals running the padded image and cropping: no
    misalignment (shift) between input and output pixels."""
    x = torch.rand(1, 3, 30, 22)  # pads to 32 x 24: one row/column each side
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():
        direct = net(x)
        manual = net(padded)[..., 1:31, 1:23]
    assert torch.allclose(direct, manual, atol=1e-5)


def test_paper_architecture_defaults() -> None:
    module = nets.build({"type": "johnson-transformer"})
    assert isinstance(module, TransformerNet)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    first, last = convs[0], convs[-1]
    assert first.kernel_size == (9, 9) and first.stride == (1, 1) and first.out_channels == 32
    assert last.kernel_size == (9, 9) and last.out_channels == 3
    assert [c.stride for c in convs].count((2, 2)) == 2
    assert len([m for m in module.modules() if isinstance(m, ResidualBlock)]) == 5
    assert len([m for m in module.modules() if isinstance(m, ResizeConv)]) == 2
    assert all(c.padding == (0, 0) for c in convs), "padding must be reflection, not zeros"
    assert all(m.affine for m in module.modules() if isinstance(m, nn.InstanceNorm2d))
    assert not [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert "johnson-transformer" in nets.architectures()


def test_no_transposed_convolution_anywhere() -> None:
    module = nets.build({"type": "johnson-transformer", "width": 8, "blocks": 3})
    transposed = [name for name, m in module.named_modules()
                  if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    assert transposed == []
    upsamplers = [m for m in module.modules() if isinstance(m, ResizeConv)]
    assert [u.scale for u in upsamplers] == [2, 2]


def test_residual_blocks_have_no_activation_after_the_add() -> None:
    torch.manual_seed(1)
    block = ResidualBlock(6).eval()
    assert isinstance(block.body[-1], nn.InstanceNorm2d), "the body must end in IN, not ReLU"
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        y = block(x)
        expected = x + block.body(x)
    assert torch.equal(y, expected), "block(x) must be exactly x + F(x)"
    assert float(y.min()) < 0, "a ReLU after the add would clamp negatives"


def test_widths_and_blocks_are_configurable() -> None:
    small = nets.build({"type": "johnson-transformer", "width": 8, "blocks": 1})
    big = nets.build({"type": "johnson-transformer", "width": 16, "blocks": 5})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(big)
    with pytest.raises(ValueError):
        nets.build({"type": "johnson-transformer", "width": 0})


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    module = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1})
    module(torch.rand(1, 3, 20, 20)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (33, 50), (64, 64)])
def test_edge_margin_keeps_the_input_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1,
                        "edge_margin": 8}).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, *size))
    assert y.shape == (2, 3, *size)


def test_edge_margin_is_a_reflected_border_cropped_away_at_inference() -> None:
    """With a margin, the output is the plain net's output on the input reflected by the
    margin, cropped back; in training mode the margin is off (the loss sees every pixel)."""
    torch.manual_seed(0)
    plain = TransformerNet(width=4, blocks=1).eval()
    margined = TransformerNet(width=4, blocks=1, edge_margin=8).eval()
    margined.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        expected = plain(torch.nn.functional.pad(x, (8, 8, 8, 8), mode="reflect"))
        torch.testing.assert_close(margined(x), expected[..., 8:-8, 8:-8])
        assert not torch.allclose(margined(x), plain(x), atol=1e-4)
        margined.train()
        plain.train()
        torch.testing.assert_close(margined(x), plain(x))


def test_edge_margin_survives_folding() -> None:
    from training.nets.folding import fold_for_inference

    torch.manual_seed(0)
    model = TransformerNet(width=4, blocks=1, edge_margin=8).eval()
    x = torch.rand(1, 3, 30, 26)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(fold_for_inference(model)(x), reference, atol=1e-5,
                                   rtol=1e-4)


def test_negative_edge_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="edge_margin"):
        TransformerNet(width=4, blocks=1, edge_margin=-1)


def test_every_convolution_is_preceded_by_a_reflection_pad_of_half_its_kernel() -> None:
    """Reflection padding as such (padding=0 alone would pass with zero-padding layers, or
    none): each conv's input goes through nn.ReflectionPad2d(kernel // 2) first."""
    module = nets.build({"type": "johnson-transformer", "width": 8, "blocks": 2})
    layers = [m for m in module.modules() if isinstance(m, ConvLayer)]
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == len(convs) > 0
    for layer in layers:
        assert isinstance(layer.pad, nn.ReflectionPad2d)
        assert layer.pad.padding == (layer.conv.kernel_size[0] // 2,) * 4
    assert not [m for m in module.modules()
                if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d))]


def test_the_output_is_a_scaled_tanh() -> None:
    """Johnson et al. sec. 3.1: the last conv's output goes through tanh, scaled to the
    [0, 1] pixel range: 0.5 * (tanh(y) + 1) of what the 9x9 output conv gives."""
    torch.manual_seed(0)
    module = nets.build({"type": "johnson-transformer", "width": 8, "blocks": 1}).eval()
    last = [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        out = module(torch.rand(1, 3, 32, 32))
    handle.remove()
    torch.testing.assert_close(out, 0.5 * (torch.tanh(seen[0]) + 1.0))
