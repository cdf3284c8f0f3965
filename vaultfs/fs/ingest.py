"""Committing a spooled file into the store: chunk, hash, compress, then add a version.

A file's chunks reach LMDB in batches of bounded size (so a 4 GiB file never sits in one
transaction's memory); each batch records its chunk references as *pending* for the inode.
The final transaction stores the last batch and turns the pending references into the extents
of the file's new version, so the file changes atomically: a crash before it leaves the
previous version, and the next mount releases the pending references (store.Store._recover).

While a file is written front to back (the way cameras and tethering software write), the part
already written is ingested in the background (`advance`), so that closing the file leaves only
its last few chunks to store.

Everything here blocks: it runs in worker threads, never on the trio loop.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor

from ..chunking import MIN_SIZE, is_zero, read_at, split_file, structure
from ..chunking.formats import Structure
from ..store import Store, StoreError, Txn
from ..store.codec import Digests, Layout, digests, encode, stored_layout

BATCH_BYTES = 4 * 1024 * 1024
FORMAT_HEAD = 8 * 1024 * 1024  # enough of a file to find its format's structure
PIPELINE = 2
SURE_AFTER = 2  # chunks of image data measured before the layout that won is taken as sure

# Compression is the costliest step; it runs on every core, bounded, for all commits together.
_encoders = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                               thread_name_prefix="vaultfs-encode")

Extent = tuple[int, bytes, int]  # file offset, chunk id, length
Chunk = tuple[int, memoryview, Digests]  # file offset, raw bytes, digests
EncodeJobs = dict[int, Future[bytes]]  # chunk index -> its compression, under way


class FileIngest:
    """The content of one file as it is being committed: `base`, extents already committed and
    unchanged since, then `extents` stored as pending references, then the bytes from `done_to`
    on that are still to be cut. Bytes [0, done_to) are final: `done_to` is always a cut point,
    so cutting from there gives the chunks that cutting the whole file would."""

    def __init__(self, store: Store, ino: int, base: list[Extent] | None = None,
                 done_to: int = 0):
        self.store = store
        self.ino = ino
        self.base = base or []
        self.extents: list[Extent] = []
        self.done_to = done_to
        self.holds_pending = False  # pending records may exist for this file
        # The version the previous commit of this open session made: the next commit takes
        # its place, so a file written with fsyncs, or closed through a dup'ed descriptor
        # first (a shell's `>`), leaves one version per session, not one per flush.
        self.session_version = 0
        # Hard cut points of the file's format and where its uncompressed image data lies
        # (chunking/formats.py), found once enough of it is there: a metadata edit then
        # re-stores the metadata, not the image data, and image data is compressed as such.
        self.structure: Structure | None = None
        # A layout of its image data -> the one the predictor won with and how many times.
        self.chosen: dict[Layout, tuple[Layout | None, int]] = {}
        self._choosing = threading.Lock()

    @classmethod
    def resume(cls, store: Store, tx: Txn, ino: int) -> "FileIngest":
        """An ingest that keeps a committed file's chunks (`appendable`): appending then costs
        what is appended."""
        node = tx.inode(ino)
        return cls(store, ino, *appendable(list(tx.extents(node.content)) if node else []))

    def advance(self, fd: int, end: int, final: bool) -> None:
        """Store the chunks of bytes [done_to, end) of the spool `fd` as pending references.
        Unless `final`, the last chunk is held back: bytes after `end` may still change where
        it is cut."""
        chunks, encs = self._chunk(fd, end, final)
        if chunks:
            self.extents.extend(self._store(chunks, _results(encs)).result())

    def commit(self, fd: int, size: int, mtime_ns: int, ctime_ns: int) -> None:
        """Make the first `size` bytes of the spool `fd` the file's new version, atomically:
        the last batch of chunks is stored in the same transaction that adds the version."""
        chunks, encs = self._chunk(fd, size, final=True)
        encoded = _results(encs)
        ino, base, extents = self.ino, self.base, self.extents

        def finish(tx: Txn) -> tuple[list[Extent], int] | None:
            held = tx.take_pending(ino)
            inode = tx.inode(ino)
            if inode is None:  # deleted while we worked: give the references back
                for chunk_id in held:
                    tx.decref(chunk_id)
                return None
            # Give back what an earlier, failed commit of this file may have left pending.
            for chunk_id in (Counter(held) - Counter(e[1] for e in extents)).elements():
                tx.decref(chunk_id)
            if Counter(e[1] for e in extents) - Counter(held):
                raise StoreError(f"inode {ino}: commit lost track of its pending chunks")
            if any(tx.chunk_record(c).offline for _, c, _ in base):
                raise _BaseOffline  # (evicted while the file was open: nothing is changed)
            for _, chunk_id, _ in base:  # the new version's own references
                tx.incref(chunk_id)
            new = base + extents + _add_chunks(tx, chunks, encoded)
            previous = tx.version(self.session_version)
            version = tx.new_version(inode, new, size, mtime_ns, time.time_ns())
            inode.mtime_ns = mtime_ns
            inode.ctime_ns = ctime_ns
            tx.put_inode(inode)
            if previous is not None and tx.on_timeline(ino, previous.version):
                tx.drop_version(previous, ino)  # kept if a snapshot holds it
            return new, version.version

        try:
            new, self.session_version = self.store.writer.call(finish) or ([], 0)
        except _BaseOffline:
            # The chunks kept from the committed version were evicted meanwhile: the new version
            # must not name bytes this vault no longer has. The spool holds them all: cut it whole.
            self.abandon()
            return self.commit(fd, size, mtime_ns, ctime_ns)
        self.base, self.done_to = appendable(new)
        self.extents, self.holds_pending = [], False

    def abandon(self) -> None:
        """Release what this ingest stored and start over: its view of the file is out of date."""
        try:
            if self.holds_pending:
                self.store.writer.call(
                    lambda tx: [tx.decref(c) for c in tx.take_pending(self.ino)])
                self.holds_pending = False
        finally:
            # Even if the release failed (it is retried by the next commit's or abandon's
            # transaction, or by recovery), nothing of this view of the file is kept.
            self.base, self.extents, self.done_to, self.structure = [], [], 0, None
            self.chosen = {}

    def _chunk(self, fd: int, end: int, final: bool) -> tuple[list[Chunk], EncodeJobs]:
        """Cut, hash and store bytes [done_to, end), but for the last batch, which is returned
        (with its compression under way) for the caller to store.

        A pipeline: this thread reads, cuts and hashes; the encoder pool compresses the chunks
        the store lacks; the writer commits. Up to PIPELINE batches wait in each stage, so the
        three run at once and memory stays bounded."""
        encoding: deque[tuple[list[Chunk], EncodeJobs]] = deque()
        storing: deque[Future[list[Extent]]] = deque()
        batch: list[Chunk] = []
        nbytes = 0
        last = self.done_to

        def drain(keep: int) -> None:
            while len(encoding) > keep:
                chunks, encs = encoding.popleft()
                storing.append(self._store(chunks, _results(encs)))
            while len(storing) > keep:
                self.extents.extend(storing.popleft().result())

        if self.structure is None and (final or end >= FORMAT_HEAD):
            self.structure = structure(lambda off, n: read_at(fd, n, off), end)
        cuts, grids = ((self.structure.cuts, self.structure.grids)
                       if self.structure is not None else ((), ()))
        try:
            for off, data in split_file(fd, self.done_to, end, final, cuts, grids):
                last = off + len(data)
                if is_zero(data):
                    continue  # a hole: stored as no extent at all
                batch.append((off, data, digests(data)))
                nbytes += len(data)
                if nbytes >= BATCH_BYTES:
                    encoding.append((batch, self._encode_missing(batch)))
                    batch, nbytes = [], 0
                    drain(PIPELINE)
            tail = (batch, self._encode_missing(batch))
            drain(0)
        finally:
            for fut in storing:
                fut.exception()  # let every batch land before anyone reads the pending refs
        self.done_to = last
        return tail

    def _encode_missing(self, chunks: list[Chunk]) -> dict[int, Future[bytes]]:
        """Start compressing the chunks the store lacks now (the others are dedup hits), each
        with the layout of the image data it holds, if the file's format says."""
        with self.store.reader() as tx:
            missing = [i for i, (_, _, d) in enumerate(chunks) if tx.find_chunk(d) is None]
        jobs = {}
        for i in missing:
            off, data, _ = chunks[i]
            hint = self.structure.layout_at(off, len(data)) if self.structure else None
            jobs[i] = _encoders.submit(self._encode, data, *(hint or (None, 0)))
        return jobs

    def _encode(self, data: memoryview, layout: Layout | None, region_offset: int) -> bytes:
        """A chunk's stored value. Once the predictor has won with the same layout (in the
        same byte order) for SURE_AFTER chunks of the file's image data of that layout, and
        never lost, that layout is taken as sure for the chunks after them."""
        if layout is None:
            return encode(data)
        won, times = self.chosen.get(layout, (None, 0))
        if times >= SURE_AFTER:
            return encode(data, won, region_offset, sure=True)
        stored = encode(data, layout, region_offset)
        found = stored_layout(stored)
        with self._choosing:  # (encoder threads: a disagreement, -1, is never undone)
            won, times = self.chosen.get(layout, (None, 0))
            if times >= 0:
                agrees = found is not None and (times == 0 or found[0] == won)
                self.chosen[layout] = (found[0], times + 1) if agrees else (None, -1)
        return stored

    def _store(self, chunks: list[Chunk], encoded: dict[int, bytes]) -> "Future[list[Extent]]":
        ino = self.ino

        def put(tx: Txn) -> list[Extent]:
            out = _add_chunks(tx, chunks, encoded)
            for _, chunk_id, _ in out:
                tx.add_pending(ino, chunk_id)
            return out

        self.holds_pending = True
        return self.store.writer.submit(put)


