"""The read-only virtual tree under MOUNT/.vault (only status.json so far).

Virtual inode numbers live above 2**63, so they can never meet the store's inode numbers,
which count up from 1.
"""

from __future__ import annotations

import errno
import json
import stat
import time
from collections.abc import Callable

import pyfuse3

VAULT_NAME = b".vault"
VIRTUAL_BASE = 1 << 63
VAULT_INO = VIRTUAL_BASE
STATUS_INO = VIRTUAL_BASE + 1


class Views:
    def __init__(self, status: Callable[[], dict], uid: int, gid: int):
        self._status = status
        self._uid, self._gid = uid, gid
        self._children = {VAULT_INO: {b"status.json": STATUS_INO}}
        self._files = {STATUS_INO: self._status_json}

    @staticmethod
    def owns(ino: int) -> bool:
        return ino >= VIRTUAL_BASE

    def _status_json(self) -> bytes:
        return (json.dumps(self._status(), indent=2, sort_keys=True) + "\n").encode()

    def content(self, ino: int) -> bytes:
        if ino not in self._files:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return self._files[ino]()

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        # Views change under the kernel's feet: never let it cache them.
        a.entry_timeout = a.attr_timeout = 0
        if ino in self._children:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
        elif ino in self._files:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o444, 1
            a.st_size = len(self.content(ino))
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        return a

    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        ino = self._children.get(parent, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(ino)

    def entries(self, parent: int) -> list[tuple[bytes, int]]:
        if parent not in self._children:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return sorted(self._children[parent].items())
