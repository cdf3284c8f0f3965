"""Making room on a field vault: evicting the bytes of files that a peer is known to hold.

A sync records, per version, the peers seen holding exactly its bytes online (`Txn.hold`), and
has each of them record that this vault relies on its copy (`Txn.rely`: a version another vault
relies on is never evicted, so two vaults cannot each evict what the other holds). Evicting a
file drops the data of those of its chunks that nothing else references (its record stays, so the
file is still listed, with its size and metadata); the chunks are *offline* and a read of them
fails with a clear error until `vaultfs fetch` or a sync brings them back (docs/store-format.md
§4.4). Which files may go, and in which order, is decided above (media/catalog.eviction_order: the
tiers whose policy allows it, oldest first); this module only checks and carries it out.
"""

from __future__ import annotations

import os
import stat
from collections import Counter

from . import format as F
from .store import Store
from .txn import Txn


def reusable_bytes(store: Store) -> int:
    """Bytes of the LMDB file that hold no live page: freed pages the store writes into again
    before the file grows (so evicting makes room without shrinking the file)."""
    info, psize = store.env.info(), store.env.stat()["psize"]
    used = 2  # the meta pages
    with store.env.begin() as t:
        for s in [store.env.stat()] + [t.stat(db) for db in store.dbs.values()]:
            used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
    file_bytes = os.stat(store.path / "lmdb" / "data.mdb").st_size
    return max(0, info["last_pgno"] + 1 - used) * psize + \
        max(0, file_bytes - (info["last_pgno"] + 1) * psize)


def space(store: Store, keep_free_percent: float) -> dict:
    """The store's disk as a vault sees it: free bytes (the disk's, plus the store file's
    reusable pages), the disk's size, and how many bytes are missing to the free-space floor."""
    st = os.statvfs(store.path)
    disk = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize + reusable_bytes(store)
    floor = int(disk * keep_free_percent / 100)
    return {"free_bytes": free, "disk_bytes": disk, "floor_bytes": floor,
            "short_bytes": max(0, floor - free)}


def evict(store: Store, candidates: list, want: int | None = None,
          dry_run: bool = False) -> dict:
    """Evict files in the order given, [[ino, content version, path], ...], until `want` bytes
    of stored data are freed (None: all of them). A file is skipped, with the reason, when its
    content changed since it was listed or no peer is recorded holding it. A chunk is dropped
    only when every reference to it comes from files evicted here."""
    def run(tx: Txn) -> dict:
        chosen: Counter[bytes] = Counter()  # chunk -> references from evicted files
        out: dict = {"evicted": [], "skipped": [], "freed_bytes": 0, "dry_run": dry_run}
        for ino, content, path in candidates:
            if want is not None and out["freed_bytes"] >= want:
                break
            node = tx.inode(ino)
            if node is None or not stat.S_ISREG(node.mode) or node.content != content:
                out["skipped"].append({"path": path, "why": "changed since it was listed"})
                continue
            reliers = tx.reliers(content)
            if reliers:
                out["skipped"].append({"path": path, "why": "a peer relies on this copy ("
                                       + ", ".join(sorted({n for _, n, _ in reliers})) + ")"})
                continue
            # Peers met in a sync; not a mirror of this vault, which is its second copy.
            holders = [h for h in tx.holders(content) if tx.is_sync_peer(h[0])]
            if not holders:
                out["skipped"].append({"path": path, "why": "no peer is known to hold it"})
                continue
            refs = Counter(chunk_id for _, chunk_id, _ in tx.extents(content))
            chosen.update(refs)
            freed = 0
            for chunk_id in refs:
                rec = tx.chunk_record(chunk_id)
                if rec.offline or chosen[chunk_id] < rec.refcount:
                    continue  # (gone already, or another file or version still needs it)
                freed += rec.stored_len if dry_run else tx.evict_chunk(chunk_id)
            if freed:
                out["freed_bytes"] += freed
                out["evicted"].append({"path": path, "bytes": freed,
                                       "held_by": sorted({name for _, name, _ in holders})})
        return out

    if dry_run:
        with store.reader() as tx:
            return run(tx)
    return store.write(run)


def offline_files(tx: Txn) -> list[dict]:
    """The live files with evicted bytes: path, bytes offline, and the peers holding them."""
    if not tx.counter(F.STAT_OFFLINE):
        return []
    out = []
    for path, node in tx.walk():
        if not stat.S_ISREG(node.mode) or not node.content:
            continue
        offline = sum(length for _, chunk_id, length in tx.extents(node.content)
                      if tx.chunk_record(chunk_id).offline)
        if offline:
            out.append({"path": path.decode(errors="surrogateescape"), "offline_bytes": offline,
                        "held_by": sorted({n for _, n, _ in tx.holders(node.content)})})
    return out
