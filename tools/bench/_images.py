"""Synthetic camera files for the similarity benchmark and its test: scenes drawn from a seed,
a DNG (the TIFF-based RAW layout of NEF, CR2, ARW and DNG) holding 14-bit Bayer samples, a
small RGB thumbnail in IFD0 and a full-size JPEG preview in a SubIFD, as real cameras write
them, and the variants a photographer's tools make of an image (resize, recompress, crop,
exposure shift).

Scenes are random shapes on a gradient with fine texture, so that two seeds give unrelated
pictures, and a burst frame (`shift`) moves the subject and the camera a little.
"""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def scene(seed: int, size: tuple[int, int], frame: int = 0) -> Image.Image:
    """An RGB picture of `size`: the same seed is the same scene; `frame` > 0 is a later
    frame of a burst (the subject moves a few percent, the camera a little)."""
    rng = random.Random(seed)
    w, h = 480, 320  # drawn small, then scaled: shapes stay smooth at any size
    top, bottom = [rng.randrange(256) for _ in range(3)], [rng.randrange(256) for _ in range(3)]
    ramp = np.linspace(0, 1, h)[:, None, None]
    bg = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp) * np.ones((1, w, 1))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for i in range(rng.randrange(6, 12)):
        x, y = rng.randrange(w), rng.randrange(h)
        rx, ry = rng.randrange(20, 140), rng.randrange(20, 110)
        if i == 0:  # the subject: it moves between the frames of a burst
            x, y = x + 4 * frame, y + 2 * frame
        colour = tuple(rng.randrange(256) for _ in range(3))
        box = [x - rx, y - ry, x + rx, y + ry]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    if frame:  # the photographer's hands: a pixel or two
        img = img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0.7 * frame, 0, 1,
                                                                 -0.4 * frame))
    big = img.resize(size, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed * 1000 + frame).normal(0, 4, (size[1], size[0], 1))
    return Image.fromarray(np.clip(np.asarray(big) + grain, 0, 255).astype(np.uint8), "RGB")


@dataclass
class Capture:
    """What the camera writes into EXIF for one frame."""
    make: str = "VaultCam"
    model: str = "VC-1"
    serial: str = "0001"
    time: str = "2026:11:24 09:15:12"   # EXIF DateTimeOriginal
    subsec: str = "00"
    exposure: tuple[int, int] = (1, 250)
    fnumber: tuple[int, int] = (8, 1)
    iso: int = 200
    bias: tuple[int, int] = (0, 1)      # ExposureBiasValue, signed rational


def jpeg(img: Image.Image, quality: int = 90, capture: Capture | None = None) -> bytes:
    """A JPEG of img; with EXIF as a camera writes it when `capture` is given."""
    out = io.BytesIO()
    kw = {"exif": _exif(capture).tobytes()} if capture else {}
    img.save(out, "JPEG", quality=quality, **kw)
    return out.getvalue()


def _exif(c: Capture) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = c.make, c.model
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = c.time
    sub[0x9291] = c.subsec
    sub[0x829A] = c.exposure[0] / c.exposure[1]
    sub[0x829D] = c.fnumber[0] / c.fnumber[1]
    sub[0x8827] = c.iso
    sub[0x9204] = c.bias[0] / c.bias[1]
    sub[0xA431] = c.serial
    return exif


# ---- DNG -----------------------------------------------------------------------------------
_TYPES = {"B": 1, "A": 2, "H": 3, "I": 4, "R": 5, "r": 10}  # byte, ascii, short, long, rationals
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 10: 8}


def _ifd(entries: dict[int, tuple[str, object]], at: int, next_ifd: int = 0) -> tuple[bytes,
                                                                                       bytes]:
    """A little-endian TIFF IFD placed at offset `at`, and its out-of-line values (which follow
    it directly)."""
    head = struct.pack("<H", len(entries))
    values = b""
    extra_at = at + 2 + 12 * len(entries) + 4
    for tag in sorted(entries):
        kind, value = entries[tag]
        t = _TYPES[kind]
        if kind == "A":
            raw = value.encode() + b"\0"
        elif kind == "B":
            raw = bytes(value)
        elif kind in "Rr":
            fmt = "<II" if kind == "R" else "<ii"
            raw = b"".join(struct.pack(fmt, *v) for v in value)
        else:
            raw = struct.pack(f"<{len(value)}{kind}", *value)
        count = len(raw) // _SIZES[t]
        if len(raw) <= 4:
            field = raw.ljust(4, b"\0")
        else:
            if (extra_at + len(values)) % 2:
                values += b"\0"
            field = struct.pack("<I", extra_at + len(values))
            values += raw
        head += struct.pack("<HHI", tag, t, count) + field
    return head + struct.pack("<I", next_ifd), values


