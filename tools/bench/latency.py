"""Metadata latency: create, stat and unlink of many small files, vaultfs vs a plain folder.

    python tools/bench/latency.py [--files 10000] [--workdir /var/tmp/vaultfs-bench]

In one directory of a fresh store's mount, and in a plain folder on the same disk, times
each call from Python (os.open/os.stat/...; the loop's own cost, about 1 µs, is in both):
  create          open(O_CREAT|O_EXCL|O_WRONLY) + close of an empty file
  create+write    the same with one 4 KiB write before close (a small capture file)
  stat (warm)     stat right after the creates (kernel's attribute cache as it is)
  stat (cold)     stat after drop_caches (each one a lookup by the filesystem)
  unlink          unlink of every file
Prints mean and median µs per call and the ratio of the means to native.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import _common as C

PAYLOAD = os.urandom(4096)


def measure(root: Path, n: int) -> dict[str, list[int]]:
    d = root / "many"
    d.mkdir()
    names = [str(d / f"IMG_{i:05d}.JPG") for i in range(n)]
    names2 = [str(d / f"IMG_{i:05d}.XMP") for i in range(n)]
    out: dict[str, list[int]] = {k: [] for k in
                                 ("create", "create+write", "stat (warm)", "stat (cold)", "unlink")}
    ns = time.perf_counter_ns
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    for name in names:
        t = ns()
        os.close(os.open(name, flags, 0o644))
        out["create"].append(ns() - t)
    for name in names2:
        t = ns()
        fd = os.open(name, flags, 0o644)
        os.write(fd, PAYLOAD)
        os.close(fd)
        out["create+write"].append(ns() - t)
    for name in names:
        t = ns()
        os.stat(name)
        out["stat (warm)"].append(ns() - t)
    C.drop_caches()
    for name in names:
        t = ns()
        os.stat(name)
        out["stat (cold)"].append(ns() - t)
    for name in names + names2:
        t = ns()
        os.unlink(name)
        out["unlink"].append(ns() - t)
    os.rmdir(d)
    return out


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000, help="files per phase (default 10000)")
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store, mnt, native = work / "lat-store", work / "lat-mnt", work / "lat-native"
    print(f"latency: {args.files:,} files per phase, workdir {work}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)

    C.fresh_dir(native)
    C.drop_caches()
    nat = measure(native, args.files)

    C.init_store(store)
    C.fresh_dir(mnt)
    pid = C.mount(store, mnt)
    C.drop_caches()
    rss = C.PeakRSS(pid)
    vfs = measure(mnt, args.files)
    peak = rss.stop()
    C.unmount(mnt)

    print()
    print(f"  {'per call':<16} {'native mean':>12} {'median':>8} {'vaultfs mean':>13} "
          f"{'median':>8}   {'vaultfs/native (mean)':>21}")
    for op in nat:
        nm, vm = statistics.fmean(nat[op]) / 1e3, statistics.fmean(vfs[op]) / 1e3
        nmed, vmed = statistics.median(nat[op]) / 1e3, statistics.median(vfs[op]) / 1e3
        print(f"  {op:<16} {nm:9.1f} µs {nmed:8.1f} {vm:10.1f} µs {vmed:8.1f}   "
              f"{vm / nm:18.1f}x", flush=True)
    print(f"  vaultfs daemon peak RSS (VmHWM) {peak / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
