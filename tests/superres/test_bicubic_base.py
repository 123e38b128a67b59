"""The super-resolution net's bicubic base (training.nets.superres.bicubic_upscale): the
same numbers as F.interpolate, computed from an NCHW-contiguous input (PyTorch's faster
CPU kernel) and handed back in the input's memory format."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from training.nets.superres import bicubic_upscale, superres_resnet


def _reference(x: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """F.interpolate on the contiguous input: what the base must equal, bit for bit."""
    return F.interpolate(x.contiguous(), scale_factor=float(scale), mode="bicubic",
                         align_corners=False)


def _image(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (2, 3, 64, 48)])
def test_a_channels_last_input_gives_the_same_numbers_in_channels_last(
        shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _image(shape, dtype).contiguous(memory_format=torch.channels_last)
    base = bicubic_upscale(x, 4)
    assert torch.equal(base, _reference(x))
    # and what F.interpolate gives from channels_last itself (the computation before)
    assert torch.equal(base, F.interpolate(x, scale_factor=4.0, mode="bicubic",
                                           align_corners=False))
    assert base.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (2, 3, 64, 48)])
def test_a_contiguous_input_is_upscaled_as_it_is(shape: tuple[int, ...]) -> None:
    x = _image(shape)
    base = bicubic_upscale(x, 4)
    assert torch.equal(base, _reference(x)) and base.is_contiguous()


def test_the_net_gives_the_same_output_for_either_layout() -> None:
    """The whole net in eval mode: its bicubic base is no longer where the layouts part
    (the convolutions may still round differently: a float tolerance)."""
    torch.manual_seed(0)
    net = superres_resnet(width=8, blocks=1).eval()
    x = _image((1, 3, 20, 24))
    with torch.inference_mode():
        contiguous = net(x)
        channels_last = net.to(memory_format=torch.channels_last)(  # type: ignore[call-overload]
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, contiguous, rtol=0, atol=1e-5)
