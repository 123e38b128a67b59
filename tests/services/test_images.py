"""Image decoding and validation on real files, including broken ones."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, decode_mask, encode_image
from services.common.jpeg_markers import MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, count_jpeg_markers
from services.common.tiff_directory import MAX_TIFF_ENTRIES
from tests.conftest import encode
from tests.fixtures import bad_images, icc

CAP = 64_000_000


def test_rgb_png_round_trip_is_exact(photo: np.ndarray) -> None:
    decoded = decode_image(encode(photo), max_pixels=CAP)
    assert decoded.rgb.shape == photo.shape and decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, photo)


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"this is not an image at all", "not a decodable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not a decodable image"),
])
def test_garbage_is_rejected_precisely(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_image(data, max_pixels=CAP)


def test_a_damaged_header_says_which_format_and_what(
        small_photo: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """Image.open reports only that no format matched; the format the bytes claim to be
    is asked again for its reason. Pillow's own ERROR log about the file stays out of the
    server's log: it is the client's error."""
    with caplog.at_level(logging.DEBUG), pytest.raises(InvalidArgument) as error:
        decode_image(bad_images.tiff_with_too_many_samples_per_pixel(small_photo),
                     max_pixels=CAP)
    assert str(error.value) == ("not a decodable image: damaged TIFF header: SyntaxError: "
                                "Invalid value for samples per pixel")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    png = bad_images.save(Image.fromarray(small_photo), "PNG")
    with pytest.raises(InvalidArgument, match=r"^not a decodable image: damaged PNG header: "
                                              r"SyntaxError: broken PNG file"):
        decode_image(png[:8] + bytes(20), max_pixels=CAP)


@pytest.mark.parametrize("make", [bad_images.truncated_jpeg, bad_images.truncated_png])
def test_truncated_files_are_rejected(photo: np.ndarray, make: object) -> None:
    with pytest.raises(InvalidArgument, match=r"truncated|corrupt"):
        decode_image(make(photo), max_pixels=CAP)  # type: ignore[operator]


def test_decompression_bomb_is_rejected_from_the_header() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidArgument,
                       match=r"100000 x 100000 = 10000000000 pixels, over the cap"):
        decode_image(bad_images.png_bomb(), max_pixels=CAP)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 50_000, f"peak memory grew by {grown_kb} kB for a rejected bomb"


def test_pixel_cap_is_configurable(photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    with pytest.raises(InvalidArgument, match="over the cap of 1000"):
        decode_image(encode(photo), max_pixels=1000)
    assert decode_image(encode(photo), max_pixels=height * width).width == width


def test_cmyk_is_converted_to_rgb(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.cmyk_jpeg(photo), max_pixels=CAP)
    assert decoded.rgb.shape == photo.shape
    # colours survive the CMYK round trip (JPEG-lossy), not inverted or garbled
    assert np.abs(decoded.rgb.astype(int) - photo.astype(int)).mean() < 12


def test_16_bit_grey_is_scaled_not_clipped(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.grey16_png(photo), max_pixels=CAP)
    from PIL import Image

    grey = np.asarray(Image.fromarray(photo).convert("L"))
    assert decoded.rgb.shape == photo.shape
    np.testing.assert_allclose(decoded.rgb[..., 0], grey, atol=1)
    assert (decoded.rgb[..., 0] == decoded.rgb[..., 2]).all()


def test_palette_with_transparency_keeps_alpha(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.palette_png_with_transparency(photo), max_pixels=CAP)
    assert decoded.rgb.shape == photo.shape
    assert decoded.alpha is not None and decoded.alpha.min() == 0
    assert np.abs(decoded.rgb.astype(int) - photo.astype(int)).mean() < 20


def test_grey_becomes_three_equal_channels(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.grey_png(photo), max_pixels=CAP)
    assert decoded.rgb.shape == photo.shape
    assert (decoded.rgb[..., 0] == decoded.rgb[..., 1]).all()


def test_rgba_alpha_is_kept_exactly(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.rgba_png(photo), max_pixels=CAP)
    np.testing.assert_array_equal(decoded.rgb, photo)
    assert decoded.alpha is not None
    assert decoded.alpha[0, 0] == 0 and decoded.alpha[0, -1] == 255


def test_animated_gif_gives_the_first_frame(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.animated_gif(photo), max_pixels=CAP)
    # frame 1 is the photo, frame 2 its negative: the mean tells them apart
    assert abs(decoded.rgb.mean() - photo.mean()) < abs(decoded.rgb.mean() - (255 - photo).mean())


def test_webp_decodes(photo: np.ndarray) -> None:
    decoded = decode_image(bad_images.webp(photo), max_pixels=CAP)
    assert decoded.rgb.shape == photo.shape and decoded.source_format == "WEBP"


def test_encode_keeps_alpha_in_png_and_drops_it_in_jpeg(photo: np.ndarray) -> None:
    alpha = np.full(photo.shape[:2], 128, np.uint8)
    png = decode_image(encode_image(photo, alpha=alpha, fmt=1), max_pixels=CAP)
    assert png.alpha is not None and (png.alpha == 128).all()
    jpeg = decode_image(encode_image(photo, alpha=alpha, fmt=2), max_pixels=CAP)
    assert jpeg.alpha is None and jpeg.source_format == "JPEG"


def test_mask_resizes_and_checks_aspect_ratio(photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    mask = np.zeros((height // 2, width // 2), np.uint8)
    mask[:, : width // 4] = 255
    resized = decode_mask(encode(mask), max_pixels=CAP, size=(width, height))
    assert resized.shape == (height, width)
    assert resized[:, :10].min() > 0.99 and resized[:, -10:].max() < 0.01
    with pytest.raises(InvalidArgument, match="aspect ratio"):
        decode_mask(encode(mask), max_pixels=CAP, size=(height, width))


@pytest.mark.parametrize("source", ["PNG", "JPEG"])
@pytest.mark.parametrize("fmt, name", [(1, "PNG"), (2, "JPEG"), (3, "WEBP")])
def test_an_rgb_icc_profile_travels_to_every_output_format(
        photo: np.ndarray, source: str, fmt: int, name: str) -> None:
    import io

    from PIL import Image

    profile = icc.rgb_profile()
    tagged = bad_images.with_icc_profile(photo, "RGB", profile, source)
    decoded = decode_image(tagged, max_pixels=CAP)
    assert decoded.icc_profile == profile
    output = encode_image(decoded.rgb, fmt=fmt, icc_profile=decoded.icc_profile)
    with Image.open(io.BytesIO(output)) as image:
        assert image.format == name and image.info.get("icc_profile") == profile
        image.load()  # the pixels still decode
    untagged = encode_image(decoded.rgb, fmt=fmt)
    with Image.open(io.BytesIO(untagged)) as image:
        assert not image.info.get("icc_profile")


@pytest.mark.parametrize("profile", [bad_images.icc_profile(b"RGB "),
                                     icc.rgb_profile()[:200] + b"\0" * 200],
                         ids=["header-only", "damaged-tags"])
def test_an_rgb_profile_littlecms_cannot_read_is_dropped(photo: np.ndarray,
                                                         profile: bytes) -> None:
    """A viewer could not read it either: the pixels are taken as sRGB, as style transfer
    takes them, and super-resolution's output is not tagged with it."""
    tagged = bad_images.with_icc_profile(photo, "RGB", profile)
    assert decode_image(tagged, max_pixels=CAP).icc_profile is None


