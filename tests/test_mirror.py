"""A mirror: the tiers that ask for two copies are copied to a second store as they are
committed, a file is safe only once the mirror holds it, damage in one copy is mended from the
other, and a crash in the middle of copying leaves both stores clean. Real mounts, real
`vaultfs` commands, setfattr and exiftool; the mirror is mounted afterwards and read back."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CORPUS, assert_clean, needs_fuse, set_policy, vaultfs
from test_events import _listen, _until
from vaultfs.client import Vault
from vaultfs.store import Store

pytestmark = needs_fuse

MB = 1_000_000


@pytest.fixture
def mirror(tmp_path: Path, store_path: Path) -> Path:
    """A mirror named in the vault's vault.toml (the folder `ssd2` stands for another disk);
    the mirror store itself is made by the first mount. Verified clean at the end."""
    (tmp_path / "ssd2").mkdir()
    path = tmp_path / "ssd2" / "vault"
    toml = store_path / "vault.toml"
    text = toml.read_text().replace('# path = "/media/ssd2/vault"', f'path = "{path}"', 1)
    assert text != toml.read_text()
    toml.write_text(text)
    yield path
    if path.exists():
        assert_clean(path)


def _select_folder(mnt: Path, name: str) -> Path:
    folder = mnt / name
    folder.mkdir()
    subprocess.run(["setfattr", "-n", "user.vaultfs.tier", "-v", "select", str(folder)],
                   check=True)
    return folder


def _events(got: list[dict], kind: str) -> set[str]:
    return {e["path"] for e in list(got) if e["event"] == kind}


def _flip(store: Path, inside: bytes) -> None:
    """Flip one byte of `inside` (file data stored raw) in the store's LMDB file."""
    with open(store / "lmdb" / "data.mdb", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        at = mm.find(inside)
        assert at > 0
        mm[at + 10] ^= 0xFF


def test_select_files_are_mirrored_and_safe_only_then(make_mount, store_path, mirror):
    m = make_mount()
    assert (mirror / "vault.toml").is_file()  # created on first use, and said so
    assert "created the mirror store" in (store_path / "vaultfs.log").read_text()
    proc, got = _listen(m.path)
    day1 = _select_folder(m.path, "day1")
    shot = os.urandom(3 * MB)
    (day1 / "DSC_0001.NEF").write_bytes(shot)
    (m.path / "general.NEF").write_bytes(os.urandom(2 * MB))
    # Tethering software's pattern: a temporary name, fsync, rename into place.
    with open(day1 / ".DSC_0002.NEF.tmp", "wb") as f:
        f.write(shot[:MB] + os.urandom(MB))
        os.fsync(f.fileno())
    os.rename(day1 / ".DSC_0002.NEF.tmp", day1 / "DSC_0002.NEF")
    # A general file that becomes a select when it is rated, later.
    shutil.copy(CORPUS / "jpeg" / "medium" / "mongolels.jpg", m.path / "rated.jpg")
    vault = Vault(m.path)
    deadline = time.monotonic() + 30
    while "day1/DSC_0001.NEF" not in _events(got, "mirrored"):
        assert time.monotonic() < deadline, "not mirrored within 30 s"
        answer = vault.safe("day1/DSC_0001.NEF")  # never safe on one copy of a select
        assert answer["copies_wanted"] == 2
        if answer["safe"]:
            assert answer["copies"] == 2 and answer["mirrored"]
        time.sleep(0.02)
    _until(lambda: {"day1/DSC_0002.NEF", "day1/DSC_0001.NEF"} <= _events(got, "mirrored"))
    _until(lambda: vault.safe("general.NEF")["safe"] and vault.safe("rated.jpg")["safe"])
    assert vault.safe("general.NEF")["copies"] == 1  # general: one copy is safe
    assert "rated.jpg" not in _events(got, "mirrored")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-Rating=5",
                    str(m.path / "rated.jpg")], check=True)
    _until(lambda: "rated.jpg" in _events(got, "mirrored"))
    rated = (m.path / "rated.jpg").read_bytes()
    for name in ("day1/DSC_0001.NEF", "day1/DSC_0002.NEF", "rated.jpg"):
        answer = vault.safe(name)
        assert answer["safe"] and answer["copies"] == 2 and answer["copies_wanted"] == 2, answer
    out = vaultfs("safe", "--mountpoint", m.path, day1 / "DSC_0001.NEF", m.path / "general.NEF")
    assert ": safe (2 copies of 2)" in out.stdout and ": safe (1 copy)" in out.stdout
    status = json.loads(vaultfs("status", store_path, "--json").stdout)
    assert status["mirror"]["path"] == str(mirror)
    select = status["tiers"]["select"]
    assert (select["copies"], select["mirrored"], select["mirroring"]) == (2, 3, 0)
    assert status["tiers"]["general"]["copies"] == 1
    assert "2 copies: 3" in vaultfs("status", store_path).stdout
    # A rename is followed (no bytes copied); the mirror keeps what the vault deletes.
    os.rename(day1 / "DSC_0002.NEF", day1 / "DSC_0002-best.NEF")
    _until(lambda: "day1/DSC_0002-best.NEF" in _events(got, "mirrored"))
    (day1 / "DSC_0001.NEF").unlink()
    proc.terminate()
    mtime = os.stat(day1 / "DSC_0002-best.NEF").st_mtime_ns
    m.stop()
    # The mirror is the vault's second copy, not a peer to make room for: no eviction on it.
    vaultfs("tag", store_path, "day1", "--clear")
    kept = json.loads(vaultfs("evict", store_path, "day1/DSC_0002-best.NEF", "--json").stdout)
    assert kept["evicted"] == [] and kept["skipped"] == [
        {"path": "day1/DSC_0002-best.NEF", "why": "no peer is known to hold it"}]

    assert_clean(mirror)
    seen = make_mount(store=mirror)  # the mirror is a vault like any other
    assert (seen.path / "day1" / "DSC_0001.NEF").read_bytes() == shot
    assert (seen.path / "rated.jpg").read_bytes() == rated
    assert os.stat(seen.path / "day1" / "DSC_0002-best.NEF").st_mtime_ns == mtime
    assert os.getxattr(seen.path / "day1", "user.vaultfs.tier") == b"select"
    assert sorted(os.listdir(seen.path / "day1")) == ["DSC_0001.NEF", "DSC_0002-best.NEF"]
    assert not (seen.path / "general.NEF").exists()
    seen.stop()


