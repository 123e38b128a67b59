"""The 4x SR network: shapes, contract, ICNR, and no checkerboard (measured on a photo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch import nn

from training import nets
from training.export import load_exported
from training.image_quality import rgb_to_y
from training.nets.superres import SuperResolutionNet

REPO = Path(__file__).resolve().parents[2]
TRAINED = ["superres-mse", "superres-psnr", "superres-perceptual"]


@pytest.mark.parametrize("upsample", ["nearest", "pixelshuffle"])
def test_output_shape_and_range(upsample: str) -> None:
    model = nets.build({"type": "superres-resnet", "width": 8, "blocks": 2,
                        "upsample": upsample})
    assert isinstance(model, SuperResolutionNet)
    x = torch.rand(2, 3, 9, 13)
    model.train()
    assert model(x).shape == (2, 3, 36, 52)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 36, 52)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_configurable_width_blocks_and_no_transposed_convolutions() -> None:
    small = nets.build({"type": "superres-resnet", "width": 8, "blocks": 1})
    big = nets.build({"type": "superres-resnet", "width": 16, "blocks": 4, "tail_width": 16})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) > 3 * count(small)
    assert isinstance(big, SuperResolutionNet) and len(big.blocks) == 4
    for model in (small, big):
        assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.padding_mode == "reflect" for c in convs)
        assert convs[0].kernel_size == (9, 9) and convs[-1].kernel_size == (9, 9)


def test_rejects_bad_input() -> None:
    model = nets.build({"type": "superres-resnet", "width": 4, "blocks": 1})
    with pytest.raises(ValueError, match="RGB"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="5x5"):
        model(torch.rand(1, 3, 4, 16))


def test_untrained_model_starts_near_bicubic() -> None:
    """Output = bicubic + a small residual at init, so training starts from the baseline."""
    torch.manual_seed(0)
    model = nets.build({"type": "superres-resnet", "width": 8, "blocks": 2}).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        bicubic = nn.functional.interpolate(x, scale_factor=4.0, mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        assert float((model(x) - bicubic).abs().mean()) < 0.05


def test_icnr_subpixels_start_identical() -> None:
    model = nets.build({"type": "superres-resnet", "width": 8, "blocks": 1,
                        "upsample": "pixelshuffle"})
    assert isinstance(model, SuperResolutionNet)
    weight = model.up1.conv.weight.detach()
    groups = weight.view(8, 4, *weight.shape[1:])
    assert torch.equal(groups, groups[:, :1].expand_as(groups))


# --- checkerboard: spectral energy at the Nyquist frequency, measured on a real photo ---

def _photo_pair() -> tuple[np.ndarray, np.ndarray]:
    hr = np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256),
                                                               Image.Resampling.BICUBIC))
    lr = np.asarray(Image.fromarray(hr).resize((64, 64), Image.Resampling.BICUBIC))
    return lr, hr


def nyquist_fraction(image: np.ndarray) -> float:
    """Share of the luma's (mean-removed) spectral energy on the Nyquist row and column:
    where a period-2 checkerboard from stride-2 upsampling puts its energy."""
    y = rgb_to_y(image)
    power = np.abs(np.fft.fft2(y - y.mean())) ** 2
    n, m = y.shape[0] // 2, y.shape[1] // 2
    return float((power[n, :].sum() + power[:, m].sum() - power[n, m]) / power.sum())


def _upscale(model: nn.Module, lr: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255.0
        return model(x)[0].permute(1, 2, 0).double().numpy()


def _bicubic_fraction(lr: np.ndarray) -> float:
    bicubic = np.asarray(Image.fromarray(lr).resize((256, 256), Image.Resampling.BICUBIC))
    return nyquist_fraction(bicubic.astype(np.float64) / 255.0)


def _no_checkerboard(fraction: float, baseline: float) -> bool:
    return fraction <= 2.0 * baseline + 1e-5


class _TransposedUp(nn.Module):
    """What the network must not do: a stride-2 transposed convolution (the control)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, out_channels, 3, stride=2, padding=1,
                                       output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.mark.parametrize("upsample", ["nearest", "pixelshuffle"])
@pytest.mark.parametrize("output_init_scale", [0.1, 1.0])
def test_fresh_model_has_no_checkerboard(upsample: str, output_init_scale: float) -> None:
    lr, _ = _photo_pair()
    torch.manual_seed(1)
    model = nets.build({"type": "superres-resnet", "width": 32, "blocks": 5,
                        "upsample": upsample, "output_init_scale": output_init_scale})
    assert _no_checkerboard(nyquist_fraction(_upscale(model, lr)), _bicubic_fraction(lr))


def test_the_check_catches_transposed_convolutions() -> None:
    lr, _ = _photo_pair()
    torch.manual_seed(1)
    model = nets.build({"type": "superres-resnet", "width": 32, "blocks": 5,
                        "output_init_scale": 1.0})
    model.up1 = _TransposedUp(32, 32)  # type: ignore[assignment]
    model.up2 = _TransposedUp(32, 16)  # type: ignore[assignment]
    assert not _no_checkerboard(nyquist_fraction(_upscale(model, lr)), _bicubic_fraction(lr))


@pytest.mark.parametrize("name", TRAINED)
def test_trained_model_has_no_checkerboard(name: str) -> None:
    path = REPO / "models" / name
    if not (path / "config.json").is_file():
        pytest.skip(f"models/{name} is not trained")
    model, config = load_exported(path)
    assert config["task"] == "superres"
    lr, _ = _photo_pair()
    assert _no_checkerboard(nyquist_fraction(_upscale(model, lr)), _bicubic_fraction(lr))
