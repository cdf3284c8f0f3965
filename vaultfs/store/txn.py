"""One LMDB transaction over the store's databases, with the operations the layers above need.

Read and write transactions share this class; only the writer thread (writer.py) opens write
transactions. Every change that affects a counter in `meta` updates it in the same transaction,
so the figures in `vaultfs status` are exact after any crash.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator

import lmdb

from . import format as F
from .codec import Digests
from .format import ChunkRecord, Inode, from_u64, u64


class StoreError(Exception):
    """A store operation that cannot go on: the message says why, for a person."""


class Txn:
    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database]):
        self.txn = txn
        self.dbs = dbs

    # ---- meta and counters ------------------------------------------------------------------
    def meta(self, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[F.DB_META])

    def put_meta(self, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[F.DB_META])

    def counter(self, key: bytes) -> int:
        v = self.meta(key)
        return from_u64(v) if v else 0

    def bump(self, key: bytes, delta: int) -> None:
        if delta:
            self.put_meta(key, u64(self.counter(key) + delta))

    def allocate(self, key: bytes) -> int:
        n = self.counter(key)
        self.put_meta(key, u64(n + 1))
        return n

    def counters(self) -> dict[str, int]:
        return {k.decode().removeprefix("stat."): self.counter(k) for k in F.COUNTERS}

    # ---- inodes -------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        v = self.txn.get(u64(ino), db=self.dbs[F.DB_INODES])
        return Inode.unpack(ino, v) if v is not None else None

    def put_inode(self, inode: Inode) -> None:
        self.txn.put(u64(inode.ino), inode.pack(), db=self.dbs[F.DB_INODES])

    def new_inode(self, mode: int, uid: int, gid: int, now_ns: int, rdev: int = 0,
                  target: bytes = b"") -> Inode:
        """A new inode with no links yet; inode numbers are never reused."""
        ino = self.allocate(F.META_NEXT_INO)
        inode = Inode(ino, mode, uid, gid, 0, len(target), rdev, now_ns, now_ns, now_ns,
                      target=target)
        self.put_inode(inode)
        if stat.S_ISREG(mode):
            self.bump(F.STAT_FILES, 1)
        return inode

    def delete_inode(self, inode: Inode) -> None:
        """Drop an inode whose last link and last open handle are gone, and free its chunks."""
        self.set_extents(inode.ino, [])
        for name, _ in list(self.xattrs(inode.ino)):
            self.remove_xattr(inode.ino, name)
        self.txn.delete(u64(inode.ino), db=self.dbs[F.DB_INODES])
        if stat.S_ISREG(inode.mode):
            self.bump(F.STAT_FILES, -1)

    def inodes(self) -> Iterator[Inode]:
        with self.txn.cursor(db=self.dbs[F.DB_INODES]) as c:
            for k, v in c:
                yield Inode.unpack(from_u64(k), v)

    # ---- directories --------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None:
        v = self.txn.get(F.dirent_key(parent, name), db=self.dbs[F.DB_DIRENTS])
        return F.U64x2.unpack(v)[1] if v is not None else None

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        entry_id = self.allocate(F.META_NEXT_ENTRY)
        self.txn.put(F.dirent_key(parent, name), F.U64x2.pack(entry_id, ino),
                     db=self.dbs[F.DB_DIRENTS])
        self.txn.put(F.U64x2.pack(parent, entry_id), name, db=self.dbs[F.DB_DIRLIST])

    def remove_entry(self, parent: int, name: bytes) -> int:
        key = F.dirent_key(parent, name)
        v = self.txn.pop(key, db=self.dbs[F.DB_DIRENTS])
        if v is None:
            raise KeyError(name)
        entry_id, ino = F.U64x2.unpack(v)
        self.txn.delete(F.U64x2.pack(parent, entry_id), db=self.dbs[F.DB_DIRLIST])
        return ino

    def rename_entry(self, parent: int, old: bytes, new: bytes) -> None:
        """Rename within one directory, keeping the entry's id (and so its place in a listing
        under way: a program renaming as it lists must not meet the same file twice)."""
        v = self.txn.pop(F.dirent_key(parent, old), db=self.dbs[F.DB_DIRENTS])
        if v is None:
            raise KeyError(old)
        self.txn.put(F.dirent_key(parent, new), v, db=self.dbs[F.DB_DIRENTS])
        self.txn.put(F.U64x2.pack(parent, F.U64x2.unpack(v)[0]), new, db=self.dbs[F.DB_DIRLIST])

    def relink_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode, keeping its id."""
        key = F.dirent_key(parent, name)
        entry_id = F.U64x2.unpack(self.txn.get(key, db=self.dbs[F.DB_DIRENTS]))[0]
        self.txn.put(key, F.U64x2.pack(entry_id, ino), db=self.dbs[F.DB_DIRENTS])

    def entries(self, parent: int, start_id: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(entry id, name, child ino) of a directory, in creation order, from start_id on."""
        prefix = u64(parent)
        with self.txn.cursor(db=self.dbs[F.DB_DIRLIST]) as c:
            if not c.set_range(F.U64x2.pack(parent, start_id)):
                return
            for k, name in c:
                if k[:8] != prefix:
                    return
                ino = self.lookup(parent, name)
                yield F.U64x2.unpack(k)[1], bytes(name), ino

    def has_entries(self, parent: int) -> bool:
        return next(self.entries(parent), None) is not None

    # ---- xattrs ---------------------------------------------------------------------------------
    def xattr(self, ino: int, name: bytes) -> bytes | None:
        return self.txn.get(u64(ino) + name, db=self.dbs[F.DB_XATTRS])

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.txn.put(u64(ino) + name, value, db=self.dbs[F.DB_XATTRS])

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self.txn.delete(u64(ino) + name, db=self.dbs[F.DB_XATTRS])

    def xattrs(self, ino: int) -> Iterator[tuple[bytes, bytes]]:
        prefix = u64(ino)
        with self.txn.cursor(db=self.dbs[F.DB_XATTRS]) as c:
            if not c.set_range(prefix):
                return
            for k, v in c:
                if k[:8] != prefix:
                    return
                yield bytes(k[8:]), bytes(v)

    # ---- extents --------------------------------------------------------------------------------
    def extents(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(offset, chunk id, length) of a file's extents in order, beginning with the one that
        covers `start` (or the first after it, when `start` falls in a hole)."""
        prefix = u64(ino)
        key = F.extent_key(ino, start)
        with self.txn.cursor(db=self.dbs[F.DB_EXTENTS]) as c:
            found = c.set_range(key)
            if not (found and c.key() == key):
                # An extent that begins before `start` may still cover it.
                if (c.prev() if found else c.last()) and c.key()[:8] == prefix:
                    off = F.U64x2.unpack(c.key())[1]
                    if off + F.EXTENT_VAL.unpack(c.value())[1] > start:
                        key = bytes(c.key())
            if not c.set_range(key):
                return
            for k, v in c:
                if k[:8] != prefix:
                    return
                chunk_id, length = F.EXTENT_VAL.unpack(v)
                yield F.U64x2.unpack(k)[1], chunk_id, length

    def set_extents(self, ino: int, extents: list[tuple[int, bytes, int]]) -> None:
        """Replace a file's extents. The caller already holds one reference per new extent (see
        `add_chunk`); this drops the references of the old ones."""
        db = self.dbs[F.DB_EXTENTS]
        old = list(self.extents(ino))
        for off, chunk_id, length in old:
            self.txn.delete(F.extent_key(ino, off), db=db)
            self.decref(chunk_id)
        for off, chunk_id, length in extents:
            self.txn.put(F.extent_key(ino, off), F.EXTENT_VAL.pack(chunk_id, length), db=db)
        self.bump(F.STAT_LOGICAL, sum(e[2] for e in extents) - sum(e[2] for e in old))

    # ---- chunks ---------------------------------------------------------------------------------
    def chunk_record(self, chunk_id: bytes) -> ChunkRecord | None:
        v = self.txn.get(chunk_id, db=self.dbs[F.DB_CHUNKS])
        return ChunkRecord.unpack(v) if v is not None else None

    def chunk_data(self, chunk_id: bytes) -> bytes | None:
        return self.txn.get(chunk_id, db=self.dbs[F.DB_CHUNKDATA])

    def find_chunk(self, d: Digests) -> bytes | None:
        """The id of the stored chunk with both digests, or None."""
        chunk_id, found = self._probe(d)
        return chunk_id if found else None

    def _probe(self, d: Digests) -> tuple[bytes, bool]:
        """(the id of the chunk with both digests, True), or (the first free id for it, False).
        Ids that share the xxh3 part but not the BLAKE3 digest are other content (a collision)
        and are skipped."""
        for variant in range(256):
            chunk_id = d.xxh3 + bytes((variant,))
            rec = self.chunk_record(chunk_id)
            if rec is None:
                return chunk_id, False
            if rec.blake3 == d.blake3:
                return chunk_id, True
        raise StoreError("more than 256 chunks share one xxh3-128 digest")

    def add_chunk(self, d: Digests, raw_len: int, stored: bytes | Callable[[], bytes]) -> bytes:
        """Take one reference on the chunk with these digests, storing it if it is new.

        `stored` is the chunk's encoded value, or a function that makes it: callers encode in
        worker threads what they saw missing, and pass a function for the rest.
        """
        chunk_id, found = self._probe(d)
        if found:
            self.incref(chunk_id)
            return chunk_id
        if callable(stored):
            stored = stored()
        rec = ChunkRecord(1, raw_len, len(stored) - 1, d.blake3)
        self.txn.put(chunk_id, rec.pack(), db=self.dbs[F.DB_CHUNKS])
        self.txn.put(chunk_id, stored, db=self.dbs[F.DB_CHUNKDATA])
        self.bump(F.STAT_CHUNKS, 1)
        self.bump(F.STAT_UNIQUE, raw_len)
        self.bump(F.STAT_STORED, rec.stored_len)
        return chunk_id

    def incref(self, chunk_id: bytes) -> None:
        rec = self.chunk_record(chunk_id)
        if rec is None:
            raise StoreError(f"reference to a missing chunk {chunk_id.hex()}")
        self.txn.put(chunk_id, ChunkRecord(rec.refcount + 1, rec.raw_len, rec.stored_len,
                                           rec.blake3).pack(), db=self.dbs[F.DB_CHUNKS])

    def decref(self, chunk_id: bytes) -> None:
        """Drop one reference; the last one frees the chunk's space."""
        rec = self.chunk_record(chunk_id)
        if rec is None:
            raise StoreError(f"reference to a missing chunk {chunk_id.hex()}")
        if rec.refcount > 1:
            self.txn.put(chunk_id, ChunkRecord(rec.refcount - 1, rec.raw_len, rec.stored_len,
                                               rec.blake3).pack(), db=self.dbs[F.DB_CHUNKS])
            return
        self.txn.delete(chunk_id, db=self.dbs[F.DB_CHUNKS])
        self.txn.delete(chunk_id, db=self.dbs[F.DB_CHUNKDATA])
        self.bump(F.STAT_CHUNKS, -1)
        self.bump(F.STAT_UNIQUE, -rec.raw_len)
        self.bump(F.STAT_STORED, -rec.stored_len)

    def chunks(self) -> Iterator[tuple[bytes, ChunkRecord]]:
        with self.txn.cursor(db=self.dbs[F.DB_CHUNKS]) as c:
            for k, v in c:
                yield bytes(k), ChunkRecord.unpack(v)

    # ---- pending references -------------------------------------------------------------------
    def add_pending(self, ino: int, chunk_id: bytes) -> None:
        seq = self.allocate(F.META_NEXT_PENDING)
        self.txn.put(F.U64x2.pack(ino, seq), chunk_id, db=self.dbs[F.DB_PENDING])

    def take_pending(self, ino: int) -> list[bytes]:
        """Remove and return the pending references of one file, in the order they were taken."""
        prefix = u64(ino)
        out: list[bytes] = []
        with self.txn.cursor(db=self.dbs[F.DB_PENDING]) as c:
            c.set_range(prefix)
            while c.key()[:8] == prefix:
                out.append(bytes(c.value()))
                c.delete()
        return out

    def drop_all_pending(self) -> int:
        """After a crash: release every reference held by a file commit that did not finish."""
        refs = []
        with self.txn.cursor(db=self.dbs[F.DB_PENDING]) as c:
            for _, v in c:
                refs.append(bytes(v))
        self.txn.drop(self.dbs[F.DB_PENDING], delete=False)
        for chunk_id in refs:
            self.decref(chunk_id)
        return len(refs)

    # ---- paths (for reports, not for the hot path) ----------------------------------------------
    def walk(self, ino: int = F.ROOT_INO, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """(path, inode) of everything below a directory, depth first, paths relative to it."""
        for _, name, child in self.entries(ino):
            node = self.inode(child)
            if node is None:
                continue
            path = prefix + name
            yield path, node
            if stat.S_ISDIR(node.mode):
                yield from self.walk(child, path + b"/")

    def path_of(self, ino: int) -> str | None:
        """One path of an inode, by scanning the directories (only for error reports)."""
        parts: list[bytes] = []
        while ino != F.ROOT_INO:
            with self.txn.cursor(db=self.dbs[F.DB_DIRENTS]) as c:
                for k, v in c:
                    if F.U64x2.unpack(v)[1] == ino:
                        parts.append(bytes(k[8:]))
                        ino = from_u64(k[:8])
                        break
                else:
                    return None
        return "/" + b"/".join(reversed(parts)).decode(errors="surrogateescape")
