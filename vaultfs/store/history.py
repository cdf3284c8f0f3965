"""Snapshots and version timelines: making, listing, measuring and pruning them.

A snapshot freezes a branch's epoch (txn.Txn.snapshot): nothing is copied. Deleting one merges
its epoch's records into the epoch after it, when only one follows, so that chains of epochs do
not grow without end; chunks are freed by their reference counts in the same transactions, so
space comes back as soon as nothing refers to it and a crash at any point loses nothing.
"""

from __future__ import annotations

import stat
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import PurePosixPath

from . import format as F
from . import gc
from .policy import RULES
from .store import Store
from .txn import StoreError, Txn

RESERVED_NAMES = {"latest", ".", ".."}


def check_name(name: str) -> bytes:
    """A snapshot's name as stored; it is a directory name under .vault/snapshots."""
    b = name.encode()
    if not b or len(b) > 255 or "/" in name or "\0" in name or name in RESERVED_NAMES:
        raise StoreError(f"{name!r} cannot name a snapshot (1-255 bytes, no '/', not "
                         f"{', '.join(sorted(RESERVED_NAMES))})")
    return b


def create_snapshot(store: Store, name: str | None = None, branch: str | None = None,
                    prefix: str = "") -> dict:
    """Freeze a branch's tree (default: the open one's). Without a name, `prefix` and the local
    time name it (sortable)."""
    now = time.time_ns()
    wanted = check_name(name) if name else None
    on = branch.encode() if branch else store.branch

    def make(tx: Txn) -> tuple[bytes, int]:
        tx = Txn(tx.txn, tx.dbs, branch=on, write=True)
        chosen = wanted
        if chosen is None:  # two in one second get -2, -3...
            stamp = prefix.encode() + datetime.fromtimestamp(now / 1e9).strftime(
                "%Y-%m-%dT%H%M%S").encode()
            chosen, n = stamp, 1
            while tx.snapshot_epoch(chosen) is not None:
                n += 1
                chosen = stamp + b"-%d" % n
        return chosen, tx.snapshot(chosen, now)

    chosen, epoch = store.write(make)
    return {"name": chosen.decode(errors="surrogateescape"), "epoch": epoch,
            "created_ns": now, "branch": on.decode(errors="surrogateescape")}


def list_snapshots(store: Store) -> list[dict]:
    """Every snapshot, oldest first, with what it holds and the stored bytes only it holds:
    what deleting it would give back."""
    with store.reader() as tx:
        snaps = sorted(tx.snapshots(), key=lambda s: (s[2], s[0]))
        out = [{"name": n.decode(errors="surrogateescape"), "epoch": e, "created_ns": c,
                "branch": b.decode(errors="surrogateescape")} for n, e, c, b in snaps]
        # Who holds each chunk: the snapshots, the branches' live trees, and the timelines of
        # live files (a timeline of a file only snapshots have goes with the last of them).
        holders: dict[bytes, set] = defaultdict(set)
        live: set[int] = set()
        trees = [(info["name"], info["epoch"], info) for info in out]
        trees += [(("branch", b), e, {}) for b, e in tx.branches()]
        for label, epoch, info in trees:
            info["files"] = info["logical_bytes"] = 0
            with store.reader(epoch=epoch) as view:
                for node in view.inodes():
                    if isinstance(label, tuple):
                        live.add(node.ino)
                    if stat.S_ISREG(node.mode):
                        info["files"] += 1
                        info["logical_bytes"] += node.size
                        for _, chunk_id, _ in tx.extents(node.content):
                            holders[chunk_id].add(label)
        for ino, number in tx.timelines():
            if ino in live:
                for _, chunk_id, _ in tx.extents(number):
                    holders[chunk_id].add(("timeline",))
        only: dict = defaultdict(int)
        for chunk_id, who in holders.items():
            if len(who) == 1:
                only[next(iter(who))] += tx.chunk_record(chunk_id).stored_len
        for info in out:
            info["exclusive_bytes"] = only.get(info["name"], 0)
    return out


def tree_epoch(tx: Txn, spec: str) -> int:
    """The epoch of a tree named on the command line: a snapshot, else a branch (whose live
    tree it is: `main` is the live tree of a store)."""
    epoch = tx.snapshot_epoch(spec.encode())
    if epoch is None:
        epoch = dict(tx.branches()).get(spec.encode())
    if epoch is None:
        raise StoreError(f"there is no snapshot or branch named {spec}")
    return epoch


