"""Fixtures: a real store on disk, and a real mount served by a separate `vaultfs` process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaultfs.store import Store
from vaultfs.store.verify import verify

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
HAVE_FUSE = os.path.exists("/dev/fuse") and subprocess.run(
    ["which", "fusermount3"], capture_output=True).returncode == 0

needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="/dev/fuse or fusermount3 is absent")


def vaultfs(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    r = subprocess.run([sys.executable, "-m", "vaultfs", *map(str, args)], capture_output=True,
                       text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"vaultfs {' '.join(map(str, args))} failed:\n{r.stdout}{r.stderr}")
    return r


def assert_clean(store_path: Path) -> None:
    """The store verifies clean: every chunk, reference count, extent and counter."""
    with Store.open(store_path) as store:
        report = verify(store)
    assert report.ok, report.as_dict()


def set_policy(store_path: Path, section: str, **values: str) -> None:
    """Change keys of one [section] of vault.toml, as a user would edit the file."""
    toml = store_path / "vault.toml"
    out, current = [], None
    for line in toml.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        key = line.split(" = ")[0]
        if current == section and key in values:
            line = f"{key} = {values[key]}"
        out.append(line)
    toml.write_text("\n".join(out) + "\n")


def tree_of(root) -> dict:
    """path -> (type and mode, content or link target, mtime, xattrs) of a folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            xattrs = {} if stat.S_ISLNK(st.st_mode) else \
                {n: os.getxattr(p, n) for n in os.listxattr(p) if n.startswith("user.")}
            # (rsync leaves a symlink's own time alone; directories' change as files arrive)
            mtime = None if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) \
                else st.st_mtime_ns
            out[os.path.relpath(p, root)] = (st.st_mode, body, mtime, xattrs)
    return out


class Mount:
    """A vault mounted by a foreground daemon in its own process."""

    def __init__(self, store: Path, mountpoint: Path, options: tuple[str, ...] = (),
                 branch: str = "main"):
        self.store, self.path, self.options, self.branch = store, mountpoint, options, branch
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mount":
        cmd = [sys.executable, "-m", "vaultfs", "mount", "--foreground", str(self.store),
               str(self.path)]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        cmd += ["--branch", self.branch]
        # The daemon's stderr goes to a file: a pipe read only at the end could fill and
        # block the daemon.
        self.log = self.path.parent / f"{self.path.name}.daemon.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"mount failed: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not come up in 30 s")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """A live mount on the mount point. After a kill -9, the dead mount's root still stats
        as a mount point from the kernel's attribute cache; statvfs always asks the daemon."""
        try:
            os.statvfs(self.path)
        except OSError:
            return False
        return os.path.ismount(self.path)

    def stop(self, expect_errors: bool = False) -> None:
        """Unmount cleanly and wait for the daemon to finish; its log must hold no error
        unless the test provoked one."""
        if self.proc is None:
            return
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=True)
        self.proc.wait(timeout=60)
        self.proc = None
        err = self.log.read_text()
        assert "Traceback" not in err, err
        assert expect_errors or " ERROR " not in err, err

    def kill(self) -> None:
        """kill -9 the daemon: the mount point is left answering ENOTCONN."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        if self.proc is not None:
            self.stop()
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


def new_test_store(path: Path) -> Path:
    """A store as the tests want it: they take their own snapshots, and nothing is evicted
    for space unless a test asks (the default floor, 20% free, depends on the machine's disk:
    under it, a sync would make the files it sent offline)."""
    Store.init(path)
    set_policy(path, "snapshots", every_minutes="0", at_unmount="false", on_select="false")
    set_policy(path, "space", keep_free_percent="0")
    return path


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = new_test_store(tmp_path / "store")
    yield path
    assert_clean(path)


@pytest.fixture
def make_mount(tmp_path: Path, store_path: Path):
    """Mount factory: make_mount(*options) -> Mount, unmounted and verified at the end."""
    mounts: list[Mount] = []

    def make(*options: str, store: Path = store_path, branch: str = "main") -> Mount:
        mp = tmp_path / f"mnt{len(mounts)}"
        mp.mkdir(exist_ok=True)
        m = Mount(store, mp, options, branch)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mnt(make_mount) -> Path:
    """The path of a freshly mounted empty vault."""
    if not HAVE_FUSE:
        pytest.skip("/dev/fuse or fusermount3 is absent")
    return make_mount().path
