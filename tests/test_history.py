"""Snapshots, version timelines, diff and restore, driven through a real mount and the command
line (snapshot commands reach the running mount through its control socket)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import time

import lmdb
import pytest

from conftest import CORPUS, assert_clean, needs_fuse, set_policy, tree_of, vaultfs
from vaultfs.store import Store
from vaultfs.store import format as F

pytestmark = needs_fuse


def _fill(root) -> None:
    (root / "day1").mkdir()
    (root / "day1" / "IMG_0001.NEF").write_bytes(os.urandom(3_000_000))
    (root / "day1" / "IMG_0001.xmp").write_text("<x:xmpmeta rating='3'/>")
    os.setxattr(root / "day1" / "IMG_0001.NEF", "user.vaultfs.tier", b"select")
    os.symlink("day1/IMG_0001.NEF", root / "best")
    os.link(root / "day1" / "IMG_0001.xmp", root / "sidecar-link.xmp")
    os.chmod(root / "day1" / "IMG_0001.xmp", 0o600)


def test_a_snapshot_freezes_the_tree_and_shows_it_read_only(make_mount, store_path, tmp_path):
    m = make_mount()
    _fill(m.path)
    before = tree_of(m.path)
    out = vaultfs("snapshot", store_path, "card1", "--json")  # through the running mount
    assert json.loads(out.stdout)["name"] == "card1"

    (m.path / "day1" / "IMG_0001.xmp").write_text("<x:xmpmeta rating='5'/>")
    (m.path / "day1" / "IMG_0001.NEF").unlink()
    (m.path / "day2").mkdir()
    (m.path / "day2" / "IMG_0002.NEF").write_bytes(b"new")

    snaps = m.path / ".vault" / "snapshots"
    assert sorted(os.listdir(snaps)) == ["card1", "latest"]  # no remount needed
    assert os.readlink(snaps / "latest") == "card1"
    assert tree_of(snaps / "card1") == before
    assert (m.path / "day1" / "IMG_0001.xmp").read_text() == "<x:xmpmeta rating='5'/>"
    for attempt in (lambda: (snaps / "card1" / "x").write_text("no"),
                    lambda: (snaps / "card1" / "day1" / "IMG_0001.xmp").write_text("no"),
                    lambda: (snaps / "card1" / "best").unlink(),
                    lambda: os.setxattr(snaps / "card1" / "day1", "user.a", b"1")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno in (errno.EROFS, errno.EACCES)

    # Real programs copy out of it: cp -a and rsync keep modes, times, links, xattrs.
    subprocess.run(["cp", "-a", str(snaps / "card1"), str(tmp_path / "cp")], check=True)
    assert tree_of(tmp_path / "cp") == before
    subprocess.run(["rsync", "-aHX", f"{snaps / 'card1'}/", str(tmp_path / "rsync")],
                   check=True)
    assert tree_of(tmp_path / "rsync") == before

    vaultfs("snapshot", store_path)  # a second one, named by the time
    listed = json.loads(vaultfs("snapshots", store_path, "--json").stdout)
    assert [s["name"] for s in listed][0] == "card1" and len(listed) == 2
    assert listed[0]["files"] == 2 and listed[0]["logical_bytes"] == 3_000_000 + 23
    assert listed[0]["exclusive_bytes"] == 3_000_000  # the NEF deleted since (incompressible)
    assert os.readlink(snaps / "latest") == listed[1]["name"]
    m.stop()
    # And with nothing mounted, the command line opens the store itself.
    vaultfs("snapshot", store_path, "offline")
    with pytest.raises(AssertionError, match="exists"):
        vaultfs("snapshot", store_path, "card1")


def test_a_snapshot_copies_nothing(store_path):
    """Snapshot cost does not grow with the tree: it writes the same few records for a tree
    of 20,000 files as for an empty one."""
    with Store.open(store_path, writable=True) as store:
        def make(tx, first):
            for i in range(first, first + 2000):
                node = tx.new_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
                node.nlink = 1
                tx.put_inode(node)
                tx.add_entry(F.ROOT_INO, b"f%05d" % i, node.ino)
        for first in range(0, 20_000, 2000):
            store.write(lambda tx, first=first: make(tx, first))

    def records() -> int:
        env = lmdb.open(str(store_path / "lmdb"), readonly=True, max_dbs=20, lock=False)
        with env.begin() as t:
            n = sum(t.stat(env.open_db(name, txn=t, create=False))["entries"]
                    for name in F.ALL_DBS)
        env.close()
        return n

    before = records()
    vaultfs("snapshot", store_path, "big")
    assert records() - before <= 3  # an epoch, the snapshot, next_epoch in meta
    with Store.open(store_path) as store, store.reader(epoch=1) as tx:
        assert sum(1 for _ in tx.entries(F.ROOT_INO)) == 20_000


def test_every_version_is_on_the_files_timeline(make_mount, store_path):
    m = make_mount()
    f = m.path / "painting.kra"
    bodies = [os.urandom(500_000) for _ in range(3)]
    f.write_bytes(bodies[0])
    with open(f, "r+b") as fh:  # one open session with two fsyncs: one version
        fh.write(bodies[1])
        os.fsync(fh.fileno())
        fh.write(b"")
        os.fsync(fh.fileno())
    # The editor's atomic save: a new file renamed over the old keeps the timeline.
    (m.path / ".painting.kra.tmp").write_bytes(bodies[2])
    os.rename(m.path / ".painting.kra.tmp", f)

    timeline = m.path / ".vault" / "versions" / "painting.kra"
    names = os.listdir(timeline)
    assert len(names) == 3 and all(n.endswith("Z.kra") for n in names)
    assert [(timeline / n).read_bytes() for n in sorted(names)] == bodies
    log = json.loads(vaultfs("log", store_path, "painting.kra", "--json").stdout)
    assert [e["size"] for e in log] == [500_000] * 3
    assert [e["current"] for e in log] == [False, False, True]
    assert sorted(names) == [e["name"] for e in log]
    assert all(e["changed_bytes"] == 500_000 for e in log)
    with pytest.raises(OSError) as e:
        (timeline / names[0]).write_bytes(b"no")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    # A timeline is listed by the mirror of the live tree's folders.
    (m.path / "sub").mkdir()
    (m.path / "sub" / "x.txt").write_text("x")
    assert sorted(os.listdir(m.path / ".vault" / "versions")) == ["painting.kra", "sub"]
    assert os.listdir(m.path / ".vault" / "versions" / "sub" / "x.txt")[0].endswith(".txt")


def test_diff_between_snapshots_and_the_livetree_of(make_mount, store_path):
    m = make_mount()
    _fill(m.path)
    (m.path / "notes.txt").write_text("keep")
    vaultfs("snapshot", store_path, "before")
    (m.path / "day1" / "IMG_0001.xmp").write_text("<x:xmpmeta rating='5'/>")  # modified
    os.rename(m.path / "day1" / "IMG_0001.NEF", m.path / "day1" / "keeper.NEF")  # renamed
    (m.path / "notes.txt").unlink()                                           # removed
    (m.path / "new.txt").write_text("hello")                                  # added
    changes = json.loads(vaultfs("diff", store_path, "before", "main", "--json").stdout)
    got = {(c["change"], c["path"], c.get("from")) for c in changes}
    assert got == {("modified", "day1/IMG_0001.xmp", None),
                   ("modified", "sidecar-link.xmp", None),
                   ("renamed", "day1/keeper.NEF", "day1/IMG_0001.NEF"),
                   ("removed", "notes.txt", None), ("added", "new.txt", None)}
    text = vaultfs("diff", store_path, "before", "main", "--stat").stdout
    assert "R day1/IMG_0001.NEF -> day1/keeper.NEF" in text
    assert "1 added, 1 removed, 2 modified, 1 renamed" in text
    assert json.loads(vaultfs("diff", store_path, "main", "main", "--json").stdout) == []
    r = vaultfs("diff", store_path, "nope", "main", check=False)
    assert r.returncode == 2 and "no snapshot or branch named nope" in r.stderr


def test_restore_writes_a_snapshot_out_and_keeps_newer_files(make_mount, store_path,
                                                             tmp_path):
    m = make_mount()
    _fill(m.path)
    corpus = sorted(p for p in CORPUS.rglob("*") if p.suffix.lower() in (".nef", ".dng"))[:2]
    assert corpus
    for p in corpus:
        shutil.copy2(p, m.path / "day1" / p.name)
    before = tree_of(m.path)
    vaultfs("snapshot", store_path, "s1")
    shutil.rmtree(m.path / "day1")

    dest = tmp_path / "restored"
    vaultfs("restore", store_path, "s1", dest)
    assert tree_of(dest) == before
    st = os.lstat(dest / "sidecar-link.xmp")
    assert st.st_nlink == 2 and st.st_ino == os.lstat(dest / "day1" / "IMG_0001.xmp").st_ino

    # Restoring onto it again keeps a file changed since, unless asked.
    newer = dest / "day1" / "IMG_0001.xmp"
    os.chmod(newer, 0o644)
    newer.write_text("edited after the restore")
    out = json.loads(vaultfs("restore", store_path, "s1:day1", dest / "day1", "--json").stdout)
    assert out["skipped_newer"] == ["IMG_0001.xmp"] and not out["failed"]
    assert newer.read_text() == "edited after the restore"
    vaultfs("restore", store_path, "s1:day1/IMG_0001.xmp", dest / "day1", "--overwrite")
    assert newer.read_text() == "<x:xmpmeta rating='3'/>"
    r = vaultfs("restore", store_path, "s1:missing", dest, check=False)
    assert r.returncode == 2 and "s1 has no missing" in r.stderr


def test_deleting_a_snapshot_frees_what_only_it_held(make_mount, store_path):
    m = make_mount()
    (m.path / "a.raw").write_bytes(os.urandom(2_000_000))
    vaultfs("snapshot", store_path, "s1")
    (m.path / "a.raw").unlink()
    m.stop()
    with Store.open(store_path) as store:
        assert store.figures()["stored_bytes"] >= 2_000_000  # the snapshot still holds it
    out = vaultfs("snapshot", store_path, "s1", "--delete").stdout
    assert "deleted snapshot s1" in out
    with Store.open(store_path) as store:
        figures = store.figures()
    assert figures["stored_bytes"] == 0 and figures["files"] == 0 and figures["chunks"] == 0
    m = make_mount()
    assert os.listdir(m.path / ".vault" / "snapshots") == []
    r = vaultfs("snapshot", store_path, "s1", "--delete", check=False)
    assert r.returncode == 2 and "no snapshot named s1" in r.stderr


def test_branches_share_chunks_and_merge_keeps_both_sides(make_mount, store_path):
    m = make_mount()
    (m.path / "proj").mkdir()
    (m.path / "proj" / "edit.txt").write_text("v1")
    (m.path / "proj" / "both.txt").write_text("base")
    (m.path / "footage.mov").write_bytes(os.urandom(4_000_000))
    (m.path / "gone-on-cut.txt").write_text("x")
    vaultfs("snapshot", store_path, "base")
    stored = json.loads((m.path / ".vault" / "status.json").read_text())["stored_bytes"]
    vaultfs("branch", store_path, "directors-cut", "--from", "base")
    # A branch costs no bytes: same chunks.
    assert json.loads((m.path / ".vault" / "status.json").read_text())["stored_bytes"] == stored
    (m.path / "proj" / "both.txt").write_text("main's change")
    m.stop()

    cut = make_mount("vault_visible", branch="directors-cut")
    assert (cut.path / "footage.mov").stat().st_size == 4_000_000
    (cut.path / "proj" / "edit.txt").write_text("v2 on the cut")
    (cut.path / "proj" / "both.txt").write_text("the cut's change")
    (cut.path / "gone-on-cut.txt").unlink()
    (cut.path / "extra").mkdir()
    (cut.path / "extra" / "credits.txt").write_text("roll")
    cut.stop()
    listed = {b["name"]: b for b in json.loads(vaultfs("branches", store_path,
                                                       "--json").stdout)}
    assert set(listed) == {"main", "directors-cut"}

    report = json.loads(vaultfs("merge", store_path, "directors-cut", "main",
                                "--json").stdout)
    assert sorted(report["applied"]) == ["extra", "extra/credits.txt", "gone-on-cut.txt",
                                         "proj/edit.txt"]
    [conflict] = report["conflicts"]
    assert conflict["path"] == "proj/both.txt"
    assert conflict["kept_as"].startswith("proj/both.conflict-directors-cut-")
    m = make_mount()
    assert (m.path / "proj" / "edit.txt").read_text() == "v2 on the cut"
    assert (m.path / "proj" / "both.txt").read_text() == "main's change"
    assert (m.path / conflict["kept_as"]).read_text() == "the cut's change"
    assert (m.path / "extra" / "credits.txt").read_text() == "roll"
    assert not (m.path / "gone-on-cut.txt").exists()
    # The cut itself is untouched by the merge, and can go: main keeps what it merged.
    m.stop()
    vaultfs("branch", store_path, "directors-cut", "--delete")
    m = make_mount()
    assert (m.path / "extra" / "credits.txt").read_text() == "roll"
    vaultfs("branch", store_path, "again")  # through the mount: from main as it is now
    r = vaultfs("merge", store_path, "again", "main", check=False)
    assert r.returncode == 2 and "branch main is mounted" in r.stderr
    m.stop()
    assert json.loads(vaultfs("merge", store_path, "again", "main", "--json").stdout) == \
        {"applied": [], "conflicts": [], "kept": []}
    r = vaultfs("merge", store_path, "nope", "main", check=False)
    assert r.returncode == 2 and "no snapshot or branch named nope" in r.stderr
    r = vaultfs("branch", store_path, "main", "--delete", check=False)
    assert r.returncode == 2 and "cannot be deleted" in r.stderr


def test_prune_keeps_by_rule_and_frees_the_rest(make_mount, store_path):
    m = make_mount()
    for i in range(5):
        (m.path / f"card{i}.raw").write_bytes(os.urandom(500_000))
        vaultfs("snapshot", store_path, f"s{i}")
        (m.path / f"card{i}.raw").unlink()
    f = m.path / "doc.txt"
    for i in range(4):
        f.write_bytes(os.urandom(100_000))
    dry = json.loads(vaultfs("prune", store_path, "--keep-last", "2", "--versions",
                             "--dry-run", "--json").stdout)
    assert dry["snapshots_removed"] == ["s0", "s1", "s2"] and dry["versions_removed"] == 2
    assert len(os.listdir(m.path / ".vault" / "snapshots")) == 6  # nothing changed yet
    done = json.loads(vaultfs("prune", store_path, "--keep-last", "2", "--versions",
                              "--json").stdout)
    assert done["freed_bytes"] >= 3 * 500_000 + 2 * 100_000
    assert sorted(os.listdir(m.path / ".vault" / "snapshots")) == ["latest", "s3", "s4"]
    assert len(os.listdir(m.path / ".vault" / "versions" / "doc.txt")) == 2
    assert (m.path / ".vault" / "snapshots" / "s3" / "card3.raw").stat().st_size == 500_000
    r = vaultfs("prune", store_path, check=False)
    assert r.returncode == 2 and "keep rule" in r.stderr
    m.stop()
    vaultfs("gc", store_path, "--compact")


def test_kill_9_during_prune_loses_nothing_still_referenced(make_mount, store_path):
    """Prunes killed with SIGKILL at random moments: every snapshot still listed afterwards
    reads back whole, and the store verifies clean every time."""
    import hashlib
    import random
    import sys

    def body(i: int) -> bytes:
        return random.Random(i).randbytes(1_500_000)

    m = make_mount()
    for i in range(16):  # each snapshot alone holds a big file and 300 small ones
        (m.path / f"f{i}.bin").write_bytes(body(i))
        (m.path / "batch").mkdir()
        for j in range(300):
            (m.path / "batch" / f"{j}.txt").write_text(str(j))
        vaultfs("snapshot", store_path, f"s{i:02d}")
        (m.path / f"f{i}.bin").unlink()
        shutil.rmtree(m.path / "batch")
    m.stop()
    rng = random.Random(3)
    killed, targets = 0, [12, 8, 4, 1]
    while targets:  # a killed prune is run again until it finishes
        keep = targets[0]
        proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "prune", str(store_path),
                                 "--keep-last", str(keep)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.02, 0.3))  # from start-up to the end of its commit
        if proc.poll() is None:
            proc.kill()
            killed += 1
        else:
            targets.pop(0)
        proc.wait()
        assert_clean(store_path)
        m = make_mount()
        names = sorted(n for n in os.listdir(m.path / ".vault" / "snapshots") if n != "latest")
        assert len(names) >= keep
        for name in names:
            i = int(name[1:])
            got = (m.path / ".vault" / "snapshots" / name / f"f{i}.bin").read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(body(i)).digest()
        m.stop()
    assert killed >= 2  # prunes were cut short


def test_policy_takes_and_prunes_automatic_snapshots(make_mount, store_path):
    set_policy(store_path, "snapshots", every_minutes="0.02", at_unmount="true", keep_last="2",
               keep_hourly="0", keep_daily="0", keep_weekly="0", keep_monthly="0")
    vaultfs("snapshot", store_path, "by-hand")
    m = make_mount()
    snaps = m.path / ".vault" / "snapshots"

    def auto() -> list[str]:
        return sorted(n for n in os.listdir(snaps) if n.startswith("auto-"))

    seen: set[str] = set()
    for i in range(4):  # files arrive; snapshots follow every ~1.2 s
        (m.path / f"frame{i}.raw").write_bytes(os.urandom(10_000))
        deadline = time.monotonic() + 30
        while not (set(auto()) - seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        new = set(auto()) - seen
        assert new, "no automatic snapshot within 30 s"
        seen |= new
        assert len(auto()) <= 2  # pruned to keep_last
        assert f"frame{i}.raw" in os.listdir(snaps / max(new))
    time.sleep(2.5)
    assert set(auto()) <= seen  # nothing changed: no new snapshot
    (m.path / "last.raw").write_bytes(b"x")
    m.stop()  # at unmount, one more: it holds the last file
    with Store.open(store_path) as store, store.reader() as tx:
        names = sorted(n.decode() for n, _, _, _ in tx.snapshots())
    assert "by-hand" in names  # hand-made snapshots are never pruned by policy
    m = make_mount()
    newest = max(n for n in names if n.startswith("auto-"))
    assert (m.path / ".vault" / "snapshots" / newest / "last.raw").read_bytes() == b"x"


def test_a_bad_policy_stops_the_mount_with_a_clear_error(store_path, tmp_path):
    set_policy(store_path, "snapshots", keep_last='"many"')
    (tmp_path / "mp").mkdir()
    r = vaultfs("mount", store_path, tmp_path / "mp", check=False)
    assert r.returncode != 0 and "snapshots.keep_last must be" in r.stderr
    assert not os.path.ismount(tmp_path / "mp")
    set_policy(store_path, "snapshots", keep_last="20")


def test_kill_9_during_compaction_leaves_a_whole_store(make_mount, store_path):
    """`gc --compact` swaps in a rewritten database file: killed at any moment, the next open
    finds either the old file or the new one, whole."""
    import random
    import sys

    m = make_mount()
    bodies = {f"f{i}.bin": random.Random(i).randbytes(8_000_000) for i in range(12)}
    for name, body in bodies.items():
        (m.path / name).write_bytes(body)
    for name in list(bodies)[:6]:  # freed pages for the compaction to give back
        (m.path / name).unlink()
        del bodies[name]
    m.stop()
    rng = random.Random(11)
    outcomes = set()
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "gc", str(store_path),
                                 "--compact"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.3))
        outcomes.add("killed" if proc.poll() is None else "finished")
        proc.kill()
        proc.wait()
        m = make_mount()  # a writable open: finishes or undoes an interrupted swap
        for name, body in bodies.items():
            assert (m.path / name).read_bytes() == body
        m.stop()
        assert_clean(store_path)
        assert not (store_path / "lmdb.new").exists() and not (store_path / "lmdb.old").exists()
    assert "killed" in outcomes


def test_a_file_deleted_on_two_branches_is_freed(make_mount, store_path):
    m = make_mount()
    (m.path / "shared.raw").write_bytes(os.urandom(1_000_000))
    vaultfs("branch", store_path, "side")  # main's tree is frozen; both go on from it
    (m.path / "shared.raw").unlink()
    m.stop()
    side = make_mount(branch="side")
    (side.path / "shared.raw").unlink()
    side.stop()
    vaultfs("gc", store_path)  # no tree sees the frozen record any more
    with Store.open(store_path) as store:
        figures = store.figures()
    assert figures["stored_bytes"] == 0 and figures["files"] == 0


def test_merge_of_a_file_that_became_a_folder(make_mount, store_path):
    m = make_mount()
    (m.path / "x").write_text("a file")
    (m.path / "d").mkdir()
    (m.path / "d" / "old.txt").write_text("old")
    vaultfs("branch", store_path, "side")
    (m.path / "d" / "main-only.txt").write_text("added on main")
    m.stop()
    side = make_mount(branch="side")
    (side.path / "x").unlink()
    (side.path / "x").mkdir()
    (side.path / "x" / "y").write_text("now a folder")
    shutil.rmtree(side.path / "d")
    (side.path / "d").write_text("d became a file")
    side.stop()
    r = vaultfs("merge", store_path, "side", "main", check=False)  # d: a folder main uses
    assert r.returncode == 2 and "merge stopped, nothing changed: d is a folder" in r.stderr
    m = make_mount()
    assert (m.path / "x").read_text() == "a file"  # nothing applied
    (m.path / "d" / "main-only.txt").unlink()
    m.stop()
    vaultfs("merge", store_path, "side", "main")
    m = make_mount()
    assert (m.path / "x" / "y").read_text() == "now a folder"
    assert (m.path / "d").read_text() == "d became a file"
