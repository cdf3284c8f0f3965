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
