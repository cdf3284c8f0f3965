"""Snapshots and timelines: what they cost as the tree and the history grow.

    python tools/bench/history.py [--files 100000] [--versions 500] [--workdir DIR]

1. Trees of 1,000 and of --files small files (100 folders, 4 KiB each) are written into a
   fresh store through the store's own API (the same LMDB records a mount writes; through a
   mount it would take minutes), and beside it into a plain folder. Then, timed:
     vaultfs snapshot          the command, as a user runs it (includes Python's start-up),
                               on the unmounted store (it opens it: a recovery scan of the
                               inodes) and on the mounted one (it asks the mount)
     the transaction alone     create_snapshot() in this process, the store already open
     cp -al                    a hard-link copy of the plain folder (what rsnapshot does)
     borg create (unchanged)   a second borg backup of the unchanged folder (its "snapshot")
   The goal (issue 5): a snapshot of 100,000 files well under a second, and no slower for
   100,000 files than for 1,000.
2. vaultfs snapshots (with the bytes only each snapshot holds), and deleting a snapshot after
   a tenth of the files changed, on the large tree.
3. A file committed --versions times (one version each); timed: `vaultfs log`, and listing
   its timeline through a mount (`ls -l .vault/versions/FILE/`). Goal: under a second.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import _common as C

from vaultfs.fs.ingest import commit_spool
from vaultfs.store import ROOT_INO, Store
from vaultfs.store.codec import digests, encode
from vaultfs.store.history import create_snapshot

PAYLOAD = os.urandom(4096)
FOLDERS = 100


def build_tree(store_path: Path, native: Path, n: int, seed_bytes: bytes) -> None:
    """n files of 4 KiB in FOLDERS folders, in the store and in a plain folder."""
    C.fresh_dir(native)
    per = -(-n // FOLDERS)
    with Store.open(store_path, writable=True) as store:
        def folders(tx):
            now = time.time_ns()
            out = []
            for d in range(FOLDERS):
                node = tx.new_inode(stat.S_IFDIR | 0o755, 0, 0, now)
                node.nlink = 2
                tx.put_inode(node)
                tx.add_entry(ROOT_INO, b"day%03d" % d, node.ino)
                out.append(node.ino)
            root = tx.inode(ROOT_INO)
            root.nlink += FOLDERS
            tx.put_inode(root)
            return out
        dirs = store.write(folders)
        for d, dino in enumerate(dirs):
            (native / f"day{d:03d}").mkdir()
            bodies = []
            for i in range(min(per, n - d * per)):
                name = f"IMG_{i:05d}.JPG"
                body = seed_bytes + PAYLOAD[len(seed_bytes):] + i.to_bytes(4, "little")
                (native / f"day{d:03d}" / name).write_bytes(body)
                bodies.append((name.encode(), body))

            def fill(tx, dino=dino, bodies=bodies):  # one folder per transaction
                now = time.time_ns()
                for name, body in bodies:
                    node = tx.new_inode(stat.S_IFREG | 0o644, 0, 0, now)
                    node.nlink = 1
                    chunk = tx.add_chunk(digests(body), len(body), encode(body))
                    tx.new_version(node, [(0, chunk, len(body))], len(body), now, now)
                    tx.put_inode(node)
                    tx.add_entry(dino, name, node.ino)
            store.write(fill)


def timed_cli(*args: str) -> float:
    t0 = time.perf_counter()
    C.run([C.VAULTFS, *args], stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--versions", type=int, default=500)
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"history: trees of 1,000 and {args.files:,} files, {args.versions} versions, "
          f"workdir {work}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)
    have_borg = shutil.which("borg") is not None
    env = dict(os.environ, BORG_PASSPHRASE="", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    print("\n  1. a snapshot, by tree size (seconds; ratio: vaultfs / the other)")
    results = {}
    for n in (1_000, args.files):
        store, native = work / f"hist-store-{n}", work / f"hist-native-{n}"
        C.init_store(store)
        t0 = time.perf_counter()
        build_tree(store, native, n, b"seed")
        built = time.perf_counter() - t0
        snap = timed_cli("snapshot", str(store), "first")  # opens the store: recovery scan
        mnt = work / "hist-mnt"
        C.mount(store, mnt)
        try:
            mounted = timed_cli("snapshot", str(store), "mounted")  # via the control socket
        finally:
            C.unmount(mnt)
        with Store.open(store, writable=True) as s:
            t0 = time.perf_counter()
            create_snapshot(s, "in-process")
            txn = time.perf_counter() - t0
        C.run(["sync"])
        shutil.rmtree(work / "hist-cpal", ignore_errors=True)
        t0 = time.perf_counter()
        C.run(["cp", "-al", str(native), str(work / "hist-cpal")])
        C.run(["sync"])
        cpal = time.perf_counter() - t0
        shutil.rmtree(work / "hist-cpal")
        borg = None
        if have_borg:
            repo = work / "hist-borg"
            shutil.rmtree(repo, ignore_errors=True)
            C.run(["borg", "init", "-e", "none", str(repo)], env=env)
            C.run(["borg", "create", f"{repo}::one", "."], cwd=native, env=env)
            t0 = time.perf_counter()
            C.run(["borg", "create", f"{repo}::two", "."], cwd=native, env=env)
            borg = time.perf_counter() - t0
            shutil.rmtree(repo)
        results[n] = txn
        C.row(f"{n:,} files: tree built in", f"{built:8.1f} s")
        C.row("vaultfs snapshot (unmounted store)", f"{snap:8.3f} s")
        C.row("vaultfs snapshot (mounted store)", f"{mounted:8.3f} s")
        C.row("the snapshot's transaction alone", f"{txn * 1000:8.2f} ms")
        C.row("cp -al + sync", f"{cpal:8.3f} s", f"vaultfs {snap / cpal:.2f}x")
        if borg is not None:
            C.row("borg create (unchanged tree)", f"{borg:8.3f} s", f"vaultfs {snap / borg:.2f}x")
    big = args.files
    C.row(f"transaction, {big:,} vs 1,000 files", f"{results[big] / results[1_000]:8.2f}x",
          "(1.00: independent of the tree's size)")

    print(f"\n  2. listing and deleting snapshots of {big:,} files")
    store = work / f"hist-store-{big}"
    with Store.open(store, writable=True) as s:  # a tenth of the files change
        with tempfile.TemporaryFile() as spool:
            spool.write(os.urandom(4096))
            spool.flush()
            with s.reader() as tx:
                files = [(path, node.ino) for path, node in tx.walk()
                         if stat.S_ISREG(node.mode)][::10]
            for _, ino in files:
                commit_spool(s, ino, spool.fileno(), 4096, time.time_ns(), time.time_ns())
    C.run([C.VAULTFS, "snapshot", str(store), "second"], stdout=subprocess.DEVNULL)
    for name in ("mounted", "in-process"):
        C.run([C.VAULTFS, "snapshot", str(store), name, "--delete"], stdout=subprocess.DEVNULL)
    C.row("vaultfs snapshots (with sizes)", f"{timed_cli('snapshots', str(store)):8.3f} s")
    C.row("vaultfs snapshot --delete first",
          f"{timed_cli('snapshot', str(store), 'first', '--delete'):8.3f} s")

    print(f"\n  3. a file with {args.versions} versions")
    store = work / "hist-store-versions"
    C.init_store(store)
    with Store.open(store, writable=True) as s, tempfile.TemporaryFile() as spool:
        def make(tx):
            node = tx.new_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
            node.nlink = 1
            tx.put_inode(node)
            tx.add_entry(ROOT_INO, b"painting.kra", node.ino)
            return node.ino
        ino = s.write(make)
        for i in range(args.versions):
            spool.seek(0)
            spool.write(os.urandom(64 * 1024))
            spool.flush()
            commit_spool(s, ino, spool.fileno(), 64 * 1024, time.time_ns(), time.time_ns())
    C.row("vaultfs log", f"{timed_cli('log', str(store), 'painting.kra'):8.3f} s",
          "(goal < 1 s)")
    mnt = work / "hist-mnt"
    C.mount(store, mnt)
    try:
        t0 = time.perf_counter()
        listed = C.run(["ls", "-l", str(mnt / ".vault" / "versions" / "painting.kra")],
                       capture_output=True, text=True).stdout.count("\n") - 1
        C.row(f"ls -l of the timeline ({listed} entries)",
              f"{time.perf_counter() - t0:8.3f} s", "(goal < 1 s)")
    finally:
        C.unmount(mnt)
    for n in (1_000, args.files):
        shutil.rmtree(work / f"hist-native-{n}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
