"""Field space: a vault on a small disk evicts the files a peer holds when it falls under its
free-space floor, lists them still, refuses to read them with a clear error, and gets them back
with `vaultfs fetch`. Real stores on a real small tmpfs, real mounts, real `vaultfs` commands."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mount, assert_clean, needs_fuse, new_test_store, set_policy, vaultfs
from vaultfs.client import Vault
from vaultfs.fs import control
from vaultfs.store import Store

pytestmark = [needs_fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")]

MB = 1_000_000


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture
def mount_at(tmp_path):
    """mount_at(store, name) -> a Mount started on tmp_path/name, cleaned up at the end."""
    made: list[Mount] = []

    def make(store: Path, name: str = "mnt") -> Mount:
        (tmp_path / name).mkdir(exist_ok=True)
        made.append(Mount(store, tmp_path / name))
        return made[-1].start()
    yield make
    for m in made:
        m.cleanup()


def _vault(path: Path, keep_free: int) -> Path:
    set_policy(new_test_store(path), "space", keep_free_percent=str(keep_free))
    return path


def _offline(store: Path) -> dict[str, list[str]]:
    status = json.loads(vaultfs("status", store, "--json").stdout)
    return {f["path"]: f["held_by"] for f in status["offline"]}


def _wait_offline(store: Path, paths: set[str], seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        found = _offline(store)
        if paths <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_vault_under_its_floor_evicts_what_peers_hold_and_fetches_it_back(small_disk,
                                                                            tmp_path, mount_at):
    field = _vault(small_disk / "field", keep_free=90)  # a floor it can never reach
    studio, third = _vault(tmp_path / "studio", 0), _vault(tmp_path / "third", 0)
    data = {name: os.urandom(4 * MB) for name in ("A.NEF", "B.NEF", "C.NEF", "D.NEF")}

    # Shoot A, B and a select C. Nothing is held elsewhere yet: nothing can go.
    m = mount_at(field)
    day = m.path / "day1"
    day.mkdir()
    for i, name in enumerate(("A.NEF", "B.NEF", "C.NEF")):
        (day / name).write_bytes(data[name])
        os.utime(day / name, (1_700_000_000 + i, 1_700_000_000 + i))  # A is the oldest
    os.setxattr(day / "C.NEF", "user.vaultfs.tier", b"select")
    time.sleep(7)  # (the mount looks at its free space every 5 s)
    m.stop()
    assert _offline(field) == {}
    assert "nothing more can be evicted" in m.log.read_text()

    # At the studio: the sync leaves the field vault under its floor, so it evicts what the
    # studio now holds, oldest first; the select stays.
    report = json.loads(vaultfs("sync", field, studio, "--json").stdout)
    assert [e["path"] for e in report["evicted"]["evicted"]] == ["day1/A.NEF", "day1/B.NEF"]
    assert _offline(field) == {"day1/A.NEF": ["studio"], "day1/B.NEF": ["studio"]}
    assert_clean(field)  # offline is not damage

    # Through the mount: listed with its size, read refused with "Object is remote", and not
    # "safe" any more (an import would not call a card safe to format on its strength).
    m.start()
    assert (day / "A.NEF").stat().st_size == 4 * MB
    with pytest.raises(OSError) as e:
        (day / "A.NEF").read_bytes()
    assert e.value.errno == errno.EREMOTE
    answer = Vault(m.path).safe("day1/A.NEF")
    assert answer["offline"] and not answer["safe"]
    assert (day / "C.NEF").read_bytes() == data["C.NEF"]
    (day / "D.NEF").write_bytes(data["D.NEF"])  # held nowhere: never evicted
    time.sleep(7)
    assert (day / "D.NEF").read_bytes() == data["D.NEF"]
    m.stop()
    assert "day1/A.NEF is offline" in m.log.read_text()

    # Asked by name: a select and a file no peer holds are kept, saying why.
    kept = json.loads(vaultfs("evict", field, "day1/C.NEF", "day1/D.NEF", "--json").stdout)
    assert kept["evicted"] == []
    assert {k["path"]: k["why"] for k in kept["skipped"]} == {
        "day1/C.NEF": "tier select is not evicted",
        "day1/D.NEF": "no peer is known to hold it"}

    # Fetching would take the vault further under its floor: refused, in one sentence.
    r = vaultfs("fetch", field, studio, check=False)
    assert r.returncode != 0 and "free-space floor" in r.stderr
    set_policy(field, "space", keep_free_percent="0")
    got = json.loads(vaultfs("fetch", field, studio, "day1/A.NEF", "--json").stdout)
    assert got["fetched"] == ["day1/A.NEF"] and got["not_on_peer"] == []
    assert _offline(field) == {"day1/B.NEF": ["studio"]}

    # A third vault cannot get B from here (only its bytes' holder can send them).
    report = json.loads(vaultfs("sync", field, third, "--push", "--json").stdout)
    assert report["offline"] == ["day1/B.NEF"]
    m3 = mount_at(third, "mnt3")
    assert sorted(os.listdir(m3.path / "day1")) == ["A.NEF", "C.NEF", "D.NEF"]
    m3.stop()

    # Under the floor again, the mount itself evicts what a peer now holds (D: the third).
    set_policy(field, "space", keep_free_percent="90")
    m.start()
    found = _wait_offline(field, {"day1/A.NEF", "day1/D.NEF"})
    m.stop()
    assert found == {"day1/A.NEF": ["studio", "third"], "day1/B.NEF": ["studio"],
                     "day1/D.NEF": ["third"]}

    # The third holds A and D but not B; the studio has B.
    set_policy(field, "space", keep_free_percent="0")
    got = json.loads(vaultfs("fetch", field, third, "--json", check=False).stdout)
    assert sorted(got["fetched"]) == ["day1/A.NEF", "day1/D.NEF"]
    assert got["not_on_peer"] == ["day1/B.NEF"]
    vaultfs("fetch", field, studio)
    assert _offline(field) == {}
    m.start()
    for name, body in data.items():
        assert (day / name).read_bytes() == body
    m.stop()
    for store in (field, studio, third):
        assert_clean(store)


def _synced(tmp_path: Path, mount_at, name: str, size: int) -> tuple[Path, Path, Mount, bytes]:
    """A field vault with one file of random bytes, synced to a studio vault (the field now
    holds it at the studio); both without a floor. The field's mount is stopped."""
    field, studio = _vault(tmp_path / "field", 0), _vault(tmp_path / "studio", 0)
    m = mount_at(field)
    body = os.urandom(size)
    (m.path / name).write_bytes(body)
    m.stop()
    vaultfs("sync", field, studio)
    return field, studio, m, body


