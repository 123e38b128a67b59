"""EfficientNet-Lite0: our model code loads the pip package's ImageNet weights strictly and
classifies real photos correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from training.nets.efficientnet_lite import (
    Conv2dSame,
    EfficientNetLite0,
    imagenet_labels,
    load_efficientnet_lite0,
    resize_and_centre_crop,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def top5() -> dict[str, list[str]]:
    names = ("chelsea", "coffee", "rocket")
    batch = torch.stack([resize_and_centre_crop(as_tensor(getattr(data, n)())) for n in names])
    with torch.no_grad():
        logits = load_efficientnet_lite0()(batch)
    assert logits.shape == (3, 1000)
    labels = imagenet_labels()
    result = {name: [labels[i][1][0] for i in row.topk(5).indices.tolist()]
              for name, row in zip(names, logits, strict=True)}
    print(result)
    return result


def test_cat_photo(top5: dict[str, list[str]]) -> None:
    # Measured: Egyptian cat, tiger cat, tabby, lynx, plastic bag.
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5["chelsea"][:3])


def test_coffee_photo(top5: dict[str, list[str]]) -> None:
    # Measured: espresso (p=0.94), cup, consomme, coffee mug, soup bowl.
    assert top5["coffee"][0] == "espresso"
    assert {"cup", "coffee mug"} & set(top5["coffee"])


def test_rocket_photo(top5: dict[str, list[str]]) -> None:
    # Measured: missile, drilling platform, projectile, space shuttle, crane.
    assert {"missile", "projectile", "space shuttle"} & set(top5["rocket"][:3])


def test_labels_follow_the_imagenet_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == ("n01440764", ("tench", "Tinca tinca"))
    assert labels[281][0] == "n02123045" and labels[281][1][0] == "tabby"
    assert len({wnid for wnid, _ in labels}) == 1000


def test_features_shape_and_frozen() -> None:
    model = load_efficientnet_lite0()
    assert model is load_efficientnet_lite0()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        feats = model.features(torch.rand(2, 3, 224, 224))
    assert feats.shape == (2, 1280)
    assert bool((feats >= 0).all()) and bool((feats <= 6).all())  # pooled ReLU6


def test_state_dict_keys_match_exactly() -> None:
    from training.assets import efficientnet_lite0_weights_path

    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert set(EfficientNetLite0().state_dict()) == set(state)


def test_same_padding_is_tensorflow_style() -> None:
    # 224 input, 3x3 stride 2: output 112, total padding 1, all of it after (bottom/right).
    assert Conv2dSame._same_padding(224, 3, 2) == (0, 1)
    assert Conv2dSame._same_padding(225, 3, 2) == (1, 1)
    assert Conv2dSame._same_padding(28, 5, 2) == (1, 2)
    conv = Conv2dSame(1, 1, 3, stride=2)
    assert conv(torch.rand(1, 1, 15, 16)).shape == (1, 1, 8, 8)


def test_resize_and_centre_crop_never_pads() -> None:
    image = torch.rand(3, 300, 451)
    out = resize_and_centre_crop(image, 224)
    assert out.shape == (3, 224, 224)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # A tall image: the shortest side (width) becomes 224, the height is cropped.
    tall = torch.zeros(1, 3, 400, 100)
    tall[..., :, :] = torch.linspace(0, 1, 400).view(1, 1, 400, 1)
    cropped = resize_and_centre_crop(tall, 224)
    assert cropped.shape == (1, 3, 224, 224)
    assert 0.3 < float(cropped[0, 0, 0, 0]) < 0.4 and 0.6 < float(cropped[0, 0, -1, 0]) < 0.7