class _BaseOffline(Exception):
    """A commit found chunks it kept from the committed version evicted (store/evict.py)."""


def appendable(extents: list[Extent]) -> tuple[list[Extent], int]:
    """What a later append keeps of a committed version's extents, and where cutting starts
    again. Its last chunk was cut by the end of the file, not by its content: kept when it is a
    full one (at least MIN_SIZE), so that appending stores and sends only what is appended;
    else its bytes are cut again with what follows, so that a logger's many small appends do
    not leave a trail of tiny chunks. (Sound either way: a content-defined cut depends only on
    the bytes since the previous one.)"""
    if not extents:
        return [], 0
    off, _, length = extents[-1]
    if length >= MIN_SIZE:
        return extents, off + length
    return extents[:-1], off


def _results(encs: EncodeJobs) -> dict[int, bytes]:
    return {i: f.result() for i, f in encs.items()}


def _add_chunks(tx: Txn, chunks: list[Chunk], encoded: dict[int, bytes]) -> list[Extent]:
    """Take a reference on each chunk, storing those that are new."""
    out = []
    for i, (off, data, d) in enumerate(chunks):
        # A chunk seen as stored may have been freed since: then encode it here (rare).
        chunk_id = tx.add_chunk(d, len(data), encoded.get(i) or (lambda: encode(data)))
        out.append((off, chunk_id, len(data)))
    return out


def commit_spool(store: Store, ino: int, fd: int, size: int, mtime_ns: int,
                 ctime_ns: int, ingest: FileIngest | None = None) -> None:
    """Make the first `size` bytes of the spool file `fd` the committed content of `ino`,
    continuing `ingest` if it was fed in the background and is still valid."""
    ingest = ingest or FileIngest(store, ino)
    try:
        ingest.commit(fd, size, mtime_ns, ctime_ns)
    except BaseException:
        ingest.abandon()
        raise
