"""A vault on another machine: `vaultfs serve` answers the endpoint's calls over TCP (or over
stdin and stdout, under ssh), `Remote` makes them, and `vaultfs pair` gives two vaults the
secret that lets them in (docs/sync-protocol.md).

The server runs one session at a time and opens its store only for the length of a session, so
the vault can be mounted between syncs. A session that is idle for IDLE_S ends.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import queue
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from ..store import Store, StoreBusy, StoreError
from . import peers, wire
from .endpoint import Endpoint, vault_name

log = logging.getLogger(__name__)

DEFAULT_PORT = 7787
IDLE_S = 120.0
HANDSHAKE_S = 15.0  # before it has proved anything, a client may not hold the server long
PAIR_WAIT_S = 600.0
# The calls a peer may make, with the messages they carry (endpoint.Endpoint's methods).
CALLS = ("hello", "listing", "base", "set_base", "rely", "extents", "missing", "get_chunks",
         "put_chunks", "apply", "note_conflicts", "finish")
# Chunks travel as stored (compressing them again is waste) or as differences, each as a raw
# frame of its own after the message that names them: [[hash, raw length(, reference, start)],
# ...] (wire.Channel.send).
CHUNK_REPLIES = {"get_chunks"}
CHUNK_REQUESTS = {"put_chunks"}

T = TypeVar("T")
# What a local disk says: waiting for a link to come back does not mend it.
NOT_THE_LINK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def address(spec: str) -> tuple[str, int]:
    """'tcp://host:port' (or 'host:port' for --listen) -> (host, port)."""
    parts = urlsplit(spec if "://" in spec else f"tcp://{spec}")
    if parts.scheme != "tcp" or not parts.hostname:
        raise StoreError(f"{spec!r} is not an address like tcp://studio.local:{DEFAULT_PORT}")
    return parts.hostname, DEFAULT_PORT if parts.port is None else parts.port


class Remote:
    """The other vault's endpoint, called over a channel."""

    over_wire = True

    def __init__(self, channel: wire.Channel, peer: bytes):
        self.channel, self.peer = channel, peer
        self._waiting: collections.deque[_Reply] = collections.deque()  # sent, not answered

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def call(self, method: str, *args):
        return self.submit(method, *args).result()

    def submit(self, method: str, *args) -> "_Reply":
        """Send a call now, read its reply later: the server answers calls in order, so
        several can be on the way (the engine keeps the link busy so)."""
        if method in CHUNK_REQUESTS:
            (chunks,) = args
            self.channel.send([method, [[_named(c) for c in chunks]]], compress=False,
                              attachments=[c[2] for c in chunks])
        else:
            self.channel.send([method, list(args)])
        reply = _Reply(self, method)
        self._waiting.append(reply)
        return reply

    def _read_reply(self) -> None:
        """Read the next reply off the wire: it answers the oldest call still waiting."""
        waiting = self._waiting.popleft()
        reply = self.channel.recv()
        if not (isinstance(reply, list) and len(reply) == 2):
            raise wire.ProtocolError("the other side sent a malformed reply")
        if reply[0] and waiting.method in CHUNK_REPLIES:
            reply[1] = _with_chunks(self.channel, reply[1])
        waiting.done, (waiting.ok, waiting.value) = True, reply

    def hello(self) -> dict:
        found = self.call("hello")
        if not isinstance(found, dict) or self.peer and found.get("id") != self.peer:
            raise wire.ProtocolError("the other vault names itself otherwise than in the "
                                     "handshake")
        return found


def _named(chunk: list) -> list:
    """A chunk as its message names it: all but its bytes, which follow as a raw frame."""
    return chunk[:2] + chunk[3:]


def _with_chunks(ch: wire.Channel, named: object) -> list[list]:
    """[[hash, raw length(, reference, start)], ...] and the raw frames that follow it ->
    [[hash, raw length, stored value or difference(, reference, start)], ...]."""
    if not (isinstance(named, list) and all(isinstance(n, list) and len(n) in (2, 4)
                                            for n in named)):
        raise wire.ProtocolError("the other side sent malformed chunks")
    return [n[:2] + [data] + n[2:] for n, data in zip(named, ch.recv_attachments(len(named)))]


