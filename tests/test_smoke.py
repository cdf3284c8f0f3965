"""The first things a photographer does: copy files in, read them back, remount."""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil

import pytest

from conftest import CORPUS, assert_clean, needs_fuse, vaultfs

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
