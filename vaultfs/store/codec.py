"""Turning raw chunk bytes into their stored form and back, with the hashes that name them.

Three stored forms (docs/store-format.md §4.3): the raw bytes, a zstd frame, or, for image
sensor data, a reversible predictor per colour channel whose residuals are then zstd
compressed (`Layout`). Which one a chunk gets is measured, chunk by chunk: a few windows of
it are compressed each way, and only the winner compresses the whole chunk. A stored form
decodes from its own bytes alone: the predictor's parameters are in its header, and the caller
never needs a hint to read it.

These are pure CPU functions (hashing, zstandard, the predictor's loops in C: _predictor.c)
that release the GIL for most of their work, so callers run them in worker threads; the LMDB
writer encodes a chunk itself only in the rare case that it was freed between a caller's
look-up and the commit.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, replace

import blake3
import xxhash
import zstandard

from . import _predictor
from .format import CODEC_RAW, CODEC_SAMPLES, CODEC_ZSTD, HASH_LEN

# Level 1: on 16-bit sensor data level 3 runs at ~100 MB/s for a ~9% smaller result, level 1
# at ~740 MB/s (measured on this 2-core machine); ingest speed matters more in the field. On
# predictor residuals, level 3 gains nothing over level 1 (their bytes are noise that only
# the entropy stage can shrink).
DEFAULT_LEVEL = 1
# The strongest level a tier may ask for (`compression` in vault.toml): zstd's standard levels
# end at 19; its "ultra" levels 20-22 are not offered.
MAX_LEVEL = 19

# What the measuring looks at: WINDOWS windows of WINDOW bytes spread over the chunk. A chunk
# smaller than twice that is tried whole, every way.
WINDOW = 8 * 1024
WINDOWS = 8
# A compressed form is kept only if it is smaller than this share of the raw bytes (JPEG
# scans, HEVC and lossless-JPEG data are stored as they are); the predictor is tried on the
# whole chunk only if, on the windows, it comes out under this share of plain zstd's size.
WORTH = 0.99
PREDICTOR_WORTH = 0.97
# Far above any chunk (the chunker cuts at 4 MiB): a predictor header claiming more is damage.
MAX_CONTENT = 1 << 28

_local = threading.local()


class ChunkCorrupt(Exception):
    """A stored chunk does not decode to bytes matching its id."""


def xxh3(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def confirm_digest(data: bytes | memoryview) -> bytes:
    """The second, independent digest kept with a chunk: a dedup hit needs both to match."""
    return blake3.blake3(data).digest(HASH_LEN)


@dataclass(frozen=True, slots=True)
class Digests:
    xxh3: bytes
    blake3: bytes


def digests(data: bytes | memoryview) -> Digests:
    return Digests(xxh3(data), confirm_digest(data))


# ---- the sample predictor -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Layout:
    """How image samples lie in a run of bytes: what the predictor needs to know.

    `bits` 8 or 16: one sample per byte or per 16-bit word (`big_endian` says which byte
    comes first); 10, 12 or 14: samples packed without gaps, most significant bit first (the
    TIFF/DNG packing), in groups of whole bytes. `period` is the distance in samples from a
    sample to the previous one of the same colour in its row: 2 for a Bayer sensor, 3 for RGB
    pixels, 1 for a single channel. `stride`, when known, is the distance to the nearest sample
    of the same colour in a row above (the rows of the colour pattern times the samples in a
    row: 2 × width for Bayer). Each sample is predicted by the one `stride` before it, or
    `period` before it in the first `stride` samples of a chunk (all of them when `stride` is
    0); the two predict equally well on sensor noise, but the first decodes a vector of
    samples at a time, where the second is a running sum (the C loops alone: 0.30 against 0.44
    ms per MiB). The coding is exact whatever the bytes really are."""

    bits: int
    big_endian: bool = False
    period: int = 2
    stride: int = 0

    def __post_init__(self) -> None:
        if self.bits not in _GROUPS or not 1 <= self.period <= MAX_PERIOD \
                or not 0 <= self.stride < 1 << 32:
            raise ValueError(f"no predictor for {self.bits}-bit samples of period {self.period}"
                             f" and stride {self.stride}")
        if self.big_endian and self.bits != 16:
            raise ValueError("only 16-bit words have a byte order")

    @property
    def group_bytes(self) -> int:
        """The bytes of the smallest run holding whole samples."""
        return _GROUPS[self.bits][0]

    @property
    def group_samples(self) -> int:
        return _GROUPS[self.bits][1]

    def planes(self, body: memoryview) -> bytes:
        """The zigzagged residuals of the samples in `body` (whole groups), as planes."""
        return _predictor.planes(body, self.bits, self.big_endian, self.period, self.stride)

    def body(self, planes: memoryview, count: int) -> bytes:
        """The inverse of `planes`: the `count` samples' whole groups of bytes (a packed sample
        above 2^bits - 1 is masked: the chunk's hash then says it is damaged)."""
        return _predictor.samples(planes, count, self.bits, self.big_endian, self.period,
                                  self.stride)


