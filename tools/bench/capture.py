"""Tethered capture: how long from a file's close to "safe" (committed, read back, verified,
and with --mirror, on the mirror too).

    python tools/bench/capture.py [--fps 2,4,8] [--seconds 10] [--mirror] [--frames dng|raw]
                                  [--workdir DIR]

For each rate, a writer thread writes frames into a select folder (tagged with the xattr
user.vaultfs.tier) of a fresh mount at that many frames per second, each as tethering software
does (write, close): real DNGs of 24 MB (a burst of 12 Mpx frames by tools/bench/_dng.py,
16-bit samples and a 1600-pixel JPEG preview, made once into WORKDIR/compression-cache), or
with `--frames raw` the ingest benchmark's RAW-like files of 25 MB (sensor noise without TIFF
structure: the analyser reads them whole). Every frame is new to the vault, as a camera's are:
the generated set is written in turn, each time with one bit of its sensor data changed in every
64 KiB at a place of its own, so that no chunk is a duplicate of an earlier frame's, while
`vaultfs.client.Vault.events()` listens. Printed per rate: the achieved rate, and the latency
from each close() returning to its `committed`, `verified` and `fingerprinted` events (median,
95th percentile, max; fingerprints may queue behind the commits). The same frames written at
the same rate to a plain folder on the same disk, with an fsync each (what "safe" costs
natively), give the reference latency. With --mirror, the same
run again with a mirror store on the same disk (selects ask for two copies): the latency to
`mirrored`, and its ratio to the latency to `verified` of the run without a mirror.
Issue 7 asks for under 5 s at 10 frames per second, and aims for under 1 s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import _common as C
import compression

from vaultfs.chunking import formats
from vaultfs.client import Vault

DNG_FRAMES = 20
STAMP_STEP = 64 * 1024  # a bit of every this many bytes of sensor data differs between frames


Frame = tuple[bytes, int, int]  # a file's bytes, and where its sensor data starts and ends


def frame_set(work: Path, kind: str) -> list[Frame]:
    """The frames written in turn."""
    if kind == "dng":
        paths = compression.file_set("burst16", work, DNG_FRAMES, 4000, 3000, preview=1600)
    else:
        paths = C.file_set(work, 10 * C.FILE_BYTES)
    out = []
    for path in paths:
        data = path.read_bytes()
        images = formats.structure(lambda off, n: data[off:off + n], len(data)).images
        start, end = (images[0].start, images[-1].end) if images else (len(data) // 8, len(data))
        out.append((data, start, end))
    return out


def stamped(frame: Frame, i: int) -> bytearray:
    """Frame `i`: one bit of its sensor data flipped in every STAMP_STEP bytes, at an offset
    of its own (i < STAMP_STEP / 2), so that its every chunk is new to the vault."""
    data, start, end = frame
    out = bytearray(data)
    for pos in range(start + 2 * i % STAMP_STEP, end, STAMP_STEP):
        out[pos] ^= 1
    return out


def write_at(root: Path, frames: list[Frame], fps: float, seconds: float, fsync: bool
             ) -> dict[str, float]:
    """Write the frames in turn at `fps` for `seconds`; name -> when its close returned."""
    closed: dict[str, float] = {}
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        due = start + i / fps
        if time.monotonic() < due:
            time.sleep(due - time.monotonic())
        data = stamped(frames[i % len(frames)], i)
        name = f"DSC_{i:05d}.{'DNG' if data.startswith(b'II*') else 'NEF'}"
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


def capture(work: Path, frames: list[Frame], fps: float, seconds: float, mirror: bool
            ) -> tuple[float, int, dict[str, list[float]]]:
    """One run into a fresh vault (with a fresh mirror beside it): the achieved rate, the
    files written, and per event the latencies from close()."""
    store, mnt, mirror_store = work / "cap-store", work / "cap-mnt", work / "cap-mirror"
    C.init_store(store)
    shutil.rmtree(mirror_store, ignore_errors=True)
    C.mount(store, mnt, *(["--mirror", str(mirror_store)] if mirror else []))
    shoot = mnt / "shoot"
    shoot.mkdir()
    os.setxattr(shoot, "user.vaultfs.tier", b"select")
    events: dict[tuple[str, str], float] = {}

    def listen() -> None:
        for e in Vault(mnt).events():
            events[(e["event"], e["path"].removeprefix("shoot/"))] = time.monotonic()

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(1.0)
    t0 = time.monotonic()
    closed = write_at(shoot, frames, fps, seconds, fsync=False)
    rate = len(closed) / (time.monotonic() - t0)
    kinds = ("committed", "verified", *(["mirrored"] if mirror else []), "fingerprinted")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all((k, n) in events for k in kinds[1:]
                                                  for n in closed):
        time.sleep(0.1)
    lat = {k: [events[(k, n)] - t for n, t in closed.items() if (k, n) in events]
           for k in kinds}
    C.unmount(mnt)
    return rate, len(closed), lat


def show(label: str, lat: dict[str, list[float]]) -> None:
    for k, v in lat.items():
        if v:
            goal = "(goal: safe < 5 s)" if k != "fingerprinted" else \
                "(queues when the machine does not keep up)"
            C.row(f"{label} {k}", f"{statistics.median(v):6.2f} s",
                  f"95%: {pct(v, 0.95):.2f} s   max: {max(v):.2f} s   {goal}")


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--fps", default="2,4,8", help="frame rates to try (default %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    p.add_argument("--frames", choices=("dng", "raw"), default="dng",
                   help="real DNG frames (default) or RAW-like files without TIFF structure")
    p.add_argument("--mirror", action="store_true",
                   help="also run with a mirror on the same disk (selects in two copies)")
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    frames = frame_set(work, args.frames)
    size = sum(len(f[0]) for f in frames) / len(frames) / C.MB
    print(f"capture: {args.frames} frames of {size:.0f} MB, each new to the vault, "
          f"{args.seconds:.0f} s per rate, workdir {work}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)
    print("\n  latency from close() to the event, seconds: median / 95% / max")
    for fps in (float(f) for f in args.fps.split(",")):
        native = C.fresh_dir(work / "cap-native")
        t0 = time.monotonic()
        closed = write_at(native, frames, fps, args.seconds, fsync=True)
        n_rate = len(closed) / (time.monotonic() - t0)
        rate, n, lat = capture(work, frames, fps, args.seconds, mirror=False)
        print(f"\n  {fps:g} fps asked: native {n_rate:.1f} fps (write+fsync), vaultfs {rate:.1f} "
              f"fps (write+close), {len(lat['verified'])}/{n} verified, "
              f"{len(lat['fingerprinted'])}/{n} fingerprinted")
        show("vaultfs", lat)
        if not args.mirror:
            continue
        m_rate, m_n, m_lat = capture(work, frames, fps, args.seconds, mirror=True)
        print(f"  with a mirror on the same disk: {m_rate:.1f} fps ({m_rate / rate:.2f} of the "
              f"rate without), {len(m_lat['mirrored'])}/{m_n} mirrored")
        show("mirror run:", m_lat)
        if m_lat["mirrored"] and lat["verified"]:
            C.row("mirrored / verified without mirror",
                  f"{statistics.median(m_lat['mirrored']) / statistics.median(lat['verified']):6.2f}x",
                  f"95%: {pct(m_lat['mirrored'], 0.95) / pct(lat['verified'], 0.95):.2f}x "
                  f"(medians, and 95th percentiles)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
