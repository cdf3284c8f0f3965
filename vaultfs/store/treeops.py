"""Changing a tree by path, for what copies files in from elsewhere: a merge from another
branch (branches.py) and a sync from another vault (sync/). A file placed over a file becomes a
new version of it (its timeline goes on); contents are chunks already in the store, so placing
a file copies no bytes.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from . import format as F
from .txn import StoreError, Txn


@dataclass
class Item:
    """What to place at a path: an inode's attributes and, for a file, its extents
    ((offset, chunk id, length): chunks in this store)."""
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    atime_ns: int = 0
    rdev: int = 0
    target: bytes = b""
    size: int = 0
    extents: list[tuple[int, bytes, int]] = field(default_factory=list)
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)


def split(path: bytes) -> tuple[bytes, bytes]:
    parent, name = posixpath.split(path)
    return parent, name


def remove(tx: Txn, path: bytes, now: int) -> bool:
    """Remove what is at `path`; False (and nothing changed) if it is a folder that still holds
    something. Nothing there is success."""
    parent_path, name = split(path)
    parent = tx.resolve(parent_path)
    ino = tx.lookup(parent, name) if parent is not None else None
    node = tx.inode(ino) if ino is not None else None
    if node is None:
        return True
    if stat.S_ISDIR(node.mode) and tx.has_entries(ino):
        return False
    tx.remove_entry(parent, name)
    p = tx.inode(parent)
    if stat.S_ISDIR(node.mode):
        p.nlink -= 1
        node.nlink = 0
    else:
        node.nlink -= 1
    p.mtime_ns = p.ctime_ns = now
    tx.put_inode(p)
    tx.put_inode(node)
    if node.nlink == 0:
        tx.delete_inode(node)
    return True


def move(tx: Txn, path: bytes, new_name: bytes, now: int) -> None:
    """Rename what is at `path` to `new_name` in the same folder (it keeps its timeline)."""
    parent_path, name = split(path)
    parent = tx.resolve(parent_path)
    if parent is None or tx.lookup(parent, name) is None:
        raise StoreError(f"{path.decode(errors='replace')} is not there to rename")
    if tx.lookup(parent, new_name) is not None:
        raise StoreError(f"{new_name.decode(errors='replace')} exists already")
    tx.rename_entry(parent, name, new_name)
    p = tx.inode(parent)
    p.mtime_ns = p.ctime_ns = now
    tx.put_inode(p)


def make_dirs(tx: Txn, path: bytes, now: int, folder: Callable[[bytes], Item]) -> int:
    """The folder at `path`, made with its missing parents (`folder(path)` says how)."""
    ino = F.ROOT_INO
    walked = b""
    for part in filter(None, path.split(b"/")):
        walked = posixpath.join(walked, part)
        child = tx.lookup(ino, part)
        if child is None:
            child = _new_node(tx, ino, part, folder(walked), now).ino
        elif not stat.S_ISDIR(tx.inode(child).mode):
            raise StoreError(f"{walked.decode(errors='replace')} is a file on one side and a "
                             f"folder on the other; move one of them and try again")
        ino = child
    return ino


Chain = list[tuple[int, bytes, int]]  # (parent, name, inode) of each part of a path


def link_unnamed(tx: Txn, path: bytes, ino: int, now: int, folder: Callable[[bytes], Item],
                 exclusive: bool = False) -> tuple[Chain, int]:
    """Give the unnamed file `ino` (nlink 0, just committed) its first name: `path`, or, when
    that is taken, the first free `<stem>-N<ext>` (N = 2, 3, ...) beside it (`exclusive`:
    FileExistsError); nothing already in the tree is replaced. Returns the parts of the path
    it now has, and the index there of the first part that is new (a folder made, or it)."""
    node = tx.inode(ino)
    if node is None or node.nlink:
        raise StoreError(f"inode {ino} is not an unnamed file")
    parent, name, existing = _new_place(tx, path, now, folder)
    stem, ext = posixpath.splitext(name)
    n = 1
    while tx.lookup(parent, name) is not None:
        if exclusive:
            raise FileExistsError(path.decode(errors="replace"))
        n += 1
        name = stem + b"-%d" % n + ext
    node.nlink, node.ctime_ns = 1, now
    tx.put_inode(node)
    _enter(tx, parent, name, ino, now)
    return _chain(tx, split(path)[0], name), existing


def relocate(tx: Txn, path: bytes, new_path: bytes, ino: int, now: int,
             folder: Callable[[bytes], Item]) -> tuple[Chain, int, tuple[int, bytes]] | None:
    """Move the file `ino` from `path` to `new_path` (folders made as needed), if it is still
    at `path` and `new_path` is free; None otherwise. Returns the parts of its new path, the
    index there of the first new part, and the (parent, name) it left."""
    old_parent = tx.resolve(split(path)[0])
    old_name = split(path)[1]
    if old_parent is None or tx.lookup(old_parent, old_name) != ino or tx.resolve(new_path):
        return None
    parent, name, existing = _new_place(tx, new_path, now, folder)
    tx.remove_entry(old_parent, old_name)
    p = tx.inode(old_parent)
    p.mtime_ns = p.ctime_ns = now
    tx.put_inode(p)
    _enter(tx, parent, name, ino, now)
    node = tx.inode(ino)
    node.ctime_ns = now
    tx.put_inode(node)
    return _chain(tx, split(new_path)[0], name), existing, (old_parent, old_name)


def _new_place(tx: Txn, path: bytes, now: int, folder: Callable[[bytes], Item]
               ) -> tuple[int, bytes, int]:
    """The folder for `path` (made with its parents), the name in it, and how many of the
    path's folders were there before."""
    parent_path, name = split(path)
    at: int | None = F.ROOT_INO
    existing = 0
    for part in filter(None, parent_path.split(b"/")):
        at = tx.lookup(at, part)
        if at is None:
            break
        existing += 1
    return make_dirs(tx, parent_path, now, folder), name, existing


