"""Reading images in a child process. Exiv2, LibRaw, libheif, libjpeg and Pillow parse whatever
bytes were written to the mount: a crafted or damaged file can make them allocate gigabytes (a
tiny progressive JPEG that claims 13000x13000 pixels) or crash. In the mount's own process either
would end the mount, and the file, still unanalysed, would end the next one too. So the media
functions (metadata, fingerprints, previews) run in a worker process whose data segment is
bounded; a crash or a refused allocation costs that file its record, which says why.

A file's bytes reach the worker through a memfd that the worker opens by its /proc path, not
through the pool's pipe: pickling 24 MB and pushing it through a pipe took 80 ms of the mount's
CPU per call, a fifth of its work during a capture; a memfd costs one copy each side (15 ms),
and serves every call made about the same bytes. Bytes left unread (a RAW's sensor data, when
only its metadata and preview are wanted) are holes in it: zeros that cost no copy.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import select
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from ..store.reader import Pieces

T = TypeVar("T")

MEMORY_LIMIT = 1536 << 20   # a RAW of 100 Mpx is demosaiced at half size within this
# Then a fresh process: what the libraries kept goes back. (Its resident set grew from 138 to
# 176 MiB over 1,250 calls about the corpus and DNGs, then stayed; a fresh one costs 0.25 CPU s.)
TASKS_PER_WORKER = 1000
# Reading images follows the commits; it may fall behind, never hold them up: when the cores
# are busy, the kernel gives the worker what the mount leaves.
NICE = 19


class DecoderFailed(Exception):
    """The worker died reading a file (a crash in a decoding library): the message says how."""


def _worker_start(mount_pid: int) -> None:
    """In the worker: bound its memory, and end it when the mount's process ends, however it
    ends (a `kill -9` leaves the worker's queue open for ever: it would wait on it alone)."""
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.nice(NICE)
    # Read before numpy and scipy are first imported here (by the first call): their OpenBLAS
    # threads spun between the worker's calls, 2% of a card import's CPU, for no gain.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        mount = os.pidfd_open(mount_pid)
    except ProcessLookupError:
        os._exit(0)

    def watch() -> None:
        select.select([mount], [], [])  # readable once that process has ended
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="watch-mount").start()


def _call(fn: Callable[..., T], path: str, size: int, args: tuple) -> T:
    """In the worker: fn(the bytes of the mount's memfd at `path`, *args)."""
    with open(path, "rb", buffering=0) as f:
        data = f.readall()
    if len(data) != size:
        raise OSError(f"the bytes to decode arrived with {len(data)} of {size} bytes")
    return fn(data, *args)


class Shared:
    """Bytes handed to the worker once (`Decoder.shared`): run(fn, *args) calls fn(data,
    *args) there. `path` names, for the worker, a file that holds the same bytes: for a library
    that reads only what it needs of a file (Exiv2 copies bytes handed to it whole first: 22 ms
    of a 24 MB RAW, against 0.2 ms from the file)."""

    def __init__(self, decoder: "Decoder", fd: int, size: int):
        self._decoder, self._size = decoder, size
        self.path = f"/proc/{os.getpid()}/fd/{fd}"

    def __call__(self, fn: Callable[..., T], *args) -> T:
        return self._decoder._run(_call, fn, self.path, self._size, args)


class Decoder:
    """One worker process, started when first needed and again after a crash."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[..., T], data: bytes, *args) -> T:
        """fn(data, *args) in the worker (fn and args must pickle; its exceptions come back
        as they are); DecoderFailed when the worker dies."""
        with self.shared(data) as run:
            return run(fn, *args)

    @contextlib.contextmanager
    def shared(self, data: bytes | Pieces) -> Iterator[Shared]:
        """`data` handed over once for all the calls made with what this gives (run(fn, *args)
        calls fn(data, *args) in the worker, as __call__ does)."""
        pieces = data if isinstance(data, Pieces) else Pieces(len(data), [(0, data)])
        fd = os.memfd_create("vaultfs-decode", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, pieces.size)  # what is not written reads as zeros, in no memory
            for off, piece in pieces.pieces:
                view = memoryview(piece)
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
            yield Shared(self, fd, pieces.size)
        finally:
            os.close(fd)

    def _run(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_start, initargs=(os.getpid(),),
                    max_tasks_per_child=TASKS_PER_WORKER)
            pool = self._pool
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False)
            raise DecoderFailed("the image decoder crashed on it") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
