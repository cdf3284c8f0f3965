"""Recompressing: a tier's chunks encoded again at a stronger zstd level, in the background.

Chunks are compressed at ingest at the fast level (codec.DEFAULT_LEVEL); a tier may ask for a
stronger one (`compression` in vault.toml), and which files that concerns is known only once
their metadata is read (media/catalog.py). For each version handed here, each of its stored
chunks is encoded again in the same form at the tier's level (codec.recoded), checked (decoded,
both digests, the length: verify.check_chunk), and replaces the stored value only when it is
smaller (Txn.recompress_chunk, which looks again in its own transaction). A chunk shared with
files of other tiers simply gets the stronger form; an offline chunk (evicted, its bytes on a
peer) is skipped, and so is a raw one (zstd did not shrink it at ingest). Once every chunk of a
version is done, its media record keeps the level (MEDIA_KEY), so that the work is not done
again; a version in a tier of a stronger level later is done again at that level.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .codec import ChunkCorrupt, decode, recoded
from .format import ChunkRecord
from .scrub import DUTY, pace
from .store import Store
from .verify import check_chunk

# The key of a version's media record (docs/store-format.md §8.6): the zstd level its stored
# chunks were last compressed at, when above the ingest level.
MEDIA_KEY = "compression_level"


@dataclass
class Result:
    versions: int = 0      # whose every chunk was looked at, and the level recorded
    chunks: int = 0        # encoded again
    replaced: int = 0      # of them, stored in the smaller form
    saved_bytes: int = 0   # stored bytes saved (stat.stored_bytes went down by this)
    raw_bytes: int = 0     # raw bytes of the chunks encoded again


def recompress(store: Store, versions: Iterable[tuple[int, int]], duty: float = DUTY,
               stop: threading.Event | None = None) -> Result:
    """Encode again the chunks of each (version, level) at that level, paced to `duty` of one
    core (it sleeps (1 - duty) / duty times what it worked), until done or `stop` is set (a
    version cut short keeps no level, and is done again later; its chunks already replaced
    stay, and come out no smaller a second time)."""
    out = Result()
    done: dict[bytes, int] = {}  # chunk -> the level it was encoded at by this call
    for version, level in versions:
        with store.reader() as tx:
            chunk_ids = [c for _, c, _ in tx.extents(version)]
        for chunk_id in chunk_ids:
            if stop is not None and stop.is_set():
                return out
            if done.get(chunk_id, 0) >= level:
                continue
            t0 = time.perf_counter()
            _chunk(store, chunk_id, level, out)
            done[chunk_id] = level
            pace(t0, duty, stop)
        if store.write(lambda tx: _note_level(tx, version, level)):
            out.versions += 1
    return out


def _chunk(store: Store, chunk_id: bytes, level: int, out: Result) -> None:
    with store.reader() as tx:
        rec = tx.chunk_record(chunk_id)
        if rec is None or rec.offline:  # (freed meanwhile; evicted: a peer holds it)
            return
        value = bytes(tx.chunk_data(chunk_id))
    try:
        raw = decode(chunk_id, value, rec.raw_len)
    except ChunkCorrupt:
        return  # damaged: the scrub reports and mends it; nothing to recompress from
    new = recoded(value, raw, level)
    if new is None:
        return
    out.chunks += 1
    out.raw_bytes += rec.raw_len
    if len(new) >= len(value) or \
            check_chunk(new, chunk_id, ChunkRecord(rec.refcount, rec.raw_len, len(new) - 1,
                                                   rec.blake3)) is not None:
        return
    saved = store.write(lambda tx: tx.recompress_chunk(chunk_id, rec.blake3, new))
    if saved:
        out.replaced += 1
        out.saved_bytes += saved


def _note_level(tx, version: int, level: int) -> bool:
    record = tx.media(version)
    if record is None or tx.version(version) is None:  # (dropped meanwhile)
        return False
    if record.get(MEDIA_KEY, 0) < level:
        record[MEDIA_KEY] = level
        tx.put_media(version, record)
    return True
