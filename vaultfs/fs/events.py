"""What happens to files, as it happens, for whoever listens on the mount's control socket
(`vaultfs events`, vaultfs.client): one JSON object per event with at least `event`, `path`
(relative to the mount root) and `time` (Unix seconds).

    committed   the file's new content is in the store (close, fsync, rename into place)
    verified    ...and has been read back from the store and matched its digests
    mirrored    ...and the mirror holds it too (a tier with two copies; `version`, `copies`)
    analysed    its metadata is in the index (with its rating and label when it has them)
    fingerprinted  an image's fingerprint is in the index (`phash`, `whash`, and `preview`:
                whether .vault/previews serves one), or `error` says why it has none
    tiered      the file's tier is known (its metadata read), or has changed since (a rating,
                label or pick in it or in a sidecar, a tag, a rename): `tier`, and `from` (the
                tier before) when it changed
    burst       an image joined a burst or bracket (`group`: its folder in .vault/bursts,
                `kind`, `files`: how many it holds now)
    renamed     a committed file got its name by a rename (`from`: the path it had): its
                writer's, from a temporary name, or an on-capture policy's
    error       something failed for this file (`error` says what)

A path (or any other text) that is not UTF-8, as a file name may be, is valid JSON all the
same: its bytes that are not UTF-8 are written `\\xNN` in it, for people, and the exact bytes are
in a field of the same name with `_b64` added, in base64 (`"path": "caf\\xe9.JPG", "path_b64":
"Y2Fm6S5KUEc="`), for programs.

A listener that does not keep up loses its subscription (an `overflow` event says so) rather
than slowing the mount down. Everything here runs on the trio loop.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable

import trio

QUEUE = 4096  # events a listener may lag behind before it is cut off
SEND_TIMEOUT = 30.0  # seconds a listener may take to accept one event


class Events:
    def __init__(self) -> None:
        self._listeners: set[trio.MemorySendChannel] = set()

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    def publish(self, event: str, path: str, **details) -> None:
        message = {"event": event, "path": path, "time": time.time(), **details}
        for key, value in list(message.items()):
            if isinstance(value, str) and not _unicode(value):  # bytes of a name, escaped
                try:
                    raw = value.encode(errors="surrogateescape")
                except UnicodeEncodeError:  # a lone surrogate that no name's bytes give
                    raw = value.encode(errors="surrogatepass")
                message[key] = raw.decode(errors="backslashreplace")
                message[key + "_b64"] = base64.b64encode(raw).decode()
        for listener in list(self._listeners):
            try:
                listener.send_nowait(message)
            except trio.WouldBlock:
                self._listeners.discard(listener)
                listener.close()  # the listener's loop ends: it is told below
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.discard(listener)  # it went away a moment ago

    async def listen(self, send: Callable[[dict], Awaitable[None]]) -> None:
        """Hand every event to `send` until it fails (the client went away)."""
        tx, rx = trio.open_memory_channel(QUEUE)
        self._listeners.add(tx)
        try:
            async with rx:
                async for message in rx:
                    with trio.move_on_after(SEND_TIMEOUT) as late:
                        await send(message)
                    if late.cancelled_caught:
                        return  # a client that stopped reading
            with trio.move_on_after(SEND_TIMEOUT):
                await send({"event": "overflow", "path": "", "time": time.time(),
                            "error": "events came faster than this listener read them"})
        finally:
            self._listeners.discard(tx)


def _unicode(text: str) -> bool:
    """Whether `text` is Unicode throughout (no byte of a name that is not UTF-8 in it)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
