"""Where an image file's metadata ends and its image data begins: hard cut points for the
chunker, so that an edit of the metadata (a rating, a keyword, a rewritten XMP packet) re-stores
the metadata and leaves the image data's chunks, and their dedup, as they were.

    JPEG (and MPO)   each marker segment before the scan (APPn: EXIF, XMP, ICC, MPF...),
                     the entropy-coded scan, and the further images MPF points at
    TIFF and TIFF-based RAW (DNG, NEF, CR2, ARW, ORF, RW2, PEF, 3FR, IIQ, GPR...)
                     the IFDs and maker notes vs the strips, tiles and embedded JPEGs
    ISO-BMFF (CR3, HEIC/HEIF, AVIF)   each top-level box (ftyp, moov, uuid, mdat...)
    RAF              the header, the embedded JPEG, the CFA header and the CFA data

Between cut points, content-defined chunking goes on as for any file. A parser that meets
something malformed stops and returns what it has found (possibly nothing): the file is then cut
by content alone, and stored bit-exact either way. Each parser reads only the structure, a few
kilobytes, through `read(offset, length)`.

The TIFF parser also says where uncompressed image data lies and how its samples are laid out
(bits, byte order, colour pattern, row length): the store's predictor codec uses it as a hint
(`Structure.layout_at`). A wrong hint costs compression, never exactness.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..store.codec import Layout

Read = Callable[[int, int], bytes]
MIN_REGION = 4096       # image data regions smaller than this are not worth a cut of their own
MAX_IFDS = 64
MAX_ENTRIES = 4096
MAX_SEGMENTS = 256
MAX_VALUES = 1 << 16    # strip/tile offsets or extents one file may list, all together


@dataclass(frozen=True, slots=True)
class ImageData:
    """A run of uncompressed image data, [start, end) of the file, and how its samples lie."""
    start: int
    end: int
    layout: Layout


@dataclass(slots=True)
class Structure:
    """What a file's format says: hard cut points, and where its uncompressed image data is."""
    cuts: list[int] = field(default_factory=list)
    images: list[ImageData] = field(default_factory=list)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """[start, end) of each run of image data, sorted."""
        return [(i.start, i.end) for i in self.images]

    def layout_at(self, offset: int, length: int) -> tuple[Layout, int] | None:
        """The layout of the image data that most of bytes [offset, offset + length) belong
        to, and where they begin relative to its start; None if they are not image data."""
        best, most = None, 0
        for image in self.images:
            overlap = min(offset + length, image.end) - max(offset, image.start)
            if overlap > most:
                best, most = image, overlap
        return (best.layout, offset - best.start) if best is not None else None


def boundaries(read: Read, size: int) -> list[int]:
    """Sorted hard cut points for the file's format, or []."""
    return structure(read, size).cuts


def structure(read: Read, size: int) -> Structure:
    """The file's hard cut points, sorted, and its uncompressed image data. `size` is how much
    of the file can be read now (all of it, or the start of a file still being written); points
    beyond it (a region's end the header announces) are kept, for when the rest arrives."""
    images: list[ImageData] = []
    try:
        head = read(0, 16)
        if head.startswith(b"\xff\xd8\xff"):
            cuts = _jpeg(read, size, 0)
        elif head[:4] in (b"II*\x00", b"MM\x00*", b"IIRO", b"IIU\x00"):
            cuts = _tiff(read, size, 0, images)
        elif head[4:8] == b"ftyp":
            cuts = _bmff(read, size)
        elif head.startswith(b"FUJIFILMCCD-RAW"):
            cuts = _raf(read, size)
        else:
            return Structure()
    except Exception:  # noqa: BLE001 - malformed: RecursionError, MemoryError, struct.error...
        return Structure()
    return Structure(sorted({c for c in cuts if c > 0}), _joined(images))


