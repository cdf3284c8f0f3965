"""Sync benchmark: what `vaultfs sync` sends and how fast, against rsync and cp on the same machine.

    python tools/bench/sync.py [--size-gb 1] [--card 500M] [--bursts near-dup|sensor|dng]
                               [--log-data csv|random] [--link-rate 10M] [--link-delay MS]
                               [--cases 1,2,3]
                               [--workdir /var/tmp/vaultfs-bench] [--keep]

Every TCP case goes through a small counting proxy run inside this script (a thread between
`vaultfs sync` and `vaultfs serve`, or rsync and `rsync --daemon`): its "wire" figures are the TCP
payload bytes in both directions (IP/TCP headers not counted). The report's `wire_bytes`
(`vaultfs sync --json`: stored, compressed chunk bytes) is printed beside them.

1. Differential. A growing logger CSV of --size-gb (8 sensors at 10 Hz, ISO time stamps and
   random-walk readings, 57-byte rows; or incompressible bytes with --log-data random) and a copy
   of the corpus DNG are written through a mount and synced to an empty peer over TCP. Then,
   through the mount, 1 MB of rows is appended to the CSV and the DNG's rating is changed with
   exiftool, and it syncs again. A third sync with nothing changed gives the protocol's fixed
   overhead. Goal (issue 6): the second sync sends at most 110% of the changed bytes plus that
   fixed overhead.
2. Against plain copies. A field card: the corpus (/work/shared/corpus, all of it) plus
   generated bursts up to --card bytes. near-dup (default): bursts of --burst-len frames made
   from the corpus RAWs with full pixel data (DNG, GoPro GPR, 3-4 MB): each burst a new scene
   (the source's image data XORed with random bytes: no dedup between bursts, and no
   compression of the image data, which zstd shrinks by only 4-8% in the sources), each frame
   the scene with 64 KiB of new image bytes at a random place (a moving subject) and its own
   capture time written by exiftool; sensor: the ingest benchmark's 25 MB RAW-like files
   (independent sensor noise in every frame: nothing to dedup; no TIFF structure, so the codec
   guesses their layout); dng: real DNGs of a 12 Mpx burst as field.py --card dng makes them
   (a camera's uncompressed RAWs: the codec reads their layout, and the shot noise bounds what
   any lossless coding can take off).
   Synced to an empty peer over loopback TCP capped at --link-rate by the proxy (and delayed by
   --link-delay milliseconds each way, for a link with latency), vs `rsync -a` of the card's
   files to an empty folder through `rsync --daemon` over the same proxy.
   Goal: at least 50% fewer bytes than rsync.
3. Uncapped loopback. The card synced to an empty peer (TCP straight to `vaultfs serve`, and
   to a store path with no TCP) vs `cp -a` of the card's folder + `sync` on the same disk.
   Goal: at least 0.5 of cp's rate (MB/s of file data).

The page cache is dropped before each timed run. Nothing here asserts a timing. Everything the
run makes lives in WORKDIR/sync-run and is removed at the end (mounts, servers too), unless --keep.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C

CORPUS = Path("/work/shared/corpus")
BURST_SOURCES = ("dng/colorchart.dng", "raw/GOPR0024.GPR", "raw/GOPR9231.GPR",
                 "bursts/gopro_fusion_pair/GPFR7066.GPR", "bursts/gopro_fusion_pair/GPBK7066.GPR")
RATING_SOURCE = "dng/colorchart.dng"
APPEND_BYTES = 1_000_000
SUBJECT_BYTES = 64 * 1024      # bytes of a burst frame's image data that differ from its source


# ---- a counting, rate-capping TCP proxy ----------------------------------------------------
class Pace:
    """Holds the bytes through one direction of a link to `rate` per second (0: no cap), with
    at most BURST seconds of credit after an idle spell."""
    BURST = 0.02

    def __init__(self, rate: float):
        self.rate, self.free_at, self.lock = rate, 0.0, threading.Lock()

    def wait(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.free_at = max(self.free_at, now - self.BURST) + n / self.rate
            due = self.free_at
        if due > now:
            time.sleep(due - now)


class Delay:
    """Delivers the bytes handed to it to `dst` `seconds` later, in order: a link's latency."""

    def __init__(self, dst: socket.socket, seconds: float):
        self.dst, self.seconds = dst, seconds
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        self.queue.put((time.monotonic() + self.seconds, data))

    def close(self) -> None:
        """Deliver what is on the way, then stop."""
        self.queue.put((0.0, None))
        self.thread.join()

    def _run(self) -> None:
        while (item := self.queue.get())[1] is not None:
            time.sleep(max(0.0, item[0] - time.monotonic()))
            try:
                self.dst.sendall(item[1])
            except OSError:
                return


