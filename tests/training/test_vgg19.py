"""VGG19 feature extractor: the quantised ImageNet weights load into the right shapes, and
they are really ImageNet-trained (their deep features agree with an independent ImageNet
classifier's far better than a randomly initialised VGG19's do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from training.nets.efficientnet_lite import load_efficientnet_lite0, resize_and_centre_crop
from training.nets.vgg19 import (
    TAP_CHANNELS,
    TAP_STRIDE,
    VGG19_LAYERS,
    VGG19Features,
    load_vgg19,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Real photos (and real greyscale photos/textures) bundled with scikit-image.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins", "moon", "brick", "grass",
          "gravel", "cell", "page", "text")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = np.ascontiguousarray(array[..., :3])
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019, eq. 6) of (n, p), (n, q)."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_layer_names_and_tap_shapes() -> None:
    assert len(VGG19_LAYERS) == 16
    assert VGG19_LAYERS[0] == "relu1_1" and VGG19_LAYERS[-1] == "relu5_4"
    vgg = load_vgg19()
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        out = vgg(x, ["relu1_1", "relu2_2", "relu3_4", "relu4_2", "relu5_1"])
    assert list(out) == ["relu1_1", "relu2_2", "relu3_4", "relu4_2", "relu5_1"]
    for name, fmap in out.items():
        stride = TAP_STRIDE[name]
        assert fmap.shape == (2, TAP_CHANNELS[name], 64 // stride, 48 // stride), name
        assert bool((fmap >= 0).all())  # after a ReLU


def test_frozen_eval_and_cached() -> None:
    vgg = load_vgg19()
    assert vgg is load_vgg19()
    assert not vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())
    assert sum(p.numel() for p in vgg.parameters()) == 20_024_384  # VGG19 conv layers


def test_returns_only_requested_taps_and_stops_early() -> None:
    vgg = load_vgg19()
    x = torch.rand(1, 3, 32, 32)
    calls: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
             for name, module in vgg.convs.items()]
    try:
        with torch.no_grad():
            out = vgg(x, ["relu2_1"])
    finally:
        for hook in hooks:
            hook.remove()
    assert list(out) == ["relu2_1"]
    assert calls == ["block1_conv1", "block1_conv2", "block2_conv1"]


def test_unknown_layer_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"relu6_1.*valid layers: relu1_1, relu1_2"):
        load_vgg19()(torch.rand(1, 3, 16, 16), ["relu6_1"])


def test_caffe_preprocessing() -> None:
    vgg = load_vgg19()
    pixel = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)  # RGB
    bgr = vgg.preprocess(pixel).flatten().tolist()
    assert bgr == pytest.approx([0.6 * 255 - 103.939, 0.4 * 255 - 116.779, 0.2 * 255 - 123.68],
                                abs=1e-3)


def test_avg_pooling_variant_shares_the_weights() -> None:
    vgg_avg = load_vgg19(pooling="avg")
    assert vgg_avg.pooling == "avg"
    weight_avg = vgg_avg.convs["block3_conv1"].weight
    weight_max = load_vgg19().convs["block3_conv1"].weight
    assert isinstance(weight_avg, torch.Tensor) and isinstance(weight_max, torch.Tensor)
    assert torch.equal(weight_avg, weight_max)
    with torch.no_grad():
        out = vgg_avg(torch.rand(1, 3, 32, 32), ["relu3_1"])["relu3_1"]
    assert out.shape == (1, 256, 8, 8)


@pytest.mark.slow
def test_weights_are_imagenet_trained_by_cka_with_an_imagenet_classifier() -> None:
    """Linear CKA between VGG relu5_1 pooled features and EfficientNet-Lite0's pooled
    features over 16 real photos (VGG at 96 px, EfficientNet at 224 px). Measured on this
    set: trained 0.738; four random VGG19 seeds 0.291-0.298 (at 128-224 px: trained
    0.61-0.73, random 0.25-0.29). Random weights cannot pass the margin."""
    photos = [as_tensor(getattr(data, name)()) for name in PHOTOS]
    with torch.no_grad():
        reference = load_efficientnet_lite0().features(
            torch.stack([resize_and_centre_crop(p, 224) for p in photos]))
        batch = torch.stack([resize_and_centre_crop(p, 96) for p in photos])
        trained = load_vgg19()(batch, ["relu5_1"])["relu5_1"].mean(dim=(2, 3))
        torch.manual_seed(0)
        random_vgg = VGG19Features().eval()
        random = random_vgg(batch, ["relu5_1"])["relu5_1"].mean(dim=(2, 3))
    cka_trained = linear_cka(trained, reference)
    cka_random = linear_cka(random, reference)
    print(f"linear CKA with EfficientNet-Lite0: trained VGG19 {cka_trained:.3f}, "
          f"random VGG19 {cka_random:.3f}")
    assert cka_trained > 0.6
    assert cka_trained > cka_random + 0.3
