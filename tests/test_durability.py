"""Crashes lose nothing committed: kill -9 of the daemon while real programs write, damaged
chunks fail closed, a full disk gives ENOSPC and keeps what was committed."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest

from conftest import Mount, assert_clean, needs_fuse, vaultfs
from vaultfs.store import Store
from vaultfs.store import format as F

pytestmark = needs_fuse

# A writer like tethering software: each file written, fsynced or closed, then its name and
# digest appended to a journal *outside* the mount once the call has returned.
WRITER = textwrap.dedent("""
    import hashlib, os, random, sys
    root, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    with open(journal, "a") as log:
        for i in range(100000):
            name = f"{root}/r{seed}-{i:05d}.cr2"
            data = rng.randbytes(rng.choice([1, 5000, 300000, 2500000]))
            try:
                if i % 3 == 0:      # write to a temp name, fsync, rename into place
                    with open(name + ".tmp", "wb") as f:
                        f.write(data); f.flush(); os.fsync(f.fileno())
                    os.rename(name + ".tmp", name)
                elif i % 3 == 1:    # write then fsync
                    with open(name, "wb") as f:
                        f.write(data); f.flush(); os.fsync(f.fileno())
                else:               # write then close
                    with open(name, "wb") as f:
                        f.write(data)
            except OSError:
                sys.exit(0)  # the daemon is gone: ENOTCONN
            log.write(f"{os.path.basename(name)} {hashlib.sha256(data).hexdigest()}\\n")
            log.flush(); os.fsync(log.fileno())