def dng(img: Image.Image, capture: Capture, *, quality: int = 85,
        thumb_size: tuple[int, int] = (256, 171), orientation: int = 1,
        seed: int = 0) -> tuple[bytes, tuple[int, int]]:
    """A DNG of `img` at its full size: IFD0 with a small RGB thumbnail and the camera's
    EXIF, SubIFD 1 the Bayer samples (RGGB, 14 bits in 16, with sensor noise), SubIFD 2 a
    full-size JPEG preview. Returns the file and the preview's (offset, length)."""
    w, h = img.size
    w, h = w & ~1, h & ~1
    thumb_img = img.resize(thumb_size, Image.Resampling.BILINEAR)
    thumb = thumb_img.tobytes()
    preview = jpeg(img, quality)
    rgb = np.asarray(img, dtype=np.uint16)[:h, :w]
    cfa = np.empty((h, w), np.uint16)
    cfa[0::2, 0::2] = rgb[0::2, 0::2, 0]
    cfa[0::2, 1::2] = rgb[0::2, 1::2, 1]
    cfa[1::2, 0::2] = rgb[1::2, 0::2, 1]
    cfa[1::2, 1::2] = rgb[1::2, 1::2, 2]
    noise = np.random.default_rng(seed).integers(0, 48, (h, w), dtype=np.uint16)
    cfa = (cfa * 60 + 512 + noise).astype("<u2").tobytes()  # 14-bit range, black at 512

    exif = {0x829A: ("R", [capture.exposure]), 0x829D: ("R", [capture.fnumber]),
            0x8827: ("H", [capture.iso]), 0x9003: ("A", capture.time),
            0x9291: ("A", capture.subsec), 0x9204: ("r", [capture.bias]),
            0xA431: ("A", capture.serial)}
    common = {0x0102: ("H", [8, 8, 8]), 0x0106: ("H", [2]), 0x0115: ("H", [3])}
    # Layout: header, IFD0 (+values), EXIF IFD, raw IFD, preview IFD, thumb, preview, raw.
    ifd0_at = 8

    def layout(offsets: dict[str, int]) -> list[bytes]:
        ifd0 = {0x00FE: ("I", [1]), 0x0100: ("I", [thumb_size[0]]),
                0x0101: ("I", [thumb_size[1]]), 0x0103: ("H", [1]),
                0x010F: ("A", capture.make), 0x0110: ("A", capture.model),
                0x0111: ("I", [offsets["thumb"]]), 0x0112: ("H", [orientation]),
                0x0116: ("I", [thumb_size[1]]), 0x0117: ("I", [len(thumb)]),
                0x014A: ("I", [offsets["raw_ifd"], offsets["preview_ifd"]]),
                0x8769: ("I", [offsets["exif"]]),
                0xC612: ("B", [1, 4, 0, 0]), 0xC614: ("A", f"{capture.make} {capture.model}"),
                0xC621: ("r", [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1),
                               (1, 1)]),
                0xC628: ("R", [(1, 2), (1, 1), (1, 2)]), 0xC65A: ("H", [21])}
        ifd0.update(common)
        raw_ifd = {0x00FE: ("I", [0]), 0x0100: ("I", [w]), 0x0101: ("I", [h]),
                   0x0102: ("H", [16]), 0x0103: ("H", [1]), 0x0106: ("H", [32803]),
                   0x0111: ("I", [offsets["raw"]]), 0x0115: ("H", [1]),
                   0x0116: ("I", [h]), 0x0117: ("I", [len(cfa)]),
                   0x828D: ("H", [2, 2]), 0x828E: ("B", [0, 1, 1, 2]),
                   0xC61A: ("I", [512]), 0xC61D: ("I", [16383])}
        preview_ifd = {0x00FE: ("I", [1]), 0x0100: ("I", [w]), 0x0101: ("I", [h]),
                       0x0103: ("H", [7]), 0x0106: ("H", [6]),
                       0x0111: ("I", [offsets["preview"]]), 0x0115: ("H", [3]),
                       0x0116: ("I", [h]), 0x0117: ("I", [len(preview)]),
                       0x0102: ("H", [8, 8, 8])}
        parts, at = [], ifd0_at
        for name, entries in (("ifd0", ifd0), ("exif", exif), ("raw_ifd", raw_ifd),
                              ("preview_ifd", preview_ifd)):
            offsets[name] = at
            head, values = _ifd(entries, at)
            parts.append(head + values + (b"\0" if len(head + values) % 2 else b""))
            at += len(parts[-1])
        for name, blob in (("thumb", thumb), ("preview", preview), ("raw", cfa)):
            offsets[name] = at
            parts.append(blob)
            at += len(blob)
        return parts

    offsets = {k: 0 for k in ("thumb", "raw_ifd", "preview_ifd", "exif", "preview", "raw")}
    layout(offsets)  # once for the sizes, once with the offsets they give
    parts = layout(offsets)
    data = b"II*\x00" + struct.pack("<I", ifd0_at) + b"".join(parts)
    return data, (offsets["preview"], len(preview))


# ---- what editors and exporters do ---------------------------------------------------------
def resized(img: Image.Image, scale: float) -> Image.Image:
    return img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                      Image.Resampling.LANCZOS)


def cropped(img: Image.Image, fraction: float) -> Image.Image:
    """`fraction` of the width and height taken off, evenly from both sides."""
    dx, dy = round(img.width * fraction / 2), round(img.height * fraction / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def exposed(img: Image.Image, stops: float) -> Image.Image:
    """Brighter or darker by `stops`, on linear light (sRGB decoded, scaled, encoded)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    lin = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4) * 2 ** stops
    lin = np.clip(lin, 0, 1)
    out = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
    return Image.fromarray((out * 255 + 0.5).astype(np.uint8), "RGB")
