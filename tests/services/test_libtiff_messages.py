"""libtiff's messages about a damaged TIFF reach the client's error, never the process's
stderr (services/common/libtiff_messages.py), through the libtiff Pillow loaded."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from PIL import Image

from services.common import libtiff_messages
from services.common.errors import InvalidArgument
from services.common.images import decode_image
from tests.fixtures import bad_images

CAP = 64_000_000


@pytest.fixture(scope="module")
def libtiff() -> ctypes.CDLL:
    assert libtiff_messages.route_libtiff_messages()  # this project's Pillow links libtiff
    path = libtiff_messages._libtiff_path()
    assert path is not None
    return ctypes.CDLL(path)


def test_a_damaged_tiff_says_what_libtiff_found_and_writes_nothing_to_stderr(
        small_photo: np.ndarray, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidArgument) as error:
        decode_image(bad_images.tiff_with_damaged_deflate_strip(small_photo), max_pixels=CAP)
    assert str(error.value) == ("corrupt image data: ZIPDecode: Decoding error at scanline 0 "
                                "(decoder error -2)")
    assert capfd.readouterr().err == ""  # the file descriptor, where libtiff wrote before
    whole = bad_images.save(Image.fromarray(small_photo), "TIFF", compression="tiff_deflate")
    assert decode_image(whole, max_pixels=CAP).width == small_photo.shape[1]  # the next is
    assert libtiff_messages.take_libtiff_error() is None  # not blamed for it


def test_libtiff_errors_are_kept_per_thread(libtiff: ctypes.CDLL) -> None:
    """Requests are decoded on several threads at once: one's error is not another's."""
    libtiff_messages.take_libtiff_error()
    seen: list[str | None] = []

    def fail_elsewhere() -> None:
        libtiff.TIFFError(b"Elsewhere", b"strip %d of %s", ctypes.c_int(7), b"a.tif")
        seen.append(libtiff_messages.take_libtiff_error())

    thread = threading.Thread(target=fail_elsewhere)
    thread.start()
    thread.join()
    assert seen == ["Elsewhere: strip 7 of a.tif"]
    assert libtiff_messages.take_libtiff_error() is None


def test_libtiff_warnings_stay_off_stderr(small_photo: np.ndarray, libtiff: ctypes.CDLL,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Pillow clears libtiff's warning handler when it starts a TIFF decoder."""
    decode_image(bad_images.save(Image.fromarray(small_photo), "TIFF",
                                 compression="tiff_deflate"), max_pixels=CAP)
    libtiff.TIFFWarning(b"TIFFReadDirectory", b"Unknown field with tag %d", ctypes.c_int(9))
    assert capfd.readouterr().err == ""
    assert libtiff_messages.take_libtiff_error() is None  # a warning is no error


def test_a_long_message_is_cut_not_overrun(libtiff: ctypes.CDLL) -> None:
    libtiff.TIFFError(b"", b"%s", b"x" * 5000)
    message = libtiff_messages.take_libtiff_error()
    assert message is not None and set(message) == {"x"}
    assert len(message) == libtiff_messages._MESSAGE_BYTES - 1
