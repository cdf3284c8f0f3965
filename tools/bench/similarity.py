"""Fingerprints and groups: how right they are, and how fast.

    python tools/bench/similarity.py [--workdir DIR] [--images 20000]

1. Accuracy. A labelled set is written (`labelled_set`): real camera files from the corpus
   (an exposure bracket, an iPhone HDR pair, two series of one scene, a same-scene HDR on/off
   pair, and unrelated pictures), variants of six corpus JPEGs made as editors and exporters
   make them (resized to 50% and 15%, recompressed at quality 95, 70 and 40, cropped by 5%,
   brightened by half a stop and darkened by one; some keep the camera's EXIF, some are
   stripped), edits (cropped by 15% and re-exposed, named `<stem>-Edit.jpg`; and XMP-linked
   "master" and "print" files), two exact copies, and synthetic RAW captures (DNG with a
   full-size JPEG preview, by _images.py): RAW+JPEG pairs with an exported JPEG, two bursts of
   different scenes one second apart, two consecutive exposure brackets, and other captures of
   the same and of another camera. It is copied into a fresh mount; once every file is
   analysed, `vaultfs groups --json` is compared with the labels: for each kind, precision and
   recall over the pairs of files put in one group.
2. Fingerprint time of a 50 MB RAW (6048x4032 14-bit DNG with a full-size JPEG preview):
   metadata and fingerprint of the bytes in memory, against LibRaw decoding the whole RAW
   (half size, the cheapest full decode); and through a mount, from close() to the
   `fingerprinted` event.
3. Grouping rate of the group index (media/groups.py) for a vault of --images images in bursts
   of RAW+JPEG frames: indexed from scratch (what `vaultfs groups` does), 1,000 more added
   one at a time with the groups recomputed every ten (a mount recomputes them at most twice
   a second), and a rebuild of the mount's catalogue that finds nothing new.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import pyexiv2
import rawpy
from PIL import Image, ImageOps

import _images as I

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
KINDS = ("duplicate", "pair", "near", "burst", "bracket", "edit")
ORIGINALS = ("jpeg/large/Nikon D90.jpg", "jpeg/large/Canon EOS 5D.jpg",
             "jpeg/large/Sony DSC-H9.jpg", "jpeg/large/FujiFilm FinePix F40fd.jpg",
             "jpeg/medium/mongolels.jpg", "jpeg/large/Olympus E-20.jpg")
UNRELATED = ("jpeg/large/Canon EOS 20D (1).jpg", "jpeg/large/Sigma DP1.jpg",
             "jpeg/large/Minolta DiMAGE A1.jpg", "jpeg/large/Pentax ist D.jpg",
             "jpeg/large/Apple iPhone 6 plus.jpg", "jpeg/large/canon-dslr.jpg",
             "jpeg/large/Samsung SM-G935L (Galaxy S7 Edge).jpg",
             "jpeg/large/IMG_20180725_163423.jpg",
             "jpeg/large/Canon EOS-1D Mark III (via Adobe Lightroom).jpg",
             "jpeg/medium/22-canon_tags.jpg", "jpeg/medium/HMD_Nokia_8.3_5G.jpg",
             "jpeg/medium/door-knocker.jpg", "jpeg/medium/jolla.jpg",
             "sidecars/lightroom_pair/IMG_5910.jpg", "heic/IMG_2682.heic", "heic/IMG_3578.heic",
             "heic/heic-iphone.heic", "heic/2021-02-13-1929.heic")
# What the corpus's sequences are (MANIFEST.md; the Canon 6D frames judged by their EXIF
# thumbnails: 7238-7240 show one arrangement of lenses, 7237 and 7241 others).
CORPUS_GROUPS = {
    "bracket": [["bursts/bracket_canon5dmk2_frobisher/IMG_2600.jpg",
                 "bursts/bracket_canon5dmk2_frobisher/IMG_2601.jpg",
                 "bursts/bracket_canon5dmk2_frobisher/IMG_2602.jpg"],
                ["bursts/iphone6_hdr_pair/iphone_hdr_NO.jpg",
                 "bursts/iphone6_hdr_pair/iphone_hdr_YES.jpg"]],
    "burst": [[f"bursts/series_nikon_d70s_jpeg_named_nef/Issue 247-{i}.nef" for i in range(1, 5)],
              ["jpeg/medium/canon_hdr_NO.jpg", "jpeg/medium/canon_hdr_YES.jpg"],
              [f"bursts/series_canon6d_exv/20220610_MG_{i}.exv" for i in (7238, 7239, 7240)]],
}
CORPUS_ALONE = ("bursts/series_canon6d_exv/20220610_MG_7237.exv",
                "bursts/series_canon6d_exv/20220610_MG_7241.exv",
                "bursts/gopro_fusion_pair/GPFR7066.GPR", "bursts/gopro_fusion_pair/GPBK7066.GPR")
CAPTURE_KEYS = ("Exif.Image.Make", "Exif.Image.Model", "Exif.Photo.DateTimeOriginal",
                "Exif.Photo.SubSecTimeOriginal", "Exif.Photo.ExposureTime",
                "Exif.Photo.FNumber", "Exif.Photo.ISOSpeedRatings",
                "Exif.Photo.ExposureBiasValue", "Exif.Photo.BodySerialNumber")


# ---- the labelled set ----------------------------------------------------------------------
def labelled_set(root: Path, corpus: Path = CORPUS) -> dict[str, list[list[str]]]:
    """Write the set under `root`; return its labels: kind -> groups of paths (relative to
    root). A file in no group of a kind must be in none of that kind."""
    root.mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[list[str]]] = {k: [] for k in KINDS}
    for rel in [p for groups in CORPUS_GROUPS.values() for g in groups for p in g] + \
            list(CORPUS_ALONE) + list(UNRELATED):
        _put(root / "corpus" / rel, (corpus / rel).read_bytes())
    for kind, groups in CORPUS_GROUPS.items():
        labels[kind] += [[f"corpus/{p}" for p in g] for g in groups]
    for i, rel in enumerate(UNRELATED[:2]):  # the same bytes under another name
        copy = f"copies/copy_{i}{Path(rel).suffix}"
        _put(root / copy, (corpus / rel).read_bytes())
        labels["duplicate"].append([f"corpus/{rel}", copy])
        labels["near"].append([f"corpus/{rel}", copy])
    _variants(root, corpus, labels)
    _captures(root, labels)
    return labels


def _variants(root: Path, corpus: Path, labels: dict) -> None:
    """What editors and exporters make of six corpus JPEGs."""
    for n, rel in enumerate(ORIGINALS):
        data = (corpus / rel).read_bytes()
        _put(root / "corpus" / rel, data)
        orig = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        exif = _capture_exif(data)
        near = [f"corpus/{rel}"]
        for name, img, quality, keep in (
                ("half", I.resized(orig, 0.5), 90, True),
                ("web", I.resized(orig, 0.15), 80, False),
                ("q95", orig, 95, True), ("q70", orig, 70, True), ("q40", orig, 40, False),
                ("crop5", I.cropped(orig, 0.05), 90, True),
                ("brighter", I.exposed(orig, 0.5), 90, True),
                ("darker", I.exposed(orig, -1.0), 90, False)):
            path = f"exports/o{n}/{name}_{n}.jpg"
            _put(root / path, _with_exif(I.jpeg(img, quality), exif if keep else {}))
            near.append(path)
        stem = Path(rel).stem
        edit = f"corpus/{Path(rel).parent}/{stem}-Edit.jpg"
        _put(root / edit, _with_exif(I.jpeg(I.exposed(I.cropped(orig, 0.15), 0.7), 90), exif))
        labels["edit"].append([f"corpus/{rel}", edit])
        if n < 3:  # an XMP-linked master and a print made from it
            doc = f"xmp.did:vaultfs-bench-{n}"
            master, prints = f"xmp/master_{n}.jpg", f"xmp/print_{n}.jpg"
            _put(root / master, _with_exif(I.jpeg(orig, 92), exif,
                                           {"Xmp.xmpMM.DocumentID": doc,
                                            "Xmp.xmpMM.OriginalDocumentID": doc}))
            _put(root / prints, _with_exif(
                I.jpeg(I.exposed(I.cropped(orig, 0.25), -0.8), 90), exif,
                {"Xmp.xmpMM.DocumentID": f"{doc}-print",
                 "Xmp.xmpMM.OriginalDocumentID": doc,
                 "Xmp.xmpMM.DerivedFrom/stRef:documentID": doc}))
            near.append(master)
            labels["edit"].append([master, prints])
        labels["near"].append(near)


def _captures(root: Path, labels: dict) -> None:
    """Synthetic RAW captures: pairs, bursts, brackets, and what must stay apart."""
    size = (1024, 680)
    cam = dict(make="VaultCam", model="VC-1", serial="4242")
    start = (9 * 3600 + 15 * 60) * 100  # hundredths of a second on the camera's clock

    def shoot(name: str, img: Image.Image, at: int, *, jpeg: bool = False,
              bias: tuple[int, int] = (0, 1), exposure: tuple[int, int] = (1, 250),
              camera: dict = cam, folder: str = "raw") -> list[str]:
        data, _ = I.dng(img, _capture(at, camera, exposure=exposure, bias=bias),
                        seed=len(name))
        files = [f"{folder}/{name}.DNG"]
        _put(root / files[0], data)
        if jpeg:
            files.append(f"{folder}/{name}.JPG")
            _put(root / files[1], I.jpeg(img, 88, _capture(at, camera, exposure=exposure,
                                                          bias=bias)))
            labels["pair"].append(list(files))
        return files

    t = start
    for i in range(3):  # single captures, RAW+JPEG, each with a web export
        img = I.scene(100 + i, size)
        files = shoot(f"DSC_{101 + i:04d}", img, t, jpeg=True)
        export = f"exports/web/DSC_{101 + i:04d}_web.jpg"
        _put(root / export, I.jpeg(I.resized(img, 0.4), 80, _capture(t, cam)))
        labels["near"].append(files + [export])
        t += 6000
    burst_start = t
    for b, seed in enumerate((200, 201)):  # two bursts of different scenes, 1 s apart
        frames = []
        for f in range(5):
            files = shoot(f"DSC_{200 + 10 * b + f:04d}", I.scene(seed, size, f), t,
                          jpeg=f in (0, 3))
            if len(files) > 1:
                labels["near"].append(files)
            frames += files
            t += 15
        labels["burst"].append(frames)
        t += 100
    t += 6000
    for s in range(2):  # two brackets of one scene, one after the other
        frames = []
        for bias, exposure in (((0, 1), (1, 250)), ((-1, 1), (1, 500)), ((1, 1), (1, 125))):
            img = I.exposed(I.scene(300, size), bias[0])
            frames += shoot(f"DSC_{300 + len(frames) + 3 * s:04d}", img, t, bias=bias,
                            exposure=exposure)
            t += 30
        labels["bracket"].append(frames)
        t += 50
    t += 6000
    for i in range(3):  # captures of unrelated scenes, 40 s apart: no burst
        shoot(f"DSC_{400 + i:04d}", I.scene(400 + i, size), t)
        t += 4000
    # Another camera, the same moment as a burst frame, another scene: nothing in common.
    shoot("OTHER_0001", I.scene(500, size), burst_start + 15,
          camera=dict(make="OtherCam", model="OC-2", serial="77"), folder="other")


def _capture(at: int, camera: dict, **exposure) -> I.Capture:
    """The EXIF of a capture at `at` hundredths of a second after midnight."""
    s = at // 100
    return I.Capture(time=f"2026:11:24 {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}",
                     subsec=f"{at % 100:02d}", **camera, **exposure)


def _capture_exif(data: bytes) -> dict:
    with pyexiv2.ImageData(data) as img:
        exif = img.read_exif()
    return {k: v for k, v in exif.items() if k in CAPTURE_KEYS}


def _with_exif(data: bytes, exif: dict, xmp: dict | None = None) -> bytes:
    """An exporter keeping the capture's EXIF (and writing XMP ids), as Lightroom does."""
    if not exif and not xmp:
        return data
    with pyexiv2.ImageData(data) as img:
        if exif:
            img.modify_exif(exif)
        if xmp:
            img.modify_xmp(xmp)
        return img.get_bytes()


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---- scoring -------------------------------------------------------------------------------
def _pairs(groups) -> set[frozenset]:
    return {frozenset(p) for g in groups for p in itertools.combinations(sorted(set(g)), 2)}