_GROUPS = {8: (1, 1), 10: (5, 4), 12: (3, 2), 14: (7, 4), 16: (2, 1)}  # bits: bytes, samples
MAX_PERIOD = 255
# What a chunk is tried as when nothing says what it holds: 16-bit little-endian words of a
# Bayer sensor (uncompressed RAW payloads of most cameras), starting at either byte.
GUESS = Layout(16, False, 2)

# The header of the predictor's stored form, after the codec byte: bits, flags (bit 0: big-
# endian words), period, lead (bytes before the first whole group), stride, samples (in the
# body).
SAMPLES_HEAD = struct.Struct(">BBBBII")


def _predicted(data: memoryview, layout: Layout, lead: int) -> tuple[bytes, bytes]:
    """The header and the frame content of the predictor's form of `data`: the bytes before
    the first and after the last whole group as they are, then the zigzagged residuals in
    planes."""
    g = layout.group_bytes
    if not 0 <= lead < g or lead > len(data):
        raise ValueError(f"lead {lead} is not within the first group of {len(data)} bytes")
    body_len = (len(data) - lead) // g * g
    head = SAMPLES_HEAD.pack(layout.bits, int(layout.big_endian), layout.period, lead,
                             layout.stride, body_len // g * layout.group_samples)
    planes = layout.planes(data[lead:lead + body_len])
    return head, b"".join((data[:lead], data[lead + body_len:], planes))


def _samples_head(payload: memoryview) -> tuple[Layout, int, int]:
    """The layout, lead and sample count a predictor header (codec 2's payload) says;
    ChunkCorrupt if it cannot be one."""
    if len(payload) < SAMPLES_HEAD.size:
        raise ChunkCorrupt("predictor header cut short")
    bits, flags, period, lead, stride, count = SAMPLES_HEAD.unpack_from(payload)
    try:
        layout = Layout(bits, bool(flags & 1), period, stride)
    except ValueError as e:
        raise ChunkCorrupt(f"predictor header: {e}") from None
    if flags > 1 or lead >= layout.group_bytes or count % layout.group_samples:
        raise ChunkCorrupt("predictor header out of range")
    return layout, lead, count


def _unpredicted(payload: memoryview, raw_len: int | None) -> bytes:
    layout, lead, count = _samples_head(payload)
    g, s = layout.group_bytes, layout.group_samples
    frame = payload[SAMPLES_HEAD.size:]
    body_len = count // s * g
    size = _content_size(frame)
    tail = size - lead - (count if layout.bits != 8 else 0) - -(-count // 8) * 8
    if not 0 <= tail < g or size > MAX_CONTENT or \
            (raw_len is not None and lead + body_len + tail != raw_len):
        raise ChunkCorrupt("predictor header does not match the chunk's length")
    content = _decompressor().decompress(frame)
    if len(content) != size:
        raise ChunkCorrupt("predictor frame holds the wrong length")
    try:
        body = layout.body(memoryview(content)[lead + tail:], count)
    except ValueError as e:  # (the checks above leave none, but damage must never be a crash)
        raise ChunkCorrupt(f"predictor: {e}") from None
    return b"".join((content[:lead], body, content[lead:lead + tail])) if lead + tail else body


# ---- choosing and coding ----------------------------------------------------------------------
def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard contexts are not thread-safe; one per thread and level.
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _content_size(frame: memoryview) -> int:
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise ChunkCorrupt(f"zstd: {e}") from None
    if size < 0:
        raise ChunkCorrupt("zstd frame without its content size")
    return size


def encode(data: bytes | memoryview, layout: Layout | None = None, region_offset: int = 0,
           level: int = DEFAULT_LEVEL, sure: bool = False) -> bytes:
    """The stored value of a chunk: a codec byte, then its smallest form of raw bytes, zstd,
    and the predictor for `layout` followed by zstd (`region_offset`: where the chunk begins
    in its run of image data, which begins with a whole group of samples). Without a layout,
    the predictor is tried with GUESS. Measured on windows of the chunk; the whole chunk is
    compressed by the winner. With `sure` (the predictor with this very layout won for the
    chunks before, in the same image data), the predictor's form is kept, measured on the
    whole chunk, whenever it saves anything: the trials on windows were a fifth of the time."""
    data = memoryview(data).cast("B")
    n = len(data)
    if layout is not None:
        lead = -region_offset % layout.group_bytes
        if sure and n - lead >= layout.group_bytes:
            stored = predicted(data, layout, lead, level)
            if len(stored) - 1 < n * WORTH:
                return stored
        trials = [(layout, lead)]
        if layout.bits == 16:  # some makers' words are of the other byte order than the file's
            trials.append((replace(layout, big_endian=not layout.big_endian), lead))
    else:
        trials = [(GUESS, 0), (GUESS, 1)]
    trials = [t for t in trials if n - t[1] >= t[0].group_bytes]
    comp = _compressor(level)
    if n < 2 * WINDOWS * WINDOW:  # small: every form, whole
        forms = [bytes((CODEC_ZSTD,)) + comp.compress(data)]
        forms += [predicted(data, lay, lead, level) for lay, lead in trials]
        best_form = min(forms, key=len)  # zstd first: it wins ties
        return best_form if len(best_form) - 1 < n * WORTH else bytes((CODEC_RAW,)) + data
    # Plain zstd and the predictor compared on windows; the windows can miss what makes the
    # whole chunk compress (VC-5 RAW data), so zstd is kept or not on the whole chunk.
    sample = _windows(data, 0, 1)
    zstd_ratio = len(comp.compress(sample)) / len(sample)
    best, best_ratio = None, min(zstd_ratio * PREDICTOR_WORTH, WORTH)
    for lay, lead in trials:
        # Windows start on the group grid, so that they hold the samples the whole chunk is
        # cut into; they are shorter than a stride, so the predictor runs along their rows.
        windows = _windows(data, lead, lay.group_bytes)
        ratio = len(comp.compress(_predicted(windows, replace(lay, stride=0), 0)[1])) \
            / len(windows)
        if ratio < best_ratio:
            best, best_ratio = (lay, lead), ratio
    if best is not None:
        stored = predicted(data, *best, level)
        if len(stored) - 1 < n * min(WORTH, zstd_ratio):
            return stored
    packed = comp.compress(data)
    if len(packed) < n * WORTH:
        return bytes((CODEC_ZSTD,)) + packed
    return bytes((CODEC_RAW,)) + data


def recoded(stored: bytes | memoryview, raw: bytes | memoryview, level: int) -> bytes | None:
    """A chunk's stored value (`stored`, holding the raw bytes `raw`) in the same form with its
    zstd frame made at `level`: the same codec, and for the predictor the same layout from its
    header. None for a raw chunk: zstd at the ingest level saved under 1% of it (JPEG scans,
    HEVC, VC-5), which no level changes much. The caller checks the result (decode, digests)
    before it keeps it. A compressor of its own, not the thread's cached one: the strong levels'
    tables (tens of MB) are freed with it."""
    stored = memoryview(stored)
    comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
    if stored[0] == CODEC_ZSTD:
        return bytes((CODEC_ZSTD,)) + comp.compress(raw)
    if stored[0] == CODEC_SAMPLES:
        head, content = _predicted(memoryview(raw).cast("B"), *stored_layout(stored))
        return bytes((CODEC_SAMPLES,)) + head + comp.compress(content)
    return None


def stored_layout(stored: bytes | memoryview) -> tuple[Layout, int] | None:
    """The layout and lead a stored value's predictor used (its header says), or None for
    another codec."""
    if not len(stored) or stored[0] != CODEC_SAMPLES:
        return None
    return _samples_head(memoryview(stored)[1:])[:2]


def predicted(data: bytes | memoryview, layout: Layout, lead: int = 0,
              level: int = DEFAULT_LEVEL) -> bytes:
    """The predictor's stored form of a chunk (codec byte, header, zstd frame), whatever its
    size; `lead` bytes come before the first whole group of samples."""
    head, content = _predicted(memoryview(data).cast("B"), layout, lead)
    return bytes((CODEC_SAMPLES,)) + head + _compressor(level).compress(content)


def _windows(data: memoryview, lead: int, align: int) -> memoryview:
    """WINDOWS windows of about WINDOW bytes spread over `data`, joined; each starts at lead
    + a multiple of `align` and is as long as a multiple of it."""
    length = WINDOW // align * align
    span = len(data) - lead - length
    starts = [lead + (span * i // (WINDOWS - 1)) // align * align for i in range(WINDOWS)]
    return memoryview(b"".join(data[s:s + length] for s in starts))


def decode(chunk_id: bytes, stored: bytes | memoryview, raw_len: int | None = None) -> bytes:
    """The raw bytes of a stored chunk, checked against the xxh3 part of its id."""
    stored = memoryview(stored)
    if not len(stored):
        raise ChunkCorrupt("empty stored value")
    codec = stored[0]
    payload = stored[1:]
    try:
        if codec == CODEC_ZSTD:
            # (zstandard allocates what a frame says it holds, whatever max_output_size says:
            # a frame from a peer must say the chunk's length.)
            if raw_len is not None and _content_size(payload) != raw_len:
                raise ChunkCorrupt("zstd frame holds the wrong length")
            data = _decompressor().decompress(payload, max_output_size=raw_len or 0)
        elif codec == CODEC_RAW:
            data = bytes(payload)
        elif codec == CODEC_SAMPLES:
            data = _unpredicted(payload, raw_len)
        else:
            raise ChunkCorrupt(f"unknown codec {codec}")
    except zstandard.ZstdError as e:
        raise ChunkCorrupt(f"zstd: {e}") from None
    if xxh3(data) != bytes(chunk_id[:HASH_LEN]):
        raise ChunkCorrupt("xxh3 mismatch")
    return data
