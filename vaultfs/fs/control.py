"""The mount's control socket: commands that need the store's writer while a mount holds it.

`vaultfs snapshot STORE` and its kin open the store for writing when nothing has it; while a
mount does, they send their request here instead, and the mount runs it with its own writer.

The socket lives in the user's runtime directory, named by the store's id and a digest of its
path (a Unix socket's path is limited to 108 bytes, a store's is not):
`$XDG_RUNTIME_DIR/vaultfs/<id>-<path digest>.sock`, or `/tmp/vaultfs-<uid>/...`, in a directory
only its owner can enter. The protocol is one
JSON object per line each way: `{"op": NAME, "args": {...}}` answered by
`{"ok": true, "result": ...}` or `{"ok": false, "error": "one sentence"}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from ..store import Store, StoreError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
CLIENT_TIMEOUT = 3600.0  # a prune of a large store takes a while


def socket_path(store: Store) -> Path:
    """Named by the store's id and its real path: a copy of a store (same id) mounted beside
    the original has a socket of its own."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "vaultfs" if runtime else Path(f"/tmp/vaultfs-{os.getuid()}")
    where = hashlib.blake2b(os.fsencode(store.path.resolve()), digest_size=6).hexdigest()
    return base / f"{store.id}-{where}.sock"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise StoreError(f"{path} is not a private directory of this user; remove it")


async def serve(store: Store, ops: dict[str, Callable[..., Any]],
                mount_ops: dict[str, Callable[..., Any]] | None = None,
                streams: dict[str, Callable[..., Any]] | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests until cancelled. `ops` maps an op name to a blocking function called
    as fn(store, **args) in a worker thread; `mount_ops` to functions of the mount's own
    state, fn(**args), also called in a worker thread; `streams` to async functions fn(send) that send
    objects for as long as the client listens (its connection is theirs from then on)."""
    handlers = Handlers(store, ops, mount_ops or {}, streams or {})
    path = socket_path(store)
    _private_dir(path.parent)
    if _answers(path):
        raise StoreError(f"another mount of {store.path} answers at {path}")
    path.unlink(missing_ok=True)  # left by a mount that died
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            listener = trio.SocketListener(sock)
            await trio.serve_listeners(lambda s: _session(s, handlers), [listener],
                                       handler_nursery=nursery)
    finally:
        path.unlink(missing_ok=True)


class Handlers:
    def __init__(self, store: Store, ops: dict, mount_ops: dict, streams: dict):
        self.store, self.ops, self.mount_ops, self.streams = store, ops, mount_ops, streams


async def _session(stream: trio.SocketStream, h: Handlers) -> None:
    """One client: requests answered in turn. A client that sends garbage gets an error
    answer; one that goes away mid-request changes nothing the request had not committed."""
    buf = b""
    async with stream:
        try:
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_LINE:
                        await stream.send_all(_answer(False, "request too long"))
                        return
                line, buf = buf.split(b"\n", 1)
                req = _parse(line, h)
                if req is None:
                    await stream.send_all(_answer(False, "not a request this mount understands"))
                elif req[0] in h.streams:
                    await stream.send_all(_answer(True, "listening"))
                    await h.streams[req[0]](
                        lambda obj: stream.send_all((json.dumps(obj) + "\n").encode()))
                    return
                else:
                    await stream.send_all(await _run(*req, h))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # noqa: BLE001 - nothing a client does may end the mount
            log.exception("a control session failed")


def _parse(line: bytes, h: Handlers) -> tuple[str, dict] | None:
    try:
        req = json.loads(line)
        op, args = req["op"], req.get("args", {})
    except Exception:  # not JSON, not an object, nested too deep...
        return None
    if not isinstance(op, str) or not isinstance(args, dict):
        return None
    return (op, args) if op in h.ops or op in h.mount_ops or op in h.streams else None


async def _run(op: str, args: dict, h: Handlers) -> bytes:
    try:
        if op in h.mount_ops:
            result = await trio.to_thread.run_sync(lambda: h.mount_ops[op](**args))
        else:
            result = await trio.to_thread.run_sync(lambda: h.ops[op](h.store, **args))
    except (StoreError, TypeError, ValueError) as e:
        return _answer(False, str(e))
    except Exception as e:  # noqa: BLE001 - reported to the client, logged here
        log.exception("control request %s failed", op)
        return _answer(False, f"{op} failed: {e}")
    return _answer(True, result)


def _answer(ok: bool, payload: Any) -> bytes:
    body = {"ok": True, "result": payload} if ok else {"ok": False, "error": payload}
    return (json.dumps(body) + "\n").encode()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(store: Store, op: str, **args: Any) -> Any:
    """Send one request to the mount that holds `store` (opened read-only by the caller), and
    return its result."""
    with _connect(store) as s:
        return _call(s.makefile("rwb"), op, args)


def listen(store: Store, op: str = "events") -> Iterator[dict]:
    """The objects a stream op sends, one by one, until the mount ends or the caller stops."""
    with _connect(store) as s:
        s.settimeout(None)
        f = s.makefile("rwb")
        _call(f, op, {})
        for line in f:
            yield json.loads(line)


def _connect(store: Store) -> socket.socket:
    path = socket_path(store)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CLIENT_TIMEOUT)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise StoreError(f"the store's mount does not answer at {path} ({e.strerror})") from None
    return s


def _call(f, op: str, args: dict) -> Any:
    f.write((json.dumps({"op": op, "args": args}) + "\n").encode())
    f.flush()
    line = f.readline()
    if not line:
        raise StoreError("the mount closed the control connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise StoreError(reply.get("error", "the mount refused the request"))
    return reply["result"]
