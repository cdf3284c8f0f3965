"""Sync between two real vaults: stores on disk, filled and read back through real mounts, the
`vaultfs sync` command, and `vaultfs serve` in a second process over TCP on loopback."""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import CORPUS, assert_clean, needs_fuse, new_test_store, tree_of, vaultfs
from netproxy import Proxy
from vaultfs.store import Store, StoreError
from vaultfs.sync import delta, engine, peers, remote, wire
from vaultfs.sync.endpoint import Endpoint

pytestmark = needs_fuse


@pytest.fixture
def peer_path(tmp_path):
    path = new_test_store(tmp_path / "studio")
    yield path
    assert_clean(path)


def _shoot(root, n: int = 3, size: int = 1_500_000) -> None:
    """A day's folder of RAW-sized files with sidecars, a symlink, an xattr tag and corpus
    images."""
    day = root / "day1"
    day.mkdir()
    for i in range(n):
        (day / f"DSC_{i:04d}.NEF").write_bytes(os.urandom(size))
        (day / f"DSC_{i:04d}.xmp").write_text(f"<x:xmpmeta rating='{i % 6}'/>")
    os.setxattr(day / "DSC_0000.NEF", "user.vaultfs.tier", b"select")
    os.symlink("day1/DSC_0000.NEF", root / "best")
    (root / "empty").mkdir()
    for rel in ("jpeg/medium/mongolels.jpg", "raw/GOPR0024.GPR"):
        shutil.copy2(CORPUS / rel, day)


def _burst(folder, rng: random.Random, frames: int = 4, size: int = 4_000_000) -> bytes:
    """Frames of one scene that differ where the subject moved (64 KiB of new bytes each, at a
    random place); returns the scene."""
    scene = rng.randbytes(size)
    folder.mkdir()
    for i in range(frames):
        frame = bytearray(scene)
        at = rng.randrange(len(scene) - 65_536)
        frame[at:at + 65_536] = rng.randbytes(65_536)
        (folder / f"DSC_{i:04d}.NEF").write_bytes(frame)
    return scene


def _pushed_over_a_link(store, url: str) -> dict:
    """What `vaultfs sync --push` sent over a link of 50 MB/s (on a faster one chunks go as
    stored, not as differences: docs/sync-protocol.md §7)."""
    r = vaultfs("sync", store, url, "--push", "--bwlimit", "50m", "--json")
    return json.loads(r.stdout)["sent"]["push"]


def _trees_equal(a, b) -> None:
    ta, tb = tree_of(a), tree_of(b)
    assert ta.keys() == tb.keys(), (ta.keys() ^ tb.keys())
    for k in ta:
        assert ta[k] == tb[k], k


def test_sync_to_an_empty_vault_copies_the_tree_bit_exact(make_mount, store_path, peer_path):
    field = make_mount()
    _shoot(field.path)
    field.stop()
    r = vaultfs("sync", store_path, peer_path, "--json")
    report = json.loads(r.stdout)
    assert report["sent"]["push"]["files"] >= 8 and report["sent"]["pull"]["files"] == 0
    assert report["conflicts"] == []
    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    field.stop(), studio.stop()
    # Nothing changed: a second sync plans nothing and sends nothing.
    again = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    assert again["plan"] == {"push": [], "pull": []}
    assert again["sent"]["push"]["chunks"] == 0


