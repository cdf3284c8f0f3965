"""Scrubbing: re-reading and re-hashing the chunks of a set of files in the background, at a
pace that keeps a laptop cool, and keeping what was found.

Results live in `meta` under `scrub.<tier>`: a JSON object {"finished_ns", "chunks", "bytes",
"damaged": [paths]} of the tier's last completed scrub.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable

from . import format as F
from .store import Store
from .verify import check_chunk

DUTY = 0.25  # the share of one core a scrub may use: it sleeps three times what it worked


def check(store: Store, chunk_ids: Iterable[bytes], duty: float = DUTY,
          stop: threading.Event | None = None) -> tuple[int, int, dict[bytes, str]]:
    """Re-read and re-hash chunks (blocking, paced), until done or `stop` is set. Returns
    (chunks, raw bytes, bad chunks with the reason). A chunk freed meanwhile is skipped."""
    chunks = nbytes = 0
    bad: dict[bytes, str] = {}
    for chunk_id in chunk_ids:
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        with store.reader() as tx:
            rec = tx.chunk_record(chunk_id)
            if rec is None or rec.offline:  # (freed meanwhile; evicted: a peer holds it)
                continue
            why = check_chunk(tx.chunk_data(chunk_id), chunk_id, rec)
        chunks += 1
        nbytes += rec.raw_len
        if why:
            bad[chunk_id] = why
        if duty < 1:
            pause = (time.perf_counter() - t0) * (1 - duty) / duty
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
    return chunks, nbytes, bad


def record(store: Store, tier: str, chunks: int, nbytes: int, damaged: list[str]) -> dict:
    result = {"finished_ns": time.time_ns(), "chunks": chunks, "bytes": nbytes,
              "damaged": sorted(damaged)}
    store.write(lambda tx: tx.put_meta(f"scrub.{tier}".encode(),
                                       json.dumps(result, sort_keys=True).encode()))
    return result


def results(store: Store) -> dict[str, dict]:
    """tier -> its last scrub's result."""
    with store.reader() as tx:
        with tx.txn.cursor(db=tx.dbs[F.DB_META]) as c:
            out = {}
            if c.set_range(b"scrub."):
                for k, v in c:
                    if not k.startswith(b"scrub."):
                        break
                    out[bytes(k[6:]).decode(errors="replace")] = json.loads(bytes(v))
    return out
