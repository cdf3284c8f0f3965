"""Committing a file read from outside the mount (a camera card) into the live tree, by the same
ingest as a file written through the mount, but read straight from its source: no FUSE round
trips, no spool copy, one read of the card.

The file appears at its path complete or not at all: its content is committed to an inode that
has no name yet (nlink 0, as a file unlinked while open), and only then linked in. A read error
half-way (a failing card) releases what was stored and drops the inode; a crash in between
leaves an unnamed inode that the next mount's recovery frees (store.Store._recover).

Everything here blocks: it runs in a worker thread, never on the trio loop.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

from ..store import Store
from ..store import treeops
from .ingest import FileIngest

FILE_MODE = 0o644
FOLDER_MODE = 0o755
READ_STEP = 8 << 20  # bytes of the card read and ingested at a time
# The daemon's umask, read once while it starts (reading it means setting it, for the process).
_UMASK = os.umask(0)
os.umask(_UMASK)


def import_file(store: Store, fd: int, size: int, mtime_ns: int, dest: bytes,
                exclusive: bool = False) -> tuple[int, treeops.Chain, int]:
    """Commit the first `size` bytes of the open file `fd` as a new file at `dest` (relative to
    the root; a free `-N` name beside it when taken, or with `exclusive` FileExistsError).
    Returns the new inode, the (parent, name, inode) of each part of the path it got, and the
    index there of the first new part."""
    uid, gid, umask = os.getuid(), os.getgid(), _UMASK
    now = time.time_ns()
    node = store.write(lambda tx: tx.new_inode(stat.S_IFREG | FILE_MODE & ~umask, uid, gid, now))
    ingest = FileIngest(store, node.ino)
    try:
        try:
            # In steps, as a file written through the mount is ingested while it grows: memory
            # stays bounded by the step, whatever the file's size.
            for end in range(READ_STEP, size, READ_STEP):
                ingest.advance(fd, end, final=False)
            ingest.commit(fd, size, mtime_ns, now)
        except BaseException:
            ingest.abandon()
            raise

        chain, new = store.write(
            lambda tx: treeops.link_unnamed(tx, dest, node.ino, now, new_folder, exclusive))
    except BaseException:
        def drop(tx) -> None:
            unnamed = tx.inode(node.ino)
            if unnamed is not None and unnamed.nlink == 0:
                tx.delete_inode(unnamed)
        with contextlib.suppress(Exception):  # else the next mount's recovery frees it
            store.write(drop)
        raise
    return node.ino, chain, new


def new_folder(_: bytes) -> treeops.Item:
    """How a folder that an import or a capture policy needs is made: as `mkdir` would."""
    now = time.time_ns()
    return treeops.Item(stat.S_IFDIR | FOLDER_MODE & ~_UMASK, now, os.getuid(), os.getgid())