def score(labels: dict[str, list[list[str]]], found: list[dict]) -> dict[str, dict]:
    """Per kind: precision and recall over the pairs of files put in one group, of the files
    in the labelled set (`found` is `vaultfs groups --json`, paths relative to the set)."""
    out = {}
    for kind in KINDS:
        truth = _pairs(labels[kind])
        got = _pairs(g["files"] for g in found if g["kind"] == kind)
        hits = len(truth & got)
        out[kind] = {"precision": hits / len(got) if got else 1.0,
                     "recall": hits / len(truth) if truth else 1.0,
                     "pairs": len(truth), "found": len(got),
                     "wrong": sorted(sorted(p) for p in got - truth),
                     "missed": sorted(sorted(p) for p in truth - got)}
    return out


# ---- speed ---------------------------------------------------------------------------------
def big_raw(seed: int = 1, when: str = "2026:11:24 10:00:00") -> bytes:
    """A 50 MB RAW: 6048x4032 14-bit Bayer samples and a full-size JPEG preview."""
    data, _ = I.dng(I.scene(seed, (6048, 4032)), I.Capture(time=when), seed=seed)
    return data


def fingerprint_speed(data: bytes, rounds: int = 5) -> dict[str, float]:
    from vaultfs.media import fingerprint, metadata

    def best(fn, rounds: int = rounds) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def decode(**how) -> None:
        with rawpy.imread(io.BytesIO(data)) as raw:
            raw.postprocess(output_bps=8, **how)

    return {"metadata": best(lambda: metadata.read(data)),
            "fingerprint": best(lambda: fingerprint.image_record(data)),
            "half_decode": best(lambda: decode(half_size=True)),
            "full_decode": best(decode, rounds=1)}


