"""Generated previews (vault.toml [[capture]] `preview = N`): once the analyser has read an
image's version, the mount makes a JPEG proxy of it, N pixels on its long side, when the file
holds no JPEG preview that large (media/preview.py: HEIC, TIFF, PNG, a RAW with only a small
thumbnail), off the FUSE path: a trio task hands files to a worker thread one at a time. The
proxy is kept in the store's `previews` database, by version (docs/store-format.md §8.7), and
`.vault/previews` serves it. A version that cannot be decoded gets a record saying why
instead, so that the reason is logged once and nothing is tried again, until a policy asks
for another size. At mount start, the images whose current version lacks the preview its
policy asks for are queued (the backlog), after the versions that have one are noted.
"""

from __future__ import annotations

import logging
import math
import stat
from collections.abc import Callable

import trio

from ..media import preview
from ..store import Store, Txn
from ..store import format as F
from ..store.reader import ChunkCache, DamagedChunk, OfflineData, read_range
from .analysis import MAX_BYTES
from .capture import CapturePolicies
from .decoder import Decoder, DecoderFailed

log = logging.getLogger(__name__)


class Previews:
    def __init__(self, store: Store, cache: ChunkCache, policies: CapturePolicies | None,
                 decode: Decoder):
        self.store, self.cache, self.policies, self.decode = store, cache, policies, decode
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._queued: set[int] = set()
        # The versions with a preview record: the long side asked, and those made (a version
        # dropped since stays here: version numbers are never reused, so it is never a live
        # file's content again).
        self.asked: dict[int, int] = {}
        self.made: set[int] = set()
        self.on_made: Callable[[], None] = lambda: None  # called on the loop

    @property
    def wanted(self) -> bool:
        """Whether some policy asks for previews."""
        return self.policies is not None and any(p.preview for p in self.policies.policies)

    def enqueue(self, ino: int, path: str) -> None:
        """Look at an analysed file (`path`: where it is, or "<...>" when not known)."""
        if self.wanted and ino not in self._queued:
            self._queued.add(ino)
            self._send.send_nowait((ino, path))

    async def run(self) -> None:
        try:
            backlog = await trio.to_thread.run_sync(self._backlog)
        except Exception:
            log.exception("listing the previews to make failed; only new images get one")
            backlog = []
        if self.made:
            self.on_made()
        for ino, path in backlog:
            self.enqueue(ino, path)
        while True:
            ino, path = await self._recv.receive()
            self._queued.discard(ino)
            try:
                made = await trio.to_thread.run_sync(self._make, ino, path)
            except DamagedChunk as e:  # (the read-back, `verify` and reads say it too)
                log.error("cannot make the preview of %s: damaged data: %s", path, e)
                continue
            except Exception:  # (the next version, or the next mount, tries again)
                log.exception("making the preview of %s failed", path)
                continue
            if made:
                self.on_made()

    def _backlog(self) -> list[tuple[int, str]]:
        # (A reader with buffers: the records are read without copying their JPEGs.)
        with self.store.reader(buffers=True) as tx:
            for version, asked, made in tx.previews():
                self.asked[version] = asked
                if made:
                    self.made.add(version)
        if not self.wanted:
            return []
        with self.store.reader() as tx:
            return [(node.ino, path) for path, node in
                    ((p.decode(errors="surrogateescape"), n) for p, n in tx.walk())
                    if stat.S_ISREG(node.mode) and node.content
                    and self._asked(tx, path, node.content)]

    def _asked(self, tx: Txn, path: str, version: int) -> int | None:
        """The long side of the preview the version of the image at `path` should get and
        has not got (nor been found not to allow), or None."""
        record = tx.media(version)
        if record is None or record.get("kind") != "image":
            return None
        policy = self.policies.policy_for(tx, path, record)
        side = policy.preview if policy is not None else None
        if not side or not preview.wanted(record, side):
            return None
        return None if self.asked.get(version) == side else side

    def _make(self, ino: int, path: str) -> bool:
        """Make (or fail to make, and say why once) the preview of a file's current version:
        whether one was made."""
        data, why = None, None
        with self.store.reader() as tx:
            node = tx.inode(ino)
            if node is None or not node.content:
                return False
            if path.startswith("<"):
                path = tx.path_of(ino) or path
            side = self._asked(tx, path, node.content)
            if side is None:
                return False
            version = node.content
            if node.size > MAX_BYTES:
                why = f"larger than {MAX_BYTES >> 20} MiB: not read"
            else:
                try:
                    data = read_range(tx, self.cache, node, 0, node.size)
                except OfflineData:  # evicted: made when it is back (the next mount's backlog)
                    return False
        jpeg = None
        if data is not None:
            try:
                jpeg = self.decode(preview.proxy, data, side)
            except (preview.PreviewError, MemoryError, DecoderFailed) as e:
                why = str(e) or type(e).__name__
        if why is not None:
            log.warning("no preview can be made of %s: %s", path, why)
        self.store.write(lambda tx: tx.put_preview(version, F.Preview(side, jpeg, why)))
        self.asked[version] = side
        if jpeg is not None:
            self.made.add(version)
        return jpeg is not None
