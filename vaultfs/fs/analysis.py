"""Reading the metadata of every committed image and sidecar into the store's media index,
with each image's perceptual fingerprint, preview location and digest, after commit and off
the FUSE path: a trio task hands files to a worker thread one at a time, so capture never waits
for it. A file that cannot be read is still stored and listed; its record says why, and the
reason is logged once.

A file is analysed once the mount has read it back (verified it), and an image whose read-back
saw all of it comes with the digest of its bytes. Such an image is first read without its
sensor data: the chunks stored as samples (codec 2) that lie inside the uncompressed image
data its TIFF structure declares are not decoded (zeros). A RAW's metadata and its embedded
JPEG preview lie elsewhere, and decoding the samples was a quarter of the daemon's work in a
card import. That reading is used only when nothing in the record can have come from those
bytes (`_without_samples`); anything else (a TIFF whose picture is its samples, a RAW without
a JPEG preview) is read again whole.
"""

from __future__ import annotations

import logging
import math
import stat
from collections import Counter
from collections.abc import Callable

import trio

from ..chunking import formats
from ..media import fingerprint, metadata
from ..store import Inode, Store, Txn
from ..store.format import CODEC_SAMPLES
from .decoder import Decoder, DecoderFailed, Shared
from ..store.reader import (ChunkCache, DamagedChunk, OfflineData, Pieces, read_except,
                            read_range)

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20  # larger files are not read whole for their metadata
HEAD_BYTES = 4 << 20   # what is read of a larger file first