def test_changes_on_both_sides_meet_and_a_conflict_keeps_both(make_mount, store_path,
                                                               peer_path):
    field = make_mount()
    _shoot(field.path)
    field.stop()
    vaultfs("sync", store_path, peer_path)
    field, studio = make_mount(), make_mount(store=peer_path)
    f, s = field.path / "day1", studio.path / "day1"
    (f / "DSC_0001.xmp").write_text("<x:xmpmeta rating='5'/>")   # only the field
    (s / "DSC_0002.xmp").write_text("<x:xmpmeta label='red'/>")  # only the studio
    (f / "DSC_0000.xmp").write_text("field's edit")               # both: a conflict
    time.sleep(0.01)
    (s / "DSC_0000.xmp").write_text("studio's later edit")
    (f / "DSC_0001.NEF").unlink()                                  # deleted in the field
    (s / "new-in-studio").mkdir()
    (s / "new-in-studio" / "note.txt").write_text("hello")
    (f / "DSC_0002.NEF").unlink()                                  # deleted here, changed there
    with open(s / "DSC_0002.NEF", "r+b") as out:
        out.write(b"retouched")
    field.stop(), studio.stop()

    report = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    assert [c["path"] for c in report["conflicts"]] == ["day1/DSC_0000.xmp"]
    kept_as = report["conflicts"][0]["kept_as"]
    assert kept_as.startswith("day1/DSC_0000.conflict-store-") and kept_as.endswith(".xmp")

    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    for side in (field.path, studio.path):
        d = side / "day1"
        assert (d / "DSC_0001.xmp").read_text() == "<x:xmpmeta rating='5'/>"
        assert (d / "DSC_0002.xmp").read_text() == "<x:xmpmeta label='red'/>"
        assert (d / "DSC_0000.xmp").read_text() == "studio's later edit"  # the newer one
        assert (side / kept_as).read_text() == "field's edit"
        assert not (d / "DSC_0001.NEF").exists()
        assert (d / "DSC_0002.NEF").read_bytes()[:9] == b"retouched"  # the change stays
        assert (d / "new-in-studio" / "note.txt").read_text() == "hello"
    # The deletion reached the studio as a change, not a loss: the studio's tree before the
    # sync is a snapshot that still has the file.
    snap = report["snapshots"]["studio"]
    assert (studio.path / ".vault" / "snapshots" / snap / "day1" / "DSC_0001.NEF").stat().st_size
    # The studio's timeline of the edited sidecar has both versions.
    assert len(json.loads(vaultfs("log", peer_path, "day1/DSC_0001.xmp", "--json").stdout)) == 2
    field.stop(), studio.stop()
    status = json.loads(vaultfs("status", peer_path, "--json").stdout)
    assert [c["kept_as"] for c in status["conflicts"]] == [kept_as]
    # Agreed now: nothing more to do either way.
    again = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    assert again["plan"] == {"push": [], "pull": []}


def test_push_only_and_only_tier_send_the_keepers_first(make_mount, store_path, peer_path):
    field = make_mount()
    _shoot(field.path, n=4)
    field.stop()
    report = json.loads(vaultfs("sync", store_path, peer_path, "--push", "--only-tier", "select",
                                "--json").stdout)
    files = [op["path"] for op in report["plan"]["push"] if "tier" in op]
    assert files == ["day1/DSC_0000.NEF", "day1/DSC_0000.xmp"]  # the select and its sidecar
    studio = make_mount(store=peer_path)
    assert sorted(p.name for p in (studio.path / "day1").iterdir()) == \
        ["DSC_0000.NEF", "DSC_0000.xmp"]
    studio.stop()
    # The rest, in order: selects' priority first, then newest first within a tier.
    report = json.loads(vaultfs("sync", store_path, peer_path, "--push", "--json").stdout)
    sent = [op for op in report["plan"]["push"] if "tier" in op]
    assert sent and all(op["tier"] != "select" for op in sent)
    assert report["plan"]["pull"] == []


