"""Conversion to sRGB through an image's embedded ICC profile, by littlecms.

- An RGB image tagged with a profile (Display P3, Adobe RGB...) is converted for the models
  that read colours as sRGB: the style networks were trained on sRGB photos and paintings,
  the embedding model on sRGB photos. (Super-resolution keeps the input's colours, so it
  keeps their space and carries the profile on.)
- A CMYK or grey image (8 or 16 bits) becomes RGB through its profile (a press's, a grey
  gamma or dot-gain curve), where it has one.
"""

from __future__ import annotations

import io
import logging
from functools import lru_cache

import numpy as np
from PIL import Image

try:  # scripts/setup.sh and the image build Pillow with littlecms; another build may lack it
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@lru_cache(maxsize=16)
def _transform_to_srgb(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from ``profile``, for pixels of ``mode`` ("RGB", "CMYK", "L", "I;16"),
    to 8-bit sRGB (perceptual intent, which littlecms takes as relative colorimetric for
    the matrix profiles cameras and phones embed); None for a profile littlecms cannot read
    or convert from, or without littlecms. Cached: clients send the same few profiles.

    It is precomputed on littlecms's finer grid (HIGHRESPRECALC). Against the default
    grid, that halves the mean error of a CMYK table and holds 16-bit grey within one
    level of its curve (two in deep shadows otherwise), for 20% more time on CMYK and none
    on RGB or grey."""
    if ImageCms is None:
        log.warning("Pillow has no littlecms: an image's ICC profile is not applied")
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.buildTransform(source, _srgb(), mode, "RGB",
                                       flags=ImageCms.Flags.HIGHRESPRECALC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        log.info("an embedded %s ICC profile cannot be converted from (%s); it is not "
                 "applied", mode, error)
        return None


@lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(rgb: np.ndarray, profile: bytes | None) -> np.ndarray:
    """(H, W, 3) uint8 pixels in the space of ``profile`` as sRGB (colours outside sRGB
    are clipped to it). Without a profile, with one littlecms cannot use, or with an sRGB
    one (:func:`is_srgb_profile`), the pixels are returned as they are, as sRGB."""
    if profile is None or is_srgb_profile(profile):
        return rgb
    converted = _convert(Image.fromarray(rgb, "RGB"), profile)
    return rgb if converted is None else np.asarray(converted)


#: Levels per channel of the grid of colours :func:`is_srgb_profile` converts.
SRGB_PROBE_LEVELS = 17
#: The most a colour may move, in 8-bit levels, for a profile to count as sRGB: the
#: rounding of littlecms's 16-bit pipeline (the IEC 61966-2.1 profile that cameras and
#: scikit-image's photos embed moves some colours by 1 against littlecms's own sRGB).
SRGB_TOLERANCE = 1


@lru_cache(maxsize=16)
def is_srgb_profile(profile: bytes) -> bool:
    """Whether converting from RGB ``profile`` to sRGB leaves every colour within
    :data:`SRGB_TOLERANCE` levels: the profile *is* sRGB (most tagged photos carry one),
    and :func:`to_srgb` skips the conversion, a full-image pass through littlecms for
    nothing but rounding (decode_image(srgb=True) of a 2560 x 1600 photo tagged with the
    IEC 61966-2.1 profile took 192 ms with it and 40 ms without, on the 2-core CPU).

    Decided once per profile (cached by its bytes: clients send the same few) by
    converting a probe: a :data:`SRGB_PROBE_LEVELS`-level grid of the RGB cube, plus every
    level of each channel and of grey, so that a tone curve which leaves sRGB's between
    the grid's levels is caught too. A wide-gamut profile (Display P3, Adobe RGB) moves
    saturated colours by tens of levels, and sRGB's primaries with a plain gamma 2.2 curve
    move dark ones by 9: both are converted. False for a profile littlecms cannot convert
    RGB from (to_srgb applies none then)."""
    probe = _srgb_probe()
    converted = _convert(Image.fromarray(probe, "RGB"), profile)
    if converted is None:
        return False
    moved = np.abs(np.asarray(converted, dtype=np.int16) - probe.astype(np.int16))
    return int(moved.max()) <= SRGB_TOLERANCE


@lru_cache(maxsize=1)
def _srgb_probe() -> np.ndarray:
    """The colours :func:`is_srgb_profile` converts, as one (rows, 256, 3) uint8 image:
    the grid of the cube, then ramps of red, green, blue and grey over all 256 levels."""
    levels = np.linspace(0, 255, SRGB_PROBE_LEVELS).round().astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.arange(256, dtype=np.uint8)
    dark = np.zeros_like(ramp)
    ramps = np.concatenate([np.stack([ramp, dark, dark], axis=-1),
                            np.stack([dark, ramp, dark], axis=-1),
                            np.stack([dark, dark, ramp], axis=-1),
                            np.stack([ramp, ramp, ramp], axis=-1)])
    colours = np.concatenate([grid, ramps])
    padding = np.zeros((-len(colours) % 256, 3), np.uint8)  # black, in the grid already
    return np.ascontiguousarray(np.concatenate([colours, padding]).reshape(-1, 256, 3))


#: The ICC data colour space a profile must name to convert each Pillow mode's pixels
#: (8- and 16-bit grey alike: littlecms reads either depth).
_PROFILE_SPACES = {"RGB": b"RGB ", "CMYK": b"CMYK", "L": b"GRAY",
                   "I;16": b"GRAY", "I;16L": b"GRAY", "I;16B": b"GRAY"}


def profile_describes(profile: object, mode: str) -> bool:
    """Whether ``profile`` is an ICC profile whose data colour space (bytes 16-19 of its
    header) is that of pixels in Pillow ``mode`` ("RGB", "CMYK", "L", "I;16"...)."""
    space = _PROFILE_SPACES.get(mode)
    return (space is not None and isinstance(profile, bytes) and len(profile) >= 128
            and profile[16:20] == space)


def readable_profile(profile: bytes) -> bool:
    """Whether littlecms reads ``profile`` as an RGB profile it can convert from: one it
    cannot is no use to a viewer either, so an output is not tagged with it (the pixels
    are taken as sRGB, as :func:`to_srgb` takes them). True without littlecms, which
    cannot tell: the profile is carried on as it came."""
    return ImageCms is None or _transform_to_srgb(profile, "RGB") is not None


def profiled_to_srgb(image: Image.Image, profile: object) -> Image.Image | None:
    """A CMYK or grey image (8-bit "L" or 16-bit "I;16") as 8-bit sRGB RGB through its
    embedded ICC ``profile`` (a press's CMYK, or a grey gamma or dot-gain curve); None
    where there is no profile of the image's colour space or littlecms cannot use it, for
    the caller's plain conversion.
    littlecms precomputes the transform on a grid (for CMYK about 64 ms a megapixel here,
    against 260 ms exact), so deep shadows can be a few levels off the profile's table
    (up to 13 on 0.2% of random CMYK pixels; 0.07 levels on average)."""
    if image.mode == "RGB" or not profile_describes(profile, image.mode):
        return None
    assert isinstance(profile, bytes)
    return _convert(image, profile)


def _convert(image: Image.Image, profile: bytes) -> Image.Image | None:
    """``image`` as sRGB RGB through ``profile``; None where littlecms cannot use it."""
    transform = _transform_to_srgb(profile, image.mode)
    if transform is None:
        return None
    converted = ImageCms.applyTransform(image, transform)
    assert converted is not None  # None only with inPlace=True
    return converted
