"""A perceptual fingerprint of an image, and where its embedded preview lies: bytes in, a dict
out (stored in the media index, docs/store-format.md §8.6).

The picture fingerprinted is the cheapest faithful one the file holds:

- a JPEG (or MPO) is decoded at 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode): a
  24 Mpx file costs what a 0.4 Mpx one does;
- a RAW (anything LibRaw opens: NEF, CR2, CR3, ARW, DNG, RAF, ORF, RW2...) gives its embedded
  preview (rawpy's extract_thumb, which reads it without touching the sensor data), decoded the
  same way; its byte range in the file is recorded when the preview is a JPEG stored whole
  (`.vault/previews` serves those bytes as they are);
- a RAW with no preview is demosaiced at half size (rawpy), the one case that decodes sensor data;
- HEIC/HEIF (phones) give their largest embedded thumbnail (pillow-heif), else are decoded whole;
- other formats Pillow reads (TIFF, PNG, WebP...) are decoded whole; failing all of these, the
  EXIF thumbnail (pyexiv2).

The picture is turned upright (EXIF orientation, or the RAW's), reduced to 256x256 grey, and
hashed twice with imagehash: a DCT hash (phash) and a Haar wavelet hash (whash), 64 bits each.
The distance of two pictures is the sum of the two Hamming distances (0-128): the measured
figures behind the thresholds that use it are in media/groups.py and tools/bench/similarity.py.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence

import imagehash
import numpy as np
import pillow_heif
import pyexiv2
import rawpy
import xxhash
from PIL import Image, ImageOps

from . import metadata

pyexiv2.set_log_level(4)  # Exiv2's warnings about odd makernotes go nowhere; errors raise

HASH_SIZE = 8          # 8x8 bits: 64-bit hashes
WORK_SIZE = 256        # the grey square both hashes are computed from
MIN_SIDE = 16          # pictures smaller than this carry no fingerprint worth comparing
# LibRaw's orientation (sizes.flip) as the turn that makes the picture upright.
_FLIPS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90,
          6: Image.Transpose.ROTATE_270}
JPEG_MAGIC = b"\xff\xd8\xff"


class FingerprintError(Exception):
    """No decoder reads a picture from these bytes; the message says why."""


def fingerprint(data: bytes) -> dict:
    """The fingerprint record of an image's bytes: `fingerprint` ({"phash", "whash"}: 16 hex
    digits each), `picture` ([width, height] of what was hashed, before reduction),
    `format` ("jpeg", "mpo", "raw" or Pillow's name in lower case), and `preview`
    ([offset, length] of a whole embedded JPEG, the file itself for a JPEG) when there is
    one. Raises FingerprintError."""
    return _record(*_picture(data))


def preview_fingerprint(data: bytes, unread: Sequence[tuple[int, int]] = ()) -> dict | None:
    """What `fingerprint` gives a RAW whose picture is an embedded JPEG preview stored whole in
    the file (with its `preview` range), read without the sensor data: LibRaw reads the
    preview alone, so those bytes may be anything (zeros not decoded). None for anything else
    (no such preview, not a RAW, no fingerprint, or a preview that overlaps one of the
    (offset, length) ranges `unread`): its picture needs the file whole."""
    try:
        found = _raw(data, demosaic=False, unread=unread)
        return _record(*found) if found is not None and found[3] is not None else None
    except FingerprintError:
        return None


def preview_record(data: bytes, unread: Sequence[tuple[int, int]], path: str) -> dict | None:
    """A RAW's metadata (Exiv2 reading `path`, a file of the same bytes) with what
    `preview_fingerprint` gives, in one call: the decoder worker reads the bytes once. None
    where that gives None; MetadataError as `metadata.read` raises it."""
    found = preview_fingerprint(data, unread)
    return None if found is None else metadata.read(data, path) | found


def _record(img: Image.Image, size: tuple[int, int], fmt: str,
            preview: tuple[int, int] | None) -> dict:
    if min(size) < MIN_SIDE:
        raise FingerprintError(f"{size[0]}x{size[1]} pixels: too small to fingerprint")
    grey = img.convert("L").resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR,
                                   reducing_gap=2.0)
    out = {"fingerprint": {"phash": str(imagehash.phash(grey, HASH_SIZE)),
                           "whash": str(imagehash.whash(grey, HASH_SIZE))},
           "picture": list(size), "format": fmt}
    if preview is not None:
        out["preview"] = list(preview)
    return out


def digest(data: bytes) -> str:
    """The record's `digest`: XXH3-128 of the bytes, hex."""
    return xxhash.xxh3_128_hexdigest(data)


def image_record(data: bytes) -> dict:
    """What the media index keeps of an image beyond its metadata: `digest` and the
    fingerprint record, or `fingerprint_error` saying why there is none."""
    out: dict = {"digest": digest(data)}
    try:
        out.update(fingerprint(data))
    except (FingerprintError, MemoryError) as e:
        out["fingerprint_error"] = str(e) or type(e).__name__
    return out


def _picture(data: bytes) -> tuple[Image.Image, tuple[int, int], str, tuple[int, int] | None]:
    """(the upright picture, possibly reduced; its full size; format; preview range)."""
    if data.startswith(JPEG_MAGIC):
        img, size = _jpeg(data)
        return img, size, (img.format or "jpeg").lower(), (0, len(data))
    reasons: list[str] = []
    for decode in (_raw, _heif, _pillow, _exif_thumbnail):
        try:
            return decode(data)
        except FingerprintError as e:
            reasons.append(str(e))
    raise FingerprintError("; ".join(reasons))


def _jpeg(data: bytes, upright: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """A JPEG decoded small; turned by its own EXIF orientation unless `upright` is False
    (a RAW's preview: the RAW's orientation applies, and LibRaw writes it into the EXIF it
    adds to the preview as well)."""
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        img.draft("RGB", (WORK_SIZE, WORK_SIZE))  # DCT scaling: decodes 1/2, 1/4 or 1/8
        if upright:
            img = ImageOps.exif_transpose(img)
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FingerprintError(f"JPEG: {complaint(e)}") from None
    return img, _upright(size, img)


def _raw(data: bytes, demosaic: bool = True, unread: Sequence[tuple[int, int]] = ()):
    """A RAW's embedded preview (or thumbnail bitmap); with none, its sensor data demosaiced
    at half size (or, without `demosaic`, None where the preview is not a JPEG). A JPEG
    preview is looked for only outside the (offset, length) ranges `unread`."""
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            turn = _FLIPS.get(raw.sizes.flip)
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                img, size = _jpeg(bytes(thumb.data), upright=False)
                preview = _locate(data, bytes(thumb.data), unread)
            elif not demosaic:
                return None
            else:
                if thumb is not None:  # an RGB bitmap
                    img = Image.fromarray(np.asarray(thumb.data, dtype=np.uint8))
                else:
                    img = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True,
                                                          output_bps=8, user_flip=0))
                size, preview = img.size, None
    except (rawpy.LibRawError, OSError, ValueError) as e:
        raise FingerprintError(f"LibRaw: {complaint(e)}") from None
    if turn is not None:
        img = img.transpose(turn)
        size = (size[1], size[0]) if turn != Image.Transpose.ROTATE_180 else size
    return img, size, "raw", preview


