"""Ingest benchmark: `cp` a set of RAW-sized files into vaultfs vs into a plain folder.

    python tools/bench/ingest.py [--total 2G] [--workdir /var/tmp/vaultfs-bench] [--no-peers]

Phases (the page cache is dropped before each):
  native  cp FILES native/ ; sync                      (the reference: ratio 1.00)
  vaultfs fresh store, mount, cp FILES mnt/ ; vaultfs umount   (umount waits for every commit)
  borg    borg create (zstd,3, no encryption) ; sync   (if borg is installed)
  restic  restic backup (repo v2, auto compression) ; sync     (if restic is installed)
Prints MB/s and the ratio to native, stored/logical bytes, and the daemon's peak RSS (VmHWM).
The store and the native copy stay in WORKDIR for read.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import _common as C


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--no-peers", action="store_true", help="skip borg and restic")
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    files = C.file_set(work, C.parse_size(args.total))
    logical = sum(f.stat().st_size for f in files)
    print(f"ingest: {len(files)} files, {logical / C.MB:,.0f} MB, workdir {work} "
          f"({os.cpu_count()} cores)", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)

    run = C.ingest(work, files)
    t_native, t_vault, st = run.native_s, run.vault_s, run.status
    r_native, r_vault = C.rate(logical, t_native), C.rate(logical, t_vault)
    rss, peak = run.rss, run.rss.peak

    C.rate_rows("native cp + sync", r_native, t_native, "vaultfs cp + umount", r_vault, t_vault)
    C.row("  of which cp", f"{run.cp_s:8.1f} s", f"umount {run.umount_s:.1f} s")
    C.row("vaultfs stored/logical bytes", f"{st['stored_bytes'] / st['logical_bytes']:8.3f}",
          f"logical {st['logical_bytes'] / C.MB:,.0f} MB, stored {st['stored_bytes'] / C.MB:,.0f} MB,"
          f" data.mdb {st['store_file_bytes'] / C.MB:,.0f} MB")
    C.row("vaultfs daemon peak RSS (VmHWM)", f"{peak / 2**20:8.0f} MiB",
          f"{run.rss_before_umount / 2**20:.0f} MiB before umount   (goal < 300 MiB)")
    C.row("vaultfs daemon CPU time", f"{rss.cpu_used:8.1f} s",
          f"{rss.cpu_used / t_vault:.2f} cores busy on average (of {os.cpu_count()})")
    C.row("  sampled max RssAnon / RssFile", f"{rss.anon / 2**20:8.0f} MiB",
          f"{rss.file / 2**20:.0f} MiB (file: the mmapped LMDB pages)")

    # -- peers ------------------------------------------------------------------------------
    if not args.no_peers:
        for name, fn in (("borg", C.borg), ("restic", C.restic)):
            if shutil.which(name) is None:
                C.row(f"{name}", "unavailable", f"({name} not installed: apt-get install "
                      f"{'borgbackup' if name == 'borg' else name})")
                continue
            try:
                secs, stored = fn(work, files)
            except subprocess.CalledProcessError as e:
                C.row(f"{name}", "failed", f"({e})")
                continue
            r = C.rate(logical, secs)
            C.row(f"{name} backup + sync", f"{r:8.1f} MB/s",
                  f"{secs:6.1f} s   {r / r_native:.2f} of native rate")
            C.row(f"{name} stored/logical bytes", f"{stored / logical:8.3f}",
                  f"repository {stored / C.MB:,.0f} MB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
