"""The write spool: where a file's new bytes live between the first write and the commit.

A file that is being changed gets an anonymous spool file (O_TMPFILE in STORE/spool, on the
store's own disk), seeded with its committed content. Reads and writes of a changed file go to
the spool; a commit (ingest.py) chunks the spool into the store. Being anonymous, a spool
vanishes with the process: a crash leaves nothing half-applied, only the last commit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from ..store import Store
from ..store.reader import ChunkCache, iter_extents
from .ingest import FileIngest


@dataclass(eq=False)
class OpenInode:
    """In-memory state of an inode that has open handles or uncommitted changes."""

    ino: int
    opens: int = 0
    fd: int | None = None      # spool file, once the file has been changed
    size: int = 0              # size of the spooled content (valid while fd is set)
    dirty: bool = False        # spool differs from the committed content
    dirty_since: float = 0.0   # monotonic time of the first change not yet committed
    mtime_ns: int = 0
    ctime_ns: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Background ingest of a file written front to back (see ingest.py):
    ingest: FileIngest | None = None
    stream_ok: bool = False    # no byte below stream_end changed since ingest read it
    stream_end: int = 0        # end of what the ingest has read (committed or in the background)
    streaming: trio.Event | None = None  # set when the running background step ends

    def close_spool(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_spool(store: Store, cache: ChunkCache, ino: int, size: int) -> int:
    """A new spool file holding the first `size` bytes of the committed content of `ino`
    (blocking). Only those bytes are read: a file about to be truncated or overwritten
    (O_TRUNC) costs nothing to spool, even when its old content is damaged."""
    fd = _new_spool(store)
    if not size:
        return fd
    try:
        with store.reader() as tx:
            node = tx.inode(ino)
            for off, data in iter_extents(tx, cache, node, 0, size) if node else ():
                os.pwrite(fd, data[:size - off], off)
        os.ftruncate(fd, size)  # holes stay holes in the spool too
    except BaseException:
        os.close(fd)
        raise
    return fd


def empty_spool(store: Store, fd: int) -> None:
    """Empty a spool in place: a new anonymous file takes over the descriptor's number (a read
    running in a worker thread finishes on the old one, as it would after a truncation).
    Truncating to 0 would empty it too, but ext4 then writes all that the file holds to the
    disk when it is closed (its guard for files rewritten by truncating them; XFS does the same
    after a truncation down), and a spool's bytes only ever need to reach the store."""
    new = _new_spool(store)
    try:
        os.dup2(new, fd, inheritable=False)
    finally:
        os.close(new)


def _new_spool(store: Store) -> int:
    # (never truncated to 0, for the reason empty_spool gives)
    return os.open(store.spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
