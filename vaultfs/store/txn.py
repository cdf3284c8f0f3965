"""One LMDB transaction over the store's databases, with the operations the layers above need.

Read and write transactions share this class; only the writer thread (writer.py) opens write
transactions. Every change that affects a counter in `meta` updates it in the same transaction,
so the figures in `vaultfs status` are exact after any crash.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import defaultdict
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass

import lmdb

from . import format as F
from .codec import Digests
from .format import ChunkRecord, Inode, from_u64, u64


class StoreError(Exception):
    """A store operation that cannot go on: the message says why, for a person."""


@dataclass
class EpochTree:
    """The epochs, their children, and which are named (a snapshot's or a branch's)."""
    parents: dict[int, int]
    children: dict[int, list[int]]
    named: set[int]

    def seen(self, epoch: int, versioned: Container[int]) -> bool:
        """Whether a record of some key at `epoch` is visible from a snapshot or branch, given
        the epochs `versioned` where that key has records of its own (which hide it below)."""
        if epoch in self.named:
            return True
        stack = list(self.children.get(epoch, ()))
        while stack:
            e = stack.pop()
            if e in versioned:
                continue
            if e in self.named:
                return True
            stack.extend(self.children.get(e, ()))
        return False


class Txn:
    """A transaction over one tree of the store: a branch's live epoch (read and write) or a
    frozen epoch (read only). `ancestry` is the store's cache of each epoch's visible set."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], *,
                 branch: bytes | None = F.MAIN_BRANCH, epoch: int | None = None,
                 ancestry: dict | None = None, write: bool = False):
        self.txn = txn
        self.dbs = dbs
        self.branch = None if epoch is not None else branch
        self._epoch = epoch
        self._visible: frozenset[int] | None = None
        self._ancestry = {} if ancestry is None else ancestry
        self._write = write

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

    # ---- epochs -------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch this transaction reads (and writes, on a branch)."""
        if self._epoch is None:
            v = self.txn.get(self.branch, db=self.dbs[F.DB_BRANCHES])
            if v is None:
                raise StoreError(f"the store has no branch {self.branch.decode(errors='replace')}")
            self._epoch = from_u64(v)
        return self._epoch

    @property
    def visible(self) -> frozenset[int]:
        """The epochs whose records this transaction sees: its own and its ancestors."""
        if self._visible is None:
            key = (self.counter(F.META_EPOCH_GEN), self.epoch)
            vis = self._ancestry.get(key)
            if vis is None:
                vis = frozenset(self.ancestors(self.epoch))
                if not self._write:  # only committed state may be cached
                    self._ancestry[key] = vis
            self._visible = vis
        return self._visible

    def ancestors(self, epoch: int) -> Iterator[int]:
        """`epoch`, its parent, and so on up to the first epoch."""
        while epoch:
            yield epoch
            v = self.txn.get(u64(epoch), db=self.dbs[F.DB_EPOCHS])
            if v is None:
                raise StoreError(f"epoch {epoch} is missing from the store")
            epoch = F.EPOCH_REC.unpack(v)[0]

    def epoch_tree(self) -> EpochTree:
        with self.txn.cursor(db=self.dbs[F.DB_EPOCHS]) as c:
            parents = {from_u64(k): F.EPOCH_REC.unpack(v)[0] for k, v in c}
        children: dict[int, list[int]] = defaultdict(list)
        for e, p in parents.items():
            children[p].append(e)
        named = {e for _, e in self.branches()} | {e for _, e, _, _ in self.snapshots()}
        return EpochTree(parents, dict(children), named)

    def new_epoch(self, parent: int, now_ns: int) -> int:
        epoch = self.allocate(F.META_NEXT_EPOCH)
        self.txn.put(u64(epoch), F.EPOCH_REC.pack(parent, now_ns), db=self.dbs[F.DB_EPOCHS])
        return epoch

    def _require_writable(self) -> int:
        if self.branch is None or not self._write:
            raise StoreError("this view of the store is read-only")
        return self.epoch

    # ---- versioned records --------------------------------------------------------------------
    def _versions(self, db: bytes, base: bytes) -> Iterator[tuple[int, bytes]]:
        """(epoch, value) of the versions of `base` visible here, newest first; the value is
        None for a tombstone."""
        vis, n = self.visible, len(base) + 8
        with self.txn.cursor(db=self.dbs[db]) as c:
            if not c.set_range(F.vkey(base, self.epoch)):
                return
            for k, v in c:
                if len(k) != n or k[:-8] != base:
                    return
                e = F.epoch_of(k)
                if e in vis:
                    yield e, (v[1:] if v[0] else None)

    def _get(self, db: bytes, base: bytes):
        for _, v in self._versions(db, base):
            return v
        return None

    def _put(self, db: bytes, base: bytes, value: bytes) -> None:
        self.txn.put(F.vkey(base, self._require_writable()), F.PRESENT + value,
                     db=self.dbs[db])

    def _delete(self, db: bytes, base: bytes) -> bool:
        """Delete `base` from this branch's tree; True if it was there. A version that an older
        epoch still sees is hidden by a tombstone; otherwise the record is simply removed."""
        epoch = self._require_writable()
        existed = older = False
        for i, (e, v) in enumerate(self._versions(db, base)):
            if i == 0:
                existed = v is not None
            if e != epoch:
                older = v is not None
                break
        key = F.vkey(base, epoch)
        if older:
            self.txn.put(key, F.TOMBSTONE, db=self.dbs[db])
        else:
            self.txn.delete(key, db=self.dbs[db])
        return existed

    def _scan(self, db: bytes, prefix: bytes, start: bytes | None = None
              ) -> Iterator[tuple[bytes, bytes]]:
        """(base key, value) of every record visible here whose key begins with `prefix`, in
        key order, from `start` (a base key) on."""
        vis, n, skip = self.visible, len(prefix), None
        with self.txn.cursor(db=self.dbs[db]) as c:
            if not c.set_range(start if start is not None else prefix):
                return
            for k, v in c:
                if k[:n] != prefix:
                    return
                base = k[:-8]
                if base == skip or F.epoch_of(k) not in vis:
                    continue
                skip = bytes(base)
                if v[0]:
                    yield skip, v[1:]

    # ---- inodes -------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        v = self._get(F.DB_INODES, u64(ino))
        return Inode.unpack(ino, v) if v is not None else None

    def put_inode(self, inode: Inode) -> None:
        self._put(F.DB_INODES, u64(inode.ino), inode.pack())

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
        """Drop an inode whose last link and last open handle are gone from this tree. What
        no snapshot or branch still sees (its versions, their chunks) is freed."""
        for name, _ in list(self.xattrs(inode.ino)):
            self.remove_xattr(inode.ino, name)
        self._delete(F.DB_INODES, u64(inode.ino))
        records = self.records(F.DB_INODES, u64(inode.ino))
        if records:
            tree = self.epoch_tree()
            if any(v[:1] == F.PRESENT and tree.seen(e, records) for e, v in records.items()):
                return  # a snapshot or another branch still has it
            for e in records:  # left only in epochs nobody sees (gc would drop them)
                self.txn.delete(F.vkey(u64(inode.ino), e), db=self.dbs[F.DB_INODES])
        self.forget_inode(inode.ino, stat.S_ISREG(inode.mode))

    def forget_inode(self, ino: int, is_file: bool) -> None:
        """An inode no epoch holds any more: its timeline goes, and with it what only the
        timeline held; it no longer counts as a file."""
        for version in list(self.versions(ino)):
            self.drop_version(version, ino)
        if is_file:
            self.bump(F.STAT_FILES, -1)

    def records(self, db: bytes, base: bytes) -> dict[int, bytes]:
        """Every stored version of a base key, in any epoch, tombstones included."""
        out = {}
        n = len(base) + 8
        with self.txn.cursor(db=self.dbs[db]) as c:
            if c.set_range(base):
                for k, v in c:
                    if len(k) != n or k[:-8] != base:
                        break
                    out[F.epoch_of(k)] = bytes(v)
        return out

    def inode_epochs(self, ino: int) -> dict[int, Inode]:
        """Every stored version of an inode, in any epoch, by epoch (tombstones left out)."""
        return {e: Inode.unpack(ino, v[1:])
                for e, v in self.records(F.DB_INODES, u64(ino)).items() if v[:1] == F.PRESENT}

    def inodes(self) -> Iterator[Inode]:
        for k, v in self._scan(F.DB_INODES, b""):
            yield Inode.unpack(from_u64(k), v)

    # ---- directories --------------------------------------------------------------------------
    def _entry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        v = self._get(F.DB_DIRENTS, F.dirent_key(parent, name))
        return F.U64x2.unpack(v) if v is not None else None

    def lookup(self, parent: int, name: bytes) -> int | None:
        e = self._entry(parent, name)
        return e[1] if e is not None else None

    def _put_entry(self, parent: int, name: bytes, entry_id: int, ino: int) -> None:
        self._put(F.DB_DIRENTS, F.dirent_key(parent, name), F.U64x2.pack(entry_id, ino))
        self._put(F.DB_DIRLIST, F.U64x2.pack(parent, entry_id), name)

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self._put_entry(parent, name, self.allocate(F.META_NEXT_ENTRY), ino)

    def _pop_entry(self, parent: int, name: bytes) -> tuple[int, int]:
        e = self._entry(parent, name)
        if e is None:
            raise KeyError(name)
        self._delete(F.DB_DIRENTS, F.dirent_key(parent, name))
        self._delete(F.DB_DIRLIST, F.U64x2.pack(parent, e[0]))
        return e

    def remove_entry(self, parent: int, name: bytes) -> int:
        return self._pop_entry(parent, name)[1]

    def rename_entry(self, parent: int, old: bytes, new: bytes) -> None:
        """Rename within one directory, keeping the entry's id (and so its place in a listing
        under way: a program renaming as it lists must not meet the same file twice)."""
        self._put_entry(parent, new, *self._pop_entry(parent, old))

    def relink_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode, keeping its id."""
        entry_id = self._entry(parent, name)[0]
        self._put(F.DB_DIRENTS, F.dirent_key(parent, name), F.U64x2.pack(entry_id, ino))

    def entries(self, parent: int, start_id: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(entry id, name, child ino) of a directory, in creation order, from start_id on."""
        for k, name in self._scan(F.DB_DIRLIST, u64(parent), F.U64x2.pack(parent, start_id)):
            name = bytes(name)
            yield F.U64x2.unpack(k)[1], name, self.lookup(parent, name)

    def dirents(self, parent: int) -> Iterator[tuple[bytes, bytes]]:
        """(name, entry id and child) of a directory by name (for checks)."""
        for k, v in self._scan(F.DB_DIRENTS, u64(parent)):
            yield k[8:-1], bytes(v)

    def has_entries(self, parent: int) -> bool:
        return next(self.entries(parent), None) is not None

    # ---- xattrs ---------------------------------------------------------------------------------
    def xattr(self, ino: int, name: bytes) -> bytes | None:
        return self._get(F.DB_XATTRS, F.xattr_key(ino, name))

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._put(F.DB_XATTRS, F.xattr_key(ino, name), value)

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self._delete(F.DB_XATTRS, F.xattr_key(ino, name))

    def xattrs(self, ino: int) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self._scan(F.DB_XATTRS, u64(ino)):
            yield k[8:-1], bytes(v)

    # ---- snapshots and branches ---------------------------------------------------------------
    def snapshot(self, name: bytes, now_ns: int) -> int:
        """Freeze this branch's tree as snapshot `name`: the branch goes on in a new epoch,
        the old one is never written again. Costs the same for any size of tree."""
        epoch = self._require_writable()
        if self.txn.get(name, db=self.dbs[F.DB_SNAPSHOTS]) is not None:
            raise StoreError(f"a snapshot named {name.decode(errors='replace')} exists")
        child = self.new_epoch(epoch, now_ns)
        self.txn.put(self.branch, u64(child), db=self.dbs[F.DB_BRANCHES])
        self.txn.put(name, F.SNAPSHOT_REC.pack(epoch, now_ns) + self.branch,
                     db=self.dbs[F.DB_SNAPSHOTS])
        self._epoch, self._visible = None, None
        return epoch

    def snapshots(self) -> Iterator[tuple[bytes, int, int, bytes]]:
        """(name, epoch, created ns, branch) of every snapshot, by name."""
        with self.txn.cursor(db=self.dbs[F.DB_SNAPSHOTS]) as c:
            for k, v in c:
                epoch, created = F.SNAPSHOT_REC.unpack_from(v)
                yield bytes(k), epoch, created, bytes(v[F.SNAPSHOT_REC.size:])

    def branches(self) -> Iterator[tuple[bytes, int]]:
        """(name, epoch written in) of every branch."""
        with self.txn.cursor(db=self.dbs[F.DB_BRANCHES]) as c:
            for k, v in c:
                yield bytes(k), from_u64(v)

    def snapshot_epoch(self, name: bytes) -> int | None:
        v = self.txn.get(name, db=self.dbs[F.DB_SNAPSHOTS])
        return F.SNAPSHOT_REC.unpack_from(v)[0] if v is not None else None

    # ---- versions and extents -----------------------------------------------------------------
    def versions(self, ino: int) -> Iterator[F.Version]:
        """A file's timeline: its committed versions, oldest first."""
        prefix = u64(ino)
        with self.txn.cursor(db=self.dbs[F.DB_TIMELINES]) as c:
            if not c.set_range(prefix):
                return
            for k in c.iternext(values=False):
                if k[:8] != prefix:
                    return
                yield self.version(F.U64x2.unpack(k)[1])

    def timelines(self) -> Iterator[tuple[int, int]]:
        """(ino, version) of every timeline entry (for checks)."""
        with self.txn.cursor(db=self.dbs[F.DB_TIMELINES]) as c:
            for k in c.iternext(values=False):
                yield F.U64x2.unpack(k)

    def all_versions(self) -> Iterator[F.Version]:
        with self.txn.cursor(db=self.dbs[F.DB_VERSIONS]) as c:
            for k, v in c:
                yield F.Version.unpack(from_u64(k), v)

    def all_extents(self) -> Iterator[tuple[int, int, bytes, int]]:
        """(version, offset, chunk id, length) of every extent in the store."""
        with self.txn.cursor(db=self.dbs[F.DB_EXTENTS]) as c:
            for k, v in c:
                yield (*F.U64x2.unpack(k), *F.EXTENT_VAL.unpack(v))

    def version(self, number: int) -> F.Version | None:
        v = self.txn.get(u64(number), db=self.dbs[F.DB_VERSIONS])
        return F.Version.unpack(number, v) if v is not None else None

    def new_version(self, inode: Inode, extents: list[tuple[int, bytes, int]], size: int,
                    mtime_ns: int, now_ns: int) -> F.Version:
        """Add a version of `inode` holding `extents` (the caller holds one chunk reference
        per extent) to its timeline and make it the inode's content (not yet stored)."""
        number = self.allocate(F.META_NEXT_VERSION)
        db = self.dbs[F.DB_EXTENTS]
        for off, chunk_id, length in extents:
            self.txn.put(F.extent_key(number, off), F.EXTENT_VAL.pack(chunk_id, length), db=db)
        data = sum(e[2] for e in extents)
        self.bump(F.STAT_LOGICAL, data)
        v = F.Version(number, now_ns, size, mtime_ns, data, inode.ino)
        self.txn.put(u64(number), v.pack(), db=self.dbs[F.DB_VERSIONS])
        self.txn.put(F.U64x2.pack(inode.ino, number), b"", db=self.dbs[F.DB_TIMELINES])
        inode.content, inode.size, inode.data_bytes = number, size, data
        return v

    def move_versions(self, src: int, dst: int) -> None:
        """Hand the timeline of inode `src` on to `dst` (a file saved by writing a new one and
        renaming it over the old keeps one timeline)."""
        for v in list(self.versions(src)):
            self.txn.delete(F.U64x2.pack(src, v.version), db=self.dbs[F.DB_TIMELINES])
            self.txn.put(F.U64x2.pack(dst, v.version), b"", db=self.dbs[F.DB_TIMELINES])

    def on_timeline(self, ino: int, number: int) -> bool:
        return self.txn.get(F.U64x2.pack(ino, number), db=self.dbs[F.DB_TIMELINES]) is not None

    def holds(self, v: F.Version) -> bool:
        """Whether v's origin inode has it as its content in some epoch."""
        return any(node.content == v.version for node in self.inode_epochs(v.origin).values())

    def drop_version(self, v: F.Version, timeline: int) -> None:
        """Remove a version from the timeline of inode `timeline` and free it, unless its
        origin inode holds it as its content in some epoch: then it goes back to the origin's
        timeline (a file saved over while still open keeps its content)."""
        self.txn.delete(F.U64x2.pack(timeline, v.version), db=self.dbs[F.DB_TIMELINES])
        if self.holds(v):
            self.txn.put(F.U64x2.pack(v.origin, v.version), b"", db=self.dbs[F.DB_TIMELINES])
        else:
            self.txn.delete(u64(v.version), db=self.dbs[F.DB_VERSIONS])
            self.free_content(v.version)

    def media(self, number: int) -> dict | None:
        """What the media index says of a version's bytes (None: not analysed yet)."""
        db = self.dbs.get(F.DB_MEDIA)
        v = self.txn.get(u64(number), db=db) if db is not None and number else None
        return json.loads(bytes(v)) if v is not None else None

    def media_versions(self) -> Iterator[int]:
        """The versions the media index has a record of (for checks)."""
        if F.DB_MEDIA in self.dbs:
            with self.txn.cursor(db=self.dbs[F.DB_MEDIA]) as c:
                for k in c.iternext(values=False):
                    yield from_u64(k)

    def put_media(self, number: int, record: dict) -> None:
        if self.version(number) is not None:  # (dropped while it was being analysed)
            self.txn.put(u64(number), json.dumps(record, sort_keys=True).encode(),
                         db=self.dbs[F.DB_MEDIA])

    def preview(self, number: int) -> F.Preview | None:
        """The generated preview of a version (None: none made or tried yet). In a reader
        with buffers, its JPEG is a view of the map: copy what must outlive the reader."""
        db = self.dbs.get(F.DB_PREVIEWS)
        v = self.txn.get(u64(number), db=db) if db is not None and number else None
        return F.Preview.unpack(v) if v is not None else None

    def previews(self) -> Iterator[tuple[int, int, bool]]:
        """(version, long side asked, made) of every preview record (in a reader with
        buffers, this touches only their first bytes)."""
        if F.DB_PREVIEWS in self.dbs:
            with self.txn.cursor(db=self.dbs[F.DB_PREVIEWS]) as c:
                for k, v in c:
                    asked, made = F.PREVIEW_HEAD.unpack_from(v)
                    yield from_u64(k), asked, bool(made)

    def put_preview(self, number: int, preview: F.Preview) -> None:
        if self.version(number) is not None:  # (dropped while it was being made)
            self.txn.put(u64(number), preview.pack(), db=self.dbs[F.DB_PREVIEWS])

    def free_content(self, number: int) -> None:
        for db in (F.DB_MEDIA, F.DB_PREVIEWS):
            if db in self.dbs:
                self.txn.delete(u64(number), db=self.dbs[db])
        for db in (F.DB_HELD, F.DB_RELIED):
            for peer, _, _ in self._peer_records(db, number):
                self.txn.delete(u64(number) + peer, db=self.dbs[db])
        db = self.dbs[F.DB_EXTENTS]
        old = list(self.extents(number))
        for off, chunk_id, length in old:
            self.txn.delete(F.extent_key(number, off), db=db)
            self.decref(chunk_id)
        self.bump(F.STAT_LOGICAL, -sum(e[2] for e in old))

    def extents(self, content: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(offset, chunk id, length) of a version's extents in order, beginning with the one
        that covers `start` (or the first after it, when `start` falls in a hole)."""
        if not content:
            return
        prefix = u64(content)
        key = F.extent_key(content, start)
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

    # ---- chunks ---------------------------------------------------------------------------------
    def chunk_record(self, chunk_id: bytes) -> ChunkRecord | None:
        v = self.txn.get(chunk_id, db=self.dbs[F.DB_CHUNKS])
        return ChunkRecord.unpack(v) if v is not None else None

    def chunk_data(self, chunk_id: bytes) -> bytes | None:
        return self.txn.get(chunk_id, db=self.dbs[F.DB_CHUNKDATA])

    def find_chunk(self, d: Digests) -> bytes | None:
        """The id of the stored chunk with both digests, or None (also when it is offline:
        its bytes must come again, and add_chunk takes them back)."""
        chunk_id, found = self._probe(d)
        return chunk_id if found and not self.chunk_record(chunk_id).offline else None

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
            rec = self.chunk_record(chunk_id)
            if rec.offline:  # evicted, and here again: hold its bytes once more
                stored = stored() if callable(stored) else stored
                self.txn.put(chunk_id, stored, db=self.dbs[F.DB_CHUNKDATA])
                rec = ChunkRecord(rec.refcount, rec.raw_len, len(stored) - 1, rec.blake3)
                self.bump(F.STAT_OFFLINE, -rec.raw_len)
                self.bump(F.STAT_STORED, rec.stored_len)
            self.txn.put(chunk_id, ChunkRecord(rec.refcount + 1, rec.raw_len, rec.stored_len,
                                               rec.blake3).pack(), db=self.dbs[F.DB_CHUNKS])
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

    def is_offline(self, content: int) -> bool:
        """Whether some of a version's chunks were evicted (store/evict.py)."""
        return any(self.chunk_record(c).offline for _, c, _ in self.extents(content))

    def evict_chunk(self, chunk_id: bytes) -> int:
        """Drop a chunk's bytes, keeping its record (it goes offline); the bytes freed."""
        rec = self.chunk_record(chunk_id)
        if rec is None or rec.offline:
            return 0
        self.txn.delete(chunk_id, db=self.dbs[F.DB_CHUNKDATA])
        self.txn.put(chunk_id, ChunkRecord(rec.refcount, rec.raw_len, 0, rec.blake3).pack(),
                     db=self.dbs[F.DB_CHUNKS])
        self.bump(F.STAT_STORED, -rec.stored_len)
        self.bump(F.STAT_OFFLINE, rec.raw_len)
        return rec.stored_len

    def repair_chunk(self, chunk_id: bytes, stored: bytes) -> None:
        """Replace a damaged chunk's stored value with another stored form of the same bytes
        (a good copy from the mirror, which the caller has checked against both digests and
        the length: scrub.repair). Its references stay; only its stored size may change."""
        rec = self.chunk_record(chunk_id)
        if rec is None or rec.offline:  # (an offline chunk is evicted, not damaged)
            raise StoreError(f"chunk {chunk_id.hex()} has no stored bytes to repair")
        self._replace_value(chunk_id, rec, stored)

    def recompress_chunk(self, chunk_id: bytes, blake3: bytes, stored: bytes) -> int:
        """Replace a chunk's stored value by a smaller stored form of the same raw bytes, made
        at a stronger zstd level and checked by the caller (decoded; xxh3, BLAKE3 `blake3` and
        length matched: store/recompress.py). Nothing changes when the chunk is gone, offline,
        holds other bytes now (its id reused after it was freed: another BLAKE3) or is stored
        as small already. Returns the bytes saved."""
        rec = self.chunk_record(chunk_id)
        if rec is None or rec.offline or rec.blake3 != blake3 or \
                len(stored) - 1 >= rec.stored_len:
            return 0
        self._replace_value(chunk_id, rec, stored)
        return rec.stored_len - (len(stored) - 1)

    def _replace_value(self, chunk_id: bytes, rec: ChunkRecord, stored: bytes) -> None:
        """Another stored form of a chunk's bytes: its value, its record's stored_len and
        stat.stored_bytes change together; references, raw_len and digests stay."""
        self.txn.put(chunk_id, stored, db=self.dbs[F.DB_CHUNKDATA])
        self.txn.put(chunk_id, ChunkRecord(rec.refcount, rec.raw_len, len(stored) - 1,
                                           rec.blake3).pack(), db=self.dbs[F.DB_CHUNKS])
        self.bump(F.STAT_STORED, len(stored) - 1 - rec.stored_len)

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
        if rec.offline:
            self.bump(F.STAT_OFFLINE, -rec.raw_len)

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
        """After a crash: release every reference held by a file commit that did not finish
        (not the sync inbox's: a rerun of the sync uses them)."""
        refs = []
        with self.txn.cursor(db=self.dbs[F.DB_PENDING]) as c:
            c.set_range(u64(F.INBOX_INO + 1))
            while c.key():  # (a delete moves the cursor on; b"" past the end)
                refs.append(bytes(c.value()))
                c.delete()
        for chunk_id in refs:
            self.decref(chunk_id)
        return len(refs)

    def release_inbox(self) -> int:
        """Release the chunks a sync received and did not use (the files that use them hold
        references of their own)."""
        refs = self.take_pending(F.INBOX_INO)
        for chunk_id in refs:
            self.decref(chunk_id)
        return len(refs)

    # ---- versions held by peers, and relied on by them ----------------------------------------
    def hold(self, number: int, peer: bytes, name: str, now_ns: int) -> None:
        """Record that `peer` holds version `number`'s bytes (seen when the two last met)."""
        self._put_peer_record(F.DB_HELD, number, peer, name, now_ns)

    def holders(self, number: int) -> list[tuple[bytes, str, int]]:
        """(peer id, peer name, confirmed ns) of the peers seen holding a version's bytes."""
        return self._peer_records(F.DB_HELD, number)

    def rely(self, number: int, peer: bytes, name: str, now_ns: int) -> None:
        """Record that `peer` relies on this vault's copy of version `number`."""
        self._put_peer_record(F.DB_RELIED, number, peer, name, now_ns)

    def reliers(self, number: int) -> list[tuple[bytes, str, int]]:
        """(peer id, peer name, ns) of the peers that rely on this vault's copy."""
        return self._peer_records(F.DB_RELIED, number)

    def peer_record_versions(self, db: bytes) -> Iterator[int]:
        """The versions that `held` or `relied` has a record of (for checks)."""
        if db in self.dbs:
            with self.txn.cursor(db=self.dbs[db]) as c:
                for k in c.iternext(values=False):
                    yield from_u64(k[:8])

    def is_sync_peer(self, peer: bytes) -> bool:
        """Whether this vault has met `peer` in a sync (it has bases with it)."""
        db = self.dbs.get(F.DB_SYNCBASE)
        if db is None:
            return False
        with self.txn.cursor(db=db) as c:
            return c.set_range(peer) and bytes(c.key()[:len(peer)]) == peer

    def _put_peer_record(self, db: bytes, number: int, peer: bytes, name: str,
                         now_ns: int) -> None:
        if self.version(number) is not None:
            self.txn.put(u64(number) + peer, F.HELD_REC.pack(now_ns) + name.encode(),
                         db=self.dbs[db])

    def _peer_records(self, db: bytes, number: int) -> list[tuple[bytes, str, int]]:
        handle = self.dbs.get(db)
        out: list[tuple[bytes, str, int]] = []
        if handle is None or not number:
            return out
        prefix = u64(number)
        with self.txn.cursor(db=handle) as c:
            if c.set_range(prefix):
                for k, v in c:
                    if k[:8] != prefix:
                        break
                    out.append((bytes(k[8:]), bytes(v[F.HELD_REC.size:]).decode(errors="replace"),
                                F.HELD_REC.unpack_from(v)[0]))
        return out

    # ---- sync bases ---------------------------------------------------------------------------
    def sync_base(self, peer: bytes) -> dict[bytes, bytes]:
        """path -> signature of every path on which this vault and `peer` (its 16-byte id)
        agreed when they last met (sync/tree.py makes signatures)."""
        db = self.dbs.get(F.DB_SYNCBASE)
        out: dict[bytes, bytes] = {}
        if db is None:
            return out
        with self.txn.cursor(db=db) as c:
            if c.set_range(peer):
                for k, v in c:
                    if k[:len(peer)] != peer:
                        break
                    out[bytes(v[16:])] = bytes(v[:16])
        return out

    def conflicts(self, still_open: bool = False) -> list[dict]:
        """The conflicts syncs kept both versions of ({path, kept_as, vault, at}); with
        `still_open`, those whose second copy is still in the tree."""
        raw = self.meta(F.META_CONFLICTS)
        found = json.loads(bytes(raw)) if raw else []
        return [c for c in found if not still_open or self.resolve(c["kept_as"]) is not None]

    def note_conflicts(self, conflicts: list[dict]) -> None:
        self.put_meta(F.META_CONFLICTS, json.dumps(self.conflicts(True) + conflicts).encode())

    def set_sync_base(self, peer: bytes, path: bytes, signature: bytes | None) -> None:
        # Keyed by a digest of the path: LMDB keys end at 511 bytes, paths do not.
        key = peer + hashlib.blake2b(path, digest_size=16).digest()
        if signature is None:
            self.txn.delete(key, db=self.dbs[F.DB_SYNCBASE])
        else:
            self.txn.put(key, signature + path, db=self.dbs[F.DB_SYNCBASE])

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

    def resolve(self, path: str | bytes) -> int | None:
        """The inode at `path` (relative to the root; '/' and '' are the root), or None."""
        if isinstance(path, str):
            path = path.encode(errors="surrogateescape")
        ino: int | None = F.ROOT_INO
        for name in filter(None, path.split(b"/")):
            ino = self.lookup(ino, name)
            if ino is None:
                return None
        return ino

    def path_of(self, ino: int) -> str | None:
        """One path of an inode, by walking the tree (only for error reports)."""
        if ino == F.ROOT_INO:
            return "/"
        for path, node in self.walk():
            if node.ino == ino:
                return "/" + path.decode(errors="surrogateescape")
        return None