def _heif(data: bytes):
    """HEIC/HEIF/AVIF (phones): the largest thumbnail the file holds, else the picture decoded
    whole (libheif through pillow-heif, which turns both upright)."""
    if not pillow_heif.is_supported(data):
        raise FingerprintError("libheif: not HEIF")
    try:
        image = pillow_heif.open_heif(data, convert_hdr_to_8bit=True)
        image = image[image.primary_index]
        thumbs = image.info.get("thumbnails") or []
        if thumbs:
            best = max(range(len(thumbs)), key=lambda i: thumbs[i])
            img = image.get_thumbnail(best).to_pillow()
        else:
            img = image.to_pillow()
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise FingerprintError(f"libheif: {complaint(e)}") from None
    return img, image.size, "heif", None


def _pillow(data: bytes):
    """Any other format Pillow reads (TIFF, PNG, WebP...), decoded whole."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = (img.format or "image").lower(), img.size
            img = ImageOps.exif_transpose(_reduced(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FingerprintError(f"Pillow: {complaint(e)}") from None
    return img, _upright(size, img), fmt, None


def _exif_thumbnail(data: bytes):
    """The small JPEG in EXIF's IFD1, where nothing else could be read."""
    try:
        with pyexiv2.ImageData(data) as meta:
            thumb = meta.read_thumbnail()
    except Exception as e:  # pyexiv2 raises plain Exceptions with Exiv2's text
        raise FingerprintError(f"Exiv2: {complaint(e)}") from None
    if not thumb:
        raise FingerprintError("no EXIF thumbnail")
    img, size = _jpeg(thumb)
    return img, size, "thumbnail", _locate(data, thumb)


