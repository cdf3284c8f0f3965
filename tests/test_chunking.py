"""Format-aware chunking: a metadata-only edit through the mount, the way photo editors make
it, re-stores the metadata and not the image data, for each format in the corpus."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest

from conftest import CORPUS, needs_fuse
from vaultfs.chunking import boundaries, split_file, structure
from vaultfs.chunking.cdc import FIXED_SIZE

EDITED = ["jpeg/large/Nikon D90.jpg", "jpeg/large/Canon EOS 5D.jpg", "jpeg/medium/mongolels.jpg",
          "jpeg/mpo/frozenpond.mpo", "heic/IMG_3578.heic", "heic/samsung-one-ui-6.heic",
          "dng/colorchart.dng", "raw/GOPR0024.GPR", "tiff/issue-metadata-extractor-152.tif",
          "raw_metadata_only/CanonRaw.cr2", "raw_metadata_only/FujiFilm.raf"]


def _metadata_bytes(path) -> int:
    """The bytes of a file outside its largest piece between its format's cut points (the
    image data): its metadata, previews and thumbnails, as far as chunking can tell."""
    data = path.read_bytes()
    cuts = [0] + [c for c in boundaries(lambda o, n: data[o:o + n], len(data))
                  if c < len(data)] + [len(data)]
    return len(data) - max(b - a for a, b in zip(cuts, cuts[1:]))


def test_malformed_structures_fall_back_to_content_chunking():
    rng = random.Random(2)
    for rel in EDITED:
        data = bytearray((CORPUS / rel).read_bytes())
        for _ in range(30):  # garbage anywhere in the structure: never an exception
            for _ in range(8):
                data[rng.randrange(min(len(data), 65536))] = rng.randrange(256)
            cuts = boundaries(lambda o, n: bytes(data[o:o + n]), len(data))
            assert cuts == sorted(set(cuts)) and all(c > 0 for c in cuts)
    assert boundaries(lambda o, n: b"\xff\xd8\xff" + bytes(n), 10) == []


def test_hostile_structures_cost_nothing():
    """Structures built to make a parser recurse, loop or allocate: answered at once."""
    import struct
    import time

    def box(kind, payload):
        return struct.pack(">I4s", 8 + len(payload), kind) + payload

    # HEIF: 4096 items of 65535 zero-sized extents each.
    iloc = b"\0\0\0\0\0\0" + struct.pack(">H", 4096) + b"".join(
        struct.pack(">HHH", i + 1, 0, 0xFFFF) for i in range(4096))
    heif = box(b"ftyp", b"heic\0\0\0\0") + box(b"meta", b"\0\0\0\0" + box(b"iloc", iloc))
    # MPO: a chain of images whose MPF entries all point at the next one.
    chain, size = b"", 2 + 4 + 4 + 8 + 2 + 12 + 4 + 16 * 16
    for i in range(12):
        ents = b"".join(struct.pack(">IIII", 0, 0, (i + 1) * size - (i * size + 10) if k else 0, 0)
                        for k in range(16))
        body = b"MPF\x00MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + \
            struct.pack(">HHII", 0xB002, 7, 256, 26) + b"\0\0\0\0" + ents
        chain += b"\xff\xd8" + struct.pack(">HH", 0xFFE2, len(body) + 2) + body
    for data in (heif, chain + b"\xff\xd8\xff\xd9"):
        t0 = time.monotonic()
        boundaries(lambda o, n: data[o:o + n], len(data))
        assert time.monotonic() - t0 < 1.0


def _cut(path, step: int, bounds, grids) -> list[tuple[int, bytes]]:
    """The chunks of a file cut in steps of `step` bytes (as a mount ingests a file while it
    is written: the last chunk of each step held back), then to its end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def cut(a: int, b: int, final: bool) -> list[tuple[int, bytes]]:
            return [(o, bytes(c)) for o, c in split_file(f.fileno(), a, b, final, bounds, grids)]
        out, done = [], 0
        for end in range(step, size, step):
            got = cut(done, end, False)
            out += got
            done = got[-1][0] + len(got[-1][1]) if got else done
        return out + cut(done, size, True)


def test_cutting_in_steps_gives_the_chunks_of_cutting_whole(tmp_path):
    """Image data bounded by hard cuts is cut on its grid, image data whose edges are not cuts
    by content: either way, cut in steps as cut whole."""
    path = tmp_path / "f"
    path.write_bytes(random.Random(7).randbytes(12 << 20))
    image = (500_000, 10 << 20)
    for bounds in ([1000, 11 << 20], list(image), []):
        whole = _cut(path, 12 << 20, bounds, [image])
        for step in (3 << 20, 777_777):
            assert _cut(path, step, bounds, [image]) == whole, (bounds, step)
        inside = [o for o, _ in whole if image[0] <= o < image[1]]
        on_grid = inside == list(range(image[0], image[1], FIXED_SIZE))
        assert on_grid == (bounds == list(image)), bounds


def test_image_data_is_cut_on_a_grid_that_moves_with_it(tmp_path):
    """A DNG's uncompressed sensor data is cut every FIXED_SIZE bytes from its start, in steps
    as whole; when an editor grows the header, moving the data, its chunks are found again."""
    def chunks(path, step: int) -> list[tuple[int, bytes]]:
        content = path.read_bytes()
        s = structure(lambda o, n: content[o:o + n], len(content))
        return _cut(path, step, s.cuts, s.grids)

    path = tmp_path / "colorchart.dng"
    shutil.copyfile(CORPUS / "dng/colorchart.dng", path)
    data = path.read_bytes()
    image = structure(lambda o, n: data[o:o + n], len(data)).images[0]
    whole = chunks(path, len(data))
    assert chunks(path, 777_777) == whole
    inside = [c for o, c in whole if image.start <= o < image.end]
    assert [len(c) for c in inside[:-1]] == [FIXED_SIZE] * (len(inside) - 1) and len(inside) > 3
    subprocess.run(["exiftool", "-q", "-q", "-overwrite_original", "-Rating=5",
                    "-XMP:Description=" + "x" * 6000, str(path)], check=True)
    edited = path.read_bytes()
    assert structure(lambda o, n: edited[o:o + n], len(edited)).images[0].start > image.start
    assert set(inside) <= {c for _, c in chunks(path, len(edited))}


@needs_fuse
@pytest.mark.parametrize("rel", EDITED)
def test_a_metadata_edit_restores_only_the_metadata(mnt, rel):
    def stored() -> int:
        return json.loads((mnt / ".vault" / "status.json").read_text())["stored_bytes"]

    f = mnt / os.path.basename(rel)
    shutil.copyfile(CORPUS / rel, f)
    before = stored()
    subprocess.run(["exiftool", "-q", "-q", "-Rating=5", "-XMP:Subject+=eagle",
                    "-overwrite_original", str(f)], check=True)
    grew = stored() - before
    size = f.stat().st_size
    allowed = size // 100 + _metadata_bytes(f)
    print(f"{rel}: {size} bytes, the edit stored {grew} ({grew / size:.1%}), allowed {allowed}")
    assert grew <= allowed
    assert (mnt / ".vault" / "versions" / f.name).is_dir()  # the old one is still there
