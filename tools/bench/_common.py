"""Shared pieces of the vaultfs benchmarks: the RAW-like file set, mounts, cache drops, timing.

Nothing here asserts a timing: the benchmarks print figures (as ratios to native ext4) for a
person to read. Everything runs as root (drop_caches, mounts) on the disk holding --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
VAULTFS = str(VENV_BIN / "vaultfs") if (VENV_BIN / "vaultfs").exists() else "vaultfs"

FILE_BYTES = 25_000_000          # a RAW-sized file
DEFAULT_TOTAL = 2_000_000_000    # 2 GB in all: 80 files
GEN_VERSION = 1                  # bump when the generator changes: the cache is rebuilt

# A 14-bit Bayer sensor in 16-bit little-endian containers, about 12 Mpx.
WIDTH = 4096
HEADER_BYTES = 64 * 1024         # TIFF-like header, maker notes: compresses well
PREVIEW_BYTES = 512 * 1024       # embedded JPEG preview: incompressible
MB = 1e6


# ---- arguments -----------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default="/var/tmp/vaultfs-bench",
                   help="where the file cache, the native copy, the store and the mount point "
                        "live (one disk; default %(default)s)")
    p.add_argument("--total", default="2G",
                   help="bytes of RAW files in the set, e.g. 2G, 500M (default %(default)s)")
    return p


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root (drop_caches, mounts)")


# ---- the file set --------------------------------------------------------------------------
def _noise_table(sigma: float) -> bytes:
    """Maps a uniform byte to a clipped Gaussian around 128 (sensor read + shot noise)."""
    nd = statistics.NormalDist(128, sigma)
    return bytes(min(255, max(0, round(nd.inv_cdf((i + 0.5) / 256)))) for i in range(256))


def _smooth(rng: random.Random, n: int, lo: float, hi: float, waves: int = 4) -> list[int]:
    """A smooth curve of n values in [lo, hi]: a few random low-frequency sine waves."""
    import math

    parts = [(rng.uniform(0.3, 1.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3))
             for _ in range(waves)]
    total = sum(a for a, _, _ in parts)
    out = []
    for i in range(n):
        t = i / n
        v = sum(a * math.sin(2 * math.pi * f * t + ph) for a, f, ph in parts) / total
        out.append(int(lo + (hi - lo) * (v + 1) / 2))
    return out


def raw_file(seed: int, size: int = FILE_BYTES) -> bytes:
    """One camera-RAW-like file: a small header, an incompressible preview, then 14-bit Bayer
    samples in 16-bit words: a smooth scene (separable: column profile per colour channel
    plus a row profile) with Gaussian noise of ~16 LSB on top. zstd gains a little (the high
    byte is predictable, the low byte nearly is not), as on real uncompressed RAWs."""
    rng = random.Random(seed)
    header = bytearray(b"II*\x00\x08\x00\x00\x00")
    meta = (f"Make=BenchCam\0Model=BC-{seed % 7}\0Serial={rng.getrandbits(32):08x}\0"
            f"ISO={rng.choice((100, 200, 400, 800))}\0Exposure=1/{rng.choice((60, 125, 250))}\0"
            ).encode()
    while len(header) < HEADER_BYTES:
        header += meta + bytes(rng.randrange(16) for _ in range(48))
    header = bytes(header[:HEADER_BYTES])
    preview = rng.randbytes(PREVIEW_BYTES)

    pix_bytes = size - HEADER_BYTES - PREVIEW_BYTES
    n = pix_bytes // 2
    rows = -(-n // WIDTH)
    # Column profiles for the two Bayer row kinds (R G R G..., G B G B...): channel gains differ.
    cols = []
    for _ in range(2):
        a = _smooth(rng, WIDTH, 600, 9000)
        b = _smooth(rng, WIDTH, 600, 9000)
        cols.append(b"".join(v.to_bytes(2, "little") for pair in zip(a[0::2], b[0::2])
                             for v in pair))
    row_level = _smooth(rng, rows, 0, 6000)
    base = bytearray()
    for y in range(rows):
        base += cols[y & 1]
    offsets = b"".join(row_level[y].to_bytes(2, "little") * WIDTH for y in range(rows))
    noise = rng.randbytes(rows * WIDTH).translate(_NOISE)
    spread = bytearray(2 * rows * WIDTH)
    spread[0::2] = noise
    # Lane-wise 16-bit addition via big integers: every lane stays below 2**16, so no carry
    # crosses a lane (600 + 9000 + 6000 + 255 < 16384).
    total = (int.from_bytes(base, "little") + int.from_bytes(offsets, "little")
             + int.from_bytes(spread, "little"))
    pixels = total.to_bytes(2 * rows * WIDTH, "little")[:pix_bytes]
    out = header + preview + pixels
    assert len(out) == size
    return out


_NOISE = _noise_table(16.0)


def file_set(workdir: Path, total: int) -> list[Path]:
    """The cached RAW file set (generated once; reused while its parameters match)."""
    cache = workdir / "cache"
    count = max(1, total // FILE_BYTES)
    manifest = cache / "manifest.json"
    want = {"version": GEN_VERSION, "file_bytes": FILE_BYTES}
    have = {}
    if manifest.exists():
        have = json.loads(manifest.read_text())
    if {k: have.get(k) for k in want} != want:
        shutil.rmtree(cache, ignore_errors=True)
        have = dict(want, files=0)
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"DSC_{i:04d}.NEF" for i in range(count)]
    missing = [p for p in paths if not (p.exists() and p.stat().st_size == FILE_BYTES)]
    if missing:
        print(f"generating {len(missing)} RAW-like files of {FILE_BYTES / MB:.0f} MB "
              f"in {cache} (once)", flush=True)
        t0 = time.monotonic()
        for p in missing:
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(raw_file(int(p.stem.split("_")[1])))
            tmp.rename(p)
        os.sync()
        print(f"  generated in {time.monotonic() - t0:.0f} s", flush=True)
    manifest.write_text(json.dumps(dict(want, files=max(count, have.get("files", 0)))))
    return paths


# ---- system --------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def timed(cmds: list[list[str]], **kw) -> float:
    """Seconds taken by the commands, run one after the other."""
    t0 = time.perf_counter()
    for c in cmds:
        run(c, **kw)
    return time.perf_counter() - t0


def cp_cmd(files: list[Path], dest: Path) -> list[str]:
    return ["cp", *map(str, files), str(dest)]


def cat_cmd(files: list[Path]) -> list[str]:
    # cat writes to /dev/null, opened by the shell-less redirection below
    return ["cat", *map(str, files)]


def timed_cat(files: list[Path]) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        run(cat_cmd(files), stdout=null)
    return time.perf_counter() - t0


def du_bytes(path: Path) -> int:
    """Bytes allocated on disk under path (what the data really takes)."""
    out = run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0])


def fresh_dir(path: Path) -> Path:
    if path.is_mount():
        unmount(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- peers --------------------------------------------------------------------------------
def borg(work: Path, files: list[Path]) -> tuple[float, int]:
    """Seconds of `borg create --compression zstd,3` (+ sync) of the files into a fresh
    unencrypted repository, and the repository's bytes on disk."""
    repo = work / "peer-borg"
    shutil.rmtree(repo, ignore_errors=True)
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(work / "peer-borg-home"))
    shutil.rmtree(work / "peer-borg-home", ignore_errors=True)
    run(["borg", "init", "--encryption=none", str(repo)], env=env)
    drop_caches()
    secs = timed([["borg", "create", "--compression", "zstd,3", f"{repo}::bench",
                   *map(str, files)], ["sync"]], env=env)
    return secs, du_bytes(repo)