def test_a_file_the_mirror_cannot_take_is_not_safe(make_mount, store_path, mirror):
    make_mount().stop()  # binds the mirror to the vault
    # Someone made a folder in the mirror where the vault will have a file.
    other = make_mount(store=mirror)
    (other.path / "day1" / "DSC_0003.NEF").mkdir(parents=True)
    (other.path / "day1" / "DSC_0003.NEF" / "notes.txt").write_text("kept")
    other.stop()
    m = make_mount()
    proc, got = _listen(m.path)
    day1 = _select_folder(m.path, "day1")
    (day1 / "DSC_0003.NEF").write_bytes(os.urandom(MB))
    _until(lambda: any(e["event"] == "error" and "not mirrored" in e["error"]
                       for e in list(got)))
    answer = Vault(m.path).safe("day1/DSC_0003.NEF")
    assert answer["verified"] and not answer["safe"]
    assert (answer["copies"], answer["copies_wanted"]) == (1, 2)
    r = vaultfs("safe", "--mountpoint", m.path, day1 / "DSC_0003.NEF", check=False)
    assert r.returncode == 1 and "NOT YET SAFE (1 copy of 2)" in r.stdout
    assert "mirroring 1" in vaultfs("status", store_path).stdout
    # Renamed, it has a place in the mirror: mirrored then.
    os.rename(day1 / "DSC_0003.NEF", day1 / "DSC_0003a.NEF")
    _until(lambda: "day1/DSC_0003a.NEF" in _events(got, "mirrored"))
    assert Vault(m.path).safe("day1/DSC_0003a.NEF")["copies"] == 2
    proc.terminate()
    m.stop(expect_errors=True)


