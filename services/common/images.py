"""Decoding, validation and encoding of the images that travel as bytes in requests.

Every failure is an :class:`InvalidArgument` with a precise message; nothing here can make
the server allocate more than the pixel cap allows: the size is read from the header before
any pixel is decoded (decompression-bomb guard).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from percept.v1 import image_pb2
from services.common.bmp_rle import use_for_bmp
from services.common.colour import (
    profile_describes,
    profiled_to_srgb,
    readable_profile,
    to_srgb,
)
from services.common.errors import InvalidArgument, ResourceExhausted, field_of
from services.common.libtiff_messages import route_libtiff_messages, take_libtiff_error
from services.common.png import encode_png
from services.common.structure_bounds import WALKED_AT_DECODE, structure_excess
from services.common.tiff_directory import MAX_TIFF_ENTRIES, count_tiff_entries
from services.common.truncation import how_cut_short

# Pillow warns about what it repairs or skips in a request's image (corrupt EXIF data,
# transparency in a palette...): the image still decodes, and the server's log is no place
# for it. A filter, set once: warnings.catch_warnings() is not thread-safe, and images are
# decoded on several threads at once (one could leave every warning silenced).
warnings.filterwarnings("ignore", module="PIL")
# Pillow logs one fault of a request's TIFF at ERROR level ("More samples per pixel than
# can be decoded"): the client's error, which its INVALID_ARGUMENT already says.
logging.getLogger("PIL.TiffImagePlugin").addFilter(lambda record: record.levelno < logging.ERROR)
# libtiff prints what is wrong with a damaged TIFF to stderr, past the JSON log; this keeps
# it for the error the client gets instead (take_libtiff_error).
route_libtiff_messages()
# Run-length-coded BMPs decoded at a cost that follows the file's size, not the image's
# (Pillow's own decoder takes a Python step per pixel of a run or a row's padding).
use_for_bmp()

# We enforce our own cap from the header; Pillow's global guard would fire on a different,
# process-wide number and with a less precise message.
Image.MAX_IMAGE_PIXELS = None

_FORMATS = {
    image_pb2.IMAGE_FORMAT_UNSPECIFIED: "PNG",
    image_pb2.IMAGE_FORMAT_PNG: "PNG",
    image_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    image_pb2.IMAGE_FORMAT_WEBP: "WEBP",
}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
#: The decoders a request's bytes may reach (image.proto's list; the JPEG one also opens
#: cameras' multi-picture JPEGs, as MPO). Pillow's others (EPS, which runs Ghostscript,
#: PSD, DDS, ICO...) are not given untrusted input.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: The largest side each lossy encoder can write (libjpeg's JPEG_MAX_DIMENSION; WebP's
#: 14-bit sizes). PNG's 2^31 - 1 is beyond any result.
MAX_OUTPUT_SIDE = {"JPEG": 65_500, "WEBP": 16_383}
_T = Image.Transpose
#: What shows a stored image upright, by EXIF orientation (as ImageOps.exif_transpose).
_UPRIGHT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
            5: _T.TRANSPOSE, 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
#: PNG raw modes of grey images with the factor Pillow's decoded 8/16-bit pixel is of the
#: stored sample (2- and 4-bit samples are rescaled to 0..255), so that a tRNS colour key
#: k, which Pillow leaves as stored, matches the pixels equal to k times it. 1-bit images
#: decode to booleans (and Pillow gives their key as 0 or 255); RGB: see _colour_key_alpha.
_GREY_KEY_SCALE = {"L;2": 85, "L;4": 17, "L": 1, "I;16B": 1}


@dataclass(frozen=True)
class DecodedImage:
    """An image as 8-bit RGB, with its alpha channel kept apart when it has one."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, or None when absent or fully opaque
    source_format: str
    # The embedded ICC profile when it describes an RGB space the pixels are still in
    # (Display P3, Adobe RGB...): outputs carry it on, so a viewer shows their colours as
    # the input's. None for untagged (sRGB) images, for converted ones (CMYK, grey), and
    # for those decoded with srgb=True (their pixels were converted to sRGB).
    icc_profile: bytes | None = None
    # The source had no colour (a grey, bilevel or 16-bit/float grey mode): its three RGB
    # channels are equal here, and an image made from it may be sent back grey (encode_image).
    grey: bool = False

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scales 16/32-bit integer and float grey images to 8-bit grey.

    Floats in 0..1 are scaled by 255 and others taken as 0..255 (NaN and inf become 0).
    Integers: 8-bit values stay, 16-bit ones are scaled from 0..65535, and 32-bit values
    beyond that range (which has no standard white) from 0 to the image's own maximum."""
    array = np.asarray(image)
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        clean = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        return Image.fromarray(np.clip(clean * scale, 0, 255).astype(np.uint8))
    top = int(array.max(initial=0))
    peak = top if top > 65535 else (
        65535 if image.mode.startswith("I;16") or top > 255 else 255)
    return Image.fromarray(np.clip(array.astype(np.float64) * (255.0 / peak) + 0.5, 0, 255)
                           .astype(np.uint8))


