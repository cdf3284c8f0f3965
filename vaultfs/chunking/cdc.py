"""Content-defined chunking with FastCDC (pyfastcdc's compiled implementation).

Cut points depend only on the bytes since the previous cut, so an insertion or a metadata edit
moves the boundaries near it and leaves the rest of the file's chunks, and their dedup, intact.

A format's uncompressed image data (formats.py) is cut on a grid instead, every FIXED_SIZE bytes
from its start: its bytes are never inserted into, only moved as a whole (a rewritten header), so
the grid finds the same chunks that content would, and finding cut points in sensor noise took
5% of a card import's CPU.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator, Sequence

import pyfastcdc

from .reads import read_at

# pyfastcdc's effective average is avg_size + min_size: about 1 MiB here, the size at which
# LMDB writes and reads large values at full speed and per-chunk overhead is negligible.
MIN_SIZE = 256 * 1024
AVG_SIZE = 768 * 1024
MAX_SIZE = 4 * 1024 * 1024
FIXED_SIZE = 1024 * 1024  # the grid in image data: the content-defined chunks' average

def split(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of `buf`, in order, covering it exactly."""
    # A FastCDC object must not be shared between threads; making one is cheap.
    cdc = pyfastcdc.FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)
    for c in cdc.cut_buf(buf):
        yield c.offset, c.length


# Chunks are views of the window they were read in: it stays in memory until they are stored.
WINDOW = 16 * 1024 * 1024


def _data_from(fd: int, pos: int) -> int:
    """Where the next data at or after `pos` is (a file system without SEEK_DATA says: here)."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only a hole up to the end of the file
            return 1 << 63
        return pos


ZERO_RUN = next(split(bytes(2 * MAX_SIZE)))[1]  # the length of a chunk cut from zeros
_ZEROS = bytes(MAX_SIZE)
_ZERO_VIEW = memoryview(_ZEROS)


def is_zero(chunk: bytes) -> bool:
    """Whether a chunk is all zeros (a hole). A memcmp, without copying."""
    return _ZEROS.startswith(chunk)


def split_file(fd: int, start: int, end: int, final: bool = True, bounds: Sequence[int] = (),
               grids: Sequence[tuple[int, int]] = ()) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of each chunk of bytes [start, end) of an open file, where `start` is
    a chunk boundary, read in windows so that memory stays bounded whatever the file's size.
    Chunks never cross one of the hard cut points `bounds` (formats.py): content-defined
    chunking starts afresh at each. Between two that lie inside one of the `grids` ([start,
    end) of image data, sorted), chunks are cut every FIXED_SIZE bytes from that start.

    The last chunk of a window may have been cut only because the window ended, so it is cut
    again with the next window: the result is the same as splitting the whole file at once.
    With `final` false, more bytes will follow `end`, so the last chunk is held back too.
    """
    inner = [b for b in bounds if start < b < end]
    for lo, hi in zip([start] + inner, inner + [end]):
        yield from _split_range(fd, lo, hi, final or hi != end, _grid(lo, bounds, grids))


def _grid(at: int, bounds: Sequence[int], grids: Sequence[tuple[int, int]]) -> int | None:
    """The start of the grid that cuts the bytes from `at` on: of the image data (`grids`,
    sorted) that holds all of the range between the hard cuts around `at` (sorted `bounds`),
    the same range whether the file is cut whole or in steps; None: cut by content."""
    i = bisect.bisect_right(bounds, at)
    if i == len(bounds):
        return None  # (no cut after it: a range to the end of the file)
    lo, hi = bounds[i - 1] if i else 0, bounds[i]
    j = bisect.bisect_right(grids, (lo, 1 << 63)) - 1
    return grids[j][0] if j >= 0 and grids[j][1] >= hi else None


def _split_range(fd: int, start: int, end: int, final: bool,
                 grid: int | None) -> Iterator[tuple[int, memoryview]]:
    buf, buf_off = b"", start
    while True:
        # Step over holes a chunk at a time without reading them: a chunk that starts in a run
        # of zeros always has the same length, so the cuts stay those of reading everything.
        step = _zero_run(buf_off, grid)
        while buf_off + step <= end and _data_from(fd, buf_off) >= buf_off + step:
            yield buf_off, _ZERO_VIEW[:step]
            buf, buf_off = buf[step:], buf_off + step
            step = _zero_run(buf_off, grid)
        want = min(WINDOW, end - buf_off - len(buf))
        if want > 0:
            at = buf_off + len(buf)
            data = read_at(fd, want, at)
            if len(data) != want:  # (it shrank while being read)
                raise OSError(errno.ENODATA, f"the file ends at byte {at + len(data):,}, "
                              f"before byte {end:,}")
            buf += data
        at_end = buf_off + len(buf) >= end
        cuts = list(split(buf)) if grid is None else _grid_cuts(len(buf), buf_off - grid)
        if cuts and not (at_end and final):
            cuts.pop()
        view = memoryview(buf)  # chunks as views: slicing would copy every byte once more
        for off, length in cuts:
            yield buf_off + off, view[off:off + length]
        if at_end or not cuts:
            return
        used = cuts[-1][0] + cuts[-1][1]
        buf, buf_off = buf[used:], buf_off + used


def _zero_run(at: int, grid: int | None) -> int:
    """The length of the chunk that starts at `at` in a run of zeros."""
    return ZERO_RUN if grid is None else FIXED_SIZE - (at - grid) % FIXED_SIZE


def _grid_cuts(length: int, past: int) -> list[tuple[int, int]]:
    """(offset, length) of the chunks of `length` bytes lying `past` bytes into a grid."""
    if not length:
        return []
    first = min(length, FIXED_SIZE - past % FIXED_SIZE)
    return [(0, first)] + [(off, min(FIXED_SIZE, length - off))
                           for off in range(first, length, FIXED_SIZE)]
