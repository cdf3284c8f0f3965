"""Reading file contents back out of the store, through a small cache of decoded chunks.

Reads arrive in pieces of 128 KiB to 1 MiB while chunks are about 1 MiB, so without the cache
every chunk would be decompressed and re-hashed several times over.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .codec import ChunkCorrupt, decode
from .txn import StoreError, Txn

CACHE_BYTES = 64 * 1024 * 1024


class DamagedChunk(Exception):
    """A read met a chunk that is missing or does not match its hash."""

    def __init__(self, ino: int, offset: int, length: int, chunk_id: bytes, why: str):
        super().__init__(f"inode {ino}: bytes {offset}-{offset + length - 1} "
                         f"(chunk {chunk_id.hex()}): {why}")
        self.ino, self.offset, self.length, self.chunk_id = ino, offset, length, chunk_id


class ChunkOffline(Exception):
    """The chunk was evicted (store/evict.py): only a peer holds its bytes."""


class OfflineData(Exception):
    """A read met bytes of a file that were evicted: fetch them from a peer first."""

    def __init__(self, ino: int, offset: int, length: int):
        super().__init__(f"inode {ino}: bytes {offset}-{offset + length - 1} are offline "
                         f"(evicted; a peer holds them)")
        self.ino, self.offset, self.length = ino, offset, length


class ChunkCache:
    """Decoded chunks, most recently used kept, bounded in bytes. Concurrent reads of one chunk
    (the kernel's read-ahead sends several at once) decode it once: the others wait for it."""

    def __init__(self, limit: int = CACHE_BYTES):
        self._limit = limit
        self._bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._loading: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, tx: Txn, chunk_id: bytes) -> bytes:
        # Keyed by id *and* BLAKE3 digest: an id freed and reused for other content (possible
        # only after an xxh3 collision) must never be served from the cache.
        rec = tx.chunk_record(chunk_id)
        if rec is None:
            raise ChunkCorrupt("chunk is missing from the store")
        if rec.offline:
            raise ChunkOffline()
        key = chunk_id + rec.blake3
        while True:
            with self._lock:
                data = self._items.get(key)
                if data is not None:
                    self._items.move_to_end(key)
                    return data
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = threading.Event()
                    break
            loading.wait()  # another thread decodes it; then look again
        try:
            stored = tx.chunk_data(chunk_id)
            if stored is None:
                raise ChunkCorrupt("chunk data is missing from the store")
            data = decode(chunk_id, stored, rec.raw_len)
            with self._lock:
                self._items[key] = data
                self._bytes += len(data)
                while self._bytes > self._limit:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
            return data
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()


class Content(Protocol):
    """What reading needs of a file (an Inode) or of one of its versions (a Version)."""
    ino: int
    content: int
    size: int


def read_range(tx: Txn, cache: ChunkCache, node: Content, offset: int, size: int) -> bytes:
    """Bytes [offset, offset+size) of a committed file, holes as zeros, short at EOF."""
    end = min(offset + size, node.size)
    if end <= offset:
        return b""
    out: bytearray | None = None
    for ext_off, data in iter_extents(tx, cache, node, offset, end):
        lo, hi = max(ext_off, offset), min(ext_off + len(data), end)
        if out is None and lo == offset and hi == end:
            return data[lo - ext_off:hi - ext_off]  # the common case: inside one chunk
        if out is None:
            out = bytearray(end - offset)
        out[lo - offset:hi - offset] = data[lo - ext_off:hi - ext_off]
    return bytes(out) if out is not None else bytes(end - offset)


def iter_extents(tx: Txn, cache: ChunkCache, node: Content, start: int = 0,
                 end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(file offset, decoded chunk) of the extents overlapping [start, end)."""
    for ext_off, chunk_id, length in tx.extents(node.content, start):
        if end is not None and ext_off >= end:
            return
        yield ext_off, _chunk(tx, cache, node.ino, ext_off, chunk_id, length)


def read_except(tx: Txn, cache: ChunkCache, node: Content, codec: int,
                within: list[tuple[int, int]]) -> tuple[Pieces, list[tuple[int, int]]]:
    """A committed file but for its chunks stored with `codec` that lie wholly inside one of
    the `within` ranges ([start, end) of the file): those are not even decoded (nor checked:
    nothing is read of them). Their (offset, length) are the second value."""
    out = Pieces(node.size)
    skipped: list[tuple[int, int]] = []
    for ext_off, chunk_id, length in tx.extents(node.content):
        stored = tx.chunk_data(chunk_id)
        if stored is not None and len(stored) and stored[0] == codec and \
                any(lo <= ext_off and ext_off + length <= hi for lo, hi in within):
            skipped.append((ext_off, length))
        else:
            out.pieces.append((ext_off, _chunk(tx, cache, node.ino, ext_off, chunk_id, length)))
    return out, skipped


@dataclass(slots=True)
class Pieces:
    """A file's bytes as decoded chunks at their offsets, not joined (a 24 MB RAW read but for
    its sensor data holds 2 MB of them); what they leave out (holes, chunks left unread) reads
    as zeros."""
    size: int
    pieces: list[tuple[int, bytes]] = field(default_factory=list)

    def whole(self) -> bytes:
        out = bytearray(self.size)
        for off, data in self.pieces:
            out[off:off + len(data)] = data
        return bytes(out)


def _chunk(tx: Txn, cache: ChunkCache, ino: int, ext_off: int, chunk_id: bytes,
           length: int) -> bytes:
    """The decoded chunk of the extent of inode `ino` at `ext_off`."""
    try:
        data = cache.get(tx, chunk_id)
    except ChunkCorrupt as e:
        raise DamagedChunk(ino, ext_off, length, chunk_id, str(e)) from None
    except ChunkOffline:
        raise OfflineData(ino, ext_off, length) from None
    if len(data) != length:
        raise StoreError(f"inode {ino}: extent at {ext_off} says {length} bytes, "
                         f"chunk {chunk_id.hex()} holds {len(data)}")
    return data
