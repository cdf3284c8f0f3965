"""Giving space back: merging epochs nothing names, dropping the epochs of deleted branches and
tombstones that hide nothing, and compacting the LMDB file.

Chunks need no sweep: their reference counts free them in the very transaction that drops
their last reference (a deleted file, a pruned version, a forgotten snapshot). What is left to
collect is structure: an epoch no snapshot or branch names any more, with one child, merges
into that child, so that chains of epochs (and the versions of records they keep) do not grow
with every snapshot ever taken. One pass over the versioned databases does it for all such
epochs at once, in one transaction: a crash before its commit leaves everything as it was.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import lmdb

from . import format as F
from .format import from_u64, u64
from .txn import Txn


def collapse(tx: Txn) -> dict:
    """Drop every record no snapshot or branch sees, merge every epoch that nothing names and
    that has exactly one child into its descendants, and drop tombstones with nothing older to
    hide. Every snapshot and branch sees exactly the tree it saw before."""
    tree = tx.epoch_tree()
    parents, named = tree.parents, tree.named
    children = {e: list(cs) for e, cs in tree.children.items()}
    # Dead: nothing names it nor anything after it (a deleted branch's epochs).
    dead: set[int] = set()
    for e in sorted(parents, reverse=True):  # children before parents: ids only grow
        if e not in named and all(c in dead for c in children.get(e, ())):
            dead.add(e)
    for e in children:
        children[e] = [c for c in children[e] if c not in dead]
    removable = {e for e in parents
                 if e not in named and e not in dead and len(children.get(e, ())) == 1}
    target = {}
    for e in removable:
        t = children[e][0]
        while t in removable:
            t = children[t][0]
        target[e] = t
    kept_parent = {}
    for e, p in parents.items():
        while p in removable:
            p = parents[p]
        kept_parent[e] = p

    gone: dict[int, bool] = {}  # inodes that lost a record -> was it a file
    merged = dropped = 0
    for db in F.VERSIONED_DBS:
        for base, versions in _groups(tx, db):
            changed = dict(versions)
            # Versions no snapshot or branch sees go: a deleted branch's, and those hidden
            # below every named epoch by newer ones (a file deleted on two branches).
            for e in [e for e in versions if not tree.seen(e, versions)]:
                value = changed.pop(e)
                if db == F.DB_INODES and value[:1] == F.PRESENT:
                    gone[from_u64(base)] = stat.S_ISREG(F.Inode.unpack(0, value[1:]).mode)
            for e in sorted((e for e in changed if e in removable), reverse=True):
                value = changed.pop(e)
                if target[e] not in changed:  # newest first: what is nearer wins
                    changed[target[e]] = value
                    merged += 1
                elif db == F.DB_INODES and value[:1] == F.PRESENT:
                    gone[from_u64(base)] = stat.S_ISREG(F.Inode.unpack(0, value[1:]).mode)
            for e, value in list(changed.items()):
                if value == F.TOMBSTONE and not _older(changed, kept_parent, e):
                    del changed[e]
                    dropped += 1
            if changed != versions:
                for e in versions.keys() - changed.keys():
                    tx.txn.delete(F.vkey(base, e), db=tx.dbs[db])
                for e, value in changed.items():
                    if versions.get(e) != value:
                        tx.txn.put(F.vkey(base, e), value, db=tx.dbs[db])
    if removable or dead:
        for e in removable | dead:
            tx.txn.delete(u64(e), db=tx.dbs[F.DB_EPOCHS])
        for e, p in kept_parent.items():
            if e not in removable and e not in dead and p != parents[e]:
                _, created = F.EPOCH_REC.unpack(tx.txn.get(u64(e), db=tx.dbs[F.DB_EPOCHS]))
                tx.txn.put(u64(e), F.EPOCH_REC.pack(p, created), db=tx.dbs[F.DB_EPOCHS])
        tx.bump(F.META_EPOCH_GEN, 1)
    freed_files = 0
    for ino, is_file in gone.items():
        if not tx.inode_epochs(ino):  # no epoch holds it any more: nor does its timeline
            tx.forget_inode(ino, is_file)
            freed_files += is_file
    return {"epochs_merged": len(removable), "epochs_dropped": len(dead),
            "records_moved": merged,
            "tombstones_dropped": dropped, "files_freed": freed_files}


def _groups(tx: Txn, db: bytes):
    """(base key, {epoch: value}) of every record of a versioned database."""
    base, versions = None, {}
    with tx.txn.cursor(db=tx.dbs[db]) as c:
        for k, v in c:
            b = bytes(k[:-8])
            if b != base:
                if versions:
                    yield base, versions
                base, versions = b, {}
            versions[F.epoch_of(k)] = bytes(v)
    if versions:
        yield base, versions


def _older(versions: dict, parent: dict, epoch: int) -> bool:
    """Whether a version at an ancestor of `epoch` exists (something a tombstone hides)."""
    e = parent.get(epoch, 0)
    while e:
        if e in versions:
            return True
        e = parent.get(e, 0)
    return False


# ---- compaction -------------------------------------------------------------------------------
def compact(store_path: Path) -> tuple[int, int]:
    """Rewrite the LMDB file without its free pages (space freed inside the file is reused by
    LMDB but never given back to the disk otherwise). The store must be open for writing by
    the caller (it holds the lock), with no other reader. Returns the file's size before and
    after. Crash-safe: the copy is complete and synced before it replaces the original, and
    `recover_compaction` finishes or undoes an interrupted swap at the next open."""
    lmdb_dir, new, old = store_path / "lmdb", store_path / "lmdb.new", store_path / "lmdb.old"
    before = (lmdb_dir / "data.mdb").stat().st_size
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, max_dbs=len(F.ALL_DBS) + 4)
    try:
        env.copy(str(new), compact=True)
    finally:
        env.close()
    fsync_path(new / "data.mdb")
    fsync_path(new)
    os.rename(lmdb_dir, old)
    os.rename(new, lmdb_dir)
    fsync_path(store_path)
    shutil.rmtree(old)
    return before, (lmdb_dir / "data.mdb").stat().st_size


def recover_compaction(store_path: Path) -> None:
    """After a crash in `compact` (the caller holds the store's lock): if the database was
    moved aside and the copy not yet put in its place, the original goes back; once a database
    is in place, what is left of the copy or the original is deleted."""
    lmdb_dir, new, old = store_path / "lmdb", store_path / "lmdb.new", store_path / "lmdb.old"
    if not (lmdb_dir / "data.mdb").exists() and (old / "data.mdb").exists():
        shutil.rmtree(lmdb_dir, ignore_errors=True)  # at most an empty lmdb/ or a lock file
        os.rename(old, lmdb_dir)
    if (lmdb_dir / "data.mdb").exists():
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