def restic(work: Path, files: list[Path]) -> tuple[float, int]:
    """Seconds of `restic backup` (+ sync) of the files into a fresh repository (format 2,
    default auto compression), and the repository's bytes on disk."""
    repo = work / "peer-restic"
    shutil.rmtree(repo, ignore_errors=True)
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "peer-restic-cache"))
    shutil.rmtree(work / "peer-restic-cache", ignore_errors=True)
    run(["restic", "init", "--repo", str(repo)], env=env, stdout=subprocess.DEVNULL)
    drop_caches()
    secs = timed([["restic", "--repo", str(repo), "backup", "--quiet", *map(str, files)],
                  ["sync"]], env=env)
    return secs, du_bytes(repo)


# ---- vaultfs -------------------------------------------------------------------------------
def init_store(store: Path) -> None:
    """A fresh store that never evicts: the benchmarks' disk is shared and may be under the
    default free-space floor, where a sync would make the files it sent offline (issue 6's
    field eviction) and the next case find them so."""
    shutil.rmtree(store, ignore_errors=True)
    run([VAULTFS, "init", str(store)], stdout=subprocess.DEVNULL)
    toml = store / "vault.toml"
    text = toml.read_text()
    if "keep_free_percent = 20\n" not in text:
        raise SystemExit(f"{toml}: no keep_free_percent = 20 to set to 0")
    toml.write_text(text.replace("keep_free_percent = 20\n", "keep_free_percent = 0\n"))


