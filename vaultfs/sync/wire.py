"""The bytes between two vaults (docs/sync-protocol.md): length-prefixed frames of msgpack,
zstd-compressed where that helps, sealed with ChaCha20-Poly1305 once the handshake proved that
both sides hold the pairing secret.

Handshake (both sides hold a 32-byte secret from `vaultfs pair`): each sends, in the clear, its
vault id, a fresh X25519 public key and a nonce. The keys of the session are HKDF-SHA256 of
the X25519 shared secret and the pairing secret, salted with both hellos; then each side sends
a sealed confirmation. A side without the secret cannot make or open a frame, so it reads
nothing and writes nothing; an eavesdropper who later learns the secret still cannot read a
recorded session (the X25519 keys are thrown away).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Sequence

import msgpack
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..store import StoreError

MAX_FRAME = 256 * 1024 * 1024
ZSTD_FLAG = 1 << 31     # in a frame's length word: the payload is one zstd frame
RAW_FLAG = 1 << 30      # the payload is raw bytes (a chunk attached to a message), not msgpack
LENGTH_MASK = RAW_FLAG - 1
MAX_OPEN_FRAME = 4096   # before the channel is sealed: hellos and pairing messages only
SLICE = 1024 * 1024     # bytes per socket call
BUFFER = 256 * 1024     # small frames gather in a buffer this large; larger ones pass through
COMPRESS_MIN = 1024
CONFIRM = b"vaultfs sync 1 ready"
# 2 (after 1): chunks as raw frames after the message that names them, store format 4's codec,
# entries that say whether a file is offline, `rely`.
PROTOCOL = 3
MAX_ATTACHMENTS = 65536


Buffer = bytes | bytearray | memoryview


class ProtocolError(StoreError):
    """The other side sent something that is not this protocol, or could not authenticate."""


class Channel:
    """Frames over a connected socket (or a pair of pipes: `vaultfs serve --stdio`)."""

    def __init__(self, rfile, wfile, sock: socket.socket | None = None, trusted: bool = False):
        self.rfile, self.wfile, self.sock = rfile, wfile, sock
        # Trusted: the transport authenticated the other side (ssh), or the handshake did.
        self.trusted = trusted
        self._seal: tuple[ChaCha20Poly1305, ChaCha20Poly1305] | None = None
        self._counters = [0, 0]     # frames sent, frames received: the AEAD nonces
        self._way = 0               # the nonces' direction: 0 client to server, 1 back
        self.sent = self.received = 0

    @classmethod
    def over(cls, sock: socket.socket) -> "Channel":
        # Frames are written whole and flushed once a message (with its chunks) is out: no
        # small segment waits for a delayed ACK (Nagle), and many small chunks share a send.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock.makefile("rb", buffering=BUFFER), sock.makefile("wb", buffering=BUFFER),
                   sock)

    def hang_up(self) -> None:
        """End the connection from another thread: a call blocked on it fails at once."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # (gone already)

    def close(self) -> None:
        """Hang up (a socket's file objects keep it open until they are closed too)."""
        for f in (self.rfile, self.wfile):
            try:
                f.close()
            except OSError:
                pass  # (a write that the other side's hang-up cut short)
        if self.sock is not None:
            self.sock.close()

    # ---- frames -----------------------------------------------------------------------------
    def send(self, obj, compress: bool = True, attachments: Sequence[Buffer] = ()) -> None:
        """Send a message, then each of `attachments` (chunks) as a raw frame of its own:
        nothing copies them into the message, and the other side can open each as it comes."""
        body = msgpack.packb(obj, use_bin_type=True)
        flags = 0
        if compress and len(body) >= COMPRESS_MIN:
            packed = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(body)
            if len(packed) < len(body) * 0.9:
                body, flags = packed, ZSTD_FLAG
        self._send_frame(body, flags)
        for a in attachments:
            self._send_frame(a, RAW_FLAG)
        self.wfile.flush()

    def recv(self):
        """The next message (never an attachment)."""
        body, flags = self._recv_frame()
        try:
            if flags & RAW_FLAG:
                raise ValueError("a chunk where a message was due")
            if flags and not self.trusted:
                raise ValueError("no compressed frames before the session is sealed")
            if flags:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_FRAME)
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, zstandard.ZstdError, msgpack.UnpackException) as e:
            raise ProtocolError(f"the other side sent a malformed frame ({e})") from None

    def recv_attachments(self, n: int) -> list[bytes]:
        """The `n` raw frames that follow a message, at most MAX_FRAME bytes together."""
        if n > MAX_ATTACHMENTS:
            raise ProtocolError("the other side sent a malformed frame (too many chunks)")
        out, total = [], 0
        for _ in range(n):
            body, flags = self._recv_frame()
            total += len(body)
            if flags != RAW_FLAG or total > MAX_FRAME:
                raise ProtocolError("the other side sent a malformed frame (a message where "
                                    "a chunk was due, or too many chunks)")
            out.append(bytes(body))
        return out

    def _send_frame(self, body: Buffer, flags: int) -> None:
        sealed = 16 if self._seal is not None else 0
        if len(body) + sealed > MAX_FRAME:
            raise ProtocolError("a message larger than the protocol allows")
        header = struct.pack(">I", (len(body) + sealed) | flags)
        if self._seal is not None:  # (the header is authenticated too)
            body = self._seal[0].encrypt(self._nonce(0), body, header)
        self._write(header, body)

    def _recv_frame(self) -> tuple[Buffer, int]:
        header = self._read(4)
        (word,) = struct.unpack(">I", header)
        length, flags = word & LENGTH_MASK, word & ~LENGTH_MASK
        if length > (MAX_FRAME if self.trusted else MAX_OPEN_FRAME):
            raise ProtocolError("the other side sent a frame larger than the protocol allows")
        body = self._read(length)
        if self._seal is not None:
            try:
                body = self._seal[1].decrypt(self._nonce(1), body, header)
            except InvalidTag:
                raise ProtocolError("a frame failed authentication: the other side does not "
                                    "hold this pairing, or the link changed the data") from None
        return body, flags

    def _nonce(self, receiving: int) -> bytes:
        """A frame's nonce: its direction and its number in that direction (never reused)."""
        n = self._counters[receiving]
        self._counters[receiving] += 1
        return struct.pack(">IQ", self._way ^ receiving, n)

    def _write(self, header: bytes, body: Buffer) -> None:
        self.wfile.write(header)
        view = memoryview(body)
        for i in range(0, len(view), SLICE):
            self.wfile.write(view[i:i + SLICE])
        self.sent += len(header) + len(body)

    def _read(self, n: int) -> bytearray:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            part = self.rfile.readinto(view[got:got + SLICE])
            if not part:
                raise ConnectionError("the other side closed the connection")
            got += part
        self.received += n
        return out

    # ---- the handshake ----------------------------------------------------------------------
    def handshake(self, my_id: bytes, client: bool, secret_for) -> bytes:
        """Authenticate and seal the channel; returns the other vault's id. `secret_for(id)`
        gives the pairing secret shared with a vault, or None."""
        key = X25519PrivateKey.generate()
        mine = {"id": my_id, "key": key.public_key().public_bytes_raw(),
                "nonce": os.urandom(16), "protocol": PROTOCOL}
        if client:
            self.send(mine)
            theirs = self.recv()
        else:
            theirs = self.recv()
        if not isinstance(theirs, dict) or "error" in theirs:
            raise ProtocolError(str(theirs.get("error") if isinstance(theirs, dict) else
                                    "the other side is not a vaultfs vault"))
        peer, their_key = theirs.get("id"), theirs.get("key")
        if not (isinstance(peer, bytes) and len(peer) == 16 and isinstance(their_key, bytes)
                and len(their_key) == 32 and isinstance(theirs.get("nonce"), bytes)):
            raise ProtocolError("the other side is not a vaultfs vault")
        if theirs.get("protocol") != PROTOCOL:
            raise ProtocolError(f"the other vault speaks sync protocol {theirs.get('protocol')}, "
                                f"this one {PROTOCOL}: run the same vaultfs release on both")
        secret = secret_for(peer)
        if not client:
            if secret is None:
                self.send({"error": "this vault is not paired with the vault that connected; "
                                    "pair them first (vaultfs pair)"})
                raise ProtocolError("a vault that is not paired connected; refused")
            self.send(mine)
        elif secret is None:
            raise ProtocolError("this vault is not paired with the other; pair them first "
                                "(vaultfs pair)")
        hellos = [mine, theirs] if client else [theirs, mine]
        salt = hashlib.sha256(b"".join(msgpack.packb(h, use_bin_type=True) for h in hellos))
        shared = key.exchange(X25519PublicKey.from_public_bytes(their_key))
        keys = HKDF(hashes.SHA256(), 64, salt.digest(), b"vaultfs sync keys").derive(
            shared + secret)
        c2s, s2c = ChaCha20Poly1305(keys[:32]), ChaCha20Poly1305(keys[32:])
        self._seal = (c2s, s2c) if client else (s2c, c2s)
        self._way = 0 if client else 1
        if client:
            self.send(CONFIRM)
            try:
                reply = self.recv()
            except ConnectionError:
                raise ProtocolError("the other vault hung up on this one's credentials: its "
                                    "pairing with this vault is gone or different; pair them "
                                    "again (vaultfs pair)") from None
        else:
            reply = self.recv()
            if reply == CONFIRM:
                self.send(CONFIRM)
        if reply != CONFIRM:
            raise ProtocolError("the other side did not confirm the session")
        self.trusted = True
        return peer


def pair_key(key: bytes, ids: tuple[bytes, bytes]) -> bytes:
    """The long-term secret two vaults keep from a pairing (SPAKE2's key, bound to both ids)."""
    return HKDF(hashes.SHA256(), 32, None, b"vaultfs pairing " + ids[0] + ids[1]).derive(key)


def confirm_tag(key: bytes, who: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, who + transcript, hashlib.sha256).digest()