def test_a_profile_the_converted_pixels_no_longer_match_is_dropped(photo: np.ndarray) -> None:
    grey = bad_images.with_icc_profile(photo, "L", bad_images.icc_profile(b"GRAY"))
    # grey pixels become RGB: a grey profile on them would lie
    assert decode_image(grey, max_pixels=CAP).icc_profile is None
    cmyk = bad_images.with_icc_profile(photo, "CMYK", bad_images.icc_profile(b"CMYK"), "JPEG")
    assert decode_image(cmyk, max_pixels=CAP).icc_profile is None
    assert decode_image(encode(photo), max_pixels=CAP).icc_profile is None


def test_float_images_with_nan_and_inf_decode_without_warnings() -> None:
    import io
    import warnings

    from PIL import Image

    values = np.full((8, 8), np.nan, np.float32)
    values[0, :4] = [0.0, 0.5, 1.0, np.inf]
    for array in (values, np.full((8, 8), np.nan, np.float32)):
        buffer = io.BytesIO()
        Image.fromarray(array, "F").save(buffer, "TIFF")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decoded = decode_image(buffer.getvalue(), max_pixels=CAP)
        assert decoded.rgb.shape == (8, 8, 3)
    assert list(decoded.rgb[0, :4, 0]) == [0, 0, 0, 0]  # all NaN: black
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buffer = io.BytesIO()
        Image.fromarray(values, "F").save(buffer, "TIFF")
        first = decode_image(buffer.getvalue(), max_pixels=CAP)
    assert list(first.rgb[0, :4, 0]) == [0, 127, 255, 0]


