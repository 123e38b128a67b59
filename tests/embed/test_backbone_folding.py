"""EfficientNet-Lite0 with its BatchNorms folded into the convolutions
(training.nets.efficientnet_lite.fold_batch_norms), as the Embedding service serves it:
the same features and logits on real photos, no BatchNorm left, and the shared module
that training code uses left as it was."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from services.embed.preprocess import preprocess
from services.embed.service import serving_backbone
from training.nets.efficientnet_lite import (
    EfficientNetLite0,
    fold_batch_norms,
    load_efficientnet_lite0,
)


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-image's cat, astronaut and coffee cup, as the service feeds them: (3, 3,
    224, 224) in [0, 1]."""
    from skimage import data

    squares = [preprocess(np.asarray(image())) for image in (data.chelsea, data.astronaut,
                                                             data.coffee)]
    return torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).float().div(255.0)


@pytest.fixture(scope="module")
def plain(one_torch_thread: None) -> Iterator[EfficientNetLite0]:
    yield load_efficientnet_lite0("cpu")


def test_folded_features_and_logits_match_the_original(plain: EfficientNetLite0,
                                                       photos: torch.Tensor) -> None:
    folded = fold_batch_norms(plain)
    with torch.inference_mode():
        features, folded_features = plain.features(photos), folded.features(photos)
        logits, folded_logits = plain(photos), folded(photos)
    assert float((features - folded_features).abs().max()) <= 1e-4
    assert float((logits - folded_logits).abs().max()) <= 1e-3
    assert torch.equal(logits.argmax(1), folded_logits.argmax(1))


def test_no_batch_norm_is_left_and_the_shared_module_keeps_its_own(
        plain: EfficientNetLite0) -> None:
    folded = fold_batch_norms(plain)
    assert _batch_norms(folded) == 0 and not folded.training
    assert _batch_norms(plain) == 49  # stem, head, and 47 in the blocks
    assert load_efficientnet_lite0("cpu") is plain  # still the cached, unchanged module
    assert all(not p.requires_grad for p in folded.parameters())
    with pytest.raises(TypeError, match="folded already"):
        fold_batch_norms(folded)


def test_the_service_serves_a_folded_copy(plain: EfficientNetLite0) -> None:
    served = serving_backbone(torch.device("cpu"))
    assert _batch_norms(served) == 0
    assert served is not plain and _batch_norms(plain) == 49
