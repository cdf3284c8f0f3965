"""Tagging files and folders with a tier by hand: the xattr user.vaultfs.tier, which overrides
the rules for the file, or for every file below a folder (media/tiers.py)."""

from __future__ import annotations

import fnmatch
import stat
import time

from . import policy
from .store import Store
from .txn import StoreError, Txn

TIER_XATTR = b"user.vaultfs.tier"


def tag(store: Store, paths: list[str], tier: str | None) -> dict:
    """Set (or, with tier None, clear) the tier tag of files, folders and globs (paths inside
    the vault, '*' and '?' matching within a name). Returns the paths tagged."""
    if tier is not None:
        names = [n for n, _ in policy.load(store.path).tiers]
        if tier not in names + ["general"]:
            raise StoreError(f"there is no tier {tier!r} (tiers: {', '.join(names)})")
    now = time.time_ns()

    def apply(tx: Txn) -> list[str]:
        done = []
        for pattern in paths:
            found = _match(tx, pattern.strip("/"))
            if not found:
                raise StoreError(f"nothing in the vault matches {pattern}")
            for path, ino in found:
                if tier is None:
                    tx.remove_xattr(ino, TIER_XATTR)
                else:
                    tx.set_xattr(ino, TIER_XATTR, tier.encode())
                node = tx.inode(ino)
                node.ctime_ns = now
                tx.put_inode(node)
                done.append(path)
        return done

    return {"tier": tier, "paths": store.write(apply)}


def _match(tx: Txn, pattern: str) -> list[tuple[str, int]]:
    ino = tx.resolve(pattern)  # a name that holds * ? [ literally comes first
    if ino is not None or not any(c in pattern for c in "*?["):
        return [(pattern, ino)] if ino is not None else []
    depth = pattern.count("/")
    return [(p, node.ino) for p, node in
            ((p.decode(errors="surrogateescape"), n) for p, n in tx.walk())
            if p.count("/") == depth and fnmatch.fnmatchcase(p, pattern)
            and (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode))]
