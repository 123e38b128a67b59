"""Edge cases of the image-input path that the rest of the suite let slip, each pinned on
real image bytes built here:

- a TIFF cut short inside its pixel data, inside the values its first directory keeps
  outside itself, or inside the next-directory offset that ends that directory, is
  refused as truncated, and a whole one of any compression is not
  (services/common/images.py, truncation.py);
- an ICC profile that matches sRGB at every level of the probe's grid but departs from
  it between them is not taken for sRGB, and is converted (services/common/colour.py);
- converting through an embedded profile keeps pure white white, as the colorimetric
  intents do and the absolute one does not (colour.py);
- a result is sent while it fits the message limit with 4096 bytes left for the reply's
  framing, and refused as RESULT_TOO_LARGE one byte past that (images.encode_image);
- the colour hidden under alpha 0 of a decoded image is filled from its visible
  neighbours, so a transparent band beside red reads as red (services/common/alpha.py);
- the code that works BAND_ROWS rows at a time (alpha.py, services/style/postprocess.py)
  gives the same result as in one piece for images of BAND_ROWS - 1, BAND_ROWS and
  BAND_ROWS + 1 rows;
- the PNG encoder at level 0 stores the pixels uncompressed, exactly
  (services/common/png.py).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from percept.v1 import image_pb2
from services.common import alpha as alpha_module
from services.common.alpha import BAND_ROWS, fill_transparent, over_white
from services.common.colour import SRGB_PROBE_LEVELS, is_srgb_profile, to_srgb
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.images import REPLY_OVERHEAD_BYTES as OVERHEAD
from services.common.images import decode_image, encode_image
from services.common.png import encode_png, up_filtered_rows
from services.common.tiff_directory import first_directory
from services.common.truncation import how_cut_short
from services.style import postprocess
from tests.fixtures import bad_images, icc

CAP = 64_000_000
RED = (220, 20, 20)


def _tiff_directory_end(data: bytes) -> int:
    """Where a TIFF's first directory's entries end: its next-directory offset follows."""
    found = first_directory(data)
    assert found is not None
    _, _, entry_size, entries_at, entries = found
    return entries_at + entry_size * entries


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("rows_per_strip", [8, 10_000])
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("short_strips", [False, True])
@pytest.mark.parametrize("kept", ["inside the first strip", "half", "all but one byte"])
def test_a_tiff_cut_inside_its_pixel_data_is_truncated_where_its_strips_run_to(
        small_photo: np.ndarray, kept: str, rows_per_strip: int, big_endian: bool,
        short_strips: bool) -> None:
    """An uncompressed TIFF, its directory first, in strips of 8 rows or in one, listed
    as LONGs or SHORTs (inline, left-justified, for one strip): the cut leaves the
    directory whole, but the strips it lists run past the end, which says it was cut
    short (whatever the decoder makes of it; libtiff, which decodes compressed strips,
    would have no such word for it)."""
    grey = small_photo[..., 1]
    whole = bad_images.uncompressed_tiff(grey, rows_per_strip, big_endian=big_endian,
                                         short_strips=short_strips)
    assert decode_image(whole, max_pixels=CAP).rgb.shape[:2] == grey.shape
    data_at = len(whole) - grey.size
    size = {"inside the first strip": data_at + 100, "half": len(whole) // 2,
            "all but one byte": len(whole) - 1}[kept]
    cut = whole[:size]
    found = how_cut_short(cut, "TIFF")
    assert found is not None and found.by_length
    assert found.how == (f"the TIFF ends after {size} bytes, inside its image data (its "
                         f"strips run to byte {len(whole)})")
    with pytest.raises(InvalidArgument) as error:
        decode_image(cut, max_pixels=CAP)
    assert error.value.reason == "IMAGE_TRUNCATED", str(error.value)
    assert str(error.value).startswith(f"truncated image: {found.how} ("), str(error.value)
    assert how_cut_short(whole, "TIFF") is None


@pytest.mark.parametrize("offset_bytes_kept", [0, 1, 2, 3])
def test_a_tiff_cut_inside_its_next_directory_offset_is_truncated_inside_its_directory(
        small_photo: np.ndarray, offset_bytes_kept: int) -> None:
    """The 4 bytes after the last entry belong to the directory: a TIFF that ends among
    them was cut inside its first directory, which its own lengths say."""
    whole = bad_images.save(Image.fromarray(small_photo), "TIFF")  # directory at byte 8
    size = _tiff_directory_end(whole) + offset_bytes_kept
    with pytest.raises(InvalidArgument) as error:
        decode_image(whole[:size], max_pixels=CAP)
    assert error.value.reason == "IMAGE_TRUNCATED", str(error.value)
    assert str(error.value).startswith(
        f"truncated image: the TIFF ends after {size} bytes, inside its first directory "
        "(at byte 8)"), str(error.value)


def test_a_tiff_cut_just_after_its_first_directory_is_cut_inside_that_directory_s_values(
        small_photo: np.ndarray) -> None:
    """Pillow writes an uncompressed TIFF's directory first, then the values it keeps
    outside itself (of an RGB photo in one strip, the three bits per sample): a cut
    right after the directory leaves them out, which the directory's own offset says.
    (Before, such a file was "not a decodable image: damaged TIFF header".)"""
    whole = bad_images.save(Image.fromarray(small_photo), "TIFF")
    size = _tiff_directory_end(whole) + 4
    with pytest.raises(InvalidArgument) as error:
        decode_image(whole[:size], max_pixels=CAP)
    assert error.value.reason == "IMAGE_TRUNCATED", str(error.value)
    assert str(error.value).startswith(
        f"truncated image: the TIFF ends after {size} bytes, inside the values of its "
        f"first directory's tag 258 (bytes {size} to {size + 6})"), str(error.value)


def test_the_values_of_a_tag_decoding_skips_say_nothing_of_a_cut(
        small_photo: np.ndarray) -> None:
    """A private tag whose values would lie far past the end (a damaged count or
    offset): Pillow skips it, and the file is whole."""
    whole = bytearray(bad_images.uncompressed_tiff(small_photo[..., 1], 8, extra_tags=1))
    entry = 8 + 2 + 12 * 9  # the private tag's, after the nine the fixture writes
    assert struct.unpack_from("<H", whole, entry)[0] == 65000
    struct.pack_into("<II", whole, entry + 4, 1000, 2**31)  # 1,000 SHORTs at 2 GiB
    assert how_cut_short(bytes(whole), "TIFF") is None
    assert decode_image(bytes(whole), max_pixels=CAP).rgb.shape[:2] == small_photo.shape[:2]


def _bigtiff(order: str, directory_at: int, size: int) -> bytes:
    """A BigTIFF header (its 8-byte offsets) pointing at a directory of no entries."""
    head = (b"II+\0" if order == "<" else b"MM\0+") + struct.pack(order + "HHQ", 8, 0,
                                                                   directory_at)
    body = bytes(directory_at - len(head)) + struct.pack(order + "QQ", 0, 0)
    return (head + body)[:size]


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_bigtiff_is_read_with_its_own_offsets(order: str) -> None:
    """Its first directory's offset is 8 bytes at byte 8 (bytes 4 to 8 hold the offset
    size, 8): a whole one is not cut, and one cut before its directory is. (Before, a
    big-endian one was read as if its directory were at byte 524,288.)"""
    whole = _bigtiff(order, 64, 80)
    assert how_cut_short(whole, "TIFF") is None
    cut = how_cut_short(whole[:40], "TIFF")
    assert cut is not None and cut.how == ("the TIFF ends after 40 bytes, before its first "
                                           "directory (at byte 64)")


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_deflate", "packbits",
                                         "jpeg"])
def test_a_whole_tiff_is_not_taken_for_a_cut_one(small_photo: np.ndarray,
                                                 compression: str) -> None:
    """Whatever its compression, and wherever its writer put the directory (libtiff,
    which Pillow uses to compress, writes it last)."""
    whole = bad_images.save(Image.fromarray(small_photo), "TIFF", compression=compression)
    assert how_cut_short(whole, "TIFF") is None
    assert decode_image(whole, max_pixels=CAP).rgb.shape == small_photo.shape


# ------------------------------------------------------------------------------- colour


def _srgb_decode(encoded: np.ndarray) -> np.ndarray:
    """sRGB's tone curve, encoded 0..1 to linear light."""
    return np.where(encoded <= 0.04045, encoded / 12.92,
                    np.power((encoded + 0.055) / 1.055, 2.4))


