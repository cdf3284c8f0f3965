"""The vaults a vault is paired with: STORE/peers.json, readable only by its owner.

    {"<peer id, 32 hex digits>": {"name": "...", "secret": "<64 hex digits>", "paired_ns": N}}

The secret is what a TCP peer must prove it holds (wire.Channel.handshake). It is not in LMDB:
pairing does not need the store's writer, and a copy of the store's data is not a key to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..store import StoreError
from ..store.store import write_durably

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
    write_durably(store_path / FILE, json.dumps(doc, indent=1), 0o600)