class Proxy:
    """Listens on 127.0.0.1 (a free port); each connection is joined to `upstream`, bytes are
    counted per direction (`up`: client to server), each direction capped at `rate` bytes/s
    and delayed by `delay` seconds."""

    def __init__(self, upstream: tuple[str, int], rate: float = 0, delay: float = 0):
        self.upstream, self.delay = upstream, delay
        self.pace = {"up": Pace(rate), "down": Pace(rate)}
        self.bytes = {"up": 0, "down": 0}
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.bytes = {"up": 0, "down": 0}

    @property
    def total(self) -> int:
        return self.bytes["up"] + self.bytes["down"]

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            done = threading.Barrier(2, action=lambda c=client, s=server: (c.close(), s.close()))
            for src, dst, way in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, way, done),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str,
              done: threading.Barrier) -> None:
        late = Delay(dst, self.delay) if self.delay else None
        try:
            while data := src.recv(256 * 1024 if not self.pace[way].rate else 64 * 1024):
                self.pace[way].wait(len(data))
                if late is not None:
                    late.send(data)
                else:
                    dst.sendall(data)
                with self.lock:
                    self.bytes[way] += len(data)
        except OSError:
            pass
        finally:
            if late is not None:
                late.close()
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                done.wait(timeout=600)
            except threading.BrokenBarrierError:
                pass


