"""Committing a spooled file into the store: chunk, hash, compress, then swap the extents.

A file's chunks reach LMDB in batches of bounded size (so a 4 GiB file never sits in one
transaction's memory); each batch records its chunk references as *pending* for the inode. The
final transaction turns those references into the file's extents and releases the old ones, so
the file changes atomically: a crash before it leaves the previous version, and the next mount
releases the pending references (store.Store._recover).

Everything here blocks: it runs in a worker thread, never on the trio loop.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

from ..chunking import split_file
from ..store import Store, Txn
from ..store.codec import Digests, digests, encode

BATCH_BYTES = 16 * 1024 * 1024
_ZEROS = bytes(8 * 1024 * 1024)  # larger than the largest chunk

# Compression is the costliest step; it runs on every core, bounded, for all commits together.
_encoders = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                               thread_name_prefix="vaultfs-encode")


def commit_spool(store: Store, ino: int, fd: int, size: int, mtime_ns: int,
                 ctime_ns: int) -> None:
    """Make the first `size` bytes of the spool file `fd` the committed content of `ino`."""
    extents: list[tuple[int, bytes, int]] = []
    inflight: list[Future] = []

    def store_batch(batch: list[tuple[int, bytes, Digests]]) -> None:
        # Encode only what the store lacks now; the writer re-checks, and encodes itself any
        # chunk that a concurrent delete freed in between (rare).
        with store.reader() as tx:
            missing = [i for i, (_, _, d) in enumerate(batch) if tx.find_chunk(d) is None]
        encoded = dict(zip(missing, _encoders.map(lambda i: encode(batch[i][1]), missing)))

        def put(tx: Txn) -> list[tuple[int, bytes, int]]:
            out = []
            for i, (off, data, d) in enumerate(batch):
                chunk_id = tx.add_chunk(d, len(data), encoded.get(i) or (lambda: encode(data)))
                tx.add_pending(ino, chunk_id)
                out.append((off, chunk_id, len(data)))
            return out

        inflight.append(store.writer.submit(put))
        # Hash the next batch while this one is written, but keep at most two in memory.
        while len(inflight) > 1:
            extents.extend(inflight.pop(0).result())

    try:
        batch: list[tuple[int, bytes, Digests]] = []
        nbytes = 0
        for off, data in split_file(fd, size):
            if _ZEROS.startswith(data):
                continue  # a hole: stored as no extent at all
            batch.append((off, data, digests(data)))
            nbytes += len(data)
            if nbytes >= BATCH_BYTES:
                store_batch(batch)
                batch, nbytes = [], 0
        if batch:
            store_batch(batch)
        for fut in inflight:
            extents.extend(fut.result())
    except BaseException:
        for fut in inflight:
            fut.exception()  # let every batch land before releasing what they took
        store.writer.call(lambda tx: [tx.decref(c) for c in tx.take_pending(ino)])
        raise

    def finish(tx: Txn) -> None:
        held = tx.take_pending(ino)
        inode = tx.inode(ino)
        if inode is None:  # deleted while we worked: give the references back
            for chunk_id in held:
                tx.decref(chunk_id)
            return
        assert held == [e[1] for e in extents], "pending references out of step with extents"
        tx.set_extents(ino, extents)
        inode.size = size
        inode.mtime_ns = mtime_ns
        inode.ctime_ns = ctime_ns
        tx.put_inode(inode)

    store.writer.call(finish)
