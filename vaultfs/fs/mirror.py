"""A second copy of the tiers that ask for one (`copies = 2`), on a mirror: an ordinary vaultfs
store on another device (`vaultfs mount --mirror PATH`, or `[mirror] path` in vault.toml), which
the mount holds open for writing for as long as it runs.

What the mirror holds, and when:

- Every file of a 2-copy tier, as soon as the catalogue puts it there: after its commit, after
  a rating, label or tag moves it there later, and the backlog first when the mount starts. The
  chunks the mirror lacks are copied in their stored form, each checked on the way (decoded,
  xxh3, BLAKE3, length), and the file is placed at its path in the mirror's live tree with its
  attributes and xattrs, in one mirror transaction with the last of them: it appears there whole
  or not at all. Then the vault records that the mirror holds that version (`held`, with the
  mirror's id) and says `mirrored`.
- Never less than it had: a file deleted in the vault stays in the mirror (the vault's history
  keeps it too, but the vault may be on the disk that fails); a new version at a path is a new
  version there, and the mirror's timeline keeps the old one. A renamed file (or one in a renamed
  folder) is placed at its new name in the mirror too, by reference (no bytes copied); its old
  name there goes only when it held that very content and nothing else, so that the temporary
  name of a tethering program's save-then-rename leaves no trace and nothing is lost.
- Damage found in one copy, by the scrub or by a read in the vault, is mended from the other
  (store/scrub.repair) and reported in the log and by `vaultfs status`.

The vault's meta `mirror` says which mirror it writes to and what each tier asks of it (for
`vaultfs status`); the mirror's meta `mirror_of` binds it to its vault: an existing store becomes
a mirror only while it holds no file.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..media.catalog import Catalog
from ..store import Store, StoreBusy, StoreError, Txn, policy, scrub, treeops
from ..store import format as F
from ..store.codec import Digests
from ..store.verify import check_chunk

if TYPE_CHECKING:
    from .operations import VaultOperations

log = logging.getLogger(__name__)

META_MIRROR = b"mirror"        # in the vault: JSON {"id", "path", "copies": {tier: 1 or 2}}
META_MIRROR_OF = b"mirror_of"  # in the mirror: the vault's uuid, bytes[16]
BATCH_BYTES = 32 << 20  # stored bytes copied per mirror transaction (a file's last ones go
#                         in the transaction that places it)
CHECK_S = 5.0    # how often the catalogue is looked at when no event says to (tags, sidecars)
RETRY_S = 60.0   # after a failure of the mirror itself (its disk full, or gone)
REPLAN_S = 1.0   # a backlog gives way to new files this often (a plan costs a catalogue)


class Skip(Exception):
    """A file that cannot be mirrored as it is (the message says why); it is tried again when
    its content or its path changes, or at the next mount."""


@dataclass
class Job:
    ino: int
    path: str          # where the file is in the vault, and goes in the mirror
    version: int
    old_path: str | None = None  # a rename to follow: where the mirror had it


def open_store(vault: Store, path: Path, mountpoint: Path | None = None) -> tuple[Store, bool]:
    """The mirror at `path`, opened for writing, and whether it was created (`path` missing or
    an empty folder). Refused, in one sentence each: the vault itself or a folder in it or in its
    mount, a folder whose disk is missing, a store in use, a copy of the vault, a vault that
    holds files of its own, another vault's mirror."""
    path = Path(path).expanduser().absolute()
    for inside, what in ((vault.path.absolute(), "the vault's own store"),
                         (mountpoint, "the vault's mount point")):
        if inside is not None and (path.is_relative_to(inside) or path.exists()
                                   and os.path.samefile(path, inside)):
            raise StoreError(f"the mirror {path} is in {what}; give a folder on another disk")
    if not path.parent.is_dir():
        raise StoreError(f"the mirror's folder {path.parent} does not exist (is its disk "
                         f"plugged in?)")
    created = not path.exists() or path.is_dir() and not any(path.iterdir())
    if created:
        Store.init(path)
    elif not (path / "vault.toml").is_file():
        raise StoreError(f"the mirror {path} holds files and no vault; give an empty folder")
    try:
        mirror = Store.open(path, writable=True)
    except StoreBusy:
        raise StoreError(f"the mirror {path} is in use by another vaultfs process "
                         f"(mounted?)") from None
    try:
        _bind(vault, mirror)
    except BaseException:
        mirror.close()
        raise
    if os.stat(path).st_dev == os.stat(vault.path).st_dev:
        log.warning("the mirror %s is on the same disk as the vault: it guards against damage "
                    "to the vault's file, not against losing the disk", path)
    return mirror, created


