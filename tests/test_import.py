"""Card import through real mounts and real processes: `vaultfs import` copies a DCIM card into
the vault (mounting the store for the import, or through the running mount), skips by content
what the vault already holds, and its safe-to-format report names exactly the files that are not
safely in the vault; a card whose reads fail half-way (btrfs data checksums on a loop device:
read(2) returns EIO) loses nothing already imported, and nothing half-written appears."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, Mount, assert_clean, needs_fuse, vaultfs
from test_events import _listen, _until

pytestmark = needs_fuse

SHOTS = [CORPUS / "raw" / "GOPR0024.GPR", CORPUS / "dng" / "colorchart.dng",
         CORPUS / "jpeg" / "medium" / "canon_hdr_NO.jpg",
         CORPUS / "jpeg" / "medium" / "door-knocker.jpg",
         CORPUS / "bursts" / "series_nikon_d70s_jpeg_named_nef" / "Issue 247-1.nef"]
DAY = "2026-11-24"
MTIME = time.mktime(time.strptime(f"{DAY} 09:15:12", "%Y-%m-%d %H:%M:%S"))


def make_card(root: Path, files: dict[str, bytes | Path]) -> Path:
    """A card as a camera leaves it: DCIM/<folder>/<files>, times of the shoot."""
    for rel, body in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body.read_bytes() if isinstance(body, Path) else body)
        os.utime(p, (MTIME, MTIME))
    return root


def corpus_card(root: Path, folder: str = "100CANON") -> Path:
    return make_card(root, {f"DCIM/{folder}/{p.name}": p for p in SHOTS})


def import_json(store: Path, *args, expect: int = 0) -> dict:
    r = vaultfs("import", "--json", store, *args, check=False)
    assert r.returncode == expect, r.stdout + r.stderr
    return json.loads(r.stdout)


def by_path(report: dict) -> dict[str, dict]:
    return {f["path"]: f for f in report["files"]}


def test_a_card_is_imported_and_a_second_import_copies_nothing(tmp_path, store_path,
                                                              make_mount):
    card = corpus_card(tmp_path / "card")
    (card / "System Volume Information").mkdir()  # what an OS leaves: not a capture
    (card / "System Volume Information" / "IndexerVolumeGuid").write_bytes(b"x" * 76)
    first = import_json(store_path, card)  # the store is not mounted: the import mounts it
    assert first["safe_to_format"] is True
    assert [c["imported"] for c in first["cards"]] == [len(SHOTS)]
    files = by_path(first)
    assert set(files) == {f"DCIM/100CANON/{p.name}" for p in SHOTS}
    for p in SHOTS:
        f = files[f"DCIM/100CANON/{p.name}"]
        assert (f["state"], f["vault_path"], f["safe"]) == (
            "imported", f"{DAY}/100CANON/{p.name}", True)
    files_before = json.loads(vaultfs("status", "--json", store_path).stdout)["files"]

    second = vaultfs("import", store_path, card, "--list")
    assert "0 imported, 5 already in the vault" in second.stdout
    assert "SAFE TO FORMAT" in second.stdout and "NOT SAFE" not in second.stdout
    assert f"DCIM/100CANON/GOPR0024.GPR -> {DAY}/100CANON/GOPR0024.GPR (held)" in second.stdout
    assert json.loads(vaultfs("status", "--json", store_path).stdout)["files"] == files_before

    # Analysed as a tethered capture is (the import waited for it), bytes and time kept.
    found = json.loads(vaultfs("find", "--json", store_path, "--camera",
                                        "Canon PowerShot SX60 HS").stdout)
    assert f"{DAY}/100CANON/canon_hdr_NO.jpg" in [f["path"] for f in found]
    m = make_mount()
    for p in SHOTS:
        copy = m.path / DAY / "100CANON" / p.name
        assert copy.read_bytes() == p.read_bytes()
        assert copy.stat().st_mtime == MTIME


def test_import_through_a_running_mount_skips_what_it_holds_under_any_name(tmp_path, mnt,
                                                                          store_path):
    shutil.copyfile(SHOTS[0], mnt / "renamed-earlier.GPR")  # in the vault under another name
    card = corpus_card(tmp_path / "card")
    dest = mnt / DAY / "100CANON" / SHOTS[1].name
    assert not dest.exists()  # (the kernel may now hold a negative entry for it)
    proc, got = _listen(mnt)
    report = import_json(store_path, card)
    files = by_path(report)
    held = files[f"DCIM/100CANON/{SHOTS[0].name}"]
    assert (held["state"], held["vault_path"], held["safe"]) == ("held", "renamed-earlier.GPR",
                                                                 True)
    assert report["cards"][0]["imported"] == len(SHOTS) - 1 and report["safe_to_format"]
    assert dest.read_bytes() == SHOTS[1].read_bytes()  # seen at once through the mount
    assert not (mnt / DAY / "100CANON" / SHOTS[0].name).exists()
    _until(lambda: ("analysed", f"{DAY}/100CANON/{SHOTS[1].name}") in
           {(e["event"], e["path"]) for e in got})
    proc.terminate()
    seen = [(e["event"], e["path"]) for e in got]
    for p in SHOTS[1:]:
        path = f"{DAY}/100CANON/{p.name}"
        assert seen.index(("committed", path)) < seen.index(("verified", path))


def test_a_changed_file_on_the_card_is_imported_beside_the_old_one(tmp_path, store_path):
    card = corpus_card(tmp_path / "card")
    import_json(store_path, card)
    edited = card / "DCIM" / "100CANON" / SHOTS[1].name  # same name, size and time
    data = bytearray(edited.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edited.chmod(0o644)
    edited.write_bytes(bytes(data))
    os.utime(edited, (MTIME, MTIME))
    report = import_json(store_path, card)
    f = by_path(report)[f"DCIM/100CANON/{SHOTS[1].name}"]
    stem, ext = os.path.splitext(SHOTS[1].name)
    assert (f["state"], f["vault_path"]) == ("imported", f"{DAY}/100CANON/{stem}-2{ext}")
    assert [c["held"] for c in report["cards"]] == [len(SHOTS) - 1]


def test_several_cards_at_once(tmp_path, store_path, make_mount):
    a = corpus_card(tmp_path / "a", "100CANON")
    b = make_card(tmp_path / "b", {"DCIM/101NIKON/DSC_0001.NEF": SHOTS[4],  # as on card a
                                   "DCIM/101NIKON/DSC_0002.NEF": os.urandom(300_000),
                                   "PRIVATE/M4ROOT/CLIP/C0001.MP4": os.urandom(2_000_000)})
    report = import_json(store_path, a, b)
    cards = {c["card"]: c for c in report["cards"]}
    assert cards[str(a)]["imported"] == len(SHOTS)
    assert (cards[str(b)]["imported"], cards[str(b)]["held"]) == (2, 1)
    files = {(f["card"], f["path"]): f for f in report["files"]}
    assert files[(str(b), "DCIM/101NIKON/DSC_0001.NEF")]["vault_path"] == \
        f"{DAY}/100CANON/{SHOTS[4].name}"
    assert files[(str(b), "PRIVATE/M4ROOT/CLIP/C0001.MP4")]["vault_path"] == \
        f"{DAY}/PRIVATE/M4ROOT/CLIP/C0001.MP4"
    m = make_mount()
    assert (m.path / DAY / "101NIKON" / "DSC_0002.NEF").read_bytes() == \
        (b / "DCIM/101NIKON/DSC_0002.NEF").read_bytes()


@pytest.fixture
def damaged_card(tmp_path):
    """damaged_card(name, files, marks) -> the root of a btrfs image on a loop device holding
    `files` as make_card writes them, where each of the byte strings `marks` (found in the
    files' bodies) is damaged in the image: reading it returns EIO (a data checksum mismatch),
    as a failing card does. Unmounted at the end."""
    mounted: list[Path] = []

    def make(name: str, files: dict[str, bytes], marks: list[bytes]) -> Path:
        image, root = tmp_path / f"{name}.img", tmp_path / name
        root.mkdir()
        with open(image, "wb") as f:
            f.truncate(160 << 20)
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)
        try:
            make_card(root, files)
        finally:
            subprocess.run(["umount", str(root)], check=True)
        raw = image.read_bytes()
        with open(image, "r+b") as f:
            for mark in marks:
                at = raw.find(mark)
                assert at > 0
                f.seek(at)
                f.write(b"\0" * len(mark))
        subprocess.run(["mount", "-o", "loop,ro", str(image), str(root)], check=True)
        mounted.append(root)
        return root

    yield make
    for root in mounted:
        subprocess.run(["umount", str(root)], check=True)


@pytest.fixture
def failing_card(damaged_card):
    """A card whose files F03 and F06 have one damaged block half-way."""
    bodies = {}
    for i in range(8):
        body = bytearray(os.urandom(2_500_000))
        body[1_250_000:1_250_064] = b"DAMAGE%02d" % i * 8  # where the damage goes
        bodies[f"DCIM/100CANON/F{i:02d}.CR2"] = bytes(body)
    return damaged_card("failing-card", bodies, [b"DAMAGE%02d" % i * 8 for i in (3, 6)]), \
        bodies


def test_a_card_with_read_errors_loses_nothing_read_before(failing_card, store_path,
                                                          make_mount):
    card, bodies = failing_card
    report = import_json(store_path, card, expect=1)
    assert report["safe_to_format"] is False
    unsafe = {f["path"]: f["why"] for f in report["files"] if not f["safe"]}
    assert set(unsafe) == {"DCIM/100CANON/F03.CR2", "DCIM/100CANON/F06.CR2"}
    assert all("Input/output error" in why for why in unsafe.values())
    text = vaultfs("import", store_path, card, check=False)
    assert text.returncode == 1
    assert "NOT SAFE TO FORMAT: 2 files are not safely in the vault" in text.stdout
    assert "DCIM/100CANON/F03.CR2: cannot be read from the card: Input/output error" \
        in text.stdout
    m = make_mount()
    folder = m.path / DAY / "100CANON"
    assert sorted(os.listdir(folder)) == sorted(
        os.path.basename(p) for p in bodies if "F03" not in p and "F06" not in p)
    for rel, body in bodies.items():
        if os.path.basename(rel) in os.listdir(folder):
            assert (folder / os.path.basename(rel)).read_bytes() == body
    status = json.loads(vaultfs("status", "--json", store_path).stdout)
    assert status["files"] == 6  # nothing half-written: no unnamed or partial file left


def test_kill9_mid_import_loses_nothing_and_a_rerun_finishes(tmp_path, store_path, make_mount):
    # kill -9 of the mount's daemon half-way through a card: the vault shows whole files only,
    # and the next mount frees what the dead one left half done. Then of the import command:
    # the mount finishes the files under way. Each time, the import run again finds those
    # held, imports the rest under their own names (no "-1" copies) and calls the card safe.
    rand = random.Random(11)
    bodies = {f"DCIM/100CANON/IMG_{i:04d}.CR2": rand.randbytes(8 << 20) for i in range(24)}
    names = {os.path.basename(rel) for rel in bodies}
    card = make_card(tmp_path / "card", bodies)
    kept: set[str] = set()  # what the vault held when a round began
    for victim in ("daemon", "command"):
        m = make_mount()
        folder = m.path / DAY / "100CANON"
        for name in (set(os.listdir(folder)) - kept if folder.is_dir() else ()):
            os.unlink(folder / name)  # the second round starts from a card half in the vault
        with open(tmp_path / f"import-{victim}.log", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "import", "--json",
                                     str(store_path), str(card)],
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while not (folder.is_dir() and set(os.listdir(folder)) - kept):
                assert proc.poll() is None, "the import ended before it was killed"
                assert time.monotonic() < deadline, "no file was imported in 60 s"
                time.sleep(0.01)  # the first new file is in: kill now
            if victim == "daemon":
                m.kill()
                proc.wait(timeout=60)  # (its requests fail: the mount is gone)
                with pytest.raises(OSError) as e:
                    os.listdir(m.path)
                assert e.value.errno == errno.ENOTCONN
            else:
                proc.kill()
                m.stop()  # the files under way when the command died are finished first
        finally:
            proc.kill()
            proc.wait()
        vaultfs("mount", store_path, m.path)
        shown = set(os.listdir(folder))
        assert kept < shown < names, victim
        for name in shown:
            assert (folder / name).read_bytes() == bodies[f"DCIM/100CANON/{name}"], name
        vaultfs("umount", m.path)
        # Nothing else holds data: no unnamed inode of a file cut short is left.
        assert json.loads(vaultfs("status", "--json", store_path).stdout)["files"] == len(shown)
        assert_clean(store_path)

        report = import_json(store_path, card)
        assert report["safe_to_format"] is True
        held = {f["path"] for f in report["files"] if f["state"] == "held"}
        assert held == {f"DCIM/100CANON/{name}" for name in shown}, victim
        kept = shown
    m = make_mount()
    assert set(os.listdir(folder := m.path / DAY / "100CANON")) == names
    for rel, body in bodies.items():
        assert (folder / os.path.basename(rel)).read_bytes() == body


def test_a_file_that_cannot_be_read_whole_is_never_held(tmp_path, store_path, damaged_card):
    # The vault holds a clip with 24 MiB of zeros in its middle (a hole in the store); card B
    # holds the same clip but for real bytes at 14 MiB, which it cannot read. A read that
    # stops short before the bad block is not zeros: the clip is not held, and card B is not
    # safe to format.
    clip, mib = "PRIVATE/M4ROOT/CLIP/C0001.MP4", 1 << 20
    rand = random.Random(7)
    head, tail = rand.randbytes(2 * mib), rand.randbytes(2 * mib)
    a = make_card(tmp_path / "a", {clip: head + bytes(24 * mib) + tail})
    assert import_json(store_path, a)["safe_to_format"]
    mark = b"DAMAGED!" * 8
    middle = bytearray(24 * mib)
    middle[12 * mib:12 * mib + len(mark)] = mark
    b = damaged_card("card-b", {clip: head + bytes(middle) + tail}, [mark])
    with pytest.raises(OSError) as e:
        (b / clip).read_bytes()
    assert e.value.errno == errno.EIO
    r = vaultfs("import", store_path, b, "--list", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NOT SAFE TO FORMAT: 1 file is not safely in the vault" in r.stdout
    assert f"{clip}: cannot be read from the card: Input/output error at byte 14,680,064\n" \
        in r.stdout
    assert "(held)" not in r.stdout
    status = json.loads(vaultfs("status", "--json", store_path).stdout)
    assert status["files"] == 1  # nothing half-imported beside the clip


def test_a_vault_is_never_a_card(tmp_path, store_path):
    # A vault's own files would each be found held, by itself: the "card" would be called safe
    # to format, and formatting it deletes the only copy. Refused, with nothing done.
    card = corpus_card(tmp_path / "card")
    import_json(store_path, card)
    r = vaultfs("import", store_path, store_path, check=False)  # the store itself, unmounted
    assert r.returncode == 2 and "SAFE" not in r.stdout, r.stdout
    assert f"{store_path} is the vault store {store_path}: a vault's own files are no card " \
        "to import" in r.stderr
    other = tmp_path / "holder" / "other-vault"
    vaultfs("init", other)
    (tmp_path / "outer").mkdir()
    m = Mount(store_path, tmp_path / "outer" / "mnt")
    (tmp_path / "outer" / "mnt").mkdir()
    try:
        m.start()
        (tmp_path / "link").symlink_to(m.path / DAY)
        refused = {m.path / DAY / "100CANON": f"is in the vault mounted on {m.path}",
                   m.path / ".vault" / "tiers": f"is in the vault mounted on {m.path}",
                   tmp_path / "link": f"is in the vault mounted on {m.path}",
                   store_path / "lmdb": f"is in the vault store {store_path}",
                   tmp_path / "holder": f"holds the vault store {other}",
                   tmp_path / "outer": f"reaches into the vault mounted on {m.path} ("}
        for folder, why in refused.items():
            r = vaultfs("import", store_path, folder, "--list", check=False)
            assert r.returncode == 2 and "SAFE" not in r.stdout, (folder, r.stdout)
            assert f"{folder} {why}" in r.stderr, (folder, r.stderr)
    finally:
        m.cleanup()
    assert json.loads(vaultfs("status", "--json", store_path).stdout)["files"] == len(SHOTS)


def test_into_places_the_card_and_refuses_paths_outside_the_vault(tmp_path, store_path,
                                                                   make_mount):
    card = make_card(tmp_path / "card", {"DCIM/100CANON/IMG_0001.CR2": SHOTS[0]})
    r = vaultfs("import", store_path, card, "--into", "../elsewhere", check=False)
    assert r.returncode == 2 and "give a folder inside the vault" in r.stderr
    report = import_json(store_path, card, "--into", "weddings/{date} Ana & Tom")
    assert report["files"][0]["vault_path"] == f"weddings/{DAY} Ana & Tom/100CANON/IMG_0001.CR2"
    m = make_mount()
    assert (m.path / "weddings" / f"{DAY} Ana & Tom" / "100CANON" / "IMG_0001.CR2"
            ).read_bytes() == SHOTS[0].read_bytes()
