"""The store on its own (real LMDB on disk): dedup, collisions, reference counts, recovery,
and the command line's answers to bad input."""

from __future__ import annotations

import json
import mmap
import os
import random
import stat
import tempfile
import time

import pytest
import xxhash

from conftest import assert_clean, vaultfs
from vaultfs.fs.ingest import commit_spool
from vaultfs.store import Store, StoreError, codec
from vaultfs.store import format as F
from vaultfs.store.reader import ChunkCache, read_range


def _digest(path) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        return xxhash.xxh3_128_digest(mm)  # data.mdb is sparse: no read of the holes' zeros


def _new_file(store: Store) -> int:
    def make(tx):
        node = tx.new_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
        node.nlink = 1
        tx.put_inode(node)
        tx.add_entry(1, f"f{node.ino}".encode(), node.ino)
        return node.ino
    return store.write(make)


def _commit(store: Store, ino: int, data: bytes) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        commit_spool(store, ino, f.fileno(), len(data), time.time_ns(), time.time_ns())


def _read(store: Store, ino: int, size: int) -> bytes:
    with store.reader() as tx:
        return read_range(tx, ChunkCache(), tx.inode(ino), 0, size)


def _delete_file(store: Store, ino: int) -> None:
    def delete(tx):
        tx.remove_entry(1, f"f{ino}".encode())
        node = tx.inode(ino)
        node.nlink = 0
        tx.delete_inode(node)
    store.write(delete)


def test_identical_content_is_stored_once_and_freed_with_its_last_file(store_path):
    data = random.Random(0).randbytes(6_000_000)
    with Store.open(store_path, writable=True) as store:
        a, b = _new_file(store), _new_file(store)
        _commit(store, a, data)
        once = store.figures()
        _commit(store, b, data)
        twice = store.figures()
        assert twice["stored_bytes"] == once["stored_bytes"] > 0
        assert twice["logical_bytes"] == 2 * once["logical_bytes"]
        assert twice["dedup_ratio"] == 2.0
        assert _read(store, b, len(data)) == data
        _commit(store, a, b"")  # the old content stays, as the file's previous version
        assert store.figures()["stored_bytes"] == once["stored_bytes"]
        _delete_file(store, a)
        _delete_file(store, b)
        assert store.figures()["stored_bytes"] == 0
        assert store.figures()["chunks"] == 0


def test_forced_xxh3_collision_keeps_both_files_intact(tmp_path, monkeypatch):
    # Every chunk gets the same xxh3-128 digest: only the BLAKE3 confirmation tells them apart.
    # (A store of its own: its chunk ids are only valid while xxh3 is patched.)
    store_path = Store.init(tmp_path / "colliding")
    monkeypatch.setattr(codec, "xxh3", lambda data: b"\x42" * 16)
    rng = random.Random(5)
    one, two = rng.randbytes(200_000), rng.randbytes(200_000)  # one chunk each
    with Store.open(store_path, writable=True) as store:
        a, b = _new_file(store), _new_file(store)
        _commit(store, a, one)
        _commit(store, b, two)
        assert _read(store, a, len(one)) == one
        assert _read(store, b, len(two)) == two
        with store.reader() as tx:
            ids = sorted(c for c, _ in tx.chunks())
        assert ids == [b"\x42" * 16 + b"\x00", b"\x42" * 16 + b"\x01"]
        c = _new_file(store)
        _commit(store, c, two)  # a true duplicate still deduplicates
        assert store.figures()["chunks"] == 2
        assert _read(store, c, len(two)) == two
    assert_clean(store_path)


def test_a_crash_mid_commit_is_undone_at_the_next_open(store_path):
    data = random.Random(9).randbytes(3_000_000)
    with Store.open(store_path, writable=True) as store:
        ino = _new_file(store)
        _commit(store, ino, data)

        def half_commit(tx):  # what a crash between batches leaves: pending references
            d = codec.digests(b"new bytes")
            tx.add_pending(ino, tx.add_chunk(d, 9, codec.encode(b"new bytes")))
        store.write(half_commit)
        assert store.figures()["chunks"] > 0
    with Store.open(store_path, writable=True) as store:
        assert _read(store, ino, len(data)) == data
        with store.reader() as tx:
            assert all(rec.raw_len != 9 for _, rec in tx.chunks())
    assert_clean(store_path)


def test_one_writer_at_a_time(store_path):
    with Store.open(store_path, writable=True):
        with pytest.raises(StoreError, match="in use by another vaultfs process"):
            Store.open(store_path, writable=True)
        # Readers in other processes are welcome beside the writer.
        assert json.loads(vaultfs("status", store_path, "--json").stdout)["files"] == 0
        mp = store_path.parent / "mnt"
        mp.mkdir()
        for mode in ("--foreground", "--debug"):  # in the foreground, and as a daemon
            r = vaultfs("mount", mode, store_path, mp, check=False)
            assert r.returncode != 0 and "in use by another vaultfs process" in r.stderr
            assert not os.path.ismount(mp)


