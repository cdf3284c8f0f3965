"""packaging/: the mount(8) helper and the systemd user unit, installed and used for real."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fuse, vaultfs

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"
HELPER = Path("/sbin/mount.fuse.vaultfs")
VAULTFS = Path(sys.executable).with_name("vaultfs")  # the console script of this environment
FSTAB_OPTIONS = "rw,defaults,allow_other,_netdev,nofail,noatime,x-systemd.automount,comment=t"


def install(*args: str) -> str:
    r = subprocess.run(["sh", str(PACKAGING / "install.sh"), "--vaultfs", str(VAULTFS), *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def helper(*args: str) -> subprocess.CompletedProcess:
    """The helper from the source tree, in fake mode (-f): it prints what it would run."""
    return subprocess.run(["sh", str(PACKAGING / "mount.fuse.vaultfs"), *args, "-f", "-v"],
                          capture_output=True, text=True)


@pytest.fixture
def installed_helper(tmp_path: Path):
    """packaging/install.sh puts the helper in /sbin, where mount(8) looks; whatever was there
    before is put back afterwards."""
    if os.geteuid() != 0:
        pytest.skip("installing /sbin/mount.fuse.vaultfs and mounting with mount(8) need root")
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is absent")
    saved = None
    if HELPER.exists():
        saved = tmp_path / "saved-helper"
        shutil.copy2(HELPER, saved)
    install("--sbindir", str(HELPER.parent), "--unitdir", str(tmp_path / "units"))
    yield HELPER
    if saved is not None:
        shutil.copy2(saved, HELPER)
    else:
        HELPER.unlink(missing_ok=True)


def test_helper_drops_generic_options():
    r = helper("/srv/vault", "/mnt/capture", "-o", FSTAB_OPTIONS + ",vault_visible")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stderr.split(": ", 1)[1])
    assert cmd[1:] == ["mount", "/srv/vault", "/mnt/capture", "-o", "allow_other,vault_visible"]

    r = helper("vaultfs#/srv/vault", "/mnt/capture", "-n", "-o", "rw,nodev,nosuid,users")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stderr.split(": ", 1)[1])[1:] == ["mount", "/srv/vault", "/mnt/capture"]


def test_helper_refuses_ro_and_passes_unknown_options_to_vaultfs():
    r = helper("/srv/vault", "/mnt/capture", "-o", "ro,allow_other")
    assert r.returncode != 0 and "read-only" in r.stderr
    r = helper("/srv/vault", "/mnt/capture", "-o", "rw,uid=1000")
    assert r.stderr.rstrip().endswith("-o uid=1000")  # vaultfs then refuses it by name
    r = helper("/srv/vault", "/mnt/capture", "-s", "-o", "rw,uid=1000")  # sloppy: dropped
    assert r.stderr.rstrip().endswith("/mnt/capture")


@needs_fuse
def test_mount_t_fuse_vaultfs_with_fstab_options(installed_helper, store_path: Path,
                                                 tmp_path: Path):
    mp = tmp_path / "capture"
    mp.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "fuse.vaultfs", str(store_path), str(mp),
                            "-o", FSTAB_OPTIONS + ",vault_visible"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, _why(r, store_path)
        assert os.path.ismount(mp)
        fields = next(line.split() for line in Path("/proc/self/mountinfo").read_text()
                      .splitlines() if line.split()[4] == str(mp))
        sep = fields.index("-")
        assert fields[sep + 1:sep + 3] == ["fuse.vaultfs", str(store_path)]
        assert "allow_other" in fields[sep + 3].split(",")
        assert ".vault" in os.listdir(mp)  # vault_visible reached the daemon

        data = os.urandom(3 * 1024 * 1024) + bytes(1024 * 1024)
        (mp / "IMG_0001.CR2").write_bytes(data)
        assert (mp / "IMG_0001.CR2").read_bytes() == data

        vaultfs("umount", mp)
        assert not os.path.ismount(mp)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    # Committed: it reads back through a second mount, this time by an fstab line (mount(8)
    # reads an alternative fstab with -T, so the system's own is left alone).
    mp2 = tmp_path / "again"
    mp2.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{store_path} {mp2} fuse.vaultfs defaults,allow_other,_netdev,nofail 0 0\n")
    try:
        r = subprocess.run(["mount", "-T", str(fstab), str(mp2)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, _why(r, store_path)
        assert (mp2 / "IMG_0001.CR2").read_bytes() == data
        assert ".vault" not in os.listdir(mp2)  # hidden without vault_visible
        vaultfs("umount", mp2)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp2)], capture_output=True)


def _why(r: subprocess.CompletedProcess, store_path: Path) -> str:
    log = store_path / "vaultfs.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    return f"{r.args}: {r.stdout}{r.stderr}\n--- {log}:\n{tail}"


def _unit_command(unit: Path, key: str, home: Path, instance: str) -> list[str]:
    """The argv of one Exec line, with the specifiers and environment systemd would fill in."""
    lines = unit.read_text().splitlines()
    env = {}
    for line in lines:
        if line.startswith("Environment="):
            k, _, v = line.removeprefix("Environment=").partition("=")
            env[k] = v.replace("%h", str(home)).replace("%i", instance)
    (cmd,) = [line.split("=", 1)[1] for line in lines if line.startswith(key + "=")]
    argv = []
    for word in shlex.split(cmd.replace("%h", str(home)).replace("%i", instance)):
        if word.startswith("$") and word.strip("${}") in env:
            argv += env[word.strip("${}")].split()  # "$VAR" splits; "${VAR}" is one word
        else:
            argv.append(word)
    return argv


def test_unit_file_is_valid_and_runs_the_real_cli(tmp_path: Path):
    out = install("--sbindir", str(tmp_path / "sbin"), "--unitdir", str(tmp_path / "units"))
    assert "vaultfs@.service" in out
    unit = tmp_path / "units" / "vaultfs@.service"
    assert os.access(tmp_path / "sbin" / "mount.fuse.vaultfs", os.X_OK)

    argv = _unit_command(unit, "ExecStart", Path("/home/ann"), "field")
    assert argv == [str(VAULTFS), "mount", "--foreground", "/home/ann/.local/share/vaultfs/field",
                    "/home/ann/Vaults/field"]
    stop = _unit_command(unit, "ExecStop", Path("/home/ann"), "field")
    assert stop[:2] == ["/bin/sh", "-c"] and "fusermount3 -u" in stop[2]
    assert "Restart=on-failure" in unit.read_text().splitlines()
    # The command line is the real CLI's: its parser accepts it (--help stops before mounting).
    r = subprocess.run(argv[:2] + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--foreground" in r.stdout, r.stderr
    from vaultfs.cli import build_parser
    args = build_parser().parse_args(argv[1:])
    assert args.foreground and args.store and args.mountpoint

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # A template verifies as an instance; --user needs a runtime directory of its own.
    instance = tmp_path / "units" / "vaultfs@field.service"
    shutil.copy(unit, instance)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    r = subprocess.run([analyze, "verify", "--user", str(instance)], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    if "Failed to initialize manager" in r.stderr or "RuntimeDirectory" in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()}")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
