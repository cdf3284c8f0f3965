"""Whether bytes outside the store (a file on a camera card) are those of a version in it, by the
store's own chunk digests: each extent's bytes are hashed and matched against the chunk's id
(XXH3-128) and its confirm digest (BLAKE3-128), and every gap between extents must be zeros. So
the answer does not depend on where the outside file would be cut into chunks today.

Reads go through a `read(offset, length)` function, so that the caller decides how (a card is
read front to back, in large pieces). It must give all `length` bytes, or fewer only where the
file ends (chunking.read_at): fewer bytes than asked are never taken for a match. A read error
(EIO from a failing card) propagates.
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
    """A live file of the store: where it is, the version its bytes are, and the XXH3-128 of
    its first chunk (b"" when it has none)."""
    path: str
    version: int
    size: int
    mtime_ns: int
    head: bytes


class Holdings:
    """The live tree's files of some sizes, by size and by (size, first chunk): a camera's
    uncompressed RAWs are all one size, and their first chunks (the header, with the time
    and the serial) tell them apart without reading them."""

    def __init__(self) -> None:
        self._by_size: dict[int, list[Held]] = {}
        self._by_head: dict[tuple[int, bytes], list[Held]] = {}

    @classmethod
    def of(cls, tx: Txn, sizes: Iterable[int]) -> "Holdings":
        """The files of these sizes (one walk of the tree)."""
        wanted = set(sizes)
        out = cls()
        for path, node in tx.walk():
            if stat.S_ISREG(node.mode) and node.size in wanted:
                out.add(tx, path.decode(errors="surrogateescape"), node.content, node.size,
                        node.mtime_ns)
        return out

    def add(self, tx: Txn, path: str, version: int, size: int, mtime_ns: int) -> None:
        first = next(iter(tx.extents(version)), None)
        head = bytes(first[1][:HASH_LEN]) if first is not None and first[0] == 0 else b""
        held = Held(path, version, size, mtime_ns, head)
        self._by_size.setdefault(size, []).append(held)
        self._by_head.setdefault((size, head), []).append(held)

    def sized(self, size: int) -> list[Held]:
        return list(self._by_size.get(size, ()))

    def headed(self, size: int, head: bytes) -> list[Held]:
        """Files of `size` whose first chunk has the XXH3-128 `head`."""
        return list(self._by_head.get((size, head), ())) if head else []


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
        wanted = min(ZERO_STEP, end - off)
        data = read(off, wanted)
        if len(data) != wanted or data.count(0) != wanted:
            return False
    return True
