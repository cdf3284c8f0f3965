"""What an image or a sidecar says about itself: capture time, camera, lens, serial, exposure,
GPS, rating, colour label, pick/reject, keywords, title, caption, and which editors left
develop settings. Bytes in, a plain dict out (stored as JSON in the index).

In-file metadata (EXIF with makernotes, IPTC, XMP) and XMP sidecars are read with pyexiv2
(Exiv2); RawTherapee's .pp3 is an INI file read here, Capture One's .cos an XML file read here
(rating and colour tag), Canon DPP's .vrd for the XMP block it may hold (pyexiv2 reads that).
DxO's .dop and DPP's .dr4 are recognised (their editor's settings are present) but hold nothing
read here; Apple's .aae is not read at all. All are linked to their image (sidecars.py) and kept
like any file.
"""

from __future__ import annotations

import configparser
import math
import re
import struct
from fractions import Fraction
from xml.etree import ElementTree

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
    """'image', 'xmp', 'pp3', 'cos', 'dop', 'vrd' or 'dr4' from a file's first bytes (or, for
    an image, from its name), or None (not analysed)."""
    if head.startswith((b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"IIRO", b"IIU\x00",
                        b"FUJIFILM", b"\x00MRM", b"FOVb", b"II\x1a\x00\x00\x00HEAPCCDR",
                        b"\x89PNG", b"\xff\x01Exiv2")):
        return "image"
    if head[4:8] == b"ftyp" and head[8:12] in IMAGE_BRANDS:  # not MP4/MOV video
        return "image"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if _COS.match(stripped):
        return "cos"
    if stripped.startswith((b"<?xpacket", b"<x:xmpmeta", b"<?xml")) and b"xmp" in head[:512]:
        return "xmp"
    if stripped.startswith(b"[Version]") and b"AppVersion" in head[:200]:
        return "pp3"
    if _DOP.match(stripped):
        return "dop"
    if head.startswith(VRD_MAGIC):
        return "vrd"
    if head.startswith(DR4_MAGIC):
        return "dr4"
    if name and is_image_name(name):
        return "image"
    return None


def is_image_name(name: str) -> bool:
    """Whether a file name has an image's extension (IMG_0001.CR2, not IMG_0001.CR2.tmp)."""
    return "." in name and "." + name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def read(data: bytes, path: str | None = None) -> dict:
    """The metadata of an image, an XMP sidecar or a .pp3, as a dict of the fields above
    (absent fields left out). Raises MetadataError. `path`, a file that holds the same bytes,
    lets Exiv2 read only the parts it needs (handed bytes, it copies them whole first)."""
    what = sniff(data[:512])
    if what is None:
        raise MetadataError("not an image or sidecar format vaultfs reads")
    if what in _SIDECARS:
        return _SIDECARS[what](data)
    for encoding in ("utf-8", "iso-8859-1"):  # old cameras write Latin-1 text into EXIF
        try:
            with pyexiv2.Image(path) if path is not None else pyexiv2.ImageData(data) as img:
                exif = img.read_exif(encoding) if what == "image" else {}
                iptc = img.read_iptc(encoding) if what == "image" else {}
                xmp = img.read_xmp(encoding)
            return _fields(exif, iptc, xmp, sidecar=what == "xmp")
        except UnicodeDecodeError:
            continue
        except Exception as e:  # pyexiv2 raises plain Exceptions with Exiv2's text
            why = str(e).strip().removeprefix(f"{path}: ")  # (the worker's name for it)
            raise MetadataError(why or type(e).__name__) from None
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


# Capture One's settings (.cos): XML whose root is IMG.
_COS = re.compile(rb"(<\?xml[^>]{0,200}\?>\s*)?<IMG[\s>]")
# DxO's sidecar (.dop): a Lua-like table, `Sidecar = { Source = { Items = { { Settings = {
# Base = {...}, Overrides = {...} }, ... } } } }` (the structure that github.com/SapporoTK/
# DxOKeyFrame.py reads and writes).
_DOP = re.compile(rb"Sidecar\s*=\s*\{")
# Canon DPP: a VRD file (a header and footer that begin so, blocks between) and a DR4 file,
# as exiftool's Image/ExifTool/CanonVRD.pm reads them (ProcessCanonVRD, ProcessDR4).
VRD_MAGIC = b"CANON OPTIONAL DATA\0"
DR4_MAGIC = b"IIII\x04\x00\x04\x00"
VRD_XMP = 0xFFFF00F6  # the VRD block of XMP (CanonVRD.pm's Main table)
# Capture One's colour tags by Color_tag_index, in the order of its menu: 0 none, then red,
# orange, yellow, green, blue, pink, purple (the table of github.com/walterrowe/
# capture-one-scripts, copy-labels-to-finder/README.md).
CAPTURE_ONE_TAGS = (None, "red", "orange", "yellow", "green", "blue", "pink", "purple")


