"""Re-reading and re-hashing everything in a store, and saying precisely what is damaged.

Verification runs in one read transaction: a consistent snapshot, so it works beside a running
mount (LMDB readers never block the writer).
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import format as F
from .codec import ChunkCorrupt, confirm_digest, decode
from .store import Store
from .txn import Txn


@dataclass
class Report:
    chunks: int = 0
    files: int = 0
    bytes_checked: int = 0
    bad_chunks: dict[str, str] = field(default_factory=dict)          # chunk id hex -> why
    damaged_files: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> ranges
    problems: list[str] = field(default_factory=list)                  # accounting errors

    @property
    def ok(self) -> bool:
        return not (self.bad_chunks or self.damaged_files or self.problems)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "chunks": self.chunks, "files": self.files,
                "bytes_checked": self.bytes_checked, "bad_chunks": self.bad_chunks,
                "damaged_files": {p: [{"offset": o, "length": n} for o, n in r]
                                  for p, r in self.damaged_files.items()},
                "problems": self.problems}


def verify(store: Store, progress: Callable[[int], None] | None = None) -> Report:
    """Check every chunk against both digests, every reference count, every file's extents
    and the store's counters. `progress` is called with the raw bytes checked so far."""
    report = Report()
    with store.reader() as tx:
        bad: set[bytes] = set()
        unique = stored = 0
        for chunk_id, rec in tx.chunks():
            report.chunks += 1
            unique += rec.raw_len
            stored += rec.stored_len
            why = _check_chunk(tx.chunk_data(chunk_id), chunk_id, rec)
            if why:
                bad.add(chunk_id)
                report.bad_chunks[chunk_id.hex()] = why
            report.bytes_checked += rec.raw_len
            if progress:
                progress(report.bytes_checked)

        _check_tree(tx, report)
        refs: Counter[bytes] = Counter()
        logical = 0
        names = {node.ino: path.decode(errors="surrogateescape") for path, node in tx.walk()}
        for node in tx.inodes():
            if node.ino not in names and node.ino != F.ROOT_INO and node.nlink:
                report.problems.append(f"inode {node.ino} has links but no directory entry")
            if not stat.S_ISREG(node.mode):
                continue
            report.files += 1
            damaged: list[tuple[int, int]] = []
            end = held = 0
            for off, chunk_id, length in tx.extents(node.ino):
                refs[chunk_id] += 1
                held += length
                if off < end:
                    report.problems.append(f"inode {node.ino}: overlapping extents at {off}")
                end = off + length
                if chunk_id in bad or tx.chunk_record(chunk_id) is None:
                    damaged.append((off, length))
            if end > node.size:
                report.problems.append(f"inode {node.ino}: extents run past its size")
            logical += held
            if held != node.data_bytes:
                report.problems.append(f"inode {node.ino}: data_bytes {node.data_bytes}, "
                                       f"its extents hold {held}")
            if damaged:
                report.damaged_files[names.get(node.ino, f"<inode {node.ino}>")] = damaged
        with tx.txn.cursor(db=tx.dbs[F.DB_PENDING]) as c:
            for _, chunk_id in c:
                refs[bytes(chunk_id)] += 1

        for chunk_id, rec in tx.chunks():
            if refs.get(chunk_id, 0) != rec.refcount:
                report.problems.append(f"chunk {chunk_id.hex()}: reference count "
                                       f"{rec.refcount}, referenced {refs.get(chunk_id, 0)}")
        for chunk_id in refs.keys() - {c for c, _ in tx.chunks()}:
            report.problems.append(f"chunk {chunk_id.hex()} is referenced but missing")

        counters = tx.counters()
        for name, actual in (("files", report.files), ("logical_bytes", logical),
                             ("unique_bytes", unique), ("stored_bytes", stored),
                             ("chunks", report.chunks)):
            if counters[name] != actual:
                report.problems.append(f"counter {name} says {counters[name]}, "
                                       f"the store holds {actual}")
    return report


def _check_tree(tx: Txn, report: Report) -> None:
    """Directory entries, their two indexes and link counts agree; no record belongs to an
    inode that does not exist."""
    problems = report.problems
    inodes = {node.ino: node for node in tx.inodes()}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    with tx.txn.cursor(db=tx.dbs[F.DB_DIRENTS]) as c:
        for k, v in c:
            parent, name = F.from_u64(k[:8]), bytes(k[8:])
            entry_id, child = F.U64x2.unpack(v)
            listed = tx.txn.get(F.U64x2.pack(parent, entry_id), db=tx.dbs[F.DB_DIRLIST])
            if listed != name:
                problems.append(f"entry {name!r} of directory {parent} is missing from its listing")
            if parent not in inodes or not stat.S_ISDIR(inodes[parent].mode):
                problems.append(f"entry {name!r} is in {parent}, which is not a directory")
            if child not in inodes:
                problems.append(f"entry {name!r} of directory {parent} names missing inode {child}")
                continue
            names[child] += 1
            if stat.S_ISDIR(inodes[child].mode):
                subdirs[parent] += 1
    with tx.txn.cursor(db=tx.dbs[F.DB_DIRLIST]) as c:
        for k, name in c:
            parent, entry_id = F.U64x2.unpack(k)
            v = tx.txn.get(F.dirent_key(parent, bytes(name)), db=tx.dbs[F.DB_DIRENTS])
            if v is None or F.U64x2.unpack(v)[0] != entry_id:
                problems.append(f"listing of directory {parent} has a stale entry {bytes(name)!r}")
    for ino, node in inodes.items():
        if stat.S_ISDIR(node.mode):
            linked = names[ino] or ino == F.ROOT_INO
            want = 2 + subdirs[ino] if linked else 0
        else:
            want = names[ino]
        if node.nlink != want:
            problems.append(f"inode {ino}: nlink {node.nlink}, its names count {want}")
    for db, what in ((F.DB_EXTENTS, "extents"), (F.DB_XATTRS, "xattrs")):
        with tx.txn.cursor(db=tx.dbs[db]) as c:
            for k in c.iternext(values=False):
                ino = F.from_u64(k[:8])
                if ino not in inodes or (db == F.DB_EXTENTS
                                         and not stat.S_ISREG(inodes[ino].mode)):
                    problems.append(f"{what} record of inode {ino}, which has none")


def _check_chunk(value: bytes | None, chunk_id: bytes, rec: F.ChunkRecord) -> str | None:
    if value is None:
        return "data missing"
    if len(value) - 1 != rec.stored_len:
        return f"stored length {len(value) - 1}, record says {rec.stored_len}"
    try:
        data = decode(chunk_id, value, rec.raw_len)
    except ChunkCorrupt as e:
        return str(e)
    if len(data) != rec.raw_len:
        return f"raw length {len(data)}, record says {rec.raw_len}"
    if confirm_digest(data) != rec.blake3:
        return "BLAKE3 mismatch"
    return None
