"""Compression benchmark: what vaultfs stores of RAW files, against zstd -3, borg and restic,
and how fast it ingests them, against cp + sync to the same disk.

    python tools/bench/compression.py [--workdir /var/tmp/vaultfs-bench] [--frames 20]
                                      [--size 4000x3000] [--sets burst16,burst14,corpus]
                                      [--no-peers] [--levels 9,19]

Sets of files (tools/bench/_dng.py makes the bursts, once, into WORKDIR/compression-cache):
  burst16  --frames uncompressed DNGs of one scene (a moving subject, fresh shot and read noise
           in every frame), 14-bit Bayer samples in 16-bit words, as most cameras' uncompressed
           RAWs hold them
  burst14  the same frames packed 14 bits per sample (the DNG packing; needs imagecodecs)
  corpus   the corpus RAWs with image data: dng/ (Magic Lantern DNG, packed 14-bit) and raw/
           (GoPro GPR: VC-5 compressed)
  tiff     the corpus TIFFs (8- and 16-bit scans and exports, with EXIF, IPTC, XMP and ICC)
For each set, the page cache dropped before each phase:
  native   cp FILES native/ ; sync                                    (the speed reference)
  vaultfs  fresh store, mount, cp FILES mnt/ ; vaultfs umount           (MB/s, stored bytes)
  zstd -3  each whole file through the zstd command line (sizes only)
  borg     borg create --compression zstd,3 ; sync                        (if installed)
  restic   restic backup (repository v2, auto compression) ; sync         (if installed)
  codec    the store's codec alone on the first file's chunks, one thread: MB/s encoding and
           decoding (CPU time), and zstd level 1 alone on the same chunks
  --levels each level N: a copy of the vaultfs store recompressed as a tier with
           `compression = N` is (store/recompress.py, the operation a mount runs in the
           background, here unpaced): stored bytes, and the CPU seconds it took
Sizes are printed as a ratio to the logical bytes (full copies of the files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import _dng

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
SETS = ("burst16", "burst14", "corpus", "tiff")


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20, help="frames per burst (default 20)")
    p.add_argument("--size", default="4000x3000", help="burst frame size in photosites")
    p.add_argument("--sets", default=",".join(SETS), help="which sets (default: all)")
    p.add_argument("--no-peers", action="store_true", help="skip borg and restic")
    p.add_argument("--levels", default="",
                   help="also recompress each set's store at these zstd levels (a tier's "
                        "compression = N), e.g. 9,19")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    C.need_root()
    work = Path(args.workdir)
    width, height = map(int, args.size.lower().split("x"))
    print(f"compression: workdir {work} ({os.cpu_count()} cores), load {_load()}", flush=True)
    print(f"vaultfs source: {C.source_version()}", flush=True)
    summary = []
    for name in args.sets.split(","):
        files = file_set(name, work, args.frames, width, height)
        if files:
            summary.append(measure(name, files, work, not args.no_peers, levels))
    print(f"\nsummary (stored / logical bytes; lower is better), load {_load()}")
    print(f"  {'set':<10} {'logical':>10} {'vaultfs':>8} {'zstd -3':>8} {'borg':>8} "
          f"{'restic':>8}   vaultfs ingest / cp+sync")
    for s in summary:
        cells = [_ratio(s[k], s["logical"]) for k in ("vaultfs", "zstd", "borg", "restic")]
        print(f"  {s['set']:<10} {s['logical'] / C.MB:8.0f} MB " + " ".join(
            f"{c:>8}" for c in cells) + f"   {s['rate']:.0f} / {s['native']:.0f} MB/s "
            f"({s['rate'] / s['native']:.2f})")
    if levels:
        print(f"\n  a tier recompressed (stored / logical; CPU seconds of the recompression)")
        print(f"  {'set':<10} {'level 1':>8} " + " ".join(f"{'level ' + str(n):>18}"
                                                      for n in levels))
        for s in summary:
            print(f"  {s['set']:<10} {_ratio(s['vaultfs'], s['logical'])} " + " ".join(
                f"{_ratio(s['levels'][n]['stored'], s['logical'])} {s['levels'][n]['cpu']:7.1f} s"
                for n in levels))
    return 0


# ---- the file sets ---------------------------------------------------------------------------
def file_set(name: str, work: Path, frames: int, width: int, height: int,
             preview: int = 0) -> list[Path]:
    """The files of a set, made once into WORKDIR/compression-cache (the bursts with a JPEG
    preview of `preview` pixels a side embedded, as cameras' DNGs have, when it is not 0)."""
    if name in ("corpus", "tiff"):
        return sorted(p for d in (("dng", "raw") if name == "corpus" else ("tiff",))
                      for p in (CORPUS / d).iterdir())
    if name not in SETS:
        sys.exit(f"unknown set {name!r}; sets: {', '.join(SETS)}")
    bits = 16 if name == "burst16" else 14
    if bits != 16:
        try:
            import imagecodecs  # noqa: F401 - tifffile packs samples with it
        except ImportError:
            print(f"\n{name}: unavailable (tifffile needs imagecodecs to pack 14-bit samples: "
                  f"pip install imagecodecs)")
            return []
    cache = work / "compression-cache" / (f"{name}-preview" if preview else name)
    want = {"frames": frames, "width": width, "height": height, "bits": bits, "generator": 1}
    if preview:
        want["preview"] = preview
    manifest = cache / "manifest.json"
    paths = [cache / f"DSC_{i:04d}.DNG" for i in range(frames)]
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    # (frame i is the same whatever the count, so a larger set serves a smaller one)
    if {**have, "frames": frames} == want and have["frames"] >= frames and \
            all(p.exists() for p in paths):
        return paths
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    print(f"\ngenerating {frames} DNG frames of {width}x{height} ({bits}-bit) in {cache}",
          flush=True)
    t0 = time.monotonic()
    still, disc = _dng.scene(width, height, seed=7)
    for i, path in enumerate(paths):
        samples = _dng.frame(still, disc, i, seed=7)
        _dng.write(path, samples, bits=bits, preview=preview)
        if i == 0:
            check_dng(path, samples)
    manifest.write_text(json.dumps(want))
    os.sync()
    print(f"  generated in {time.monotonic() - t0:.0f} s", flush=True)
    return paths


def check_dng(path: Path, samples) -> None:
    """The generated file is a DNG that raw converters read: LibRaw (rawpy) gets exactly the
    samples back, exiftool reads its DNG tags without a warning."""
    import numpy as np
    import rawpy

    with rawpy.imread(str(path)) as raw:
        same = np.array_equal(raw.raw_image, samples)
        pattern = raw.color_desc.decode()
    tags = json.loads(C.run(["exiftool", "-j", "-DNGVersion", "-CFAPattern", "-BitsPerSample",
                             "-Warning", str(path)], capture_output=True, text=True).stdout)[0]
    print(f"  frame 0: rawpy {'reads the same samples' if same else 'DIFFERS'} ({pattern}), "
          f"exiftool DNGVersion {tags.get('DNGVersion')}, BitsPerSample "
          f"{tags.get('BitsPerSample')}, CFA {tags.get('CFAPattern')}, "
          f"warning: {tags.get('Warning', 'none')}", flush=True)


# ---- measuring -----------------------------------------------------------------------------
def measure(name: str, files: list[Path], work: Path, peers: bool, levels: list[int]) -> dict:
    logical = sum(f.stat().st_size for f in files)
    print(f"\n{name}: {len(files)} files, {logical / C.MB:,.1f} MB", flush=True)
    run = C.ingest(work, files)
    r_native, r_vault = C.rate(logical, run.native_s), C.rate(logical, run.vault_s)
    t_native, t_vault, st, cpu = run.native_s, run.vault_s, run.status, run.rss
    C.rate_rows("native cp + sync", r_native, t_native, "vaultfs cp + umount", r_vault, t_vault)
    C.row("vaultfs daemon CPU time", f"{cpu.cpu_used:8.1f} s",
          f"{cpu.cpu_used / t_vault:.2f} cores busy on average")
    out = {"set": name, "logical": logical, "native": r_native, "rate": r_vault,
           "vaultfs": st["stored_bytes"]}
    C.row("vaultfs stored (chunk payloads)", _ratio(st["stored_bytes"], logical),
          f"{st['stored_bytes'] / C.MB:,.1f} MB; data.mdb {st['store_file_bytes'] / C.MB:,.1f} MB"
          f" ({_ratio(st['store_file_bytes'], logical)})")
    for codec, (chunks, raw, stored) in sorted(codecs(work / "store").items()):
        C.row(f"  codec {codec} ({CODEC_NAMES[codec]})", f"{chunks:8d} chunks",
              f"{raw / C.MB:,.1f} MB raw -> {stored / C.MB:,.1f} MB ({_ratio(stored, raw)})")

    enc, dec, z_enc, z_dec = codec_speed(files[0])
    C.row("codec on one core (the first file)", f"{enc:6.0f} MB/s",
          f"encoding, {dec:.0f} MB/s decoding; zstd level 1 alone {z_enc:.0f} and {z_dec:.0f}")

    out["levels"] = {}
    for level in levels:
        r = out["levels"][level] = recompressed(work, level)
        C.row(f"recompressed at zstd level {level}", _ratio(r["stored"], logical),
              f"{r['stored'] / C.MB:,.1f} MB ({r['stored'] / st['stored_bytes']:.3f} of level 1"
              f"); {r['cpu']:.1f} CPU s, {r['raw'] / C.MB / r['cpu']:.1f} MB/s of chunks "
              f"re-encoded; {r['replaced']}/{r['chunks']} chunks replaced")

    zstd = sum(len(C.run(["zstd", "-3", "-q", "-c", str(f)], capture_output=True).stdout)
               for f in files) if shutil.which("zstd") else None
    out["zstd"] = zstd
    C.row("zstd -3 of each whole file", _ratio(zstd, logical),
          f"{zstd / C.MB:,.1f} MB" if zstd else "(zstd not installed)")

    for peer, fn in (("borg", C.borg), ("restic", C.restic)):
        out[peer] = None
        if not peers:
            continue
        if shutil.which(peer) is None:
            C.row(peer, "unavailable", f"(apt-get install "
                  f"{'borgbackup' if peer == 'borg' else peer})")
            continue
        secs, size = fn(work, files)
        out[peer] = size
        C.row(f"{peer} repository", _ratio(size, logical),
              f"{size / C.MB:,.1f} MB; backup + sync {C.rate(logical, secs):.0f} MB/s")
    return out


def mount_chunks(path: Path) -> list[tuple[bytes, tuple | None]]:
    """`path`'s chunks as the mount cuts them, each with the (layout, offset in its image
    data) that the mount hands the codec with it, or None."""
    from vaultfs.chunking import split_file, structure

    data = path.read_bytes()
    shape = structure(lambda off, n: data[off:off + n], len(data))
    with open(path, "rb") as f:
        return [(bytes(c), shape.layout_at(off, len(c))) for off, c in
                split_file(f.fileno(), 0, len(data), bounds=shape.cuts, grids=shape.grids)]


def codec_speed(path: Path, passes: int = 3) -> tuple[float, float, float, float]:
    """MB/s of raw bytes, in CPU time of one thread, of the store's codec on `path`'s chunks,
    cut and laid out as the mount does (encoding, decoding with its check), and of zstd level 1
    alone on the same chunks (compressing, decompressing)."""
    import zstandard

    from vaultfs.store import codec

    chunks = mount_chunks(path)
    data_len = sum(len(c) for c, _ in chunks)
    ids = [codec.xxh3(c) for c, _ in chunks]
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()

    def rate(work) -> float:
        t0 = time.thread_time()
        for _ in range(passes):
            work()
        return passes * data_len / C.MB / (time.thread_time() - t0)

    stored = [codec.encode(c, *(layout or ())) for c, layout in chunks]
    frames = [zc.compress(c) for c, _ in chunks]
    return (rate(lambda: [codec.encode(c, *(layout or ())) for c, layout in chunks]),
            rate(lambda: [codec.decode(i, s, len(c)) for i, s, (c, _) in
                          zip(ids, stored, chunks)]),
            rate(lambda: [zc.compress(c) for c, _ in chunks]),
            rate(lambda: [zd.decompress(f) for f in frames]))


def recompressed(work: Path, level: int) -> dict:
    """A copy of WORKDIR/store with every file's chunks recompressed at `level`, as a mount does
    for a tier with `compression = level`, unpaced: the store's stored bytes afterwards, and
    the CPU seconds of this process (the encoding, the checks and the commits)."""
    import stat

    from vaultfs.store import Store, recompress

    copy = work / f"store-level{level}"
    shutil.rmtree(copy, ignore_errors=True)
    C.run(["cp", "-a", str(work / "store"), str(copy)])
    try:
        with Store.open(copy, writable=True) as store:
            with store.reader() as tx:
                versions = sorted({n.content for n in tx.inodes()
                                   if stat.S_ISREG(n.mode) and n.content})
            cpu = time.process_time()
            r = recompress.recompress(store, [(v, level) for v in versions], duty=1.0)
            cpu = time.process_time() - cpu
            stored = store.figures()["stored_bytes"]
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {"stored": stored, "cpu": cpu, "raw": r.raw_bytes, "chunks": r.chunks,
            "replaced": r.replaced}


CODEC_NAMES = {0: "raw", 1: "zstd", 2: "predictor + zstd"}


def codecs(store: Path) -> dict[int, tuple[int, int, int]]:
    """codec -> (chunks, raw bytes, stored bytes) over the store's chunks."""
    from vaultfs.store import Store
    from vaultfs.store import format as F

    out: dict[int, list[int]] = {}
    with Store.open(store) as s, s.reader(buffers=True) as tx:
        records = tx.txn.cursor(db=s.dbs[F.DB_CHUNKS])
        for key, rec in records:
            value = tx.chunk_data(bytes(key))
            if value is None:  # offline: evicted, its bytes on a peer only
                continue
            r = F.ChunkRecord.unpack(bytes(rec))
            tally = out.setdefault(value[0], [0, 0, 0])
            tally[0] += 1
            tally[1] += r.raw_len
            tally[2] += r.stored_len
    return {k: tuple(v) for k, v in out.items()}


def _ratio(part: int | None, whole: int) -> str:
    return f"{part / whole:8.3f}" if part is not None else "     n/a"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