def _curve_table(encoded_levels: np.ndarray) -> np.ndarray:
    """The 256-entry curve that gives level i the light sRGB gives ``encoded_levels[i]``."""
    linear = _srgb_decode(np.clip(encoded_levels / 255.0, 0.0, 1.0))
    return np.round(linear * 65535).astype(np.uint16)


def _probe_grid_levels() -> np.ndarray:
    """The levels of each channel on is_srgb_profile's grid (0, 16, 32 ... 239, 255)."""
    return np.linspace(0, 255, SRGB_PROBE_LEVELS).round().astype(int)


def test_a_profile_that_leaves_srgb_only_between_the_grid_levels_is_converted(
        small_photo: np.ndarray) -> None:
    """sRGB's primaries and sRGB's curve at every level of the probe's grid, but a curve
    that swings 4 levels off it half-way between them: every colour of the grid comes
    through unmoved, so only the probe's ramps over all 256 levels can tell, and they
    must: the profile is no sRGB, and an image tagged with it is converted."""
    grid = _probe_grid_levels()
    level = np.arange(256)
    below = np.minimum(np.searchsorted(grid, level, side="right") - 1, len(grid) - 2)
    low, high = grid[below], grid[below + 1]
    wave = 4.0 * np.sin(np.pi * (level - low) / (high - low))  # 0 at each grid level
    profile = icc.rgb_profile(icc.SRGB_PRIMARIES, curve_table=_curve_table(level + wave),
                              name="percept test sRGB, wavy between 16ths")
    cube = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1) \
        .reshape(-1, 1, 3).astype(np.uint8)
    assert np.abs(icc.littlecms_to_srgb(cube, profile).astype(int) - cube).max() <= 1
    assert not is_srgb_profile(profile)
    ramp = np.repeat(level.astype(np.uint8)[:, None, None], 3, axis=2)
    assert np.abs(to_srgb(ramp, profile).astype(int) - ramp).max() >= 3
    data = bad_images.with_icc_profile(small_photo, "RGB", profile, "PNG")
    converted = decode_image(data, max_pixels=CAP, srgb=True)
    np.testing.assert_array_equal(converted.rgb, icc.littlecms_to_srgb(small_photo, profile))
    assert not np.array_equal(converted.rgb, small_photo)