def grouping_rate(existing: int, added: int = 1000) -> dict[str, float]:
    """The group index of a vault of `existing` images (bursts of ten RAW frames, every other
    one with its JPEG): built from scratch (as `vaultfs groups` does), then `added` images
    put in one at a time with the groups recomputed every ten (as a mount does, at most twice
    a second), and a mount's catalogue rebuild that finds nothing new."""
    from vaultfs.media.groups import GroupIndex, item

    rng = random.Random(7)

    def files(start: int, count: int):
        t = 1.8e9 + start * 10
        for i in range(start, start + count):
            if i % 10 == 0:
                t += rng.uniform(20, 300)  # a new burst
                scene = rng.getrandbits(64), rng.getrandbits(64)
            t += 0.1
            for ext, fmt in ((".NEF", "raw"), (".JPG", "jpeg")):
                if ext == ".JPG" and i % 2:
                    continue
                flips = (1 << rng.randrange(64)) | (1 << rng.randrange(64))
                record = {"kind": "image", "format": fmt, "digest": f"{i:030x}{fmt[:2]}",
                          "fingerprint": {"phash": f"{scene[0] ^ flips:016x}",
                                          "whash": f"{scene[1] ^ flips:016x}"},
                          "picture": [6048, 4032], "capture_time": _iso(t),
                          "make": "VaultCam", "model": "VC-1", "serial": "4242",
                          "exposure_time": "1/250", "fnumber": 8, "iso": 200,
                          "exposure_bias": 0}
                yield 2 * i + (ext == ".JPG"), f"day{i // 5000}/DSC_{i:05d}{ext}", i, record

    vault = list(files(0, existing))
    index = GroupIndex()
    t0 = time.perf_counter()
    index.update(vault)
    index.groups()
    scratch = time.perf_counter() - t0
    new = list(files(existing, added))
    t0 = time.perf_counter()
    for n, f in enumerate(new, 1):
        index.add(item(*f))
        if n % 10 == 0:  # what a mount's catalogue rebuild asks for (.vault/bursts)
            index.groups("burst"), index.groups("bracket")
    rate = len(new) / (time.perf_counter() - t0)
    index = GroupIndex()
    index.update(vault)
    t0 = time.perf_counter()
    index.update(vault)
    unchanged = time.perf_counter() - t0
    return {"images": len(vault), "scratch": scratch, "rate": rate, "unchanged": unchanged,
            "groups": len(index.groups())}


