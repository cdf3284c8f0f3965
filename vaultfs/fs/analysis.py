"""Reading the metadata of every committed image and sidecar into the store's media index,
with each image's perceptual fingerprint, preview location and digest, after commit and off
the FUSE path: a trio task hands files to a worker thread one at a time, so capture never waits
for it. A file that cannot be read is still stored and listed; its record says why, and the
reason is logged once."""

from __future__ import annotations

import logging
import math
import stat
from collections.abc import Callable

import trio

from ..media import fingerprint, metadata
from ..store import Store
from ..store.reader import ChunkCache, OfflineData, read_range

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20  # larger files are not read whole for their metadata
HEAD_BYTES = 4 << 20   # what is read of a larger file first


class Analyzer:
    def __init__(self, store: Store, cache: ChunkCache):
        self.store, self.cache = store, cache
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._queued: set[int] = set()
        self._working = True  # (until the backlog is queued)
        self.analysed = 0  # records written
        self.on_analysed: Callable[[int, dict], None] | None = None  # called on the loop
        self.name_of: Callable[[int], str | None] = lambda ino: None  # a file's name, if known

    @property
    def busy(self) -> bool:
        return bool(self._queued) or self._working

    def enqueue(self, ino: int) -> None:
        if ino not in self._queued:
            self._queued.add(ino)
            self._send.send_nowait(ino)

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
            try:
                record = await trio.to_thread.run_sync(self._analyse, ino)
            except Exception:  # the next commit of the file tries again
                log.exception("reading the metadata of inode %d failed", ino)
                continue
            if record is not None and self.on_analysed is not None:
                self.on_analysed(ino, record)

    def _metadata(self, data: bytes) -> dict:
        """A file's metadata: of a large JPEG, from its head; of anything else, from all of
        it."""
        # A JPEG's metadata is all before its scan; in other formats it can be anywhere
        # (a TIFF's IFD at the end, XMP appended by an editor), so they are read whole.
        if len(data) > HEAD_BYTES and data.startswith(fingerprint.JPEG_MAGIC):
            try:
                return metadata.read(data[:HEAD_BYTES])
            except metadata.MetadataError:
                pass
        return metadata.read(data)

    def _backlog(self) -> list[int]:
        with self.store.reader() as tx:
            return [n.ino for n in tx.inodes()
                    if stat.S_ISREG(n.mode) and n.content and pending(tx.media(n.content))]

    def _analyse(self, ino: int) -> dict | None:
        """Read one file's metadata (and fingerprint) into the index; the record written
        (None: nothing to do)."""
        data = None
        with self.store.reader() as tx:
            node = tx.inode(ino)
            if node is None or not node.content or not pending(tx.media(node.content)):
                return None
            try:
                what = metadata.sniff(read_range(tx, self.cache, node, 0, 512),
                                      self.name_of(ino))
                if what is not None and node.size <= MAX_BYTES:
                    data = read_range(tx, self.cache, node, 0, node.size)
            except OfflineData:  # evicted: read when it is back (the next mount's backlog)
                return None
        # (The bytes are read; the decoding needs no transaction held open.)
        if what is None:
            record: dict = {"kind": None}  # not a format with metadata to read
        elif data is None:
            why = f"larger than {MAX_BYTES >> 20} MiB: not read"
            record = {"kind": what, "error": why}
            if what == "image":
                record["fingerprint_error"] = why
        else:
            try:
                record = self._metadata(data)
            except (metadata.MetadataError, MemoryError, OverflowError) as e:
                record = {"kind": what, "error": str(e) or type(e).__name__}
                log.warning("cannot read the metadata of %s: %s", self._path(ino),
                            record["error"])
            if what == "image":
                record.update(self._fingerprint(ino, data))
        self.store.write(lambda tx: tx.put_media(node.content, record))
        self.analysed += 1
        return record

    def _fingerprint(self, ino: int, data: bytes) -> dict:
        """An image's digest, and its fingerprint and preview or why it has none (logged)."""
        out = fingerprint.image_record(data)
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