# ---- processes and stores this run owns (all cleaned up at the end) ------------------------
class Run:
    def __init__(self, root: Path):
        self.root = root
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.proxies: list[Proxy] = []

    def store(self, name: str) -> Path:
        path = self.root / name
        C.init_store(path)
        return path

    def mount(self, store: Path) -> Path:
        mnt = self.root / f"{store.name}.mnt"
        C.mount(store, mnt)
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: Path) -> float:
        t = C.timed([[C.VAULTFS, "umount", str(mnt)]], stdout=subprocess.DEVNULL)
        self.mounts.remove(mnt)
        return t

    def serve(self, store: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
        log = self.root / f"{store.name}.serve.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([C.VAULTFS, "serve", str(store), "--listen", "127.0.0.1:0"],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"vaultfs serve said {line!r} (log: {log})")
        return proc, ("127.0.0.1", int(line.rsplit(":", 1)[1]))

    def proxy(self, upstream: tuple[str, int], rate: float = 0, delay: float = 0) -> Proxy:
        p = Proxy(upstream, rate, delay)
        self.proxies.append(p)
        return p

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def cleanup(self, keep: bool) -> None:
        for p in self.proxies:
            p.close()
        for proc in list(self.procs):
            self.stop(proc)
        for mnt in list(self.mounts):
            try:
                C.unmount(mnt)
            except (subprocess.CalledProcessError, OSError) as e:
                print(f"  (could not unmount {mnt}: {e})", file=sys.stderr)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def pair(field: Path, studio: Path) -> None:
    """`vaultfs pair` on both sides, as two people would: the studio shows a code, the field
    vault types it."""
    shown = subprocess.Popen([C.VAULTFS, "pair", str(studio), "--listen", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, text=True)
    try:
        code = shown.stdout.readline().split(":", 1)[1].strip()
        port = shown.stdout.readline().split(" on ", 1)[1].split(" ")[0].rsplit(":", 1)[1]
        C.run([C.VAULTFS, "pair", str(field), f"tcp://127.0.0.1:{port}", code],
              stdout=subprocess.DEVNULL)
        shown.stdout.read()
        shown.wait(30)
    finally:
        if shown.poll() is None:
            shown.kill()
            shown.wait()


def vsync(store: Path, peer: str, proxy: Proxy | None = None) -> tuple[float, dict, int]:
    """`vaultfs sync STORE PEER --push --json`: (wall seconds, its report, proxy bytes)."""
    import json

    if proxy is not None:
        proxy.reset()
    t0 = time.perf_counter()
    out = C.run([C.VAULTFS, "sync", str(store), peer, "--push", "--json"],
                capture_output=True, text=True).stdout
    secs = time.perf_counter() - t0
    return secs, json.loads(out), proxy.total if proxy is not None else 0


# ---- the logger CSV ------------------------------------------------------------------------
class Logger:
    """A data logger's CSV: SENSORS sensors read every TICK_MS, one 57-byte row each:
    2026-11-24T10:50:00.100Z,s03,23.417,1013.25,45.12,3.8012   (time, sensor, °C, hPa, %RH, V)
    Readings are random walks, so the text compresses as a real log does (zstd level 1: ~8x)."""
    SENSORS, TICK_MS, ROW = 8, 100, 57
    HEADER = b"time,sensor,temp_c,pressure_hpa,humidity_pct,battery_v\n"
    T0_MS = 1_795_000_000_000

    def __init__(self, kind: str, seed: int = 6):
        import numpy as np

        self.np, self.kind = np, kind
        self.rng = np.random.default_rng(seed)
        self.tick = 0
        n = self.SENSORS
        # milli-°C, centi-hPa, centi-%, 0.1 mV: (low, high, step of the walk)
        self.fields = [(10_000, 39_999, 4), (100_000, 102_999, 2), (1_000, 9_999, 3),
                       (30_000, 41_999, 1)]
        self.state = [self.rng.integers(lo + (hi - lo) // 3, hi - (hi - lo) // 3, n)
                      for lo, hi, _ in self.fields]

    def _digits(self, v, width: int):
        np = self.np
        return (np.stack([(v // 10 ** (width - 1 - i)) % 10 for i in range(width)], axis=1)
                + 48).astype(np.uint8)

    def rows(self, nbytes: int) -> bytes:
        """At least nbytes of the next rows (whole ticks)."""
        if self.kind == "random":
            return os.urandom(nbytes)
        np = self.np
        ticks = max(1, math.ceil(nbytes / (self.ROW * self.SENSORS)))
        t = np.arange(self.tick, self.tick + ticks, dtype=np.int64)
        self.tick += ticks
        ms = self.T0_MS + t * self.TICK_MS
        secs, millis = ms // 1000, ms % 1000
        uniq, inv = np.unique(secs, return_inverse=True)
        stamps = np.frombuffer(b"".join(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(s))).encode() for s in uniq),
            np.uint8).reshape(-1, 19)
        n, S = ticks * self.SENSORS, self.SENSORS
        a = np.empty((n, self.ROW), np.uint8)
        a[:, 0:19] = np.repeat(stamps[inv], S, axis=0)
        a[:, 20:23] = self._digits(np.repeat(millis, S), 3)
        a[:, 26:28] = self._digits(np.tile(np.arange(1, S + 1), ticks), 2)
        for c, ch in ((19, "."), (23, "Z"), (24, ","), (25, "s"), (28, ","), (35, ","),
                      (43, ","), (49, ","), (56, "\n")):
            a[:, c] = ord(ch)
        # (first column, integer digits, fraction digits) of each reading
        for k, (col, ints, frac) in enumerate(((29, 2, 3), (36, 4, 2), (44, 2, 2), (50, 1, 4))):
            lo, hi, step = self.fields[k]
            walk = self.state[k] + np.cumsum(self.rng.integers(-step, step + 1, (ticks, S)),
                                             axis=0)
            walk = np.clip(walk, lo, hi)
            self.state[k] = walk[-1]
            d = self._digits(walk.reshape(-1), ints + frac)
            a[:, col:col + ints] = d[:, :ints]
            a[:, col + ints] = ord(".")
            a[:, col + ints + 1:col + ints + 1 + frac] = d[:, ints:]
        return a.tobytes()


def changed_span(old: bytes, new: bytes) -> int:
    """Bytes of `new` between its longest common prefix and suffix with `old`."""
    def longest(match, limit: int) -> int:
        lo, hi = 0, limit  # match(lo) holds; find the largest k <= limit with match(k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if match(mid) else (lo, mid - 1)
        return lo

    m = min(len(old), len(new))
    p = longest(lambda k: old[:k] == new[:k], m)
    s = longest(lambda k: k == 0 or old[-k:] == new[-k:], m - p)
    return len(new) - p - s


# ---- the field card ------------------------------------------------------------------------
def image_region(data: bytes) -> tuple[int, int]:
    """(offset, length) of a RAW's image data: the longest span between the cut points the
    chunker finds in it (the strips or tiles of these single-image DNG/GPR files)."""
    from vaultfs.chunking.formats import boundaries

    cuts = [0, *boundaries(lambda o, n: data[o:o + n], len(data)), len(data)]
    return max(((a, b - a) for a, b in itertools.pairwise(cuts)), key=lambda r: r[1])


def make_card(card: Path, total: int, bursts: str, burst_len: int, work: Path
              ) -> tuple[int, int, str]:
    """The corpus plus generated bursts up to `total` bytes; (files, bytes, what was made)."""
    import random

    (card / "corpus").mkdir(parents=True)
    C.run(["cp", "-a", f"{CORPUS}/.", str(card / "corpus")])
    C.run(["chmod", "-R", "u+w", str(card)])  # the corpus is read-only
    have = sum(f.stat().st_size for f in card.rglob("*") if f.is_file())
    room = total - have
    dcim = card / "DCIM"
    dcim.mkdir()
    if room <= 0:
        what = "no generated bursts (--card is not above the corpus's size)"
    elif bursts == "dng":
        import compression
        from field import DNG_BYTES

        files = compression.file_set("burst16", work, max(1, room // DNG_BYTES), 4000, 3000,
                                     preview=1600)
        for f in files:
            shutil.copyfile(f, dcim / f.name)
        what = (f"{len(files)} DNG frames of 12 Mpx (tools/bench/_dng.py: one scene, a moving "
                f"subject, fresh shot and read noise in every frame, 14-bit samples in 16-bit "
                f"words, a 1600-pixel JPEG preview)")
    elif bursts == "sensor":
        files = C.file_set(work, max(C.FILE_BYTES, room))
        for f in files:
            shutil.copyfile(f, dcim / f.name)
        what = (f"{len(files)} RAW-like files of 25 MB (tools/bench cache: independent sensor "
                f"noise, nothing to dedup)")
    else:
        rng = random.Random(6)
        sources = [((CORPUS / s).read_bytes(), Path(s).suffix) for s in BURST_SOURCES]
        frames, made, args, base = 0, 0, [], b""
        while made < room:
            b, f = divmod(frames, burst_len)
            src, suffix = sources[b % len(sources)]
            at, n = image_region(src)
            if f == 0:  # a new scene: the source's image data XORed with this burst's bytes
                mask = int.from_bytes(rng.randbytes(n), "little")
                base = (src[:at] + (int.from_bytes(src[at:at + n], "little") ^ mask
                                    ).to_bytes(n, "little") + src[at + n:])
            data = bytearray(base)
            pos = rng.randrange(at, at + n - SUBJECT_BYTES)  # the subject moved
            data[pos:pos + SUBJECT_BYTES] = rng.randbytes(SUBJECT_BYTES)
            name = dcim / f"B{b:03d}_{f:02d}{suffix}"
            name.write_bytes(data)
            args += [f"-DateTimeOriginal=2026:11:24 10:{b // 60 % 60:02d}:{b % 60:02d}",
                     f"-SubSecTimeOriginal={f * 50:03d}", str(name), "-execute"]
            frames += 1
            made += len(data)
        argfile = card.parent / "exiftool.args"
        argfile.write_text("\n".join(args[:-1]) + "\n")
        C.run(["exiftool", "-@", str(argfile), "-common_args", "-overwrite_original", "-q"],
              stdout=subprocess.DEVNULL)
        argfile.unlink()
        what = (f"{frames} burst frames, {burst_len} per burst, made from the corpus's "
                f"{len(sources)} RAWs with full pixel data (DNG, GPR): each burst a new scene "
                f"(the source's image data XORed with random bytes, so nothing dedups between "
                f"bursts), each frame its burst's scene with {SUBJECT_BYTES // 1024} KiB of new "
                f"image bytes at a random place and its own capture time (exiftool)")
    files = [f for f in card.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files), what


# ---- rsync through the proxy ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rsync_daemon(run: Run, dest: Path) -> tuple[str, int]:
    conf = run.root / "rsyncd.conf"
    conf.write_text(f"pid file = {run.root / 'rsyncd.pid'}\nlog file = {run.root / 'rsyncd.log'}"
                    f"\nuse chroot = no\n[card]\n  path = {dest}\n  read only = no\n"
                    f"  uid = root\n  gid = root\n")
    port = free_port()
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                             "--address=127.0.0.1", f"--port={port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run.procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return "127.0.0.1", port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("rsync --daemon did not start") from None
            time.sleep(0.05)


def stat_bytes(out: str, label: str) -> int:
    m = re.search(rf"{label}:\s*([\d,.]+)", out)
    return int(m.group(1).replace(",", "").replace(".", "")) if m else -1


# ---- printing ------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / C.MB:,.3f} MB" if n < 10 * C.MB else f"{n / C.MB:,.1f} MB"


def head(title: str) -> None:
    print(f"\n{title}", flush=True)


# ---- the cases -----------------------------------------------------------------------------
def differential(run: Run, args) -> None:
    size = int(args.size_gb * 1e9)
    log = Logger(args.log_data)
    head(f"1. differential: a logger CSV of {mb(size)} ({args.log_data}"
         f"{': 57-byte rows, 8 sensors at 10 Hz' if args.log_data == 'csv' else ' bytes'}) "
         f"+ {RATING_SOURCE} from the corpus, over loopback TCP (uncapped)")
    field, studio = run.store("log-field"), run.store("log-studio")
    mnt = run.mount(field)
    (mnt / "logger").mkdir()
    (mnt / "raw").mkdir()
    t0 = time.perf_counter()
    with open(mnt / "logger" / "sensors.csv", "wb") as f:
        written = f.write(Logger.HEADER if args.log_data == "csv" else b"")
        while written < size:
            written += f.write(log.rows(min(64_000_000, size - written)))
    rating_src = (CORPUS / RATING_SOURCE).read_bytes()
    (mnt / "raw" / "colorchart.dng").write_bytes(rating_src)
    t_fill = time.perf_counter() - t0 + run.umount(mnt)
    C.row("written through the mount + umount", f"{C.rate(written, t_fill):8.1f} MB/s",
          f"{t_fill:6.1f} s (generating the rows included)")

    pair(field, studio)
    _, addr = run.serve(studio)
    proxy = run.proxy(addr)
    C.drop_caches()
    secs, rep, tcp = vsync(field, proxy.url, proxy)
    sent = rep["sent"]["push"]
    logical = written + len(rating_src)
    C.row("first sync to the empty peer", f"{C.rate(logical, secs):8.1f} MB/s",
          f"{secs:6.1f} s (engine {rep['seconds']:.1f} s); {mb(logical)} of files, "
          f"{mb(tcp)} on the wire ({tcp / logical:.3f} of the file bytes), report "
          f"wire_bytes {mb(sent['wire_bytes'])}")

    _, rep0, fixed = vsync(field, proxy.url, proxy)
    C.row("sync with nothing changed (fixed cost)", f"{fixed:,} B",
          f"on the wire; report: {rep0['sent']['push']['chunks']} chunks")

    mnt = run.mount(field)
    extra = log.rows(APPEND_BYTES)
    with open(mnt / "logger" / "sensors.csv", "ab") as f:
        f.write(extra)
    C.run(["exiftool", "-overwrite_original", "-q", "-Rating=5",
           str(mnt / "raw" / "colorchart.dng")])
    rated = (mnt / "raw" / "colorchart.dng").read_bytes()
    run.umount(mnt)
    dng_changed = changed_span(rating_src, rated)
    changed = len(extra) + dng_changed
    C.drop_caches()
    secs, rep, tcp = vsync(field, proxy.url, proxy)
    sent = rep["sent"]["push"]
    print(f"\n  changed: {len(extra):,} B appended to the CSV + {dng_changed:,} B that exiftool "
          f"wrote into the DNG (-Rating=5; new span between the unchanged prefix and suffix; "
          f"{len(rated) - len(rating_src):+,} B in size) = {changed:,} B")
    C.row("second sync: on the wire (TCP)", f"{tcp:,} B",
          f"{tcp / changed:.3f} of the changed bytes, in {secs:.2f} s "
          f"(up {proxy.bytes['up']:,} / down {proxy.bytes['down']:,})")
    over = tcp - fixed
    C.row("  minus the fixed cost", f"{over:,} B",
          f"{over / changed:.3f} of the changed bytes   (goal <= 1.10)")
    C.row("  report: chunks' stored bytes", f"{sent['wire_bytes']:,} B",
          f"{sent['wire_bytes'] / changed:.3f} of the changed bytes ({sent['chunks']} chunks, "
          f"{sent['files']} files)")
    C.row("  report: chunks' raw bytes", f"{sent['raw_bytes']:,} B",
          f"{sent['raw_bytes'] / changed:.3f} of the changed bytes (what chunking re-sends "
          f"before compression)")


def card_cases(run: Run, args, cases: set[str]) -> None:
    card = run.root / "card"
    total = C.parse_size(args.card)
    t0 = time.perf_counter()
    nfiles, logical, what = make_card(card, total, args.bursts, args.burst_len,
                                     Path(args.workdir))
    head(f"field card: {nfiles} files, {mb(logical)}: the corpus ({CORPUS}) + {what} "
         f"(made in {time.perf_counter() - t0:.0f} s)")
    field = run.store("card-field")
    mnt = run.mount(field)
    t0 = time.perf_counter()
    C.run(["cp", "-a", f"{card}/.", str(mnt)])
    t_fill = time.perf_counter() - t0 + run.umount(mnt)
    st = C.status(field)
    C.row("cp -a into the mount + umount", f"{C.rate(logical, t_fill):8.1f} MB/s",
          f"{t_fill:6.1f} s; stored/logical bytes {st['stored_bytes'] / st['logical_bytes']:.3f} "
          f"(dedup + compression)")

    if "2" in cases:
        link = C.parse_size(args.link_rate)
        head(f"2. against plain copies: to an empty peer over loopback TCP capped at "
             f"{link / C.MB:g} MB/s each way (by the proxy)"
             + (f", {args.link_delay:g} ms late each way" if args.link_delay else ""))
        studio = run.store("card-studio")
        pair(field, studio)
        server, addr = run.serve(studio)
        delay = args.link_delay / 1000
        proxy = run.proxy(addr, link, delay)
        C.drop_caches()
        v_secs, rep, v_tcp = vsync(field, proxy.url, proxy)
        run.stop(server)
        dest = run.root / "rsync-dest"
        dest.mkdir()
        rproxy = run.proxy(rsync_daemon(run, dest), link, delay)
        C.drop_caches()
        t0 = time.perf_counter()
        out = C.run(["rsync", "-a", "--stats", f"{card}/", f"rsync://127.0.0.1:{rproxy.port}/card/"],
                    capture_output=True, text=True).stdout
        r_secs = time.perf_counter() - t0
        r_tcp = rproxy.total
        at_link = logical / link
        print(f"\n  (wire: TCP payload both ways through the proxy; the link alone would move the "
              f"card's {mb(logical)} in {at_link:.1f} s)")
        C.row("rsync -a (rsync --daemon)", f"{mb(r_tcp)}",
              f"{r_secs:6.1f} s   {at_link / r_secs:.2f} of the link's rate; its --stats: sent "
              f"{stat_bytes(out, 'Total bytes sent'):,} B, received "
              f"{stat_bytes(out, 'Total bytes received'):,} B")
        C.row("vaultfs sync --push", f"{mb(v_tcp)}",
              f"{v_secs:6.1f} s   {at_link / v_secs:.2f} of the link's rate (in file bytes); "
              f"report wire_bytes {mb(rep['sent']['push']['wire_bytes'])}, "
              f"{rep['sent']['push']['differences']:,} of "
              f"{rep['sent']['push']['chunks']:,} chunks as differences")
        C.row("  vaultfs / rsync bytes", f"{v_tcp / r_tcp:8.3f}",
              f"{1 - v_tcp / r_tcp:.0%} fewer   (goal: >= 50% fewer)")
        C.row("  vaultfs / rsync time", f"{v_secs / r_secs:8.3f}", "")

    if "3" in cases:
        head("3. uncapped loopback: to an empty peer vs cp -a between two folders on the same "
             "disk")
        native = run.root / "card-copy"
        C.drop_caches()
        t_cp = C.timed([["cp", "-a", str(card), str(native)], ["sync"]])
        r_cp = C.rate(logical, t_cp)
        shutil.rmtree(native)
        studio = run.store("card-studio-tcp")
        pair(field, studio)
        server, addr = run.serve(studio)
        C.drop_caches()
        t_tcp, rep, _ = vsync(field, f"tcp://{addr[0]}:{addr[1]}")
        run.stop(server)
        chunk_bytes = rep["sent"]["push"]["raw_bytes"]
        studio = run.store("card-studio-path")
        C.drop_caches()
        t_path, rep_p, _ = vsync(field, str(studio))
        print("\n  (MB = 10^6 bytes; file data = the card's bytes; the ratio is to cp's rate in "
              "the same run)")
        C.row("cp -a + sync", f"{r_cp:8.1f} MB/s", f"{t_cp:6.1f} s   1.00")
        C.row("vaultfs sync over TCP (serve)", f"{C.rate(logical, t_tcp):8.1f} MB/s",
              f"{t_tcp:6.1f} s   {C.rate(logical, t_tcp) / r_cp:.2f} of cp's rate   "
              f"(goal >= 0.5); engine {rep['seconds']:.1f} s")
        C.row("  of unique chunk data", f"{C.rate(chunk_bytes, t_tcp):8.1f} MB/s",
              f"{mb(chunk_bytes)} of chunks (raw) sent; "
              f"{C.rate(chunk_bytes, t_tcp) / r_cp:.2f} of cp's rate")
        C.row("vaultfs sync to a store path", f"{C.rate(logical, t_path):8.1f} MB/s",
              f"{t_path:6.1f} s   {C.rate(logical, t_path) / r_cp:.2f} of cp's rate (no TCP, "
              f"no encryption); engine {rep_p['seconds']:.1f} s")


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0,
                   help="size of the logger CSV of case 1, GB (default %(default)s)")
    p.add_argument("--log-data", choices=("csv", "random"), default="csv",
                   help="the logger file: CSV text rows, or incompressible bytes")
    p.add_argument("--card", default="500M",
                   help="bytes on the field card of cases 2 and 3 (default %(default)s; the "
                        "corpus is 88 MB of it)")
    p.add_argument("--bursts", choices=("near-dup", "sensor", "dng"), default="near-dup",
                   help="what fills the card beyond the corpus (see above)")
    p.add_argument("--burst-len", type=int, default=8,
                   help="frames per near-dup burst (default %(default)s)")
    p.add_argument("--link-rate", default="10M", help="the capped link of case 2, bytes/s "
                   "each way (default %(default)s)")
    p.add_argument("--link-delay", type=float, default=0, metavar="MS",
                   help="latency added to each direction of case 2's link (default 0)")
    p.add_argument("--cases", default="1,2,3", help="which cases to run (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="leave WORKDIR/sync-run in place")
    args = p.parse_args()
    C.need_root()
    cases = set(args.cases.split(","))
    for tool in ("exiftool", "rsync"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install {tool.replace('exiftool', 'libimage-exiftool-perl')})")
    root = Path(args.workdir) / "sync-run"
    run = Run(root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for mnt in root.glob("*.mnt"):  # a run that was killed before it cleaned up
            if mnt.is_mount():
                C.unmount(mnt)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"sync: workdir {root} ({os.cpu_count()} cores); MB = 10^6 bytes", flush=True)
        print(f"vaultfs source: {C.source_version()}", flush=True)
        if "1" in cases:
            differential(run, args)
        if cases & {"2", "3"}:
            card_cases(run, args, cases)
    finally:
        run.cleanup(args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