def test_two_vaults_never_each_evict_what_the_other_holds(tmp_path, mount_at):
    field, studio, m, body = _synced(tmp_path, mount_at, "A.NEF", 3 * MB)
    # Asked by name, with no floor at all: it goes. A name not in the vault is named, and
    # the command fails: a typo never looks like "nothing to do".
    r = vaultfs("evict", field, "A.NEF", "B.NEF", "day9/", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "evicted A.NEF (" in r.stdout and "evicted 1 files" in r.stdout
    assert r.stderr.splitlines() == ["vaultfs: B.NEF: not in the vault",
                                     "vaultfs: day9/: not in the vault"]
    r = vaultfs("evict", field, "nothere", "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["missing"] == ["nothere"]
    # The studio meets the field: the field's copy is offline, so the studio records no hold,
    # and the field relies on the studio's copy, which therefore stays.
    vaultfs("sync", studio, field)
    kept = json.loads(vaultfs("evict", studio, "A.NEF", "--json").stdout)
    assert kept["evicted"] == [] and kept["missing"] == [] and kept["skipped"] == [
        {"path": "A.NEF", "why": "a peer relies on this copy (field)"}]
    vaultfs("fetch", field, studio)
    m.start()
    assert (m.path / "A.NEF").read_bytes() == body
    m.stop()
    for store in (field, studio):
        assert_clean(store)


def test_an_append_to_a_file_evicted_while_open_keeps_every_byte(tmp_path, mount_at):
    field, studio, m, log = _synced(tmp_path, mount_at, "log.csv", 2 * MB)
    m.start()
    with open(m.path / "log.csv", "ab") as f:
        f.write(b"appended row\n")
        f.flush()
        # Evicted by the mount while the logger holds it open with a row not yet committed.
        # (Asked from this process: a child process would close a copy of the descriptor,
        # which commits the file.)
        with Store.open(field) as store:
            with store.reader() as tx:
                ino = tx.resolve("log.csv")
                content = tx.inode(ino).content
            done = control.request(store, "evict", candidates=[[ino, content, "log.csv"]],
                                   want=None, dry_run=False)
        assert [e["path"] for e in done["evicted"]] == ["log.csv"], done
    # The new version was stored whole from what was written: every byte is here.
    assert (m.path / "log.csv").read_bytes() == log + b"appended row\n"
    m.stop()
    assert _offline(field) == {}
    assert_clean(field)