def version_name(v: F.Version, file_name: bytes) -> bytes:
    """A version's name in its timeline: the UTC time of its commit (names sort by time), then
    the file's extension, so that programs know the type."""
    t = datetime.fromtimestamp(v.committed_ns / 1e9, timezone.utc)
    suffix = PurePosixPath(file_name.decode(errors="surrogateescape")).suffix
    return t.strftime("%Y-%m-%dT%H%M%S.%fZ").encode() + suffix.encode(errors="surrogateescape")


# What `vaultfs log` says changed in a version's metadata (from the media index).
LOGGED = ("rating", "label", "pick", "reject", "keywords", "title", "caption")


def file_log(store: Store, path: str) -> list[dict]:
    """A live file's timeline, oldest first: each version with its size, the bytes it did not
    share with the version before it, and what changed in its metadata (a rating...)."""
    with store.reader() as tx:
        ino = tx.resolve(path)
        node = tx.inode(ino) if ino is not None else None
        if node is None or not stat.S_ISREG(node.mode):
            raise StoreError(f"{path} is not a file in the vault")
        name = path.rstrip("/").rsplit("/", 1)[-1].encode(errors="surrogateescape")
        out, before, meta_before = [], set(), {}
        for v in tx.versions(ino):
            chunks = {(off, c) for off, c, _ in tx.extents(v.version)}
            changed = sum(n for off, c, n in tx.extents(v.version) if (off, c) not in before)
            meta = {k: m for k, m in (tx.media(v.version) or {}).items()
                    if k in LOGGED and m is not False}  # (no reject is no news)
            out.append({"version": v.version, "name": version_name(v, name).decode(
                errors="surrogateescape"), "committed_ns": v.committed_ns, "size": v.size,
                "mtime_ns": v.mtime_ns, "changed_bytes": changed,
                "current": v.version == node.content, "metadata": meta,
                "metadata_changes": {k: [meta_before.get(k), meta.get(k)] for k in LOGGED
                                     if out and meta_before.get(k) != meta.get(k)}})
            before, meta_before = chunks, meta
    return out


def diff(store: Store, a: str, b: str) -> list[dict]:
    """What changed from tree `a` to tree `b`: paths added, removed, modified, and renamed
    (the same file, or the same content, under another path), sorted by path."""
    with store.reader() as tx:
        ea, eb = tree_epoch(tx, a), tree_epoch(tx, b)
    old, new = tree_files(store, ea), tree_files(store, eb)
    out = []
    for path in old.keys() & new.keys():
        x, y = old[path], new[path]
        if stat.S_IFMT(x["mode"]) != stat.S_IFMT(y["mode"]) or x["sig"] != y["sig"]:
            out.append({"change": "modified", "path": path, "old_size": x["size"],
                        "size": y["size"]})
    gone = {p: old[p] for p in old.keys() - new.keys()}
    added = {p: new[p] for p in new.keys() - old.keys()}
    # Renames: the same inode first, then the same content (not for empty files).
    for key in ("ino", "sig"):
        by_key = {}
        for p, x in gone.items():
            if key == "ino" or x["size"]:
                by_key.setdefault((stat.S_IFMT(x["mode"]), x[key]), p)
        for p, y in list(added.items()):
            src = by_key.pop((stat.S_IFMT(y["mode"]), y[key]), None)
            if src is not None and src in gone:
                del gone[src], added[p]
                out.append({"change": "renamed", "from": src, "path": p,
                            "old_size": old[src]["size"], "size": y["size"]})
    out += [{"change": "removed", "path": p, "old_size": x["size"]} for p, x in gone.items()]
    out += [{"change": "added", "path": p, "size": y["size"]} for p, y in added.items()]
    return sorted(out, key=lambda c: c["path"])


def tree_files(store: Store, epoch: int) -> dict[str, dict]:
    """path -> what a diff compares, for everything in a tree."""
    out = {}
    with store.reader(epoch=epoch) as tx:
        for path, node in tx.walk():
            if stat.S_ISDIR(node.mode):
                sig = None
            elif stat.S_ISREG(node.mode):
                sig = (node.size, tuple((o, c) for o, c, _ in tx.extents(node.content)))
            else:
                sig = (node.target, node.rdev)
            out[path.decode(errors="surrogateescape")] = {
                "ino": node.ino, "mode": node.mode, "size": node.size, "sig": sig}
    return out


def delete_snapshot(store: Store, name: str) -> dict:
    """Forget a snapshot. Its epoch merges into the one after it when exactly one follows; what
    nothing else holds any more is freed in the same transaction."""
    key = name.encode()

    def delete(tx: Txn) -> dict:
        epoch = tx.snapshot_epoch(key)
        if epoch is None:
            raise StoreError(f"there is no snapshot named {name}")
        before = tx.counter(F.STAT_STORED)
        tx.txn.delete(key, db=tx.dbs[F.DB_SNAPSHOTS])
        gc.collapse(tx)
        return {"name": name, "freed_bytes": before - tx.counter(F.STAT_STORED)}

    return store.write(delete)