""")


def test_kill9_while_writing_loses_nothing_committed(make_mount, store_path, tmp_path):
    journal = tmp_path / "journal"
    rng = random.Random(7)
    m = make_mount()
    for round_no in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path), str(journal),
                                   str(round_no)])
        time.sleep(rng.uniform(0.3, 1.5))
        m.kill()
        writer.wait(timeout=60)
        # A dead daemon never exposes the bare folder underneath.
        with pytest.raises(OSError) as e:
            os.listdir(m.path)
        assert e.value.errno == errno.ENOTCONN
        # The CLI recovers the stale mount point and mounts again.
        vaultfs("mount", store_path, m.path)
        m.proc = None
        committed = dict(line.split() for line in journal.read_text().splitlines())
        for name, digest in committed.items():
            assert hashlib.sha256((m.path / name).read_bytes()).hexdigest() == digest, name
        vaultfs("umount", m.path)
        assert_clean(store_path)
        m = make_mount()
    assert len(committed) > 20, "the writer should have committed files before the kills"


def test_damaged_chunk_reads_eio_and_verify_names_the_file(make_mount, store_path):
    m = make_mount()
    rng = random.Random(1)
    good, bad = rng.randbytes(3_000_000), rng.randbytes(3_000_000)  # random: stored raw
    (m.path / "good.nef").write_bytes(good)
    (m.path / "bad.nef").write_bytes(bad)
    m.stop()

    # Flip one byte of bad.nef's data inside the LMDB file itself.
    data_mdb = store_path / "lmdb" / "data.mdb"
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:  # a sparse file
        at = mm.find(bad[2_000_000:2_000_064])
        assert at > 0
        mm[at + 10] ^= 0xFF

    m = make_mount()
    assert (m.path / "good.nef").read_bytes() == good
    with pytest.raises(OSError) as e:
        (m.path / "bad.nef").read_bytes()
    assert e.value.errno == errno.EIO
    m.stop(expect_errors=True)
    log = (store_path / "vaultfs.log").read_text()
    assert "damaged data in /bad.nef" in log

    r = vaultfs("verify", store_path, "--json", check=False)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert not report["ok"]
    [(path, ranges)] = report["damaged_files"].items()
    assert path == "bad.nef"
    assert any(rg["offset"] <= 2_000_010 < rg["offset"] + rg["length"] for rg in ranges)
    r = vaultfs("verify", store_path, check=False)
    assert "damaged file bad.nef: bytes" in r.stdout
    # Undo the damage so that the fixture's final verification passes.
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[at + 10] ^= 0xFF


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_gives_enospc_and_keeps_committed_files(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    try:
        store = disk / "store"
        vaultfs("init", store)
        mp = tmp_path / "mnt"
        mp.mkdir()
        m = Mount(store, mp).start()
        try:
            rng = random.Random(3)
            kept = {}
            with pytest.raises(OSError) as e:
                for i in range(100):
                    data = rng.randbytes(4_000_000)
                    with open(mp / f"f{i}", "wb") as f:
                        f.write(data)
                    kept[f"f{i}"] = data
            assert e.value.errno == errno.ENOSPC
            assert len(kept) >= 3
            for name, data in kept.items():
                assert (mp / name).read_bytes() == data
        finally:
            m.stop()
        m = Mount(store, mp).start()
        for name, data in kept.items():
            assert (mp / name).read_bytes() == data
        # The command line answers in one sentence on the full disk, harming nothing.
        with pytest.raises(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(bytes(1 << 20))
        r = vaultfs("init", disk / "another", check=False)
        assert r.returncode != 0 and r.stderr.startswith("vaultfs: error: cannot create")
        assert len(r.stderr.strip().splitlines()) == 1 and not (disk / "another").exists()
        (disk / "filler").unlink()
        r = vaultfs("mount", store, mp, check=False)
        assert r.returncode != 0 and "already a mount point" in r.stderr
        m.stop()
        assert_clean(store)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_lmdb_corruption_of_a_record_is_reported_not_hidden(store_path):
    """verify compares reference counts with the references that exist."""

    with Store.open(store_path, writable=True) as store:
        def add(tx):
            from vaultfs.store.codec import digests, encode
            data = b"x" * 1000
            return tx.add_chunk(digests(data), len(data), encode(data))
        chunk_id = store.write(add)  # a reference that no file holds
    r = vaultfs("verify", store_path, check=False)
    assert r.returncode == 1 and "reference count 1, referenced 0" in r.stdout
    env = lmdb.open(str(store_path / "lmdb"), max_dbs=16)
    with env.begin(write=True) as t:
        db_c, db_d = env.open_db(F.DB_CHUNKS, txn=t), env.open_db(F.DB_CHUNKDATA, txn=t)
        rec = F.ChunkRecord.unpack(t.get(chunk_id, db=db_c))
        t.delete(chunk_id, db=db_c)
        t.delete(chunk_id, db=db_d)
        meta = env.open_db(F.DB_META, txn=t)
        for key, delta in ((F.STAT_CHUNKS, 1), (F.STAT_UNIQUE, rec.raw_len),
                           (F.STAT_STORED, rec.stored_len)):
            t.put(key, F.u64(F.from_u64(t.get(key, db=meta)) - delta), db=meta)
    env.close()


def test_sigterm_commits_open_files_and_unmounts(make_mount, store_path):
    m = make_mount()
    data = random.Random(4).randbytes(20 * 1024 * 1024)
    # O_DIRECT: the bytes reach the daemon now, not when the kernel's cache writes them back.
    fd = os.open(m.path / "open.dng", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    buf = mmap.mmap(-1, 10 * 1024 * 1024)
    buf.write(data[:len(buf)])
    assert os.write(fd, buf) == len(buf)
    (m.path / "closed.dng").write_bytes(data)
    gone = os.open(m.path / "gone.dng", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(gone, data)
    os.unlink(m.path / "gone.dng")  # unlinked while open: freed at shutdown
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=60) == 0
    m.proc = None
    for f in (fd, gone):
        with pytest.raises(OSError):
            os.close(f)  # the daemon has gone from under the open file
    assert not os.path.ismount(m.path)
    # Before any recovery: the unlinked file is gone from the store, its space too.
    figures = json.loads(vaultfs("status", store_path, "--json").stdout)
    assert figures["files"] == 2
    assert figures["logical_bytes"] == len(data) + len(buf)
    with Store.open(store_path) as store, store.reader() as tx:
        with tx.txn.cursor(db=tx.dbs[F.DB_PENDING]) as pending:
            assert not list(pending), "an unlinked file's background ingest left references"
    assert_clean(store_path)
    m2 = make_mount()
    assert (m2.path / "closed.dng").read_bytes() == data
    # What the open file had sent to the daemon was committed at shutdown.
    assert (m2.path / "open.dng").read_bytes() == data[:len(buf)]
