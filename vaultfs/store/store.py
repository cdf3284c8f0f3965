"""Opening, creating and recovering a store directory.

    STORE/vault.toml     format version and the store's identity (and, later, its policies)
    STORE/lmdb/          the LMDB environment (data.mdb, lock.mdb)
    STORE/spool/         files being written through a mount, not yet committed
    STORE/vaultfs.log    the mount daemon's log
    STORE/mount.lock     held (flock) by the one process that may write the store
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import lmdb

from . import format as F
from . import gc, policy
from .txn import StoreError, Txn
from .writer import Writer

log = logging.getLogger(__name__)

# Format 2 stores are upgraded in place by a writable open; format 1 had no snapshots.
UPGRADABLE_FROM = 2
MAP_SIZE = 1 << 42  # 4 TiB of address space; the file grows with the data, not with this
LOCK_FILE_BYTES = 64 * 1024  # more than LMDB's reader table for max_readers=256 needs


class StoreBusy(StoreError):
    """Another process (a mount) holds the store for writing."""


class Store:
    """An open store. Writable stores own the mount lock and a writer thread."""

    def __init__(self, path: Path, env: lmdb.Environment, dbs: dict, lock_fd: int | None,
                 branch: bytes = F.MAIN_BRANCH):
        self.path = path
        self.env = env
        self.dbs = dbs
        self.branch = branch  # the line of history that reads and writes go to
        self.mounted = False  # set by the mount serving this store's open branch
        self._lock_fd = lock_fd
        self._ancestry: dict = {}  # (epoch generation, epoch) -> visible epochs
        self.writer = Writer(env, self._write_txn) if lock_fd is not None else None

    @property
    def id(self) -> str:
        """The store's UUID, as in vault.toml."""
        with self.reader() as tx:
            return str(uuid.UUID(bytes=bytes(tx.meta(F.META_UUID))))

    # ---- paths --------------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.path / "spool"

    @property
    def log_path(self) -> Path:
        return self.path / "vaultfs.log"

    # ---- life cycle ---------------------------------------------------------------------------
    @staticmethod
    def init(path: str | os.PathLike) -> Path:
        """Create an empty store at `path` (a new or empty directory)."""
        p = Path(path).expanduser()
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise StoreError(f"{p} already exists and is not an empty directory")
        created = not p.exists()
        try:
            Store._create(p)
        except (OSError, lmdb.Error, StoreError) as e:
            # Leave nothing half made behind (a full disk, a read-only folder...).
            if created:
                shutil.rmtree(p, ignore_errors=True)
            else:
                shutil.rmtree(p / "lmdb", ignore_errors=True)
                shutil.rmtree(p / "spool", ignore_errors=True)
                (p / "vault.toml").unlink(missing_ok=True)
            why = e if isinstance(e, StoreError) else getattr(e, "strerror", None) or e
            raise StoreError(f"cannot create a store in {p}: {why}") from None
        return p

    @staticmethod
    def _create(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        (p / "spool").mkdir()
        store_id = uuid.uuid4()
        env = _open_env(p, writable=True)
        try:
            dbs = _open_dbs(env, create=True)
            now = time.time_ns()
            with env.begin(write=True) as t:
                tx = Txn(t, dbs, write=True)
                tx.put_meta(F.META_FORMAT, F.u64(F.FORMAT_VERSION))
                tx.put_meta(F.META_UUID, store_id.bytes)
                tx.put_meta(F.META_NEXT_INO, F.u64(F.ROOT_INO))
                tx.put_meta(F.META_NEXT_ENTRY, F.u64(1))  # readdir offset 0 means 'start'
                tx.put_meta(F.META_NEXT_EPOCH, F.u64(F.ROOT_EPOCH))
                tx.put_meta(F.META_NEXT_VERSION, F.u64(1))  # content 0 means 'none'
                epoch = tx.new_epoch(0, now)
                t.put(F.MAIN_BRANCH, F.u64(epoch), db=dbs[F.DB_BRANCHES])
                root = tx.new_inode(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now)
                assert root.ino == F.ROOT_INO
                root.nlink = 2
                tx.put_inode(root)
        finally:
            env.close()
        (p / "vault.toml").write_text(
            "# vaultfs store\n"
            f"format_version = {F.FORMAT_VERSION}\n"
            f'id = "{store_id}"\n'
            + policy.default_toml()
        )

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False,
             branch: bytes = F.MAIN_BRANCH) -> "Store":
        """Open a store. A writable open takes the store's lock (one mount at a time) and
        recovers what a crash left behind; a read-only open works beside a running mount."""
        p = Path(path).expanduser()
        _check_store(p)
        try:
            version = tomllib.loads((p / "vault.toml").read_text()).get("format_version")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{p / 'vault.toml'} is not valid TOML: {e}") from None
        if type(version) is int and version > F.FORMAT_VERSION:  # (a bool is no version)
            raise StoreError(f"{p} has store format {version}, newer than this vaultfs "
                             f"understands ({F.FORMAT_VERSION}); upgrade vaultfs to use it")
        if type(version) is int and 0 < version < UPGRADABLE_FROM:
            raise StoreError(f"{p} has store format {version}, from a development version of "
                             f"vaultfs before snapshots; this vaultfs reads format "
                             f"{F.FORMAT_VERSION} and cannot upgrade it: read its files with the "
                             f"vaultfs that wrote it, and copy them into a new store")
        if type(version) is not int or not UPGRADABLE_FROM <= version <= F.FORMAT_VERSION:
            raise StoreError(f"{p / 'vault.toml'} names store format {version!r}; "
                             f"this vaultfs reads format {F.FORMAT_VERSION}")
        lock_fd = _take_lock(p) if writable else None
        try:
            if writable:
                gc.recover_compaction(p)
            env = _open_env(p, writable=writable)
            dbs = _open_dbs(env, create=False, writable=writable)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        store = cls(p, env, dbs, lock_fd, branch)
        try:
            with store.reader() as tx:
                inner = tx.meta(F.META_FORMAT)
                inner = F.from_u64(inner) if inner is not None else None
                # (an upgrade cut between its two steps leaves the database one ahead)
                if inner != version and not (inner == F.FORMAT_VERSION and writable):
                    raise StoreError(f"{p} holds a database of store format "
                                     f"{inner if inner else 'unknown'}, not {version}")
                tx.epoch  # noqa: B018 - the branch must exist
            if writable:
                _check_tmpfile(store.spool_dir)
                if version != F.FORMAT_VERSION:
                    store._upgrade(version)
                store._recover()
        except BaseException:
            store.close()
            raise
        return store

    @staticmethod
    def compact(path: str | os.PathLike) -> tuple[int, int]:
        """Rewrite an unmounted store's LMDB file without its free pages (gc.compact)."""
        p = Path(path).expanduser()
        _check_store(p)
        lock_fd = _take_lock(p)
        try:
            gc.recover_compaction(p)
            return gc.compact(p)
        finally:
            os.close(lock_fd)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.env.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self, buffers: bool = False, epoch: int | None = None) -> Iterator[Txn]:
        """A read-only snapshot of the store (cheap: LMDB readers never block) that sees the
        open branch's tree, or the frozen tree of `epoch`. With `buffers`, values are
        memoryviews into the map, valid until the snapshot ends: no copy."""
        with self.env.begin(write=False, buffers=buffers) as t:
            yield Txn(t, self.dbs, branch=self.branch, epoch=epoch, ancestry=self._ancestry)

    def _write_txn(self, t: lmdb.Transaction) -> Txn:
        return Txn(t, self.dbs, branch=self.branch, ancestry=self._ancestry, write=True)

    def write(self, fn):
        """Run `fn(txn)` in a durable write transaction and return its result (blocking)."""
        return self.submit(fn).result()

    def submit(self, fn: Callable[[Txn], object]) -> Future:
        """Queue `fn` for a durable write transaction; its future is done once committed."""
        if self.writer is None:
            raise StoreError("store was opened read-only")
        return self.writer.submit(fn)

    # ---- upgrades -----------------------------------------------------------------------------
    def _upgrade(self, version: int) -> None:
        """Format 3 added offline chunks and the `held` database, which a writable open has
        created, format 4 the predictor codec, which only new chunks use: nothing to rewrite
        but the two copies of the version, the database's first (an upgrade cut between the two
        is finished by the next writable open)."""
        self.write(lambda tx: tx.put_meta(F.META_FORMAT, F.u64(F.FORMAT_VERSION)))
        toml = self.path / "vault.toml"
        text = re.sub(r"(?m)^format_version\s*=\s*\d+", f"format_version = {F.FORMAT_VERSION}",
                      toml.read_text(), count=1)
        tmp = toml.with_name("vault.toml.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, toml)
        gc.fsync_path(self.path)
        log.warning("upgraded %s from store format %d to %d", self.path, version,
                    F.FORMAT_VERSION)

    # ---- crash recovery -----------------------------------------------------------------------
    def _recover(self) -> None:
        """Undo what a crashed mount left half done: pending chunk references of unfinished
        commits, inodes unlinked while open, and spool files of writes never committed."""
        def fix(tx: Txn) -> tuple[int, int]:
            refs = tx.drop_all_pending()
            orphans = [i for i in tx.inodes() if i.nlink == 0]
            for inode in orphans:
                tx.delete_inode(inode)
            return refs, len(orphans)
        # An inode unlinked while open belongs to the branch that was mounted: it is freed when
        # that branch is next opened for writing.

        refs, orphans = self.write(fix)
        spooled = 0
        for entry in self.spool_dir.iterdir():
            spooled += 1
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if refs or orphans or spooled:
            log.warning("recovered after an unclean stop: released %d pending chunk references, "
                        "%d unlinked inodes, discarded %d uncommitted spool files",
                        refs, orphans, spooled)

    # ---- figures ------------------------------------------------------------------------------
    def figures(self) -> dict:
        """The figures of `vaultfs status` and `.vault/status.json`."""
        with self.reader() as tx:
            c = tx.counters()
            conflicts = tx.conflicts(still_open=True)
            version = F.from_u64(tx.meta(F.META_FORMAT))  # an older one, opened read-only
        store_id = self.id
        st = os.statvfs(self.path)
        logical, unique, stored = c["logical_bytes"], c["unique_bytes"], c["stored_bytes"]
        return {
            "store": str(self.path),
            "id": store_id,
            "format_version": version,
            "files": c["files"],
            "chunks": c["chunks"],
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored,
            "offline_bytes": c["offline_bytes"],
            "dedup_ratio": round(logical / unique, 3) if unique else 1.0,
            "compression_ratio": round(unique / stored, 3) if stored else 1.0,
            "store_file_bytes": (self.path / "lmdb" / "data.mdb").stat().st_size,
            "free_bytes": st.f_bavail * st.f_frsize,
            "disk_bytes": st.f_blocks * st.f_frsize,
            "conflicts": conflicts,
        }


def is_store(p: Path) -> bool:
    """Whether the folder `p` is a vaultfs store (docs/store-format.md, section 1)."""
    has_db = (p / "lmdb" / "data.mdb").is_file() or (p / "lmdb.old" / "data.mdb").is_file()
    return (p / "vault.toml").is_file() and has_db  # (lmdb.old: a compaction was cut)


def _check_store(p: Path) -> None:
    if not is_store(p):
        raise StoreError(f"{p} is not a vaultfs store (create one with `vaultfs init {p}`)")


def _open_env(p: Path, writable: bool) -> lmdb.Environment:
    """Readers map the file read-only. (WRITEMAP was measured and left out: it made bulk
    commits faster in isolation but ingest through the mount slower, 139 vs 186 MB/s, and a
    small synced commit 3.7x slower, 981 vs 268 us.)"""
    if writable:  # (a reader must not make an empty lmdb/ beside an interrupted compaction's)
        (p / "lmdb").mkdir(exist_ok=True)
    _reserve_lock_file(p / "lmdb" / "lock.mdb")
    try:
        # readahead helps large values (cold random reads of chunks are 12x faster with it).
        return lmdb.open(str(p / "lmdb"), map_size=MAP_SIZE, max_dbs=len(F.ALL_DBS) + 4,
                         readonly=not writable, readahead=True, max_readers=256,
                         max_spare_txns=8)
    except lmdb.Error as e:
        raise StoreError(f"cannot open the store's database in {p / 'lmdb'}: {e}") from None


def _reserve_lock_file(path: Path) -> None:
    """LMDB keeps its reader table in lock.mdb through a shared memory map: a page of it that
    the disk has no block for kills the process with SIGBUS when first touched. Allocating the
    blocks first turns a full disk into a clear error."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return  # a read-only store: LMDB says what it can do
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"the disk holding {path.parent.parent} is full") from None
    finally:
        os.close(fd)


def _open_dbs(env: lmdb.Environment, create: bool, writable: bool = True) -> dict:
    dbs = {}
    for name in F.ALL_DBS:
        try:
            dbs[name] = env.open_db(name, create=create or (writable and name in F.LATER_DBS))
        except lmdb.NotFoundError:
            if name not in F.LATER_DBS:
                raise StoreError(f"{env.path()} is missing databases; the store is "
                                 f"damaged") from None
    return dbs


def _check_tmpfile(spool: Path) -> None:
    """The spool needs anonymous files (O_TMPFILE): ext4, xfs, btrfs and tmpfs have them,
    FAT, exFAT and NFS do not."""
    try:
        os.close(os.open(spool, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise StoreError(f"the filesystem holding {spool.parent} cannot hold a vault's "
                             f"write spool (no O_TMPFILE); use ext4, xfs or btrfs") from None
        raise


def _take_lock(p: Path) -> int:
    fd = os.open(p / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreBusy(f"{p} is in use by another vaultfs process (mounted?)") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
