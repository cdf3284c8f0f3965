"""POSIX ACLs, kept as the system.posix_acl_access and _default xattrs (the kernel enforces them
when the mount sets enable_acl): the mode and the ACL must stay in step, and new entries take
their directory's default ACL, as on ext4. One difference remains: the kernel applies the umask
before vaultfs sees the mode (pyfuse3 cannot ask for FUSE_DONT_MASK), where ext4 ignores the
umask under a default ACL."""

from __future__ import annotations

import errno
from collections.abc import Callable

from pyfuse3 import FUSEError

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = \
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _acl_entries(value: bytes) -> list[list[int]]:
    """(tag, perm, id) of a system.posix_acl_* value (version 2, 8-byte entries)."""
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        raise FUSEError(errno.EINVAL)
    return [[int.from_bytes(value[i:i + 2], "little"), int.from_bytes(value[i + 2:i + 4],
             "little"), int.from_bytes(value[i + 4:i + 8], "little")]
            for i in range(4, len(value), 8)]


def _mode_entries(entries: list[list[int]]) -> list[tuple[list[int], int]]:
    """The entries that stand for the mode's owner, group and other bits, with their shift:
    the owning user, the mask (or the owning group when there is no mask) and others."""
    group = _ACL_MASK if any(tag == _ACL_MASK for tag, _, _ in entries) else _ACL_GROUP_OBJ
    shifts = {_ACL_USER_OBJ: 6, group: 3, _ACL_OTHER: 0}
    return [(e, shifts[e[0]]) for e in entries if e[0] in shifts]


def acl_mode(value: bytes) -> tuple[int, bool]:
    """The permission bits an access ACL implies, and whether the mode says it all."""
    entries = _acl_entries(value)
    bits = sum((e[1] & 7) << shift for e, shift in _mode_entries(entries))
    return bits, {tag for tag, _, _ in entries} <= {_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER}


def acl_chmod(value: bytes, mode: int) -> bytes:
    """An access ACL after chmod: owner, mask (else owning group) and other follow the mode."""
    entries = _acl_entries(value)
    for e, shift in _mode_entries(entries):
        e[1] = mode >> shift & 7
    return _pack(entries)


def _pack(entries: list[list[int]]) -> bytes:
    return (2).to_bytes(4, "little") + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
        for t, p, i in entries)


def acl_inherit(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """A new entry in a directory with a default ACL (posix_acl_create): its access ACL is the
    default ACL limited by the requested mode, and its mode follows that ACL. Returns the new
    mode and the access ACL, or None when the mode says it all."""
    entries = _acl_entries(default)
    for e, shift in _mode_entries(entries):
        e[1] &= mode >> shift & 7
    access = _pack(entries)
    bits, plain = acl_mode(access)
    return mode & ~0o777 | bits, None if plain else access


def permits(mode: int, owner: int, group: int, acl: bytes | None, uid: int, gids: set[int],
            want: int) -> bool:
    """Whether the user `uid` (of the groups `gids`) may open a file of this mode, owner,
    group and access ACL for `want` (4 read, 2 write, or both): POSIX.1e's check, as the kernel
    makes it (root may read and write anything). For the one open the kernel cannot check: a
    create of a name it believed free."""
    if uid == 0:
        return True
    entries = _acl_entries(acl) if acl is not None else [
        [_ACL_USER_OBJ, mode >> 6 & 7, 0], [_ACL_GROUP_OBJ, mode >> 3 & 7, 0],
        [_ACL_OTHER, mode & 7, 0]]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 7)

    def of(match: Callable[[int, int], bool], masked: bool = False) -> list[int]:
        return [perm & mask if masked else perm for tag, perm, who in entries if match(tag, who)]

    # The first class that names the user decides: owner, a named user, its groups (any of
    # them granting), others.
    granted = of(lambda tag, _: tag == _ACL_USER_OBJ) if uid == owner else \
        of(lambda tag, who: tag == _ACL_USER and who == uid, masked=True) or \
        of(lambda tag, who: tag == _ACL_GROUP_OBJ and group in gids or
           tag == _ACL_GROUP and who in gids, masked=True) or \
        of(lambda tag, _: tag == _ACL_OTHER)
    return any(perm & want == want for perm in granted)

def groups_of(pid: int, gid: int) -> set[int]:
    """The groups of the process `pid` (its supplementary groups and `gid`, its own)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((ln for ln in f if ln.startswith("Groups:")), "Groups:")
    except OSError:  # (gone already)
        line = "Groups:"
    return {gid, *map(int, line.split()[1:])}
