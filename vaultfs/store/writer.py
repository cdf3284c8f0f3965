"""The single owner of LMDB write transactions.

Callers submit functions that take a write `Txn`; one thread runs everything queued at that
moment in one transaction (group commit). If one function fails, the transaction is aborted and
the batch is run again one function per transaction, so that a failure undoes only its own
changes (LMDB's nested transactions would do this, but they cannot be used with WRITEMAP, which
doubles the write rate). The commit is synced to disk before any caller hears of its result: a
returned result means durable.

With WRITEMAP, LMDB writes straight into a sparse, memory-mapped file; a page that the disk has
no room for would kill the process with SIGBUS instead of returning an error. So before every
transaction the writer reserves the blocks it may touch with posix_fallocate, which fails
cleanly with ENOSPC.
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
# Room for the B-tree pages a batch touches besides the values it stores.
SLACK = 4 * 1024 * 1024
RESERVE_STEP = 64 * 1024 * 1024


class Writer:
    def __init__(self, env: lmdb.Environment, dbs: dict, grow_map: Callable[[int], None]):
        self._env = env
        self._dbs = dbs
        self._grow_map = grow_map
        self._data_fd = os.open(os.path.join(env.path(), "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
        self._reserved = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vaultfs-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Txn], T], nbytes: int = 0) -> "Future[T]":
        """Queue `fn` for the next commit; `nbytes` is about how much it will store."""
        fut: Future[T] = Future()
        self._queue.put((fn, fut, nbytes))
        return fut

    def call(self, fn: Callable[[Txn], T], nbytes: int = 0) -> T:
        """Run `fn` in a committed write transaction and wait for it (for blocking callers)."""
        return self.submit(fn, nbytes).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        os.close(self._data_fd)

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
            if not self._commit(batch, fail_fast=True):
                for item in batch:
                    self._commit([item], fail_fast=False)

    def _commit(self, batch: list, fail_fast: bool) -> bool:
        """Run a batch in one transaction. With `fail_fast`, return False (changing nothing,
        answering nobody) as soon as a function raises; otherwise hand its error to it."""
        try:
            self._reserve(sum(nbytes for _, _, nbytes in batch))
            results = []
            with self._env.begin(write=True) as t:  # aborted by any exception
                for fn, fut, _ in batch:
                    try:
                        results.append((fut, fn(Txn(t, self._dbs))))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        raise _FnFailed(e) from None
        except _FnFailed as e:
            if fail_fast:
                return False
            batch[0][1].set_exception(e.error)
            return True
        except (lmdb.Error, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                log.warning("store commit refused: %s", e.strerror)
            else:
                log.error("store commit failed: %s", e)
            for _, fut, _ in batch:
                fut.set_exception(e)
            return True
        for fut, value in results:
            fut.set_result(value)
        return True

    def _reserve(self, nbytes: int) -> None:
        """Make sure the data file's blocks up to where this transaction may write exist."""
        info, stat = self._env.info(), self._env.stat()
        end = (info["last_pgno"] + 1) * stat["psize"] + nbytes + SLACK
        self._grow_map(end)
        if end <= self._reserved:
            return
        # In steps rather than per transaction; near a full disk, just what is needed.
        for size in (max(end, self._reserved + RESERVE_STEP), end):
            try:
                os.posix_fallocate(self._data_fd, 0, size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                continue
            self._reserved = size
            return
        raise OSError(errno.ENOSPC, "the store's disk is full")


class _FnFailed(Exception):
    def __init__(self, error: BaseException):
        self.error = error
