"""Metadata, sidecars and tiers: the index read from real camera files, and the views, `find`
and `tag` that show it, driven through a real mount with exiftool and setfattr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import CORPUS, needs_fuse, vaultfs
from vaultfs.media import metadata, sidecars, tiers



# ---- the pure parts ----------------------------------------------------------------------------
def test_metadata_of_real_camera_files():
    m = metadata.read((CORPUS / "jpeg" / "medium" / "mongolels.jpg").read_bytes())
    assert m["model"] == "Canon EOS 500D" and m["rating"] == 3
    assert m["capture_time"] == "2009-08-29T13:18:08.17"
    lr = metadata.read((CORPUS / "sidecars" / "lightroom_pair" / "IMG_5910.xmp").read_bytes())
    assert lr["kind"] == "sidecar" and lr["rating"] == 3 and "Berkley" in lr["keywords"]
    assert lr["capture_time"] == "2015-06-11T10:29:26"
    dt = metadata.read((CORPUS / "sidecars" / "darktable" / "exposure.xmp").read_bytes())
    assert dt["rating"] == 1 and dt["develop"] == ["darktable"]
    cr3 = metadata.read((CORPUS / "raw_metadata_only" / "Canon-R6-pruned.CR3").read_bytes())
    assert cr3["model"] == "Canon EOS R6"
    pp3 = metadata.read(b"[Version]\nAppVersion=5.9\n\n[General]\nRank=4\nColorLabel=1\n")
    assert pp3 == {"kind": "sidecar", "develop": ["rawtherapee"], "rating": 4, "label": "red",
                   "reject": False}
    latin1 = metadata.read((CORPUS / "jpeg" / "icc" / "Canon EOS 7D.jpg").read_bytes())
    assert latin1["model"] == "Canon EOS 7D"
    # Hostile or odd input: a huge number is no number (and costs nothing), a video is not
    # read for metadata, a camera's 0 stars are no rating.
    t0 = time.monotonic()
    assert metadata.number("1e20000000") is None and time.monotonic() - t0 < 0.1
    hostile = metadata.read(b"<?xpacket begin=''?><x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
                            b"xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
                            b"<rdf:Description xmlns:xmp='http://ns.adobe.com/xap/1.0/' "
                            b"xmp:Rating='1e20000000'/></rdf:RDF></x:xmpmeta>")
    assert "rating" not in hostile
    assert metadata.sniff(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00") is None
    assert metadata.sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00") == "image"
    assert "rating" not in metadata.read((CORPUS / "jpeg" / "medium" /
                                          "canon_hdr_NO.jpg").read_bytes())
    for bad in (b"", b"\xff\xd8\xff" + b"\x00" * 100, (CORPUS / "raw_metadata_only" /
                                                        "Sigma.x3f").read_bytes()):
        with pytest.raises(metadata.MetadataError):
            metadata.read(bad)


def test_sidecars_link_by_each_applications_convention():
    names = ["IMG_0001.NEF", "IMG_0001.JPG", "IMG_0001.xmp", "IMG_0002.NEF",
             "img_0002.nef.xmp", "IMG_0002_01.NEF.xmp", "IMG_0003.CR2", "IMG_0003.CR2.pp3",
             "IMG_0003.CR2.dop", "IMG_0004.CR2", "IMG_0004.vrd", "IMG_0005.HEIC",
             "IMG_0005.AAE", "lonely.xmp"]
    assert sidecars.link(names) == {
        "IMG_0001.NEF": ["IMG_0001.xmp"], "IMG_0001.JPG": ["IMG_0001.xmp"],
        "IMG_0002.NEF": ["img_0002.nef.xmp", "IMG_0002_01.NEF.xmp"],
        "IMG_0003.CR2": ["IMG_0003.CR2.pp3", "IMG_0003.CR2.dop"],
        "IMG_0004.CR2": ["IMG_0004.vrd"], "IMG_0005.HEIC": ["IMG_0005.AAE"]}


def test_capture_one_settings_link_two_folders_down():
    assert sidecars.capture_one(["IMG_0001.CR3", "IMG_0001.JPG", "IMG_0002.CR3"],
                                ["IMG_0001.CR3.cos", "img_0001.jpg.cos", "IMG_0001.CR3.cot",
                                 "IMG_0001.CR3.comask", "IMG_0003.CR3.cos"]) == \
        {"IMG_0001.CR3": ["IMG_0001.CR3.cos"], "IMG_0001.JPG": ["img_0001.jpg.cos"]}
    assert sidecars.is_capture_one_settings("CaptureOne", "Settings116")
    assert not sidecars.is_capture_one_settings("CaptureOne", "Cache")


def capture_one_settings() -> dict[str, bytes]:
    """The two .cos files Capture One 4 and 5 wrote into the corpus's EIP package (a ZIP):
    Settings45 (Basic_Rating 4, no colour tag) and Settings50 (3, colour tag 4: green)."""
    import zipfile

    with zipfile.ZipFile(CORPUS / "sidecars" / "captureone" / "CaptureOne.eip") as z:
        return {n.split("/")[1]: z.read(n) for n in z.namelist() if n.endswith(".cos")}


# A DxO PhotoLab sidecar, constructed (the corpus has none) in the structure of the .dop files
# that github.com/SapporoTK/DxOKeyFrame.py reads and writes.
DOP = b"""Sidecar = {
	Date = "2026-11-24T09:15:12Z",
	Source = {
		CafId = "C0000001",
		Items = {
			{
				Name = "IMG_0002.jpg",
				Settings = {
					Base = {
						Version = "15.0",
					},
					Overrides = {
						ExposureBias = 0.3,
					},
				},
			},
		},
	},
	Software = "DxO PhotoLab 7",
	Version = "15.0",
}
"""


def test_capture_one_dxo_and_dpp_sidecars_are_read():
    settings = capture_one_settings()
    assert metadata.read(settings["Settings45"]) == {
        "kind": "sidecar", "develop": ["capture one"], "rating": 4}
    assert metadata.read(settings["Settings50"]) == {
        "kind": "sidecar", "develop": ["capture one"], "rating": 3, "label": "green"}
    dpp = CORPUS / "sidecars" / "canon_dpp"
    for name in ("CanonVRD.vrd", "CanonVRD.dr4"):  # DPP's check marks are not ratings
        assert metadata.read((dpp / name).read_bytes()) == {"kind": "sidecar",
                                                             "develop": ["canon dpp"]}
    assert metadata.read(DOP) == {"kind": "sidecar", "develop": ["dxo"]}
    for bad in (settings["Settings50"][:300], b"CANON OPTIONAL DATA\0" + b"\xff" * 8 +
                b"\xff\xff\x00\xf6\x00\x00\x00\x04abcd"):
        with pytest.raises(metadata.MetadataError):
            metadata.read(bad)


def test_tier_rules_are_data_not_code():
    t = tiers.Tiers([("select", "rating >= 4 or pick or label == 'red'"),
                     ("birds", "'eagle' in keywords"), ("reject", "reject")])
    v = lambda **m: tiers.variables(m, "a/b.nef", False)  # noqa: E731
    assert t.tier_of(v(rating=5), None) == "select"
    assert t.tier_of(v(keywords=["eagle"]), None) == "birds"
    assert t.tier_of(v(rating=-1, reject=True), None) == "reject"
    assert t.tier_of(v(), None) == "general"
    assert t.tier_of(v(rating=5), "reject") == "reject"  # a tag wins over rules
    for bad in ("__import__('os').system('x')", "rating >=", "open('f')", "rating.real"):
        with pytest.raises(tiers.RuleError):
            tiers.compile_rule(bad)
    # The newer of file and sidecar decides; keywords are all of them.
    assert tiers.effective({"rating": 2, "keywords": ["a"]}, 10,
                           [({"rating": 5, "keywords": ["b"]}, 20)]) == \
        {"rating": 5, "keywords": ["a", "b"]}
    assert tiers.effective({"rating": 2}, 30, [({"rating": 5}, 20)])["rating"] == 2
    # Un-rejecting in an editor: the newer rating decides the reject too.
    assert tiers.effective({"rating": -1, "reject": True}, 10,
                           [({"rating": 3, "reject": False}, 20)]) == \
        {"rating": 3, "reject": False}
    assert t.tier_of(v(rating=5), "no-such-tier") == "select"  # a stale tag: rules decide
    assert tiers.compile_rule("rating == -1")({"rating": -1})
    with pytest.raises(tiers.RuleError):
        tiers.compile_rule("not " * 300 + "true")


# ---- through a mount ---------------------------------------------------------------------------
def _wait(cond, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except FileNotFoundError:  # a view folder that has nothing (yet)
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _find(store, *args) -> list[str]:
    return [f["path"] for f in json.loads(vaultfs("find", store, *args, "--json").stdout)]


@needs_fuse
def test_ratings_and_sidecars_sort_files_into_tiers_and_views(make_mount, store_path):
    m = make_mount()
    shoot = m.path / "shoot"
    shoot.mkdir()
    for p in ("jpeg/medium/mongolels.jpg", "jpeg/medium/canon_hdr_NO.jpg",
              "jpeg/medium/jolla.jpg", "sidecars/lightroom_pair/IMG_5910.jpg",
              "sidecars/lightroom_pair/IMG_5910.xmp"):
        shutil.copy2(CORPUS / p, shoot)
    (shoot / "notes.txt").write_text("not an image")
    (shoot / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # stored anyway

    _wait(lambda: _find(store_path, "--rating", "3") == ["shoot/IMG_5910.jpg",
                                                         "shoot/mongolels.jpg"],
          "the index has the files' ratings")
    views = m.path / ".vault"
    # (the views wait for an image and its sidecar to be read both: a moment after the index)
    _wait(lambda: sorted(os.listdir(views / "rating" / "3" / "shoot")) ==
          ["IMG_5910.jpg", "IMG_5910.xmp", "mongolels.jpg"], "the sidecar beside its image")
    assert os.listdir(views / "tiers" / "select") == []
    assert "broken.jpg" in os.listdir(views / "tiers" / "general" / "shoot")
    assert (views / "rating" / "3" / "shoot" / "mongolels.jpg").read_bytes() == \
        (CORPUS / "jpeg" / "medium" / "mongolels.jpg").read_bytes()
    with pytest.raises(OSError):
        (views / "rating" / "3" / "shoot" / "mongolels.jpg").write_bytes(b"no")

    # A rating written into the file, the way Lightroom and Photo Mechanic do, re-tiers it.
    subprocess.run(["exiftool", "-q", "-q", "-Rating=5", "-overwrite_original",
                    str(shoot / "canon_hdr_NO.jpg")], check=True)
    _wait(lambda: os.listdir(views / "tiers" / "select" / "shoot") == ["canon_hdr_NO.jpg"],
          "the edited file shows in tiers/select")
    _wait(lambda: os.listdir(views / "rating" / "5" / "shoot") == ["canon_hdr_NO.jpg"],
          "the edited file shows in rating/5")
    log = json.loads(vaultfs("log", store_path, "shoot/canon_hdr_NO.jpg", "--json").stdout)
    # (exiftool saves by rename: one timeline; the camera's 0 stars mean "not rated")
    assert log[-1]["metadata_changes"] == {"rating": [None, 5]}
    # A sidecar saved later wins over the rating inside the image: a red label selects it.
    subprocess.run(["exiftool", "-q", "-q", "-XMP:Label=Red", "-overwrite_original",
                    str(shoot / "IMG_5910.xmp")], check=True)
    _wait(lambda: "IMG_5910.jpg" in os.listdir(views / "labels" / "red" / "shoot"),
          "the sidecar's label shows")
    _wait(lambda: sorted(os.listdir(views / "tiers" / "select" / "shoot")) ==
          ["IMG_5910.jpg", "IMG_5910.xmp", "canon_hdr_NO.jpg"], "the sidecar's image selected")

    # Tags override rules: by xattr through the mount, or from the command line.
    def listed(*parts):
        try:
            return os.listdir(views.joinpath(*parts))
        except FileNotFoundError:
            return []

    subprocess.run(["setfattr", "-n", "user.vaultfs.tier", "-v", "reject",
                    str(shoot / "canon_hdr_NO.jpg")], check=True)
    _wait(lambda: "canon_hdr_NO.jpg" in listed("tiers", "reject", "shoot"), "the tag's tier")
    vaultfs("tag", store_path, "shoot/jolla.jpg", "--tier", "select")
    _wait(lambda: "jolla.jpg" in listed("tiers", "select", "shoot"), "the CLI tag's tier")
    vaultfs("tag", store_path, "shoot/*.jpg", "--clear")
    _wait(lambda: "jolla.jpg" not in listed("tiers", "select", "shoot"), "the tags cleared")
    r = vaultfs("tag", store_path, "shoot/jolla.jpg", "--tier", "nope", check=False)
    assert r.returncode == 2 and "there is no tier 'nope'" in r.stderr

    assert _find(store_path, "--camera", "Canon EOS 500D") == ["shoot/mongolels.jpg"]
    assert _find(store_path, "--keyword", "Berkley") == ["shoot/IMG_5910.jpg",
                                                         "shoot/IMG_5910.xmp"]
    assert _find(store_path, "--since", "2015-01-01", "--until", "2015-12-31",
                 "--rating", ">=4") == ["shoot/canon_hdr_NO.jpg"]
    figures = json.loads((views / "status.json").read_text())["tiers"]
    assert figures["select"]["files"] == 3 and sum(t["files"] for t in figures.values()) == 7
    log = (store_path / "vaultfs.log").read_text()
    assert log.count("cannot read the metadata of /shoot/broken.jpg") == 1


@needs_fuse
def test_capture_one_and_dpp_ratings_re_tier_their_image(make_mount, store_path):
    """Capture One keeps DIR/CaptureOne/Settings<N>/IMG_0001.CR3.cos for DIR/IMG_0001.CR3: its
    rating and colour tag count for the image (the newer of file and sidecar), and it follows
    its image into the views. A rating that exiftool writes into DPP's .vrd does too; a .dr4
    and a .dop say which editors left settings."""
    m = make_mount()
    shoot = m.path / "shoot"
    settings = shoot / "CaptureOne" / "Settings50"
    settings.mkdir(parents=True)
    shutil.copy(CORPUS / "raw_metadata_only" / "Canon-R6-pruned.CR3", shoot / "IMG_0001.CR3")
    cos = capture_one_settings()["Settings50"]  # Capture One 5's own file: 3 stars, green
    (settings / "IMG_0001.CR3.cos").write_bytes(cos)
    (settings / "IMG_0001.CR3.cot").write_bytes(b"\xff\xd8\xff\xe0 a thumbnail")
    shutil.copy(CORPUS / "jpeg" / "medium" / "jolla.jpg", shoot / "IMG_0002.jpg")
    dpp = CORPUS / "sidecars" / "canon_dpp"
    shutil.copy(dpp / "CanonVRD.vrd", shoot / "IMG_0002.vrd")
    shutil.copy(dpp / "CanonVRD.dr4", shoot / "IMG_0002.dr4")
    (shoot / "IMG_0002.jpg.dop").write_bytes(DOP)
    for p in shoot.glob("IMG_0002.*"):
        p.chmod(0o644)
    views = m.path / ".vault"
    in_view = ["CaptureOne", "IMG_0001.CR3"]
    _wait(lambda: sorted(os.listdir(views / "rating" / "3" / "shoot")) == in_view,
          "the image rated 3 by its Capture One settings")
    assert os.listdir(views / "rating" / "3" / "shoot" / "CaptureOne" / "Settings50") == \
        ["IMG_0001.CR3.cos"]  # beside its image (its thumbnail is not a sidecar)
    assert sorted(os.listdir(views / "labels" / "green" / "shoot")) == in_view
    def found() -> dict[str, dict]:
        return {f["path"]: f for f in json.loads(vaultfs("find", store_path, "--json").stdout)}

    image = found()["shoot/IMG_0001.CR3"]
    assert image["sidecars"] == ["shoot/CaptureOne/Settings50/IMG_0001.CR3.cos"]
    assert image["metadata"]["develop"] == ["capture one"]
    assert found()["shoot/CaptureOne/Settings50/IMG_0001.CR3.cos"]["tier"] == "general"
    _wait(lambda: found()["shoot/IMG_0002.jpg"]["metadata"].get("develop") ==
          ["canon dpp", "dxo"], "the DPP and DxO settings indexed")

    # A rating made in Capture One (it rewrites the settings file) re-tiers the image.
    (settings / "IMG_0001.CR3.cos").write_bytes(
        cos.replace(b'K="Basic_Rating" V="3"', b'K="Basic_Rating" V="5"'))
    _wait(lambda: sorted(os.listdir(views / "tiers" / "select" / "shoot")) == in_view,
          "the image selected by its Capture One rating")
    assert os.listdir(views / "tiers" / "select" / "shoot" / "CaptureOne" / "Settings50") \
        == ["IMG_0001.CR3.cos"]
    assert os.listdir(views / "rating" / "5" / "shoot") == in_view
    # exiftool writes a rating into DPP's recipe as an XMP block: it counts for the JPEG.
    subprocess.run(["exiftool", "-q", "-q", "-Rating=4", "-overwrite_original",
                    str(shoot / "IMG_0002.vrd")], check=True)
    _wait(lambda: "IMG_0002.jpg" in os.listdir(views / "tiers" / "select" / "shoot"),
          "the image selected by the rating in its .vrd")
    assert {"IMG_0002.vrd", "IMG_0002.dr4", "IMG_0002.jpg.dop"} <= \
        set(os.listdir(views / "tiers" / "select" / "shoot"))


@needs_fuse
def test_a_bad_tier_rule_stops_the_mount_with_a_clear_error(store_path, tmp_path):
    toml = store_path / "vault.toml"
    toml.write_text(toml.read_text().replace('rule = "reject"', 'rule = "reject("'))
    (tmp_path / "mp").mkdir()
    r = vaultfs("mount", store_path, tmp_path / "mp", check=False)
    assert r.returncode == 2 and "[[tiers]]: rule 'reject('" in r.stderr
    toml.write_text(toml.read_text().replace("reject(", "reject"))


@needs_fuse
def test_exiftool_reads_the_same_metadata_everywhere(make_mount, store_path, tmp_path):
    """Nothing about the bytes changes: exiftool's dump of every corpus file is the same before
    it was written through the mount and read back from the live tree, a snapshot and a
    restore (sidecars included)."""
    def dump(root) -> dict[str, bytes]:  # one exiftool run per tree: relative path -> dump
        out = subprocess.run(["exiftool", "-a", "-G1", "-s", "-n", "-r", "--System:all",
                              "--ExifTool:all", "--ext", "md", "--ext", "json", str(root)],
                             capture_output=True).stdout
        files = {}
        for part in out.split(b"======== ")[1:]:
            name, _, body = part.partition(b"\n")
            rel = os.path.relpath(os.fsdecode(name), root)
            files[rel] = body.split(b"\n    ")[0]  # (the summary lines at the very end)
        return files

    before = dump(CORPUS)
    assert len(before) > 100
    m = make_mount()
    shutil.copytree(CORPUS, m.path / "corpus", copy_function=shutil.copy2)
    vaultfs("snapshot", store_path, "s")
    assert dump(m.path / "corpus") == before
    assert dump(m.path / ".vault" / "snapshots" / "s" / "corpus") == before
    m.stop()
    vaultfs("restore", store_path, "s:corpus", tmp_path / "restored")
    assert dump(tmp_path / "restored") == before


@needs_fuse
def test_scrub_rereads_each_tier_and_reports_damage(make_mount, store_path):
    import mmap
    import random

    from conftest import set_policy
    set_policy(store_path, "tiers", verify_days="0.00002")  # every tier, every ~2 s
    m = make_mount()
    rng = random.Random(4)
    good, bad = rng.randbytes(2_000_000), rng.randbytes(2_000_000)  # random: stored raw
    (m.path / "good.raw").write_bytes(good)
    (m.path / "bad.raw").write_bytes(bad)

    def scrubbed(since: int = 0):
        tier = json.loads((m.path / ".vault" / "status.json").read_text())["tiers"]["general"]
        last = tier.get("last_scrub")
        return last if last and last["finished_ns"] > since and last["chunks"] else None

    first = _wait(lambda: scrubbed(), "a scrub of tier general")
    assert first["damaged"] == [] and first["bytes"] >= 4_000_000
    m.stop()
    data_mdb = store_path / "lmdb" / "data.mdb"
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        at = mm.find(bad[1_000_000:1_000_064])
        mm[at + 10] ^= 0xFF
    m = make_mount()
    found = _wait(lambda: scrubbed(first["finished_ns"]), "a scrub after the damage")
    assert found["damaged"] == ["bad.raw"]
    assert "DAMAGED" in vaultfs("status", store_path).stdout
    m.stop(expect_errors=True)
    with open(data_mdb, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:  # mend it for teardown
        mm[at + 10] ^= 0xFF
