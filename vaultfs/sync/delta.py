"""Chunks sent as their difference from a near copy the receiver holds (docs/sync-protocol.md
§7, where the choices are said exactly).

Dedup by chunk sends a chunk whole whenever any byte of it changed: a burst frame whose subject
moved, or a file edited in one place, costs each changed chunk (about 1 MiB) for a change of a
few KiB. So each such chunk is compared with the bytes at its place in a near copy (the
receiver's own version of the file, or a file sent before it that shares chunks with it) and
travels as the XOR of the two, zstd-compressed, when that is worth it: a change in place leaves
zeros elsewhere. The receiver rebuilds it from the same bytes and checks its digests as it does
any chunk's, so a wrong reference fails, it never stores wrong bytes."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

import zstandard

from ._xor import xor

WORTH = 0.5            # a difference is sent when under this share of the chunk's stored size
MIN_SHARED = 0.25      # a reference must hold this share of a file's bytes
MAX_BASES = 8          # reference chunks one difference may name
MAX_HOLDERS = 8        # earlier files a chunk is looked for in (the latest)
LEVEL = 1              # (the XOR is mostly zeros: any level shrinks it as much)

Extent = Sequence  # [offset, length, hash], as `extents` gives them
Ref = list  # [the reference's chunks' hashes, where in them the chunk's place starts]


def references(files: Sequence[tuple[bytes, Sequence[Extent]]], sending: set[bytes],
               previous: dict[bytes, Sequence[Extent]]) -> dict[bytes, Ref]:
    """For each chunk in `sending` that has a near copy, where it is: `files` are [(path,
    extents)] in the order their chunks are sent (a chunk goes with the first file that has
    it); `previous` the receiver's own extents of those paths that it holds already. Every
    chunk named in a Ref is one the receiver holds, or receives before the chunk."""
    holders: dict[bytes, list[int]] = {}  # chunk hash -> the files so far that have it
    out: dict[bytes, Ref] = {}
    for i, (path, extents) in enumerate(files):
        mine = [x for x in extents if x[2] in sending and x[2] not in holders]
        shared: Counter[int] = Counter()  # earlier file -> bytes of this one it holds too
        for _, n, h in extents:
            shared.update(dict.fromkeys(holders.get(h, ()), n))
        for _, _, h in extents:
            held = holders.setdefault(h, [])
            if i not in held:
                held[:] = held[-(MAX_HOLDERS - 1):] + [i]
        if not mine:
            continue
        size = sum(x[1] for x in extents)
        candidates = [(n, files[j][1]) for j, n in shared.items()]
        if path in previous:
            theirs = {x[2] for x in previous[path]}
            candidates.append((sum(x[1] for x in extents if x[2] in theirs), previous[path]))
        if not candidates:
            continue
        n, reference = max(candidates, key=lambda c: c[0])
        if n >= MIN_SHARED * size:
            out.update(_placed(extents, {x[2] for x in mine}, reference))
    return out


def _placed(extents: Sequence[Extent], wanted: set[bytes],
            reference: Sequence[Extent]) -> dict[bytes, Ref]:
    """Where each chunk of `wanted` lies in `reference`: shifted as the last chunk before it
    that both hold (the first time it is held by the reference)."""
    ends: dict[bytes, int] = {}
    for off, n, h in reference:
        ends.setdefault(h, off + n)
    starts = [x[0] for x in reference]
    out: dict[bytes, Ref] = {}
    shift = 0
    for off, n, h in extents:
        if h in ends and h not in wanted:
            shift = ends[h] - (off + n)
        elif h in wanted and h not in out:
            lo = off + shift
            if lo < 0:
                continue
            k = max(0, bisect.bisect_right(starts, lo) - 1)
            bases = []
            while k < len(reference) and reference[k][0] < lo + n and len(bases) < MAX_BASES:
                if reference[k][0] + reference[k][1] > lo:
                    bases.append(reference[k])
                k += 1
            if bases and bases[0][0] <= lo:  # (not where the near copy has a gap)
                out[h] = [[b[2] for b in bases], lo - bases[0][0]]
    return out


def diff(raw: bytes, base: bytes) -> bytes:
    """What travels for `raw`, given `base` (the reference's bytes at its place)."""
    return zstandard.ZstdCompressor(level=LEVEL).compress(xor(raw, base))


def patch(payload: bytes, base: bytes, raw_len: int) -> bytes:
    """The chunk of `raw_len` bytes that `diff` gave `payload` for. Raises zstandard.ZstdError
    or ValueError for a payload that is not one."""
    # (zstandard allocates what the frame says it holds, whatever max_output_size says.)
    if zstandard.frame_content_size(payload) != raw_len:
        raise ValueError(f"a difference that says it holds other than {raw_len} bytes")
    x = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_len)
    if len(x) != raw_len:
        raise ValueError(f"a difference of {len(x)} bytes for a chunk of {raw_len}")
    return xor(x, base)
