"""Image-aware compression through a real mount: every corpus file and a generated uncompressed
DNG read back bit-exact, sensor data takes the predictor codec and JPEG scans do not, damage to
a predictor chunk fails closed, an older store is read as it is and upgraded by a writable
open, and the reader printed in docs/store-format.md reads what vaultfs wrote."""

from __future__ import annotations

import errno
import filecmp
import json
import mmap
import random
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import rawpy
import zstandard

from conftest import CORPUS, needs_fuse, vaultfs
from test_media import _wait
from vaultfs.chunking import structure
from vaultfs.store import Store
from vaultfs.store import format as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import _dng  # noqa: E402  (the benchmark's DNG generator: real DNG structure, sensor noise)

pytestmark = needs_fuse


def make_dng(path: Path, width: int = 1600, height: int = 1200, seed: int = 4) -> np.ndarray:
    still, disc = _dng.scene(width, height, seed)
    samples = _dng.frame(still, disc, 0, seed)
    _dng.write(path, samples)
    return samples


def stored_chunks(store_path: Path, rel: str) -> list[tuple[int, int, int, int]]:
    """(file offset, raw length, codec, stored length) of each chunk of a committed file."""
    with Store.open(store_path) as store, store.reader() as tx:
        node = tx.inode(tx.resolve(rel))
        out = []
        for off, chunk_id, length in tx.extents(node.content):
            value = tx.chunk_data(chunk_id)
            out.append((off, length, value[0], len(value) - 1))
        return out


def test_every_corpus_file_reads_back_bit_exact(make_mount, store_path):
    m = make_mount()
    subprocess.run(["cp", "-a", str(CORPUS), str(m.path / "corpus")], check=True)
    m.stop()
    m = make_mount()  # a fresh daemon: every byte comes back out of the store
    cmp = filecmp.dircmp(CORPUS, m.path / "corpus")
    files = [p for p in CORPUS.rglob("*") if p.is_file()]
    for p in files:
        assert (m.path / "corpus" / p.relative_to(CORPUS)).read_bytes() == p.read_bytes(), p
    assert not cmp.left_only and not cmp.right_only
    m.stop()
    assert "store is clean" in vaultfs("verify", store_path).stdout
    codecs = {c for p in ("corpus/dng/colorchart.dng", "corpus/tiff/001.tif",
                          "corpus/jpeg/large/Nikon D90.jpg")
              for _, _, c, _ in stored_chunks(store_path, p)}
    assert codecs == {F.CODEC_RAW, F.CODEC_ZSTD, F.CODEC_SAMPLES}


def test_an_uncompressed_dng_takes_the_predictor(make_mount, store_path, tmp_path):
    src = tmp_path / "DSC_0001.DNG"
    samples = make_dng(src)
    data = src.read_bytes()
    m = make_mount()
    subprocess.run(["cp", str(src), str(m.path)], check=True)
    m.stop()

    chunks = stored_chunks(store_path, "DSC_0001.DNG")
    [image] = structure(lambda o, n: data[o:o + n], len(data)).images
    in_image = [c for c in chunks if image.start <= c[0] < image.end]
    assert in_image and all(codec == F.CODEC_SAMPLES for _, _, codec, _ in in_image)
    stored = sum(c[3] for c in chunks)
    zstd_whole = len(zstandard.ZstdCompressor(level=3).compress(data))
    assert stored < 0.75 * zstd_whole, (stored / len(data), zstd_whole / len(data))

    m = make_mount()
    assert (m.path / "DSC_0001.DNG").read_bytes() == data
    with rawpy.imread(str(m.path / "DSC_0001.DNG")) as raw:
        assert np.array_equal(raw.raw_image, samples)
    m.stop()


def test_jpeg_scans_are_stored_as_they_are(make_mount, store_path):
    m = make_mount()
    names = ["Nikon D90.jpg", "Canon EOS 5D.jpg", "Sony DSC-H9.jpg"]
    for name in names:
        subprocess.run(["cp", str(CORPUS / "jpeg" / "large" / name), str(m.path)], check=True)
    m.stop()
    for name in names:
        data = (CORPUS / "jpeg" / "large" / name).read_bytes()
        scan = structure(lambda o, n: data[o:o + n], len(data)).cuts[-1]
        in_scan = [c for c in stored_chunks(store_path, name) if c[0] >= scan]
        assert in_scan and all(codec != F.CODEC_SAMPLES for _, _, codec, _ in in_scan), name
        assert sum(c[3] for c in in_scan) > 0.97 * (len(data) - scan)


