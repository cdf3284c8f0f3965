"""One vault as a sync sees it: the operations a sync asks of a store, whether the store is
on this machine or behind `vaultfs serve` (remote.py calls these by name, with the same
arguments, over the wire). Everything here takes and returns plain data (bytes, ints, strs,
lists, dicts) so that it can travel; every path and hash that comes in is checked.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
import threading
import time
import tomllib
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard

from ..store import Store, StoreError, Txn, codec, history, policy, treeops
from ..store.format import INBOX_INO
from . import delta, tree, wire

log = logging.getLogger(__name__)

OFFLINE = "offline"  # what `extents` says of a file whose bytes were evicted here
MAX_PATH = 4096
MAX_CHUNK = 64 * 1024 * 1024  # far above what the chunker makes; bounds what a peer can ask for
MAX_CALL_BYTES = 256 * 1024 * 1024  # raw bytes of the chunks of one put_chunks (a batch: 64 MiB)
SNAPSHOT_PREFIX = policy.AUTO_PREFIX + "sync-"
# A chunk checked on arrival: digests, raw length, stored value, and its raw bytes where a
# later chunk of the batch names it as its near copy (else empty; None: still to be rebuilt).
Arrived = tuple[codec.Digests, int, bytes, bytes | None]


class BadRequest(StoreError):
    """A message that a well-behaved peer would not send: refused, nothing changed."""


def check_path(path: object) -> bytes:
    """A path inside the tree: relative, no empty, '.' or '..' parts, no NUL, not the root's
    reserved .vault. Anything else could reach outside the tree."""
    if not isinstance(path, bytes) or not path or len(path) > MAX_PATH or b"\0" in path \
            or path.startswith(b"/"):
        raise BadRequest(f"refused path {path!r}")
    parts = path.split(b"/")
    if any(p in (b"", b".", b"..") or len(p) > 255 for p in parts) or parts[0] == b".vault":
        raise BadRequest(f"refused path {path!r}")
    return path


def check_hash(h: object) -> bytes:
    if not isinstance(h, bytes) or len(h) != tree.HASH_BYTES:
        raise BadRequest("refused chunk hash")
    return h


def vault_name(store: Store) -> str:
    """The name a vault goes by in conflict names: vault.toml's `name`, else its folder's."""
    doc = tomllib.loads((store.path / "vault.toml").read_text())
    name = doc.get("name") if isinstance(doc.get("name"), str) else store.path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "vault"


class Endpoint:
    """A store opened for writing, serving a sync."""

    over_wire = False  # (remote.Remote: True) whether what it sends or gets crosses a link

    def __init__(self, store: Store):
        self.store = store
        self.id = uuid.UUID(store.id).bytes
        self.name = vault_name(store)
        self.snapshot: str | None = None  # taken before this session first changed the tree
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                        thread_name_prefix="verify")
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="call")
        self._committing: Future | None = None  # the last batch of chunks, until committed
        self._lock = threading.Lock()  # (the engine calls a local end from two threads)

    def close(self) -> None:
        self._calls.shutdown()
        self._pool.shutdown()
        if self._committing is not None:  # (the store closes after that commit, not during it)
            error = self._committing.exception()
            if error is not None:  # (no call came after it to take the error)
                log.warning("the last chunks that arrived were not stored: %s", error)

    def idle(self) -> None:
        """Wait until the calls submitted so far have run (what they raised is theirs)."""
        self._calls.submit(lambda: None).result()

    def _committed(self) -> None:
        """Wait until the chunks put so far are committed; raise what their commit raised."""
        with self._lock:
            committing, self._committing = self._committing, None
        if committing is not None:
            committing.result()

    def submit(self, method: str, *args) -> Future:
        """Start a call without waiting for it (calls run in order, one at a time): the engine
        keeps a batch of chunks in flight, as over the wire (remote.Remote.submit)."""
        return self._calls.submit(getattr(self, method), *args)

    # ---- what the other side may call (remote.CALLS) ----------------------------------------
    def hello(self) -> dict:
        return {"id": self.id, "name": self.name, "protocol": wire.PROTOCOL}

    def listing(self) -> dict[bytes, list]:
        self._committed()
        return {path: e.wire() for path, e in tree.listing(self.store).items()}

    def base(self, peer: bytes) -> dict[bytes, bytes]:
        self._committed()
        with self.store.reader() as tx:
            return tx.sync_base(_peer_id(peer))

    def set_base(self, peer: bytes, updates: list) -> None:
        self._committed()
        peer = _peer_id(peer)
        checked = [(check_path(p), s) for p, s in updates]

        def put(tx: Txn) -> None:
            for path, signature in checked:
                tx.set_sync_base(peer, path, signature if isinstance(signature, bytes) else None)
        self.store.write(put)

    def rely(self, peer: bytes, name: str, files: list) -> None:
        """Record that `peer` relies on this vault's copy of the files at these paths with
        these contents ([[path, content digest], ...]): it may evict its own, so this vault
        never evicts them. (Taken from a client: it can only keep more here.)"""
        self._note(peer, name, files, "reliers", "rely")

    def _note(self, peer: object, name: object, files: list, have: str, add: str) -> None:
        """Txn.hold or Txn.rely for the versions at `files` whose content is the one given;
        a path whose content here is another is passed over."""
        self._committed()
        peer = _peer_id(peer)
        name = name if isinstance(name, str) else ""
        now = time.time_ns()

        def put(tx: Txn) -> None:
            for path, digest in files:
                node = _file(tx, check_path(path))
                if node is None or not node.content or any(
                        p == peer for p, _, _ in getattr(tx, have)(node.content)):
                    continue
                if tree.content_digest(node.size, tree.file_extents(tx, node.content)) == digest:
                    getattr(tx, add)(node.content, peer, name, now)
        self.store.write(put)

    def extents(self, paths: list) -> dict[bytes, list | str]:
        """The chunks of the files at `paths` now: [[offset, length, hash], ...] each, or
        OFFLINE for a file whose bytes were evicted here (they cannot be sent from here)."""
        self._committed()
        out: dict[bytes, list | str] = {}
        with self.store.reader() as tx:
            for path in map(check_path, paths):
                node = _file(tx, path)
                if node is None:
                    continue
                if tx.is_offline(node.content):
                    out[path] = OFFLINE
                else:
                    out[path] = [list(x) for x in tree.file_extents(tx, node.content)]
        return out

    # ---- what only the local side is asked (the engine runs in its process) ------------------
    def offline(self, paths: list | None) -> dict[bytes, list]:
        """Of the files at `paths` (None: every file), those with evicted bytes:
        {path: [size, content digest]}."""
        self._committed()
        out: dict[bytes, list] = {}
        with self.store.reader() as tx:
            found = [(p, _file(tx, p)) for p in map(check_path, paths)] if paths is not None \
                else [(p, n) for p, n in tx.walk() if stat.S_ISREG(n.mode)]
            for path, node in found:
                if node is not None and tx.is_offline(node.content):
                    out[path] = [node.size, tree.content_digest(
                        node.size, tree.file_extents(tx, node.content))]
        return out

    def hold(self, peer: bytes, name: str, files: list) -> None:
        """Record that `peer` holds the files at these paths with these contents online
        ([[path, content digest], ...], from its own listing or what it applied): their
        versions may then be evicted here (store/evict.py)."""
        self._note(peer, name, files, "holders", "hold")

    def missing(self, hashes: list) -> list[bytes]:
        self._committed()
        with self.store.reader() as tx:
            return [h for h in map(check_hash, hashes) if tx.find_chunk(_digests(h)) is None]

    def get_chunks(self, hashes: list, refs: list | None = None) -> list[list]:
        """[[hash, raw length, stored value (codec byte and payload, as stored)], ...]; where
        `refs` (one per hash) gives a chunk's near copy on the receiver ([its chunks' hashes,
        where the chunk's place starts in them], delta.py), [hash, raw length, difference,
        those hashes, that start] instead when the difference is worth it."""
        self._committed()
        out = []
        with self.store.reader() as tx:
            for h, ref in zip(map(check_hash, hashes), refs or [None] * len(hashes),
                              strict=True):
                chunk_id = tx.find_chunk(_digests(h))
                if chunk_id is None:
                    raise StoreError(f"chunk {h[:16].hex()} is not in {self.name}")
                raw_len, stored = tx.chunk_record(chunk_id).raw_len, bytes(tx.chunk_data(chunk_id))
                item = [h, raw_len, stored]
                if ref is not None:
                    bases, skip = _check_ref(ref)
                    base = _reference(tx, bases, skip, raw_len)
                    if base is not None:
                        payload = delta.diff(codec.decode(chunk_id, stored, raw_len), base)
                        if len(payload) < delta.WORTH * len(stored):
                            item = [h, raw_len, payload, bases, skip]
                out.append(item)
        return out

    def put_chunks(self, chunks: list) -> list:
        """Store chunks that arrived, each checked against both its digests first; they are
        held in the inbox until the files that use them are applied. A chunk that came as a
        difference (`get_chunks`) is rebuilt from the chunks it names, from this call (before
        it) or the store, then checked the same way; one whose named chunks are in neither, or
        damaged here, is not stored. Returns [the bytes that arrived, [the hashes of those not
        stored]]: the sender sends them again whole.

        Their commit is queued, not waited for: the next batch is checked while it runs (the
        two would otherwise take turns). Every later call but `hello` waits for it first, so
        that what the commit raised reaches the peer, and a file is applied only after its
        chunks."""
        if not isinstance(chunks, list) or \
                not all(isinstance(c, list) and len(c) in (3, 5) for c in chunks):
            raise BadRequest("malformed chunk")
        if not all(isinstance(c[1], int) and 0 < c[1] <= MAX_CHUNK for c in chunks):
            raise BadRequest("malformed chunk")
        if sum(c[1] for c in chunks) > MAX_CALL_BYTES:
            raise BadRequest("too many chunk bytes in one call")
        refs = [_check_ref(c[3:]) if len(c) == 5 else None for c in chunks]
        named = {h for ref in refs if ref for h in ref[0]}  # (kept as they are checked)

        def check(item: list) -> Arrived:
            h, raw_len, payload = item[:3]
            if not isinstance(payload, bytes) or not payload:
                raise BadRequest("malformed chunk")
            d = _digests(check_hash(h))
            if len(item) == 5:
                return d, raw_len, payload, None  # (rebuilt below, in order)
            try:
                raw = codec.decode(d.xxh3, payload, raw_len)
            except codec.ChunkCorrupt as e:
                raise _damaged(d, str(e)) from None
            _confirm(d, raw, raw_len)
            return d, raw_len, payload, raw if h in named else b""
        checked = list(self._pool.map(check, chunks))
        self._committed()
        unresolved: list[bytes] = []
        if any(ref is not None for ref in refs):
            checked = self._rebuilt(checked, refs, named, unresolved)

        def store(tx: Txn) -> None:
            for d, raw_len, stored, _ in checked:
                tx.add_pending(INBOX_INO, tx.add_chunk(d, raw_len, stored))
        with self._lock:
            self._committing = self.store.submit(store)
        return [sum(len(c[2]) for c in chunks), unresolved]

    def _rebuilt(self, checked: list[Arrived], refs: list, named: set[bytes],
                 unresolved: list[bytes]) -> list[Arrived]:
        """`checked` with each chunk that came as a difference (`refs`) rebuilt, checked and
        encoded for storing, in order; those that cannot be rebuilt here are left out, their
        hashes put in `unresolved`."""
        arrived = {d.xxh3 + d.blake3: raw for d, _, _, raw in checked if raw}
        out = []
        with self.store.reader() as tx:
            for (d, raw_len, payload, raw), ref in zip(checked, refs):
                if ref is not None:
                    base = _reference(tx, *ref, raw_len, arrived)
                    if base is None:
                        unresolved.append(d.xxh3 + d.blake3)
                        continue
                    try:
                        raw = delta.patch(payload, base, raw_len)
                    except (zstandard.ZstdError, ValueError) as e:
                        raise _damaged(d, str(e)) from None
                    if codec.xxh3(raw) != d.xxh3:
                        raise _damaged(d, "xxh3 mismatch")
                    _confirm(d, raw, raw_len)
                    if d.xxh3 + d.blake3 in named:
                        arrived[d.xxh3 + d.blake3] = raw
                    payload = codec.encode(raw)
                out.append((d, raw_len, payload, b""))
        return out

    def apply(self, ops: list) -> list:
        """Carry out ops of a plan (plan.Op on the wire: [kind, path, entry, to, extents]),
        all in one transaction: a file appears whole or not at all. Returns, per op, None or
        why it was skipped."""
        self._committed()
        checked = [_check_op(op) for op in ops]
        if self.snapshot is None and self._replaces(checked):
            # What the sync replaces or deletes stays in this snapshot (and in the files'
            # timelines) for as long as the snapshot policy keeps `auto-` snapshots.
            self.snapshot = history.create_snapshot(self.store, prefix=SNAPSHOT_PREFIX)["name"]
        now = time.time_ns()
        uid, gid = os.getuid(), os.getgid()

        def folder(path: bytes) -> treeops.Item:
            return treeops.Item(0o40755, now, uid, gid)

        def run(tx: Txn) -> list:
            results = []
            for kind, path, entry, to, extents in checked:
                if kind == "move":
                    treeops.move(tx, path, to.rsplit(b"/", 1)[-1], now)
                    results.append(None)
                elif kind == "delete":
                    done = treeops.remove(tx, path, now)
                    results.append(None if done else "a folder that is not empty")
                else:
                    item = _item(tx, entry, extents, uid, gid)
                    treeops.place(tx, path, item, now, folder)
                    results.append(None)
            return results
        return self.store.write(run)

    def _replaces(self, ops: list[tuple]) -> bool:
        with self.store.reader() as tx:
            return any(kind != "put" or tx.resolve(path) is not None
                       for kind, path, *_ in ops)

    def note_conflicts(self, conflicts: list) -> None:
        """Remember conflicts for `vaultfs status` (which lists those still there)."""
        self._committed()
        added = [{"path": check_path(c["path"]).decode(errors="surrogateescape"),
                  "kept_as": check_path(c["kept_as"]).decode(errors="surrogateescape"),
                  "vault": str(c["vault"]), "at": time.time_ns()} for c in conflicts]
        self.store.write(lambda tx: tx.note_conflicts(added))

    def finish(self) -> dict:
        """Release what the inbox holds that no file took; say which snapshot holds the tree
        as it was before this session changed it."""
        self._committed()
        released = self.store.write(lambda tx: tx.release_inbox())
        return {"inbox_released": released, "snapshot": self.snapshot}


def _file(tx: Txn, path: bytes):
    """The regular file at `path`, or None."""
    ino = tx.resolve(path)
    node = tx.inode(ino) if ino is not None else None
    return node if node is not None and stat.S_ISREG(node.mode) else None


def _peer_id(peer: object) -> bytes:
    if not isinstance(peer, bytes) or len(peer) != 16:
        raise BadRequest("refused vault id")
    return peer


def _digests(h: bytes) -> codec.Digests:
    return codec.Digests(h[:16], h[16:])


def _confirm(d: codec.Digests, raw: bytes, raw_len: int) -> None:
    """Check a chunk that arrived against its BLAKE3 (its xxh3 was checked as it was read)."""
    if len(raw) != raw_len or codec.confirm_digest(raw) != d.blake3:
        raise _damaged(d, "BLAKE3 or length mismatch")


def _damaged(d: codec.Digests, why: str) -> BadRequest:
    return BadRequest(f"chunk {d.xxh3.hex()} arrived damaged ({why}); nothing was stored")


def _check_ref(ref: object) -> tuple[list[bytes], int]:
    """A chunk's near copy as a message gives it: [chunk hashes, start]."""
    if not isinstance(ref, list) or len(ref) != 2 or not isinstance(ref[0], list) or \
            not 0 < len(ref[0]) <= delta.MAX_BASES or not isinstance(ref[1], int) or \
            not 0 <= ref[1] < MAX_CHUNK:
        raise BadRequest("malformed chunk reference")
    return [check_hash(h) for h in ref[0]], ref[1]


