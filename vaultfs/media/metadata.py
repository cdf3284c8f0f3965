"""What an image or a sidecar says about itself: capture time, camera, lens, serial, exposure,
GPS, rating, colour label, pick/reject, keywords, title, caption, and which editors left
develop settings. Bytes in, a plain dict out (stored as JSON in the index).

In-file metadata (EXIF with makernotes, IPTC, XMP) and XMP sidecars are read with pyexiv2
(Exiv2); RawTherapee's .pp3 is an INI file read here. Other sidecars (DxO .dop, Capture One .cos,
Canon DPP .vrd/.dr4, Apple .aae) hold no rating a library can read; they are still linked to
their image (sidecars.py) and kept like any file.
"""

from __future__ import annotations

import configparser
import math
import re
from fractions import Fraction

import pyexiv2

pyexiv2.set_log_level(4)  # Exiv2's warnings about odd makernotes go nowhere; errors raise

LABELS = ("red", "yellow", "green", "blue", "purple")
# ISO-BMFF major brands of still images: HEIF/HEIC, AVIF, Canon CR3.
IMAGE_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                b"mif1", b"msf1", b"avif", b"avis", b"crx "}
# Colour labels as numbers: darktable's colorlabels (0-4), RawTherapee's ColorLabel (1-5).
DEVELOP_MARKS = {
    "Xmp.crs.": "camera raw",          # Lightroom, Camera Raw
    "Xmp.darktable.": "darktable",
    "Xmp.digiKam.": "digikam",
    "Xmp.photomechanic.": "photo mechanic",
    "Xmp.xmpDM.": None,
}


class MetadataError(Exception):
    """The bytes are not something whose metadata can be read; the message says why."""


# Names that say "image" where the bytes do not (a damaged or unknown file is still an image
# whose failure to read is worth saying).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .mpo .heic .heif .hif .avif .png .webp .tif .tiff .dng .nef .nrw .cr2 "
    ".cr3 .crw .arw .srf .sr2 .raf .orf .rw2 .rwl .pef .srw .x3f .3fr .iiq .erf .mef .mos .mrw "
    ".gpr .raw".split())


def sniff(head: bytes, name: str | None = None) -> str | None:
    """'image', 'xmp' or 'pp3' from a file's first bytes (or, for an image, from its name),
    or None (not analysed)."""
    if head.startswith((b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"IIRO", b"IIU\x00",
                        b"FUJIFILM", b"\x00MRM", b"FOVb", b"II\x1a\x00\x00\x00HEAPCCDR",
                        b"\x89PNG", b"\xff\x01Exiv2")):
        return "image"
    if head[4:8] == b"ftyp" and head[8:12] in IMAGE_BRANDS:  # not MP4/MOV video
        return "image"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith((b"<?xpacket", b"<x:xmpmeta", b"<?xml")) and b"xmp" in head[:512]:
        return "xmp"
    if stripped.startswith(b"[Version]") and b"AppVersion" in head[:200]:
        return "pp3"
    if name and "." in name and "." + name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
        return "image"
    return None


def read(data: bytes) -> dict:
    """The metadata of an image, an XMP sidecar or a .pp3, as a dict of the fields above
    (absent fields left out). Raises MetadataError."""
    what = sniff(data[:512])
    if what is None:
        raise MetadataError("not an image or sidecar format vaultfs reads")
    if what == "pp3":
        return _pp3(data)
    for encoding in ("utf-8", "iso-8859-1"):  # old cameras write Latin-1 text into EXIF
        try:
            with pyexiv2.ImageData(data) as img:
                exif = img.read_exif(encoding) if what == "image" else {}
                iptc = img.read_iptc(encoding) if what == "image" else {}
                xmp = img.read_xmp(encoding)
            return _fields(exif, iptc, xmp, sidecar=what == "xmp")
        except UnicodeDecodeError:
            continue
        except Exception as e:  # pyexiv2 raises plain Exceptions with Exiv2's text
            raise MetadataError(str(e).strip() or type(e).__name__) from None
    raise MetadataError("text in the metadata is in no encoding vaultfs knows")


