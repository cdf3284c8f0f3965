"""Writing a tree (a snapshot, a branch) or part of it out to a plain folder.

Each file is written to a temporary name beside its place, every chunk checked against both its
digests on the way, then renamed into place with its mode, owner (when allowed), xattrs and
times; directories get their times once their contents are in. An existing file newer than the
one restored is kept unless the caller says to overwrite.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import history
from .codec import ChunkCorrupt, confirm_digest
from .format import Inode
from .reader import ChunkCache, ChunkOffline
from .store import Store
from .txn import StoreError


@dataclass
class Plan:
    epoch: int
    items: list[tuple[bytes, Inode]] = field(default_factory=list)  # relative path, inode
    bytes: int = 0


def plan(store: Store, tree: str, path: str) -> Plan:
    """What restoring `path` of `tree` writes: a file, or a directory's contents."""
    with store.reader() as tx:
        epoch = history.tree_epoch(tx, tree)
    p = Plan(epoch)
    with store.reader(epoch=epoch) as tx:
        ino = tx.resolve(path)
        node = tx.inode(ino) if ino is not None else None
        if node is None:
            raise StoreError(f"{tree} has no {path}")
        if stat.S_ISDIR(node.mode):
            p.items = list(tx.walk(ino))
        else:
            p.items = [(path.rstrip("/").rsplit("/", 1)[-1].encode(errors="surrogateescape"),
                        node)]
    p.bytes = sum(n.size for _, n in p.items if stat.S_ISREG(n.mode))
    return p


def run(store: Store, p: Plan, dest: Path, *, overwrite: bool = False,
        progress: Callable[[int], None] | None = None) -> dict:
    """Carry out a plan into `dest` (created if missing). Returns what was done: files and
    bytes written, newer files kept, and failures by path (the rest goes on)."""
    dest.mkdir(parents=True, exist_ok=True)
    report = {"files": 0, "bytes": 0, "skipped_newer": [], "failed": {}}
    cache = ChunkCache()
    linked: dict[int, Path] = {}  # hard links: the first path each inode was written to
    dirs: list[tuple[Path, Inode]] = []
    with store.reader(epoch=p.epoch) as tx:
        for rel, node in p.items:
            target = dest / os.fsdecode(rel)
            shown = os.fsdecode(rel)
            try:
                if stat.S_ISDIR(node.mode):
                    target.mkdir(exist_ok=True)
                    _xattrs(target, tx.xattrs(node.ino))
                    dirs.append((target, node))
                    continue
                if _keep_existing(target, node, overwrite):
                    report["skipped_newer"].append(shown)
                    continue
                if node.ino in linked and node.nlink > 1:
                    _replace(target, lambda tmp: os.link(linked[node.ino], tmp))
                    continue
                if stat.S_ISREG(node.mode):
                    _replace(target, lambda tmp: _write_file(tx, cache, node, tmp, progress))
                    report["bytes"] += node.size
                elif stat.S_ISLNK(node.mode):
                    _replace(target, lambda tmp: os.symlink(node.target, tmp))
                else:
                    _replace(target, lambda tmp: os.mknod(tmp, node.mode, node.rdev))
                _finish(target, node, tx.xattrs(node.ino))
                linked[node.ino] = target
                report["files"] += 1
            except (OSError, StoreError) as e:
                report["failed"][shown] = getattr(e, "strerror", None) or str(e)
    for target, node in reversed(dirs):  # after their contents, which change their mtime
        try:
            _finish(target, node, ())
        except OSError as e:
            report["failed"][str(target)] = e.strerror
    return report


def _keep_existing(target: Path, node: Inode, overwrite: bool) -> bool:
    try:
        st = target.lstat()
    except FileNotFoundError:
        return False
    return not overwrite and st.st_mtime_ns > node.mtime_ns


def _replace(target: Path, make: Callable[[Path], None]) -> None:
    """Make the new file under a temporary name beside `target`, then rename it into place:
    an interrupted restore never leaves a half-written file under the real name."""
    tmp = target.with_name(f".{target.name}.vaultfs-restore")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        make(tmp)
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_file(tx, cache: ChunkCache, node: Inode, tmp: Path,
                progress: Callable[[int], None] | None) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for off, chunk_id, length in tx.extents(node.content):
            try:
                data = cache.get(tx, chunk_id)  # checked against its xxh3 digest
            except ChunkCorrupt as e:
                raise StoreError(f"bytes {off}-{off + length - 1}: {e}") from None
            except ChunkOffline:
                raise StoreError(f"bytes {off}-{off + length - 1} are offline (evicted; a "
                                 f"peer holds them): `vaultfs fetch` them first") from None
            if confirm_digest(data) != tx.chunk_record(chunk_id).blake3:
                raise StoreError(f"bytes {off}-{off + length - 1} do not match their "
                                 f"BLAKE3 digest")
            os.pwrite(fd, data, off)
            if progress:
                progress(len(data))
        os.ftruncate(fd, node.size)  # holes stay holes
        os.fsync(fd)
    finally:
        os.close(fd)


def _xattrs(target: Path, attrs) -> None:
    for name, value in attrs:
        try:
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _finish(target: Path, node: Inode, attrs) -> None:
    if os.geteuid() == 0:
        os.chown(target, node.uid, node.gid, follow_symlinks=False)
    if not stat.S_ISLNK(node.mode):
        os.chmod(target, stat.S_IMODE(node.mode))
    _xattrs(target, attrs)
    os.utime(target, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)
