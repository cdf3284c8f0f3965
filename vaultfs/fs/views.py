"""The read-only virtual tree under MOUNT/.vault.

    .vault/status.json                    live figures
    .vault/snapshots/<name>/...           each snapshot's frozen tree; `latest` links the newest
    .vault/versions/<path>/<time><ext>    every committed version of each live file

Virtual inode numbers have the top bit set, so they never meet the store's inode numbers,
which count up from 1. The rest of the number says what the node is, so nothing needs to be
remembered per node:

    bit 63 = 1 | kind (3 bits) | epoch (24 bits) | id (36 bits)

kind 0: the fixed nodes below; 1: inode `id` of the tree frozen at `epoch`; 2: the versions
view of live directory `id`; 3: the timeline directory of live file `id`; 4: version `id`;
5: live directory `id` seen through filter number `epoch` (a tier, a rating, a label, the
previews, or one burst: the numbers are handed out as a mount first shows each filter; a
burst's filter on the root is its folder, listing its files flat); 6: live file `id`,
read-only; 7: the preview of live file `id`.

    .vault/tiers/<tier>/<path>            live files by tier (catalog.py)
    .vault/rating/<0..5>/<path>           live images by star rating
    .vault/labels/<colour>/<path>         live images by colour label
    .vault/bursts/<group>/<name>          the files of each burst and bracket (groups.py), under
                                          names unique in the group (IMG_1.JPG, IMG_1~2.JPG)
    .vault/previews/<path>.jpg            each image's preview: the one generated for it by a
                                          capture policy (previews.py), else the JPEG inside it
                                          (its byte range, from the media index; a JPEG is its
                                          own preview)
"""

from __future__ import annotations

import contextlib
import errno
import json
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import pyfuse3
from pyfuse3 import FUSEError

from ..store import ROOT_INO, Inode, Store, StoreError, Txn
from ..media.metadata import LABELS
from ..store.history import version_name
from ..media.catalog import Catalog
from ..media.groups import SEQUENCES, Group
from ..store.reader import ChunkCache, read_range

VAULT_NAME = b".vault"
VIRTUAL = 1 << 63
KIND_SHIFT, EPOCH_SHIFT = 60, 36
ID_MASK = (1 << EPOCH_SHIFT) - 1
EPOCH_MASK = (1 << (KIND_SHIFT - EPOCH_SHIFT)) - 1
(FIXED, SNAPSHOT_NODE, VERSIONS_DIR, TIMELINE, VERSION_FILE, FILTER_DIR, FILTER_FILE,
 PREVIEW_FILE) = range(8)

VAULT_INO = VIRTUAL
STATUS_INO = VIRTUAL + 1
SNAPSHOTS_INO = VIRTUAL + 2
LATEST_INO = VIRTUAL + 3
TIERS_INO = VIRTUAL + 4
RATING_INO = VIRTUAL + 5
LABELS_INO = VIRTUAL + 6
BURSTS_INO = VIRTUAL + 7
LATEST = b"latest"
GROUPS = {TIERS_INO: "tier", RATING_INO: "rating", LABELS_INO: "label", BURSTS_INO: "burst"}
PREVIEWS = ("preview", "")  # the filter of .vault/previews
PREVIEW_EXT = b".jpg"

NAMES_KEPT = 100_000  # timeline names remembered (each costs ~100 bytes)
FROZEN_TIMEOUT = 300.0  # snapshots and versions never change
LIVE_TIMEOUT = 1.0      # views of the live tree follow it within a second
BLKSIZE = 128 * 1024


def encode(kind: int, ident: int, epoch: int = 0) -> int:
    if ident > ID_MASK or epoch > EPOCH_MASK:
        raise FUSEError(errno.EOVERFLOW)
    return VIRTUAL | kind << KIND_SHIFT | epoch << EPOCH_SHIFT | ident


def decode(ino: int) -> tuple[int, int, int]:
    """(kind, epoch, id) of a virtual inode number."""
    return (ino >> KIND_SHIFT) & 7, (ino >> EPOCH_SHIFT) & EPOCH_MASK, ino & ID_MASK


