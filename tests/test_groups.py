"""Fingerprints, previews and groups: the labelled set of tools/bench/similarity.py copied
into a real mount and judged kind by kind, .vault/bursts and .vault/previews read with ls,
cp -a, find and exiftool, and images no decoder reads."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CORPUS, needs_fuse, vaultfs
from vaultfs.chunking import formats
from vaultfs.media import fingerprint, groups
from vaultfs.media.catalog import FINGERPRINT_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import _images as I  # noqa: E402
import similarity  # noqa: E402

# Precision and recall measured on the labelled set (python tools/bench/similarity.py): the
# set is made the same way every time, so these are quality levels the code must keep.
MEASURED = {"duplicate": (1.0, 1.0), "pair": (1.0, 1.0), "near": (0.956, 1.0),
            "burst": (1.0, 1.0), "bracket": (1.0, 1.0), "edit": (1.0, 0.889)}


def _wait(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _analysed(store: Path, count: int) -> None:
    def done() -> bool:
        found = json.loads(vaultfs("find", store, "--json").stdout)
        return sum(1 for f in found if similarity._done(f["metadata"])) >= count
    _wait(done, f"{count} files analysed", timeout=180)


# ---- the pure parts ----------------------------------------------------------------------------
def test_fingerprints_and_previews_of_camera_files():
    jpeg = (CORPUS / "jpeg" / "large" / "Nikon D90.jpg").read_bytes()
    fp = fingerprint.fingerprint(jpeg)
    assert fp["format"] == "jpeg" and fp["picture"] == [4288, 2848]
    assert fp["preview"] == [0, len(jpeg)]  # a JPEG is its own preview
    # A RAW's embedded JPEG is found where it lies in the file, and an upright RAW (EXIF
    # orientation 6) fingerprints as the same picture turned upright and saved as a JPEG.
    img = I.scene(3, (960, 640))
    data, span = I.dng(img, I.Capture(), orientation=6)
    raw = fingerprint.fingerprint(data)
    assert raw["format"] == "raw" and raw["preview"] == list(span)
    assert raw["picture"] == [640, 960]
    # Read without its sensor data (zeros, as the mount's analyser reads it), the preview is
    # still found, only outside what was left unread: one that overlaps it is none.
    unread = [(i.start, i.end - i.start) for i in
              formats.structure(lambda off, n: data[off:off + n], len(data)).images]
    blank = bytearray(data)
    for off, n in unread:
        blank[off:off + n] = bytes(n)
    assert unread and fingerprint.preview_fingerprint(bytes(blank), unread) == raw
    assert fingerprint.preview_fingerprint(bytes(blank), unread + [(sum(span) - 1, 1)]) is None
    upright = fingerprint.fingerprint(I.jpeg(img.rotate(-90, expand=True), 80))
    assert _distance(raw, upright) <= 4
    assert _distance(raw, fingerprint.fingerprint(I.jpeg(I.scene(4, (960, 640))))) > 26
    heic = fingerprint.fingerprint((CORPUS / "heic" / "IMG_2682.heic").read_bytes())
    assert heic["format"] == "heif" and "preview" not in heic
    for bad, why in ((jpeg[:len(jpeg) // 2], "truncated"), (b"\x00garbage" * 500, "LibRaw"),
                     ((CORPUS / "raw" / "GOPR0024.GPR").read_bytes(), "Unsupported"),
                     ((CORPUS / "jpeg" / "makernotes_small" / "Canon.jpg").read_bytes(),
                      "too small")):
        with pytest.raises(fingerprint.FingerprintError, match=why):
            fingerprint.fingerprint(bad)


def _distance(a: dict, b: dict) -> int:
    return groups.distance(groups.item(0, "a", 0, a), groups.item(1, "b", 0, b))


def test_the_group_index_is_the_same_however_it_was_reached():
    """Files added, moved and taken out in any order leave the groups a fresh index finds."""
    rng = random.Random(5)
    files, t = [], 1.8e9
    for i in range(160):
        scene = random.Random(rng.randrange(6)).getrandbits(64)
        t += rng.choice((0.2, 0.2, 0.2, 40)) if i % 2 == 0 else 0  # RAW+JPEG: one capture
        raw = bool(i % 2)
        record = {"kind": "image", "digest": f"{i % 97:032x}", "format": "raw" if raw else "jpeg",
                  "fingerprint": {"phash": f"{scene ^ (1 << rng.randrange(64)):016x}",
                                  "whash": f"{scene:016x}"},
                  "picture": [6000, 4000], "capture_time": similarity._iso(t),
                  "make": "VaultCam", "model": f"VC-{i // 80}", "exposure_time": "1/250",
                  "fnumber": 8, "iso": 100, "exposure_bias": [0, -1, 1][i // 2 % 3]
                  if 40 <= i < 60 else 0}
        files.append((i, f"d{i // 2 % 3}/IMG_{i // 2:04d}.{'NEF' if raw else 'JPG'}", i, record))
    fresh = groups.GroupIndex()
    fresh.update(files)
    churned = groups.GroupIndex()
    churned.update([(k, p, v, {}) for k, p, v, r in files])  # committed, not analysed yet
    churned.update(rng.sample(files, 100))
    moved = [(k, f"elsewhere/{k}.JPG", v + 1000, r) for k, p, v, r in rng.sample(files, 60)]
    churned.update(moved + rng.sample(files, 50))
    churned.update(files)
    assert [(g.kind, g.paths) for g in churned.groups()] == \
        [(g.kind, g.paths) for g in fresh.groups()]
    assert {g.kind for g in fresh.groups()} >= {"duplicate", "pair", "burst", "bracket", "near"}


# ---- through a mount ---------------------------------------------------------------------------
@needs_fuse
def test_labelled_set_is_grouped_as_measured(make_mount, store_path, tmp_path):
    labels = similarity.labelled_set(tmp_path / "set")
    files = [p for p in (tmp_path / "set").rglob("*") if p.is_file()]
    m = make_mount()
    events: list[dict] = []

    def listen() -> None:
        from vaultfs.client import Vault
        try:
            for e in Vault(m.path).events():
                events.append(e)
        except OSError:  # the mount went away at the end of the test
            pass

    threading.Thread(target=listen, daemon=True).start()
    probe = m.path / "probe.txt"  # written until the listener hears of it: it listens
    _wait(lambda: probe.write_text("x") and any(e["path"] == "probe.txt" for e in events),
          "the listener")
    subprocess.run(["cp", "-a", f"{tmp_path / 'set'}/.", str(m.path)], check=True)
    _analysed(store_path, len(files) + 1)
    found = json.loads(vaultfs("groups", store_path, "--json").stdout)
    scores = similarity.score(labels, found)
    for kind, (precision, recall) in MEASURED.items():
        assert scores[kind]["precision"] >= precision - 1e-3, (kind, scores[kind])
        assert scores[kind]["recall"] >= recall - 1e-3, (kind, scores[kind])

    # .vault/bursts: one folder per burst and bracket, its files under their names.
    bursts = m.path / ".vault" / "bursts"
    sequences = {g["name"]: g for g in found if g["kind"] in ("burst", "bracket")}
    def listed_as_found() -> bool:  # (the mount rebuilds its catalogue in the background)
        return set(os.listdir(bursts)) == set(sequences) and all(
            sorted(os.listdir(bursts / name)) == sorted(Path(p).name for p in g["files"])
            for name, g in sequences.items())
    _wait(listed_as_found, "the bursts view")
    burst = next(g for g in found if g["kind"] == "burst" and "raw/DSC_0200.DNG" in g["files"])
    assert (bursts / burst["name"] / "DSC_0200.DNG").read_bytes() == \
        (m.path / "raw" / "DSC_0200.DNG").read_bytes()
    subprocess.run(["cp", "-a", str(bursts), str(tmp_path / "copied")], check=True)
    assert sorted(os.listdir(tmp_path / "copied" / burst["name"])) == \
        sorted(Path(p).name for p in burst["files"])
    listed = subprocess.run(["find", str(bursts), "-type", "f"], capture_output=True,
                            text=True, check=True).stdout.split("\n")
    assert len([f for f in listed if f]) == sum(len(g["files"]) for g in sequences.values())

    # .vault/previews: the embedded JPEG, byte for byte as exiftool extracts it.
    preview = m.path / ".vault" / "previews" / "raw" / "DSC_0101.DNG.jpg"
    extracted = subprocess.run(["exiftool", "-b", "-PreviewImage",
                                str(m.path / "raw" / "DSC_0101.DNG")],
                               capture_output=True, check=True).stdout
    assert preview.read_bytes() == extracted and extracted.startswith(b"\xff\xd8\xff")
    info = subprocess.run(["exiftool", "-s3", "-ImageSize", str(preview)], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert info == "1024x680"
    assert "DSC_0101.JPG.jpg" in os.listdir(preview.parent)  # a JPEG is its own preview
    assert not (m.path / ".vault" / "previews" / "corpus" / "bursts" /
                "gopro_fusion_pair").exists()  # no preview in them: no folder
    with pytest.raises(OSError):
        preview.write_bytes(b"no")

    # The commands: similar, for a file in the vault and for one outside it.
    near = json.loads(vaultfs("similar", store_path, "raw/DSC_0101.DNG", "--json").stdout)
    kinds = {f["path"]: set(f["groups"]) for f in near["similar"]}
    assert kinds["raw/DSC_0101.JPG"] >= {"pair", "near"}
    assert "near" in kinds["exports/web/DSC_0101_web.jpg"]
    outside = json.loads(vaultfs("similar", store_path, CORPUS / "jpeg" / "medium" /
                                 "canon_hdr_YES.jpg", "--json").stdout)
    # (the same bytes: a duplicate, the same picture, and a frame of the vault copy's burst)
    assert {"path": "corpus/jpeg/medium/canon_hdr_YES.jpg", "distance": 0,
            "groups": ["burst", "duplicate", "near"]} in outside["similar"]
    table = vaultfs("groups", store_path, "--kind", "bracket").stdout
    assert "corpus/bursts/bracket_canon5dmk2_frobisher/IMG_2602.jpg" in table
    assert "canon_hdr" not in table

    # Listeners heard of each fingerprint, and of files joining bursts.
    _wait(lambda: any(e["event"] == "burst" for e in events), "a burst event")
    heard = {e["path"] for e in events if e["event"] == "fingerprinted" and "phash" in e}
    assert "raw/DSC_0101.DNG" in heard
    joined = {e["path"]: e for e in events if e["event"] == "burst"}
    assert all(e["kind"] in ("burst", "bracket") and e["files"] >= 2 for e in joined.values())


@needs_fuse
def test_views_follow_new_frames_without_a_remount(make_mount, store_path):
    m = make_mount()
    shoot = m.path / "shoot"
    shoot.mkdir()
    cam = dict(make="VaultCam", model="VC-1", serial="9")

    def frame(i: int) -> None:
        data, _ = I.dng(I.scene(7, (640, 424), i), similarity._capture(3_000_000 + 20 * i, cam))
        (shoot / f"F_{i}.DNG").write_bytes(data)

    frame(0)
    frame(1)
    bursts = m.path / ".vault" / "bursts"
    group = _wait(lambda: os.listdir(bursts), "a burst of two frames")[0]
    assert sorted(os.listdir(bursts / group)) == ["F_0.DNG", "F_1.DNG"]
    frame(2)
    _wait(lambda: os.listdir(bursts / group) == ["F_0.DNG", "F_1.DNG", "F_2.DNG"],
          "the third frame in the burst")
    (shoot / "F_1.DNG").unlink()
    _wait(lambda: os.listdir(bursts / group) == ["F_0.DNG", "F_2.DNG"], "the deleted frame gone")
    assert os.listdir(m.path / ".vault" / "previews" / "shoot") == ["F_0.DNG.jpg", "F_2.DNG.jpg"]


@needs_fuse
def test_an_image_no_decoder_reads_is_stored_and_listed(make_mount, store_path):
    m = make_mount()
    good = (CORPUS / "jpeg" / "medium" / "jolla.jpg").read_bytes()
    bad = {"truncated.jpg": good[:len(good) // 3],
           "garbage.NEF": random.Random(1).randbytes(300_000),
           "tiff-header.tif": b"II*\x00\x08\x00\x00\x00" + b"\xff" * 5000}
    for name, data in bad.items():
        (m.path / name).write_bytes(data)
    (m.path / "jolla.jpg").write_bytes(good)
    _analysed(store_path, 4)
    for name, data in bad.items():
        assert (m.path / name).read_bytes() == data
    assert sorted(os.listdir(m.path)) == sorted([*bad, "jolla.jpg"])
    meta = {f["path"]: f["metadata"] for f in json.loads(vaultfs("find", store_path,
                                                                 "--json").stdout)}
    for name in bad:
        assert "fingerprint" not in meta[name] and meta[name].get("fingerprint_error"), name
    assert "fingerprint" in meta["jolla.jpg"]
    assert os.listdir(m.path / ".vault" / "previews") == ["jolla.jpg.jpg"]
    m.stop()
    m = make_mount()  # a remount neither reads them again nor logs them again
    assert os.listdir(m.path / ".vault" / "previews") == ["jolla.jpg.jpg"]
    m.stop()
    log = (store_path / "vaultfs.log").read_text()
    for name in bad:
        assert log.count(f"cannot fingerprint /{name}: ") == 1, name


def _decompression_bomb() -> bytes:
    """A progressive JPEG of a few hundred bytes that says it is 13000 x 13000 pixels: its
    decoder allocates the coefficients of all of them before it finds the data missing."""
    import io
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(out, "JPEG", progressive=True)
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc2")  # SOF2: length, precision, height, width
    data[sof + 5:sof + 9] = (13000).to_bytes(2, "big") * 2
    return bytes(data)


@needs_fuse
def test_a_decompression_bomb_costs_its_own_record_not_the_mount(make_mount, store_path):
    m = make_mount()

    def peak_kib() -> int:
        status = (Path("/proc") / str(m.proc.pid) / "status").read_text()
        return int(next(v for v in status.splitlines() if v.startswith("VmHWM")).split()[1])
    good = (CORPUS / "jpeg" / "medium" / "jolla.jpg").read_bytes()
    (m.path / "jolla.jpg").write_bytes(good)
    _analysed(store_path, 1)
    before = peak_kib()
    bomb = _decompression_bomb()  # read in the mount's own process, it took ~450 MB more
    (m.path / "pano.jpg").write_bytes(bomb)
    _analysed(store_path, 2)
    assert peak_kib() - before < 150 * 1024, "the mount's own memory grew by the bomb"
    meta = {f["path"]: f["metadata"] for f in json.loads(vaultfs("find", store_path,
                                                                 "--json").stdout)}
    assert "fingerprint" in meta["jolla.jpg"]
    assert (m.path / "pano.jpg").read_bytes() == bomb  # stored bit-exact all the same
    # The worker reading images yields the CPU to commits: a capture the machine cannot keep
    # up with queues its fingerprints instead of slowing down.
    workers = [Path("/proc", c) for t in Path(f"/proc/{m.proc.pid}/task").glob("*/children")
               for c in t.read_text().split()  # (a thread's children are listed by it)
               if b"spawn_main" in Path("/proc", c, "cmdline").read_bytes()]
    nice = [int((w / "stat").read_text().rsplit(")", 1)[1].split()[16]) for w in workers]
    assert nice == [19], f"the image reader runs at nice {nice}"
    m.stop()


@needs_fuse
def test_records_from_before_fingerprints_are_completed_at_mount(make_mount, store_path):
    from vaultfs.store import Store

    m = make_mount()
    shutil.copy(CORPUS / "jpeg" / "medium" / "mongolels.jpg", m.path / "a.jpg")
    _analysed(store_path, 1)
    m.stop()
    with Store.open(store_path, writable=True) as store:  # a record as vaultfs wrote it before
        with store.reader() as tx:
            node = tx.inode(tx.resolve("a.jpg"))
            record = tx.media(node.content)
        old = {k: v for k, v in record.items() if k not in FINGERPRINT_KEYS}
        store.write(lambda tx: tx.put_media(node.content, old))
    find = lambda: json.loads(vaultfs("find", store_path, "--json").stdout)[0]["metadata"]  # noqa
    assert "fingerprint" not in find() and find()["rating"] == 3
    m = make_mount()
    _wait(lambda: "fingerprint" in find(), "the backlog fingerprints the file")
    assert find()["fingerprint"] == record["fingerprint"] and find()["rating"] == 3


def test_a_raw_is_analysed_without_decoding_its_sensor_data_and_the_record_is_the_same(
        make_mount, tmp_path):
    """A DNG with a JPEG preview is analysed without its sensor data (codec-2 chunks left
    undecoded), and its record is what its whole bytes give; a DNG without a preview and a
    16-bit TIFF, whose pictures are their samples, are read whole."""
    from vaultfs.media import metadata
    from vaultfs.store import Store
    import _dng

    still, disc = _dng.scene(1600, 1200, seed=9)
    for name, preview in (("with.dng", 800), ("without.dng", 0)):
        _dng.write(tmp_path / name, _dng.frame(still, disc, 0, seed=9), preview=preview)
    shutil.copyfile(CORPUS / "tiff" / "issue-metadata-extractor-152.tif", tmp_path / "scan.tif")
    m = make_mount()
    status = m.path / ".vault" / "status.json"
    skipped = []
    for name in ("with.dng", "without.dng", "scan.tif"):
        before = json.loads(status.read_text())["analysis"]
        shutil.copyfile(tmp_path / name, m.path / name)
        after = _wait(lambda: (s := json.loads(status.read_text())["analysis"])["files"]
                      > before["files"] and s, f"{name} analysed")
        skipped.append(after["samples_not_decoded_bytes"] - before["samples_not_decoded_bytes"])
    m.stop()
    # Nearly all of the first DNG was left undecoded; the others were read whole.
    assert skipped[0] > 0.9 * 1600 * 1200 * 2 and skipped[1:] == [0, 0]
    with Store.open(m.store) as store, store.reader() as tx:
        for name in ("with.dng", "without.dng", "scan.tif"):
            data = (tmp_path / name).read_bytes()
            want = {**metadata.read(data), **fingerprint.image_record(data)}
            got = tx.media(tx.inode(tx.resolve(name)).content)
            assert got == json.loads(json.dumps(want)), name
            assert ("preview" in got) == (name == "with.dng")
