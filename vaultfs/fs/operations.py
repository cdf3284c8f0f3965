"""The pyfuse3 Operations of the live tree: POSIX calls translated into store transactions.

Metadata calls are one write transaction each, run by the store's writer thread (which batches
concurrent ones into one synced commit). File data goes to a spool file on first change and is
committed to the store at flush (close), fsync and last release. Everything that blocks (chunk
reads, commits) runs in bounded worker threads; the trio loop only waits.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TypeVar

import lmdb
import pyfuse3
import trio
import xxhash
from pyfuse3 import FUSEError

from ..store import ROOT_INO, Inode, Store, Txn
from ..store.reader import ChunkCache, DamagedChunk, OfflineData, read_range
from .acl import ACL_ACCESS, ACL_DEFAULT, acl_chmod, acl_inherit, acl_mode, groups_of, permits
from . import importfile
from .capture import CapturePolicies
from .ingest import FileIngest, commit_spool
from .spool import OpenInode, empty_spool, open_spool
from ..media.tiers import Tiers
from ..store import policy
from .analysis import Analyzer
from .previews import Previews
from ..media.catalog import Catalog
from ..media.groups import SEQUENCES, Group, GroupIndex
from ..media.catalog import build as build_catalog
from ..store.verify import checked_chunk
from .events import Events
from .mirror import Mirror, figures as copies_figures
from .views import PREVIEWS, VAULT_INO, VAULT_NAME, Views, inode_attrs

log = logging.getLogger(__name__)

T = TypeVar("T")
NAME_MAX = 255
# All changes to the live tree pass through this process, so the kernel may cache what it
# learns for long; views set their own timeouts (zero).
CACHE_TIMEOUT = 300.0
# Ingest a file being written front to back once this much is new, so that close() has only
# the tail left to store.
STREAM_STEP = 8 * 1024 * 1024
CATALOG_REFRESH_S = 0.5
CAPTURE_CHECK_S = 0.25  # how often captures are looked at for their policy


def handler(fn):
    """Turn every failure of a handler into an errno: an exception escaping a handler would end
    pyfuse3's main loop and with it the mount."""

    @functools.wraps(fn)
    async def wrapper(self: "VaultOperations", *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except DamagedChunk as e:
            log.error("damaged data in %s: %s", self.path_of(e.ino), e)
            raise FUSEError(errno.EIO) from None
        except OfflineData as e:  # "Object is remote": `vaultfs fetch` brings it back
            log.warning("%s is offline (evicted, held by a peer): %s", self.path_of(e.ino), e)
            raise FUSEError(errno.EREMOTE) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                log.warning("%s: %s", fn.__name__, e)
            else:
                log.exception("%s failed", fn.__name__)
            raise FUSEError(e.errno or errno.EIO) from None
        except lmdb.Error as e:
            if "No space" in str(e) or isinstance(e, lmdb.MapFullError):
                log.error("%s: the store's disk is full", fn.__name__)
                raise FUSEError(errno.ENOSPC) from None
            log.exception("%s failed in the store", fn.__name__)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


async def wait_future(fut: "Future[T]") -> T:
    """Wait on a concurrent.futures.Future without blocking the trio loop."""
    if not fut.done():
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
        await done.wait()
    return fut.result()


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)