def test_the_same_curve_exactly_on_the_grid_levels_is_srgb() -> None:
    """The control: sRGB's own curve in the same table form is taken as sRGB."""
    profile = icc.rgb_profile(icc.SRGB_PRIMARIES, curve_table=_curve_table(np.arange(256.0)),
                              name="percept test sRGB, table curve")
    assert is_srgb_profile(profile)


def test_converting_through_a_wide_gamut_profile_keeps_pure_white_white(
        small_photo: np.ndarray) -> None:
    """A camera's (input class) Display P3 profile whose media white is D65, not the
    connection space's D50: an absolute colorimetric conversion would show its white as
    D65 on sRGB's D50-adapted white, bluish (235, 255, 255); the colorimetric intents
    keep (255, 255, 255), and black black, while the other colours are converted."""
    gamma_22 = np.round(np.power(np.arange(256) / 255.0, 2.2) * 65535).astype(np.uint16)
    profile = icc.rgb_profile(icc.P3_PRIMARIES, curve_table=gamma_22, device_class=b"scnr",
                              media_white=icc.D65,
                              name="percept test camera P3, D65 media white")
    image = small_photo.copy()
    image[:8] = 255
    image[-8:] = 0
    converted = decode_image(bad_images.with_icc_profile(image, "RGB", profile, "PNG"),
                             max_pixels=CAP, srgb=True)
    assert converted.icc_profile is None
    assert (converted.rgb[:8] == 255).all(), converted.rgb[0, 0]
    assert (converted.rgb[-8:] == 0).all(), converted.rgb[-1, 0]
    reference = icc.reference_to_srgb(image[8:-8])  # P3, gamma 2.2, relative colorimetric
    assert np.abs(converted.rgb[8:-8].astype(int) - reference).max() <= 1
    assert np.abs(converted.rgb[8:-8].astype(int) - image[8:-8]).mean() > 2


# --------------------------------------------------------------------------- reply size


def test_a_result_is_sent_while_it_fits_the_limit_with_the_framing_allowance() -> None:
    """A reply of ``len(data) + 4096`` bytes is at the limit and goes; one byte less of
    limit and the result is RESULT_TOO_LARGE (RESOURCE_EXHAUSTED), not gRPC's bare
    refusal of the message."""
    noise = np.random.default_rng(5).integers(0, 256, (48, 64, 3), np.uint8)
    for fmt in (image_pb2.IMAGE_FORMAT_PNG, image_pb2.IMAGE_FORMAT_JPEG):
        data = encode_image(noise, fmt=fmt)
        limit = len(data) + OVERHEAD
        assert encode_image(noise, fmt=fmt, max_reply_bytes=limit) == data
        with pytest.raises(ResourceExhausted) as error:
            encode_image(noise, fmt=fmt, max_reply_bytes=limit - 1)
        assert error.value.reason == "RESULT_TOO_LARGE"


