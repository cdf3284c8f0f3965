"""Events and the client API over the mount's control socket, as tethering software uses
them: every file written in the three tethering patterns is announced committed, then verified
(read back and matched); `safe` answers per file; garbage from a client harms nothing."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import trio

from conftest import CORPUS, needs_fuse, vaultfs
from vaultfs.client import Vault
from vaultfs.fs import control
from vaultfs.fs.events import Events
from vaultfs.store import Store

pytestmark = needs_fuse


def _listen(mountpoint):
    """`vaultfs events` in a subprocess, its JSON lines collected by a thread, returned once it
    is surely subscribed: a probe file written after it started is heard of (a start-up slowed
    by a busy machine would miss the first events). The probe is removed again."""
    proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "events", str(mountpoint)],
                            stdout=subprocess.PIPE, text=True)
    got: list[dict] = []
    threading.Thread(target=lambda: [got.append(json.loads(line)) for line in proc.stdout],
                     daemon=True).start()
    probe = os.path.join(mountpoint, ".events-probe")
    deadline = time.monotonic() + 60
    while not any(e["event"] == "committed" and e["path"] == ".events-probe" for e in got):
        assert time.monotonic() < deadline, "vaultfs events did not subscribe within a minute"
        with open(probe, "wb") as f:
            f.write(b"probe")
        time.sleep(0.2)
    os.unlink(probe)
    return proc, got


def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_each_capture_is_announced_committed_then_verified(mnt):
    proc, got = _listen(mnt)
    data = os.urandom(3_000_000)
    (mnt / "close.NEF").write_bytes(data)                 # write, close
    with open(mnt / "fsync.NEF", "wb") as f:              # write, fsync (still open)
        f.write(data)
        os.fsync(f.fileno())
        _until(lambda: ("verified", "fsync.NEF") in {(e["event"], e["path"]) for e in got})
        assert Vault(mnt).safe("fsync.NEF")["safe"]
    # Temp name, rename into place: at once, while the mount may still be reading it back.
    (mnt / ".DSC_0003.NEF.tmp").write_bytes(data * 20)
    os.rename(mnt / ".DSC_0003.NEF.tmp", mnt / "DSC_0003.NEF")
    _until(lambda: ("renamed", "DSC_0003.NEF") in {(e["event"], e["path"]) for e in got})
    proc.terminate()
    seen = [(e["event"], e["path"]) for e in got]
    for name in ("close.NEF", "fsync.NEF"):
        assert seen.index(("committed", name)) < seen.index(("verified", name))
    renamed = next(e for e in got if e["event"] == "renamed")
    assert renamed["from"] == ".DSC_0003.NEF.tmp"
    assert all(isinstance(e["time"], float) for e in got)
    out = vaultfs("safe", "--mountpoint", mnt, mnt / "close.NEF", mnt / "DSC_0003.NEF").stdout
    assert out.count(": safe (1 copy)") == 2


def test_a_file_still_being_written_is_not_safe_yet(mnt):
    # The writer is a process of its own: a fork of this one would close (flush, so commit)
    # the file when it starts another program, as POSIX has it.
    writer = subprocess.Popen([sys.executable, "-c", "import sys, os\n"
                               "f = open(sys.argv[1], 'wb'); f.write(b'x' * 1000); f.flush()\n"
                               "print('written', flush=True); sys.stdin.readline(); f.close()",
                               str(mnt / "open.NEF")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    answer = Vault(mnt).safe("open.NEF")
    assert answer["committed"] is False and answer["safe"] is False
    r = vaultfs("safe", "--mountpoint", mnt, mnt / "open.NEF", check=False)
    assert r.returncode == 1 and "NOT YET SAFE" in r.stdout
    status = json.loads((mnt / ".vault" / "status.json").read_text())
    assert status["uncommitted_files"] == 1 and status["oldest_uncommitted_s"] > 0
    writer.communicate("close\n")
    _until(lambda: Vault(mnt).safe("open.NEF")["safe"])


def test_garbage_from_a_client_harms_nothing(mnt, store_path):
    with Store.open(store_path) as store:
        path = control.socket_path(store)
    for payload in (b"not json\n", b'{"op": "rm -rf"}\n', b'{"op": "tag", "args": 5}\n',
                    b'{"op": "tag", "args": {"paths": 7, "tier": []}}\n',
                    b'{"op": ["x"]}\n', b"[" * 100_000 + b"\n",
                    b"x" * (2 << 20), b'{"op": "events"}\n', b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):  # cut off: "request too long"
                continue
            s.settimeout(5)
            try:
                reply = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                reply = b""
            if payload.startswith((b"not", b'{"op": "rm', b'{"op": [', b"[[")):
                assert json.loads(reply)["ok"] is False
    (mnt / "after.txt").write_text("still fine")
    assert (mnt / "after.txt").read_text() == "still fine"
    assert "Traceback" not in (store_path / "vaultfs.log").read_text()


def test_files_committed_before_a_remount_are_safe_after_it(make_mount):
    m = make_mount()
    (m.path / "earlier.NEF").write_bytes(os.urandom(2_000_000))
    m.stop()
    m = make_mount()
    assert Vault(m.path).safe("earlier.NEF")["safe"]  # read back when asked


def test_a_name_that_is_not_utf8_comes_as_valid_json_and_exactly_in_base64(mnt):
    # Strict JSON parsers (Rust's serde_json, Java's) reject an escaped lone surrogate such as
    # "\udce9": every line must be Unicode text throughout.
    proc, got = _listen(mnt)
    name = b"caf\xe9 \xff.JPG"
    with open(os.fsencode(mnt) + b"/" + name, "wb") as f:
        f.write(b"x" * 1000)
    _until(lambda: any(e["event"] == "verified" and "path_b64" in e for e in got))
    proc.terminate()
    for e in got:
        json.dumps(e, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
    event = next(e for e in got if e["event"] == "committed" and "path_b64" in e)
    assert event["path"] == "caf\\xe9 \\xff.JPG"
    assert open(os.fsencode(mnt) + b"/" + base64.b64decode(event["path_b64"]), "rb").read() \
        == b"x" * 1000


def test_a_files_tier_is_announced_when_known_and_each_time_it_changes(mnt):
    proc, got = _listen(mnt)
    image, other = mnt / "IMG_0001.jpg", mnt / "IMG_0002.jpg"
    shutil.copyfile(CORPUS / "jpeg" / "medium" / "door-knocker.jpg", image)
    shutil.copyfile(CORPUS / "jpeg" / "medium" / "jolla.jpg", other)

    def tiers(name: str) -> list[tuple]:
        return [(e["tier"], e.get("from")) for e in got
                if e["event"] == "tiered" and e["path"] == name]

    _until(lambda: tiers("IMG_0001.jpg") and tiers("IMG_0002.jpg"))
    # A rating written into the file by exiftool (a new file renamed over it).
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-Rating=5", str(image)],
                   check=True)
    _until(lambda: len(tiers("IMG_0001.jpg")) == 2)
    os.setxattr(image, "user.vaultfs.tier", b"reject")    # a tag
    _until(lambda: len(tiers("IMG_0001.jpg")) == 3)
    os.removexattr(image, "user.vaultfs.tier")             # back to the rules
    _until(lambda: len(tiers("IMG_0001.jpg")) == 4)
    (mnt / "IMG_0002.xmp").write_text(                     # a sidecar's colour label
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        '22-rdf-syntax-ns#"><rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmp:Label="Red"/></rdf:RDF></x:xmpmeta>')
    _until(lambda: len(tiers("IMG_0002.jpg")) == 2)
    time.sleep(2)  # (nothing more comes: no tier flickers while new bytes are analysed)
    proc.terminate()
    assert tiers("IMG_0001.jpg") == [("general", None), ("select", "general"),
                                     ("reject", "select"), ("select", "reject")]
    assert tiers("IMG_0002.jpg") == [("general", None), ("select", "general")]
    assert tiers("IMG_0002.xmp") == [("select", None)]
    assert {e["path"] for e in got if e["event"] == "tiered"} - {  # (and exiftool's temp file
        "IMG_0001.jpg", "IMG_0002.jpg", "IMG_0002.xmp", ".events-probe",  # if it was seen)
        "IMG_0001.jpg_exiftool_tmp"} == set()


def test_an_event_with_any_text_is_valid_json():
    """Whatever text an event carries (a decoder's message with a lone surrogate, the bytes of
    a name that is not UTF-8), publishing it never raises on the mount's loop, and a strict
    JSON parser reads what a listener gets."""
    got = []

    async def main():
        events, both = Events(), trio.Event()

        async def send(message):
            got.append(message)
            if len(got) == 2:
                both.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(events.listen, send)
            await trio.sleep(0.01)
            events.publish("error", "day1/caf\udce9.NEF", error="bad \ud800 marker")
            events.publish("committed", "day1/ok.NEF")
            with trio.fail_after(5):
                await both.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    first = json.loads(json.dumps(got[0], ensure_ascii=False).encode(), strict=True)
    assert base64.b64decode(first["path_b64"]) == b"day1/caf\xe9.NEF"
    assert first["path"] == "day1/caf\\xe9.NEF" and "\\xed\\xa0\\x80" in first["error"]
    assert got[1]["path"] == "day1/ok.NEF"