def _enter(tx: Txn, parent: int, name: bytes, ino: int, now: int) -> None:
    tx.add_entry(parent, name, ino)
    p = tx.inode(parent)
    p.mtime_ns = p.ctime_ns = now
    tx.put_inode(p)


def _chain(tx: Txn, parent_path: bytes, name: bytes) -> Chain:
    chain, at = [], F.ROOT_INO
    for part in [*filter(None, parent_path.split(b"/")), name]:
        child = tx.lookup(at, part)
        chain.append((at, part, child))
        at = child
    return chain


def place(tx: Txn, path: bytes, item: Item, now: int,
          folder: Callable[[bytes], Item]) -> F.Inode:
    """Make `path` hold `item`: a file there gets a new version, a folder its attributes;
    anything else there is replaced (a folder only when empty)."""
    parent_path, name = split(path)
    parent = make_dirs(tx, parent_path, now, folder)
    ino = tx.lookup(parent, name)
    node = tx.inode(ino) if ino is not None else None
    kind = stat.S_IFMT(item.mode)
    # A hard-linked file gets an inode of its own: its other names keep what they hold.
    if node is not None and not (stat.S_IFMT(node.mode) == kind and kind in (stat.S_IFREG,
                                                                             stat.S_IFDIR)) \
            or node is not None and kind == stat.S_IFREG and node.nlink > 1:
        if not remove(tx, path, now):
            raise StoreError(f"{path.decode(errors='replace')} is a folder with files in it on "
                             f"one side and a file on the other; move one of them and try again")
        node = None
    if node is None:
        node = _new_node(tx, parent, name, item, now)
    else:
        old = dict(tx.xattrs(node.ino))
        for key in old.keys() - {k for k, _ in item.xattrs}:
            tx.remove_xattr(node.ino, key)
        for key, value in item.xattrs:
            if old.get(key) != value:
                tx.set_xattr(node.ino, key, value)
    if kind == stat.S_IFREG:
        for _, chunk_id, _ in item.extents:
            tx.incref(chunk_id)  # the copy's own references: same chunks, no bytes copied
        tx.new_version(node, item.extents, item.size, item.mtime_ns, now)
    node.mode, node.ctime_ns = item.mode, now
    if kind != stat.S_IFDIR:
        node.mtime_ns = item.mtime_ns
    tx.put_inode(node)
    return node


def _new_node(tx: Txn, parent: int, name: bytes, item: Item, now: int) -> F.Inode:
    node = tx.new_inode(item.mode, item.uid, item.gid, now, item.rdev, item.target)
    node.atime_ns, node.mtime_ns = item.atime_ns or item.mtime_ns, item.mtime_ns
    node.nlink = 2 if stat.S_ISDIR(item.mode) else 1
    tx.put_inode(node)
    for key, value in item.xattrs:
        tx.set_xattr(node.ino, key, value)
    tx.add_entry(parent, name, node.ino)
    p = tx.inode(parent)
    if stat.S_ISDIR(item.mode):
        p.nlink += 1
    p.mtime_ns = p.ctime_ns = now
    tx.put_inode(p)
    return node