def test_a_damaged_predictor_chunk_reads_eio_and_verify_names_the_file(make_mount,
                                                                        store_path, tmp_path):
    make_dng(tmp_path / "a.dng", seed=5)
    m = make_mount()
    subprocess.run(["cp", str(tmp_path / "a.dng"), str(m.path)], check=True)
    m.stop()
    with Store.open(store_path) as store, store.reader() as tx:
        node = tx.inode(tx.resolve("a.dng"))
        values = [(off, n, bytes(tx.chunk_data(cid))) for off, cid, n in
                  tx.extents(node.content)]
    off, length, value = next(v for v in values if v[2][0] == F.CODEC_SAMPLES)
    data_mdb = store_path / "lmdb" / "data.mdb"
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        at = mm.find(value[len(value) // 2:len(value) // 2 + 64])
        assert at > 0
        mm[at + 10] ^= 0x40

    m = make_mount()
    with pytest.raises(OSError) as e:
        (m.path / "a.dng").read_bytes()
    assert e.value.errno == errno.EIO
    m.stop(expect_errors=True)
    r = vaultfs("verify", store_path, "--json", check=False)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    [(path, ranges)] = report["damaged_files"].items()
    assert path == "a.dng"
    assert [(rg["offset"], rg["length"]) for rg in ranges] == [(off, length)]
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[at + 10] ^= 0x40  # undone, so that the fixture's final verification passes


def _set_versions(store_path: Path, toml: int, meta: int) -> None:
    path = store_path / "vault.toml"
    text = path.read_text()
    old = next(line for line in text.splitlines() if line.startswith("format_version"))
    path.write_text(text.replace(old, f"format_version = {toml}"))
    env = lmdb.open(str(store_path / "lmdb"), max_dbs=32)
    with env.begin(write=True) as t:
        t.put(F.META_FORMAT, F.u64(meta), db=env.open_db(F.DB_META, txn=t))
    env.close()


def _versions(store_path: Path) -> tuple[str, int]:
    line = next(line for line in (store_path / "vault.toml").read_text().splitlines()
                if line.startswith("format_version"))
    env = lmdb.open(str(store_path / "lmdb"), max_dbs=32, readonly=True)
    with env.begin() as t:
        meta = F.from_u64(t.get(F.META_FORMAT, db=env.open_db(F.DB_META, txn=t)))
    env.close()
    return line, meta


@pytest.mark.parametrize("old", [2, 3])
def test_an_older_store_is_read_as_it_is_and_upgraded_by_a_writable_open(make_mount,
                                                                            store_path, old):
    """Stores of formats 2 and 3 hold only codecs 0 and 1: made here from files that take no
    other, then labelled with the older version."""
    files = {"clip.bin": random.Random(3).randbytes(2_000_000),  # stored raw
             "notes.txt": b"field notes, day 1\n" * 4000}                # zstd
    m = make_mount()
    for name, body in files.items():
        (m.path / name).write_bytes(body)
    m.stop()
    assert {c for n in files for _, _, c, _ in stored_chunks(store_path, n)} <= {0, 1}
    _set_versions(store_path, old, old)
    before = _versions(store_path), (store_path / "lmdb" / "data.mdb").read_bytes()

    figures = json.loads(vaultfs("status", store_path, "--json").stdout)
    assert figures["format_version"] == old and figures["files"] == 2
    assert "store is clean" in vaultfs("verify", store_path).stdout
    assert (_versions(store_path), (store_path / "lmdb" / "data.mdb").read_bytes()) == before

    m = make_mount()  # writable: upgraded before anything else
    assert _versions(store_path) == (f"format_version = {F.FORMAT_VERSION}", F.FORMAT_VERSION)
    for name, body in files.items():
        assert (m.path / name).read_bytes() == body
    m.stop()
    assert f"from store format {old} to {F.FORMAT_VERSION}" in \
        (store_path / "vaultfs.log").read_text()
    assert json.loads(vaultfs("status", store_path, "--json").stdout)["format_version"] == \
        F.FORMAT_VERSION


def test_an_upgrade_cut_between_its_two_steps_is_finished_by_a_writable_open(make_mount,
                                                                             store_path):
    """The database is upgraded first: a crash before vault.toml follows leaves the database
    ahead, which a reader refuses (it cannot tell it from damage) and a writer completes."""
    _set_versions(store_path, 3, F.FORMAT_VERSION)
    r = vaultfs("status", store_path, check=False)
    assert r.returncode != 0 and f"store format {F.FORMAT_VERSION}, not 3" in r.stderr
    make_mount().stop()
    assert _versions(store_path) == (f"format_version = {F.FORMAT_VERSION}", F.FORMAT_VERSION)


def test_the_reader_in_the_format_document_reads_what_vaultfs_wrote(make_mount, store_path,
                                                                      tmp_path):
    doc = (ROOT / "docs" / "store-format.md").read_text()
    appendix = doc[doc.index("## Appendix"):]
    code = appendix[appendix.index("```python\n") + 10:]
    (tmp_path / "reader.py").write_text(code[:code.index("\n```")])
    make_dng(tmp_path / "burst.dng", 800, 600)
    sources = {"burst.dng": tmp_path / "burst.dng",
               "packed.dng": CORPUS / "dng" / "colorchart.dng",
               "rgba.tiff": CORPUS / "tiff" / "Reagan.tiff",
               "grey16.tif": CORPUS / "tiff" / "001.tif",
               "photo.jpg": CORPUS / "jpeg" / "large" / "Nikon D90.jpg"}
    m = make_mount()
    for name, src in sources.items():
        (m.path / name).write_bytes(src.read_bytes())
    m.stop()
    vaultfs("snapshot", store_path, "before")
    m = make_mount()
    (m.path / "burst.dng").write_bytes(b"replaced")
    m.stop()
    codecs = {c for n in sources for _, _, c, _ in stored_chunks(store_path, n)
              if n != "burst.dng"}
    assert F.CODEC_SAMPLES in codecs

    def read(*args: str) -> bytes:
        return subprocess.run([sys.executable, str(tmp_path / "reader.py"), str(store_path),
                               *args], check=True, capture_output=True).stdout

    for name, src in sources.items():
        assert read(name, "before") == src.read_bytes(), name
    assert read("burst.dng") == b"replaced"


def _status(mountpoint: Path) -> dict:
    return json.loads((mountpoint / ".vault" / "status.json").read_text())


def _stored_bytes(store_path: Path, rels: list[str]) -> int:
    return sum(stored for rel in rels for _, _, _, stored in stored_chunks(store_path, rel))


def test_a_tier_of_a_stronger_level_is_recompressed_in_the_background(make_mount, store_path,
                                                                       tmp_path):
    """A select tier with compression = 19: its files' chunks are encoded again at level 19
    by the mount, stored smaller, read back bit-exact, the counters exact (verify clean, as
    after every test), the work noted and not done again at the next mount; a file that
    becomes a select later is recompressed then, and a chunk shared with a general file
    gets the stronger form for both."""
    dng = tmp_path / "frame.dng"
    make_dng(dng, 1200, 900)
    tiff = CORPUS / "tiff" / "issue-metadata-extractor-152.tif"
    m = make_mount()
    keep = m.path / "keep"
    keep.mkdir()
    subprocess.run(["setfattr", "-n", "user.vaultfs.tier", "-v", "select", str(keep)],
                   check=True)
    subprocess.run(["cp", str(dng), str(tiff), str(keep)], check=True)
    (m.path / "later").mkdir()
    subprocess.run(["cp", str(CORPUS / "tiff" / "001.tif"), str(dng), str(m.path / "later")],
                   check=True)
    m.stop()  # ingested at the default level, the tier policy not set yet
    selects = ["keep/frame.dng", "keep/" + tiff.name]
    before = _stored_bytes(store_path, selects)
    later_before = _stored_bytes(store_path, ["later/001.tif"])
    toml = store_path / "vault.toml"
    policy = toml.read_text()
    (tmp_path / "mp").mkdir()
    for bad in ("20", "0", "true", '"max"'):  # a level zstd has not: the mount does not start
        toml.write_text(policy.replace('name = "select"', f'name = "select"\ncompression = {bad}'))
        r = vaultfs("mount", store_path, tmp_path / "mp", check=False)
        assert r.returncode == 2 and "tier select: compression must be a zstd level from 1 to 19" \
            in r.stderr, r.stderr
    toml.write_text(policy.replace('name = "select"', 'name = "select"\ncompression = 19'))

    m = make_mount()
    done = lambda: _status(m.path)["tiers"]["select"].get("recompressed") == {"19": 2}  # noqa
    _wait(done, "the select tier recompressed at level 19", 180)
    after = _stored_bytes(store_path, selects)
    assert after < before * 0.99, (before, after)
    # The general copy of the frame shares its chunks: it reads the stronger form, exactly.
    assert (m.path / "later" / "frame.dng").read_bytes() == dng.read_bytes()
    assert "zstd level 19: 2 recompressed" in vaultfs("status", store_path).stdout
    # A file that becomes a select later is recompressed then.
    subprocess.run(["setfattr", "-n", "user.vaultfs.tier", "-v", "select",
                    str(m.path / "later" / "001.tif")], check=True)
    _wait(lambda: _status(m.path)["tiers"]["select"].get("recompressed") == {"19": 3},
          "the new select recompressed", 180)
    assert _stored_bytes(store_path, ["later/001.tif"]) < later_before
    m.stop()

    m = make_mount()  # a fresh daemon: the bytes come out of the store; nothing redone
    assert (m.path / "keep" / "frame.dng").read_bytes() == dng.read_bytes()
    assert (m.path / "keep" / tiff.name).read_bytes() == tiff.read_bytes()
    assert (m.path / "later" / "001.tif").read_bytes() == \
        (CORPUS / "tiff" / "001.tif").read_bytes()
    time.sleep(25)  # two rounds of looking for work
    m.stop()
    assert "recompressed" not in m.log.read_text()
    assert _stored_bytes(store_path, selects) == after
    r = vaultfs("verify", store_path)
    assert r.returncode == 0