def _iso(seconds: float) -> str:
    from datetime import datetime, timedelta

    return (datetime(1970, 1, 1) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


# ---- through a mount -----------------------------------------------------------------------
def analysed(store: Path, count: int, timeout: float = 300.0) -> None:
    """Wait until the mount has a record (and, for images, a fingerprint verdict) for `count`
    files: `vaultfs find --json` shows their metadata."""
    import _common as C

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = C.run([C.VAULTFS, "find", str(store), "--json"], capture_output=True,
                    text=True).stdout
        done = sum(1 for f in json.loads(out) if _done(f["metadata"]))
        if done >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"the mount analysed {done} of {count} files in {timeout:.0f} s")


def _done(meta: dict) -> bool:
    return "fingerprint" in meta or "fingerprint_error" in meta or "kind" in meta and \
        meta["kind"] != "image"


def main() -> int:
    import _common as C

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000,
                   help="images already in the vault for the grouping rate (default 20000)")
    args = p.parse_args()
    C.need_root()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"vaultfs source: {C.source_version()}")
    print(f"load: {Path('/proc/loadavg').read_text().strip()}", flush=True)

    set_dir = C.fresh_dir(work / "sim-set")
    labels = labelled_set(set_dir)
    files = [p for p in set_dir.rglob("*") if p.is_file()]
    store, mnt = work / "sim-store", work / "sim-mnt"
    C.init_store(store)
    C.mount(store, mnt)
    try:
        C.run(["cp", "-a", f"{set_dir}/.", str(mnt)])
        t0 = time.monotonic()
        analysed(store, len(files))
        took = time.monotonic() - t0
        found = json.loads(C.run([C.VAULTFS, "groups", str(store), "--json"],
                                 capture_output=True, text=True).stdout)
    finally:
        C.unmount(mnt)
    print(f"\n1. accuracy: {len(files)} files, analysed {took:.1f} s after the copy")
    print(f"  {'kind':<10} {'precision':>9} {'recall':>7} {'labelled pairs':>15} "
          f"{'found pairs':>12}")
    scores = score(labels, found)
    for kind, s in scores.items():
        print(f"  {kind:<10} {s['precision']:9.3f} {s['recall']:7.3f} {s['pairs']:15d} "
              f"{s['found']:12d}")
    for kind, s in scores.items():
        for what in ("wrong", "missed"):
            for a, b in s[what]:
                print(f"    {kind} {what}: {a}  {b}")

    print("\n2. fingerprint of a 50 MB RAW (6048x4032, full-size JPEG preview), median of 5; "
          "ratios to the fingerprint")
    data = big_raw()
    speed = fingerprint_speed(data)
    C.row("metadata (pyexiv2)", f"{speed['metadata']:8.3f} s")
    C.row("fingerprint (preview)", f"{speed['fingerprint']:8.3f} s", "1.00")
    C.row("RAW decoded at half size (LibRaw)", f"{speed['half_decode']:8.3f} s",
          f"{speed['half_decode'] / speed['fingerprint']:.2f}")
    C.row("RAW decoded whole, AHD (LibRaw)", f"{speed['full_decode']:8.3f} s",
          f"{speed['full_decode'] / speed['fingerprint']:.2f}   (once)")
    print(f"  ({len(data) / C.MB:.1f} MB; the goal: well under 2 s, aim 0.2 s)")
    latency = mount_latency(work, data)
    C.row("mount: close() to `fingerprinted`", f"{statistics.median(latency):8.3f} s",
          f"median of {len(latency)}; max {max(latency):.3f} s")

    print("\n3. grouping (media/groups.py): bursts of 10 RAW frames, half with a JPEG")
    for n in (1000, args.images):
        g = grouping_rate(n)
        print(f"  a vault of {g['images']:,} images ({g['groups']:,} groups):")
        C.row("  indexed from scratch", f"{g['images'] / g['scratch']:8.0f} img/s",
              f"{g['scratch']:.2f} s (vaultfs groups)")
        C.row("  1,000 more, one by one", f"{g['rate']:8.0f} img/s",
              "bursts found again every 10 (goal: 20 img/s)")
        C.row("  a rebuild finding nothing new", f"{g['unchanged']:8.3f} s")
    return 0