# ---- retention -----------------------------------------------------------------------------
# How `--keep-hourly 24` reads, as in restic and borg: the newest item of each of the 24 most
# recent hours that have one. Buckets are in local time.
BUCKETS = {"hourly": "%Y-%m-%d %H", "daily": "%Y-%m-%d", "weekly": "%G-%V", "monthly": "%Y-%m",
           "yearly": "%Y"}


def retained(items: list[tuple[object, int]], rules: dict[str, int]) -> set:
    """The keys of `items` ((key, time ns) pairs) that the keep rules keep."""
    order = sorted(items, key=lambda i: i[1], reverse=True)
    kept = {k for k, _ in order[:rules.get("last", 0)]}
    for rule, fmt in BUCKETS.items():
        seen: set[str] = set()
        for k, t in order:
            if len(seen) >= rules.get(rule, 0):
                break
            bucket = time.strftime(fmt, time.localtime(t / 1e9))
            if bucket not in seen:
                seen.add(bucket)
                kept.add(k)
    return kept


def prune(store: Store, *, keep: dict[str, int], versions: bool = False, prefix: str = "",
          dry_run: bool = False) -> dict:
    """Forget the snapshots (whose names start with `prefix`) and, with `versions`, the file
    versions that the keep rules do not keep, giving back the space nothing else holds. Each
    branch's snapshots, and each file's timeline, are judged on their own."""
    keep = _check_rules(keep)
    with store.reader() as tx:
        by_branch: dict[bytes, list] = defaultdict(list)
        for name, _, created, branch in tx.snapshots():
            if name.decode(errors="surrogateescape").startswith(prefix):
                by_branch[branch].append((name, created))
        forget = [n for snaps in by_branch.values() for n, _ in snaps
                  if n not in retained(snaps, keep)]
    report = {"snapshots_removed": sorted(n.decode(errors="surrogateescape") for n in forget),
              "versions_removed": 0, "freed_bytes": 0, "dry_run": dry_run}
    before = store.figures()["stored_bytes"]
    if forget and not dry_run:
        def forget_snapshots(tx: Txn) -> None:
            for name in forget:
                tx.txn.delete(name, db=tx.dbs[F.DB_SNAPSHOTS])
            gc.collapse(tx)
        store.write(forget_snapshots)
    if versions:
        report["versions_removed"] = prune_versions(store, keep=keep,
                                                    dry_run=dry_run)["versions_removed"]
    report["freed_bytes"] = before - store.figures()["stored_bytes"]
    return report


def prune_versions(store: Store, *, keep: dict[str, int], dry_run: bool = False) -> dict:
    """Thin every file's timeline by the keep rules. A file's current version, and versions
    a snapshot holds, count toward what is kept and are never removed here."""
    keep = _check_rules(keep)
    drop: list[tuple[int, F.Version]] = []
    with store.reader() as tx:
        timeline: dict[int, list[F.Version]] = defaultdict(list)
        for ino, number in tx.timelines():
            timeline[ino].append(tx.version(number))
        for ino, vs in timeline.items():
            if len(vs) <= keep.get("last", 0):
                continue
            kept = retained([(v.version, v.committed_ns) for v in vs], keep)
            drop += [(ino, v) for v in vs if v.version not in kept and not tx.holds(v)]
    if not dry_run:
        for i in range(0, len(drop), 500):  # in pieces: a mount's writes go on between
            def drop_versions(tx: Txn, batch=drop[i:i + 500]) -> None:
                for ino, v in batch:
                    if tx.on_timeline(ino, v.version):
                        tx.drop_version(v, ino)
            store.write(drop_versions)
    return {"versions_removed": len(drop), "dry_run": dry_run}


def _check_rules(keep: dict) -> dict[str, int]:
    keep = {k: int(v) for k, v in keep.items() if v}
    if not keep or not set(keep) <= set(RULES):
        raise StoreError("give at least one keep rule: " + ", ".join(f"--keep-{r}" for r in RULES))
    return keep


def collect(store: Store) -> dict:
    """Merge the epochs nothing names any more and drop tombstones that hide nothing (see
    gc.py; chunks were freed already, when their last reference went), and release the chunks
    an interrupted sync left in the inbox (a sync run again would have used them)."""
    def run(tx: Txn) -> dict:
        report = gc.collapse(tx)
        report["inbox_chunks_released"] = tx.release_inbox()
        return report
    return store.write(run)
