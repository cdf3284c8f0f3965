"""What one vault tells another about its live tree: an entry per path, comparable across
stores.

Chunk ids hold a collision byte that can differ between two stores for the same content
(docs/store-format.md §4.1), so what travels is content: a chunk is named by its *hash*, the
XXH3-128 digest and the BLAKE3-128 confirm digest of its raw bytes (32 bytes), and a file by
the digest of its extents' offsets, lengths and hashes. An entry's *signature* covers what a
sync carries over (type, permissions, mtime, content or link target, extended attributes), so
two vaults agree on a path exactly when its signatures are equal.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from dataclasses import dataclass

from ..media import catalog
from ..store import Store, Txn, policy

HASH_BYTES = 32  # a chunk's hash: xxh3-128 ‖ blake3-128
_EXTENT = struct.Struct(">QI")

KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l"}  # else "o": fifo, device...


@dataclass
class Entry:
    kind: str           # f file, d folder, l symlink, o other (fifo, socket, device)
    mode: int           # st_mode: type and permissions
    mtime_ns: int
    size: int
    content: bytes      # f: digest of the extents; l: the target; o: rdev as u64; d: b""
    xattrs: list        # [[name, value], ...] sorted
    tier: str           # files: the tier its own vault gives it
    priority: int       # that tier's sync_priority there: lower leaves first
    offline: bool = False  # files: some of its bytes were evicted there (not in the signature)

    def wire(self) -> list:
        return [self.kind, self.mode, self.mtime_ns, self.size, self.content, self.xattrs,
                self.tier, self.priority, self.offline]

    @classmethod
    def from_wire(cls, w: list) -> "Entry":
        kind, mode, mtime_ns, size, content, xattrs, tier, priority, offline = w
        if kind not in ("f", "d", "l", "o") or not all(
                isinstance(x, int) for x in (mode, mtime_ns, size, priority)) or \
                not isinstance(content, bytes) or not isinstance(tier, str) or \
                not isinstance(offline, bool) or \
                not all(isinstance(a, list) and len(a) == 2 and all(isinstance(b, bytes)
                                                                    for b in a) for a in xattrs):
            raise ValueError("malformed entry")
        return cls(kind, mode, mtime_ns, size, content, [list(a) for a in xattrs], tier,
                   priority, offline)

    @property
    def signature(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        # A folder's mtime moves with every file added in it: not something to agree on.
        h.update(struct.pack(">1sIq", self.kind.encode(), self.mode,
                             0 if self.kind == "d" else self.mtime_ns))
        h.update(struct.pack(">I", len(self.content)) + self.content)
        for name, value in self.xattrs:
            h.update(struct.pack(">II", len(name), len(value)) + name + value)
        return h.digest()

    def same_content(self, other: "Entry") -> bool:
        return self.kind == other.kind and self.content == other.content


def chunk_hash(tx: Txn, chunk_id: bytes) -> bytes:
    rec = tx.chunk_record(chunk_id)
    if rec is None:
        raise ValueError(f"missing chunk {chunk_id.hex()}")
    return bytes(chunk_id[:16]) + rec.blake3


def file_extents(tx: Txn, content: int) -> list[tuple[int, int, bytes]]:
    """(offset, length, chunk hash) of a version's extents."""
    return [(off, length, chunk_hash(tx, cid)) for off, cid, length in tx.extents(content)]


def content_digest(size: int, extents: list[tuple[int, int, bytes]]) -> bytes:
    h = hashlib.blake2b(struct.pack(">Q", size), digest_size=16)
    for off, length, hashed in extents:
        h.update(_EXTENT.pack(off, length) + hashed)
    return h.digest()


def listing(store: Store) -> dict[bytes, Entry]:
    """Every path of the open branch's live tree (relative, no leading '/')."""
    rules = policy.load(store.path)
    priority = {name: t.sync_priority for name, t in rules.tier_policies.items()}
    out: dict[bytes, Entry] = {}
    with store.reader() as tx:
        files = catalog.build(tx, catalog.tier_rules(rules)).files
        for path, node in tx.walk():
            kind = KINDS.get(stat.S_IFMT(node.mode), "o")
            tier = files[node.ino].tier if node.ino in files else ""
            offline = False
            if kind == "f":
                content = content_digest(node.size, file_extents(tx, node.content))
                offline = tx.is_offline(node.content)
            elif kind == "l":
                content = node.target or b""
            elif kind == "o":
                content = struct.pack(">Q", node.rdev)
            else:
                content = b""
            xattrs = sorted([bytes(k), bytes(v)] for k, v in tx.xattrs(node.ino))
            out[path] = Entry(kind, node.mode, node.mtime_ns, node.size, content, xattrs, tier,
                              priority.get(tier, 0), offline)
    return out