def _cos(data: bytes) -> dict:
    """Capture One's settings file (CaptureOne/Settings*/IMG_0001.CR3.cos): XML elements
    <E K="key" V="value"/>, which exiftool reads as K = V (Image/ExifTool/CaptureOne.pm,
    HandleCOSAttrs), grouped by variant: <IMG><VAR><MD> (metadata: Basic_Rating 0-5,
    Color_tag_index) <DL>/<AL> (adjustments; AL repeats Rating)</VAR></IMG>, as the two files
    of Capture One 4 and 5 in the corpus's EIP package (sidecars/captureone/) hold them. The
    first variant is read. (Python's XML parser resolves no external entity, and its Expat
    refuses entity expansion bombs.)"""
    try:  # (Capture One pads its files with NUL bytes after the XML)
        root = ElementTree.fromstring(data.rstrip(b"\0"))
    except ElementTree.ParseError as e:
        raise MetadataError(f"not a readable .cos: {e}") from None
    variant = root.find("VAR")
    values: dict[str, str] = {}
    for e in (variant if variant is not None else root).iter("E"):
        key, value = e.get("K"), e.get("V")
        if key is not None and value is not None:
            values.setdefault(key, value)
    out: dict = {"kind": "sidecar", "develop": ["capture one"]}
    rating = number(values.get("Basic_Rating", values.get("Rating")))
    if rating is not None:
        out["rating"] = max(0, min(5, int(rating)))
    tag = number(values.get("Color_tag_index"))
    if tag is not None and 0 < tag < len(CAPTURE_ONE_TAGS):
        out["label"] = CAPTURE_ONE_TAGS[int(tag)]
    return out


def _dop(data: bytes) -> dict:
    """DxO PhotoLab's sidecar: its settings are present. Its rating is not read: PhotoLab 5
    and later keep ratings in XMP instead (read with the image's XMP sidecar), and no public
    description of where older versions put it was found."""
    return {"kind": "sidecar", "develop": ["dxo"]}


def _dr4(data: bytes) -> dict:
    """Canon DPP 4's recipe file: its settings are present. It holds no star rating (DPP
    writes those into the image); its check marks (CheckMark 1-5) are DPP's own sorting
    marks, not ratings, and are not read."""
    return {"kind": "sidecar", "develop": ["canon dpp"]}


def _vrd(data: bytes) -> dict:
    """Canon DPP's recipe file: its settings are present, and the XMP block it may hold (which
    exiftool writes: `exiftool -Rating=4 IMG_0001.vrd`) is read as an XMP sidecar. Big-endian:
    a header of 0x1c bytes with the blocks' length at 0x18, then blocks of (type u32, length
    u32, data), then a footer (CanonVRD.pm, ProcessCanonVRD). DPP's check marks are not read
    (see _dr4)."""
    out: dict = {}
    if len(data) >= 0x1c:
        end = min(len(data), 0x1c + struct.unpack_from(">I", data, 0x18)[0])
        pos = 0x1c
        while pos + 8 <= end:
            kind, length = struct.unpack_from(">II", data, pos)
            if kind == VRD_XMP and pos + 8 + length <= end:
                try:
                    out = read(data[pos + 8:pos + 8 + length])
                except MetadataError as e:
                    raise MetadataError(f"the XMP block of a .vrd: {e}") from None
                break
            pos += 8 + length
    return {**out, "kind": "sidecar",
            "develop": sorted(set(out.get("develop", [])) | {"canon dpp"})}


_SIDECARS = {"pp3": _pp3, "cos": _cos, "dop": _dop, "vrd": _vrd, "dr4": _dr4}


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