def _fields(exif: dict, iptc: dict, xmp: dict, sidecar: bool) -> dict:
    out: dict = {"kind": "sidecar" if sidecar else "image"}
    when = exif.get("Exif.Photo.DateTimeOriginal") or xmp.get("Xmp.exif.DateTimeOriginal") \
        or xmp.get("Xmp.photoshop.DateCreated")
    if when:
        t = when.strip()
        if t[4:5] == ":":  # EXIF's "2026:11:24 09:15:12"; XMP has ISO 8601 already
            t = t.replace(":", "-", 2).replace(" ", "T")
        t = t[:19]
        sub = exif.get("Exif.Photo.SubSecTimeOriginal")
        out["capture_time"] = f"{t}.{sub.strip()}" if sub and sub.strip().isdigit() else t
    _put(out, "make", exif.get("Exif.Image.Make") or xmp.get("Xmp.tiff.Make"))
    _put(out, "model", exif.get("Exif.Image.Model") or xmp.get("Xmp.tiff.Model"))
    _put(out, "lens", exif.get("Exif.Photo.LensModel") or xmp.get("Xmp.aux.Lens")
         or xmp.get("Xmp.exifEX.LensModel"))
    _put(out, "serial", exif.get("Exif.Photo.BodySerialNumber")
         or exif.get("Exif.Canon.SerialNumber") or exif.get("Exif.Nikon3.SerialNumber")
         or xmp.get("Xmp.aux.SerialNumber") or xmp.get("Xmp.exifEX.BodySerialNumber"))
    _put(out, "exposure_time", exif.get("Exif.Photo.ExposureTime"))
    _put(out, "fnumber", number(exif.get("Exif.Photo.FNumber")))
    _put(out, "iso", number(exif.get("Exif.Photo.ISOSpeedRatings")))
    _put(out, "exposure_bias", number(exif.get("Exif.Photo.ExposureBiasValue")))
    # The step of an automatic exposure bracket, where the maker notes say (0: none).
    bracket = number(exif.get("Exif.CanonSi.AEBBracketValue")
                     or exif.get("Exif.Nikon3.ExposureBracketComp"))
    if bracket:
        out["bracket"] = bracket
    lat, lon = _gps(exif, "Latitude"), _gps(exif, "Longitude")
    if lat is not None and lon is not None:
        out["gps"] = [round(lat, 7), round(lon, 7)]
    rating = number(xmp.get("Xmp.xmp.Rating"))
    if rating is None:
        rating = number(exif.get("Exif.Image.Rating"))
    # Cameras write 0 into every frame: in an image, 0 means "not rated", not a decision that
    # would outvote a sidecar's stars. In a sidecar, 0 is a decision (un-rated by hand).
    if rating is not None and (rating != 0 or sidecar):
        out["rating"] = max(-1, min(5, int(rating)))
        out["reject"] = out["rating"] == -1
    label = xmp.get("Xmp.xmp.Label") or xmp.get("Xmp.photomechanic.ColorClass")
    if isinstance(label, str) and label.strip():
        out["label"] = label.strip().lower()
    dt_labels = xmp.get("Xmp.darktable.colorlabels")
    if "label" not in out and isinstance(dt_labels, list) and dt_labels:
        idx = number(dt_labels[0])
        if idx is not None and 0 <= idx < len(LABELS):
            out["label"] = LABELS[int(idx)]
    if str(xmp.get("Xmp.xmpDM.pick", "")) == "1" or \
            str(xmp.get("Xmp.photomechanic.Tagged", "")).lower() == "true":
        out["pick"] = True
    keywords = list(xmp.get("Xmp.dc.subject") or []) + list(iptc.get("Iptc.Application2.Keywords")
                                                            or [])
    if keywords:
        out["keywords"] = sorted(set(k.strip() for k in keywords if k.strip()))
    _put(out, "title", _lang(xmp.get("Xmp.dc.title")) or iptc.get("Iptc.Application2.ObjectName"))
    _put(out, "caption", _lang(xmp.get("Xmp.dc.description"))
         or iptc.get("Iptc.Application2.Caption") or exif.get("Exif.Image.ImageDescription"))
    develop = sorted({name for prefix, name in DEVELOP_MARKS.items() if name
                      and any(k.startswith(prefix) for k in xmp)})
    if develop:
        out["develop"] = develop
    _put(out, "document_id", xmp.get("Xmp.xmpMM.DocumentID"))
    _put(out, "original_document_id", xmp.get("Xmp.xmpMM.OriginalDocumentID"))
    _put(out, "derived_from", xmp.get("Xmp.xmpMM.DerivedFrom/stRef:documentID"))
    return out


def _pp3(data: bytes) -> dict:
    """RawTherapee's processing profile: [General] Rank, ColorLabel, InTrash."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read_string(data.decode("utf-8", errors="replace"))
    except configparser.Error as e:
        raise MetadataError(f"not a readable .pp3: {e}") from None
    out: dict = {"kind": "sidecar", "develop": ["rawtherapee"]}
    general = cp["General"] if cp.has_section("General") else {}
    rank = number(general.get("Rank"))
    if rank is not None:
        out["rating"] = max(0, min(5, int(rank)))
    colour = number(general.get("ColorLabel"))
    if colour is not None and 1 <= colour <= len(LABELS):
        out["label"] = LABELS[int(colour) - 1]
    if "InTrash" in general or "rating" in out:
        out["reject"] = str(general.get("InTrash", "")).lower() == "true"
    return out


def _put(out: dict, key: str, value) -> None:
    if isinstance(value, str):
        value = value.strip().strip("\x00").strip()
    if value not in (None, "", []):
        out[key] = value


_NUMBER = re.compile(r"[+-]?\d{1,9}(\.\d{1,9})?(/\d{1,9})?")


def number(value) -> float | None:
    """'8/1', '100', '-1/3', '2.8', ['100'] -> a number; None if it is none. Only plain short
    numbers: '1e20000000' would make Fraction build a huge integer, holding the GIL."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):  # (read back from the index: a number already)
        return value if math.isfinite(value) else None
    text = str(value).strip().split(" ")[0]
    if not _NUMBER.fullmatch(text):
        return None
    try:
        n = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None
    return int(n) if n == int(n) else round(n, 4)


def _gps(exif: dict, axis: str) -> float | None:
    value, ref = exif.get(f"Exif.GPSInfo.GPS{axis}"), exif.get(f"Exif.GPSInfo.GPS{axis}Ref")
    if not value:
        return None
    try:
        d, m, s = (float(Fraction(p)) for p in value.split())
    except (ValueError, ZeroDivisionError):
        return None
    deg = d + m / 60 + s / 3600
    return -deg if ref in ("S", "W") else deg


def _lang(value) -> str | None:
    if isinstance(value, dict):
        return value.get('lang="x-default"') or next(iter(value.values()), None)
    return value