def test_a_mirror_whose_disk_goes_away_is_left_alone_until_it_is_back(make_mount, store_path,
                                                                       mirror):
    m = make_mount()
    day1 = _select_folder(m.path, "day1")
    (day1 / "before.NEF").write_bytes(os.urandom(MB))
    _until(lambda: Vault(m.path).safe("day1/before.NEF")["copies"] == 2)
    away = mirror.with_name("unplugged")
    mirror.rename(away)  # (the disk is gone from where the vault knows it)
    (day1 / "after.NEF").write_bytes(os.urandom(MB))
    _until(lambda: "is gone (its disk unplugged?)" in (store_path / "vaultfs.log").read_text())
    answer = Vault(m.path).safe("day1/after.NEF")
    assert answer["verified"] and not answer["safe"] and answer["copies"] == 1
    m.stop(expect_errors=True)
    away.rename(mirror)
    m = make_mount()  # back: what it missed is mirrored first
    _until(lambda: Vault(m.path).safe("day1/after.NEF")["safe"])
    m.stop()


def test_the_scrub_mends_each_copy_from_the_other(make_mount, store_path, mirror):
    set_policy(store_path, "tiers", verify_days="0.00002")  # every tier, every ~2 s
    m = make_mount()
    day1 = _select_folder(m.path, "day1")
    rng = random.Random(5)
    ours, theirs = rng.randbytes(2 * MB), rng.randbytes(2 * MB)  # random: stored raw
    (day1 / "ours.raw").write_bytes(ours)
    (day1 / "theirs.raw").write_bytes(theirs)

    def scrubbed(since: int = 0):
        tier = json.loads((m.path / ".vault" / "status.json").read_text())["tiers"]["select"]
        last = tier.get("last_scrub")
        return last if last and last["finished_ns"] > since and last["mirror"]["chunks"] \
            and tier["mirrored"] == 2 else None

    _until(lambda: scrubbed())
    m.stop()
    _flip(store_path, ours[MB:MB + 64])   # one byte wrong in the vault's copy of one file,
    _flip(mirror, theirs[MB:MB + 64])     # and in the mirror's copy of the other
    t0 = time.time_ns()
    m = make_mount()
    _until(lambda: scrubbed(t0))
    found = scrubbed(t0)
    assert found["damaged"] == [] and found["repaired"] == ["day1/ours.raw"]
    assert found["mirror"]["damaged"] == [] and found["mirror"]["repaired"] == ["day1/theirs.raw"]
    assert (m.path / "day1" / "ours.raw").read_bytes() == ours
    assert (m.path / "day1" / "theirs.raw").read_bytes() == theirs
    text = vaultfs("status", store_path).stdout
    assert "1 repaired from the mirror" in text and "1 repaired from the vault" in text
    assert "day1/ours.raw: the vault's copy, from the mirror (scrub" in text
    m.stop()
    log = (store_path / "vaultfs.log").read_text()
    assert "repaired chunk" in log and "day1/ours.raw in the vault from the mirror" in log
    # Both stores verify clean (the fixtures check): the damage is gone, not patched over.


def test_a_read_mends_a_damaged_chunk_from_the_mirror(make_mount, store_path, mirror):
    m = make_mount()
    proc, got = _listen(m.path)
    data = random.Random(6).randbytes(3 * MB)
    (_select_folder(m.path, "day1") / "a.raw").write_bytes(data)
    _until(lambda: "day1/a.raw" in _events(got, "mirrored"))
    proc.terminate()
    m.stop()
    _flip(store_path, data[2 * MB:2 * MB + 64])
    m = make_mount()
    assert (m.path / "day1" / "a.raw").read_bytes() == data  # not EIO: mended on the way
    repairs = json.loads(vaultfs("status", store_path, "--json").stdout)["repairs"]
    assert [(r["paths"], r["copy"], r["by"]) for r in repairs] == [(["day1/a.raw"], "vault",
                                                                    "read")]
    m.stop()