def _jpeg(read: Read, size: int, start: int, first: bool = True) -> list[int]:
    """Segment starts up to the scan, then the scan; MPF's further images likewise (MPF is
    read in the first image only: the others' would only repeat it, or loop)."""
    cuts, pos = [start], start + 2
    for _ in range(MAX_SEGMENTS):
        if pos + 4 > size:
            break
        marker, length = struct.unpack(">HH", read(pos, 4))
        if marker >> 8 != 0xFF:
            break
        cuts.append(pos)
        if marker in (0xFFD8, 0xFF01) or 0xFFD0 <= marker <= 0xFFD7:
            pos += 2
            continue
        end = pos + 2 + length
        if first and marker == 0xFFE2 and read(pos + 4, 4) == b"MPF\x00":
            mpf_at = pos + 8  # the MP header's TIFF structure; offsets are relative to it
            for off in _mpf_images(read, mpf_at):
                if mpf_at + off < size:
                    cuts += _jpeg(read, size, mpf_at + off, first=False)
        if marker == 0xFFDA:  # start of scan: the entropy-coded data follows, to EOI
            cuts.append(end)
            break
        pos = end
    return cuts


def _mpf_images(read: Read, base: int) -> list[int]:
    """Offsets (from the MP header) of the images after the first, from the MP entries."""
    order = read(base, 2)
    e = "<" if order == b"II" else ">"
    ifd = struct.unpack(e + "I", read(base + 4, 4))[0]
    n = struct.unpack(e + "H", read(base + ifd, 2))[0]
    out = []
    for i in range(min(n, 64)):
        tag, _, count, value = struct.unpack(e + "HHII", read(base + ifd + 2 + 12 * i, 12))
        if tag == 0xB002:  # MP Entry: 16 bytes per image, offset at +8 (0 for the first)
            for k in range(1, min(count // 16, 16)):
                offset = struct.unpack(e + "I", read(base + value + 16 * k + 8, 4))[0]
                if offset:
                    out.append(offset)
    return out


# TIFF tags that point at data regions (offsets tag -> byte counts tag) or at more IFDs.
_REGIONS = {273: 279, 324: 325, 513: 514}  # strips, tiles, JPEG preview (thumbnail)
_SUB_IFDS = {330, 34665, 34853, 40965}     # SubIFDs, EXIF, GPS, Interoperability
_MAKERNOTE = 37500
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}


def _tiff(read: Read, size: int, base: int, images: list[ImageData]) -> list[int]:
    """Cuts around every image data region the IFDs describe (merged where contiguous), and
    around the maker notes; the regions of uncompressed samples go into `images`."""
    order = read(base, 2)
    e = "<" if order == b"II" else ">"
    todo = [struct.unpack(e + "I", read(base + 4, 4))[0]]
    seen: set[int] = set()
    regions: list[tuple[int, int]] = []
    while todo and len(seen) < MAX_IFDS and len(todo) < MAX_IFDS * 4:
        ifd = todo.pop()
        if ifd in seen or not 0 < ifd < size:
            continue
        seen.add(ifd)
        n = struct.unpack(e + "H", read(base + ifd, 2))[0]
        if n > MAX_ENTRIES:
            continue
        raw = read(base + ifd + 2, 12 * n + 4)
        entries = {}
        for i in range(n):
            tag, typ, count = struct.unpack_from(e + "HHI", raw, 12 * i)
            entries[tag] = (typ, count, raw[12 * i + 8:12 * i + 12])
        values = lambda tag: _values(read, e, base, *entries[tag])  # noqa: E731
        for off_tag, len_tag in _REGIONS.items():
            if off_tag in entries and len_tag in entries:
                found = [(base + o, n_) for o, n_ in zip(values(off_tag), values(len_tag))]
                regions += found
                if len(regions) > MAX_VALUES:
                    raise ValueError("more data regions than any camera writes")
                nbytes = sum(n_ for _, n_ in found)
                layout = _layout(entries, values, e, nbytes) if off_tag != 513 else None
                if layout is not None:
                    images += [ImageData(o, o + n_, layout) for o, n_ in found if n_ > 0]
        for tag in _SUB_IFDS & entries.keys():
            todo += values(tag)
        if _MAKERNOTE in entries:
            typ, count, field = entries[_MAKERNOTE]
            if count > 4:
                regions.append((base + struct.unpack(e + "I", field)[0], count))
        nxt = struct.unpack_from(e + "I", raw, 12 * n)[0]
        todo.append(nxt)
    return _region_cuts(regions)


# TIFF tags that say how samples lie (the TIFF 6.0 and DNG 1.6 specifications).
_COMPRESSION, _BITS, _SPP, _PLANAR, _FILL = 259, 258, 277, 284, 266
_WIDTH, _TILE_WIDTH, _PHOTOMETRIC, _CFA_DIM = 256, 322, 262, 33421
_LENGTH, _TILE_LENGTH, _TILE_OFFSETS = 257, 323, 324
_PLAIN_PHOTOMETRIC = {0, 1, 2, 32803, 34892}  # grey, RGB, colour filter array, LinearRaw
_CFA = 32803


def _layout(entries: dict, values: Callable[[int], list[int]], e: str,
            nbytes: int) -> Layout | None:
    """How the `nbytes` of an IFD's strips or tiles hold their samples, if uncompressed in a
    way the predictor reads: 8 or 16 bits, 10/12/14 packed most significant bit first, or
    10/12/14-bit samples in 16-bit words (as uncompressed NEF and ARW hold them, saying 12 or
    14 in BitsPerSample): which one, the size of the data tells."""
    def first(tag: int, default: int) -> int:
        found = values(tag) if tag in entries else []
        return found[0] if found else default

    if first(_COMPRESSION, 1) != 1 or first(_FILL, 1) != 1 \
            or first(_PHOTOMETRIC, 1) not in _PLAIN_PHOTOMETRIC:
        return None
    bits = first(_BITS, 1)
    per_pixel = 1 if first(_PLANAR, 1) == 2 else first(_SPP, 1)
    rows, cols = 1, 1
    if first(_PHOTOMETRIC, 1) == _CFA:
        dims = values(_CFA_DIM) if _CFA_DIM in entries else []
        rows, cols = dims if len(dims) == 2 else (2, 2)
    row = (first(_TILE_WIDTH, 0) or first(_WIDTH, 0)) * per_pixel
    height = first(_TILE_LENGTH, 0) * len(values(_TILE_OFFSETS)) if _TILE_WIDTH in entries \
        else first(_LENGTH, 0)
    samples = row * height * (first(_SPP, 1) if first(_PLANAR, 1) == 2 else 1)
    if not samples:
        return None
    if 8 < bits < 16 and abs(nbytes / samples - 2) < 0.02:
        bits = 16  # in 16-bit words, not packed
    elif abs(nbytes * 8 / samples - bits) > 0.02 * bits:
        return None  # padded rows, or a packing of a camera maker's own
    try:
        layout = Layout(bits, e == ">" and bits == 16, cols * per_pixel, rows * row)
    except ValueError:
        return None
    # Rows that end inside a group would shift the colours of every row after them.
    return layout if row % layout.group_samples == 0 else None


def _joined(images: list[ImageData]) -> list[ImageData]:
    """Contiguous runs of one layout (the strips of one image) as one."""
    out: list[ImageData] = []
    for image in sorted(images, key=lambda i: i.start):
        if out and out[-1].end == image.start and out[-1].layout == image.layout:
            out[-1] = ImageData(out[-1].start, image.end, image.layout)
        else:
            out.append(image)
    return out


def _values(read: Read, e: str, base: int, typ: int, count: int, field: bytes) -> list[int]:
    """The integer values of a SHORT or LONG entry (inline or at its offset)."""
    if typ not in (3, 4, 13) or count > MAX_VALUES:
        return []
    fmt = e + ("H" if typ == 3 else "I") * count
    nbytes = _SIZES[typ] * count
    data = field[:nbytes] if nbytes <= 4 else read(base + struct.unpack(e + "I", field)[0],
                                                   nbytes)
    return list(struct.unpack(fmt, data))


def _region_cuts(regions: list[tuple[int, int]]) -> list[int]:
    merged: list[list[int]] = []
    for off, n in sorted(r for r in regions if r[1] > 0):
        if merged and off <= merged[-1][1] + 64:
            merged[-1][1] = max(merged[-1][1], off + n)
        else:
            merged.append([off, off + n])
    return [c for lo, hi in merged if hi - lo >= MIN_REGION for c in (lo, hi)]


def _bmff(read: Read, size: int) -> list[int]:
    """Each top-level box; in HEIF, also each metadata item (EXIF, XMP) inside mdat, which
    `meta/iloc` locates (the image's tiles around them are cut as one region)."""
    cuts, pos = [], 0
    for _ in range(MAX_SEGMENTS):
        if pos + 8 > size:
            break
        n, kind = struct.unpack(">I4s", read(pos, 8))
        header = 8
        if n == 1:
            n, header = struct.unpack(">Q", read(pos + 8, 8))[0], 16
        elif n == 0:
            n = size - pos
        if n < header:
            break
        cuts.append(pos)
        if kind == b"meta":
            cuts += _heif_items(read, pos + header + 4, pos + n)
        pos += n
    return cuts


def _boxes(read: Read, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(kind, payload start, box end) of the boxes in [start, end)."""
    pos = start
    for _ in range(MAX_ENTRIES):
        if pos + 8 > end:
            return
        n, kind = struct.unpack(">I4s", read(pos, 8))
        if n < 8:
            return
        yield kind, pos + 8, pos + n
        pos += n


def _children(read: Read, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """kind -> (payload start, box end) of the boxes in [start, end) (the first of a kind)."""
    out: dict[bytes, tuple[int, int]] = {}
    for kind, payload, box_end in _boxes(read, start, end):
        out.setdefault(kind, (payload, box_end))
    return out


def _heif_items(read: Read, start: int, end: int) -> list[int]:
    boxes = _children(read, start, end)
    if b"iloc" not in boxes:
        return []
    types = _item_types(read, *boxes[b"iinf"]) if b"iinf" in boxes else {}
    cuts, regions = [], []
    for item, method, extents in _iloc(read, *boxes[b"iloc"]):
        if method != 0:  # data in the file itself, at absolute offsets
            continue
        for off, n in extents:
            if types.get(item) in (b"Exif", b"mime"):
                cuts += [off, off + n]  # metadata: a chunk of its own
            else:
                regions.append((off, n))
    return cuts + _region_cuts(regions)


def _item_types(read: Read, start: int, end: int) -> dict[int, bytes]:
    version = read(start, 1)[0]
    out = {}
    for kind, payload, _ in _boxes(read, start + 4 + (2 if version == 0 else 4), end):
        if kind == b"infe" and read(payload, 1)[0] >= 2:  # version 2: 16-bit ids, 3: 32-bit
            id_size = 2 if read(payload, 1)[0] == 2 else 4
            body = read(payload + 4, id_size + 2 + 4)
            out[int.from_bytes(body[:id_size], "big")] = body[id_size + 2:id_size + 6]
    return out


def _iloc(read: Read, start: int, end: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(item id, construction method, [(offset, length)]) of every item in an iloc box."""
    data = read(start, min(end - start, 1 << 20))
    version = data[0]
    sizes = data[4] >> 4, data[4] & 15, data[5] >> 4, data[5] & 15
    off_size, len_size, base_size, idx_size = sizes
    pos = 6

    def take(nbytes: int) -> int:
        nonlocal pos
        value = int.from_bytes(data[pos:pos + nbytes], "big") if nbytes else 0
        if pos + nbytes > len(data):
            raise ValueError("iloc runs past its box")
        pos += nbytes
        return value

    count = take(2 if version < 2 else 4)
    items, total = [], 0
    for _ in range(min(count, MAX_ENTRIES)):
        item = take(2 if version < 2 else 4)
        method = take(2) & 15 if version in (1, 2) else 0
        take(2)  # data reference index
        base = take(base_size)
        extents = []
        for _ in range(take(2)):
            if version in (1, 2):
                take(idx_size)
            extents.append((base + take(off_size), take(len_size)))
            total += 1
            if total > MAX_VALUES:
                raise ValueError("more item extents than any camera writes")
        items.append((item, method, extents))
    return items


def _raf(read: Read, size: int) -> list[int]:
    """RAF: big-endian (offset, length) pairs at 84 (JPEG), 92 (CFA header), 100 (CFA)."""
    cuts = []
    for at in (84, 92, 100):
        off, n = struct.unpack(">II", read(at, 8))
        if 0 < off < size:
            cuts += [off, off + n]
    return cuts
