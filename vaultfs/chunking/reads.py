"""Reading a file's bytes at an offset, whole: pread(2) may return fewer bytes than asked
without an error (a failing card returns the bytes before a bad block, a FUSE or network file
system returns what it has), so a short read is only the end of the file once a read returns
nothing. Every reader of files outside the store goes through here: a short read is never
taken for data."""

from __future__ import annotations

import os


def read_at(fd: int, length: int, offset: int) -> bytes:
    """The `length` bytes of the open file `fd` from `offset`, or fewer only where the file
    ends. A read error is raised with the errno it had and the byte where reading failed."""
    parts: list[bytes] = []
    got = 0
    while got < length:
        try:
            data = os.pread(fd, length - got, offset + got)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} at byte {offset + got:,}") from None
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
