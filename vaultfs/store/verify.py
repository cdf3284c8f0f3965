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
    offline_files: list[str] = field(default_factory=list)  # evicted, held by a peer: not damage
    bad_chunks: dict[str, str] = field(default_factory=dict)          # chunk id hex -> why
    damaged_files: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> ranges
    problems: list[str] = field(default_factory=list)                  # accounting errors

    @property
    def ok(self) -> bool:
        return not (self.bad_chunks or self.damaged_files or self.problems)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "chunks": self.chunks, "files": self.files,
                "bytes_checked": self.bytes_checked, "offline_files": self.offline_files,
                "bad_chunks": self.bad_chunks,
                "damaged_files": {p: [{"offset": o, "length": n} for o, n in r]
                                  for p, r in self.damaged_files.items()},
                "problems": self.problems}


def verify(store: Store, progress: Callable[[int], None] | None = None) -> Report:
    """Check every chunk against both digests, every reference count, every version's
    extents, every tree (each branch and snapshot) and the store's counters. `progress` is
    called with the raw bytes checked so far."""
    report = Report()
    with store.reader() as tx:
        bad: set[bytes] = set()
        unique = stored = offline_bytes = 0
        offline: set[bytes] = set()
        for chunk_id, rec in tx.chunks():
            report.chunks += 1
            unique += rec.raw_len
            stored += rec.stored_len
            if rec.offline:
                offline.add(chunk_id)
                offline_bytes += rec.raw_len
                if tx.chunk_data(chunk_id) is not None:
                    report.problems.append(f"chunk {chunk_id.hex()} is offline but has data")
                continue
            why = check_chunk(tx.chunk_data(chunk_id), chunk_id, rec)
            if why:
                bad.add(chunk_id)
                report.bad_chunks[chunk_id.hex()] = why
            report.bytes_checked += rec.raw_len
            if progress:
                progress(report.bytes_checked)

        # Every tree: the live tree of each branch and each snapshot's frozen one.
        held: dict[int, int] = {}      # version -> an inode holding it as content
        where: dict[int, str] = {}     # version -> a path to name it by
        files: set[int] = set()
        # Paths name the tree they are in, but for the main branch's: "a.nef", "draft:a.nef",
        # "@yesterday:a.nef".
        trees = [("" if b == F.MAIN_BRANCH else f"{b.decode(errors='replace')}:", e)
                 for b, e in tx.branches()]
        trees += [(f"@{n.decode(errors='replace')}:", e) for n, e, _, _ in tx.snapshots()]
        for label, epoch in trees:
            with store.reader(epoch=epoch) as view:
                _check_tree(view, label, report)
                for node in view.inodes():
                    if stat.S_ISREG(node.mode):
                        files.add(node.ino)
                        held.setdefault(node.content, node.ino)
                for path, node in view.walk():
                    if stat.S_ISREG(node.mode):
                        where.setdefault(node.content,
                                         label + path.decode(errors="surrogateescape"))

        refs: Counter[bytes] = Counter()
        logical = 0
        versions = {v.version: v for v in tx.all_versions()}
        on_timeline: Counter[int] = Counter()
        for ino, number in tx.timelines():
            on_timeline[number] += 1
            if number not in versions:
                report.problems.append(f"timeline of inode {ino} names missing version {number}")
        for number in versions:
            if on_timeline[number] != 1:
                report.problems.append(f"version {number} is on {on_timeline[number]} timelines")
        for number, ino in held.items():
            if number and number not in versions:
                report.problems.append(f"inode {ino} holds missing version {number}")
        for number in tx.media_versions():
            if number not in versions:
                report.problems.append(f"media record of version {number}, which does not "
                                       f"exist")
        for number, _, _ in tx.previews():
            if number not in versions:
                report.problems.append(f"preview of version {number}, which does not exist")
        for db in (F.DB_HELD, F.DB_RELIED):
            for number in tx.peer_record_versions(db):
                if number not in versions:
                    report.problems.append(f"{db.decode()} record of version {number}, which "
                                           f"does not exist")
        for number, off, chunk_id, length in tx.all_extents():
            refs[chunk_id] += 1
            logical += length
            if number not in versions:
                report.problems.append(f"extents of version {number}, which does not exist")
        for number, v in sorted(versions.items()):
            damaged: list[tuple[int, int]] = []
            end = data = 0
            is_offline = False
            for off, chunk_id, length in tx.extents(number):
                is_offline = is_offline or chunk_id in offline
                data += length
                if off < end:
                    report.problems.append(f"version {number}: overlapping extents at {off}")
                end = off + length
                if chunk_id in bad or tx.chunk_record(chunk_id) is None:
                    damaged.append((off, length))
            if end > v.size:
                report.problems.append(f"version {number}: extents run past its size")
            if data != v.data_bytes:
                report.problems.append(f"version {number}: data_bytes {v.data_bytes}, "
                                       f"its extents hold {data}")
            name = where.get(number, f"<inode {v.origin} version {number}>")
            if damaged:
                report.damaged_files[name] = damaged
            if is_offline and number in where:
                report.offline_files.append(name)
        report.files = len(files)
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
                             ("chunks", report.chunks), ("offline_bytes", offline_bytes)):
            if counters[name] != actual:
                report.problems.append(f"counter {name} says {counters[name]}, "
                                       f"the store holds {actual}")
    return report


