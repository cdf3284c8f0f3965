"""The on-disk record layouts of the store (documented in docs/store-format.md).

Every integer is big-endian so that LMDB's byte-wise key order is numeric order. Keeping the
packing in one module means a format change touches one file, and the document can point here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FORMAT_VERSION = 1

# Named LMDB databases inside the one environment.
DB_META = b"meta"
DB_INODES = b"inodes"
DB_DIRENTS = b"dirents"
DB_DIRLIST = b"dirlist"
DB_EXTENTS = b"extents"
DB_XATTRS = b"xattrs"
DB_CHUNKS = b"chunks"
DB_CHUNKDATA = b"chunkdata"
DB_PENDING = b"pending"
ALL_DBS = (DB_META, DB_INODES, DB_DIRENTS, DB_DIRLIST, DB_EXTENTS, DB_XATTRS,
           DB_CHUNKS, DB_CHUNKDATA, DB_PENDING)

ROOT_INO = 1

# Keys of the meta database.
META_FORMAT = b"format_version"
META_UUID = b"uuid"
META_NEXT_INO = b"next_ino"
META_NEXT_ENTRY = b"next_entry"
META_NEXT_PENDING = b"next_pending"
# Counters, kept exact inside the same transactions that change what they count.
STAT_FILES = b"stat.files"                # regular-file inodes (unlinked but open ones too)
STAT_LOGICAL = b"stat.logical_bytes"      # bytes of file data referenced by extents
STAT_UNIQUE = b"stat.unique_bytes"        # raw bytes of distinct chunks
STAT_STORED = b"stat.stored_bytes"        # bytes of chunk payloads as stored (compressed)
STAT_CHUNKS = b"stat.chunks"              # distinct chunks
COUNTERS = (STAT_FILES, STAT_LOGICAL, STAT_UNIQUE, STAT_STORED, STAT_CHUNKS)

U64 = struct.Struct(">Q")
U64x2 = struct.Struct(">QQ")


def u64(n: int) -> bytes:
    return U64.pack(n)


def from_u64(b: bytes) -> int:
    return U64.unpack(b)[0]


# ---- chunks -------------------------------------------------------------------------------
# A chunk id is the xxh3-128 digest of the chunk's raw bytes followed by one collision byte.
# The byte is 0 unless another chunk with the same xxh3-128 but different content (told apart
# by the BLAKE3 digest kept in its record) was stored first; then it is the next free value.
CHUNK_ID_LEN = 17
HASH_LEN = 16

CODEC_RAW = 0
CODEC_ZSTD = 1

# chunks: id -> refcount u64, raw length u32, stored length u32, BLAKE3-128 digest of raw bytes
CHUNK_REC = struct.Struct(">QII16s")


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    refcount: int
    raw_len: int
    stored_len: int
    blake3: bytes

    def pack(self) -> bytes:
        return CHUNK_REC.pack(self.refcount, self.raw_len, self.stored_len, self.blake3)

    @classmethod
    def unpack(cls, b: bytes) -> "ChunkRecord":
        return cls(*CHUNK_REC.unpack(b))


# chunkdata: id -> codec u8 + payload (the payload is the zstd frame, or the raw bytes).

# ---- extents ------------------------------------------------------------------------------
# extents: ino u64 + file offset u64 -> chunk id (17 bytes) + length u32.
# Extents of one file never overlap; a gap between them is a hole that reads as zeros.
EXTENT_VAL = struct.Struct(">17sI")


def extent_key(ino: int, offset: int) -> bytes:
    return U64x2.pack(ino, offset)


# ---- inodes -------------------------------------------------------------------------------
# inodes: ino u64 -> mode u32, uid u32, gid u32, nlink u32, size u64, rdev u64,
#                     atime_ns i64, mtime_ns i64, ctime_ns i64, data_bytes u64,
#                     then the symlink target bytes.
INODE_REC = struct.Struct(">IIIIQQqqqQ")


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    data_bytes: int = 0  # bytes held by extents (holes excluded): what st_blocks counts
    target: bytes = field(default=b"")

    def pack(self) -> bytes:
        return INODE_REC.pack(self.mode, self.uid, self.gid, self.nlink, self.size, self.rdev,
                              self.atime_ns, self.mtime_ns, self.ctime_ns,
                              self.data_bytes) + self.target

    @classmethod
    def unpack(cls, ino: int, b: bytes) -> "Inode":
        head = INODE_REC.unpack_from(b)
        return cls(ino, *head, target=bytes(b[INODE_REC.size:]))


# ---- directories --------------------------------------------------------------------------
# dirents: parent ino u64 + name -> entry id u64 + child ino u64   (lookup by name)
# dirlist: parent ino u64 + entry id u64 -> name                    (readdir in creation order)
# Entry ids only grow, so a readdir offset stays valid while entries come and go.


def dirent_key(parent: int, name: bytes) -> bytes:
    return u64(parent) + name


# ---- xattrs -------------------------------------------------------------------------------
# xattrs: ino u64 + attribute name -> value


# ---- pending ------------------------------------------------------------------------------
# pending: ino u64 + sequence u64 -> chunk id. A reference taken on a chunk by a file commit that
# spans several transactions. The final transaction of the commit turns the pending references
# into extents; after a crash, the next open of the store drops them (and frees what they held).