class VaultOperations(pyfuse3.Operations):
    # No writeback cache: with it the kernel holds a file's pages until close() and sends them
    # all at once, so nothing can be ingested while the file is written; without it, close()
    # finds most of a camera file already stored (measured: 153 -> 209 MB/s for 25 MB files).
    enable_writeback_cache = False
    enable_acl = True              # POSIX ACLs are kept as system.posix_acl_* xattrs
    supports_dot_lookup = False

    def __init__(self, store: Store, *, vault_visible: bool = False, workers: int = 4,
                 rules: Tiers | None = None):
        super().__init__()
        self.store = store
        self.vault_visible = vault_visible
        self.cache = ChunkCache()
        self.rules = rules or Tiers(list(policy.DEFAULT_TIERS))
        self._catalog: tuple[int, Catalog] | None = None  # (the txn id it was built at, it)
        self._catalog_lock = threading.Lock()
        self._catalog_wanted = False  # catalog() was called since the last rebuild
        self._catalog_s = 0.0  # how long the last rebuild took
        self.groups = GroupIndex()  # kept up to date with each rebuild (under its lock)
        self._joined: list[tuple[str, Group]] = []  # files that joined a burst or bracket
        self._fingerprinted: set[int] = set()  # files this mount fingerprinted
        # Tiers for `tiered` events: each file's (path, tier) as last announced or known, the
        # files this mount analysed before its first catalogue, and what to announce.
        self._tiers: dict[int, tuple[str, str]] = {}
        self._left: dict[str, str] = {}  # path -> tier of a file gone from it (saved over?)
        self._analysed_early: set[int] = set()
        self._retiered: list[tuple[str, str, str | None]] = []
        self.analyzer: Analyzer | None = None  # set by mount.run
        self.previews: Previews | None = None  # set by mount.run
        self.mirror: Mirror | None = None  # set by mount.run when the vault has a mirror
        self.views = Views(store, self.cache, self.status, os.getuid(), os.getgid(),
                           self.catalog, self.rules.names)
        self._limiter = trio.CapacityLimiter(workers)
        self._lookups: Counter[int] = Counter()
        self._open: dict[int, OpenInode] = {}
        self._handles: dict[int, int] = {}        # fh -> ino
        self._parents: dict[int, int] = {VAULT_INO: ROOT_INO}  # directory ino -> parent ino
        self._names: dict[int, tuple[int, bytes]] = {}  # ino -> (parent, name) it was seen by
        self.events = Events()
        self._verified: dict[int, int] = {}  # ino -> its version last read back and matched
        self._failed: set[int] = set()       # inodes whose last commit failed
        self._checked: dict[int, set[bytes]] = {}  # ino -> chunks of it read back and matched
        self.stopping = threading.Event()    # set when the mount ends: long work stops
        self._view_data: dict[int, bytes] = {}    # fh -> content of an open view file
        self._next_fh = 1
        self.nursery: trio.Nursery | None = None  # for background ingest; set by mount.run
        self.changed = False  # the tree changed since the last automatic snapshot
        self.capture: CapturePolicies | None = None  # set by mount.run when vault.toml has some

    # ---- helpers ------------------------------------------------------------------------------
    async def _write(self, fn: Callable[[Txn], T]) -> T:
        self.changed = True
        return await wait_future(self.store.writer.submit(fn))

    async def _thread(self, fn: Callable[..., T], *args) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _inode(self, tx: Txn, ino: int) -> Inode:
        inode = tx.inode(ino)
        if inode is None:
            raise FUSEError(errno.ENOENT)
        return inode

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = inode_attrs(inode, inode.ino, CACHE_TIMEOUT)
        of = self._open.get(inode.ino)
        if of is not None and of.fd is not None:  # changed, not yet committed
            a.st_size, a.st_mtime_ns, a.st_ctime_ns = of.size, of.mtime_ns, of.ctime_ns
            a.st_blocks = os.fstat(of.fd).st_blocks
        return a

    def _get_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        if self.views.owns(ino):
            return self.views.attrs(ino)
        with self.store.reader() as tx:
            return self._attrs(self._inode(tx, ino))

    def _new_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _remember(self, ino: int, mode: int, parent: int, name: bytes | None = None) -> None:
        """The kernel took a reference on `ino` (a lookup); note a directory's parent for
        its ".." entry (directories have one parent, and the store keeps no parent links),
        and the name it was reached by, for the paths of events."""
        self._lookups[ino] += 1
        if stat.S_ISDIR(mode):
            self._parents[ino] = parent
        if name is not None and not self.views.owns(ino):
            self._names[ino] = (parent, name)

    def event_path(self, ino: int) -> str:
        """The path (relative to the mount's root) an inode was last reached by."""
        parts: list[bytes] = []
        while ino != ROOT_INO and len(parts) < 4096:
            known = self._names.get(ino)
            if known is None:
                return f"<inode {ino}>"
            ino, name = known
            parts.append(name)
        return b"/".join(reversed(parts)).decode(errors="surrogateescape")

    @staticmethod
    def _no_views(*inos: int) -> None:
        if any(Views.owns(i) for i in inos):
            raise FUSEError(errno.EROFS)

    def path_of(self, ino: int) -> str:
        """A path of `ino` for log lines (a directory walk: only on error paths)."""
        with self.store.reader() as tx:
            return tx.path_of(ino) or f"<inode {ino}>"

    def catalog(self) -> Catalog:
        """The latest catalogue of the live tree (catalog.py). Views read it on the trio loop,
        so it is rebuilt in the background (`keep_catalog`), never here but the first time."""
        self._catalog_wanted = True
        if self._catalog is None:
            self.refresh_catalog()
        return self._catalog[1]

    async def _view(self, ino: int) -> bool:
        """Whether `ino` is a node of the views; before the first look at one, the catalogue is
        built in a worker thread, so that its first build does not stall the whole mount."""
        if not self.views.owns(ino):
            return False
        if self._catalog is None:
            await self.fresh_catalog()
        return True

    def want_catalog(self) -> None:
        """Have the catalogue (and the groups) rebuilt soon, though no one looks: a new
        fingerprint may put a file in a burst, which listeners hear of."""
        self._catalog_wanted = True

    def refresh_catalog(self) -> Catalog:
        """Rebuild the catalogue if the store committed anything since, and bring the groups
        up to date with it (blocking)."""
        with self._catalog_lock:
            with self.store.reader() as tx:
                txn_id = tx.txn.id()
                if self._catalog is None or self._catalog[0] != txn_id:
                    t0 = time.monotonic()
                    cat = build_catalog(tx, self.rules)
                    self._add_previews(tx, cat)
                    self.groups.update(cat.group_files())
                    cat.groups = [g for k in SEQUENCES for g in self.groups.groups(k)]
                    self._note_joined(self._catalog[1] if self._catalog else None, cat)
                    self._note_tiers(tx, cat, first=self._catalog is None)
                    self._catalog = (txn_id, cat)
                    self._catalog_s = time.monotonic() - t0
            return self._catalog[1]

    def _note_joined(self, old: Catalog | None, new: Catalog) -> None:
        """Files that are in a burst or bracket now and were not in that group before (the
        first catalogue of a mount: files fingerprinted by this mount)."""
        before = {(k, g.kind): g.name for g in old.groups if g.kind in SEQUENCES
                  for k in g.keys} if old is not None else {}
        for g in new.groups:
            self._joined.extend((new.files[k].path, g) for k in g.keys
                                if before.get((k, g.kind)) != g.name and k in new.files
                                and (old is not None or k in self._fingerprinted))

    def _add_previews(self, tx: Txn, cat: Catalog) -> None:
        """Files whose version has a generated preview are in .vault/previews too."""
        made = self.previews.made if self.previews is not None else ()
        if not made:
            return
        folders: dict[str, int | None] = {"": ROOT_INO}
        for ino, e in cat.files.items():
            if e.node.content not in made:
                continue
            parts = e.path.split("/")[:-1]
            prefixes = ["/".join(parts[:i]) for i in range(len(parts) + 1)]
            for p in prefixes:
                if p not in folders:
                    folders[p] = tx.resolve(p)
            if all(folders[p] is not None for p in prefixes):
                cat.add(PREVIEWS, ino, [folders[p] for p in prefixes])

    def _note_tiers(self, tx: Txn, cat: Catalog, first: bool) -> None:
        """Files whose tier is newly known (their metadata read) or not the one last noted:
        for `tiered` events. A file whose bytes, or whose sidecar's or image's, are not
        analysed yet keeps the tier noted (the metadata to come may move it); an empty file
        has none yet. A file saved by renaming a new one over it takes over the tier noted
        for its path. The first catalogue of a mount notes what was known before it quietly:
        only the files this mount analysed are new."""
        waiting = {e.path for e in cat.files.values() if e.node.content and not e.own
                   and tx.media(e.node.content) is None}
        moving = set(waiting)
        for e in cat.files.values():
            if e.sidecars and (e.path in waiting or waiting.intersection(e.sidecars)):
                moving.update([e.path, *e.sidecars])
        for ino in [ino for ino in self._tiers if ino not in cat.files]:
            path, tier = self._tiers.pop(ino)
            self._left[path] = tier
        paths = {e.path for e in cat.files.values()}
        self._left = {path: tier for path, tier in self._left.items() if path in paths}
        for ino, e in cat.files.items():
            if not e.node.content or e.path in moving:
                continue
            noted = self._tiers.get(ino)
            before = noted[1] if noted is not None else self._left.pop(e.path, None)
            self._tiers[ino] = (e.path, e.tier)
            if before != e.tier and (before is not None or not first
                                     or ino in self._analysed_early):
                self._retiered.append((e.path, e.tier, before))
        if first:
            self._analysed_early.clear()

    async def fresh_catalog(self) -> Catalog:
        return await self._thread(self.refresh_catalog)

    async def keep_catalog(self) -> None:
        """Rebuild the catalogue in a worker thread when the store has moved on and views or
        status have asked for it since, at most CATALOG_REFRESH_S apart: views follow changes
        within about a second (a view a second time after a change shows it). While someone
        listens to events, after every change: a change of tier is announced (`tiered`)."""
        while True:
            # (A walk of a large tree is not free, ~2 s per 100,000 files: at most a fifth of
            # the time goes to it.)
            await trio.sleep(max(CATALOG_REFRESH_S, 4 * self._catalog_s))
            # Only while someone looks or listens, or something may have joined a group.
            if (self._catalog_wanted or self.events.listening) and (self._catalog is None or
                                         self.store.env.info()["last_txnid"] != self._catalog[0]):
                self._catalog_wanted = False
                try:
                    await self.fresh_catalog()
                except Exception:
                    log.exception("rebuilding the catalogue failed; trying again")
            joined, self._joined = self._joined, []
            for path, group in joined:
                self.events.publish("burst", path, group=group.name, kind=group.kind,
                                    files=len(group.keys))
            retiered, self._retiered = self._retiered, []
            for path, tier, before in retiered:
                self.events.publish("tiered", path, tier=tier,
                                    **({"from": before} if before is not None else {}))

    def status(self) -> dict:
        figures = self.store.figures()
        figures["open_files"] = len(self._open)
        dirty = [of.dirty_since for of in self._open.values() if of.dirty]
        figures["uncommitted_files"] = len(dirty)
        figures["oldest_uncommitted_s"] = round(time.monotonic() - min(dirty), 3) if dirty else 0
        figures.update(copies_figures(self.store, self.catalog()))
        if self.analyzer is not None:  # (what the analyser read, and the samples it left)
            figures["analysis"] = {"files": self.analyzer.analysed,
                                   "samples_not_decoded_bytes": self.analyzer.skipped_bytes}
        return figures

    # ---- lookups and attributes ---------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INO and name == VAULT_NAME:
            return self.views.attrs(VAULT_INO)
        if await self._view(parent_inode):
            attrs = self.views.attrs(self.views.find(parent_inode, name))
            self._remember(attrs.st_ino, attrs.st_mode, parent_inode)
            return attrs
        _check_name(name)
        with self.store.reader() as tx:
            ino = tx.lookup(parent_inode, name)
            if ino is None:
                # A negative entry the kernel may cache: every create passes through it, so
                # "no such file" stays true until the kernel itself learns otherwise.
                missing = pyfuse3.EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = CACHE_TIMEOUT
                return missing
            attrs = self._attrs(self._inode(tx, ino))
        self._remember(ino, attrs.st_mode, parent_inode, name)
        return attrs

    async def forget(self, inode_list):
        for ino, nlookup in inode_list:
            try:
                self._lookups[ino] -= nlookup
                if self._lookups[ino] <= 0:
                    del self._lookups[ino]
                    self._parents.pop(ino, None)
                    self._names.pop(ino, None)
                    self._verified.pop(ino, None)
                    self._checked.pop(ino, None)
                    self._failed.discard(ino)
                    await self._delete_if_unused(ino)
            except Exception:  # forget must never raise
                log.exception("forget of inode %d failed", ino)

    @handler
    async def getattr(self, inode, ctx=None):
        await self._view(inode)
        return self._get_attrs(inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._no_views(inode)
        now = time.time_ns()
        if fields.update_size:
            async with self._locked(inode) as of:
                try:
                    await self._ensure_spool(of, keep=attr.st_size)
                    self._truncate_spool(of, attr.st_size, now)
                    if of.opens == 0:  # truncate(2) by path: no close will follow
                        await self._commit(of)
                finally:
                    if of.opens == 0:  # nobody has it open: keep nothing in memory
                        self._drop_open(of)

        def change(tx: Txn) -> Inode:
            node = self._inode(tx, inode)
            if fields.update_mode:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
                acl = tx.xattr(inode, ACL_ACCESS)
                if acl is not None:  # chmod rewrites an extended ACL (posix_acl_chmod)
                    tx.set_xattr(inode, ACL_ACCESS, acl_chmod(acl, node.mode))
            if fields.update_uid:
                node.uid = attr.st_uid
            if fields.update_gid:
                node.gid = attr.st_gid
            if fields.update_atime:
                node.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
            node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
            tx.put_inode(node)
            return node

        node = await self._write(change)
        of = self._open.get(inode)
        if of is not None and of.fd is not None:
            if fields.update_mtime:
                of.mtime_ns = node.mtime_ns
            of.ctime_ns = node.ctime_ns
        return self._attrs(node)

    @handler
    async def readlink(self, inode, ctx):
        if await self._view(inode):
            return self.views.readlink(inode)
        with self.store.reader() as tx:
            node = self._inode(tx, inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    # ---- creating and removing names ----------------------------------------------------------
    async def _make(self, parent: int, name: bytes, mode: int, ctx, rdev: int = 0,
                    target: bytes = b"") -> Inode:
        _check_name(name)
        if parent == ROOT_INO and name == VAULT_NAME:
            raise FUSEError(errno.EEXIST)
        self._no_views(parent)
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        if not stat.S_ISLNK(mode):
            mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask)

        def make(tx: Txn) -> Inode:
            p = self._inode(tx, parent)
            if not stat.S_ISDIR(p.mode):
                raise FUSEError(errno.ENOTDIR)
            if p.nlink == 0:
                raise FUSEError(errno.ENOENT)  # a removed directory takes no new entries
            if tx.lookup(parent, name) is not None:
                raise FUSEError(errno.EEXIST)
            m, gid = mode, ctx.gid
            if p.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
                gid = p.gid
                if is_dir:
                    m |= stat.S_ISGID
            default = None if stat.S_ISLNK(m) else tx.xattr(parent, ACL_DEFAULT)
            access = None
            if default is not None:
                m, access = acl_inherit(default, m)
            node = tx.new_inode(m, ctx.uid, gid, now, rdev, target)
            node.nlink = 2 if is_dir else 1
            tx.put_inode(node)
            if access is not None:
                tx.set_xattr(node.ino, ACL_ACCESS, access)
            if default is not None and is_dir:
                tx.set_xattr(node.ino, ACL_DEFAULT, default)
            tx.add_entry(parent, name, node.ino)
            if is_dir:
                p.nlink += 1
            p.mtime_ns = p.ctime_ns = now
            tx.put_inode(p)
            return node

        node = await self._write(make)
        self._remember(node.ino, node.mode, parent, name)
        return node

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attrs(await self._make(parent_inode, name, mode, ctx, rdev=rdev))

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attrs(await self._make(parent_inode, name, stat.S_IFDIR | mode, ctx))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        return self._attrs(await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx,
                                            target=target))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        try:
            node = await self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        except FUSEError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # The kernel took the name for free, though a file is there: one that an import
            # or a capture policy put there before the kernel dropped its "no such file".
            # Open that file, as a local file system would.
            return await self._create_existing(parent_inode, name, flags, ctx)
        return pyfuse3.FileInfo(fh=self._open_fh(node.ino)), self._attrs(node)

    async def _create_existing(self, parent: int, name: bytes, flags: int, ctx
                               ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with self.store.reader() as tx:
            ino = tx.lookup(parent, name)
            node = tx.inode(ino) if ino is not None else None
            acl = tx.xattr(ino, ACL_ACCESS) if node is not None else None
        if node is None or not stat.S_ISREG(node.mode):  # (.vault; a symlink is not followed)
            raise FUSEError(errno.EISDIR if node and stat.S_ISDIR(node.mode) else errno.EEXIST)
        access = flags & os.O_ACCMODE
        want = (4 if access != os.O_WRONLY else 0) | \
            (2 if access != os.O_RDONLY or flags & os.O_TRUNC else 0)
        if not permits(node.mode, node.uid, node.gid, acl, ctx.uid,
                       groups_of(ctx.pid, ctx.gid), want):
            raise FUSEError(errno.EACCES)  # (the kernel checked the folder, not the file)
        info = await self.open(ino, flags, ctx)
        self._remember(ino, node.mode, parent, name)  # (a create is a lookup)
        return info, self._get_attrs(ino)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        _check_name(new_name)
        self._no_views(inode, new_parent_inode)
        now = time.time_ns()

        def link(tx: Txn) -> Inode:
            node = self._inode(tx, inode)
            if stat.S_ISDIR(node.mode):
                raise FUSEError(errno.EPERM)
            p = self._inode(tx, new_parent_inode)
            if tx.lookup(new_parent_inode, new_name) is not None:
                raise FUSEError(errno.EEXIST)
            tx.add_entry(new_parent_inode, new_name, inode)
            node.nlink += 1
            node.ctime_ns = now
            tx.put_inode(node)
            p.mtime_ns = p.ctime_ns = now
            tx.put_inode(p)
            return node

        node = await self._write(link)
        self._lookups[inode] += 1
        return self._attrs(node)

    async def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        self._no_views(parent)
        if parent == ROOT_INO and name == VAULT_NAME:
            raise FUSEError(errno.EBUSY)
        now = time.time_ns()

        def remove(tx: Txn) -> Inode:
            ino = tx.lookup(parent, name)
            if ino is None:
                raise FUSEError(errno.ENOENT)
            node = self._inode(tx, ino)
            is_dir = stat.S_ISDIR(node.mode)
            if want_dir and not is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not want_dir and is_dir:
                raise FUSEError(errno.EISDIR)
            if is_dir and tx.has_entries(ino):
                raise FUSEError(errno.ENOTEMPTY)
            tx.remove_entry(parent, name)
            p = self._inode(tx, parent)
            if is_dir:
                p.nlink -= 1
            p.mtime_ns = p.ctime_ns = now
            tx.put_inode(p)
            _drop_name(tx, node, now)
            return node

        node = await self._write(remove)
        if self._names.get(node.ino) == (parent, name):
            self._names.pop(node.ino)  # (its events say <inode N> from now on)
        if self.capture is not None and not want_dir:
            self.capture.note_left((parent, name))
        if node.nlink == 0:
            await self._delete_if_unused(node.ino)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name, want_dir=False)

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name, want_dir=True)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        _check_name(name_new)
        self._no_views(parent_inode_old, parent_inode_new)
        if (parent_inode_old, name_old) == (ROOT_INO, VAULT_NAME) or \
                (parent_inode_new, name_new) == (ROOT_INO, VAULT_NAME):
            raise FUSEError(errno.EBUSY)
        now = time.time_ns()

        moved: dict[int, int] = {}  # directory ino -> its new parent
        renamed: list[int] = []     # the inode now at the new name
        announced: list[bool] = []  # whether it has a committed version (and so events)

        def rename(tx: Txn) -> Inode | None:
            ino = tx.lookup(parent_inode_old, name_old)
            if ino is None:
                raise FUSEError(errno.ENOENT)
            node = self._inode(tx, ino)
            renamed[:], announced[:] = [ino], [bool(node.content)]
            if stat.S_ISDIR(node.mode):
                moved[ino] = parent_inode_new
            parents = {p: self._inode(tx, p) for p in (parent_inode_old, parent_inode_new)}
            old_p, new_p = parents[parent_inode_old], parents[parent_inode_new]
            target_ino = tx.lookup(parent_inode_new, name_new)
            replaced = None
            if flags & pyfuse3.RENAME_EXCHANGE:
                if target_ino is None:
                    raise FUSEError(errno.ENOENT)
                other = self._inode(tx, target_ino)
                if stat.S_ISDIR(other.mode):
                    moved[target_ino] = parent_inode_old
                tx.relink_entry(parent_inode_old, name_old, target_ino)
                tx.relink_entry(parent_inode_new, name_new, ino)
                dirs = stat.S_ISDIR(node.mode) - stat.S_ISDIR(other.mode)
                old_p.nlink -= dirs
                new_p.nlink += dirs
                other.ctime_ns = now
                tx.put_inode(other)
            else:
                if target_ino is not None:
                    if flags & pyfuse3.RENAME_NOREPLACE:
                        raise FUSEError(errno.EEXIST)
                    if target_ino == ino:
                        return None  # two links to one file: POSIX says do nothing
                    replaced = self._inode(tx, target_ino)
                    if stat.S_ISDIR(node.mode):
                        if not stat.S_ISDIR(replaced.mode):
                            raise FUSEError(errno.ENOTDIR)
                        if tx.has_entries(target_ino):
                            raise FUSEError(errno.ENOTEMPTY)
                        new_p.nlink -= 1
                    elif stat.S_ISDIR(replaced.mode):
                        raise FUSEError(errno.EISDIR)
                    tx.remove_entry(parent_inode_new, name_new)
                    _drop_name(tx, replaced, now)
                    if replaced.nlink == 0 and stat.S_ISREG(node.mode):
                        tx.move_versions(replaced.ino, ino)  # a save by rename: one timeline
                if parent_inode_old == parent_inode_new:
                    tx.rename_entry(parent_inode_old, name_old, name_new)
                else:
                    tx.remove_entry(parent_inode_old, name_old)
                    tx.add_entry(parent_inode_new, name_new, ino)
                if stat.S_ISDIR(node.mode):
                    old_p.nlink -= 1
                    new_p.nlink += 1
            node.ctime_ns = now
            tx.put_inode(node)
            for p in parents.values():
                p.mtime_ns = p.ctime_ns = now
                tx.put_inode(p)
            return replaced

        replaced = await self._write(rename)
        for ino, parent in moved.items():
            self._parents[ino] = parent
        if self.capture is not None and renamed and renamed[0] not in moved:
            # A name a file held before: what is put there is an edit of that file.
            self.capture.note_left((parent_inode_old, name_old))
            if replaced is not None or flags & pyfuse3.RENAME_EXCHANGE:
                self.capture.note_left((parent_inode_new, name_new))
            self.capture.note_touched(renamed[0])
        if renamed:
            before = self.event_path(renamed[0])
            self._names[renamed[0]] = (parent_inode_new, name_new)
            # A file saved under a temporary name first. (Not "verified": its read-back may
            # still be under way when the writer renames it.)
            if announced[0]:
                self.events.publish("renamed", self.event_path(renamed[0]), **{"from": before})
        if replaced is not None and self._names.get(replaced.ino) == (parent_inode_new, name_new):
            self._names.pop(replaced.ino)
        if replaced is not None and replaced.nlink == 0:
            await self._delete_if_unused(replaced.ino)

    async def _delete_if_unused(self, ino: int) -> None:
        """Free an inode once it has no name, no kernel reference and no open handle."""
        if self._lookups.get(ino) or ino in self._open or self.views.owns(ino):
            return
        with self.store.reader() as tx:
            node = tx.inode(ino)
            if node is None or node.nlink:
                return

        def delete(tx: Txn) -> None:
            node = tx.inode(ino)
            if node is not None and node.nlink == 0:
                tx.delete_inode(node)

        await self._write(delete)
        if self.capture is not None:
            self.capture.note_gone(ino)

    # ---- file contents ------------------------------------------------------------------------
    def _open_inode(self, ino: int) -> OpenInode:
        of = self._open.get(ino)
        if of is None:
            of = self._open[ino] = OpenInode(ino)
        return of

    @contextlib.asynccontextmanager
    async def _locked(self, ino: int) -> AsyncIterator[OpenInode]:
        """An inode's in-memory state, locked, and still the one in use: another task may have
        dropped the object while this one waited for its lock."""
        while True:
            of = self._open_inode(ino)
            async with of.lock:
                if self._open.get(ino) is of:
                    yield of
                    return

    def _open_fh(self, ino: int) -> int:
        of = self._open_inode(ino)
        of.opens += 1
        return self._new_fh(ino)

    @handler
    async def open(self, inode, flags, ctx):
        if await self._view(inode):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise FUSEError(errno.EROFS)
            if not self.views.is_generated(inode):  # a snapshot's file or a version
                if not stat.S_ISREG(self.views.attrs(inode).st_mode):
                    raise FUSEError(errno.EISDIR)
                return pyfuse3.FileInfo(fh=self._new_fh(inode), keep_cache=True)
            content = self.views.content(inode)
            fh = self._new_fh(inode)
            self._view_data[fh] = content
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        with self.store.reader() as tx:
            node = self._inode(tx, inode)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        fh = self._open_fh(inode)
        if flags & os.O_TRUNC:  # libfuse enables atomic_o_trunc: no setattr precedes this open
            of = self._open[inode]
            try:
                async with of.lock:
                    await self._ensure_spool(of, keep=0)
                    self._truncate_spool(of, 0, time.time_ns())
            except BaseException:
                await self.release(fh)
                raise
        # Every change passes through this mount, so the kernel's page cache stays valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _ensure_spool(self, of: OpenInode, keep: int | None = None) -> None:
        """Give an inode a spool seeded with its committed content, or with just its first
        `keep` bytes when the rest is about to be cut off (the inode lock is held)."""
        if of.fd is not None:
            return
        with self.store.reader() as tx:
            node = self._inode(tx, of.ino)
            size = node.size if keep is None else min(node.size, keep)
            # Bytes kept whole keep their chunks: appending costs only what is appended. A
            # truncation below the end cuts anew from the start.
            ingest = FileIngest.resume(self.store, tx, of.ino) if size == node.size \
                else FileIngest(self.store, of.ino)
        if size:
            of.fd = await self._thread(open_spool, self.store, self.cache, of.ino, size)
        else:  # nothing to read back: a new file's spool is one quick syscall
            of.fd = open_spool(self.store, self.cache, of.ino, 0)
        of.size, of.mtime_ns, of.ctime_ns = size, node.mtime_ns, node.ctime_ns
        of.ingest, of.stream_end = ingest, ingest.done_to
        of.stream_ok = size == node.size or size == 0

    def _truncate_spool(self, of: OpenInode, size: int, now: int) -> None:
        if size:
            os.ftruncate(of.fd, size)
        elif of.size:
            empty_spool(self.store, of.fd)
        if size < of.stream_end:
            of.stream_ok = False
        elif size == 0 and of.stream_end == 0:
            of.stream_ok = True  # emptied (O_TRUNC) before any background ingest began
        if not of.dirty:
            of.dirty_since = time.monotonic()
        of.size, of.dirty, of.mtime_ns, of.ctime_ns = size, True, now, now

    def _maybe_stream(self, of: OpenInode) -> None:
        """Start ingesting what a front-to-back writer has written so far, in the background."""
        if (self.nursery is None or not of.stream_ok or of.streaming is not None
                or of.size - of.ingest.done_to < STREAM_STEP):
            return
        of.stream_end = of.size
        of.streaming = trio.Event()
        self.nursery.start_soon(self._stream, of, of.streaming, of.size)

    async def _stream(self, of: OpenInode, done: trio.Event, end: int) -> None:
        try:
            await self._thread(of.ingest.advance, of.fd, end, False)
        except Exception:
            log.exception("background ingest of inode %d failed; the commit will redo it",
                          of.ino)
            of.stream_ok = False
        finally:
            of.streaming = None
            done.set()

    async def _commit(self, of: OpenInode) -> None:
        """Commit a changed inode's spool to the store (the inode lock is held)."""
        if of.streaming is not None:
            await of.streaming.wait()
        if not of.dirty or of.fd is None:  # nothing to do, or dropped while we waited
            return
        ingest = of.ingest
        if not of.stream_ok:  # a byte below what was ingested changed: cut it all anew
            await self._thread(ingest.abandon)
        try:
            await self._thread(commit_spool, self.store, of.ino, of.fd, of.size, of.mtime_ns,
                               of.ctime_ns, ingest)
        except BaseException as e:
            of.stream_ok = False  # the next commit starts over from the first byte
            self._failed.add(of.ino)
            if isinstance(e, Exception):
                self.events.publish("error", self.event_path(of.ino),
                                    error=f"commit failed: {getattr(e, 'strerror', None) or e}")
            raise
        self._failed.discard(of.ino)
        self._committed(of.ino, of.size)
        # From here on, a write below done_to invalidates the ingest; appends go on from it.
        of.stream_ok, of.stream_end = True, ingest.done_to
        of.dirty = False

    def _committed(self, ino: int, size: int, imported: bool = False) -> None:
        """A file's new content is in the store: say so, read it back, read its metadata."""
        if self.capture is not None:
            with self.store.reader() as tx:
                first = len(list(itertools.islice(tx.versions(ino), 2))) == 1
                node = tx.inode(ino)
            if node is not None:
                self.capture.note_committed(ino, node.content, first, imported)
        self.changed = True
        self.events.publish("committed", self.event_path(ino), size=size)
        if self.nursery is not None:
            if self.analyzer is not None:
                self.analyzer.reading_back(ino, size)
            self.nursery.start_soon(self._verify, ino)
        if self.analyzer is not None:
            self.analyzer.enqueue(ino)

    def import_file(self, source: str, dest: str) -> dict:
        """Commit the file at `source` (outside the mount: a camera card) as a new file at
        `dest` in the live tree, through the same ingest, read-back and analysis as a file
        written through the mount (importfile.py). Runs in a worker thread (a control op).
        A source that cannot be read is an answer, not a failure of the mount."""
        parts = dest.split("/")
        if any(p in ("", ".", "..") or len(os.fsencode(p)) > NAME_MAX for p in parts) \
                or parts[0] == VAULT_NAME.decode():
            raise ValueError(f"{dest!r} is not a path for a file in the vault")
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            return {"error": e.strerror or str(e), "errno": e.errno}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return {"error": "not a regular file"}
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            ino, chain, new = importfile.import_file(self.store, fd, st.st_size, st.st_mtime_ns,
                                                     os.fsencode(dest))
        except OSError as e:  # EIO from a failing card (with where), ENOSPC from the store's disk
            log.warning("importing %s failed: %s", source, e)
            return {"error": e.strerror or str(e), "errno": e.errno}
        finally:
            os.close(fd)
        self._uncache(chain, new)
        trio.from_thread.run_sync(lambda: self._placed(chain, ino, st.st_size, imported=True))
        path = b"/".join(name for _, name, _ in chain).decode(errors="surrogateescape")
        with self.store.reader() as tx:
            version = tx.inode(ino).content
        return {"path": path, "version": version, "size": st.st_size}

    @staticmethod
    def _uncache(chain: list[tuple[int, bytes, int]], new: int,
                 left: tuple[int, bytes] | None = None) -> None:
        """After a change made behind the kernel's back (an import, a capture policy): drop
        what it may cache of the first new name on the path (a negative entry, from a lookup
        before it existed), of the name a file left, and of the folders' attributes. Blocking:
        from a worker thread."""
        for parent, name in [chain[new][:2]] + ([left] if left else []):
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            with contextlib.suppress(OSError):  # (a folder the kernel does not know)
                pyfuse3.invalidate_inode(parent, attr_only=True)

    def _placed(self, chain: list[tuple[int, bytes, int]], ino: int, size: int | None,
                was: str = "", imported: bool = False) -> None:
        """A file has a new path: committed as a new file (`size`), or moved from `was`. Note
        the names for its events, and announce it."""
        for parent, name, child in chain[:-1]:
            self._names.setdefault(child, (parent, name))
        self._names[ino] = chain[-1][:2]
        if size is not None:
            self._committed(ino, size, imported)
        else:
            self.events.publish("renamed", self.event_path(ino), **{"from": was})

    def analysed(self, ino: int, version: int, record: dict) -> None:
        """The analyser has read the metadata (and fingerprint) of a file's `version`: say so,
        and let the capture policies know. A fingerprint may complete a burst: the catalogue
        is rebuilt to see."""
        path = self.event_path(ino)
        if self._catalog is None:
            self._analysed_early.add(ino)
        if self.previews is not None and record.get("kind") == "image":
            self.previews.enqueue(ino, path)
        self.events.publish("analysed", path, **{k: record[k] for k in ("kind", "rating",
                                                                        "label", "error")
                                                 if k in record})
        if "fingerprint" in record:
            self.events.publish("fingerprinted", path, preview="preview" in record,
                                **record["fingerprint"])
            self._fingerprinted.add(ino)
            self.want_catalog()
        elif "fingerprint_error" in record:
            self.events.publish("fingerprinted", path, error=record["fingerprint_error"])
        if self.capture is not None:
            self.capture.note_analysed(ino, version, record.get("kind") == "image")

    async def keep_captures(self) -> None:
        """Apply the capture policies to new captures once their writers are done with them
        (capture.py), one at a time."""
        while True:
            await trio.sleep(CAPTURE_CHECK_S)
            for ino, version, imported in self.capture.due(lambda i: i in self._open,
                                                           self._names.get):
                applied = True
                try:
                    path = self.event_path(ino)
                    if not path.startswith("<"):  # (a path this mount knows)
                        # An import keeps the import's layout (--into): it is not renamed.
                        applied = await self._capture(ino, version, path, rename=not imported)
                finally:
                    self.capture.done(ino, applied)

    async def _capture(self, ino: int, version: int, path: str, rename: bool) -> bool:
        """Apply the policy to a capture's `version`; False if it was committed again since."""
        try:
            placed = await self._thread(self.capture.apply, ino, version, path, rename)
            if placed is None:
                return False
            for p in placed:
                await self._thread(self._uncache, p.chain, p.new, p.left)
                self._placed(p.chain, p.ino, p.size, p.was)
        except Exception as e:
            log.exception("the capture policy for %s failed", path)
            self.events.publish("error", path, error=f"capture policy: {e}")
        return True

    async def _verify(self, ino: int) -> None:
        """Read a committed file back from the store and match every chunk against its
        digests: only then is it `verified` (safe). The analyser waits for it, and has the
        digest of the bytes when all were read."""
        version, problem, digest = 0, None, None
        try:
            version, problem, digest = await self._thread(self._read_back, ino)
        except Exception as e:  # (it is in the store; `vaultfs verify` can say more)
            log.exception("reading back inode %d failed", ino)
            problem = str(e)
        finally:
            if self.analyzer is not None:
                self.analyzer.read_back(ino, version, None if problem else digest)
        if problem:
            log.error("%s did not read back as written: %s", self.event_path(ino), problem)
            self.events.publish("error", self.event_path(ino), error=problem)
        elif version:
            self._verified[ino] = version
            self.events.publish("verified", self.event_path(ino), version=version)

    def _read_back(self, ino: int) -> tuple[int, str | None, str | None]:
        """Check the chunks of the file's current version that were not checked for its
        previous one (a logger's fsyncs re-check only what was appended): (version, what is
        wrong, and the XXH3-128 (hex) of all its bytes when every chunk was read)."""
        with self.store.reader(buffers=True) as tx:
            node = tx.inode(ino)
            if node is None:
                return 0, None, None  # deleted meanwhile
            done = self._checked.get(ino, set())
            now: set[bytes] = set()
            whole, end = xxhash.xxh3_128(), 0  # (holes hashed as the zeros they read as)
            for off, chunk_id, _ in tx.extents(node.content):
                now.add(chunk_id)
                if chunk_id in done:
                    whole = None
                    continue
                rec = tx.chunk_record(chunk_id)
                data, why = checked_chunk(tx.chunk_data(chunk_id), chunk_id, rec) if rec \
                    else (None, "missing")
                if why:
                    return node.content, f"bytes from {off}: {why}", None
                if whole is not None:
                    _zeros(whole, off - end)
                    whole.update(data)
                    end = off + len(data)
            self._checked[ino] = now
            if whole is None:
                return node.content, None, None
            _zeros(whole, node.size - end)
            return node.content, None, whole.hexdigest()

    def safety(self, path: str) -> dict:
        """Is the file at `path` safe yet: committed, read back and verified, and mirrored
        where its tier asks for two copies; and how many copies there are. A file committed
        before this mount is read back now (blocking: runs in a worker thread)."""
        with self.store.reader() as tx:
            ino = tx.resolve(path)
            node = tx.inode(ino) if ino is not None else None
        if node is None or not stat.S_ISREG(node.mode):
            raise ValueError(f"{path} is not a file in the vault")
        of = self._open.get(ino)
        committed = not (of is not None and of.dirty) and ino not in self._failed
        if committed and node.content and self._verified.get(ino) != node.content and \
                (of is None or of.streaming is None):
            version, problem, _ = self._read_back(ino)
            if version and not problem:
                self._verified[ino] = version
        verified = committed and (self._verified.get(ino) == node.content if node.content
                                  else node.size == 0)
        with self.store.reader() as tx:  # evicted since it was verified: its bytes are away
            offline = bool(node.content) and tx.is_offline(node.content)
        here = verified and not offline
        answer = {"path": path, "committed": committed, "verified": here, "offline": offline,
                  "safe": here, "copies": 1 if here else 0, "version": node.content}
        return answer if self.mirror is None else \
            self.mirror.judge(answer, ino, self.refresh_catalog())

    def _drop_open(self, of: OpenInode) -> None:
        of.close_spool()
        if self._open.get(of.ino) is of:
            del self._open[of.ino]

    @handler
    async def read(self, fh, off, size):
        if fh in self._view_data:
            return self._view_data[fh][off:off + size]
        ino = self._handles[fh]
        if self.views.owns(ino):
            return await self._thread(self.views.read, ino, off, size)
        of = self._open[ino]
        async with of.lock:
            if of.fd is not None:
                return await self._thread(os.pread, of.fd, size, off)
        return await self._thread(self._read_committed, ino, off, size)

    def _read_committed(self, ino: int, off: int, size: int) -> bytes:
        mended: set[bytes] = set()
        while True:
            try:
                with self.store.reader(buffers=True) as tx:  # size and extents from one snapshot
                    return read_range(tx, self.cache, self._inode(tx, ino), off, size)
            except DamagedChunk as e:  # the mirror's copy mends it, when it has a good one
                if self.mirror is None or e.chunk_id in mended or \
                        not self.mirror.mend(e.chunk_id, self.path_of(ino)):
                    raise
                mended.add(e.chunk_id)

    @handler
    async def write(self, fh, off, buf):
        ino = self._handles[fh]
        if self.views.owns(ino):
            raise FUSEError(errno.EBADF)
        of = self._open[ino]
        async with of.lock:
            await self._ensure_spool(of)
            n = os.pwrite(of.fd, buf, off)
            now = time.time_ns()
            if not of.dirty:
                of.dirty_since = time.monotonic()
            of.size, of.dirty, of.mtime_ns, of.ctime_ns = max(of.size, off + n), True, now, now
            if off < of.stream_end:
                of.stream_ok = False
            self._maybe_stream(of)
        return n

    async def _commit_fh(self, fh: int) -> None:
        ino = self._handles.get(fh)
        of = self._open.get(ino) if ino is not None else None
        if of is not None:
            async with of.lock:
                await self._commit(of)

    @handler
    async def flush(self, fh):
        await self._commit_fh(fh)

    @handler
    async def fsync(self, fh, datasync):
        await self._commit_fh(fh)

    @handler
    async def release(self, fh):
        self._view_data.pop(fh, None)
        ino = self._handles.pop(fh)
        if self.views.owns(ino):
            return
        of = self._open[ino]
        of.opens -= 1
        if of.opens > 0:
            return
        try:
            async with of.lock:
                try:
                    await self._commit(of)
                finally:
                    if of.opens == 0:
                        self._drop_open(of)
        finally:
            if self.capture is not None:
                self.capture.note_touched(ino)
            await self._delete_if_unused(ino)

    # ---- directories --------------------------------------------------------------------------
    @handler
    async def opendir(self, inode, ctx):
        if await self._view(inode):
            if not stat.S_ISDIR(self.views.attrs(inode).st_mode):
                raise FUSEError(errno.ENOTDIR)
            return inode
        with self.store.reader() as tx:
            if not stat.S_ISDIR(self._inode(tx, inode).mode):
                raise FUSEError(errno.ENOTDIR)
        return inode

    @handler
    async def readdir(self, fh, start_id, token):
        # Offsets: 1 after ".", 2 after "..", 3 after ".vault", then entry id + 3 after an
        # entry, so that an offset stays valid while entries come and go.
        parent = self.views.parent_of(fh) or self._parents.get(fh, ROOT_INO)
        head = [(b".", fh), (b"..", parent)]
        if fh == ROOT_INO and self.vault_visible:
            head.append((VAULT_NAME, VAULT_INO))
        for offset, (name, ino) in enumerate(head[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._get_attrs(ino), offset):
                return  # the kernel takes no reference on these three
        if await self._view(fh):
            for offset, name, ino in self.views.entries(fh, start_id):
                try:
                    attrs = self.views.attrs(ino)
                except FUSEError:  # gone since the list was made (a deleted frame): skip it
                    continue
                if not pyfuse3.readdir_reply(token, name, attrs, offset):
                    return
                self._remember(ino, attrs.st_mode, fh)
            return
        with self.store.reader() as tx:
            for entry_id, name, ino in tx.entries(fh, max(start_id - 2, 1)):
                attrs = self._attrs(self._inode(tx, ino))
                if not pyfuse3.readdir_reply(token, name, attrs, entry_id + 3):
                    return
                self._remember(ino, attrs.st_mode, fh, name)

    @handler
    async def releasedir(self, fh):
        pass

    @handler
    async def fsyncdir(self, fh, datasync):
        pass  # every directory change is committed durably before its call returns

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.store.path)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = st.f_bsize, st.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
        s.f_namemax = NAME_MAX
        return s

    # ---- extended attributes ------------------------------------------------------------------
    @handler
    async def getxattr(self, inode, name, ctx):
        if await self._view(inode):
            value = dict(self.views.xattrs(inode)).get(name)
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return value
        with self.store.reader() as tx:
            self._inode(tx, inode)
            value = tx.xattr(inode, name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode, ctx):
        if await self._view(inode):
            return [name for name, _ in self.views.xattrs(inode)]
        with self.store.reader() as tx:
            self._inode(tx, inode)
            return [name for name, _ in tx.xattrs(inode)]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        self._no_views(inode)
        now = time.time_ns()

        def setx(tx: Txn) -> None:
            node = self._inode(tx, inode)
            if name == ACL_ACCESS:  # with FUSE_POSIX_ACL the daemon keeps the mode in step
                bits, equivalent = acl_mode(value)
                node.mode = node.mode & ~0o777 | bits
                if equivalent:  # a plain mode, as ext4 keeps it: no xattr (cp -a does this)
                    tx.remove_xattr(inode, name)
            if name != ACL_ACCESS or not equivalent:
                tx.set_xattr(inode, name, value)
            node.ctime_ns = now
            tx.put_inode(node)

        await self._write(setx)

    @handler
    async def removexattr(self, inode, name, ctx):
        self._no_views(inode)
        now = time.time_ns()

        def removex(tx: Txn) -> None:
            node = self._inode(tx, inode)
            if not tx.remove_xattr(inode, name):
                raise FUSEError(pyfuse3.ENOATTR)
            node.ctime_ns = now
            tx.put_inode(node)

        await self._write(removex)

    @handler
    async def access(self, inode, mode, ctx):
        # Mounted with default_permissions: the kernel has already checked the mode bits.
        self._get_attrs(inode)
        return True

    # ---- shutdown -----------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """At unmount, or when the daemon is asked to stop: commit every changed file that still
        has a name, then free the inodes that lost their last one (the kernel's references and
        the open handles end with the mount; FUSE sends no forget for them)."""
        for of in list(self._open.values()):
            async with of.lock:
                try:
                    with self.store.reader() as tx:
                        node = tx.inode(of.ino)
                    if node is not None and node.nlink:
                        await self._commit(of)
                    else:  # no name left: give back what a background ingest stored
                        if of.streaming is not None:
                            await of.streaming.wait()
                        if of.ingest is not None:
                            await self._thread(of.ingest.abandon)
                except Exception:
                    log.exception("could not commit inode %d at shutdown", of.ino)
                finally:
                    self._drop_open(of)
        held = list(self._lookups)
        self._lookups.clear()
        self._handles.clear()
        for ino in held:
            try:
                await self._delete_if_unused(ino)
            except Exception:  # the next mount's recovery frees it
                log.exception("could not free unlinked inode %d at shutdown", ino)


def _zeros(h: "xxhash.xxh3_128", n: int) -> None:
    """Feed `n` zero bytes to a running hash (a hole)."""
    block = bytes(min(n, 1 << 20))
    while n > 0:
        h.update(block[:n])
        n -= len(block)


def _drop_name(tx: Txn, node: Inode, now: int) -> None:
    """One name of `node` is gone (a directory has only one). An inode left without names is
    freed later, by `_delete_if_unused`, once no handle and no kernel reference remains: until
    then an open file stays readable and writable, as on ext4."""
    node.nlink = 0 if stat.S_ISDIR(node.mode) else node.nlink - 1
    node.ctime_ns = now
    tx.put_inode(node)
