"""Tethered capture: how long from a file's close to "safe" (committed, read back, verified).

    python tools/bench/capture.py [--fps 2,4,8] [--seconds 10] [--workdir DIR]

For each rate, a writer thread writes RAW-like files of 25 MB (the ingest benchmark's set) into
a fresh mount at that many frames per second, each as tethering software does (write, close),
while `vaultfs.client.Vault.events()` listens. Printed per rate: the achieved rate, and the
latency from each close() returning to its `committed` and `verified` events (median, 95th
percentile, max). The same files written at the same rate to a plain folder on the same disk,
with an fsync each (what "safe" costs natively), give the reference latency.
Issue 7 asks for under 5 s at 10 frames per second, and aims for under 1 s.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import _common as C

from vaultfs.client import Vault


def write_at(root: Path, files: list[Path], fps: float, seconds: float, fsync: bool
             ) -> dict[str, float]:
    """Write the files in turn at `fps` for `seconds`; name -> when its close returned."""
    closed: dict[str, float] = {}
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        due = start + i / fps
        if time.monotonic() < due:
            time.sleep(due - time.monotonic())
        name = f"DSC_{i:05d}.NEF"
        data = files[i % len(files)].read_bytes()
        with open(root / name, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        closed[name] = time.monotonic()
        i += 1
    return closed


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--fps", default="2,4,8", help="frame rates to try (default %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = C.file_set(work, 10 * C.FILE_BYTES)
    print(f"capture: 25 MB files, {args.seconds:.0f} s per rate, workdir {work}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)
    print("\n  latency from close() to the event, seconds: median / 95% / max")
    for fps in (float(f) for f in args.fps.split(",")):
        native = C.fresh_dir(work / "cap-native")
        t0 = time.monotonic()
        closed = write_at(native, files, fps, args.seconds, fsync=True)
        n_rate = len(closed) / (time.monotonic() - t0)
        store, mnt = work / "cap-store", work / "cap-mnt"
        C.init_store(store)
        C.mount(store, mnt)
        events: dict[tuple[str, str], float] = {}

        def listen() -> None:
            for e in Vault(mnt).events():
                events[(e["event"], e["path"])] = time.monotonic()

        threading.Thread(target=listen, daemon=True).start()
        time.sleep(1.0)
        t0 = time.monotonic()
        closed = write_at(mnt, files, fps, args.seconds, fsync=False)
        rate = len(closed) / (time.monotonic() - t0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(("verified", n) in events for n in closed):
            time.sleep(0.1)
        lat = {k: [events[(k, n)] - t for n, t in closed.items() if (k, n) in events]
               for k in ("committed", "verified")}
        C.unmount(mnt)
        print(f"\n  {fps:g} fps asked: native {n_rate:.1f} fps (write+fsync), vaultfs {rate:.1f} "
              f"fps (write+close), {len(lat['verified'])}/{len(closed)} verified")
        for k, v in lat.items():
            if v:
                C.row(f"vaultfs {k}", f"{statistics.median(v):6.2f} s",
                      f"95%: {pct(v, 0.95):.2f} s   max: {max(v):.2f} s   (goal: verified < 5 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