def _reduced(img: Image.Image) -> Image.Image:
    """A large picture reduced by an integer factor as it is decoded where the format allows
    (for the rest, the decode is whole: reduce() is then only a cheap box filter)."""
    factor = max(1, min(img.size) // WORK_SIZE)
    img.load()
    return img.reduce(factor) if factor > 1 else img


def _upright(size: tuple[int, int], img: Image.Image) -> tuple[int, int]:
    """The full size turned as the (reduced) upright picture was."""
    turned = (img.width > img.height) != (size[0] > size[1]) and size[0] != size[1]
    return (size[1], size[0]) if turned else size


def _locate(data: bytes, jpeg: bytes,
            unread: Sequence[tuple[int, int]] = ()) -> tuple[int, int] | None:
    """Where the embedded JPEG lies in the file (first), if it is stored there whole outside
    the (offset, length) ranges `unread`. LibRaw hands back a preview that has no EXIF of its
    own with an EXIF segment put in after its SOI marker: the file holds it without that
    segment."""
    bodies = [jpeg[2:]]
    if jpeg[2:4] == b"\xff\xe1":
        bodies.append(jpeg[4 + int.from_bytes(jpeg[4:6], "big"):])
    # One scan for bytes from the middle of what all bodies end with (entropy-coded data,
    # varied), where the JPEG's first bytes, which end in zeros, would crawl through zeros;
    # and none of the ranges left unread (zeros, a file's bulk), where even that crawls
    # (0.6 GB/s: 40 ms of the 49 that fingerprinting a 24 MB DNG took).
    view, tail = memoryview(data), bodies[-1]
    mid = len(tail) // 2
    needle = tail[mid:mid + 32]
    for lo, hi in _gaps(len(data), unread):
        at = data.find(needle, lo, hi)
        while at >= 0:
            for body in bodies:
                start = at - (len(body) - len(tail) + mid) - 2
                if lo <= start and start + 2 + len(body) <= hi and \
                        view[start:start + 2] == b"\xff\xd8" and \
                        view[start + 2:start + 2 + len(body)] == body:
                    return start, len(body) + 2
            at = data.find(needle, at + 1, hi)
    return None


def _gaps(size: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """[lo, hi) of each stretch of [0, size) outside the (offset, length) `ranges`."""
    at = 0
    for off, length in sorted(ranges):
        if off > at:
            yield at, off
        at = max(at, off + length)
    if at < size:
        yield at, size


def complaint(e: BaseException) -> str:
    """A decoder's complaint in a sentence (without Pillow's "<_io.BytesIO object at 0x...>")."""
    text = e.args[0] if e.args else ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return re.sub(r"\s*<[^>]*object at 0x[0-9a-f]+>", "", str(text)).strip() or type(e).__name__
