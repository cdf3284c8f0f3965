"""The Operations class called directly on trio (pytest-trio), over a real store on disk: the
paths a mount cannot steer precisely, such as the background ingest of a file written front to
back, and the errno of every refusal."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from vaultfs.chunking import MIN_SIZE
from vaultfs.fs.operations import STREAM_STEP, VaultOperations
from vaultfs.fs.views import STATUS_INO, VAULT_INO
from vaultfs.store import ROOT_INO, Store
from vaultfs.store import format as F

ROOT = SimpleNamespace(uid=0, gid=0, umask=0o022, pid=1)


@pytest.fixture
async def ops(store_path):
    store = Store.open(store_path, writable=True)
    ops = VaultOperations(store)
    try:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            yield ops
            await ops.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def pending_refs(ops: VaultOperations) -> int:
    with ops.store.reader() as tx, tx.txn.cursor(db=tx.dbs[F.DB_PENDING]) as c:
        return sum(1 for _ in c)


async def test_a_file_written_front_to_back_is_stored_before_close(ops):
    fi, attrs = await ops.create(ROOT_INO, b"DSC_0001.NEF", 0o644, os.O_WRONLY, ROOT)
    data = random.Random(1).randbytes(3 * STREAM_STEP)
    for off in range(0, len(data), 128 * 1024):
        assert await ops.write(fi.fh, off, data[off:off + 128 * 1024]) == 128 * 1024
    # The background ingest holds what it stored as pending references until the commit.
    with trio.fail_after(30):
        while pending_refs(ops) == 0:
            await trio.sleep(0.01)
    await ops.flush(fi.fh)
    assert pending_refs(ops) == 0
    await ops.release(fi.fh)
    fi = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT)
    assert await ops.read(fi.fh, 0, len(data) + 10) == data
    await ops.release(fi.fh)
    status = json.loads(ops.views.content(STATUS_INO))
    assert status["logical_bytes"] == len(data) and status["uncommitted_files"] == 0


async def test_a_rewrite_below_what_was_ingested_is_committed_whole(ops):
    fi, attrs = await ops.create(ROOT_INO, b"session.cos", 0o644, os.O_RDWR, ROOT)
    data = bytearray(random.Random(2).randbytes(2 * STREAM_STEP))
    await ops.write(fi.fh, 0, bytes(data))
    with trio.fail_after(30):
        while pending_refs(ops) == 0:
            await trio.sleep(0.01)
    await ops.write(fi.fh, 5, b"EDITED")  # lands in bytes the background already stored
    data[5:11] = b"EDITED"
    await ops.fsync(fi.fh, False)
    assert await ops.read(fi.fh, 0, len(data)) == bytes(data)
    await ops.release(fi.fh)
    assert pending_refs(ops) == 0
    fi = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT)
    assert await ops.read(fi.fh, 0, len(data)) == bytes(data)
    await ops.release(fi.fh)


async def test_refusals_carry_the_errno_a_program_expects(ops):
    async def errno_of(coro) -> int:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await coro
        return e.value.errno

    assert (await ops.lookup(ROOT_INO, b"missing", ROOT)).st_ino == 0  # cacheable "no such"
    assert await errno_of(ops.lookup(ROOT_INO, b"x" * 256, ROOT)) == errno.ENAMETOOLONG
    attrs = await ops.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    await ops.create(attrs.st_ino, b"f", 0o644, os.O_WRONLY, ROOT)
    assert await errno_of(ops.mkdir(ROOT_INO, b"d", 0o755, ROOT)) == errno.EEXIST
    assert await errno_of(ops.rmdir(ROOT_INO, b"d", ROOT)) == errno.ENOTEMPTY
    assert await errno_of(ops.unlink(ROOT_INO, b"d", ROOT)) == errno.EISDIR
    assert await errno_of(ops.mkdir(ROOT_INO, b".vault", 0o755, ROOT)) == errno.EEXIST
    assert await errno_of(ops.rename(ROOT_INO, b".vault", ROOT_INO, b"v", 0, ROOT)) == \
        errno.EBUSY
    assert await errno_of(ops.create(VAULT_INO, b"x", 0o644, os.O_WRONLY, ROOT)) == errno.EROFS
    assert await errno_of(ops.open(STATUS_INO, os.O_WRONLY, ROOT)) == errno.EROFS
    assert await errno_of(ops.getxattr(attrs.st_ino, b"user.none", ROOT)) == pyfuse3.ENOATTR


async def test_a_create_of_a_name_the_kernel_took_for_free_opens_the_file(ops):
    # The kernel sends CREATE for a name it caches as free; an import or a capture policy may
    # have put a file there since (the kernel drops its "no such file" a moment later). As on
    # a local file system, the file is opened, and emptied with O_TRUNC; O_EXCL still refuses,
    # a folder is EISDIR, and a user who may not write the file gets EACCES.
    async def errno_of(coro) -> int:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await coro
        return e.value.errno

    fi, attrs = await ops.create(ROOT_INO, b"IMG_0001.xmp", 0o644, os.O_WRONLY, ROOT)
    await ops.write(fi.fh, 0, b"<the policy's sidecar>")
    await ops.release(fi.fh)
    fi, again = await ops.create(ROOT_INO, b"IMG_0001.xmp", 0o644, os.O_WRONLY | os.O_TRUNC,
                                 ROOT)
    assert (again.st_ino, again.st_size) == (attrs.st_ino, 0)
    await ops.write(fi.fh, 0, b"<the app's>")
    await ops.release(fi.fh)
    fi, kept = await ops.create(ROOT_INO, b"IMG_0001.xmp", 0o600, os.O_RDWR, ROOT)
    assert (kept.st_size, stat.S_IMODE(kept.st_mode)) == (len(b"<the app's>"), 0o644)
    assert await ops.read(fi.fh, 0, 100) == b"<the app's>"
    await ops.release(fi.fh)
    assert await errno_of(ops.create(ROOT_INO, b"IMG_0001.xmp", 0o644,
                                     os.O_WRONLY | os.O_EXCL, ROOT)) == errno.EEXIST
    await ops.mkdir(ROOT_INO, b"day1", 0o755, ROOT)
    assert await errno_of(ops.create(ROOT_INO, b"day1", 0o644, os.O_WRONLY, ROOT)) == \
        errno.EISDIR
    user = SimpleNamespace(uid=1000, gid=1000, umask=0o022, pid=os.getpid())
    assert await errno_of(ops.create(ROOT_INO, b"IMG_0001.xmp", 0o644,
                                     os.O_WRONLY | os.O_TRUNC, user)) == errno.EACCES
    fi, _ = await ops.create(ROOT_INO, b"IMG_0001.xmp", 0o644, os.O_RDONLY, user)
    assert await ops.read(fi.fh, 0, 100) == b"<the app's>"  # others may read it
    await ops.release(fi.fh)


async def test_new_entries_honour_umask_and_setgid_directories(ops):
    d = await ops.mkdir(ROOT_INO, b"shared", 0o2775, ROOT)
    await ops.setattr(d.st_ino, SimpleNamespace(st_gid=100), SimpleNamespace(
        update_size=False, update_mode=False, update_uid=False, update_gid=True,
        update_atime=False, update_mtime=False, update_ctime=False), None, ROOT)
    user = SimpleNamespace(uid=1000, gid=1000, umask=0o027, pid=2)
    _, f = await ops.create(d.st_ino, b"frame.jpg", 0o666, os.O_WRONLY, user)
    sub = await ops.mkdir(d.st_ino, b"day2", 0o777, user)
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 100, 0o640)
    assert (sub.st_gid, stat.S_IMODE(sub.st_mode)) == (100, 0o2750)


async def test_unlinked_while_open_lives_until_release(ops):
    fi, attrs = await ops.create(ROOT_INO, b"tmp.xmp", 0o644, os.O_RDWR, ROOT)
    await ops.write(fi.fh, 0, b"sidecar")
    await ops.flush(fi.fh)
    await ops.unlink(ROOT_INO, b"tmp.xmp", ROOT)
    assert await ops.read(fi.fh, 0, 100) == b"sidecar"
    assert (await ops.getattr(attrs.st_ino, ROOT)).st_nlink == 0
    await ops.release(fi.fh)
    await ops.forget([(attrs.st_ino, 1)])
    with ops.store.reader() as tx:
        assert tx.inode(attrs.st_ino) is None
    assert json.loads(ops.views.content(STATUS_INO))["files"] == 0


async def test_appending_to_a_committed_file_cuts_only_what_is_new(ops, monkeypatch):
    """A data logger appends and fsyncs: each commit must cost what was appended, not the
    whole file (and a rewrite in place still commits the right bytes)."""
    import vaultfs.fs.ingest as ingest

    starts = []
    real = ingest.split_file

    def recording(fd, start, end, *args):
        starts.append(start)
        return real(fd, start, end, *args)

    monkeypatch.setattr(ingest, "split_file", recording)
    fi, attrs = await ops.create(ROOT_INO, b"logger.csv", 0o644, os.O_WRONLY, ROOT)
    rng = random.Random(3)
    data = b""
    for _ in range(4):
        piece = rng.randbytes(3 * 1024 * 1024)
        await ops.write(fi.fh, len(data), piece)
        data += piece
        starts.clear()
        await ops.fsync(fi.fh, False)
        # Cutting starts where the last commit ended, or (after a short last chunk) at most
        # MIN_SIZE before it.
        assert min(starts) >= len(data) - len(piece) - MIN_SIZE, starts
    await ops.release(fi.fh)
    # Reopened later for appending: the committed chunks are kept too.
    fi = await ops.open(attrs.st_ino, os.O_WRONLY | os.O_APPEND, ROOT)
    await ops.write(fi.fh, len(data), b"tail")
    data += b"tail"
    starts.clear()
    await ops.flush(fi.fh)
    assert min(starts) > 0
    await ops.write(fi.fh, 10, b"rewritten")  # below what is committed: cut anew
    data = data[:10] + b"rewritten" + data[19:]
    starts.clear()
    await ops.release(fi.fh)
    assert starts[0] == 0
    fi = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT)
    assert await ops.read(fi.fh, 0, len(data) + 1) == data
    await ops.release(fi.fh)


async def test_a_commit_that_fails_twice_is_redone_whole(ops, monkeypatch):
    """A full disk refuses a file's commit and then the clean-up after it: the retry must store
    every byte, not resume from where the failed attempt had cut."""
    fi, attrs = await ops.create(ROOT_INO, b"DSC_0002.NEF", 0o644, os.O_WRONLY, ROOT)
    data = random.Random(4).randbytes(12 * 1024 * 1024)
    await ops.write(fi.fh, 0, data)
    writer = ops.store.writer
    real, failures = writer.call, [2]

    def failing(fn, *args):
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "the store's disk is full")
        return real(fn, *args)

    monkeypatch.setattr(writer, "call", failing)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.fsync(fi.fh, False)
    assert e.value.errno == errno.ENOSPC and failures == [0]
    await ops.release(fi.fh)  # the disk has room again: this commit must be whole
    fi = await ops.open(attrs.st_ino, os.O_RDONLY, ROOT)
    assert await ops.read(fi.fh, 0, len(data) + 1) == data
    await ops.release(fi.fh)