def _bind(vault: Store, mirror: Store) -> None:
    """Make `mirror` the mirror of `vault`, or refuse a store that is something else."""
    if mirror.id == vault.id:
        raise StoreError(f"{mirror.path} is a copy of this vault (the same id), not a mirror; "
                         f"give an empty folder")
    vault_id = uuid.UUID(vault.id).bytes

    def bind(tx: Txn) -> None:
        bound = tx.meta(META_MIRROR_OF)
        if bound is None and tx.counter(F.STAT_FILES):
            raise StoreError(f"{mirror.path} is a vault of its own (it holds files and is no "
                             f"vault's mirror); give an empty folder")
        if bound is not None and bytes(bound) != vault_id:
            raise StoreError(f"{mirror.path} is the mirror of another vault "
                             f"({uuid.UUID(bytes=bytes(bound))})")
        tx.put_meta(META_MIRROR_OF, vault_id)
    mirror.write(bind)


def note(vault: Store, mirror: "Mirror | None") -> None:
    """Say in the vault's meta which mirror it writes to and what each tier asks of it, for
    `vaultfs status` (None: it has none any more)."""
    with vault.reader() as tx:
        had = tx.meta(META_MIRROR) is not None
    if mirror is None and not had:
        return

    def put(tx: Txn) -> None:
        if mirror is None:
            tx.txn.delete(META_MIRROR, db=tx.dbs[F.DB_META])
        else:
            tx.put_meta(META_MIRROR, json.dumps({"id": mirror.id.hex(),
                                                 "path": str(mirror.store.path),
                                                 "copies": mirror.copies}).encode())
    vault.write(put)


def holds(tx: Txn, version: int, mirror_id: bytes) -> bool:
    """Whether the vault has recorded the mirror holding `version`."""
    return any(peer == mirror_id for peer, _, _ in tx.holders(version))


def figures(vault: Store, cat: Catalog) -> dict:
    """What `vaultfs status` says of tiers, copies and repairs: per tier its files, bytes and
    last scrub and, with a mirror, the copies it asks for, its files the mirror holds
    (`mirrored`) and those still to be copied (`mirroring`); the mirror; the latest repairs."""
    tiers = cat.tier_figures(scrub.results(vault))
    with vault.reader() as tx:
        raw = tx.meta(META_MIRROR)
        record = json.loads(bytes(raw)) if raw is not None else None
        if record is not None:
            mirror_id = bytes.fromhex(record["id"])
            for name, t in tiers.items():
                t.update(copies=record["copies"].get(name, 1), mirrored=0, mirroring=0)
            for e in cat.files.values():
                t = tiers[e.tier]
                if not e.node.content or holds(tx, e.node.content, mirror_id):
                    t["mirrored"] += 1  # (an empty file has nothing to lose)
                elif t["copies"] > 1:
                    t["mirroring"] += 1
    return {"tiers": tiers, "mirror": record, "repairs": scrub.repairs(vault)}


