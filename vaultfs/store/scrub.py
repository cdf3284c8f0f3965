"""Scrubbing: re-reading and re-hashing the chunks of a set of files in the background, at a
pace that keeps a laptop cool, repairing what a second copy (a mirror) can mend, and keeping
what was found.

Results live in `meta` under `scrub.<tier>`: a JSON object {"finished_ns", "chunks", "bytes",
"damaged": [paths], "repaired": [paths], "mirror": {the same for the mirror's copies}} of the
tier's last completed scrub; every repair (by a scrub or a read) is also kept in `meta`
`repairs`, the latest MAX_REPAIRS of them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable

from . import format as F
from .codec import Digests
from .store import Store
from .verify import check_chunk

DUTY = 0.25  # the share of one core a scrub may use: it sleeps three times what it worked
MAX_REPAIRS = 100  # repairs kept in meta `repairs` for `vaultfs status`
META_REPAIRS = b"repairs"


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
        pace(t0, duty, stop)
    return chunks, nbytes, bad


def pace(t0: float, duty: float, stop: threading.Event | None) -> None:
    """After work begun at perf_counter() `t0`, sleep so that work takes `duty` of one core:
    (1 - duty) / duty times as long as it worked (cut short when `stop` is set)."""
    if duty < 1:
        pause = (time.perf_counter() - t0) * (1 - duty) / duty
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)


def repair(store: Store, chunk_ids: Iterable[bytes], source: Store
           ) -> tuple[set[bytes], dict[bytes, str]]:
    """Rewrite damaged chunks of `store` from copies of the same bytes in `source` (a vault's
    mirror, or a mirror's vault). A copy is found by both digests and checked (decoded, xxh3,
    BLAKE3, length) before it replaces the damaged value (Txn.repair_chunk), in a transaction
    that first looks again that the chunk is still stored and still damaged. Returns the
    chunks rewritten, and those that could not be with the reason (a chunk found sound again
    is in neither)."""
    repaired: set[bytes] = set()
    failed: dict[bytes, str] = {}
    for chunk_id in chunk_ids:
        with store.reader() as tx, source.reader() as other:
            rec = tx.chunk_record(chunk_id)
            if rec is None or rec.offline:
                failed[chunk_id] = "no longer stored (freed or evicted meanwhile)"
                continue
            copy_id = other.find_chunk(Digests(chunk_id[:F.HASH_LEN], rec.blake3))
            copy_rec = other.chunk_record(copy_id) if copy_id is not None else None
            if copy_rec is None or copy_rec.raw_len != rec.raw_len:
                failed[chunk_id] = f"{source.path} holds no copy of it"
                continue
            value = other.chunk_data(copy_id)
            why = check_chunk(value, copy_id, copy_rec)
            value = bytes(value) if why is None else b""
        if why:
            failed[chunk_id] = f"the copy in {source.path} is damaged too ({why})"
            continue

        def rewrite(tx, chunk_id: bytes = chunk_id, value: bytes = value) -> bool:
            rec = tx.chunk_record(chunk_id)
            if rec is None or rec.offline or \
                    check_chunk(tx.chunk_data(chunk_id), chunk_id, rec) is None:
                return False  # freed, evicted or mended meanwhile
            tx.repair_chunk(chunk_id, value)
            return True
        if store.write(rewrite):
            repaired.add(chunk_id)
    return repaired, failed


def note_repairs(store: Store, repairs: list[dict]) -> None:
    """Keep repairs for `vaultfs status`: {"at" (ns), "chunk" (hex), "paths", "copy" (which
    copy was mended: "vault" or "mirror"), "by" ("scrub" or "read")}, the latest MAX_REPAIRS."""
    def add(tx) -> None:
        kept = tx.meta(META_REPAIRS)
        kept = json.loads(bytes(kept)) if kept else []
        tx.put_meta(META_REPAIRS, json.dumps((kept + repairs)[-MAX_REPAIRS:]).encode())
    if repairs:
        store.write(add)


def repairs(store: Store) -> list[dict]:
    """The repairs kept by note_repairs, oldest first."""
    with store.reader() as tx:
        kept = tx.meta(META_REPAIRS)
        return json.loads(bytes(kept)) if kept else []


def record(store: Store, tier: str, chunks: int, nbytes: int, damaged: list[str],
           repaired: Iterable[str] = (), mirror: dict | None = None) -> dict:
    """Keep a tier's completed scrub: its chunks and bytes, the files still damaged, those
    repaired from the mirror, and (`mirror`) what the scrub of the mirror's copies found."""
    result = {"finished_ns": time.time_ns(), "chunks": chunks, "bytes": nbytes,
              "damaged": sorted(damaged), "repaired": sorted(repaired)}
    if mirror is not None:
        result["mirror"] = mirror
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