def test_kill9_while_mirroring_then_the_next_mount_finishes(make_mount, store_path, mirror):
    m = make_mount()
    proc, got = _listen(m.path)
    day1 = _select_folder(m.path, "day1")
    digests = {}
    for i in range(5):  # larger than a mirror transaction's batch: copied in several
        data = os.urandom(40 * MB)
        (day1 / f"DSC_{i:04d}.NEF").write_bytes(data)
        digests[f"DSC_{i:04d}.NEF"] = hashlib.sha256(data).hexdigest()
        if i == 0:
            _until(lambda: _events(got, "mirrored"), timeout=60)
    m.kill()
    proc.terminate()
    assert_clean(store_path)
    assert_clean(mirror)
    held = json.loads(vaultfs("status", store_path, "--json").stdout)["tiers"]["select"]
    assert held["mirroring"] > 0, "the kill came after the mirror had everything"
    m = make_mount()  # finishes the job
    _until(lambda: all(Vault(m.path).safe(f"day1/{n}")["copies"] == 2 for n in digests),
           timeout=120)
    m.stop()
    seen = make_mount(store=mirror)
    for name, digest in digests.items():
        assert hashlib.sha256((seen.path / "day1" / name).read_bytes()).hexdigest() == digest
    seen.stop()


def test_what_cannot_be_a_mirror_is_refused(tmp_path, store_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def refused(*args: str) -> str:
        r = vaultfs("mount", store_path, mnt, *args, check=False)
        assert r.returncode == 2 and not os.path.ismount(mnt), r.stdout + r.stderr
        return r.stderr

    assert "is in the vault's own store" in refused("--mirror", str(store_path))
    assert "does not exist (is its disk plugged in?)" in refused("--mirror", "/nowhere/vault")
    other = tmp_path / "other"
    vaultfs("init", other)
    with Store.open(other, writable=True):
        assert "is in use by another vaultfs process" in refused("--mirror", str(other))
    own = _vault_with_a_file(tmp_path / "own")
    assert "is a vault of its own" in refused("--mirror", str(own))
    # Two copies asked for, and no mirror: the mount stops rather than keep one.
    toml = store_path / "vault.toml"
    toml.write_text(toml.read_text().replace('name = "general"', 'name = "general"\ncopies = 2'))
    assert "asks for copies = 2 and no mirror is configured" in refused()
    ssd = str(tmp_path / "ssd2")
    assert "a tier kept in two copies is not evicted" in refused("--mirror", ssd)
    toml.write_text(toml.read_text().replace("copies = 2\n", "copies = 3\n"))
    assert "tier general: copies must be 1 or 2" in refused("--mirror", ssd)
    assert not (tmp_path / "ssd2").exists()  # (nothing made for a mount that did not start)
    # The command line's mirror wins over vault.toml's, and is created on first use.
    toml.write_text(toml.read_text().replace("copies = 3\n", ""))
    r = vaultfs("mount", store_path, mnt, "--mirror", tmp_path / "ssd2")
    assert f"created the mirror store {tmp_path / 'ssd2'}" in r.stdout
    vaultfs("umount", mnt)
    assert "is the mirror of another vault" in vaultfs(
        "mount", other, mnt, "--mirror", tmp_path / "ssd2", check=False).stderr
    assert_clean(tmp_path / "ssd2")


def _vault_with_a_file(path: Path) -> Path:
    """A vault that holds a file (written by a mount of its own)."""
    vaultfs("init", path)
    mnt = path.parent / (path.name + "-mnt")
    mnt.mkdir()
    vaultfs("mount", path, mnt)
    (mnt / "x.txt").write_text("mine")
    vaultfs("umount", mnt)
    return path