class Mirror:
    """The mount's side of its mirror: what to copy, copying it, mending damage, and answering
    how many copies a file has."""

    def __init__(self, vault: Store, store: Store, rules: policy.Policy):
        self.vault, self.store = vault, store
        self.id = uuid.UUID(store.id).bytes
        self.name = f"mirror {store.path}"
        self.copies = {tier: tp.copies for tier, tp in rules.tier_policies.items()}
        self._placed: dict[int, tuple[str, int]] = {}  # ino -> (path, version) in the mirror
        self._failed: dict[int, tuple[str, int]] = {}  # ino -> (path, version) not mirrored
        self._retry_at = 0.0  # after a failure of the mirror itself
        self._wake = trio.Event()
        self._file = _identity(store)
        self.gone = False  # its disk went away: nothing touches it until the next mount

    @classmethod
    def open(cls, vault: Store, rules: policy.Policy, mountpoint: Path) -> "Mirror":
        store, created = open_store(vault, rules.mirror, mountpoint)
        if created:
            log.warning("created the mirror store %s", store.path)
        mirror = cls(vault, store, rules)
        note(vault, mirror)
        return mirror

    def close(self) -> None:
        self.store.close()

    def present(self) -> bool:
        """Whether the mirror's database is still the file the mount opened. LMDB maps it:
        reading pages of a disk that was unplugged would end the process (SIGBUS), so a
        mirror whose file is gone is left alone, and said so once."""
        if not self.gone and _identity(self.store) != self._file:
            self.gone = True
            log.error("the mirror %s is gone (its disk unplugged?): files of tiers with 2 "
                      "copies are not safe until it is back and the vault is mounted again",
                      self.store.path)
        return not self.gone

    # ---- copying ------------------------------------------------------------------------------
    async def run(self, ops: "VaultOperations") -> None:
        """Mirror what the catalogue puts in 2-copy tiers and the mirror lacks: the backlog
        first, then after each event that may bring work (and every CHECK_S, for tags), until
        the mount ends."""
        await trio.to_thread.run_sync(self.store.write, lambda tx: tx.release_inbox())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.events.listen, self._note_event)
            seen = None
            while not ops.stopping.is_set() and self.present():
                self._wake = trio.Event()
                now = self.vault.env.info()["last_txnid"]
                if now != seen and time.monotonic() >= self._retry_at:
                    seen = now
                    try:
                        await self._pass(ops)
                    except Exception:
                        log.exception("mirroring failed; trying again in %.0f s", RETRY_S)
                        seen, self._retry_at = None, time.monotonic() + RETRY_S
                else:
                    with trio.move_on_after(CHECK_S):
                        await self._wake.wait()
            nursery.cancel_scope.cancel()

    async def _note_event(self, event: dict) -> None:
        if event["event"] in ("verified", "analysed", "renamed"):
            self._wake.set()

    async def _pass(self, ops: "VaultOperations") -> None:
        cat = await ops.fresh_catalog()
        started = time.monotonic()
        for job in await trio.to_thread.run_sync(self._plan, cat):
            if ops.stopping.is_set() or self._wake.is_set() and \
                    time.monotonic() - started > REPLAN_S:
                return  # (new files: planned again, the newest first)
            try:
                done = await trio.to_thread.run_sync(self._copy, job, ops.stopping)
            except Skip as e:
                self._failed[job.ino] = (job.path, job.version)
                log.error("cannot mirror %s: %s", job.path, e)
                ops.events.publish("error", job.path, error=f"not mirrored: {e}")
                continue
            if done:
                ops.events.publish("mirrored", job.path, version=job.version, copies=2)

    def _plan(self, cat: Catalog) -> list[Job]:
        """The files of 2-copy tiers the mirror lacks, and the renames it has to follow; the
        newest content first (the frame just shot, before a backlog)."""
        jobs: list[Job] = []
        live: set[int] = set()
        with self.vault.reader() as tx:
            for ino, e in cat.files.items():
                version = e.node.content
                if self.copies.get(e.tier, 1) < 2 or not version or \
                        self._failed.get(ino) == (e.path, version):
                    continue
                live.add(ino)
                placed = self._placed.get(ino)
                if placed == (e.path, version):
                    continue
                if not holds(tx, version, self.id):
                    jobs.append(Job(ino, e.path, version))
                elif placed is not None and placed[1] == version:
                    jobs.append(Job(ino, e.path, version, old_path=placed[0]))
                else:  # mirrored by an earlier mount: where it is
                    self._placed[ino] = (e.path, version)
        for ino in self._placed.keys() - live:
            del self._placed[ino]
        for ino in self._failed.keys() - cat.files.keys():
            del self._failed[ino]
        return sorted(jobs, key=lambda j: j.version, reverse=True)

    def _copy(self, job: Job, stop: threading.Event) -> bool:
        """Copy one file to the mirror (blocking). False when it changed meanwhile (the next
        pass sees it as it is now) or the mount is ending."""
        path = job.path.encode(errors="surrogateescape")
        now = time.time_ns()
        with self.vault.reader() as tx:
            node = tx.inode(job.ino)
            if node is None or node.content != job.version or tx.resolve(path) != job.ino:
                return False
            extents = list(tx.extents(node.content))
            records = {c: tx.chunk_record(c) for _, c, _ in extents}
            item = treeops.Item(node.mode, node.mtime_ns, node.uid, node.gid, node.atime_ns,
                                size=node.size, xattrs=list(tx.xattrs(job.ino)))
            folders = _folders(tx, path)
        digests = {c: Digests(c[:F.HASH_LEN], rec.blake3) for c, rec in records.items()}
        with self.store.reader() as mtx:
            missing = [c for c in records if mtx.find_chunk(digests[c]) is None]
        for c in missing:
            if records[c].offline:
                raise Skip("its bytes were evicted here and the mirror lacks them: "
                           "`vaultfs fetch` them first")
        batch: list[tuple[Digests, int, bytes]] = []
        size = 0
        for i, c in enumerate(missing):
            with self.vault.reader() as tx:
                rec, value = tx.chunk_record(c), tx.chunk_data(c)
                if rec is None or rec.blake3 != records[c].blake3:
                    return False  # freed (and the id taken again): the file is gone or changed
                value = bytes(value) if value is not None else None
            why = check_chunk(value, c, rec)
            if why:
                raise Skip(f"chunk {c.hex()} is damaged here ({why}) and the mirror lacks it")
            batch.append((digests[c], rec.raw_len, value))
            size += len(value)
            if size >= BATCH_BYTES and i + 1 < len(missing):
                self.store.write(lambda tx, b=batch: _receive(tx, b))
                batch, size = [], 0
                if stop.is_set():
                    return False  # (what came stays in the inbox; released at the next start)

        def folder(p: bytes) -> treeops.Item:
            return folders.get(p) or treeops.Item(stat.S_IFDIR | 0o755, now, node.uid, node.gid)

        def place(tx: Txn) -> None:
            _receive(tx, batch)
            item.extents = [(off, tx.find_chunk(digests[c]), n) for off, c, n in extents]
            if any(chunk_id is None for _, chunk_id, _ in item.extents):
                raise StoreError("chunks the mirror had went missing while the file was copied")
            there = _file(tx, path)
            if there is None or not _same(tx, there, item):  # (placed before a crash: as is)
                treeops.place(tx, path, item, now, folder)
            if job.old_path is not None:
                _drop_old(tx, job.old_path.encode(errors="surrogateescape"), item, now)
            tx.release_inbox()
        try:
            self.store.write(place)
        except StoreError as e:  # a folder where the file goes, in the mirror
            raise Skip(str(e)) from None
        self.vault.write(lambda tx: tx.hold(job.version, self.id, self.name, time.time_ns()))
        self._placed[job.ino] = (job.path, job.version)
        return True

    # ---- copies and damage --------------------------------------------------------------------
    def judge(self, answer: dict, ino: int, cat: Catalog) -> dict:
        """`safe`'s answer for a file where a mirror is configured: its tier's copies wanted
        (the most any tier asks while its metadata is unread: its tier may change), the copies
        it has, and safe only once the mirror holds it too where two are wanted."""
        version = answer["version"]
        with self.vault.reader() as tx:
            held = not version or holds(tx, version, self.id)
            known = not version or tx.media(version) is not None
        entry = cat.files.get(ino)
        wanted = self.copies.get(entry.tier, 1) if entry is not None and known \
            else max(self.copies.values())
        verified = answer["verified"]
        answer.update(mirrored=held, copies_wanted=wanted,
                      copies=int(verified) + int(verified and held),
                      safe=verified and (wanted < 2 or held))
        return answer

    def mend(self, chunk_id: bytes, path: str) -> bool:
        """A read met a damaged chunk of the vault: rewrite it from the mirror's copy. Whether
        it reads right now."""
        if not self.present():
            return False
        path = path.lstrip("/")
        repaired, failed = scrub.repair(self.vault, [chunk_id], self.store)
        if chunk_id in failed:
            log.error("damaged chunk %s of %s, not mended from the mirror: %s", chunk_id.hex(),
                      path, failed[chunk_id])
            return False
        if repaired:
            log.warning("repaired chunk %s of %s from the mirror", chunk_id.hex(), path)
            scrub.note_repairs(self.vault, [_repair(chunk_id, [path], "vault", "read")])
        return True

    def scrub(self, tier: str, owners: dict[bytes, list[str]], bad: dict[bytes, str],
              stop: threading.Event) -> tuple[set[bytes], dict | None]:
        """After the scrub of a tier found `bad` among the vault's chunks of `owners` (chunk ->
        paths): mend them from the mirror, then scrub the mirror's copies of the same chunks and
        mend those from the vault (blocking, paced as the scrub). The vault's chunks mended, and
        what the mirror's scrub found ({"chunks", "bytes", "damaged", "repaired"}: paths;
        None when the mirror is gone)."""
        if not self.present():
            return set(), None
        repaired, _ = scrub.repair(self.vault, bad, self.store)
        theirs: dict[bytes, bytes] = {}  # the mirror's id of a chunk (found by digests) -> ours
        with self.vault.reader() as tx, self.store.reader() as mtx:
            for c in owners:
                rec = tx.chunk_record(c)
                other = mtx.find_chunk(Digests(c[:F.HASH_LEN], rec.blake3)) if rec else None
                if other is not None:
                    theirs[other] = c
        chunks, nbytes, their_bad = scrub.check(self.store, theirs, stop=stop)
        mended, _ = scrub.repair(self.store, their_bad, self.vault)
        notes = [_repair(c, owners[c], "vault", "scrub") for c in repaired]
        notes += [_repair(c, owners[theirs[c]], "mirror", "scrub") for c in mended]
        for n in notes:
            log.warning("repaired chunk %s of %s in the %s from the %s", n["chunk"],
                        ", ".join(n["paths"]), n["copy"],
                        "mirror" if n["copy"] == "vault" else "vault")
        for c in their_bad.keys() - mended:
            log.error("the mirror's copy of chunk %s of %s is damaged: %s", c.hex(),
                      ", ".join(owners[theirs[c]]), their_bad[c])
        scrub.note_repairs(self.vault, notes)
        damaged = sorted({p for c in their_bad.keys() - mended for p in owners[theirs[c]]})
        log.info("scrubbed the mirror's copies of tier %s: %d chunks, %d damaged files, "
                 "%d chunks repaired", tier, chunks, len(damaged), len(mended))
        return repaired, {"chunks": chunks, "bytes": nbytes, "damaged": damaged,
                          "repaired": sorted({p for c in mended for p in owners[theirs[c]]})}


