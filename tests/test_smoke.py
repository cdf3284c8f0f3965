"""The first things a photographer does: copy files in, read them back, remount."""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CORPUS, assert_clean, needs_fuse, new_test_store, vaultfs

pytestmark = needs_fuse


def test_corpus_round_trip_and_remount(make_mount):
    m = make_mount()
    shutil.copytree(CORPUS, m.path / "corpus")
    m.stop()
    m2 = make_mount()
    cmp = filecmp.dircmp(CORPUS, m2.path / "corpus")
    files = [p for p in CORPUS.rglob("*") if p.is_file()]
    assert len(files) > 100
    for p in files:
        assert (m2.path / "corpus" / p.relative_to(CORPUS)).read_bytes() == p.read_bytes(), p
    assert not cmp.diff_files


def test_a_written_file_reaches_the_disk_once(tmp_path, make_mount):
    """A file's bytes reach the store's disk once, in the store: never as its spool (where they
    wait for the commit), for a new file or for one rewritten from empty (O_TRUNC). ext4 writes
    out a file that was truncated to 0 when it is closed, and spools were, so every capture
    went to the disk twice. Counted on an ext4 image of the test's own, on a loop device."""
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)
    try:
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--target", str(disk)],
                                capture_output=True, text=True, check=True).stdout.strip()
        stat = Path("/sys/block") / Path(device).name / "stat"

        def written() -> int:
            os.sync()
            return int(stat.read_text().split()[6]) * 512  # sectors written

        m = make_mount(store=new_test_store(disk / "store"))
        (m.path / "old.NEF").write_bytes(b"x" * 1000)  # committed, then rewritten
        files = {"new.NEF": os.urandom(24_000_000), "old.NEF": os.urandom(24_000_000)}
        before = written()
        for name, data in files.items():
            with open(m.path / name, "wb") as f:
                f.write(data)
        m.stop()
        total = sum(map(len, files.values()))  # random bytes: stored as they are
        assert written() - before < 1.3 * total, (written() - before) / total
        m = make_mount(store=disk / "store")
        assert all((m.path / name).read_bytes() == data for name, data in files.items())
        m.stop()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_default_vault_is_created_and_mounted_with_no_arguments(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME="")
    vaultfs("mount", env=env)
    capture = tmp_path / "Capture"
    try:
        assert os.path.ismount(capture)
        (capture / "IMG_0001.CR3").write_bytes(b"raw bytes")
        status = json.loads((capture / ".vault" / "status.json").read_text())
        assert status["store"] == str(tmp_path / ".local/share/vaultfs/default")
        assert status["files"] == 1 and status["logical_bytes"] == len(b"raw bytes")
    finally:
        vaultfs("umount", capture)
    assert not os.path.ismount(capture)
    assert_clean(tmp_path / ".local/share/vaultfs/default")


def test_status_and_verify_beside_a_running_mount(make_mount, store_path):
    m = make_mount()
    data = random.Random(2).randbytes(5_000_000)
    (m.path / "a.nef").write_bytes(data)
    (m.path / "copy.nef").write_bytes(data)
    assert ".vault" not in os.listdir(m.path)
    view = json.loads((m.path / ".vault" / "status.json").read_text())
    cli = json.loads(vaultfs("status", store_path, "--json").stdout)
    for key in ("files", "logical_bytes", "stored_bytes", "unique_bytes", "dedup_ratio"):
        assert view[key] == cli[key], key
    assert cli["logical_bytes"] == 2 * len(data)
    assert cli["dedup_ratio"] == 2.0
    report = json.loads(vaultfs("verify", store_path, "--json").stdout)
    assert report["ok"] and report["files"] == 2
    with pytest.raises(OSError):
        (m.path / ".vault" / "status.json").write_text("{}")


def test_cli_mount_and_umount_a_folder_with_spaces(store_path, tmp_path):
    mp = tmp_path / "Capture One\tsession"
    mp.mkdir()
    vaultfs("mount", store_path, mp)
    try:
        (mp / "IMG_0001.CR3").write_bytes(b"raw")
    finally:
        vaultfs("umount", mp)
    assert not os.path.ismount(mp)
    assert os.listdir(mp) == []