def _reference(tx: Txn, bases: list[bytes], skip: int, raw_len: int,
               arrived: dict[bytes, bytes] | None = None) -> bytes | None:
    """The `raw_len` bytes (or fewer, where they end) of the chunks `bases` joined, from
    `skip` on; each from `arrived` or the store. None if one that is needed is in neither, or
    damaged here (`vaultfs verify` says so), or if `skip` is past the first: a reference a
    sender would not give."""
    parts, have = [], 0
    for h in bases:
        if have >= skip + raw_len:
            break  # (what follows is not needed)
        raw = arrived.get(h) if arrived else None
        if raw is None:
            chunk_id = tx.find_chunk(_digests(h))
            stored = tx.chunk_data(chunk_id) if chunk_id is not None else None
            if stored is None:  # (absent, or its data lost: `vaultfs verify` says so)
                return None
            try:
                raw = codec.decode(chunk_id, stored, tx.chunk_record(chunk_id).raw_len)
            except codec.ChunkCorrupt:
                return None
        if not parts and skip >= len(raw):
            return None
        parts.append(raw)
        have += len(raw)
    return b"".join(parts)[skip:skip + raw_len]


def _check_op(op: object) -> tuple:
    if not isinstance(op, list) or len(op) != 5 or op[0] not in ("move", "delete", "put"):
        raise BadRequest("malformed operation")
    kind, path, entry, to, extents = op
    check_path(path)
    if kind == "move":
        check_path(to)
        if posixpath.dirname(to) != posixpath.dirname(path):
            raise BadRequest("a conflict copy stays in its folder")
    if kind == "put":
        try:
            entry = tree.Entry.from_wire(entry)
        except (TypeError, ValueError):
            raise BadRequest("malformed entry") from None
        if entry.kind == "f":
            _check_extents(extents, entry.size)
    return kind, path, entry, to, extents