def _check_tree(tx: Txn, label: str, report: Report) -> None:
    """In one tree: directory entries, their two indexes and link counts agree, every name
    leads to an inode, every inode but the root has a name (or is unlinked, nlink 0)."""
    problems = report.problems
    label = label or "main:"
    inodes = {node.ino: node for node in tx.inodes()}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, node in inodes.items():
        if not stat.S_ISDIR(node.mode):
            continue
        listed = {name: entry_id for entry_id, name, _ in tx.entries(parent)}
        for name, v in tx.dirents(parent):
            entry_id, child = F.U64x2.unpack(v)
            if listed.pop(name, None) != entry_id:
                problems.append(f"{label} entry {name!r} of directory {parent} is missing "
                                f"from its listing")
            if child not in inodes:
                problems.append(f"{label} entry {name!r} of directory {parent} names missing "
                                f"inode {child}")
                continue
            names[child] += 1
            if stat.S_ISDIR(inodes[child].mode):
                subdirs[parent] += 1
        for name in listed:
            problems.append(f"{label} listing of directory {parent} has a stale entry {name!r}")
    for ino, node in inodes.items():
        if stat.S_ISDIR(node.mode):
            linked = names[ino] or ino == F.ROOT_INO
            want = 2 + subdirs[ino] if linked else 0
        else:
            want = names[ino]
        if node.nlink != want:
            problems.append(f"{label} inode {ino}: nlink {node.nlink}, its names count {want}")
        if node.content and not stat.S_ISREG(node.mode):
            problems.append(f"{label} inode {ino} is not a file but has content")


def check_chunk(value: bytes | None, chunk_id: bytes, rec: F.ChunkRecord) -> str | None:
    """What is wrong with a chunk's stored value, or None: it decodes to bytes with both
    digests and the recorded lengths."""
    return checked_chunk(value, chunk_id, rec)[1]


def checked_chunk(value: bytes | None, chunk_id: bytes,
                  rec: F.ChunkRecord) -> tuple[bytes | None, str | None]:
    """A chunk's raw bytes, checked as by check_chunk: (bytes, None), or (None, why not)."""
    if value is None:
        return None, "data missing"
    if len(value) - 1 != rec.stored_len:
        return None, f"stored length {len(value) - 1}, record says {rec.stored_len}"
    try:
        data = decode(chunk_id, value, rec.raw_len)
    except ChunkCorrupt as e:
        return None, str(e)
    if len(data) != rec.raw_len:
        return None, f"raw length {len(data)}, record says {rec.raw_len}"
    if confirm_digest(data) != rec.blake3:
        return None, "BLAKE3 mismatch"
    return data, None
