"""The vaults a vault is paired with: STORE/peers.json, readable only by its owner.

    {"<peer id, 32 hex digits>": {"name": "...", "secret": "<64 hex digits>", "paired_ns": N}}

The secret is what a TCP peer must prove it holds (wire.Channel.handshake). It is not in LMDB:
pairing does not need the store's writer, and a copy of the store's data is not a key to it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..store import StoreError

FILE = "peers.json"


def load(store_path: Path) -> dict[bytes, dict]:
    path = store_path / FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON: {e}") from None
    return {bytes.fromhex(k): v for k, v in doc.items()}


def secret(store_path: Path, peer: bytes) -> bytes | None:
    found = load(store_path).get(peer)
    return bytes.fromhex(found["secret"]) if found else None


def add(store_path: Path, peer: bytes, name: str, key: bytes) -> None:
    """Remember a pairing (replacing an earlier one with the same vault), durably."""
    doc = {k.hex(): v for k, v in load(store_path).items()}
    doc[peer.hex()] = {"name": name, "secret": key.hex(), "paired_ns": time.time_ns()}
    tmp = store_path / (FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store_path / FILE)
    dfd = os.open(store_path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
