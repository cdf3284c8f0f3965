"""The durable layer: one LMDB environment of chunks, inodes, directories and extents."""

from .codec import ChunkCorrupt
from .format import ROOT_INO, Inode
from .store import Store, StoreBusy, is_store
from .txn import StoreError, Txn

__all__ = ["ChunkCorrupt", "ROOT_INO", "Inode", "Store", "StoreBusy", "StoreError", "Txn",
           "is_store"]
