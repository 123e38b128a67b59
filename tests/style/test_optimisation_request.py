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


def test_a_mask_of_another_shape_is_refused_naming_the_photo_as_sent() -> None:
    """The optimisation works on a copy no larger than max_size, whose size the caller
    never chose: the refusal names the photo's own size."""
    from services.common.errors import InvalidArgument

    photo = np.full((300, 451, 3), 128, np.uint8)
    request = style_pb2.StylizeWithImageRequest(
        content_image=encode(photo), style_image=encode(photo), max_size=64,
        mask=encode(np.full((512, 512, 3), 255, np.uint8)))
    with pytest.raises(InvalidArgument) as refused:
        parse_request(request, server_config("style"))
    assert str(refused.value).startswith(
        "mask aspect ratio 512x512 does not match the image's 451x300 ")
    assert refused.value.reason == "MASK_ASPECT_MISMATCH"
    fitting = request.__class__()
    fitting.CopyFrom(request)
    fitting.mask = encode(np.full((150, 226, 3), 255, np.uint8))  # 451x300, halved
    assert parse_request(fitting, server_config("style")).mask.shape == (1, 1, 43, 64)