def _colour_key_alpha(image: Image.Image, png_rawmode: str | None,
                      data: bytes) -> np.ndarray | None:
    """The alpha of a grey or RGB PNG's tRNS colour key (the one sample value that is fully
    transparent), from the image as stored (before any EXIF turn): 0 where the pixel equals
    the key at the PNG's own bit depth, 255 elsewhere; None without a key or a match.
    Pillow keeps only the high byte of 16-bit RGB, where (0, 0, 200) and a key of (0, 0, 0)
    would both read as black, so that image's low bytes are decoded too (``data``)."""
    key = image.info.get("transparency")
    if key is None or png_rawmode is None:
        return None
    pixels = np.asarray(image)
    if png_rawmode in ("RGB", "RGB;16B"):
        if not (isinstance(key, tuple) and len(key) == 3):
            return None
        if png_rawmode == "RGB;16B":
            pixels = (pixels.astype(np.uint16) << 8) | _png_low_bytes(data)
        transparent = (pixels == np.array(key, np.int64)).all(axis=-1)
    elif png_rawmode == "1" and isinstance(key, int) and pixels.dtype == bool:
        transparent = pixels == (key != 0)
    elif png_rawmode in _GREY_KEY_SCALE and isinstance(key, int) and pixels.ndim == 2:
        transparent = pixels == key * _GREY_KEY_SCALE[png_rawmode]
    else:
        return None
    return np.where(transparent, 0, 255).astype(np.uint8) if transparent.any() else None


