"""POSIX conformance through a real mount: what pjdfstest checks, and what capture programs and
unix tools rely on, judged against what ext4 does.

Everything here drives a real `vaultfs mount` daemon (the `mnt` / `make_mount` fixtures) with
Python's os module and real programs. Reads that must come from the daemon, not from the kernel's
page cache, drop that file's cache first (`read_uncached`). Checks that run as another user fork a
child that drops to uid 65534 (nobody) after changing into the mount, so the test's private
temporary directory need not be traversable by it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import pickle
import random
import sqlite3
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import needs_fuse

pytestmark = needs_fuse

NOBODY = 65534
GiB = 1 << 30
MiB = 1 << 20


# ---- helpers ----------------------------------------------------------------------------------
def raises(err: int | tuple[int, ...], fn, *args, **kw) -> int:
    """Call fn, which must fail with (one of) the given errno(s)."""
    errs = err if isinstance(err, tuple) else (err,)
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno in errs, f"{fn.__name__}{args}: {e.value!r}, wanted {errs}"
    return e.value.errno


def write_file(path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read_uncached(path, offset: int = 0, size: int = -1) -> bytes:
    """Read through the daemon: drop the kernel's cached pages of this file first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if size < 0:
            size = os.fstat(fd).st_size - offset
        out = b""
        while len(out) < size:
            chunk = os.pread(fd, size - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def status(mnt: Path) -> dict:
    return json.loads((mnt / ".vault" / "status.json").read_bytes())


def wait_for(pred, what: str, deadline_s: float = 20.0):
    """Poll until pred() is true (the kernel sends RELEASE and FORGET asynchronously)."""
    end = time.monotonic() + deadline_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def as_user(fn, *, cwd, uid: int = NOBODY, gid: int = NOBODY, groups=(), umask: int | None = None):
    """Run fn() in a forked child as uid/gid; returns ("ok", value) or ("err", errno)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        res = ("exc", "unknown")
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if umask is not None:
                os.umask(umask)
            try:
                res = ("ok", fn())
            except OSError as e:
                res = ("err", e.errno)
        except BaseException as e:  # noqa: BLE001
            res = ("exc", repr(e))
        finally:
            try:
                os.write(w, pickle.dumps(res))
            finally:
                os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    res = pickle.loads(data)
    assert res[0] != "exc", res
    return res


def ok(res):
    assert res[0] == "ok", f"expected success, got errno {res[1]} ({os.strerror(res[1])})"
    return res[1]


def err(res) -> int:
    assert res[0] == "err", f"expected an error, got success: {res[1]!r}"
    return res[1]


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


# ---- create, open, read, write ----------------------------------------------------------------
def test_create_excl_trunc(mnt):
    f = mnt / "a.cr2"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 11 and st.st_nlink == 1 and st.st_uid == 0 and st.st_gid == 0
    raises(errno.EEXIST, os.open, f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    # O_EXCL also refuses a dangling symlink, without creating its target
    os.symlink("nowhere", mnt / "dangling")
    raises(errno.EEXIST, os.open, mnt / "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert not (mnt / "nowhere").exists()
    # O_CREAT without O_EXCL opens the existing file, keeping its content and mode
    os.close(os.open(f, os.O_RDWR | os.O_CREAT, 0o600))
    assert f.read_bytes() == b"hello world" and stat.S_IMODE(os.stat(f).st_mode) == 0o640
    # O_TRUNC empties it, changes mtime and ctime
    before = os.stat(f)
    time.sleep(0.02)
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.close(fd)
    after = os.stat(f)
    assert after.st_size == 0 and read_uncached(f) == b""
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    # O_TRUNC then write, read back from the daemon
    write_file(f, b"second")
    assert read_uncached(f) == b"second"
    # a missing file without O_CREAT
    raises(errno.ENOENT, os.open, mnt / "missing", os.O_RDONLY)
    # opening a directory for writing
    os.mkdir(mnt / "d")
    raises(errno.EISDIR, os.open, mnt / "d", os.O_WRONLY)
    # a path through a file
    raises(errno.ENOTDIR, os.open, mnt / "a.cr2" / "x", os.O_RDONLY)


def test_append(mnt):
    f = mnt / "log.csv"
    write_file(f, b"abc")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"def")
    assert os.lseek(fd, 0, os.SEEK_CUR) == 6
    os.close(fd)
    assert read_uncached(f) == b"abcdef"
    # two appenders interleave without overwriting each other (a data logger and a second one)
    fds = [os.open(f, os.O_WRONLY | os.O_APPEND) for _ in range(2)]
    for i in range(200):
        os.write(fds[i % 2], b"%d:%03d\n" % (i % 2, i))
    for fd in fds:
        os.close(fd)
    expected = b"abcdef" + b"".join(b"%d:%03d\n" % (i % 2, i) for i in range(200))
    assert f.read_bytes() == expected and read_uncached(f) == expected
    # shell append, a real program
    subprocess.run(["sh", "-c", f"echo one >> '{f}'; echo two >> '{f}'"], check=True)
    assert read_uncached(f) == expected + b"one\ntwo\n"


def test_random_writes_match_a_model(mnt):
    rng = random.Random(1234)
    f = mnt / "random.bin"
    model = bytearray()
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(400):
        off = rng.randrange(0, 3 * MiB)
        n = rng.choice([1, 7, 512, 4096, 65536, 300_000])
        data = rng.randbytes(n)
        assert os.pwrite(fd, data, off) == n
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off:off + n] = data
        if i % 50 == 0:  # read after write, before close, through the same fd
            roff = rng.randrange(0, len(model))
            assert os.pread(fd, 100_000, roff) == bytes(model[roff:roff + 100_000])
        if i == 200:
            os.fsync(fd)  # a commit in the middle, then more changes on top of it
    assert os.fstat(fd).st_size == len(model)
    os.close(fd)
    assert os.stat(f).st_size == len(model)
    assert read_uncached(f) == bytes(model)
    # change a committed file in place (re-open, overwrite in the middle)
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 10, 1000)
    model[1000:1010] = b"\xff" * 10
    os.close(fd)
    assert read_uncached(f) == bytes(model)


def test_read_after_write_before_close(mnt):
    f = mnt / "tether.jpg"
    data = os.urandom(3 * MiB + 17)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data[:2 * MiB])
    # another descriptor and another process see what is written, while the writer is open
    rfd = os.open(f, os.O_RDONLY)
    assert os.pread(rfd, 2 * MiB, 0) == data[:2 * MiB]
    assert os.fstat(rfd).st_size == 2 * MiB
    os.write(fd, data[2 * MiB:])
    assert os.pread(rfd, len(data), 0) == data
    out = subprocess.run(["cat", str(f)], capture_output=True, check=True).stdout
    assert out == data
    assert os.stat(f).st_size == len(data)
    # the daemon's own copy (not the page cache) is current too
    assert read_uncached(f) == data
    os.close(rfd)
    os.close(fd)
    assert read_uncached(f) == data


def test_mmap(mnt):
    f = mnt / "mapped.bin"
    data = os.urandom(MiB + 123)
    write_file(f, data)
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
        assert len(m) == len(data) and m[:] == data and m[MiB:MiB + 123] == data[MiB:]
    os.close(fd)
    # a shared writable mapping, msync'ed, reaches the file
    fd = os.open(f, os.O_RDWR)
    with mmap.mmap(fd, 0) as m:
        m[10:20] = b"0123456789"
        m.flush()
    os.close(fd)
    expected = data[:10] + b"0123456789" + data[20:]
    assert f.read_bytes() == expected and read_uncached(f) == expected


# ---- sizes: truncate, extend, holes, large files ----------------------------------------------
def test_truncate_shrink_and_grow(mnt):
    f = mnt / "t.bin"
    data = os.urandom(MiB)
    write_file(f, data)
    os.truncate(f, 300_000)  # by path: no open handle
    assert os.stat(f).st_size == 300_000 and read_uncached(f) == data[:300_000]
    os.truncate(f, 2_000_000)  # grows with zeros
    assert os.stat(f).st_size == 2_000_000
    assert read_uncached(f) == data[:300_000] + bytes(1_700_000)
    # ftruncate on an open file, then writes, then close
    fd = os.open(f, os.O_RDWR)
    os.ftruncate(fd, 100)
    assert os.fstat(fd).st_size == 100 and os.pread(fd, 1000, 0) == data[:100]
    os.ftruncate(fd, 5000)
    assert os.pread(fd, 10_000, 0) == data[:100] + bytes(4900)
    os.pwrite(fd, b"end", 10_000)  # writing past EOF leaves a zero gap
    os.close(fd)
    expected = data[:100] + bytes(9900) + b"end"
    assert os.stat(f).st_size == 10_003 and read_uncached(f) == expected
    # shrinking to zero and growing again: no old bytes reappear
    os.truncate(f, 0)
    os.truncate(f, 50_000)
    assert read_uncached(f) == bytes(50_000)
    # a real program
    subprocess.run(["truncate", "-s", "7", str(f)], check=True)
    assert os.stat(f).st_size == 7
    raises(errno.EISDIR, os.truncate, mnt, 0)


def test_sparse_and_larger_than_4gib(mnt):
    # One commit only: committing a spool costs time in proportion to its apparent size.
    f = mnt / "panorama.tif"
    base = status(mnt)["logical_bytes"]
    offs = [0, 10 * MiB, 4 * GiB - 3, 4 * GiB + 12345]
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    for i, off in enumerate(offs):
        os.pwrite(fd, b"DATA%02d" % i, off)
    os.pwrite(fd, b"X", 4 * GiB + 1)  # over the piece that straddles 4 GiB
    assert os.pread(fd, 6, 4 * GiB - 3) == b"DATAX2"
    size = 4 * GiB + 64 * MiB
    os.ftruncate(fd, size)  # grow above 4 GiB with zeros
    assert os.fstat(fd).st_size == size
    os.close(fd)
    assert os.stat(f).st_size == size
    expect = {0: b"DATA00", 10 * MiB: b"DATA01", 4 * GiB - 3: b"DATAX2",
              4 * GiB + 12345: b"DATA03"}
    for off, data in expect.items():
        assert read_uncached(f, off, 6) == data
        assert read_uncached(f, off + 6, 4096) == bytes(4096)
        if off:
            assert read_uncached(f, off - 100, 100) == bytes(100)
    assert read_uncached(f, 2 * GiB, 1 << 16) == bytes(1 << 16)
    assert read_uncached(f, size - 10, 100) == bytes(10)  # short read at EOF
    assert read_uncached(f, size, 100) == b""
    # with mmap above 4 GiB
    fd = os.open(f, os.O_RDONLY)
    with mmap.mmap(fd, MiB, prot=mmap.PROT_READ, offset=4 * GiB) as m:
        assert m[12345:12351] == b"DATA03" and m[1] == ord("X")
    os.close(fd)
    # holes cost nothing in the store, and du says so, as on ext4
    assert status(mnt)["logical_bytes"] - base < 64 * MiB
    assert os.stat(f).st_blocks * 512 < 64 * MiB
    du = subprocess.run(["du", "-k", str(f)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) < 64 * 1024
    # a real program reads the far end
    out = subprocess.run(["tail", "-c", str(size - 4 * GiB - 12345), str(f)],
                         capture_output=True, check=True).stdout
    assert out[:6] == b"DATA03" and len(out) == size - 4 * GiB - 12345
    os.unlink(f)
    wait_for(lambda: status(mnt)["logical_bytes"] == base, "the panorama's space freed")


def test_sparse_seek_data_hole_consistent(mnt):
    # whatever the filesystem reports as data and holes must agree with the bytes
    f = mnt / "sparse.bin"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"z", 100 * MiB)
    os.close(fd)
    fd = os.open(f, os.O_RDONLY)
    try:
        data_at = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        assert e.errno == errno.ENXIO
        data_at = None
    assert data_at is None or data_at <= 100 * MiB
    os.close(fd)
    assert read_uncached(f, 100 * MiB - 5, 10) == bytes(5) + b"z"


# ---- rename -----------------------------------------------------------------------------------
def test_rename_plain_and_over_existing(mnt):
    a, b = mnt / "a", mnt / "b"
    write_file(a, b"AAA")
    ino = os.stat(a).st_ino
    os.rename(a, b)
    assert not a.exists() and os.stat(b).st_ino == ino and read_uncached(b) == b"AAA"
    assert sorted(os.listdir(mnt)) == ["b"]
    # over an existing file: the old one stays readable through an open fd, then goes
    write_file(a, b"new content")
    fd = os.open(b, os.O_RDONLY)
    ino_a = os.stat(a).st_ino
    os.rename(a, b)
    assert os.stat(b).st_ino == ino_a and read_uncached(b) == b"new content"
    assert os.pread(fd, 100, 0) == b"AAA" and os.fstat(fd).st_nlink == 0
    os.close(fd)
    assert sorted(os.listdir(mnt)) == ["b"]
    raises(errno.ENOENT, os.rename, mnt / "missing", mnt / "c")
    # renaming a name onto another link of the same file does nothing
    os.link(b, mnt / "b2")
    os.rename(b, mnt / "b2")
    assert b.exists() and (mnt / "b2").exists() and os.stat(b).st_nlink == 2
    # rename to itself
    os.rename(b, b)
    assert b.read_bytes() == b"new content"
    # a real program
    subprocess.run(["mv", str(b), str(mnt / "c")], check=True)
    assert (mnt / "c").read_bytes() == b"new content" and not b.exists()


def test_rename_into_place(mnt):
    """What tethering software and editors do: write a temp file, fsync, rename over the target."""
    final = mnt / "IMG_0001.xmp"
    for version in range(5):
        tmp = mnt / f".IMG_0001.xmp.tmp{version}"
        data = os.urandom(50_000) + b"version %d" % version
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        assert read_uncached(final) == data
        assert final.read_bytes() == data
        assert sorted(os.listdir(mnt)) == ["IMG_0001.xmp"]
    # rename into place while the file is still open for writing (not yet closed)
    tmp = mnt / "tmp-open"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"late bytes")
    os.rename(tmp, final)
    os.write(fd, b" and more")
    os.close(fd)
    assert read_uncached(final) == b"late bytes and more"


def test_rename_directories(mnt):
    d1, d2 = mnt / "d1", mnt / "d2"
    os.mkdir(d1)
    os.mkdir(d2)
    os.mkdir(d1 / "sub")
    write_file(d1 / "sub" / "f", b"inside")
    root_nlink = os.stat(mnt).st_nlink
    assert os.stat(d1).st_nlink == 3 and os.stat(d2).st_nlink == 2
    sub_ino = os.stat(d1 / "sub").st_ino
    os.rename(d1 / "sub", d2 / "sub")
    assert os.stat(d1).st_nlink == 2 and os.stat(d2).st_nlink == 3
    st = os.stat(d2 / "sub")
    assert st.st_ino == sub_ino and st.st_nlink == 2
    assert os.stat(d2 / "sub" / "..").st_ino == os.stat(d2).st_ino
    assert read_uncached(d2 / "sub" / "f") == b"inside"
    assert os.listdir(d1) == [] and os.listdir(d2) == ["sub"]
    assert os.stat(mnt).st_nlink == root_nlink
    # a directory over an empty one replaces it; the parent loses a link
    os.mkdir(d2 / "empty")
    assert os.stat(d2).st_nlink == 4
    os.rename(d2 / "sub", d2 / "empty")
    assert os.stat(d2).st_nlink == 3 and os.listdir(d2) == ["empty"]
    assert (d2 / "empty" / "f").read_bytes() == b"inside"
    # over a non-empty directory: ENOTEMPTY (ext4 says ENOTEMPTY; POSIX also allows EEXIST)
    os.mkdir(d1 / "full")
    write_file(d1 / "full" / "x", b"")
    raises(errno.ENOTEMPTY, os.rename, d2 / "empty", d1 / "full")
    assert (d1 / "full" / "x").exists() and (d2 / "empty" / "f").exists()
    # kinds that cannot replace each other
    write_file(mnt / "file", b"")
    raises(errno.ENOTDIR, os.rename, d2 / "empty", mnt / "file")
    raises(errno.EISDIR, os.rename, mnt / "file", d1 / "full")
    # a directory into itself
    raises(errno.EINVAL, os.rename, d2, d2 / "empty" / "inner")
    # a whole tree across parents with a real program
    subprocess.run(["mv", str(d2 / "empty"), str(d1 / "moved")], check=True)
    assert (d1 / "moved" / "f").read_bytes() == b"inside"
    assert os.stat(d1).st_nlink == 4 and os.stat(d2).st_nlink == 2


def test_rename_noreplace_and_exchange(mnt):
    a, b = mnt / "a", mnt / "b"
    write_file(a, b"A")
    write_file(b, b"B")
    raises(errno.EEXIST, renameat2, a, b, RENAME_NOREPLACE)
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    renameat2(a, mnt / "c", RENAME_NOREPLACE)
    assert not a.exists() and (mnt / "c").read_bytes() == b"A"
    # mv -n (no clobber) leaves the target alone
    subprocess.run(["mv", "-n", str(mnt / "c"), str(b)], capture_output=True)
    assert b.read_bytes() == b"B" and (mnt / "c").read_bytes() == b"A"
    # RENAME_EXCHANGE swaps a file and a directory atomically
    os.mkdir(mnt / "d")
    root_nlink = os.stat(mnt).st_nlink
    renameat2(mnt / "c", mnt / "d", RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.stat(mnt / "c").st_mode) and (mnt / "d").read_bytes() == b"A"
    assert os.stat(mnt).st_nlink == root_nlink
    os.mkdir(mnt / "e")
    renameat2(mnt / "c", mnt / "e" / "x", RENAME_NOREPLACE)
    renameat2(mnt / "d", mnt / "e" / "x", RENAME_EXCHANGE)
    assert (mnt / "e" / "x").read_bytes() == b"A" and stat.S_ISDIR(os.stat(mnt / "d").st_mode)
    assert os.stat(mnt / "e").st_nlink == 2 and os.stat(mnt).st_nlink == root_nlink + 1
    raises(errno.ENOENT, renameat2, b, mnt / "nothing", RENAME_EXCHANGE)


# ---- unlink while open, hard links, symlinks --------------------------------------------------
def test_unlink_while_open_frees_space_after_close(mnt):
    base = status(mnt)["logical_bytes"]
    f = mnt / "tmp.raw"
    data = os.urandom(2 * MiB)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    assert status(mnt)["logical_bytes"] == base + len(data)  # fsync committed it
    os.unlink(f)
    assert "tmp.raw" not in os.listdir(mnt)
    raises(errno.ENOENT, os.stat, f)
    assert os.fstat(fd).st_nlink == 0
    assert os.pread(fd, len(data), 0) == data
    os.pwrite(fd, b"still writable", 100)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 20, 95) == data[95:100] + b"still writable" + data[114:115]
    # the name can be reused at once for a new file
    write_file(f, b"other")
    assert f.read_bytes() == b"other"
    os.close(fd)
    wait_for(lambda: status(mnt)["logical_bytes"] == base + 5,
             "space of the unlinked file freed after its last close")
    assert status(mnt)["files"] == 1


def test_hard_links(mnt):
    a, b = mnt / "a", mnt / "dir" / "b"
    os.mkdir(mnt / "dir")
    write_file(a, b"shared")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    with open(b, "r+b") as fh:  # a write through one name is seen through the other
        fh.seek(0)
        fh.write(b"SHARED")
    assert a.read_bytes() == b"SHARED" and read_uncached(a) == b"SHARED"
    os.link(b, mnt / "c")
    assert os.stat(a).st_nlink == 3
    os.unlink(a)
    assert os.stat(b).st_nlink == 2 and read_uncached(b) == b"SHARED"
    os.unlink(mnt / "c")
    assert os.stat(b).st_nlink == 1 and read_uncached(b) == b"SHARED"
    raises(errno.EEXIST, os.link, b, mnt / "dir" / "b")
    raises(errno.EPERM, os.link, mnt / "dir", mnt / "dirlink")
    raises(errno.ENOENT, os.link, mnt / "missing", mnt / "x")
    # a real program
    subprocess.run(["ln", str(b), str(mnt / "d")], check=True)
    assert os.stat(mnt / "d").st_nlink == 2


def test_symlinks(mnt):
    write_file(mnt / "target.jpg", b"pixels")
    os.symlink("target.jpg", mnt / "link")
    assert os.readlink(mnt / "link") == "target.jpg"
    lst = os.lstat(mnt / "link")
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target.jpg")
    assert os.stat(mnt / "link").st_ino == os.stat(mnt / "target.jpg").st_ino
    assert (mnt / "link").read_bytes() == b"pixels"
    # dangling
    os.symlink("../no/such/file", mnt / "dangling")
    assert os.path.lexists(mnt / "dangling") and not os.path.exists(mnt / "dangling")
    raises(errno.ENOENT, os.stat, mnt / "dangling")
    assert os.readlink(mnt / "dangling") == "../no/such/file"
    # to a directory, absolute, long, non-UTF-8 targets
    os.mkdir(mnt / "d")
    os.symlink(mnt / "d", mnt / "dirlink")
    write_file(mnt / "dirlink" / "f", b"via link")
    assert (mnt / "d" / "f").read_bytes() == b"via link"
    long_target = "x/" * 2000 + "end"
    os.symlink(long_target, mnt / "long")
    assert os.readlink(mnt / "long") == long_target
    os.symlink(b"caf\xe9\xff", os.fsencode(mnt / "bytes"))
    assert os.readlink(os.fsencode(mnt / "bytes")) == b"caf\xe9\xff"
    raises(errno.EINVAL, os.readlink, mnt / "target.jpg")
    raises(errno.EEXIST, os.symlink, "x", mnt / "link")
    # unlinking the link leaves the target
    os.unlink(mnt / "link")
    assert (mnt / "target.jpg").read_bytes() == b"pixels"
    subprocess.run(["ln", "-s", "target.jpg", str(mnt / "l2")], check=True)
    assert os.readlink(mnt / "l2") == "target.jpg"


# ---- directories ------------------------------------------------------------------------------
def test_mkdir_rmdir_errors(mnt):
    d = mnt / "shoot"
    os.mkdir(d, 0o755)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_nlink == 2
    root_nlink = os.stat(mnt).st_nlink
    raises(errno.EEXIST, os.mkdir, d)
    write_file(d / "f", b"x")
    raises(errno.ENOTEMPTY, os.rmdir, d)
    raises(errno.ENOTDIR, os.rmdir, d / "f")
    raises(errno.ENOTDIR, os.mkdir, d / "f" / "sub")
    raises(errno.EISDIR, os.unlink, d)
    raises(errno.ENOENT, os.rmdir, mnt / "missing")
    raises(errno.ENOENT, os.mkdir, mnt / "missing" / "sub")
    raises(errno.EEXIST, os.mkdir, d / "f")
    raises(errno.EINVAL, os.rmdir, os.path.join(d, "."))
    os.mkdir(d / "sub")
    assert os.stat(d).st_nlink == 3
    os.rmdir(d / "sub")
    assert os.stat(d).st_nlink == 2
    os.unlink(d / "f")
    os.rmdir(d)
    assert os.listdir(mnt) == [] and os.stat(mnt).st_nlink == root_nlink - 1
    # a removed directory that is still the cwd of a process takes no new entries
    os.mkdir(d)
    r = subprocess.run(["sh", "-c", "rmdir ../shoot && : > newfile"], cwd=d, capture_output=True)
    assert r.returncode != 0 and not d.exists()
    # mkdir -p and rm -r, real programs
    subprocess.run(["mkdir", "-p", str(mnt / "a" / "b" / "c")], check=True)
    write_file(mnt / "a" / "b" / "c" / "f", b"1")
    subprocess.run(["rm", "-r", str(mnt / "a")], check=True)
    assert os.listdir(mnt) == []


def test_readdir_types_and_dots(mnt):
    os.mkdir(mnt / "d")
    write_file(mnt / "f", b"")
    os.symlink("f", mnt / "l")
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(), e.inode())
             for e in os.scandir(mnt)}
    assert kinds["d"][:2] == (True, False) and kinds["f"][:2] == (False, False)
    assert kinds["l"][:2] == (False, True)
    assert kinds["f"][2] == os.stat(mnt / "f").st_ino


def test_readdir_lists_dot_and_dotdot(mnt):
    """ext4 returns "." and ".." from getdents; `ls -a` and scripts that count entries see them."""
    os.mkdir(mnt / "d")
    write_file(mnt / "f", b"")
    os.symlink("f", mnt / "l")
    ls = subprocess.run(["ls", "-a", str(mnt)], capture_output=True, text=True, check=True)
    assert ls.stdout.split() == [".", "..", "d", "f", "l"]


# ---- metadata ---------------------------------------------------------------------------------
def test_chmod_chown_utime_ns(mnt):
    f = mnt / "f"
    write_file(f, b"data")
    for mode in (0o000, 0o4755, 0o2750, 0o1777, 0o7777, 0o644):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
        assert stat.S_ISREG(os.stat(f).st_mode)
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 42)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 42)
    os.lchown(f, 0, 0)
    # nanosecond times, also before 1970 and after 2038
    for atime, mtime in [(1_234_567_890_123_456_789, 1_600_000_000_987_654_321),
                         (1, 999_999_999), (4_102_444_800_000_000_001, 2_147_483_648_000_000_007),
                         (-86_400_000_000_000, -1_000_000_000)]:
        os.utime(f, ns=(atime, mtime))
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    # utime(None) is now; touch -d and touch -h (a symlink's own times), real programs
    before = time.time_ns()
    os.utime(f)
    assert os.stat(f).st_mtime_ns >= before - 10_000_000
    subprocess.run(["touch", "-d", "2001-02-03 04:05:06.123456789", str(f)], check=True)
    out = subprocess.run(["stat", "-c", "%y", str(f)], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("2001-02-03 04:05:06.123456789")
    os.symlink("f", mnt / "l")
    os.utime(mnt / "l", ns=(5, 6), follow_symlinks=False)
    assert os.lstat(mnt / "l").st_mtime_ns == 6 and os.stat(f).st_mtime_ns != 6
    # a directory's mode and owner
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o3777)
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o3777
    os.chown(mnt / "d", 7, 8)
    assert (os.stat(mnt / "d").st_uid, os.stat(mnt / "d").st_gid) == (7, 8)
    # times and modes survive a write and close, and are what the daemon has (uncached)
    os.utime(f, ns=(11, 22))
    os.chmod(f, 0o600)
    fd = os.open(f, os.O_RDONLY)
    os.close(fd)
    assert os.stat(f).st_mtime_ns == 22


def test_chown_by_root_clears_setuid(mnt):
    f = mnt / "tool"
    write_file(f, b"#!/bin/sh\n")
    os.chmod(f, 0o6755)
    os.chown(f, 1000, 1000)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755  # as on ext4


def test_ctime_changes(mnt):
    f = mnt / "f"
    write_file(f, b"x")

    def changed(action, path=f, what=""):
        before = os.lstat(path).st_ctime_ns
        time.sleep(0.02)  # more than the kernel's coarse clock tick
        action()
        after = os.lstat(path).st_ctime_ns
        assert after > before, f"ctime unchanged by {what}"
        return after

    changed(lambda: os.chmod(f, 0o600), what="chmod")
    changed(lambda: os.chown(f, 5, 5), what="chown")
    changed(lambda: os.utime(f, ns=(1, 2)), what="utime")
    changed(lambda: os.link(f, mnt / "g"), what="link")
    changed(lambda: os.unlink(mnt / "g"), what="unlink of another name")
    changed(lambda: os.rename(f, mnt / "h"), path=mnt, what="rename (parent)")
    f = mnt / "h"
    changed(lambda: os.truncate(f, 100), path=f, what="truncate")
    changed(lambda: os.setxattr(f, "user.k", b"v"), path=f, what="setxattr")
    changed(lambda: os.removexattr(f, "user.k"), path=f, what="removexattr")

    def write():
        with open(f, "r+b") as fh:
            fh.write(b"new")
    changed(write, path=f, what="write")
    changed(lambda: os.mkdir(mnt / "d"), path=mnt, what="mkdir (parent)")
    # reads change nothing
    st = os.stat(f)
    f.read_bytes()
    assert os.stat(f).st_ctime_ns == st.st_ctime_ns and os.stat(f).st_mtime_ns == st.st_mtime_ns
    # mtime of a directory changes with its entries
    before = os.stat(mnt / "d").st_mtime_ns
    time.sleep(0.02)
    write_file(mnt / "d" / "x", b"")
    assert os.stat(mnt / "d").st_mtime_ns > before


# ---- xattrs -----------------------------------------------------------------------------------
def test_user_xattrs(mnt):
    f = mnt / "IMG_0001.CR3"
    write_file(f, b"raw")
    assert os.listxattr(f) == []
    raises(errno.ENODATA, os.getxattr, f, "user.missing")
    os.setxattr(f, "user.vaultfs.tier", b"select")
    os.setxattr(f, "user.empty", b"")
    big = os.urandom(4000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.vaultfs.tier") == b"select"
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user.big") == big
    assert sorted(os.listxattr(f)) == ["user.big", "user.empty", "user.vaultfs.tier"]
    os.setxattr(f, "user.vaultfs.tier", b"reject")  # replace
    assert os.getxattr(f, "user.vaultfs.tier") == b"reject"
    raises(errno.EEXIST, os.setxattr, f, "user.vaultfs.tier", b"x", os.XATTR_CREATE)
    raises(errno.ENODATA, os.setxattr, f, "user.nothing", b"x", os.XATTR_REPLACE)
    os.setxattr(f, "user.new", b"1", os.XATTR_CREATE)
    os.setxattr(f, "user.new", b"2", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.new") == b"2"
    os.removexattr(f, "user.new")
    raises(errno.ENODATA, os.getxattr, f, "user.new")
    raises(errno.ENODATA, os.removexattr, f, "user.new")
    # xattrs on a directory; a symlink's own xattrs are not allowed in the user namespace
    os.mkdir(mnt / "d")
    os.setxattr(mnt / "d", "user.d", b"dir")
    assert os.getxattr(mnt / "d", "user.d") == b"dir"
    # they follow the inode through rename and hard links, and go with it
    os.rename(f, mnt / "renamed")
    os.link(mnt / "renamed", mnt / "hard")
    assert os.getxattr(mnt / "hard", "user.big") == big
    # content writes leave them alone
    write_file(mnt / "hard", b"rewritten")
    assert os.getxattr(mnt / "renamed", "user.vaultfs.tier") == b"reject"
    # real programs
    subprocess.run(["setfattr", "-n", "user.vaultfs.tier", "-v", "general",
                    str(mnt / "renamed")], check=True)
    out = subprocess.run(["getfattr", "--absolute-names", "-d", str(mnt / "renamed")],
                         capture_output=True, text=True, check=True).stdout
    assert 'user.vaultfs.tier="general"' in out


# ---- statfs, fsync ----------------------------------------------------------------------------
def test_statfs(mnt, store_path):
    s, d = os.statvfs(mnt), os.statvfs(store_path)
    assert s.f_namemax == 255
    assert s.f_frsize > 0 and s.f_blocks > 0
    total = s.f_blocks * s.f_frsize
    assert abs(total - d.f_blocks * d.f_frsize) <= total // 100
    free, store_free = s.f_bavail * s.f_frsize, d.f_bavail * d.f_frsize
    assert abs(free - store_free) < max(256 * MiB, store_free // 100), (free, store_free)
    assert s.f_bfree >= s.f_bavail
    df = subprocess.run(["df", "-B1", "--output=avail", str(mnt)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert abs(int(df[-1]) - store_free) < max(256 * MiB, store_free // 100)


def test_fsync_and_fdatasync_commit(mnt):
    base = status(mnt)["logical_bytes"]
    f = mnt / "logger.dat"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    data = os.urandom(MiB)
    os.write(fd, data)
    os.fsync(fd)
    assert status(mnt)["logical_bytes"] == base + MiB  # committed before fsync returned
    os.write(fd, data)
    os.fdatasync(fd)
    # One version per open session: the second commit took the first one's place.
    assert status(mnt)["logical_bytes"] == base + 2 * MiB
    os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)  # fsync of a directory
    os.close(dfd)
    subprocess.run(["sync", str(f)], check=True)
    assert read_uncached(f) == data + data
    assert status(mnt)["uncommitted_files"] == 0


# ---- names ------------------------------------------------------------------------------------
def test_non_utf8_names(mnt):
    m = os.fsencode(mnt)
    names = [b"caf\xe9.jpg", b"\xff\xfe\x80", b"IMG\x01\x7f.CR2", "日本語.jpg".encode()]
    for i, n in enumerate(names):
        write_file(m + b"/" + n, b"%d" % i)
    os.mkdir(m + b"/dir\xe9")
    assert sorted(os.listdir(m)) == sorted(names + [b"dir\xe9"])
    for i, n in enumerate(names):
        assert read_uncached(m + b"/" + n) == b"%d" % i
    os.rename(m + b"/caf\xe9.jpg", m + b"/dir\xe9/\xe9t\xe9.jpg")
    assert os.listdir(m + b"/dir\xe9") == [b"\xe9t\xe9.jpg"]
    # str paths with surrogate escapes name the same files
    assert os.path.exists(os.path.join(str(mnt), os.fsdecode(b"\xff\xfe\x80")))
    out = subprocess.run(["ls", str(mnt)], capture_output=True, check=True).stdout
    assert b"\xff\xfe\x80" in out
    for n in names[1:]:
        os.unlink(m + b"/" + n)
    os.unlink(m + b"/dir\xe9/\xe9t\xe9.jpg")
    os.rmdir(m + b"/dir\xe9")
    assert os.listdir(m) == []


def test_name_length_limits(mnt):
    n255 = "a" * 255
    write_file(mnt / n255, b"ok")
    assert os.listdir(mnt) == [n255] and (mnt / n255).read_bytes() == b"ok"
    multibyte = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(multibyte.encode()) == 255
    os.mkdir(mnt / multibyte)
    os.rename(mnt / n255, mnt / multibyte / ("b" * 255))
    os.symlink("t", mnt / ("s" * 255))
    os.link(mnt / multibyte / ("b" * 255), mnt / ("h" * 255))
    n256 = "c" * 256
    raises(errno.ENAMETOOLONG, os.open, mnt / n256, os.O_WRONLY | os.O_CREAT, 0o644)
    raises(errno.ENAMETOOLONG, os.stat, mnt / n256)
    raises(errno.ENAMETOOLONG, os.mkdir, mnt / n256)
    raises(errno.ENAMETOOLONG, os.symlink, "t", mnt / n256)
    raises(errno.ENAMETOOLONG, os.link, mnt / ("h" * 255), mnt / n256)
    raises(errno.ENAMETOOLONG, os.rename, mnt / ("h" * 255), mnt / n256)
    raises(errno.ENAMETOOLONG, os.mknod, mnt / n256)
    assert sorted(os.listdir(mnt)) == sorted([multibyte, "s" * 255, "h" * 255])


def test_ten_thousand_files_in_one_folder(mnt):
    d = mnt / "DCIM"
    os.mkdir(d)
    names = [f"IMG_{i:05d}.CR3" for i in range(10_000)]

    def create(chunk):
        for n in chunk:
            os.close(os.open(d / n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    create(names)
    listed = os.listdir(d)
    assert len(listed) == 10_000 and set(listed) == set(names)
    assert os.stat(d).st_nlink == 2
    for n in names[::7]:
        st = os.stat(d / n)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    inos = {e.inode() for e in os.scandir(d)}
    assert len(inos) == 10_000
    # delete while listing (as rm -r does): each name is seen exactly once
    seen: Counter[str] = Counter()
    with os.scandir(d) as it:
        for e in it:
            seen[e.name] += 1
            os.unlink(e.path)
    assert len(seen) == 10_000 and max(seen.values()) == 1
    assert os.listdir(d) == []
    os.rmdir(d)
    assert status(mnt)["files"] == 0


# ---- the reserved .vault ----------------------------------------------------------------------
def test_vault_dir_reserved_and_read_only(mnt):
    v = mnt / ".vault"
    write_file(mnt / "f", b"12345")
    assert ".vault" not in os.listdir(mnt)
    assert stat.S_ISDIR(os.stat(v).st_mode)
    assert "status.json" in os.listdir(v)
    st = status(mnt)
    assert st["logical_bytes"] == 5 and st["files"] == 1
    ro = (errno.EROFS, errno.EACCES)
    raises(ro, os.open, v / "status.json", os.O_WRONLY)
    raises(ro, os.open, v / "status.json", os.O_RDWR | os.O_TRUNC)
    raises(ro, os.open, v / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    raises(ro, os.mkdir, v / "d")
    raises(ro, os.unlink, v / "status.json")
    raises(ro, os.chmod, v / "status.json", 0o777)
    raises(ro, os.truncate, v / "status.json", 0)
    raises(ro, os.setxattr, v / "status.json", "user.x", b"1")
    raises(ro + (errno.EXDEV, errno.EBUSY), os.rename, mnt / "f", v / "f")
    raises((errno.EEXIST,), os.mkdir, v)
    raises((errno.EBUSY, errno.EROFS, errno.EACCES, errno.EPERM), os.rmdir, v)
    raises((errno.EBUSY, errno.EROFS, errno.EACCES, errno.EPERM), os.rename, v, mnt / "x")
    raises((errno.EEXIST, errno.EBUSY), os.open, v, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    # the shell cannot write it either
    r = subprocess.run(["sh", "-c", f"echo x > '{v}/status.json'"], capture_output=True)
    assert r.returncode != 0
    assert (mnt / "f").read_bytes() == b"12345" and os.listdir(mnt) == ["f"]


def test_vault_visible_option(make_mount):
    m = make_mount("vault_visible")
    assert ".vault" in os.listdir(m.path)


# ---- permissions as on ext4 (default_permissions), as another user ----------------------------
def test_permissions_as_another_user(make_mount):
    mnt = make_mount("allow_other").path
    os.chmod(mnt, 0o755)
    write_file(mnt / "secret", b"s", 0o600)
    write_file(mnt / "public", b"p", 0o644)
    os.chmod(mnt / "secret", 0o600)
    os.chmod(mnt / "public", 0o644)
    os.mkdir(mnt / "rootdir", 0o755)
    os.mkdir(mnt / "closed", 0o700)
    write_file(mnt / "closed" / "inner", b"i")
    os.mkdir(mnt / "shared", 0o1777)
    os.chmod(mnt / "shared", 0o1777)

    assert err(as_user(lambda: open("secret", "rb").read(), cwd=mnt)) == errno.EACCES
    assert ok(as_user(lambda: open("public", "rb").read(), cwd=mnt)) == b"p"
    assert err(as_user(lambda: open("public", "ab").close(), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.truncate("public", 0), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.open("rootdir/new", os.O_CREAT | os.O_WRONLY), cwd=mnt)) \
        == errno.EACCES
    assert err(as_user(lambda: os.mkdir("rootdir/sub"), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.unlink("public"), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.rename("public", "rootdir/p"), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.stat("closed/inner"), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.listdir("closed"), cwd=mnt)) == errno.EACCES
    assert err(as_user(lambda: os.chmod("public", 0o777), cwd=mnt)) == errno.EPERM
    assert err(as_user(lambda: os.chown("public", NOBODY, NOBODY), cwd=mnt)) == errno.EPERM
    assert err(as_user(lambda: os.utime("public", ns=(1, 1)), cwd=mnt)) == errno.EPERM
    assert err(as_user(lambda: os.setxattr("public", "user.x", b"1"), cwd=mnt)) == errno.EACCES
    assert ok(as_user(lambda: os.listdir("."), cwd=mnt)) is not None
    # a real program, run as nobody
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "cat", "secret"], cwd=mnt, capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "cat", "public"], cwd=mnt, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "p"

    # nobody's own files in a sticky shared folder
    def own_files():
        fd = os.open("shared/mine", os.O_CREAT | os.O_WRONLY, 0o666)
        os.write(fd, b"nobody's")
        os.close(fd)
        os.chmod("shared/mine", 0o640)
        os.utime("shared/mine", ns=(3, 4))
        os.setxattr("shared/mine", "user.note", b"n")
        return os.stat("shared/mine")
    st = ok(as_user(own_files, cwd=mnt, umask=0o022))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert st.st_mtime_ns == 4
    # another user may not remove it from the sticky folder; its owner and root may
    assert err(as_user(lambda: os.unlink("shared/mine"), cwd=mnt, uid=65533, gid=65533)) \
        == errno.EPERM
    ok(as_user(lambda: os.rename("shared/mine", "shared/mine2"), cwd=mnt))
    os.unlink(mnt / "shared" / "mine2")

    # utime(None) needs write permission only
    os.chmod(mnt / "public", 0o666)
    ok(as_user(lambda: os.utime("public"), cwd=mnt))
    # a non-member's chmod to setgid of its own file drops the setgid bit (ext4 does)
    os.chown(mnt / "shared", 0, 4242)
    ok(as_user(lambda: open("shared/g", "wb").close(), cwd=mnt))
    os.chown(mnt / "shared" / "g", NOBODY, 4242)
    ok(as_user(lambda: os.chmod("shared/g", 0o2755), cwd=mnt))
    assert stat.S_IMODE(os.stat(mnt / "shared" / "g").st_mode) == 0o755
    # a write by another user clears the setuid bit
    os.chmod(mnt / "public", 0o4777)
    ok(as_user(lambda: open("public", "ab").write(b"more"), cwd=mnt))
    assert not os.stat(mnt / "public").st_mode & stat.S_ISUID


def test_setgid_directory_and_umask(make_mount):
    mnt = make_mount("allow_other").path
    os.chmod(mnt, 0o755)
    sg = mnt / "project"
    os.mkdir(sg)
    os.chown(sg, 0, 4242)
    os.chmod(sg, 0o2777)
    assert stat.S_IMODE(os.stat(sg).st_mode) == 0o2777

    def make(umask):
        def fn():
            fd = os.open(f"project/f{umask:o}", os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
            os.mkdir(f"project/d{umask:o}", 0o777)
            return os.stat(f"project/f{umask:o}"), os.stat(f"project/d{umask:o}")
        return fn

    for umask, fmode, dmode in [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                (0o002, 0o664, 0o775), (0o000, 0o666, 0o777)]:
        fst, dst = ok(as_user(make(umask), cwd=mnt, umask=umask))
        assert (fst.st_uid, fst.st_gid) == (NOBODY, 4242)
        assert stat.S_IMODE(fst.st_mode) == fmode, (umask, oct(fst.st_mode))
        assert (dst.st_uid, dst.st_gid) == (NOBODY, 4242)
        assert stat.S_IMODE(dst.st_mode) == stat.S_ISGID | dmode, (umask, oct(dst.st_mode))
    # the setgid bit goes on down the tree, for root too
    os.umask(old := os.umask(0o022))
    try:
        os.mkdir(sg / "d22" / "deeper")
        write_file(sg / "d22" / "deeper" / "f", b"")
    finally:
        os.umask(old)
    assert os.stat(sg / "d22" / "deeper").st_gid == 4242
    assert os.stat(sg / "d22" / "deeper").st_mode & stat.S_ISGID
    assert os.stat(sg / "d22" / "deeper" / "f").st_gid == 4242
    # outside a setgid directory: the creator's group and no setgid bit
    os.mkdir(mnt / "plain", 0o777)
    os.chmod(mnt / "plain", 0o777)
    fst, dst = ok(as_user(lambda: (open("plain/f", "wb").close(), os.stat("plain/f"))[1:] +
                          (os.mkdir("plain/d"), os.stat("plain/d"))[1:], cwd=mnt, umask=0o027))
    assert (fst.st_gid, stat.S_IMODE(fst.st_mode)) == (NOBODY, 0o640)
    assert (dst.st_gid, stat.S_IMODE(dst.st_mode)) == (NOBODY, 0o750)
    # root's umask through a real program
    subprocess.run(["sh", "-c", "umask 077 && : > rf && mkdir rd"], cwd=mnt / "plain", check=True)
    assert stat.S_IMODE(os.stat(mnt / "plain" / "rf").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mnt / "plain" / "rd").st_mode) == 0o700


def test_other_users_kept_out_without_allow_other(mnt):
    assert err(as_user(lambda: os.stat(str(mnt)), cwd="/")) in (errno.EACCES, errno.EPERM)


# ---- real programs over a tree ----------------------------------------------------------------
def test_cp_tar_rsync_sqlite(mnt, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(os.urandom(200_000))
    (src / "sub" / "b.xmp").write_bytes(b"<xmp/>")
    os.link(src / "a.jpg", src / "hard.jpg")
    os.symlink("a.jpg", src / "sym")
    os.setxattr(src / "a.jpg", "user.tier", b"select")
    os.utime(src / "sub" / "b.xmp", ns=(1_000_000_001, 2_000_000_002))
    for tool, dest in [(["cp", "-a", str(src), str(mnt / "cp")], mnt / "cp"),
                       (["rsync", "-aHAX", f"{src}/", str(mnt / "rsync")], mnt / "rsync")]:
        subprocess.run(tool, check=True, capture_output=True)
        assert read_uncached(dest / "a.jpg") == (src / "a.jpg").read_bytes()
        assert os.stat(dest / "hard.jpg").st_ino == os.stat(dest / "a.jpg").st_ino
        assert os.readlink(dest / "sym") == "a.jpg"
        assert os.getxattr(dest / "a.jpg", "user.tier") == b"select"
        assert os.stat(dest / "sub" / "b.xmp").st_mtime_ns == 2_000_000_002
    subprocess.run(["tar", "-C", str(mnt / "cp"), "--xattrs", "-cf", str(mnt / "t.tar"), "."],
                   check=True)
    (mnt / "untar").mkdir()
    subprocess.run(["tar", "-C", str(mnt / "untar"), "--xattrs", "-xf", str(mnt / "t.tar")],
                   check=True)
    assert (mnt / "untar" / "sub" / "b.xmp").read_bytes() == b"<xmp/>"
    assert os.stat(mnt / "untar" / "hard.jpg").st_nlink == 2
    # sqlite: locks, random writes, fsync, truncation of its journal
    db = sqlite3.connect(mnt / "catalog.db")
    db.execute("create table photos (id integer primary key, name text, blob blob)")
    for i in range(50):
        with db:
            db.execute("insert into photos (name, blob) values (?, ?)",
                       (f"IMG_{i}", os.urandom(5000)))
    with db:
        db.execute("delete from photos where id % 2 = 0")
    db.execute("vacuum")
    db.close()
    db = sqlite3.connect(mnt / "catalog.db")
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert db.execute("select count(*) from photos").fetchone()[0] == 25
    db.close()


# ---- remount: everything as it was ------------------------------------------------------------
def _snapshot(root: Path) -> dict:
    out = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rec = {k: getattr(st, k) for k in ("st_ino", "st_mode", "st_nlink", "st_uid",
                                               "st_gid", "st_size", "st_atime_ns",
                                               "st_mtime_ns", "st_ctime_ns")}
            if stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            else:
                rec["xattrs"] = {a: os.getxattr(p, a) for a in sorted(os.listxattr(p))}
            if stat.S_ISREG(st.st_mode):
                rec["content"] = read_uncached(p)
            out[os.path.relpath(p, rootb)] = rec
    return out


def test_remount_keeps_all_metadata(make_mount):
    m = make_mount()
    r = m.path
    os.mkdir(r / "proj", 0o750)
    os.chown(r / "proj", 1000, 1000)
    os.chmod(r / "proj", 0o2750)
    write_file(r / "proj" / "IMG_1.CR3", os.urandom(300_000), 0o640)
    os.chown(r / "proj" / "IMG_1.CR3", 1001, 1002)
    os.setxattr(r / "proj" / "IMG_1.CR3", "user.vaultfs.tier", b"select")
    os.setxattr(r / "proj", "user.dir", b"d")
    os.link(r / "proj" / "IMG_1.CR3", r / "hardlink.CR3")
    os.symlink("proj/IMG_1.CR3", r / "sym")
    os.symlink("dangling/target", r / "dangling")
    os.lchown(r / "sym", 7, 8)
    write_file(r / "empty", b"", 0o600)
    os.utime(r / "empty", ns=(1_111_111_111_111_111_111, 1_222_222_222_333_333_333))
    fd = os.open(r / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"tail", 50 * MiB)
    os.close(fd)
    write_file(os.fsencode(r) + b"/caf\xe9", b"latin1", 0o4755)
    os.chmod(os.fsencode(r) + b"/caf\xe9", 0o4755)
    write_file(r / "written-then-timed", b"abc")
    os.utime(r / "written-then-timed", ns=(5, 6))
    fd = os.open(r / "open-at-utime", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    os.utime(r / "open-at-utime", ns=(7, 8))  # set while open and dirty: must win over close
    os.close(fd)
    before = _snapshot(r)
    assert before[b"open-at-utime"]["st_mtime_ns"] == 8
    m.stop()
    m2 = make_mount()
    after = _snapshot(m2.path)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] == before[k], k


def test_default_acl_is_inherited_as_on_ext4(mnt, tmp_path):
    """A folder's default ACL (setfacl -d) passes to new files and subfolders. With umask 0
    the modes match ext4 exactly; the kernel applies a non-zero umask before vaultfs sees the
    mode (pyfuse3 cannot ask for FUSE_DONT_MASK), so then vaultfs is the stricter of the two."""
    # u::rwx u:1000:rwx g::r-x m::rwx o::---
    acl = bytes.fromhex("02000000" "01000700ffffffff" "02000700e8030000" "04000500ffffffff"
                        "10000700ffffffff" "20000000ffffffff")
    native = tmp_path / "native"
    native.mkdir()
    seen = []
    for root in (mnt, native):
        os.mkdir(root / "dacl")
        os.setxattr(root / "dacl", "system.posix_acl_default", acl)
        old = os.umask(0)
        try:
            write_file(root / "dacl" / "f", b"x", 0o666)
            os.mkdir(root / "dacl" / "sub", 0o777)
        finally:
            os.umask(old)
        f, sub = root / "dacl" / "f", root / "dacl" / "sub"
        seen.append((stat.S_IMODE(os.stat(f).st_mode), stat.S_IMODE(os.stat(sub).st_mode),
                     os.getxattr(f, "system.posix_acl_access"),
                     os.getxattr(sub, "system.posix_acl_access"),
                     os.getxattr(sub, "system.posix_acl_default")))
    assert seen[0] == seen[1]
    assert seen[0][:2] == (0o660, 0o770)


def test_renaming_while_listing_meets_each_file_once(mnt):
    """Batch renamers rename as they list: each entry must come up once, as on ext4."""
    d = mnt / "batch"
    os.mkdir(d)
    for i in range(1500):
        write_file(d / f"IMG_{i:04d}.CR2", b"")
    seen = 0
    with os.scandir(d) as it:
        for entry in it:
            os.rename(entry.path, d / f"renamed_{entry.name}")
            seen += 1
    assert seen == 1500
    assert sorted(os.listdir(d)) == sorted(f"renamed_IMG_{i:04d}.CR2" for i in range(1500))


def test_names_looked_up_before_they_exist_appear_when_made(mnt):
    """The kernel caches "no such file" answers: creating, linking, renaming or making a
    directory under such a name must show it at once."""
    for name in ("new.jpg", "link.jpg", "moved.jpg", "dir", "sym"):
        for _ in range(2):
            assert raises(errno.ENOENT, os.stat, mnt / name) == errno.ENOENT
    write_file(mnt / "new.jpg", b"1")
    os.link(mnt / "new.jpg", mnt / "link.jpg")
    write_file(mnt / "tmp.jpg", b"2")
    os.rename(mnt / "tmp.jpg", mnt / "moved.jpg")
    os.mkdir(mnt / "dir")
    os.symlink("new.jpg", mnt / "sym")
    assert (mnt / "link.jpg").read_bytes() == b"1" and (mnt / "moved.jpg").read_bytes() == b"2"
    assert (mnt / "dir").is_dir() and (mnt / "sym").read_bytes() == b"1"
    assert raises(errno.ENOENT, os.stat, mnt / "tmp.jpg") == errno.ENOENT
