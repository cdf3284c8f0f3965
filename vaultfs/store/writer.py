"""The single owner of LMDB write transactions.

Callers submit functions that take a write `Txn`; one thread runs everything queued at that
moment in one transaction (group commit), each function in a nested transaction of its own so
that one failing function undoes only its own changes. The commit is synced to disk before any
caller hears of its result: a returned result means durable.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import lmdb

from .txn import Txn

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 32
LOW_SPACE = 32 * 1024 * 1024


class Writer:
    def __init__(self, env: lmdb.Environment, make_txn: Callable[[lmdb.Transaction], Txn]):
        self._env = env
        self._make_txn = make_txn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vaultfs-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Txn], T]) -> "Future[T]":
        """Queue `fn` for the next commit."""
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        return fut

    def call(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in a committed write transaction and wait for it (for blocking callers)."""
        return self.submit(fn).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except BaseException as e:  # noqa: BLE001 - the writer must outlive any batch
                log.exception("store writer: a batch failed unexpectedly")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)

    def _commit(self, batch: list) -> None:
        results = []
        try:
            with self._env.begin(write=True) as parent:
                for fn, fut in batch:
                    try:
                        with self._env.begin(write=True, parent=parent) as child:
                            results.append((fut, fn(self._make_txn(child)), None))
                    except BaseException as e:  # noqa: BLE001 - handed to its caller
                        results.append((fut, None, e))
        except lmdb.Error as e:
            # LMDB reports a short write on a full disk as EIO; tell the two apart.
            st = os.statvfs(self._env.path())
            if st.f_bavail * st.f_frsize < LOW_SPACE:
                store = os.path.dirname(self._env.path())
                e = OSError(errno.ENOSPC, f"the disk of the store {store} is full ({e})")
                log.warning("store commit refused: %s", e.strerror)
            else:
                log.error("store commit failed: %s", e)
            for _, fut in batch:
                fut.set_exception(e)
            return
        for fut, value, exc in results:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