def _png_low_bytes(data: bytes) -> np.ndarray:
    """The low bytes of a 16-bit RGB PNG's first frame: the same stream decoded again with
    its samples read as little-endian. Both readings are 48 bits a pixel, so the PNG's row
    filters are undone the same way and only the byte each sample keeps differs."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        image.tile = [tile._replace(args="RGB;16L") for tile in image.tile]
        image.load()
        return np.asarray(image)


def _normalise_mode(image: Image.Image, key_alpha: Image.Image | None = None) -> Image.Image:
    """Converts any decoded mode to RGB or RGBA (``key_alpha``, a PNG's colour key as an
    "L" image of the same size, becomes the alpha; CMYK and 8- or 16-bit grey go through
    their embedded profile where they have one littlecms can use)."""
    profile = image.info.get("icc_profile")
    colour_mode = "L" if image.mode == "LA" else image.mode
    if colour_mode != "RGB" and profile_describes(profile, colour_mode):
        colour = image.getchannel("L") if image.mode == "LA" else image
        managed = profiled_to_srgb(colour, profile)
        if managed is not None:
            alpha = image.getchannel("A") if image.mode == "LA" else key_alpha
            if alpha is not None:
                managed = managed.convert("RGBA")
                managed.putalpha(alpha)
            return managed
    if key_alpha is not None:
        grey_or_rgb = _to_8bit(image) if image.mode.startswith("I") else image
        rgba = grey_or_rgb.convert("RGB").convert("RGBA")
        rgba.putalpha(key_alpha)
        return rgba
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        return image.convert("RGBA")
    if image.mode != "RGB":
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def _upright_turn(image: Image.Image) -> Image.Transpose | None:
    """What shows the image upright, as its EXIF orientation says; None for an upright
    image. A damaged EXIF block (unreadable, or an orientation that is no number) leaves
    the image as stored: it costs the orientation, not the request. So does one of more
    tags than a TIFF directory may have here (tiff_directory), which Pillow would read in
    Python, one at a time (a PNG's eXIf chunk may hold 65,535). Unlike
    ImageOps.exif_transpose, the EXIF is not written back, which fails on tags it cannot
    serialise, and an upright image is not copied."""
    exif = image.info.get("exif")
    if isinstance(exif, bytes) and count_tiff_entries(
            exif.removeprefix(b"Exif\x00\x00")) > MAX_TIFF_ENTRIES:
        return None
    try:
        return _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # Pillow's TIFF parser on damaged bytes: SyntaxError, struct.error...
        return None


def _rgb_icc_profile(image: Image.Image) -> bytes | None:
    """The image's embedded ICC profile if its pixels are RGB and it is an RGB profile
    littlecms can read (a damaged one is dropped, the pixels taken as sRGB)."""
    profile = image.info.get("icc_profile")
    if image.mode not in ("RGB", "RGBA", "P", "PA") or not profile_describes(profile, "RGB"):
        return None
    assert isinstance(profile, bytes)
    return profile if readable_profile(profile) else None


def _bad(what: str, message: str, reason: str) -> InvalidArgument:
    """The error for the image named ``what`` ("image 3", "mask"): its request field and a
    machine-readable reason go with the message."""
    return InvalidArgument(message, reason=reason, field=field_of(what))


def _open(data: bytes, what: str) -> Image.Image:
    """Opens ``data`` with the accepted decoders, reading the header only."""
    if not data:
        raise _bad(what, f"empty {what}", "IMAGE_EMPTY")
    _refuse_costly_structure(data, what, header_only=True)  # before Pillow reads it
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except MemoryError:
        raise
    except UnidentifiedImageError as error:
        fault = _header_fault(data, what)
        if fault is not None:
            raise fault from error
        raise _bad(what, f"not a decodable {what} (PNG, JPEG, WebP, GIF, BMP or TIFF)",
                   "IMAGE_UNDECODABLE") from error
    except Exception as error:  # a plugin's own failure on a damaged header
        claimed = _claimed_format(data)
        raise _header_failure(data, claimed, what, _reason(error)) from error


def _refuse_costly_structure(data: bytes, what: str, *, header_only: bool) -> None:
    """InvalidArgument for a file whose structure (scans, segments, chunks, blocks,
    run-length codes, strips) would cost far more to decode than encoders ever ask
    (structure_bounds); ``header_only`` walks the part that opening the file reads (for
    probe_size, every request's admission), at the cost of the header alone."""
    excess = structure_excess(data, header_only=header_only)
    if excess is not None:
        fmt, too_many = excess
        raise _bad(what, f"{what} is a {fmt} of {too_many}: it would take long to decode; "
                   "re-encode it", "IMAGE_TOO_COSTLY")


def _header_fault(data: bytes, what: str) -> InvalidArgument | None:
    """The error for bytes that begin as one of the accepted formats but whose header
    does not open ("damaged TIFF header: SyntaxError: Invalid value for samples per
    pixel"), which Image.open reports only as no format at all; None for bytes no accepted
    format claims."""
    name = _claimed_format(data)
    if name is None:
        return None
    try:
        Image.OPEN[name][0](io.BytesIO(data), "").close()
    except MemoryError:
        raise
    except Exception as error:  # what Image.open caught and dropped
        return _header_failure(data, name, what, f"damaged {name} header: {_reason(error)}")
    return None


def _header_failure(data: bytes, fmt: str | None, what: str, reason: str
                    ) -> InvalidArgument:
    """The error for a header that does not open: "truncated" where a length or offset
    in the file says it was cut short; otherwise "not a decodable", with a missing end
    mark noted (such bytes may be a cut file, or no file of that format at all)."""
    cut = None if fmt is None else how_cut_short(data, fmt)
    if cut is not None and cut.by_length:
        return _bad(what, f"truncated {what}: {cut.how} ({reason})", "IMAGE_TRUNCATED")
    if cut is not None:
        return _bad(what, f"not a decodable {what}: {reason}; {cut.how}", "IMAGE_UNDECODABLE")
    return _bad(what, f"not a decodable {what}: {reason}", "IMAGE_UNDECODABLE")


def _claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` begins with, if any."""
    Image.init()
    for name in ACCEPTED_FORMATS:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(data[:16]):
            return name
    return None


def _reason(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _decode_failure(data: bytes, fmt: str, what: str, reason: str) -> InvalidArgument:
    """The error for a decoder's failure: "truncated" where the file shows it was cut short
    (or, for a TIFF, whose end nothing marks, where the decoder ran out of data), "corrupt"
    where it is whole and damaged inside, whatever Pillow's message guessed."""
    cut = how_cut_short(data, fmt)
    if cut is not None:
        return _bad(what, f"truncated {what}: {cut.how} ({reason})", "IMAGE_TRUNCATED")
    if fmt == "TIFF" and "truncated" in reason:  # its end is not marked: trust the decoder
        return _bad(what, f"truncated {what}: {reason}", "IMAGE_TRUNCATED")
    return _bad(what, f"corrupt {what} data: {reason}", "IMAGE_CORRUPT")


def _with_libtiff_error(text: str) -> str:
    """Pillow's reason for a failed decode, led by what libtiff found wrong, if it said
    (Pillow's own reason for a TIFF is a bare "decoder error -2")."""
    detail = take_libtiff_error()
    return text if detail is None else f"{detail} ({text})"


def probe_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """Width and height from the header alone."""
    with _open(data, what) as image:
        return image.size


def _png_rawmode(image: Image.Image) -> str | None:
    """How a PNG's pixels are stored ("L;2", "I;16B", "RGB;16B"...), read before loading
    (which forgets it); None for other formats."""
    if image.format != "PNG" or not isinstance(image, ImageFile.ImageFile) or not image.tile:
        return None
    args = image.tile[0].args
    return args if isinstance(args, str) else None


#: What may be decoded at a reduced size on request: JPEGs (and cameras' multi-picture
#: JPEGs, MPO, whose first picture is one) of colour or grey pixels. A CMYK JPEG (rare in
#: requests, and converted through its press profile) is decoded whole.
_DRAFT_FORMATS = ("JPEG", "MPO")
_DRAFT_MODES = ("RGB", "L")


def _draft_jpeg(image: Image.Image, min_side: int) -> None:
    """Asks libjpeg to decode ``image``, a JPEG not yet loaded, at 1/2, 1/4 or 1/8 of its
    size (its scaled inverse DCT: Image.draft), the smallest of them whose shorter side
    is still at least ``min_side`` pixels. A model that shrinks the image to a few hundred
    pixels then resizes from a smaller picture of the same content, and the decoder skips
    most of its work: for the 224-pixel embedding model (``min_side`` 448) a 2560 x 1600
    photo decodes at 1280 x 800, as 1/4 would leave 400 px. Nothing changes for other
    formats, other modes, or a JPEG too small to halve.

    The caller has already checked the size the header declares against the pixel cap,
    and applies EXIF orientation after loading: the orientation tag describes the stored
    picture at any scale."""
    if image.format not in _DRAFT_FORMATS or image.mode not in _DRAFT_MODES or min_side < 1:
        return
    if min(image.size) // min_side < 2:
        return
    # Pillow takes the largest scale s of 2, 4 or 8 with each side // s >= the size asked
    image.draft(image.mode, (min_side, min_side))


def decode_image(data: bytes, *, max_pixels: int, what: str = "image",
                 srgb: bool = False, draft_min_side: int | None = None) -> DecodedImage:
    """Decodes ``data`` to RGB (+ alpha). The first frame of an animation is used and EXIF
    orientation is applied (ignored when the EXIF block is unreadable). Alpha comes from
    an alpha channel, a palette's transparency, or a grey or RGB PNG's colour key (tRNS,
    matched at the PNG's bit depth); it is kept apart, not composited: ``rgb`` is the
    stored colour. With ``srgb``, an RGB image tagged with an ICC profile has its pixels
    converted to sRGB and the profile dropped (for models that read colours as sRGB);
    otherwise the profile is kept, to tag the output with. With ``draft_min_side``, a
    JPEG may come out smaller than it is, its shorter side still at least that many pixels
    (:func:`_draft_jpeg`): for a model that shrinks it anyway. Raises InvalidArgument for
    empty, undecodable, truncated or oversized input (the size its header declares),
    whatever the decoder raised."""
    image = _open(data, what)
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise _bad(what, f"{what} has zero size ({width} x {height})", "IMAGE_EMPTY")
        if width * height > max_pixels:
            raise _bad(what, f"{what} has {width} x {height} = {width * height} pixels, "
                             f"over the cap of {max_pixels}", "IMAGE_OVER_PIXEL_CAP")
        source_format = image.format or "unknown"
        if source_format in WALKED_AT_DECODE:  # a JPEG's scans, a PNG's pixel data chunks
            _refuse_costly_structure(data, what, header_only=False)
        take_libtiff_error()  # one left by an earlier image on this thread is not this one's
        try:  # an image opens at its first frame; the others are never read
            png_rawmode = _png_rawmode(image)
            if draft_min_side is not None:
                _draft_jpeg(image, draft_min_side)
            image.load()
            key = _colour_key_alpha(image, png_rawmode, data)
            key_alpha = None if key is None else Image.fromarray(key)
            turn = _upright_turn(image)
            if turn is not None:
                image = image.transpose(turn)
                key_alpha = None if key_alpha is None else key_alpha.transpose(turn)
        except MemoryError:
            raise
        except OSError as error:
            raise _decode_failure(data, source_format, what, _with_libtiff_error(str(error))
                                  ) from error
        except Exception as error:  # a decoder's failure on damaged data, whatever its type
            raise _decode_failure(data, source_format, what,
                                  _with_libtiff_error(_reason(error))) from error
        icc_profile = _rgb_icc_profile(image)
        mode = image.mode
        try:
            with np.errstate(all="ignore"):  # NaN in float images: handled (thread-local)
                image = _normalise_mode(image, key_alpha)
        except MemoryError:
            raise
        except ImportError as error:  # LAB needs littlecms, which a Pillow build may lack
            raise _bad(what, f"cannot convert a {mode} {what} to RGB: this server's image "
                             "library has no colour management; send RGB",
                       "IMAGE_UNDECODABLE") from error
        except Exception as error:
            raise _bad(what, f"cannot convert a {mode} {what} to RGB: {_reason(error)}",
                       "IMAGE_UNDECODABLE") from error
        array = np.asarray(image)
    alpha = None
    if array.shape[-1] == 4:
        alpha = np.ascontiguousarray(array[..., 3])
        alpha = None if alpha.min() == 255 else alpha
        array = array[..., :3]
    rgb = np.ascontiguousarray(array)
    if srgb and icc_profile is not None:
        rgb, icc_profile = to_srgb(rgb, icc_profile), None
    return DecodedImage(rgb=rgb, alpha=alpha, source_format=source_format,
                        icc_profile=icc_profile, grey=_is_grey_mode(mode))


def _is_grey_mode(mode: str) -> bool:
    """Whether Pillow's ``mode`` holds no colour: bilevel, 8-bit grey (with alpha or not),
    16/32-bit integer or float grey."""
    return mode in ("1", "L", "LA", "La", "F") or mode.startswith("I")


def decode_mask(data: bytes, *, max_pixels: int, size: tuple[int, int],
                image_size: tuple[int, int] | None = None,
                aspect_tolerance: float = 0.02) -> np.ndarray:
    """Decodes a grey mask (white = 1) and resizes it to ``size`` = (width, height).

    The mask's aspect ratio must match the image's within ``aspect_tolerance``: the image
    as the caller sent it, ``image_size`` (default ``size``; an optimisation works on a
    smaller copy, whose size the caller never chose)."""
    decoded = decode_image(data, max_pixels=max_pixels, what="mask")
    width, height = size
    shown_width, shown_height = image_size or size
    mask_ratio = decoded.width / decoded.height
    image_ratio = shown_width / shown_height
    if abs(mask_ratio / image_ratio - 1.0) > aspect_tolerance:
        raise InvalidArgument(
            f"mask aspect ratio {decoded.width}x{decoded.height} does not match the image's "
            f"{shown_width}x{shown_height} (both as displayed, after any EXIF orientation)",
            reason="MASK_ASPECT_MISMATCH", field="mask")
    grey = Image.fromarray(decoded.rgb).convert("L")
    if decoded.alpha is not None:  # transparent = not stylised
        grey = Image.fromarray((np.asarray(grey, np.float32) * (decoded.alpha / 255.0))
                               .astype(np.uint8))
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float32) / 255.0


def output_format_name(fmt: int) -> str:
    if fmt not in _FORMATS:
        raise InvalidArgument(f"unknown output_format {fmt}", field="output_format")
    return _FORMATS[fmt]


def check_output_size(width: int, height: int, fmt: int) -> None:
    """InvalidArgument when a ``width`` x ``height`` result is too large for the encoder of
    output format ``fmt`` (a service can call this before computing the result)."""
    name = output_format_name(fmt)
    limit = MAX_OUTPUT_SIDE.get(name)
    if limit is not None and max(width, height) > limit:
        raise InvalidArgument(f"the {width}x{height} result is over {name}'s limit of {limit} "
                              "px a side; ask for PNG output, or send a smaller image",
                              reason="RESULT_OVER_FORMAT_LIMIT", field="output_format")


def output_format_enum(fmt: int) -> int:
    return image_pb2.IMAGE_FORMAT_PNG if fmt == image_pb2.IMAGE_FORMAT_UNSPECIFIED else fmt


def validate_quality(quality: int) -> int:
    if quality == 0:
        return 95
    if not 1 <= quality <= 100:
        raise InvalidArgument(f"quality must be 1..100, got {quality}", field="quality")
    return quality


#: Room left in a reply for its other fields and protobuf framing (bytes).
REPLY_OVERHEAD_BYTES = 4096


def encode_image(rgb: np.ndarray, *, alpha: np.ndarray | None = None, fmt: int = 0,
                 quality: int = 95, icc_profile: bytes | None = None,
                 max_reply_bytes: int | None = None, grey: bool = False) -> bytes:
    """Encodes (H, W, 3) uint8 RGB (+ optional alpha) as PNG, JPEG or WebP bytes, tagged
    with ``icc_profile`` when given (the input's, see DecodedImage). With ``grey`` (the
    input was grey: DecodedImage.grey), the image is sent as its BT.601 luma, a grey PNG or
    JPEG (WebP has no grey mode: its three channels are made equal). With
    ``max_reply_bytes`` (the server's message limit), a result too large to send is
    RESOURCE_EXHAUSTED with what to do, not gRPC's bare refusal; a side over what JPEG or
    WebP can hold is INVALID_ARGUMENT (see check_output_size)."""
    check_output_size(rgb.shape[1], rgb.shape[0], fmt)
    if grey:
        data = _encode_grey(luma(rgb), alpha=alpha, fmt=fmt, quality=quality)
    else:
        data = _encode(rgb, alpha=alpha, fmt=fmt, quality=quality, icc_profile=icc_profile)
    if max_reply_bytes is not None and len(data) + REPLY_OVERHEAD_BYTES > max_reply_bytes:
        name = output_format_name(fmt)
        other = "; ask for JPEG or WebP output" if name == "PNG" else ""
        raise ResourceExhausted(
            f"the {rgb.shape[1]}x{rgb.shape[0]} result encodes to {len(data) / 2**20:.1f} MiB "
            f"as {name}, over this server's message limit of {max_reply_bytes / 2**20:.0f} MiB "
            f"(--max-message-mb){other}, or send a smaller image", reason="RESULT_TOO_LARGE")
    return data


def _encode(rgb: np.ndarray, *, alpha: np.ndarray | None, fmt: int, quality: int,
            icc_profile: bytes | None) -> bytes:
    name = output_format_name(fmt)
    if name == "PNG":  # lossless, on several threads (services/common/png.py)
        return encode_png(rgb if alpha is None else np.dstack([rgb, alpha]), level=1,
                          icc_profile=icc_profile)
    if alpha is not None and name != "JPEG":
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    else:
        image = Image.fromarray(rgb, "RGB")
    buffer = io.BytesIO()
    extra = {} if icc_profile is None else {"icc_profile": icc_profile}
    if name == "JPEG":
        image.save(buffer, "JPEG", quality=quality, **extra)
    else:
        image.save(buffer, "WEBP", quality=quality, **extra)
    return buffer.getvalue()


#: BT.601 luma weights of R, G and B (what Pillow's convert("L") uses).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 BT.601 luma, rounded."""
    weighted = rgb.astype(np.float32) @ LUMA_WEIGHTS
    return np.clip(np.rint(weighted), 0, 255).astype(np.uint8)


def _encode_grey(grey: np.ndarray, *, alpha: np.ndarray | None, fmt: int, quality: int
                 ) -> bytes:
    name = output_format_name(fmt)
    if name == "PNG":
        return encode_png(grey if alpha is None else np.dstack([grey, alpha]), level=1)
    if name == "JPEG":  # no alpha: the caller flattened the image on white
        buffer = io.BytesIO()
        Image.fromarray(grey, "L").save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()
    return _encode(np.dstack([grey] * 3), alpha=alpha, fmt=fmt, quality=quality,
                   icc_profile=None)


def resize_longest_side(rgb: np.ndarray, longest: int) -> np.ndarray:
    """Resizes so the longest side is ``longest`` (bicubic; downscales use the reducer)."""
    height, width = rgb.shape[:2]
    scale = longest / max(height, width)
    if abs(scale - 1.0) < 1e-9:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(rgb)
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC,
                                   reducing_gap=3.0 if scale < 1 else None))
