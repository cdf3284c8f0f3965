"""Whether bytes outside the store (a file on a camera card) are those of a version in it, by the
store's own chunk digests: each extent's bytes are hashed and matched against the chunk's id
(XXH3-128) and its confirm digest (BLAKE3-128), and every gap between extents must be zeros. So
the answer does not depend on where the outside file would be cut into chunks today.

Reads go through a `read(offset, length)` function, so that the caller decides how (a card is
read front to back, in large pieces); a read error (EIO from a failing card) propagates.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .codec import confirm_digest, xxh3
from .format import HASH_LEN
from .txn import Txn

Read = Callable[[int, int], bytes]
ZERO_STEP = 4 << 20  # holes are compared in pieces of this size


@dataclass(frozen=True, slots=True)
class Held:
    """A live file of the store: where it is, and the version its bytes are."""
    path: str
    version: int
    size: int
    mtime_ns: int


def live_files(tx: Txn, sizes: Iterable[int]) -> dict[int, list[Held]]:
    """The live tree's regular files of the given sizes, by size (one walk of the tree)."""
    wanted = set(sizes)
    out: dict[int, list[Held]] = {}
    for path, node in tx.walk():
        if stat.S_ISREG(node.mode) and node.size in wanted:
            out.setdefault(node.size, []).append(
                Held(path.decode(errors="surrogateescape"), node.content, node.size,
                     node.mtime_ns))
    return out


def find(tx: Txn, candidates: Iterable[Held], size: int, read: Read) -> Held | None:
    """The first of `candidates` (files of `size` bytes, best guesses first) whose bytes are
    those that `read` gives. Most candidates of a common size (a camera's uncompressed RAWs
    are all one size) are ruled out by their first extent's XXH3 alone, hashing the outside
    file's bytes once per distinct first extent; the rest are compared whole."""
    heads: dict[tuple[int, int], bytes] = {}
    for held in candidates:
        first = next(iter(tx.extents(held.version)), None)
        if first is not None:
            off, chunk_id, length = first
            if (off, length) not in heads:
                heads[(off, length)] = xxh3(read(off, length))
            if heads[(off, length)] != bytes(chunk_id[:HASH_LEN]):
                continue
        if matches(tx, held.version, size, read):
            return held
    return None


def matches(tx: Txn, version: int, size: int, read: Read) -> bool:
    """Whether the `size` bytes that `read` gives are exactly the bytes of `version`."""
    v = tx.version(version) if version else None
    if (v.size if v else 0) != size:
        return False
    pos = 0
    for off, chunk_id, length in tx.extents(version):
        if not _zeros(read, pos, off):
            return False
        data = read(off, length)
        rec = tx.chunk_record(chunk_id)
        if rec is None or len(data) != length or xxh3(data) != bytes(chunk_id[:HASH_LEN]) \
                or confirm_digest(data) != rec.blake3:
            return False
        pos = off + length
    return _zeros(read, pos, size)


def _zeros(read: Read, start: int, end: int) -> bool:
    for off in range(start, end, ZERO_STEP):
        data = read(off, min(ZERO_STEP, end - off))
        if data.count(0) != len(data):
            return False
    return True