def _check_extents(extents: object, size: int) -> None:
    """In order, not overlapping, inside the file."""
    end = 0
    if not isinstance(extents, list):
        raise BadRequest("malformed extents")
    for x in extents:
        if not (isinstance(x, list) and len(x) == 3 and isinstance(x[0], int)
                and isinstance(x[1], int) and 0 < x[1] < 1 << 32 and x[0] >= end):
            raise BadRequest("malformed extents")
        check_hash(x[2])
        end = x[0] + x[1]
    if end > size:
        raise BadRequest("malformed extents")


def _item(tx: Txn, e: tree.Entry, extents: list | None, uid: int, gid: int) -> treeops.Item:
    mode = e.mode & 0o7777 | {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}.get(
        e.kind, stat.S_IFMT(e.mode))
    item = treeops.Item(mode, e.mtime_ns, uid, gid, xattrs=[tuple(x) for x in e.xattrs])
    if e.kind == "l":
        item.target = e.content
    elif e.kind == "o":
        if stat.S_IFMT(e.mode) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise BadRequest("malformed entry")
        item.rdev = int.from_bytes(e.content[:8], "big")
    elif e.kind == "f":
        item.size = e.size
        for off, length, h in extents:
            chunk_id = tx.find_chunk(_digests(h))
            if chunk_id is None:
                raise StoreError(f"chunk {h[:16].hex()} has not arrived")
            if tx.chunk_record(chunk_id).raw_len != length:
                raise BadRequest("an extent's length is not its chunk's")
            item.extents.append((off, chunk_id, length))
        if tree.content_digest(e.size, [tuple(x) for x in extents]) != e.content:
            raise BadRequest("extents do not match the file's content digest")
    return item