def test_cli_status_json(store_path):
    figures = json.loads(vaultfs("status", store_path, "--json").stdout)
    assert figures["logical_bytes"] == 0 and figures["stored_bytes"] == 0
    assert figures["free_bytes"] > 0
    human = vaultfs("status", store_path).stdout
    assert "dedup ratio" in human and "free on disk" in human


@pytest.mark.parametrize("command", [["status"], ["verify"], ["mount", "MNT"]])
def test_cli_refuses_a_missing_store_in_one_sentence(tmp_path, command):
    (tmp_path / "MNT").mkdir()
    args = [a.replace("MNT", str(tmp_path / "MNT")) for a in command]
    r = vaultfs(args[0], tmp_path / "nowhere", *args[1:], check=False)
    assert r.returncode != 0
    assert r.stderr.startswith("vaultfs: error:") and "is not a vaultfs store" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


def test_cli_refuses_a_newer_store_format_and_leaves_it_alone(store_path, tmp_path):
    toml = store_path / "vault.toml"
    current = f"format_version = {F.FORMAT_VERSION}"
    toml.write_text(toml.read_text().replace(current, "format_version = 99"))
    before = _digest(store_path / "lmdb" / "data.mdb")
    (tmp_path / "mnt").mkdir()
    for args in (["status", store_path], ["mount", store_path, tmp_path / "mnt"]):
        r = vaultfs(*args, check=False)
        assert r.returncode != 0
        assert "newer than this vaultfs understands" in r.stderr
    assert _digest(store_path / "lmdb" / "data.mdb") == before
    toml.write_text(toml.read_text().replace("format_version = 99", current))


def test_a_format_2_store_is_upgraded_by_a_writable_open(tmp_path):
    path = tmp_path / "old"
    Store.init(path)
    # What format 2 wrote: the version 2 in both places, and no `held` database.
    with Store.open(path, writable=True) as store:
        def downgrade(tx):
            tx.put_meta(b"format_version", (2).to_bytes(8, "big"))
            tx.txn.drop(store.dbs[b"held"], delete=True)
        store.write(downgrade)
    toml = path / "vault.toml"
    toml.write_text(toml.read_text().replace("format_version = 3", "format_version = 2"))
    with Store.open(path) as store:  # a reader leaves it as it is
        assert store.figures()["files"] == 0
    assert "format_version = 2" in toml.read_text()
    with Store.open(path, writable=True):
        pass
    assert "format_version = 3" in toml.read_text()
    assert_clean(path)


def test_cli_refuses_a_mount_point_that_is_not_empty(store_path, tmp_path):
    mp = tmp_path / "busy"
    mp.mkdir()
    (mp / "photo.jpg").write_bytes(b"unprotected")
    r = vaultfs("mount", store_path, mp, check=False)
    assert r.returncode != 0 and "is not empty" in r.stderr
    assert (mp / "photo.jpg").read_bytes() == b"unprotected"


def test_cli_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    r = vaultfs("init", tmp_path / "photos", check=False)
    assert r.returncode != 0 and "not an empty directory" in r.stderr
    assert os.listdir(tmp_path / "photos") == ["a.jpg"]


def test_verify_finds_a_directory_entry_out_of_step(store_path):
    with Store.open(store_path, writable=True) as store:
        ino = _new_file(store)

        def break_listing(tx):  # a name whose listing entry and link count went astray
            node = tx.inode(ino)
            node.nlink = 3
            tx.put_inode(node)
            with tx.txn.cursor(db=tx.dbs[F.DB_DIRLIST]) as c:
                c.last()
                c.delete()
        store.write(break_listing)
    r = vaultfs("verify", store_path, "--json", check=False)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert any("missing from its listing" in p for p in problems)
    assert any(f"inode {ino}: nlink 3, its names count 1" in p for p in problems)
    with Store.open(store_path, writable=True) as store:  # mend it for the fixture's check
        def mend(tx):
            node = tx.inode(ino)
            node.nlink = 1
            tx.put_inode(node)
            name = f"f{ino}".encode()
            tx.remove_entry(1, name)
            tx.add_entry(1, name, ino)
        store.write(mend)


def test_an_interrupted_compaction_is_undone_by_the_next_mount(store_path):
    with Store.open(store_path, writable=True) as store:
        ino = _new_file(store)
        _commit(store, ino, b"kept through it all")
    # A crash between the two renames of the swap: only lmdb.old/ holds the database.
    os.rename(store_path / "lmdb", store_path / "lmdb.old")
    r = vaultfs("status", store_path, check=False)  # a reader meanwhile changes nothing
    assert r.returncode == 2 and not (store_path / "lmdb").exists()
    with Store.open(store_path, writable=True) as store:
        assert _read(store, ino, 19) == b"kept through it all"
    assert sorted(p.name for p in store_path.iterdir() if p.name.startswith("lmdb")) == ["lmdb"]
