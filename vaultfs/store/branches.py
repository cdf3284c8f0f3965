"""Branches: writable lines of history sharing every chunk, and merging one into another.

A branch is a name for the epoch it writes in (txn.Txn.epoch). Making one costs two epoch
records whatever the tree's size: from a snapshot, a new child of its epoch; from a branch, that
branch's epoch is frozen and both go on in children of it.

A merge applies what changed on FROM since the two diverged (their newest common epoch) to
INTO, path by path. A path only FROM changed takes FROM's state; a path both changed keeps
INTO's, and FROM's goes beside it under a conflict name; nothing is lost either way. Files are
copied by reference: a new version sharing the same chunks.
"""

from __future__ import annotations

import posixpath
import stat
import time
from datetime import datetime

from . import format as F
from . import gc, treeops
from .history import check_name, tree_epoch, tree_files
from .store import Store
from .txn import StoreError, Txn


def create_branch(store: Store, name: str, source: str | None = None) -> dict:
    """A new branch from a snapshot or a branch (default: the open branch's tree now)."""
    key = check_name(name)
    now = time.time_ns()

    def make(tx: Txn) -> int:
        if dict(tx.branches()).get(key) is not None:
            raise StoreError(f"a branch named {name} exists")
        src = (source or store.branch.decode()).encode()
        epoch = tx.snapshot_epoch(src)
        if epoch is None:
            parent = dict(tx.branches()).get(src)
            if parent is None:
                raise StoreError(f"there is no snapshot or branch named {src.decode()}")
            # The source branch's tree is frozen here and goes on in a child, like ours.
            tx.txn.put(src, F.u64(tx.new_epoch(parent, now)), db=tx.dbs[F.DB_BRANCHES])
            epoch = parent
        tx.txn.put(key, F.u64(tx.new_epoch(epoch, now)), db=tx.dbs[F.DB_BRANCHES])
        return epoch

    base = store.write(make)
    return {"name": name, "from": source or store.branch.decode(), "base_epoch": base}


def list_branches(store: Store) -> list[dict]:
    out = []
    with store.reader() as tx:
        for name, epoch in tx.branches():
            with store.reader(epoch=epoch) as view:
                files = sum(1 for n in view.inodes() if stat.S_ISREG(n.mode))
            out.append({"name": name.decode(errors="surrogateescape"), "epoch": epoch,
                        "files": files, "open": name == store.branch})
    return out


def delete_branch(store: Store, name: str) -> dict:
    """Forget a branch; what only it held is freed (gc.collapse drops its epochs)."""
    key = name.encode()
    if key == F.MAIN_BRANCH:
        raise StoreError("the main branch cannot be deleted")
    if key == store.branch:
        raise StoreError(f"branch {name} is the one open (mounted); unmount it first")

    def delete(tx: Txn) -> dict:
        if not tx.txn.delete(key, db=tx.dbs[F.DB_BRANCHES]):
            raise StoreError(f"there is no branch named {name}")
        before = tx.counter(F.STAT_STORED)
        gc.collapse(tx)
        return {"name": name, "freed_bytes": before - tx.counter(F.STAT_STORED)}

    return store.write(delete)


def merge(store: Store, source: str, into: str) -> dict:
    """Apply to branch `into` what changed on `source` (a branch or snapshot) since they
    diverged. Returns the paths applied and the conflicts with the names they were kept under."""
    if into.encode() == store.branch and store.mounted:
        raise StoreError(f"branch {into} is mounted: merge into it after unmounting, or merge "
                         f"into another branch")
    with store.reader() as tx:
        src = tree_epoch(tx, source)
        dst = dict(tx.branches()).get(into.encode())
        if dst is None:
            raise StoreError(f"there is no branch named {into}")
        theirs = set(tx.ancestors(dst))
        base = next(e for e in tx.ancestors(src) if e in theirs)
    old, new, mine = (tree_files(store, e) for e in (base, src, dst))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {"applied": [], "conflicts": [], "kept": []}
    todo: list[tuple[str, str | None]] = []  # (path in INTO, path in SOURCE or None: delete)
    for path in sorted(old.keys() | new.keys()):
        was, now_, here = old.get(path), new.get(path), mine.get(path)
        if _same(was, now_) or _same(here, now_):
            continue  # unchanged on SOURCE, or INTO made the same change
        if _same(here, was):
            todo.append((path, path if now_ is not None else None))
            report["applied"].append(path)
        elif now_ is None:
            report["kept"].append(path)  # deleted on SOURCE, changed on INTO: INTO's stays
        elif stat.S_ISDIR(now_["mode"]):
            continue  # a folder both sides touched: its contents are judged one by one
        else:
            stem, ext = posixpath.splitext(path)
            kept_as = f"{stem}.conflict-{source}-{stamp}{ext}"
            todo.append((kept_as, path))
            report["conflicts"].append({"path": path, "kept_as": kept_as})

    def apply(tx: Txn) -> None:
        dtx = Txn(tx.txn, tx.dbs, branch=into.encode(), write=True)
        stx = Txn(tx.txn, tx.dbs, epoch=src)
        now = time.time_ns()
        # Deletions deepest first (a folder empties before it goes), then additions in order.
        for path, _ in sorted((t for t in todo if t[1] is None), key=lambda t: t[0],
                              reverse=True):
            treeops.remove(dtx, _bytes(path), now)  # (a folder INTO still uses stays)
        for path, from_path in todo:
            if from_path is not None:
                src_node = stx.inode(stx.resolve(from_path) or 0)
                if src_node is None:  # SOURCE is a mounted branch that changed meanwhile
                    raise StoreError(f"{from_path} changed on {source} during the merge; "
                                     f"nothing was changed, run it again")
                try:
                    treeops.place(dtx, _bytes(path), _item(stx, src_node), now,
                                  lambda p: _item(stx, stx.inode(stx.resolve(p))))
                except StoreError as e:  # (the whole merge is one transaction: undone)
                    raise StoreError(f"merge stopped, nothing changed: {e}") from None

    store.write(apply)
    return report


def _bytes(path: str) -> bytes:
    return path.encode(errors="surrogateescape")


def _same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return stat.S_IFMT(a["mode"]) == stat.S_IFMT(b["mode"]) and a["sig"] == b["sig"] and \
        (stat.S_ISDIR(a["mode"]) or a["mode"] == b["mode"])


def _item(stx: Txn, src: F.Inode) -> treeops.Item:
    """What merging copies of an inode of SOURCE: its attributes, extended attributes and
    (for a file) extents."""
    return treeops.Item(src.mode, src.mtime_ns, src.uid, src.gid, src.atime_ns, src.rdev,
                        src.target, src.size, list(stx.extents(src.content)),
                        list(stx.xattrs(src.ino)))