class _Reply:
    def __init__(self, remote: Remote, method: str):
        self.remote, self.method = remote, method
        self.done, self.ok, self.value = False, False, None

    def result(self):
        while not self.done:
            self.remote._read_reply()
        if not self.ok:
            raise StoreError(f"the other vault: {self.value}")
        return self.value


for _name in CALLS[1:]:  # (hello, above, is checked)
    setattr(Remote, _name, lambda self, *args, _n=_name: self.call(_n, *args))


def connect(spec: str, store: Store, timeout: float = IDLE_S) -> Remote:
    """Connect to `vaultfs serve` at tcp://host:port as the vault `store`; a link silent for
    `timeout` seconds counts as lost."""
    host, port = address(spec)
    sock = socket.create_connection((host, port), timeout=HANDSHAKE_S)
    ch = wire.Channel.over(sock)
    try:
        peer = ch.handshake(uuid.UUID(store.id).bytes, True,
                            lambda pid: peers.secret(store.path, pid))
    except BaseException:
        ch.close()
        raise
    sock.settimeout(timeout)
    return Remote(ch, peer)


def serve(store_path: Path, listen: str, ready: Callable[[tuple], None] = lambda a: None,
          announce: bool = True) -> None:
    """Answer syncs on `listen` (host:port) until interrupted, announced on the local network
    (discovery.py) unless told not to. Each connection has a thread; the store serves one
    session at a time (`_Store`)."""
    host, port = address(listen)
    with Store.open(store_path) as store:  # (LMDB opens an environment once per process)
        my_id, name = uuid.UUID(store.id).bytes, vault_name(store)
    held = _Store()
    threads: list[threading.Thread] = []
    with socket.create_server((host, port)) as server, contextlib.ExitStack() as stack:
        if announce:
            from . import discovery  # (zeroconf: imported where it is used, not by every sync)
            stack.enter_context(discovery.announce(my_id, name, host,
                                                   server.getsockname()[1]))
        ready(server.getsockname())
        try:
            while True:
                try:
                    conn, addr = server.accept()
                except OSError as e:  # (out of file descriptors, a client that gave up...)
                    log.warning("accepting a connection failed: %s", e)
                    time.sleep(1)
                    continue
                threads = [t for t in threads if t.is_alive()]
                t = threading.Thread(target=_connection,
                                     args=(store_path, my_id, held, conn, addr),
                                     name=f"session {addr[0]}:{addr[1]}")
                t.start()
                threads.append(t)
        finally:
            held.hang_up_all()
            for t in threads:
                t.join()


class _Store:
    """Who has the store: one session at a time. A new session of the vault that has it takes
    it over (the old one's link is dead or stalled, or it would not have reconnected); a
    session of another vault waits for it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.holder: tuple[bytes, wire.Channel] | None = None
        self.channels: set[wire.Channel] = set()
        self.closing = False

    def take(self, peer: bytes, ch: wire.Channel) -> bool:
        with self.cond:
            if self.holder is not None and self.holder[0] == peer:
                self.holder[1].hang_up()
            if not self.cond.wait_for(lambda: self.holder is None or self.closing,
                                      timeout=IDLE_S) or self.closing:
                return False
            self.holder = (peer, ch)
            return True

    def give_back(self) -> None:
        with self.cond:
            self.holder = None
            self.cond.notify_all()

    def hang_up_all(self) -> None:
        with self.cond:
            self.closing = True
            for ch in self.channels:
                ch.hang_up()
            self.cond.notify_all()


def _connection(store_path: Path, my_id: bytes, held: _Store, conn: socket.socket,
                addr: tuple) -> None:
    conn.settimeout(HANDSHAKE_S)
    ch = wire.Channel.over(conn)
    with held.cond:
        held.channels.add(ch)
    # However slowly it trickles, a client that has not proved itself in time is cut off.
    deadline = threading.Timer(HANDSHAKE_S, ch.hang_up)
    deadline.start()
    try:
        session(store_path, my_id, ch, held, f"{addr[0]}:{addr[1]}", deadline.cancel)
    except (OSError, StoreError) as e:
        log.warning("session from %s ended: %s", addr[0], e)
    except Exception:  # a bug ends the session, not the server
        log.exception("session from %s failed", addr[0])
    finally:
        deadline.cancel()
        with held.cond:
            held.channels.discard(ch)
        ch.close()


def session(store_path: Path, my_id: bytes, ch: wire.Channel, held: _Store, who: str,
            authenticated: Callable[[], None]) -> None:
    """One client's session: authenticate it, then answer its calls until it hangs up."""
    peer = ch.handshake(my_id, False, lambda pid: peers.secret(store_path, pid))
    authenticated()
    if ch.sock is not None:
        ch.sock.settimeout(IDLE_S)
    name = peers.load(store_path)[peer]["name"]
    if not held.take(peer, ch):
        ch.recv()
        ch.send([False, f"{store_path.name} is busy with another vault's sync; try later"])
        return
    try:
        log.info("sync session from %s (%s)", name, who)
        answer(store_path, ch, name, peer)
    finally:
        held.give_back()


