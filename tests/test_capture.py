"""On-capture policies (vault.toml [[capture]]) through a real mount: a new image gets an XMP
sidecar with the policy's copyright, creator, keywords and session (read back by exiftool and
by the vault's own index), its bytes untouched; a rename template moves it only when a policy
has one; a sidecar already there is left alone; a bad policy stops the mount with a reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from PIL import Image

from conftest import CORPUS, needs_fuse, vaultfs
from vaultfs.fs import capture as capture_mod
from vaultfs.fs.capture import QUIET_S, CapturePolicies
from vaultfs.store import Store
from test_events import _listen, _until

pytestmark = needs_fuse

JPEG = CORPUS / "jpeg" / "medium" / "canon_hdr_NO.jpg"   # Canon PowerShot SX60 HS, 2015-...
JPEG2 = CORPUS / "jpeg" / "medium" / "canon_hdr_YES.jpg"
NEF = CORPUS / "raw_metadata_only" / "Nikon.nef"   # NIKON D70, header only


def add_policy(store, text: str) -> None:
    with open(store / "vault.toml", "a") as f:
        f.write("\n" + text.strip() + "\n")


def mount_with(store, make_mount, policy: str):
    """The store mounted with `policy` added to its vault.toml, and `vaultfs events` on it:
    (mount point, events process, the events seen)."""
    add_policy(store, policy)
    mnt = make_mount().path
    return (mnt, *_listen(mnt))


RENAME_ANYWHERE = '''
[[capture]]
folder = ""
rename = "{camera}_{seq}{ext}"
creator = "Ana Lima"
'''


def exif(path, *tags: str) -> dict:
    out = subprocess.run(["exiftool", "-j", "-struct", *[f"-{t}" for t in tags], str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def test_a_capture_in_a_policy_folder_gets_a_sidecar_with_the_metadata(store_path,
                                                                       make_mount):
    add_policy(store_path, '''
[[capture]]
folder = "weddings"
copyright = "(c) 2026 Ana Lima"
creator = "Ana Lima"
keywords = ["wedding", "Ana & Tom"]
session = "Ana & Tom, Sintra"
''')
    mnt = make_mount().path
    (mnt / "weddings").mkdir()
    (mnt / "elsewhere").mkdir()
    shutil.copyfile(JPEG, mnt / "weddings" / "IMG_0001.jpg")
    shutil.copyfile(JPEG, mnt / "elsewhere" / "IMG_0001.jpg")
    sidecar = mnt / "weddings" / "IMG_0001.xmp"
    _until(sidecar.exists)
    got = exif(sidecar, "XMP-dc:Rights", "XMP-dc:Creator", "XMP-dc:Subject",
               "XMP-photoshop:TransmissionReference")
    assert got["Rights"] == "(c) 2026 Ana Lima" and got["Creator"] == ["Ana Lima"]
    assert got["Subject"] == ["wedding", "Ana & Tom"]
    assert got["TransmissionReference"] == "Ana & Tom, Sintra"
    assert (mnt / "weddings" / "IMG_0001.jpg").read_bytes() == JPEG.read_bytes()
    time.sleep(2)  # (the other file's policy check has long been made)
    assert sorted(p.name for p in (mnt / "elsewhere").iterdir()) == ["IMG_0001.jpg"]
    # The vault's own index links the sidecar to its image: its keywords are the image's.
    _until(lambda: "weddings/IMG_0001.jpg" in [f["path"] for f in json.loads(vaultfs(
        "find", "--json", store_path, "--keyword", "wedding").stdout)])
    assert "elsewhere/IMG_0001.jpg" not in vaultfs("find", store_path, "--keyword",
                                                   "wedding").stdout


def test_a_rename_template_moves_captures_only_when_a_policy_asks(store_path, make_mount):
    mnt, proc, got = mount_with(store_path, make_mount, '''
[[capture]]
folder = "tethered"
rename = "{date}/{camera}_{seq}{ext}"
creator = "Ana Lima"
''')
    (mnt / "tethered").mkdir()
    (mnt / "tethered" / "IMG_0042.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    shutil.copyfile(JPEG, mnt / "tethered" / "IMG_0042.jpg")
    shutil.copyfile(JPEG2, mnt / "tethered" / "IMG_0043.jpg")
    captured = exif(JPEG, "DateTimeOriginal")["DateTimeOriginal"][:10].replace(":", "-")
    folder = mnt / "tethered" / captured
    names = ["Canon-PowerShot-SX60-HS_0001", "Canon-PowerShot-SX60-HS_0002"]
    _until(lambda: folder.exists() and len(list(folder.iterdir())) == 4)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [n + ".jpg" for n in names] + [n + ".xmp" for n in names])
    first = next(n for n in names if (folder / (n + ".jpg")).read_bytes() == JPEG.read_bytes())
    second = next(n for n in names if n != first)
    assert (folder / (second + ".jpg")).read_bytes() == JPEG2.read_bytes()
    # The photographer's own sidecar went with its image, unchanged; the other image got the
    # policy's.
    assert (folder / (first + ".xmp")).read_text() == "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    assert exif(folder / (second + ".xmp"), "XMP-dc:Creator")["Creator"] == ["Ana Lima"]
    assert [p.name for p in (mnt / "tethered").iterdir()] == [captured]
    _until(lambda: sum(e["event"] == "renamed" for e in got) == 3)
    proc.terminate()
    assert {e["from"] for e in got if e["event"] == "renamed"} == {
        "tethered/IMG_0042.jpg", "tethered/IMG_0042.xmp", "tethered/IMG_0043.jpg"}


def test_a_bad_capture_policy_stops_the_mount_with_a_reason(tmp_path, store_path):
    add_policy(store_path, '''
[[capture]]
tier = "select"
rename = "{date}/{camera}{ext}"
''')
    (tmp_path / "m").mkdir()
    r = vaultfs("mount", store_path, tmp_path / "m", check=False)
    assert r.returncode == 2 and "must be a relative path" in r.stderr and "{seq}" in r.stderr
    toml = store_path / "vault.toml"
    toml.write_text(toml.read_text().replace('rename = "{date}/{camera}{ext}"', "preview = 10"))
    r = vaultfs("mount", store_path, tmp_path / "m", check=False)
    assert r.returncode == 2 and "preview must be the long side" in r.stderr


def test_imported_files_get_the_metadata_but_keep_the_import_layout(tmp_path, store_path,
                                                                    make_mount):
    add_policy(store_path, '''
[[capture]]
folder = ""
rename = "{camera}_{seq}{ext}"
copyright = "(c) 2026 Ana Lima"
''')
    card = tmp_path / "card" / "DCIM" / "100CANON"
    card.mkdir(parents=True)
    shutil.copyfile(JPEG, card / "IMG_0001.JPG")
    mnt = make_mount().path
    report = json.loads(vaultfs("import", "--json", store_path, tmp_path / "card").stdout)
    assert report["safe_to_format"]
    image = mnt / report["files"][0]["vault_path"]
    _until(image.with_suffix(".xmp").exists)
    assert exif(image.with_suffix(".xmp"), "XMP-dc:Rights")["Rights"] == "(c) 2026 Ana Lima"
    assert image.read_bytes() == JPEG.read_bytes()
    assert sorted(p.name for p in image.parent.iterdir()) == ["IMG_0001.JPG", "IMG_0001.xmp"]


def test_an_edit_saved_as_a_new_file_is_no_capture(store_path, make_mount):
    mnt, proc, got = mount_with(store_path, make_mount, RENAME_ANYWHERE)
    shutil.copyfile(JPEG, mnt / "IMG_0001.JPG")
    first, second = "Canon-PowerShot-SX60-HS_0001", "Canon-PowerShot-SX60-HS_0002"
    _until((mnt / f"{first}.xmp").exists)
    (mnt / f"{first}.xmp").unlink()  # the photographer does not want it
    # exiftool's two ways of saving: a new file renamed over the photo, and the photo moved
    # aside (to <name>_original) before the new file takes its name. Neither is a capture: the
    # photo keeps its name and gets no sidecar again.
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-Rating=5", mnt / f"{first}.JPG"],
                   check=True)
    subprocess.run(["exiftool", "-q", "-Rating=3", mnt / f"{first}.JPG"], check=True)
    # A capture after the edits is judged after them: once it has its name, they were judged.
    shutil.copyfile(JPEG2, mnt / "IMG_0002.JPG")
    _until((mnt / f"{second}.xmp").exists)
    assert sorted(os.listdir(mnt)) == [f"{first}.JPG", f"{first}.JPG_original", f"{second}.JPG",
                           f"{second}.xmp"]
    assert exif(mnt / f"{first}.JPG", "Rating")["Rating"] == 3
    assert exif(mnt / f"{first}.JPG_original", "Rating")["Rating"] == 5
    proc.terminate()  # (exiftool's own renames are announced too)
    assert {e["path"] for e in got if e["event"] == "renamed"} == {
        f"{first}.JPG", f"{first}.JPG_original", f"{second}.JPG"}


def test_a_capture_is_left_to_its_writer_until_it_is_done(store_path, make_mount):
    # Tethering software writes under a temporary name, fsyncs, closes a moment later and
    # renames the file into place: the policy waits for all of it.
    mnt, proc, got = mount_with(store_path, make_mount, RENAME_ANYWHERE)
    tmp = mnt / "IMG_0003.JPG.tmp"
    with open(tmp, "wb") as f:
        f.write(JPEG.read_bytes())
        f.flush()
        os.fsync(f.fileno())
        _until(lambda: ("analysed", tmp.name) in {(e["event"], e["path"]) for e in got})
        time.sleep(QUIET_S + 1)  # still open: not its turn, however long
        assert sorted(os.listdir(mnt)) == [tmp.name]
    time.sleep(QUIET_S + 1)  # closed, but under a temporary name
    assert sorted(os.listdir(mnt)) == [tmp.name]
    os.rename(tmp, mnt / "IMG_0003.JPG")
    name = "Canon-PowerShot-SX60-HS_0001"
    _until((mnt / f"{name}.xmp").exists)
    assert sorted(os.listdir(mnt)) == [f"{name}.JPG", f"{name}.xmp"]
    assert (mnt / f"{name}.JPG").read_bytes() == JPEG.read_bytes()
    proc.terminate()
    assert [e["from"] for e in got if e["event"] == "renamed"] == [tmp.name, "IMG_0003.JPG"]


def test_the_files_of_one_shot_keep_one_number(tmp_path, store_path, make_mount):
    add_policy(store_path, '''
[[capture]]
folder = ""
rename = "shot_{seq}{ext}"
''')
    # Shot 1 a JPEG alone; shots 2 and 3 a RAW and its JPEG each, taken in one second, the
    # RAW written first for shot 2 and last for shot 3.
    shots = {"IMG_0001.JPG": (JPEG, "09:15:12"), "IMG_0002.NEF": (NEF, "09:15:40"),
             "IMG_0002.JPG": (JPEG2, "09:15:40"), "IMG_0003.JPG": (JPEG, "09:16:05"),
             "IMG_0003.NEF": (NEF, "09:16:05")}
    for name, (source, when) in shots.items():
        shutil.copyfile(source, tmp_path / name)
        subprocess.run(["exiftool", "-m", "-q", "-overwrite_original",
                        f"-AllDates=2026:11:24 {when}", tmp_path / name], check=True)
    mnt = make_mount().path
    for i, name in enumerate(shots, 1):
        shutil.copyfile(tmp_path / name, mnt / name)
        _until(lambda: len([n for n in sorted(os.listdir(mnt)) if n.startswith("shot_")]) == i)
    assert sorted(os.listdir(mnt)) == ["shot_0001.JPG", "shot_0002.JPG", "shot_0002.NEF", "shot_0003.JPG",
                           "shot_0003.NEF"]
    for name, new in (("IMG_0002.NEF", "shot_0002.NEF"), ("IMG_0003.JPG", "shot_0003.JPG")):
        assert (mnt / new).read_bytes() == (tmp_path / name).read_bytes()


def test_the_tethering_softwares_own_sidecar_always_wins(store_path, make_mount):
    mnt, proc, got = mount_with(store_path, make_mount, '''
[[capture]]
folder = ""
creator = "Ana Lima"
''')
    own = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/><!-- the tethering software's -->"

    def write_own(side) -> None:  # as tethering software does: create or empty, no O_EXCL
        fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, own)
        os.close(fd)

    def seen(event: str, path: str) -> bool:
        return (event, path) in {(e["event"], e["path"]) for e in got}

    # Soon after each image: once the vault has read it, when the policy used to write its own.
    for i in range(20):
        image = mnt / f"IMG_{i:04d}.JPG"
        image.write_bytes(JPEG.read_bytes())
        assert not image.with_suffix(".xmp").exists()  # (the kernel caches "no such file")
        _until(lambda: seen("analysed", image.name))
        write_own(image.with_suffix(".xmp"))
    # Long after: over the policy's sidecar, in place or by a rename.
    for name in ("IMG_0100", "IMG_0101"):
        (mnt / f"{name}.JPG").write_bytes(JPEG.read_bytes())
        _until((mnt / f"{name}.xmp").exists)
        assert exif(mnt / f"{name}.xmp", "XMP-dc:Creator")["Creator"] == ["Ana Lima"]
    write_own(mnt / "IMG_0100.xmp")
    write_own(mnt / "IMG_0101.xmp.tmp")
    os.rename(mnt / "IMG_0101.xmp.tmp", mnt / "IMG_0101.xmp")
    # A capture after all of them is judged after them.
    (mnt / "IMG_0200.JPG").write_bytes(JPEG.read_bytes())
    _until((mnt / "IMG_0200.xmp").exists)
    proc.terminate()
    for i in [*range(20), 100, 101]:
        assert (mnt / f"IMG_{i:04d}.xmp").read_bytes() == own, i


HEIC = CORPUS / "heic" / "IMG_3578.heic"                        # iPhone XR, 4032x3024
TIFF16 = CORPUS / "tiff" / "issue-metadata-extractor-152.tif"   # 16-bit grey, 1280x964


def test_images_without_a_large_enough_jpeg_get_a_generated_preview(store_path, make_mount):
    add_policy(store_path, '''
[[capture]]
folder = "proxies"
preview = 1024
''')
    m = make_mount()
    mnt, previews = m.path, m.path / ".vault" / "previews"
    for folder in ("plain", "proxies"):  # (the analyser and the previews go in this order)
        (mnt / folder).mkdir()
        shutil.copyfile(HEIC, mnt / folder / "IMG_3578.heic")
        shutil.copyfile(TIFF16, mnt / folder / "scan.tif")
        shutil.copyfile(JPEG, mnt / folder / "IMG_0001.jpg")
    (mnt / "proxies" / "bad.tif").write_bytes(TIFF16.read_bytes()[:3000])  # truncated
    for name, size in (("IMG_3578.heic", (1024, 768)), ("scan.tif", (1024, 771))):
        made = previews / "proxies" / f"{name}.jpg"
        _until(made.exists, timeout=60)
        with Image.open(made) as img:
            assert img.format == "JPEG" and img.size == size
            img.load()
        got = exif(made, "FileType", "ImageWidth", "ImageHeight")
        assert (got["FileType"], got["ImageWidth"], got["ImageHeight"]) == ("JPEG", *size)
    # A JPEG is its own preview; without a policy, nothing is generated.
    _until((previews / "proxies" / "IMG_0001.jpg.jpg").exists)
    assert (previews / "proxies" / "IMG_0001.jpg.jpg").read_bytes() == JPEG.read_bytes()
    assert sorted(os.listdir(previews / "plain")) == ["IMG_0001.jpg.jpg"]
    _until(lambda: "no preview can be made of proxies/bad.tif" in m.log.read_text())
    (mnt / "proxies" / "scan.tif").unlink()
    _until(lambda: not (previews / "proxies" / "scan.tif.jpg").exists())
    m.stop()
    assert m.log.read_text().count("no preview can be made") == 1
    with Store.open(store_path) as store, store.reader() as tx:
        records = {path: tx.preview(tx.inode(tx.resolve(path)).content)
                   for path in ("proxies/IMG_3578.heic", "proxies/bad.tif")}
        assert len(list(tx.previews())) == 2  # (the deleted image's went with its version)
    assert records["proxies/IMG_3578.heic"].asked == 1024
    assert records["proxies/bad.tif"].jpeg is None and records["proxies/bad.tif"].why

    # The policy for the whole vault: the next mount makes what it asks for (its backlog),
    # and says nothing more of the file it could not read.
    toml = store_path / "vault.toml"
    toml.write_text(toml.read_text().replace('folder = "proxies"', 'folder = ""'))
    m = make_mount()
    previews = m.path / ".vault" / "previews"
    for name in ("IMG_3578.heic", "scan.tif"):
        _until((previews / "plain" / f"{name}.jpg").exists, timeout=60)
    with Image.open(previews / "proxies" / "IMG_3578.heic.jpg") as img:
        assert img.size == (1024, 768)
    m.stop()
    assert "no preview can be made" not in m.log.read_text()


def test_a_capture_is_applied_to_the_version_its_reading_is_of(monkeypatch):
    """The bookkeeping behind the policies, with the races a mount meets in a burst that no
    mount test can time: the reading of a capture's first version arriving after it was
    written again, and a commit while its policy is being applied. Neither may lose the
    capture's policy or apply it twice, and an import's unmount waits while one is applied
    (`waiting`)."""
    monkeypatch.setattr(capture_mod, "QUIET_S", 0.0)
    policies = CapturePolicies(None, [], None)  # (applying needs a store; this does not)
    closed, where = (lambda ino: False), (lambda ino: (1, b"IMG_0001.CR3"))
    policies.note_committed(5, 10, first=True)
    policies.note_committed(5, 11, first=False)  # written again while version 10 is read
    policies.note_analysed(5, 10, image=True)     # version 10's reading arrives late
    assert policies.due(closed, where) == [] and not policies.waiting
    policies.note_analysed(5, 11, image=True)
    assert policies.due(closed, where) == [(5, 11, False)]
    assert policies.waiting and policies.due(closed, where) == []  # applying, and only once
    policies.note_committed(5, 12, first=False)  # committed again before it was applied
    policies.done(5, applied=False)               # (apply found version 12, not 11)
    assert not policies.waiting and policies.due(closed, where) == []
    policies.note_analysed(5, 12, image=True)
    assert policies.due(closed, where) == [(5, 12, False)]
    policies.note_committed(5, 13, first=False)  # committed again once it was applied
    policies.done(5, applied=True)
    policies.note_analysed(5, 13, image=True)    # its policy is not applied twice
    assert not policies.waiting and policies.due(closed, where) == []
    policies.note_committed(6, 20, first=True)
    policies.note_analysed(6, 20, image=False)  # not an image: no policy, nothing waits
    policies.note_committed(6, 21, first=False)
    assert policies.due(closed, where) == [] and not policies.waiting