def _serve(store, tmp_path, name):
    """`vaultfs serve` in its own process on a free loopback port."""
    log = open(tmp_path / f"{name}.serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "serve", str(store), "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving"), line
    return proc, f"tcp://127.0.0.1:{line.rsplit(':', 1)[1].strip()}"


def _pair(a, b):
    """`vaultfs pair` on both sides, as two people would: one shows the code, one types it."""
    shown = subprocess.Popen([sys.executable, "-m", "vaultfs", "pair", str(b), "--listen",
                              "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    code = shown.stdout.readline().split(":", 1)[1].strip()
    port = shown.stdout.readline().split(" on ", 1)[1].split(" ")[0].rsplit(":", 1)[1]
    vaultfs("pair", a, f"tcp://127.0.0.1:{port}", code)
    assert "paired with" in shown.stdout.read()
    assert shown.wait(10) == 0


def test_tcp_sync_needs_pairing_and_refuses_bad_messages(make_mount, store_path, peer_path,
                                                         tmp_path):
    field = make_mount()
    _shoot(field.path)
    field.stop()
    server, url = _serve(peer_path, tmp_path, "studio")
    try:
        # Not paired: refused, with a message that says what to do.
        r = vaultfs("sync", store_path, url, check=False)
        assert r.returncode == 2 and "not paired" in r.stderr and "vaultfs pair" in r.stderr
        # A wrong code pairs nothing.
        shown = subprocess.Popen([sys.executable, "-m", "vaultfs", "pair", str(peer_path),
                                  "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        shown.stdout.readline()
        port = shown.stdout.readline().split(" on ", 1)[1].split(" ")[0].rsplit(":", 1)[1]
        r = vaultfs("pair", store_path, f"tcp://127.0.0.1:{port}", "0000-0000-0000",
                    check=False)
        assert r.returncode == 2 and "differ" in r.stderr
        shown.wait(10)
        assert peers.load(store_path) == {} and peers.load(peer_path) == {}

        _pair(store_path, peer_path)
        vaultfs("sync", store_path, url)
        field, studio = make_mount(), make_mount(store=peer_path)
        _trees_equal(field.path, studio.path)
        field.stop(), studio.stop()

        # Garbage on the wire, and a paired client that sends a path out of the tree: refused,
        # and the server goes on serving.
        host, port = url[6:].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as junk:
            junk.sendall(b"\xff\xff\xff\xffnot a vault")
        with Store.open(store_path) as store:
            peer = remote.connect(url, store)
        with peer:
            assert peer.hello()["name"] == "studio"
            for path in (b"../escape", b"/etc/passwd", b"a/../../b", b"a\0b", b".vault/x"):
                with pytest.raises(StoreError, match="refused path"):
                    peer.apply([["delete", path, None, b"", None]])
            with pytest.raises(StoreError, match="damaged"):
                peer.put_chunks([[bytes(32), 5, b"\0hello"]])
            # A difference from chunks the server lacks is not stored, and said so; one naming
            # them wrongly is refused.
            h = bytes(range(32))
            assert peer.put_chunks([[h, 5, b"xx", [bytes(32)], 0]]) == [2, [h]]
            assert peer.missing([h]) == [h]
            for ref in ([[], 0], [[b"short"], 0], [[bytes(32)], -1], "x"):
                with pytest.raises(StoreError, match="malformed|refused"):
                    peer.put_chunks([[bytes(32), 5, b"xx", *ref] if isinstance(ref, list)
                                     else [bytes(32), 5, b"xx", ref, 0]])
        # A stranger with a made-up id and no secret gets nothing.
        with socket.create_connection((host, int(port))) as s:
            ch = wire.Channel.over(s)
            with pytest.raises(wire.ProtocolError, match="not paired"):
                ch.handshake(uuid.uuid4().bytes, True, lambda pid: bytes(32))
        # One that claims a paired vault's id but lacks its secret gets nothing either.
        with Store.open(store_path) as store:
            field_id = uuid.UUID(store.id).bytes
        with socket.create_connection((host, int(port))) as s:
            ch = wire.Channel.over(s)
            with pytest.raises((wire.ProtocolError, ConnectionError)):
                ch.handshake(field_id, True, lambda pid: bytes(32))
        assert server.poll() is None
        # A client that trickles half a hello and holds on keeps nobody else out.
        with socket.create_connection((host, int(port))) as holder:
            holder.sendall(b"\0\0")
            vaultfs("sync", store_path, url, timeout=60)  # still serving
    finally:
        server.terminate()
        server.wait(10)


def test_a_chunk_is_placed_in_its_near_copy_past_an_insertion_before_it():
    """The pure part of differences: where a changed chunk's bytes are looked for in the near
    copy, when bytes were inserted before it (its place moves with the last chunk both hold),
    and the difference rebuilt from a base that the near copy ends within."""
    h = lambda c: bytes([c]) * 32  # noqa: E731
    near = [[0, 100, h(1)], [100, 200, h(2)], [300, 50, h(3)], [350, 100, h(7)]]
    # Chunk 1 grew by 40 bytes (an insertion), chunk 2 is the same, chunk 3 changed.
    file = [[0, 140, h(8)], [140, 200, h(2)], [340, 50, h(9)], [390, 100, h(7)]]
    refs = delta.references([(b"a", file)], {h(8), h(9)}, {b"a": near})
    # Before any chunk both hold: at the same offset. After chunk 2 (ending at 340 here, at 300
    # there): 40 bytes earlier.
    assert refs == {h(8): [[h(1), h(2)], 0], h(9): [[h(3)], 0]}
    # A file that shares under a quarter of its bytes with any other gets none.
    assert delta.references([(b"a", file[:2] + [[340, 500, h(10)]])], {h(8), h(10)},
                            {b"a": near}) == {}
    raw = os.urandom(1000)
    for base in (raw[:600], raw[:-1] + b"x", raw + b"more"):
        assert delta.patch(delta.diff(raw, base), base, len(raw)) == raw
    assert len(delta.diff(raw, raw[:990])) < 100
    # A difference that says it holds more than the chunk is refused unopened (a bomb).
    with pytest.raises(ValueError):
        delta.patch(delta.diff(bytes(200_000_000), b""), b"", 1000)


def test_near_duplicates_and_an_edit_in_place_travel_as_their_differences(
        make_mount, store_path, peer_path, tmp_path):
    """A burst whose frames differ where the subject moved, and a file edited in one place:
    their changed chunks cross as their differences from the chunks the studio holds, or gets
    first (docs/sync-protocol.md §7), not whole; what arrives is bit-exact and verifies."""
    rng = random.Random(8)
    field = make_mount()
    scene = _burst(field.path / "burst", rng)
    project = rng.randbytes(6_000_000)
    (field.path / "project.psd").write_bytes(project)
    field.stop()
    _pair(store_path, peer_path)
    server, url = _serve(peer_path, tmp_path, "studio")
    try:
        first = _pushed_over_a_link(store_path, url)
        # One frame and the project whole (random bytes: stored raw), then about 2 x 64 KiB
        # (its own change and the first frame's) for each other frame; whole chunks of about
        # 1 MiB each without differences.
        assert first["files"] == 5 and first["differences"] >= 3
        assert first["wire_bytes"] - len(scene) - len(project) < 3 * 200_000, first
        field = make_mount()
        with open(field.path / "project.psd", "r+b") as f:  # an edit in place
            f.seek(2_500_000)
            f.write(rng.randbytes(20_000))
        field.stop()
        second = _pushed_over_a_link(store_path, url)
        assert second["files"] == 1 and second["differences"] >= 1
        assert 20_000 <= second["wire_bytes"] < 100_000, second
    finally:
        server.terminate()
        server.wait(10)
    assert_clean(store_path)
    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    field.stop(), studio.stop()


def test_a_difference_the_studio_cannot_rebuild_is_sent_again_whole(make_mount, store_path,
                                                                       tmp_path):
    """A chunk the studio holds damaged (bit rot) is no near copy: the difference from it is
    not stored, the chunk goes again whole, and the sync finishes."""
    studio = new_test_store(tmp_path / "damaged-studio")
    rng = random.Random(9)
    data = bytearray(rng.randbytes(8_000_000))
    field = make_mount()
    (field.path / "edit.psd").write_bytes(data)
    field.stop()
    _pair(store_path, studio)
    server, url = _serve(studio, tmp_path, "studio")
    try:
        _pushed_over_a_link(store_path, url)
        with open(studio / "lmdb" / "data.mdb", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            at = mm.find(data[4_000_000:4_000_064])  # (stored raw: random bytes)
            assert at > 0
            mm[at + 10] ^= 0xFF
        field = make_mount()
        with open(field.path / "edit.psd", "r+b") as f:  # an edit in place, there
            data[4_000_000:4_010_000] = rng.randbytes(10_000)
            f.seek(4_000_000)
            f.write(data[4_000_000:4_010_000])
        field.stop()
        second = _pushed_over_a_link(store_path, url)
    finally:
        server.terminate()
        server.wait(10)
    # The chunks of the edit went as differences first (about 10 KB: the new bytes), then whole.
    with Store.open(store_path) as store, store.reader() as tx:
        edited = sum(n for off, _, n in tx.extents(tx.inode(tx.resolve("edit.psd")).content)
                     if off < 4_010_000 and 4_000_000 < off + n)
    assert second["files"] == 1 and second["differences"] == 0, second
    assert edited + 5_000 < second["wire_bytes"] < edited + 100_000, (edited, second)
    m = make_mount(store=studio)
    assert (m.path / "edit.psd").read_bytes() == data
    m.stop()


@pytest.mark.parametrize("over", ["path", "tcp"])
def test_a_sync_killed_at_random_moments_resumes_and_converges(make_mount, store_path,
                                                               peer_path, tmp_path, over):
    field = make_mount()
    _shoot(field.path, n=12, size=3_000_000)
    _burst(field.path / "burst", random.Random(7))  # (over TCP: differences cut mid-way too)
    card = sum(p.stat().st_size for p in field.path.rglob("*") if p.is_file())
    field.stop()
    studio = make_mount(store=peer_path)
    (studio.path / "studio-only").write_bytes(os.urandom(2_000_000))
    studio.stop()
    server = None
    if over == "tcp":
        _pair(store_path, peer_path)
        server, url = _serve(peer_path, tmp_path, "studio")
    peer = url if over == "tcp" else str(peer_path)
    rng = random.Random(6)
    kills = 0
    try:
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "sync", str(store_path),
                                     peer, "--bwlimit", "4m"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.4, 2.0))
            if proc.poll() is None:
                kills += 1
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if server is not None and rng.random() < 0.5:  # the studio's side dies too
                server.send_signal(signal.SIGKILL)
                server.wait()
                server, url = _serve(peer_path, tmp_path, "studio")
                peer = url
        assert kills >= 2
        report = json.loads(vaultfs("sync", store_path, peer, "--json").stdout)
        again = json.loads(vaultfs("sync", store_path, peer, "--json").stdout)
        assert again["plan"] == {"push": [], "pull": []}
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    # What was sent before a kill is not sent again: at most what was in flight.
    assert report["sent"]["push"]["raw_bytes"] < card
    assert_clean(store_path), assert_clean(peer_path)
    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    assert (field.path / "studio-only").stat().st_size == 2_000_000
    field.stop(), studio.stop()


def test_a_link_that_drops_and_stalls_is_resumed_by_the_same_command(make_mount, store_path,
                                                                     peer_path, tmp_path):
    field = make_mount()
    _shoot(field.path, n=8, size=2_000_000)
    card = sum(p.stat().st_size for p in field.path.rglob("*") if p.is_file())
    field.stop()
    _pair(store_path, peer_path)
    server, url = _serve(peer_path, tmp_path, "studio")
    # The first connection is cut, the second stalls without a reset (the studio's session
    # is left waiting on it), the third is slow but holds. (The first batches are 4 MiB.)
    proxy = Proxy(("127.0.0.1", int(url.rsplit(":", 1)[1])),
                  [{"cut_after": 9_000_000}, {"stall_after": 9_000_000}, {"rate": 8_000_000}])
    try:
        r = vaultfs("sync", store_path, proxy.url, "--timeout", "3", "--json", timeout=300)
    finally:
        proxy.close()
        server.terminate()
        server.wait(10)
    assert r.stderr.count("connection lost") == 2 and proxy.connections == 3
    report = json.loads(r.stdout)
    # The last run sent only what had not arrived: less than the whole card.
    assert 0 < report["sent"]["push"]["raw_bytes"] < card
    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    field.stop(), studio.stop()


def test_long_names_hard_links_and_tags_on_both_sides(make_mount, store_path, peer_path):
    field = make_mount()
    deep = Path("d" * 200) / ("e" * 200) / ("f" * 200)  # a path of over 600 bytes
    (field.path / deep).mkdir(parents=True)
    (field.path / deep / "log.csv").write_text("t,v\n")
    long_name = "L" * 240 + ".xmp"
    (field.path / long_name).write_text("first")
    (field.path / "a.txt").write_text("shared")
    os.link(field.path / "a.txt", field.path / "b.txt")
    (field.path / "t.NEF").write_bytes(b"raw")
    field.stop()
    vaultfs("sync", store_path, peer_path)

    field, studio = make_mount(), make_mount(store=peer_path)
    (field.path / long_name).write_text("field's")
    time.sleep(0.01)
    (studio.path / long_name).write_text("studio's")
    (studio.path / "a.txt").write_text("edited in the studio")
    os.setxattr(field.path / "t.NEF", "user.vaultfs.tier", b"select")
    os.setxattr(studio.path / "t.NEF", "user.label", b"red")
    field.stop(), studio.stop()
    report = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    kept_as = report["conflicts"][0]["kept_as"]
    assert len(kept_as.encode()) <= 255 and kept_as.endswith(".xmp")

    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    for side in (field.path, studio.path):
        assert (side / long_name).read_text() == "studio's"
        assert (side / kept_as).read_text() == "field's"
        assert (side / "a.txt").read_text() == "edited in the studio"
        assert (side / "b.txt").read_text() == "shared"  # the other name of a link kept its own
        assert os.getxattr(side / "t.NEF", "user.vaultfs.tier") == b"select"  # both tags
        assert os.getxattr(side / "t.NEF", "user.label") == b"red"
        assert (side / deep / "log.csv").read_text() == "t,v\n"
    field.stop(), studio.stop()
    again = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    assert again["plan"] == {"push": [], "pull": []}


def test_only_tier_leaves_a_conflict_for_the_whole_sync(make_mount, store_path, peer_path):
    field = make_mount()
    (field.path / "x.NEF").write_bytes(b"v1")
    field.stop()
    vaultfs("sync", store_path, peer_path)
    field, studio = make_mount(), make_mount(store=peer_path)
    (field.path / "x.NEF").write_bytes(b"field")
    os.setxattr(field.path / "x.NEF", "user.vaultfs.tier", b"select")
    time.sleep(0.01)
    (studio.path / "x.NEF").write_bytes(b"studio, later")
    field.stop(), studio.stop()
    report = json.loads(vaultfs("sync", store_path, peer_path, "--only-tier", "select",
                                "--json").stdout)
    assert report["plan"] == {"push": [], "pull": []}  # nothing half done
    report = json.loads(vaultfs("sync", store_path, peer_path, "--json").stdout)
    kept_as = report["conflicts"][0]["kept_as"]
    studio = make_mount(store=peer_path)
    assert (studio.path / "x.NEF").read_bytes() == b"studio, later"
    assert (studio.path / kept_as).read_bytes() == b"field"
    studio.stop()


def test_serve_stdio_answers_a_sync_over_pipes(make_mount, store_path, peer_path):
    """What `ssh host vaultfs serve --stdio STORE` runs on the other machine, over pipes."""
    field = make_mount()
    _shoot(field.path)
    field.stop()
    with subprocess.Popen([sys.executable, "-m", "vaultfs", "serve", "--stdio", str(peer_path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        with Store.open(store_path, writable=True) as store:
            local = Endpoint(store)
            studio = remote.Remote(wire.Channel(proc.stdout, proc.stdin, trusted=True), b"")
            report = engine.sync(local, studio)
            local.close()
        proc.stdin.close()
        assert proc.wait(30) == 0
    assert report.sent["push"]["files"] >= 8
    field, studio = make_mount(), make_mount(store=peer_path)
    _trees_equal(field.path, studio.path)
    field.stop(), studio.stop()


def _multicast() -> bool:
    """Whether this machine has a network interface that is up and does multicast (mDNS)."""
    for flags in Path("/sys/class/net").glob("*/flags"):
        value = int(flags.read_text(), 16)
        if value & 0x1 and value & 0x1000:  # IFF_UP, IFF_MULTICAST
            return True
    return False


@pytest.mark.skipif(not _multicast(), reason="no network interface here does multicast")
def test_peers_lists_a_served_vault_announced_on_the_network(peer_path, tmp_path):
    server, url = _serve(peer_path, tmp_path, "studio")
    try:
        found = json.loads(vaultfs("peers", "--wait", "3", "--json").stdout)
    finally:
        server.terminate()
        server.wait(10)
    with Store.open(peer_path) as store:
        studio_id = uuid.UUID(store.id).hex
    mine = [p for p in found if p["id"] == studio_id]
    assert mine and mine[0]["name"] == "studio" and url in mine[0]["urls"]


def test_a_studio_disk_that_fills_mid_sync_loses_nothing_and_a_rerun_finishes(
        make_mount, store_path, tmp_path):
    """The peer's disk (a 24 MB tmpfs) fills while 40 MB of incompressible files arrive: the
    sync fails saying why, neither vault loses or half-shows a file, and once there is room
    the same command finishes the job."""
    files = {f"DSC_{i:04d}.NEF": os.urandom(8_000_000) for i in range(5)}
    m = make_mount()
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    m.stop()
    disk = tmp_path / "studio-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        peer = new_test_store(disk / "studio")
        full = vaultfs("sync", store_path, peer, "--push", check=False)
        assert full.returncode != 0
        assert f"the disk of the store {peer} is full" in full.stderr, full.stderr
        assert "resuming" not in full.stderr  # a full disk is not a lost link: no retries
        assert_clean(peer)
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        shown = make_mount(store=peer)  # (a mount writes its log in the store)
        arrived = {p.name: p.read_bytes() for p in shown.path.iterdir()}
        shown.stop()
        assert len(arrived) < len(files)
        assert all(files[name] == data for name, data in arrived.items())  # each one whole
        vaultfs("sync", store_path, peer, "--push")
        studio, field = make_mount(store=peer), make_mount()
        _trees_equal(studio.path, field.path)
        studio.stop(), field.stop()
        assert_clean(peer)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
