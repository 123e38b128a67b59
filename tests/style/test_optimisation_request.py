"""services/style/optimisation.py: what a StylizeWithImage request's images become before
the optimisation runs (the network-free part, so no VGG is loaded)."""

from __future__ import annotations

import numpy as np
import pytest

from percept.v1 import image_pb2, style_pb2
from services.common.alpha import over_white
from services.common.tensors import to_tensor
from services.style.optimisation import parse_request
from tests.conftest import encode, server_config


def _cut_out(photo: np.ndarray, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[16:-16, 24:-24] = 255
    alpha[15, 24:-24] = 100
    return np.where(alpha[..., None] > 0, photo, np.uint8(hidden)), alpha


@pytest.mark.parametrize("hidden", [0, 255])
def test_for_a_jpeg_result_both_images_are_taken_as_they_look_on_white(
        small_photo: np.ndarray, hidden: int) -> None:
    """JPEG holds no alpha, and a painting's statistics are those it shows: the content
    and the style image are each the image on white, whatever colour is hidden."""
    photo = small_photo  # at its own size: no resizing to compare through
    rgb, alpha = _cut_out(photo, hidden)
    request = style_pb2.StylizeWithImageRequest(
        content_image=encode(np.dstack([rgb, alpha])),
        style_image=encode(np.dstack([rgb[::-1], alpha[::-1]])),
        max_size=max(photo.shape[:2]), output_format=image_pb2.IMAGE_FORMAT_JPEG)
    job = parse_request(request, server_config("style"))
    assert job.content.shape == (1, 3, *photo.shape[:2])
    assert job.content.equal(to_tensor(over_white(photo, alpha)))
    assert job.style.equal(to_tensor(over_white(photo[::-1], alpha[::-1])))
