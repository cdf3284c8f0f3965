"""Events and the client API over the mount's control socket, as tethering software uses
them: every file written in the three tethering patterns is announced committed, then verified
(read back and matched); `safe` answers per file; garbage from a client harms nothing."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

from conftest import needs_fuse, vaultfs
from vaultfs.client import Vault
from vaultfs.fs import control
from vaultfs.store import Store

pytestmark = needs_fuse


def _listen(mountpoint):
    """`vaultfs events` in a subprocess, its JSON lines collected by a thread."""
    proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "events", str(mountpoint)],
                            stdout=subprocess.PIPE, text=True)
    got: list[dict] = []
    threading.Thread(target=lambda: [got.append(json.loads(line)) for line in proc.stdout],
                     daemon=True).start()
    return proc, got


def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_each_capture_is_announced_committed_then_verified(mnt):
    proc, got = _listen(mnt)
    time.sleep(1.0)  # (the subscription is made when the command has started)
    data = os.urandom(3_000_000)
    (mnt / "close.NEF").write_bytes(data)                 # write, close
    with open(mnt / "fsync.NEF", "wb") as f:              # write, fsync (still open)
        f.write(data)
        os.fsync(f.fileno())
        _until(lambda: ("verified", "fsync.NEF") in {(e["event"], e["path"]) for e in got})
        assert Vault(mnt).safe("fsync.NEF")["safe"]
    (mnt / ".DSC_0003.NEF.tmp").write_bytes(data)         # temp name, rename into place
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
    # Strict JSON parsers (Rust's serde_json, Go's encoding/json with validation, Java's) reject
    # an escaped lone surrogate such as "\udce9": each line must be UTF-8 text throughout.
    proc = subprocess.Popen([sys.executable, "-m", "vaultfs", "events", str(mnt)],
                            stdout=subprocess.PIPE)
    lines: list[bytes] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    name = b"caf\xe9 \xff.JPG"

    def paths() -> set[bytes]:
        return {base64.b64decode(e["path_b64"]) if "path_b64" in e else e["path"].encode()
                for e in map(json.loads, list(lines)) if e["event"] == "verified"}

    for i in range(60):  # (until the listener is surely subscribed)
        (mnt / f".probe-{i}").write_bytes(b"probe")
        time.sleep(0.5)
        if any(p.startswith(b".probe-") for p in paths()):
            break
    with open(os.fsencode(mnt) + b"/" + name, "wb") as f:
        f.write(b"x" * 1000)
    _until(lambda: name in paths())
    proc.terminate()
    for line in lines:
        event = json.loads(line.decode("utf-8"))
        json.dumps(event, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
    event = next(e for e in map(json.loads, lines) if e.get("path_b64") and
                 e["event"] == "committed")
    assert event["path"] == "caf\\xe9 \\xff.JPG"
    assert open(os.fsencode(mnt) + b"/" + base64.b64decode(event["path_b64"]), "rb").read() \
        == b"x" * 1000