# -------------------------------------------------------------------------------- alpha


def _red_beside_a_hidden_band(height: int = 24, width: int = 64, band: int = 40
                              ) -> bytes:
    """An RGBA PNG: red on the left, then ``band`` columns of alpha 0 over black (as most
    exporters write the hidden colour)."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[:, :width - band] = (*RED, 255)
    return bad_images.save(Image.fromarray(rgba, "RGBA"), "PNG")


def test_a_transparent_band_beside_red_reads_as_red_once_filled() -> None:
    """As the PNG and WebP results are made (style and super-resolution services): the
    decoded image keeps the stored black under alpha 0, and fill_transparent gives those
    pixels the nearest visible colour, red, however far they are from it."""
    decoded = decode_image(_red_beside_a_hidden_band(), max_pixels=CAP)
    assert decoded.alpha is not None
    hidden = decoded.alpha == 0
    assert hidden.sum() == 24 * 40 and (decoded.rgb[hidden] == 0).all()
    filled = fill_transparent(decoded.rgb, decoded.alpha)
    assert (filled == RED).all()
    # and for a result without alpha (JPEG, an embedding) the band is white, as on a page
    flat = over_white(decoded.rgb, decoded.alpha)
    assert (flat[hidden] == 255).all() and (flat[~hidden] == RED).all()


# ---------------------------------------------------------------------------- BAND_ROWS


def _banded_image(height: int) -> tuple[np.ndarray, np.ndarray]:
    """Colours that change from row to row, and an alpha with every level, whose hidden
    pixels are in every row, so that each band's edge rows are filled and blended."""
    rng = np.random.default_rng(height)
    rgb = rng.integers(0, 256, (height, 37, 3), np.uint8)
    alpha = rng.integers(0, 256, (height, 37)).astype(np.uint8)
    alpha[:, 5:15] = 0  # a hidden block in every row
    alpha[::7, 20:] = 0
    return rgb, alpha


@pytest.mark.parametrize("height", [BAND_ROWS - 1, BAND_ROWS, BAND_ROWS + 1])
def test_alpha_work_in_bands_matches_the_image_in_one_piece(
        height: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb, alpha = _banded_image(height)
    banded_fill, banded_flat = fill_transparent(rgb, alpha), over_white(rgb, alpha)
    monkeypatch.setattr(alpha_module, "BAND_ROWS", 10 * BAND_ROWS)  # one band
    np.testing.assert_array_equal(banded_fill, fill_transparent(rgb, alpha))
    np.testing.assert_array_equal(banded_flat, over_white(rgb, alpha))
    a = alpha[..., None] / 255
    assert np.abs(banded_flat - np.round(rgb * a + 255 * (1 - a))).max() == 0
    assert not (banded_fill[alpha == 0] == rgb[alpha == 0]).all()  # something was filled


@pytest.mark.parametrize("height", [postprocess.BAND_ROWS - 1, postprocess.BAND_ROWS,
                                    postprocess.BAND_ROWS + 1])
def test_finishing_a_stylisation_in_bands_matches_the_image_in_one_piece(
        height: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Colour preservation, half strength and a mask, row by row at the bands' edges."""
    rng = np.random.default_rng(height + 1)
    content = rng.integers(0, 256, (height, 24, 3), np.uint8)
    stylised = rng.integers(0, 256, (height, 24, 3), np.uint8)
    mask = rng.random((height, 24)).astype(np.float32)

    def finish() -> np.ndarray:
        return postprocess.finish(content, stylised, preserve_color=True, strength=0.5,
                                  mask=mask)

    banded = finish()
    monkeypatch.setattr(postprocess, "BAND_ROWS", 10 * postprocess.BAND_ROWS)  # one band
    np.testing.assert_array_equal(banded, finish())


# ---------------------------------------------------------------------------------- PNG


def test_a_png_at_level_0_stores_the_exact_pixels_uncompressed() -> None:
    """Level 0 is zlib's stored blocks (ISA-L's own 0 compresses): the file is larger than
    the filtered rows themselves and than level 6's, and decodes to the same pixels."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (96, 1))
    pixels = np.dstack([ramp, ramp[::-1], np.full_like(ramp, 7)])  # very compressible
    stored, packed = encode_png(pixels, level=0), encode_png(pixels, level=6)
    raw = up_filtered_rows(pixels).nbytes
    assert len(stored) > raw > 10 * len(packed)
    for data in (stored, packed):
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image), pixels)
