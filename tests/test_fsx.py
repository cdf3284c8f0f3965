"""A randomised operation checker in the style of fsx: the mount against a plain folder.

A seeded random sequence of file operations is applied, call for call, to a few files in the
mount and to the same names in a plain folder on the local disk (the reference). Every read,
mmap read, size, link count and error number must agree exactly; at the end, and after every
remount, the whole tree is compared. On a mismatch the seed and the operation log are printed,
so that `FSX_SEED=<seed> pytest tests/test_fsx.py -k random` replays the run.

Environment: FSX_SEED fixes the seed of the random run, FSX_OPS sets the number of operations.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
from pathlib import Path

import pytest

from conftest import needs_fuse

pytestmark = needs_fuse

NAMES = ["a", "b", "c", "d/e"]     # a few files, one in a subdirectory (rename across dirs)
MAX_LEN = 6 * 1024 * 1024          # several chunks (chunks average about 1 MiB)
MAX_HANDLES = 6
OPEN_FLAGS = [
    ("O_RDWR|O_CREAT", os.O_RDWR | os.O_CREAT),
    ("O_RDWR", os.O_RDWR),
    ("O_RDONLY", os.O_RDONLY),
    ("O_WRONLY|O_CREAT", os.O_WRONLY | os.O_CREAT),
    ("O_WRONLY|O_APPEND|O_CREAT", os.O_WRONLY | os.O_APPEND | os.O_CREAT),
    ("O_RDWR|O_APPEND|O_CREAT", os.O_RDWR | os.O_APPEND | os.O_CREAT),
    ("O_RDWR|O_TRUNC|O_CREAT", os.O_RDWR | os.O_TRUNC | os.O_CREAT),
]


class Mismatch(AssertionError):
    pass


def _call(fn, *args):
    """(result, None) or (None, errno) of one system call."""
    try:
        return fn(*args), None
    except OSError as e:
        return None, e.errno


class Side:
    """One of the two trees, with its open handles keyed by a shared handle number."""

    def __init__(self, root: Path):
        self.root = root
        self.fds: dict[int, int] = {}

    def p(self, name: str) -> str:
        return str(self.root / name)

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _mmap_read(fd: int, off: int, length: int) -> bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as m:
        return m[off:off + length]


class Fsx:
    def __init__(self, seed: int, mount, make_mount, ref: Path, remounts: bool):
        self.seed, self.rng = seed, random.Random(seed)
        self.m, self.make_mount = mount, make_mount
        self.mnt, self.ref = Side(mount.path), Side(ref)
        self.remounts = remounts
        self.log: list[str] = []
        self.next_handle = 1
        self.handle_flags: dict[int, int] = {}
        for side in (self.mnt, self.ref):
            os.mkdir(side.p("d"))

    # ---- comparing the two sides --------------------------------------------------------------
    def fail(self, what: str) -> None:
        print(f"fsx seed {self.seed}: MISMATCH after {len(self.log)} ops: {what}")
        print("op log (replay with FSX_SEED=%d):" % self.seed)
        for i, line in enumerate(self.log):
            print(f"{i:6d} {line}")
        tail = "\n".join(self.log[-40:])
        self.mnt.close_all()  # so that the mount can still be unmounted and verified
        self.ref.close_all()
        raise Mismatch(f"fsx seed {self.seed}: {what}\nlast ops:\n{tail}")

    def both(self, desc: str, fn) -> object:
        """Apply fn(side) to the mount and to the reference; results and errors must agree."""
        self.log.append(desc)
        got, got_err = _call(fn, self.mnt)
        want, want_err = _call(fn, self.ref)
        if got_err != want_err:
            self.fail(f"{desc}: mount gave {_err(got_err)}, reference gave {_err(want_err)}")
        if got != want:
            if isinstance(got, bytes) and isinstance(want, bytes):
                i = _first_diff(got, want)
                self.fail(f"{desc}: {len(got)} bytes read, {len(want)} expected; first "
                          f"difference at +{i}: {got[i:i + 8].hex()} != {want[i:i + 8].hex()}")
            self.fail(f"{desc}: results differ: {_short(got)} != {_short(want)}")
        return want

    def check_handle(self, h: int) -> None:
        sm, sr = os.fstat(self.mnt.fds[h]), os.fstat(self.ref.fds[h])
        if sm.st_size != sr.st_size:
            self.fail(f"fstat(h{h}).st_size: mount {sm.st_size}, reference {sr.st_size}")
        if sm.st_nlink != sr.st_nlink:
            self.fail(f"fstat(h{h}).st_nlink: mount {sm.st_nlink}, reference {sr.st_nlink}")

    def check_tree(self, why: str) -> None:
        """Every name: same existence, size, link count, mode and bytes."""
        self.log.append(f"check tree ({why})")
        for name in NAMES:
            got, got_err = _call(os.stat, self.mnt.p(name))
            want, want_err = _call(os.stat, self.ref.p(name))
            if got_err != want_err:
                self.fail(f"stat {name}: mount {_err(got_err)}, reference {_err(want_err)}")
            if want is None:
                continue
            for field in ("st_size", "st_nlink", "st_mode"):
                if getattr(got, field) != getattr(want, field):
                    self.fail(f"stat {name}.{field}: mount {getattr(got, field)}, "
                              f"reference {getattr(want, field)}")
            data_m = Path(self.mnt.p(name)).read_bytes()
            data_r = Path(self.ref.p(name)).read_bytes()
            if data_m != data_r:
                self.fail(f"content of {name} differs at byte {_first_diff(data_m, data_r)} "
                          f"(sizes {len(data_m)} / {len(data_r)})")
        for d in ("", "d"):
            lm = sorted(os.listdir(self.mnt.p(d)))
            lr = sorted(os.listdir(self.ref.p(d)))
            if lm != lr:
                self.fail(f"listdir {d or '/'}: mount {lm}, reference {lr}")

    # ---- data ---------------------------------------------------------------------------------
    def data(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.6:
            return self.rng.randbytes(n)
        if kind < 0.8:  # compressible and repetitive: dedup within and across files
            unit = self.rng.randbytes(self.rng.choice([1, 7, 512, 4096]))
            return (unit * (n // len(unit) + 1))[:n]
        return bytes(n)  # zeros: the store keeps all-zero chunks as holes

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(1, 4096)
        if r < 0.9:
            return self.rng.randint(1, 128 * 1024)
        return self.rng.randint(1, 1536 * 1024)

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.1:
            return 0
        return self.rng.randrange(MAX_LEN)

    def handle(self) -> int | None:
        return self.rng.choice(sorted(self.mnt.fds)) if self.mnt.fds else None

    # ---- operations ---------------------------------------------------------------------------
    def op_open(self) -> None:
        if len(self.mnt.fds) >= MAX_HANDLES:
            return self.op_close()
        name = self.rng.choice(NAMES)
        label, flags = self.rng.choice(OPEN_FLAGS)
        h = self.next_handle

        def fn(side: Side) -> None:
            side.fds[h] = os.open(side.p(name), flags, 0o644)

        self.both(f"h{h} = open({name}, {label})", fn)
        if h in self.ref.fds:
            self.next_handle += 1
            self.handle_flags[h] = flags
            self.check_handle(h)

    def op_close(self) -> None:
        h = self.handle()
        if h is None:
            return self.op_open()
        self.both(f"close(h{h})", lambda s: os.close(s.fds.pop(h)))
        del self.handle_flags[h]

    def op_write(self) -> None:
        h = self.handle()
        if h is None:
            return self.op_open()
        off, data = self.offset(), self.data(self.size())
        if self.rng.random() < 0.2:  # at or just past the end: extend, with or without a gap
            end = os.fstat(self.ref.fds[h]).st_size
            off = min(MAX_LEN, end + self.rng.choice([0, 0, 1, 4095, self.rng.randrange(1 << 20)]))
        self.both(f"pwrite(h{h}, off={off}, len={len(data)})",
                  lambda s: os.pwrite(s.fds[h], data, off))
        self.check_handle(h)

    def op_append(self) -> None:
        """An O_APPEND write through a handle of its own, as a log writer does."""
        name = self.rng.choice(NAMES)
        data = self.data(self.size())

        def fn(side: Side) -> int:
            fd = os.open(side.p(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                n = os.write(fd, data)
                return n, os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(f"append({name}, len={len(data)})", fn)

    def op_read(self) -> None:
        h = self.handle()
        if h is None:
            return self.op_open()
        size = os.fstat(self.ref.fds[h]).st_size
        off = self.rng.randrange(size + 2) if self.rng.random() < 0.9 else self.offset()
        n = self.size()
        self.both(f"pread(h{h}, off={off}, len={n})", lambda s: os.pread(s.fds[h], n, off))

    def op_mmap_read(self) -> None:
        h = self.handle()
        if h is None or self.handle_flags[h] & os.O_ACCMODE == os.O_WRONLY:
            return self.op_read()
        size = os.fstat(self.ref.fds[h]).st_size
        off = self.rng.randrange(size + 1)
        n = self.size()
        self.both(f"mmap_read(h{h}, off={off}, len={n})",
                  lambda s: _mmap_read(s.fds[h], off, n))

    def op_ftruncate(self) -> None:
        h = self.handle()
        if h is None:
            return self.op_open()
        size = os.fstat(self.ref.fds[h]).st_size
        new = self.rng.choice([0, self.rng.randrange(size + 1), self.rng.randrange(MAX_LEN),
                               size + self.rng.randrange(1, 1 << 20)])
        new = min(new, MAX_LEN)
        self.both(f"ftruncate(h{h}, {new}) [was {size}]", lambda s: os.ftruncate(s.fds[h], new))
        self.check_handle(h)

    def op_truncate(self) -> None:
        name = self.rng.choice(NAMES)
        new = self.rng.choice([0, self.rng.randrange(MAX_LEN)])
        self.both(f"truncate({name}, {new})", lambda s: os.truncate(s.p(name), new))

    def op_fsync(self) -> None:
        h = self.handle()
        if h is None:
            return self.op_open()
        fn = self.rng.choice([os.fsync, os.fdatasync])
        self.both(f"{fn.__name__}(h{h})", lambda s: fn(s.fds[h]))

    def op_rename(self) -> None:
        a, b = self.rng.sample(NAMES, 2)
        self.both(f"rename({a}, {b})", lambda s: os.rename(s.p(a), s.p(b)))

    def op_link_unlink(self) -> None:
        """Hard link a file under another name, then unlink the first name."""
        a, b = self.rng.sample(NAMES, 2)

        def fn(side: Side) -> tuple[int, int]:
            os.link(side.p(a), side.p(b))
            n = os.stat(side.p(b)).st_nlink
            os.unlink(side.p(a))
            return n, os.stat(side.p(b)).st_nlink

        self.both(f"link({a}, {b}); unlink({a})", fn)

    def op_link(self) -> None:
        a, b = self.rng.sample(NAMES, 2)
        self.both(f"link({a}, {b})", lambda s: os.link(s.p(a), s.p(b)))

    def op_unlink(self) -> None:
        a = self.rng.choice(NAMES)
        self.both(f"unlink({a})", lambda s: os.unlink(s.p(a)))

    def op_stat(self) -> None:
        a = self.rng.choice(NAMES)

        def fn(side: Side) -> tuple:
            st = os.stat(side.p(a))
            return st.st_size, st.st_nlink, stat.S_IFMT(st.st_mode)

        self.both(f"stat({a})", fn)

    def op_remount(self) -> None:
        if not self.remounts:
            return self.op_fsync()
        self.log.append("close all handles; remount")
        self.mnt.close_all()
        self.ref.close_all()
        self.handle_flags.clear()
        self.m.stop()
        self.m = self.make_mount()
        self.mnt.root = self.m.path
        self.check_tree("after remount")

    OPS = [  # (weight, operation)
        (18, op_write), (6, op_append), (16, op_read), (6, op_mmap_read), (6, op_ftruncate),
        (3, op_truncate), (5, op_fsync), (8, op_open), (7, op_close), (4, op_rename),
        (3, op_link_unlink), (1, op_link), (2, op_unlink), (4, op_stat),
    ]

    def run(self, nops: int, nremounts: int) -> None:
        weights = [w for w, _ in self.OPS]
        ops = [op for _, op in self.OPS]
        remount_at = set(self.rng.sample(range(nops // 10, nops), nremounts))
        for i in range(nops):
            if i in remount_at:
                self.op_remount()
            else:
                self.rng.choices(ops, weights)[0](self)
            if i % 500 == 499:
                self.check_tree(f"op {i + 1}")
        for h in sorted(self.mnt.fds):  # the last content of files unlinked while open
            size = os.fstat(self.ref.fds[h]).st_size
            if self.handle_flags[h] & os.O_ACCMODE != os.O_WRONLY:
                self.both(f"pread(h{h}, 0, {size}) [final]",
                          lambda s: os.pread(s.fds[h], size + 1, 0))
        self.mnt.close_all()
        self.ref.close_all()
        self.check_tree("end")
        if self.remounts:
            self.op_remount()


def _err(e: int | None) -> str:
    return "success" if e is None else errno.errorcode.get(e, str(e))


def _short(v) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return repr(v)[:200]


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _run(seed: int, nops: int, nremounts: int, make_mount, tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    ref.mkdir()
    print(f"fsx seed {seed}, {nops} ops, {nremounts} remounts")
    Fsx(seed, make_mount(), make_mount, ref, remounts=nremounts > 0).run(nops, nremounts)


def test_fsx_fixed_seed(make_mount, tmp_path):
    _run(20240601, int(os.environ.get("FSX_OPS", 6000)), 4, make_mount, tmp_path)


def test_fsx_random_seed(make_mount, tmp_path):
    seed = int(os.environ.get("FSX_SEED") or random.SystemRandom().randrange(1 << 32))
    _run(seed, int(os.environ.get("FSX_OPS", 4000)), 3, make_mount, tmp_path)


def test_fsx_detects_a_difference(make_mount, tmp_path):
    """The checker itself can fail: a byte changed behind its back is reported with the seed."""
    ref = tmp_path / "reference"
    ref.mkdir()
    fsx = Fsx(7, make_mount(), make_mount, ref, remounts=False)
    fsx.run(200, 0)
    (ref / "tampered").write_bytes(b"x")
    with pytest.raises(Mismatch, match="fsx seed 7: listdir"):
        fsx.check_tree("tampered")
