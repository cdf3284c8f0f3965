"""A JPEG proxy of an image, for `.vault/previews` where the file holds no JPEG preview large
enough (an on-capture policy's `preview = N`): bytes in, a JPEG of N pixels on its long side out
(never more than the picture has), turned upright, with the picture's colour profile.

- a RAW (anything LibRaw opens but a plain TIFF, below): its sensor data demosaiced by LibRaw
  (rawpy, camera white balance, sRGB), at half size when that still gives N pixels;
- HEIC/HEIF/AVIF: decoded by libheif (pillow-heif), which turns it upright;
- a plain TIFF (no DNG or CFA tags, its first image not a reduced one: scans, exports,
  drones' and scientific cameras' 16-bit TIFFs, which LibRaw would take for sensor data) and
  anything else Pillow reads (PNG, WebP, JPEG...): decoded by Pillow; 16-bit, 32-bit and float
  greys are stretched from their darkest to their lightest value (they say nothing of how
  they are meant to be shown).

Memory stays bounded: a picture over MAX_PIXELS is refused before it is decoded (at most about
three bytes a pixel are held while it is, half that for a RAW at half size), and the proxy is
a JPEG of at most N x N pixels: a few hundred KB at 2048, however large the picture.
"""

from __future__ import annotations

import io

import numpy as np
import pillow_heif
import rawpy
from PIL import Image, ImageOps

from .fingerprint import complaint

MAX_PIXELS = 100_000_000  # ~300 MB of 8-bit RGB while decoding: a 100 Mpx medium format frame
QUALITY = 85
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_DNG_VERSION, _PHOTOMETRIC, _SUBFILE_TYPE = 50706, 262, 254
_SENSOR_PHOTOMETRIC = (32803, 34892)  # colour filter array, LinearRaw
_GREYS = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class PreviewError(Exception):
    """No proxy can be made of these bytes; the message says why."""


def proxy(data: bytes, long_side: int) -> bytes:
    """A JPEG of the image in `data`, `long_side` pixels on its long side at most. Raises
    PreviewError."""
    reasons: list[str] = []
    decoders = (_pillow, _raw, _heif) if _plain_tiff(data) else (_raw, _heif, _pillow)
    for decode in decoders:
        try:
            img, icc = decode(data, long_side)
            break
        except PreviewError as e:
            reasons.append(str(e))
    else:
        raise PreviewError("; ".join(reasons))
    img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=QUALITY, optimize=True, icc_profile=icc)
    return out.getvalue()


def _plain_tiff(data: bytes) -> bool:
    """A TIFF whose first image is the picture itself, not a RAW's sensor data or preview."""
    if not data.startswith(_TIFF_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            tags = img.tag_v2
            return _DNG_VERSION not in tags and \
                tags.get(_PHOTOMETRIC) not in _SENSOR_PHOTOMETRIC and \
                not int(tags.get(_SUBFILE_TYPE, 0)) & 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise PreviewError(f"{width}x{height} pixels: over {MAX_PIXELS // 1_000_000} Mpx, "
                           f"not decoded for a preview")


def _raw(data: bytes, long_side: int) -> tuple[Image.Image, bytes | None]:
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            width, height = raw.sizes.width, raw.sizes.height
            _check_size(width, height)
            half = max(width, height) // 2 >= long_side
            rgb = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
    except (rawpy.LibRawError, OSError, ValueError) as e:
        raise PreviewError(f"LibRaw: {complaint(e)}") from None
    return Image.fromarray(rgb), None


def _heif(data: bytes, long_side: int) -> tuple[Image.Image, bytes | None]:
    if not pillow_heif.is_supported(data):
        raise PreviewError("libheif: not HEIF")
    try:
        image = pillow_heif.open_heif(data, convert_hdr_to_8bit=True)
        image = image[image.primary_index]
        _check_size(*image.size)
        img = image.to_pillow()
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise PreviewError(f"libheif: {complaint(e)}") from None
    return img.convert("RGB"), img.info.get("icc_profile")


def _pillow(data: bytes, long_side: int) -> tuple[Image.Image, bytes | None]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(*img.size)
            img.draft("RGB", (long_side, long_side))  # a JPEG: decoded at 1/2, 1/4 or 1/8
            icc = img.info.get("icc_profile")
            img = ImageOps.exif_transpose(img)  # (loads it)
            img = _stretched(img, long_side) if img.mode in _GREYS else img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PreviewError(f"Pillow: {complaint(e)}") from None
    return img, icc


def _stretched(img: Image.Image, long_side: int) -> Image.Image:
    """A grey of more than 8 bits as 8 bits, from its darkest to its lightest value, averaged
    down by a whole factor first (to no less than `long_side`)."""
    values = np.asarray(img)
    f = max(1, max(values.shape) // long_side)
    if f > 1:
        h, w = values.shape[0] // f * f, values.shape[1] // f * f
        values = values[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    values = values.astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")


def wanted(record: dict, long_side: int) -> bool:
    """Whether an image whose media record (fingerprint.py) is `record` lacks a JPEG preview
    with `long_side` pixels on its long side: it has none, or a smaller one (a RAW's
    thumbnail). A JPEG is its own preview."""
    if record.get("format") in ("jpeg", "mpo"):
        return False
    picture = record.get("picture")
    return "preview" not in record or not picture or max(picture) < long_side