def serve_stdio(store_path: Path) -> None:
    """One session over stdin and stdout (`ssh host vaultfs serve --stdio STORE`): ssh has
    authenticated the user and encrypts, so the channel is not sealed again."""
    answer(store_path, wire.Channel(sys.stdin.buffer, sys.stdout.buffer, trusted=True), "ssh",
           None)


def answer(store_path: Path, ch: wire.Channel, name: str, peer: bytes | None) -> None:
    """Answer calls until the client hangs up; the store is open (for writing) only now.
    `peer`: the vault the session authenticated (None: any, under ssh)."""
    try:
        store = Store.open(store_path, writable=True)
    except StoreBusy:
        ch.recv()
        ch.send([False, f"{store_path.name} is mounted; it syncs when unmounted"])
        return
    endpoint = Endpoint(store)
    requests = _requests(ch)
    try:
        for request in requests:
            if not (isinstance(request, list) and len(request) == 2 and request[0] in CALLS
                    and isinstance(request[1], list)):
                ch.send([False, "malformed request"])
                raise wire.ProtocolError(f"{name} sent a malformed request")
            method, args = request
            try:
                if method in ("base", "set_base", "rely") and peer is not None \
                        and args[:1] != [peer]:
                    raise StoreError("a vault reads and writes only its own bases")
                result = getattr(endpoint, method)(*args)
            except (StoreError, TypeError, ValueError, KeyError, IndexError) as e:
                log.warning("%s from %s refused: %s", method, name, e)
                ch.send([False, str(e) or type(e).__name__])
                continue
            except Exception as e:  # a bug: this call fails, the session and server go on
                log.exception("%s from %s failed", method, name)
                ch.send([False, f"the other vault failed: {type(e).__name__}: {e}"])
                continue
            if method in CHUNK_REPLIES:
                ch.send([True, [_named(c) for c in result]], compress=False,
                        attachments=[c[2] for c in result])
            else:
                ch.send([True, result])
    finally:
        requests.close()  # (its reader thread ends before the store closes)
        endpoint.close()
        store.close()


def _requests(ch: wire.Channel) -> Iterator:
    """The client's requests, read by a thread of their own: the next batch of chunks arrives
    while this one is checked and committed. Ends when the client hangs up."""
    frames: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                item = ch.recv()
                if isinstance(item, list) and len(item) == 2 and item[0] in CHUNK_REQUESTS \
                        and isinstance(item[1], list) and len(item[1]) == 1:
                    item[1][0] = _with_chunks(ch, item[1][0])
            except Exception as e:  # handed to the session, which raises it or ends
                item = e
            while not stop.is_set():
                try:
                    frames.put(item, timeout=1.0)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
    reader = threading.Thread(target=read, name="requests")
    reader.start()
    try:
        while True:
            item = frames.get()
            if isinstance(item, ConnectionError):
                return  # the client is done (or gone: a rerun resumes)
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        if reader.is_alive():
            ch.hang_up()  # (a read blocked on a live connection)
        reader.join()


# ---- pairing -------------------------------------------------------------------------------
def new_code() -> str:
    """Twelve digits (40 bits): one guess per pairing, so plenty."""
    n = secrets.randbelow(10**12)
    return f"{n // 10**8:04d}-{n // 10**4 % 10**4:04d}-{n % 10**4:04d}"