def test_32_bit_values_beyond_16_bits_are_scaled_by_their_own_maximum(
        photo: np.ndarray) -> None:
    import io

    from PIL import Image

    grey = np.asarray(Image.fromarray(photo).convert("L")).astype(np.int32)
    buffer = io.BytesIO()
    Image.fromarray(grey * 1000, "I").save(buffer, "TIFF")
    decoded = decode_image(buffer.getvalue(), max_pixels=CAP)
    expected = np.round(grey * (255.0 / grey.max()))
    np.testing.assert_allclose(decoded.rgb[..., 0], expected, atol=1)


def test_the_aspect_ratio_error_names_the_displayed_sizes(photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    with pytest.raises(InvalidArgument, match=r"after any EXIF orientation"):
        decode_mask(encode(photo), max_pixels=CAP, size=(height, width))


def test_only_the_documented_formats_are_decoded(small_photo: np.ndarray) -> None:
    """Pillow reads more (EPS would run Ghostscript on the request's bytes): not here."""
    formats = bad_images.outside_the_accepted_formats(small_photo)
    assert len(formats) == 6
    for data in formats.values():
        with pytest.raises(InvalidArgument, match=r"^not a decodable image \(PNG, JPEG, WebP, "
                                                  r"GIF, BMP or TIFF\)$"):
            decode_image(data, max_pixels=CAP)


def test_a_decoder_failure_of_any_type_is_invalid_argument(small_photo: np.ndarray) -> None:
    with pytest.raises(InvalidArgument,
                       match=r"^corrupt image data: ValueError: invalid palette size$"):
        decode_image(bad_images.bmp_with_257_palette_colours(small_photo), max_pixels=CAP)


def test_an_exif_block_of_too_many_tags_costs_only_the_orientation(
        small_photo: np.ndarray) -> None:
    """Pillow reads an EXIF block's tags one at a time in Python (65,000: 115 ms); past
    the cap of a TIFF directory the image is left as stored, as for a damaged block."""
    height, width = small_photo.shape[:2]
    turned = bad_images.save(Image.fromarray(small_photo), "PNG",
                             exif=bad_images.exif_block(6, filler_tags=MAX_TIFF_ENTRIES - 1))
    assert decode_image(turned, max_pixels=CAP).rgb.shape[:2] == (width, height)
    crowded = bad_images.save(Image.fromarray(small_photo), "PNG",
                              exif=bad_images.exif_block(6, filler_tags=65_000))
    np.testing.assert_array_equal(decode_image(crowded, max_pixels=CAP).rgb, small_photo)


def test_only_the_first_page_is_read(small_photo: np.ndarray) -> None:
    """A later page is never parsed: its damage costs nothing (Pillow raises TypeError
    counting this file's pages), and neither do its pages' number."""
    decoded = decode_image(bad_images.tiff_second_page_without_width(small_photo),
                           max_pixels=CAP)
    np.testing.assert_array_equal(decoded.rgb, small_photo)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(small_photo: np.ndarray) -> None:
    most = bad_images.jpeg_with_empty_scans(small_photo, MAX_JPEG_SCANS)
    assert decode_image(most, max_pixels=CAP).width == small_photo.shape[1]
    with pytest.raises(InvalidArgument, match=rf"^image is a JPEG of more than "
                                              rf"{MAX_JPEG_SCANS} scans .*; re-encode it$"):
        decode_image(bad_images.jpeg_with_empty_scans(small_photo, MAX_JPEG_SCANS + 1),
                     max_pixels=CAP)


def test_a_jpeg_of_too_many_segments_is_refused_before_pillow_reads_them(
        small_photo: np.ndarray) -> None:
    own = count_jpeg_markers(bad_images.jpeg_with_empty_comments(small_photo, 0)).segments
    most = bad_images.jpeg_with_empty_comments(small_photo, MAX_JPEG_SEGMENTS - own)
    assert decode_image(most, max_pixels=CAP).width == small_photo.shape[1]
    with pytest.raises(InvalidArgument, match=rf"^image is a JPEG of more than "
                                              rf"{MAX_JPEG_SEGMENTS} marker segments "):
        decode_image(bad_images.jpeg_with_empty_comments(small_photo,
                                                         MAX_JPEG_SEGMENTS - own + 1),
                     max_pixels=CAP)


def test_a_cielab_image_is_converted_to_its_rgb_colours(small_photo: np.ndarray) -> None:
    """scripts/setup.sh builds Pillow with littlecms, which converts CIELAB to sRGB."""
    decoded = decode_image(bad_images.lab_tiff(small_photo), max_pixels=CAP)
    assert decoded.alpha is None and decoded.source_format == "TIFF"
    error = np.abs(decoded.rgb.astype(int) - small_photo)
    assert error.mean() < 1.0 and error.max() <= 3  # 8-bit LAB's rounding, both ways


def test_without_colour_management_a_cielab_image_is_a_precise_invalid_argument(
        small_photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pillow built without littlecms raises ImportError converting LAB."""
    data = bad_images.lab_tiff(small_photo)
    convert = Image.Image.convert

    def no_littlecms(image: Image.Image, mode: str | None = None, *args: object,
                     **kwargs: object) -> Image.Image:
        if image.mode == "LAB":
            raise ImportError("The _imagingcms C module is not installed")
        return convert(image, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "convert", no_littlecms)
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, max_pixels=CAP)
    assert str(caught.value) == ("cannot convert a LAB image to RGB: this server's image "
                                 "library has no colour management; send RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_dark_16_bit_grey_png_stays_dark() -> None:
    """16-bit samples are scaled from 0..65535 however dark the image: values up to 200
    are near black, not read as 8-bit ones (257 times too bright)."""
    values = np.linspace(0, 200, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _png(Image.fromarray(values))
    decoded = decode_image(data, max_pixels=10**6)
    assert decoded.grey and int(decoded.rgb.max()) == 1  # 200 * 255 / 65535, rounded


def test_an_opaque_alpha_channel_is_dropped_and_a_bilevel_image_is_grey() -> None:
    """An alpha of 255 everywhere holds nothing: the reply is RGB (not RGBA); a mode "1"
    (bilevel) PNG is a grey image, answered in grey."""
    rgba = np.dstack([np.full((16, 16, 3), 90, np.uint8), np.full((16, 16), 255, np.uint8)])
    opaque = decode_image(_png(Image.fromarray(rgba, "RGBA")), max_pixels=10**6)
    assert opaque.alpha is None and not opaque.grey
    bilevel = Image.fromarray(np.tile([[0, 255], [255, 0]], (8, 8)).astype(np.uint8)).convert("1")
    assert decode_image(_png(bilevel), max_pixels=10**6).grey


def test_luma_weighs_red_green_and_blue_as_pillow_does() -> None:
    from services.common.images import luma

    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert luma(primaries).tolist() == [[76, 150, 29]]
    pillow = np.asarray(Image.fromarray(primaries).convert("L")).astype(int)
    assert np.abs(luma(primaries).astype(int) - pillow).max() <= 1


def test_the_transparent_part_of_a_mask_is_not_stylised() -> None:
    """A white mask whose left half is transparent: that half reads 0 (not stylised)."""
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:, :16, 3] = 0
    mask = decode_mask(_png(Image.fromarray(rgba, "RGBA")), max_pixels=10**6, size=(32, 32))
    assert float(mask[:, :16].max()) == 0.0 and float(mask[:, 16:].min()) == 1.0