def inode_attrs(inode: Inode, st_ino: int, timeout: float) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = st_ino
    a.entry_timeout = a.attr_timeout = timeout
    a.st_mode, a.st_nlink = inode.mode, inode.nlink
    a.st_uid, a.st_gid, a.st_rdev = inode.uid, inode.gid, inode.rdev
    a.st_size, a.st_mtime_ns, a.st_ctime_ns = inode.size, inode.mtime_ns, inode.ctime_ns
    a.st_atime_ns = inode.atime_ns
    # Sparse files count only their data, as on ext4 (du, cp --sparse rely on it).
    a.st_blocks = (inode.data_bytes if stat.S_ISREG(inode.mode) else inode.size) + 511 >> 9
    a.st_blksize = BLKSIZE
    return a


class Views:
    def __init__(self, store: Store, cache: ChunkCache, status: Callable[[], dict],
                 uid: int, gid: int, catalog: Callable[[], Catalog], tier_names: list[str]):
        self.store = store
        self.cache = cache
        self._status = status
        self._uid, self._gid = uid, gid
        self._catalog = catalog
        self._tier_names = tier_names
        self._filters: list[tuple] = []  # filter number - 1 -> ("tier", name), ("rating", 3)...
        # The name each timeline was last seen under, for its versions' extensions (the store
        # keeps no parent links; a walk to find one is the fallback).
        self._names: OrderedDict[int, bytes] = OrderedDict()

    @staticmethod
    def owns(ino: int) -> bool:
        return ino >= VIRTUAL

    @contextlib.contextmanager
    def _tree(self, epoch: int | None, buffers: bool = False) -> Iterator[Txn]:
        """The tree at a snapshot's epoch (None: the live tree). A snapshot deleted while the
        kernel still knew its nodes has no epoch any more: its nodes are gone (ENOENT)."""
        try:
            with self.store.reader(buffers=buffers, epoch=epoch) as tx:
                yield tx
        except StoreError:
            raise FUSEError(errno.ENOENT) from None

    # ---- attributes ---------------------------------------------------------------------------
    def _fixed(self, ino: int, mode: int, size: int = 0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 0  # they change under the kernel's feet
        a.st_mode, a.st_nlink, a.st_size = mode, 2 if stat.S_ISDIR(mode) else 1, size
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        return a

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        kind, epoch, ident = decode(ino)
        if ino in (VAULT_INO, SNAPSHOTS_INO) or ino in GROUPS:
            return self._fixed(ino, stat.S_IFDIR | 0o555)
        if ino == STATUS_INO:
            return self._fixed(ino, stat.S_IFREG | 0o444, len(self.content(ino)))
        if ino == LATEST_INO:
            return self._fixed(ino, stat.S_IFLNK | 0o777, len(self._latest()))
        if kind == SNAPSHOT_NODE:
            with self._tree(epoch) as view:
                node = view.inode(ident)
            if node is None:
                raise FUSEError(errno.ENOENT)
            a = inode_attrs(node, ino, FROZEN_TIMEOUT)
            if ident == ROOT_INO:  # a snapshot's root: not writable even by its owner, and
                a.st_mode &= ~0o222  # looked up anew (the name may go, or come back as another)
                a.entry_timeout = a.attr_timeout = 0
            return a
        with self.store.reader(buffers=kind == PREVIEW_FILE) as tx:
            if kind in (VERSIONS_DIR, TIMELINE, FILTER_DIR):
                node = tx.inode(ident)
                if node is None:
                    raise FUSEError(errno.ENOENT)
                # A folder of versions: listable by whoever may read the file or folder.
                a = inode_attrs(node, ino, 0 if kind == FILTER_DIR else LIVE_TIMEOUT)
                read = node.mode & 0o444
                a.st_mode = stat.S_IFDIR | read | read >> 2
                a.st_nlink, a.st_size, a.st_blocks = 2, 0, 0
                return a
            if kind == FILTER_FILE:
                node = tx.inode(ident)
                if node is None or not stat.S_ISREG(node.mode):
                    raise FUSEError(errno.ENOENT)
                a = inode_attrs(node, ino, 0)  # a rating may move it at any moment
                a.st_mode &= ~0o222
                return a
            if kind == PREVIEW_FILE:
                node, _, _, length = self._preview(tx, ident)
                a = inode_attrs(node, ino, 0)  # a new version may move or drop it
                a.st_mode = stat.S_IFREG | (node.mode & 0o444)
                a.st_nlink, a.st_size, a.st_blocks = 1, length, (length + 511) >> 9
                return a
            if kind == VERSION_FILE:
                v = tx.version(ident)
                if v is None:
                    raise FUSEError(errno.ENOENT)
                node = tx.inode(v.origin)
                a = self._fixed(ino, stat.S_IFREG | 0o444, v.size)
                a.entry_timeout = a.attr_timeout = FROZEN_TIMEOUT
                a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = v.mtime_ns
                a.st_blocks = (v.data_bytes + 511) >> 9
                if node is not None:  # the file's owner and read bits, as it has them now
                    a.st_mode = stat.S_IFREG | (node.mode & 0o444)
                    a.st_uid, a.st_gid = node.uid, node.gid
                return a
        raise FUSEError(errno.ENOENT)

    # ---- names ----------------------------------------------------------------------------------
    def find(self, parent: int, name: bytes) -> int:
        """The child's inode number (a point lookup where the kind allows it)."""
        kind, epoch, ident = decode(parent)
        if kind == SNAPSHOT_NODE:
            with self._tree(epoch) as view:
                child = view.lookup(ident, name)
            if child is None:
                raise FUSEError(errno.ENOENT)
            return encode(SNAPSHOT_NODE, child, epoch)
        if kind == VERSIONS_DIR:
            with self.store.reader() as tx:
                child = tx.lookup(ident, name)
                node = tx.inode(child) if child is not None else None
            if node is not None and stat.S_ISDIR(node.mode):
                return encode(VERSIONS_DIR, child)
            if node is not None and stat.S_ISREG(node.mode):
                self._name(child, name)
                return encode(TIMELINE, child)
            raise FUSEError(errno.ENOENT)
        if kind == FILTER_DIR:
            key = self._filter(epoch)
            if key[0] == "burst":
                group = self._sequence(key[1])
                for member, ino in zip(group.names(), group.keys):
                    if member.encode(errors="surrogateescape") == name:
                        return encode(FILTER_FILE, ino)
                raise FUSEError(errno.ENOENT)
            cat = self._catalog()
            with self.store.reader() as tx:
                child = tx.lookup(ident, name)
                if child is not None and child in cat.folders.get(key, ()):
                    return encode(FILTER_DIR, child, epoch)
                if key == PREVIEWS:  # IMG_1.NEF.jpg: the preview of IMG_1.NEF
                    child = tx.lookup(ident, name[:-len(PREVIEW_EXT)]) \
                        if name.endswith(PREVIEW_EXT) else None
            if child is not None and child in cat.members.get(key, ()):
                return encode(PREVIEW_FILE if key == PREVIEWS else FILTER_FILE, child)
            raise FUSEError(errno.ENOENT)
        for _, child_name, ino in self.entries(parent, 0):
            if child_name == name:
                return ino
        raise FUSEError(errno.ENOENT)

    def _name(self, ino: int, name: bytes) -> None:
        self._names[ino] = name
        self._names.move_to_end(ino)
        if len(self._names) > NAMES_KEPT:
            self._names.popitem(last=False)

    def _filter_number(self, key: tuple) -> int:
        if key not in self._filters:
            self._filters.append(key)
        return self._filters.index(key) + 1

    def _filter(self, number: int) -> tuple:
        if not 0 < number <= len(self._filters):
            raise FUSEError(errno.ENOENT)  # a number from before a remount
        return self._filters[number - 1]

    def _sequence(self, name: str) -> Group:
        """The burst or bracket of that name now (gone, or renamed: ENOENT)."""
        for g in self._catalog().groups:
            if g.name == name and g.kind in SEQUENCES:
                return g
        raise FUSEError(errno.ENOENT)

    @staticmethod
    def _preview(tx: Txn, ino: int) -> tuple[Inode, memoryview | bytes | None, int, int]:
        """A live file and its current version's preview: the one generated for it (fs/
        previews.py: its JPEG, 0, its length), else the byte range of the JPEG inside it
        (None, offset, length)."""
        node = tx.inode(ino)
        made = tx.preview(node.content) if node is not None else None
        if made is not None and made.jpeg is not None:
            return node, made.jpeg, 0, len(made.jpeg)
        record = tx.media(node.content) if node is not None else None
        span = record.get("preview") if record else None
        if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0]
                and 0 < span[1] <= node.size - span[0]):
            raise FUSEError(errno.ENOENT)
        return node, None, span[0], span[1]

    def entries(self, parent: int, start: int) -> Iterator[tuple[int, bytes, int]]:
        """(offset of the next entry, name, inode) of a directory's entries after `start`
        (offsets start at 3: the caller lists ".", ".." itself)."""
        kind, epoch, ident = decode(parent)
        key = self._filter(epoch) if kind == FILTER_DIR else None
        if kind == FILTER_DIR and key[0] != "burst":
            cat = self._catalog()
            folders, members = cat.folders.get(key, set()), cat.members.get(key, set())
            with self.store.reader() as tx:
                for entry_id, name, child in tx.entries(ident, max(start - 2, 1)):
                    if child in folders:
                        yield entry_id + 3, name, encode(FILTER_DIR, child, epoch)
                    elif child in members and key != PREVIEWS:
                        yield entry_id + 3, name, encode(FILTER_FILE, child)
                    elif child in members and len(name) + len(PREVIEW_EXT) <= 255:
                        yield entry_id + 3, name + PREVIEW_EXT, encode(PREVIEW_FILE, child)
            return
        if kind == SNAPSHOT_NODE or kind == VERSIONS_DIR:
            reader = self._tree(epoch if kind == SNAPSHOT_NODE else None)
            with reader as tx:
                node = tx.inode(ident)
                if node is None or not stat.S_ISDIR(node.mode):
                    raise FUSEError(errno.ENOTDIR)
                for entry_id, name, child in tx.entries(ident, max(start - 2, 1)):
                    if kind == SNAPSHOT_NODE:
                        yield entry_id + 3, name, encode(SNAPSHOT_NODE, child, epoch)
                        continue
                    mode = tx.inode(child).mode
                    if stat.S_ISDIR(mode):
                        yield entry_id + 3, name, encode(VERSIONS_DIR, child)
                    elif stat.S_ISREG(mode):
                        self._name(child, name)
                        yield entry_id + 3, name, encode(TIMELINE, child)
            return
        if parent == VAULT_INO:
            fixed = [(b"bursts", BURSTS_INO), (b"labels", LABELS_INO),
                     (b"previews", encode(FILTER_DIR, ROOT_INO, self._filter_number(PREVIEWS))),
                     (b"rating", RATING_INO), (b"snapshots", SNAPSHOTS_INO),
                     (b"status.json", STATUS_INO), (b"tiers", TIERS_INO),
                     (b"versions", encode(VERSIONS_DIR, ROOT_INO))]
        elif kind == FILTER_DIR:  # a burst's folder
            group = self._sequence(key[1])
            fixed = [(member.encode(errors="surrogateescape"), encode(FILTER_FILE, ino))
                     for member, ino in zip(group.names(), group.keys)]
        elif parent in GROUPS:
            group = GROUPS[parent]
            if group == "tier":
                values: list = list(self._tier_names)
            elif group == "burst":
                values = [g.name for g in self._catalog().groups if g.kind in SEQUENCES]
            elif group == "rating":
                values = list(range(6))
            else:  # the usual five, then any other label the catalogue has
                seen = {k[1] for k in self._catalog().members if k[0] == "label"
                        and k[1] not in (".", "..") and "/" not in k[1] and "\0" not in k[1]}
                values = list(LABELS) + sorted(seen - set(LABELS))
            fixed = [(str(v).encode(errors="surrogateescape"),
                      encode(FILTER_DIR, ROOT_INO, self._filter_number((group, v))))
                     for v in values]
        elif parent == SNAPSHOTS_INO:
            with self.store.reader() as tx:
                fixed = [(name, encode(SNAPSHOT_NODE, ROOT_INO, epoch))
                         for name, epoch, _, _ in tx.snapshots()]
            if fixed:
                fixed.append((LATEST, LATEST_INO))
        elif kind == TIMELINE:
            with self.store.reader() as tx:
                name = self._names.get(ident) or self._name_of(tx, ident)
                fixed = [(version_name(v, name), encode(VERSION_FILE, v.version))
                         for v in tx.versions(ident)]
        else:
            raise FUSEError(errno.ENOTDIR)
        for i, (name, ino) in enumerate(fixed[max(start - 3, 0):], max(start, 3)):
            yield i + 1, name, ino

    def parent_of(self, ino: int) -> int | None:
        """The parent of the view directories whose parent is known without a lookup."""
        if ino in (SNAPSHOTS_INO, encode(VERSIONS_DIR, ROOT_INO)) or ino in GROUPS:
            return VAULT_INO
        kind, epoch, ident = decode(ino)
        if kind == SNAPSHOT_NODE and ident == ROOT_INO:
            return SNAPSHOTS_INO
        if kind == FILTER_DIR and ident == ROOT_INO:
            group = {v: k for k, v in GROUPS.items()}
            return group.get(self._filter(epoch)[0], VAULT_INO)  # (previews: in .vault)
        return None

    @staticmethod
    def _name_of(tx, ino: int) -> bytes:
        path = tx.path_of(ino) or ""
        return path.rsplit("/", 1)[-1].encode(errors="surrogateescape")

    def _latest(self) -> bytes:
        with self.store.reader() as tx:
            snaps = sorted(tx.snapshots(), key=lambda s: (s[2], s[0]))
        return snaps[-1][0] if snaps else b""

    # ---- contents -------------------------------------------------------------------------------
    def content(self, ino: int) -> bytes:
        """The whole content of a small generated file (read at open)."""
        if ino == STATUS_INO:
            return (json.dumps(self._status(), indent=2, sort_keys=True) + "\n").encode()
        raise FUSEError(errno.EISDIR)

    def is_generated(self, ino: int) -> bool:
        return ino == STATUS_INO

    def read(self, ino: int, off: int, size: int) -> bytes:
        """Bytes of a snapshot's file, a version, a live file seen through a filter, or a
        preview (blocking: runs in a worker thread)."""
        kind, epoch, ident = decode(ino)
        if kind == PREVIEW_FILE:
            with self._tree(None, buffers=True) as tx:
                node, made, begin, length = self._preview(tx, ident)
                if off >= length:
                    return b""
                if made is not None:
                    return bytes(made[off:off + size])
                return read_range(tx, self.cache, node, begin + off, min(size, length - off))
        if kind not in (SNAPSHOT_NODE, VERSION_FILE, FILTER_FILE):
            raise FUSEError(errno.EISDIR)
        with self._tree(epoch if kind == SNAPSHOT_NODE else None, buffers=True) as tx:
            node = tx.version(ident) if kind == VERSION_FILE else tx.inode(ident)
            if node is None:
                raise FUSEError(errno.ENOENT)
            return read_range(tx, self.cache, node, off, size)

    def readlink(self, ino: int) -> bytes:
        if ino == LATEST_INO:
            return self._latest()
        kind, epoch, ident = decode(ino)
        if kind == SNAPSHOT_NODE:
            with self._tree(epoch) as tx:
                node = tx.inode(ident)
            if node is not None and stat.S_ISLNK(node.mode):
                return node.target
        raise FUSEError(errno.EINVAL)

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The extended attributes (ACLs included) of a snapshot's node or of a live file seen
        in a filtered view: cp -a and rsync -X copy them out. Other views have none."""
        kind, epoch, ident = decode(ino)
        if kind not in (SNAPSHOT_NODE, FILTER_FILE):
            return []
        with self._tree(epoch if kind == SNAPSHOT_NODE else None) as tx:
            return list(tx.xattrs(ident))