def mount_latency(work: Path, data: bytes, count: int = 5) -> list[float]:
    """Seconds from close() of a 50 MB RAW in a mount to its `fingerprinted` event."""
    import _common as C
    from vaultfs.client import Vault

    store, mnt = work / "sim-lat-store", work / "sim-lat-mnt"
    C.init_store(store)
    C.mount(store, mnt)
    events: dict[str, float] = {}

    def listen() -> None:
        for e in Vault(mnt).events():
            if e["event"] == "fingerprinted":
                events[e["path"]] = time.monotonic()

    threading.Thread(target=listen, daemon=True).start()
    closed = {}
    try:
        for i in range(-1, count):  # the first (-1) only warms the daemon and the listener
            name = f"DSC_{i:04d}.DNG"
            body = data[:-8] + i.to_bytes(8, "little", signed=True)  # a new file each time
            with open(mnt / name, "wb") as f:
                f.write(body)
            closed[name] = time.monotonic()
            deadline = time.monotonic() + 60
            while name not in events and time.monotonic() < deadline:
                time.sleep(0.01)
        del closed["DSC_-001.DNG"]
    finally:
        C.unmount(mnt)
        shutil.rmtree(store, ignore_errors=True)
    return [events[n] - t for n, t in closed.items() if n in events]


if __name__ == "__main__":
    raise SystemExit(main())