def mount(store: Path, mnt: Path, *options: str) -> int:
    """Mount in the background (with `vaultfs mount` options); returns the daemon's pid."""
    if os.path.ismount(mnt):
        unmount(mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    run([VAULTFS, "mount", str(store), str(mnt), *options], stdout=subprocess.DEVNULL)
    return daemon_pid(store)


def unmount(mnt: Path) -> None:
    run([VAULTFS, "umount", str(mnt)], stdout=subprocess.DEVNULL)


def daemon_pid(store: Path) -> int:
    return int((store / "mount.lock").read_text().strip())


def status(store: Path) -> dict:
    out = run([VAULTFS, "status", "--json", str(store)], capture_output=True, text=True).stdout
    return json.loads(out)


def _cpu_ticks(pid: int) -> int:
    """Clock ticks used by a process, its ended children (as the kernel counts them once it
    has waited for them) and its live children."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                ticks += _cpu_ticks(int(child))
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile: counted in cutime at the next sample
    return ticks


class PeakRSS:
    """Follows VmHWM (peak resident set) of a process until it exits or stop() is called;
    `peak` is the last value read, i.e. the peak up to just before the process ended."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak = pid, interval, 0
        self.anon = self.file = 0  # highest RssAnon / RssFile seen by sampling
        # user+system CPU seconds of the process and of its children, live or ended (the
        # mount's decoder worker)
        self.cpu0 = self.cpu = self._cpu_seconds()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def read(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmHWM":
                    self.peak = max(self.peak, int(value.split()[0]) * 1024)
                elif key == "RssAnon":
                    self.anon = max(self.anon, int(value.split()[0]) * 1024)
                elif key == "RssFile":  # pages of the mmapped LMDB file count here
                    self.file = max(self.file, int(value.split()[0]) * 1024)
        except OSError:
            pass
        self.cpu = self._cpu_seconds()
        return self.peak

    def _cpu_seconds(self) -> float:
        try:
            return _cpu_ticks(self.pid) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return getattr(self, "cpu", 0.0)

    @property
    def cpu_used(self) -> float:
        """CPU seconds the process used since this object was made (to its last sample)."""
        return self.cpu - self.cpu0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.read()

    def stop(self) -> int:
        self.read()
        self._stop.set()
        self._t.join()
        return self.peak


@dataclass
class Ingest:
    """One native copy and one vaultfs ingest of the same files (ingest())."""
    native_s: float           # cp + sync into WORKDIR/native
    cp_s: float               # cp into the mount
    umount_s: float           # vaultfs umount: waits until the daemon committed everything
    rss: "PeakRSS"            # of the daemon, followed until it exited
    rss_before_umount: int
    status: dict              # vaultfs status --json of the store afterwards

    @property
    def vault_s(self) -> float:
        return self.cp_s + self.umount_s


def ingest(work: Path, files: list[Path]) -> Ingest:
    """`cp FILES WORKDIR/native/` + `sync`, then a fresh store mounted on WORKDIR/mnt, `cp FILES`
    into it and `vaultfs umount`; the page cache is dropped before each. The store and the
    native copy stay in WORKDIR."""
    native, store, mnt = work / "native", work / "store", work / "mnt"
    fresh_dir(native)
    drop_caches()
    native_s = timed([cp_cmd(files, native), ["sync"]])
    if os.path.ismount(mnt):
        unmount(mnt)
    init_store(store)
    fresh_dir(mnt)
    pid = mount(store, mnt)
    drop_caches()
    rss = PeakRSS(pid)
    cp_s = timed([cp_cmd(files, mnt)])
    before = rss.read()
    umount_s = timed([[VAULTFS, "umount", str(mnt)]], stdout=subprocess.DEVNULL)
    rss.stop()
    return Ingest(native_s, cp_s, umount_s, rss, before, status(store))


# ---- printing ------------------------------------------------------------------------------
def source_version() -> str:
    """The vaultfs source measured: git HEAD, and a digest of uncommitted changes to vaultfs/."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    try:
        head = run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                   capture_output=True, text=True).stdout.strip()
        diff = run(["git", "-C", str(root), "diff", "HEAD", "--", "vaultfs"],
                   capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not diff:
        return head
    return f"{head} + uncommitted vaultfs/ changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds


def row(label: str, value: str, ratio: str = "") -> None:
    print(f"  {label:<38} {value:>14}   {ratio}", flush=True)


def rate_rows(native_label: str, native_rate: float, native_s: float, vault_label: str,
              vault_rate: float, vault_s: float, goal: float = 0.40) -> None:
    """The header and the two rate rows every benchmark prints: native, then vaultfs as a ratio
    of it (the goal: issue 2's 0.40 unless another issue asks for more)."""
    print()
    print("  (MB = 10^6 bytes; ratios are to the native figure of the same run)")
    row(native_label, f"{native_rate:8.1f} MB/s", f"{native_s:6.1f} s   1.00")
    row(vault_label, f"{vault_rate:8.1f} MB/s",
        f"{vault_s:6.1f} s   {vault_rate / native_rate:.2f} of native rate   (goal >= {goal:.2f})")