def _identity(store: Store) -> tuple[int, int] | None:
    try:
        st = os.stat(store.path / "lmdb" / "data.mdb")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _repair(chunk_id: bytes, paths: list[str], copy: str, by: str) -> dict:
    return {"at": time.time_ns(), "chunk": chunk_id.hex(), "paths": sorted(paths),
            "copy": copy, "by": by}


def _receive(tx: Txn, chunks: list[tuple[Digests, int, bytes]]) -> None:
    """Store chunks that came, checked, from the vault; held in the inbox until the file that
    uses them is placed (after a crash, the next mount finds them there)."""
    for d, raw_len, value in chunks:
        tx.add_pending(F.INBOX_INO, tx.add_chunk(d, raw_len, value))


def _folders(tx: Txn, path: bytes) -> dict[bytes, treeops.Item]:
    """The vault's folders above `path`, as the mirror should make them."""
    out, walked, ino = {}, b"", F.ROOT_INO
    for part in path.split(b"/")[:-1]:
        walked = walked + b"/" + part if walked else part
        ino = tx.lookup(ino, part)
        node = tx.inode(ino) if ino is not None else None
        if node is None:
            break
        out[walked] = treeops.Item(node.mode, node.mtime_ns, node.uid, node.gid, node.atime_ns,
                                   xattrs=list(tx.xattrs(ino)))
    return out


def _file(tx: Txn, path: bytes) -> F.Inode | None:
    ino = tx.resolve(path)
    node = tx.inode(ino) if ino is not None else None
    return node if node is not None and stat.S_ISREG(node.mode) else None


def _same(tx: Txn, node: F.Inode, item: treeops.Item) -> bool:
    """Whether a file in the mirror holds exactly what `item` would place."""
    return node.size == item.size and list(tx.extents(node.content)) == item.extents


def _drop_old(tx: Txn, old: bytes, item: treeops.Item, now: int) -> None:
    """After a rename in the vault: the mirror's file at the old name goes if it held exactly
    what is now at the new one and nothing else (no other version, no other name), then the
    folders it leaves empty."""
    node = _file(tx, old)
    if node is None or node.nlink != 1 or not _same(tx, node, item) or \
            len(list(tx.versions(node.ino))) != 1:
        return
    treeops.remove(tx, old, now)
    parent = old.rpartition(b"/")[0]
    while parent and treeops.remove(tx, parent, now):
        parent = parent.rpartition(b"/")[0]