class Analyzer:
    def __init__(self, store: Store, cache: ChunkCache, decode: Decoder):
        self.store, self.cache, self.decode = store, cache, decode
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._queued: set[int] = set()
        self._working = True  # (until the backlog is queued)
        self.analysed = 0  # records written
        self.skipped_bytes = 0  # sensor data of them that was never decoded
        # called on the loop with (inode, version, record)
        self.on_analysed: Callable[[int, int, dict], None] | None = None
        self.name_of: Callable[[int], str | None] = lambda ino: None  # a file's name, if known
        # Read-backs in flight per file (a file is analysed after its own), and the XXH3-128
        # (hex) of the bytes of a file's version where its read-back saw them all.
        self._reading: Counter[int] = Counter()
        self._read = trio.Event()  # set, and replaced, when a read-back ends
        self._digests: dict[int, tuple[int, str]] = {}

    @property
    def busy(self) -> bool:
        return bool(self._queued) or self._working

    def enqueue(self, ino: int) -> None:
        if ino not in self._queued:
            self._queued.add(ino)
            self._send.send_nowait(ino)

    def reading_back(self, ino: int, size: int) -> None:
        """The mount reads `ino`, of `size` bytes, back (and calls `read_back` after). A file
        too large to be read here is not waited for (its read-back can take minutes)."""
        if size <= MAX_BYTES:
            self._reading[ino] += 1

    def read_back(self, ino: int, version: int, digest: str | None) -> None:
        """The mount has read `ino` back: the digest of its `version` when it read it all.
        (Only the use of the digest depends on the two being paired, never the record.)"""
        if ino in self._reading:
            self._reading[ino] -= 1
            if self._reading[ino] <= 0:
                del self._reading[ino]
        if digest is not None:
            self._digests[ino] = (version, digest)
        self._read.set()
        self._read = trio.Event()

    async def caught_up(self) -> None:
        """Wait until every file queued so far (the backlog first) is analysed."""
        while self.busy:
            await trio.sleep(0.2)

    async def run(self) -> None:
        """Files committed before this mount that lack a record (or a fingerprint) first, then
        each commit."""
        try:
            for ino in await trio.to_thread.run_sync(self._backlog):
                self.enqueue(ino)
        except Exception:
            log.exception("listing the files to analyse failed; only new commits will be")
        while True:
            self._working = False
            ino = await self._recv.receive()
            self._working = True
            self._queued.discard(ino)
            while self._reading.get(ino):
                await self._read.wait()
            try:
                done = await trio.to_thread.run_sync(self._analyse, ino)
            except DamagedChunk as e:  # (the read-back, `verify` and reads say it too)
                log.error("cannot read the metadata of %s: damaged data: %s",
                          self._path(ino), e)
                continue
            except Exception:  # the next commit of the file tries again
                log.exception("reading the metadata of inode %d failed", ino)
                continue
            if done is not None and self.on_analysed is not None:
                self.on_analysed(ino, *done)

    def _metadata(self, data: bytes, run: Shared) -> dict:
        """A file's metadata: of a large JPEG, from its head; of anything else, from all of
        it (`run`: the decoder holding `data`)."""
        # A JPEG's metadata is all before its scan; in other formats it can be anywhere
        # (a TIFF's IFD at the end, XMP appended by an editor), so they are read whole.
        if len(data) > HEAD_BYTES and data.startswith(fingerprint.JPEG_MAGIC):
            try:
                return self.decode(metadata.read, data[:HEAD_BYTES])
            except metadata.MetadataError:
                pass
        return run(metadata.read, run.path)

    def _backlog(self) -> list[int]:
        with self.store.reader() as tx:
            return [n.ino for n in tx.inodes()
                    if stat.S_ISREG(n.mode) and n.content and pending(tx.media(n.content))]

    def _analyse(self, ino: int) -> tuple[int, dict] | None:
        """Read one file's metadata (and fingerprint) into the index; the version read and the
        record written (None: nothing to do)."""
        data, skipped, known = None, [], self._digests.pop(ino, None)
        with self.store.reader(buffers=True) as tx:  # (values not copied: read_except peeks)
            node = tx.inode(ino)
            if node is None or not node.content or not pending(tx.media(node.content)):
                return None
            digest = known[1] if known is not None and known[0] == node.content else None
            try:
                what = metadata.sniff(read_range(tx, self.cache, node, 0, 512),
                                      self.name_of(ino))
                if what == "image" and digest is not None and node.size <= MAX_BYTES:
                    pieces, skipped = self._read_but_samples(tx, node)
                    data = pieces if skipped else pieces.whole()
                elif what is not None and node.size <= MAX_BYTES:
                    data = read_range(tx, self.cache, node, 0, node.size)
            except OfflineData:  # evicted: read when it is back (the next mount's backlog)
                return None
        # (The bytes are read; the decoding needs no transaction held open.)
        record = self._without_samples(data, skipped, digest) if skipped else None
        if record is not None:
            self.skipped_bytes += sum(n for _, n in skipped)
        else:
            if skipped:  # the samples are needed after all: the same version, whole
                try:
                    with self.store.reader(buffers=True) as tx:
                        data = read_range(tx, self.cache, node, 0, node.size)
                except OfflineData:
                    return None
            record = self._record(ino, what, data)
        self.store.write(lambda tx: tx.put_media(node.content, record))
        self.analysed += 1
        return node.content, record

    def _record(self, ino: int, what: str | None, data: bytes | None) -> dict:
        """The record of a file of kind `what`, from its whole bytes (None: too large)."""
        if what is None:
            return {"kind": None}  # not a format with metadata to read
        if data is None:
            why = f"larger than {MAX_BYTES >> 20} MiB: not read"
            record = {"kind": what, "error": why}
            if what == "image":
                record["fingerprint_error"] = why
            return record
        with self.decode.shared(data) as run:
            try:
                record = self._metadata(data, run)
            except (metadata.MetadataError, MemoryError, OverflowError, DecoderFailed) as e:
                record = {"kind": what, "error": str(e) or type(e).__name__}
                log.warning("cannot read the metadata of %s: %s", self._path(ino),
                            record["error"])
            if what == "image":
                record.update(self._fingerprint(ino, data, run))
        return record

    def _read_but_samples(self, tx: Txn, node: Inode) -> tuple[Pieces, list[tuple[int, int]]]:
        """A file but for its chunks of sensor data: those stored as samples
        (codec 2) that lie inside the uncompressed image data its TIFF structure declares
        (chunking/formats.py, reading the IFDs' own bytes, decoded whatever their codec); and
        the ranges left out."""
        images = formats.structure(lambda off, n: read_range(tx, self.cache, node, off, n),
                                   node.size).grids
        return read_except(tx, self.cache, node, CODEC_SAMPLES, images)

    def _without_samples(self, data: Pieces, skipped: list[tuple[int, int]],
                         digest: str) -> dict | None:
        """The record of an image read with its sensor data left out (`skipped`, as zeros),
        when nothing in it comes from those bytes, else None: Exiv2 reads no image data, and
        the picture fingerprinted must be the RAW's embedded JPEG, found whole outside them
        (LibRaw reads the preview alone). The digest of the whole bytes is the read-back's."""
        with self.decode.shared(data) as run:
            try:
                record = run(fingerprint.preview_record, skipped, run.path)
            except (metadata.MetadataError, MemoryError, OverflowError, DecoderFailed):
                return None  # (said by the reading of the whole file)
        if record is not None:
            record["digest"] = digest
        return record

    def _fingerprint(self, ino: int, data: bytes, run: Shared) -> dict:
        """An image's digest, and its fingerprint and preview or why it has none (logged)."""
        try:
            out = run(fingerprint.image_record)
        except (MemoryError, DecoderFailed) as e:
            out = {"digest": fingerprint.digest(data),
                   "fingerprint_error": str(e) or "out of memory decoding it"}
        if "fingerprint_error" in out:
            log.warning("cannot fingerprint %s: %s", self._path(ino), out["fingerprint_error"])
        return out

    def _path(self, ino: int) -> str:
        """A file's path for the log: bytes that are not UTF-8 as escapes (\\xe9)."""
        with self.store.reader() as tx:
            path = tx.path_of(ino) or f"inode {ino}"
        return path.encode(errors="surrogateescape").decode(errors="backslashreplace")


def pending(record: dict | None) -> bool:
    """Whether a version's bytes still need reading: no record yet, or an image's (or a
    record from before fingerprints, whose kind it did not say) without its fingerprint."""
    if record is None:
        return True
    if "fingerprint" in record or "fingerprint_error" in record:
        return False
    return record.get("kind", "image") == "image"

