"""Cold-read benchmark: `cat` the RAW file set back from vaultfs vs from a plain folder.

    python tools/bench/read.py [--total 2G] [--workdir /var/tmp/vaultfs-bench]

Reuses the store and the native copy that ingest.py leaves in WORKDIR (fills them, untimed,
if they are missing or hold another set). Then, with the page cache dropped before each:
  native  cat native/* > /dev/null
  vaultfs remount, cat mnt/* > /dev/null   (the daemon starts with an empty chunk cache)
Prints MB/s and the ratio to native, and the daemon's peak RSS while reading.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _common as C


def main() -> int:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    C.need_root()
    work = Path(args.workdir)
    files = C.file_set(work, C.parse_size(args.total))
    names = [f.name for f in files]
    logical = sum(f.stat().st_size for f in files)
    store, mnt, native = work / "store", work / "mnt", work / "native"
    print(f"read: {len(files)} files, {logical / C.MB:,.0f} MB, workdir {work}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)

    if os.path.ismount(mnt):
        C.unmount(mnt)
    if not all((native / n).exists() for n in names):
        print("  (copying the set into the native folder first, untimed)", flush=True)
        C.fresh_dir(native)
        C.run(C.cp_cmd(files, native))
    mnt.mkdir(parents=True, exist_ok=True)
    if not (store / "vault.toml").exists():
        C.init_store(store)
    C.mount(store, mnt)
    if not all((mnt / n).exists() for n in names):
        print("  (copying the set into a fresh store first, untimed)", flush=True)
        C.unmount(mnt)
        C.init_store(store)
        C.mount(store, mnt)
        C.run(C.cp_cmd(files, mnt))
    C.unmount(mnt)

    # -- native -----------------------------------------------------------------------------
    C.drop_caches()
    t_native = C.timed_cat([native / n for n in names])
    r_native = C.rate(logical, t_native)

    # -- vaultfs ----------------------------------------------------------------------------
    pid = C.mount(store, mnt)
    C.drop_caches()
    rss = C.PeakRSS(pid)
    t_vault = C.timed_cat([mnt / n for n in names])
    peak = rss.stop()
    C.unmount(mnt)
    r_vault = C.rate(logical, t_vault)

    C.rate_rows("native cold cat", r_native, t_native, "vaultfs cold cat", r_vault, t_vault)
    C.row("vaultfs daemon peak RSS (VmHWM)", f"{peak / 2**20:8.0f} MiB", "(mount + read)")
    C.row("vaultfs daemon CPU time", f"{rss.cpu_used:8.1f} s",
          f"{rss.cpu_used / t_vault:.2f} cores busy on average (of {os.cpu_count()})")
    C.row("  sampled max RssAnon / RssFile", f"{rss.anon / 2**20:8.0f} MiB",
          f"{rss.file / 2**20:.0f} MiB (file: the mmapped LMDB pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