def pair_listen(store_path: Path, listen: str, code: str,
                ready: Callable[[tuple], None] = lambda a: None) -> str:
    """Wait for one vault to pair with the code shown here; returns its name."""
    host, port = address(listen)
    with socket.create_server((host, port)) as server:
        server.settimeout(PAIR_WAIT_S)
        ready(server.getsockname())
        conn, _ = server.accept()
        conn.settimeout(IDLE_S)
        with contextlib.closing(wire.Channel.over(conn)) as ch:
            return _pair(store_path, ch, code, False)


def pair_connect(store_path: Path, spec: str, code: str) -> str:
    host, port = address(spec)
    sock = socket.create_connection((host, port), timeout=IDLE_S)
    with contextlib.closing(wire.Channel.over(sock)) as ch:
        return _pair(store_path, ch, code, True)


def _pair(store_path: Path, ch: wire.Channel, code: str, client: bool) -> str:
    """SPAKE2 with the code as the password: both get a strong key only if both typed the
    same code, and an eavesdropper learns nothing to guess it offline with."""
    with Store.open(store_path) as store:
        my_id, my_name = uuid.UUID(store.id).bytes, vault_name(store)
    import spake2  # (only pairing needs it: imported here, not by every sync)

    side = (spake2.SPAKE2_A if client else spake2.SPAKE2_B)(code.strip().encode())
    mine = {"pair": side.start(), "id": my_id, "name": my_name}
    ch.send(mine)
    theirs = ch.recv()
    if not (isinstance(theirs, dict) and isinstance(theirs.get("pair"), bytes)
            and isinstance(theirs.get("id"), bytes) and len(theirs["id"]) == 16
            and isinstance(theirs.get("name"), str)):
        raise wire.ProtocolError("the other side is not pairing")
    try:
        key = side.finish(theirs["pair"])
    except Exception as e:  # spake2 raises its own errors on a bad message
        raise wire.ProtocolError(f"pairing failed: {e}") from None
    ids = (my_id, theirs["id"]) if client else (theirs["id"], my_id)
    transcript = b"".join(ids)
    ch.send(wire.confirm_tag(key, b"client" if client else b"server", transcript))
    tag = ch.recv()
    if not isinstance(tag, bytes) or not secrets.compare_digest(
            tag, wire.confirm_tag(key, b"server" if client else b"client", transcript)):
        raise wire.ProtocolError("pairing failed: the codes typed on the two sides differ")
    peers.add(store_path, theirs["id"], theirs["name"], wire.pair_key(key, ids))
    return theirs["name"]


def with_retries(attempt: Callable[[], T], retries: int,
                 on_retry: Callable[[Exception, float], None]) -> T:
    """Run `attempt` again after a lost connection, waiting longer each time: a rerun resumes
    where the last one stopped (engine.py)."""
    delay = 1.0
    for n in range(retries + 1):
        try:
            return attempt()
        except OSError as e:  # (ConnectionError, TimeoutError, socket.gaierror are OSErrors)
            if n == retries or e.errno in NOT_THE_LINK:
                raise
            on_retry(e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def open_peer(spec: str, store: Store, timeout: float = IDLE_S) -> Iterator[Endpoint | Remote]:
    """The other vault of a sync: tcp://host:port (a `vaultfs serve`), ssh://host/path (one
    started there over ssh), or the path of a store on this machine."""
    if spec.startswith("tcp://"):
        with connect(spec, store, timeout) as peer:
            yield peer
    elif spec.startswith("ssh://"):
        parts = urlsplit(spec)
        if not parts.hostname or not parts.path:
            raise StoreError(f"{spec!r} is not like ssh://user@host/path/to/store")
        host = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        cmd = ["ssh", "-p", str(parts.port or 22), "--", host, "vaultfs", "serve", "--stdio",
               shlex.quote(parts.path)]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            try:
                yield Remote(wire.Channel(proc.stdout, proc.stdin, trusted=True), b"")
            finally:
                proc.stdin.close()
                proc.wait(IDLE_S)
    else:
        try:
            other = Store.open(spec, writable=True)
        except StoreBusy:
            raise StoreError(f"{spec} is mounted; unmount it to sync with it") from None
        with other:
            endpoint = Endpoint(other)
            try:
                yield endpoint
            finally:
                endpoint.close()
