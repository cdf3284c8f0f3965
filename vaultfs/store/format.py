"""The on-disk record layouts of the store (documented in docs/store-format.md).

Every integer is big-endian so that LMDB's byte-wise key order is numeric order. Keeping the
packing in one module means a format change touches one file, and the document can point here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FORMAT_VERSION = 4

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
DB_VERSIONS = b"versions"
DB_TIMELINES = b"timelines"
DB_EPOCHS = b"epochs"
DB_BRANCHES = b"branches"
DB_SNAPSHOTS = b"snapshots"
DB_MEDIA = b"media"
DB_SYNCBASE = b"syncbase"
DB_HELD = b"held"
DB_RELIED = b"relied"
DB_PREVIEWS = b"previews"
ALL_DBS = (DB_META, DB_INODES, DB_DIRENTS, DB_DIRLIST, DB_EXTENTS, DB_XATTRS,
           DB_CHUNKS, DB_CHUNKDATA, DB_PENDING, DB_VERSIONS, DB_TIMELINES, DB_EPOCHS, DB_BRANCHES,
           DB_SNAPSHOTS, DB_MEDIA, DB_SYNCBASE, DB_HELD, DB_RELIED, DB_PREVIEWS)
# Added after a format's first stores were made: a writable open creates them, a reader that
# finds one missing sees it empty.
LATER_DBS = (DB_MEDIA, DB_SYNCBASE, DB_HELD, DB_RELIED, DB_PREVIEWS)
# Records of these databases are versioned by epoch (see "Epochs" below).
VERSIONED_DBS = (DB_INODES, DB_DIRENTS, DB_DIRLIST, DB_XATTRS)

ROOT_INO = 1
# Pending references of this (never allocated) inode hold the chunks a sync received for files
# it has not applied yet: kept across a crash so that a rerun need not send them again.
INBOX_INO = 0

# Keys of the meta database.
META_FORMAT = b"format_version"
META_UUID = b"uuid"
META_NEXT_INO = b"next_ino"
META_NEXT_ENTRY = b"next_entry"
META_NEXT_PENDING = b"next_pending"
META_NEXT_EPOCH = b"next_epoch"
META_NEXT_VERSION = b"next_version"
META_CONFLICTS = b"sync.conflicts"  # JSON: the conflicts syncs kept both sides of
META_EPOCH_GEN = b"epoch_gen"  # bumped whenever an existing epoch's parent changes
# Counters, kept exact inside the same transactions that change what they count.
STAT_FILES = b"stat.files"                # regular-file inodes (unlinked but open ones too)
STAT_LOGICAL = b"stat.logical_bytes"      # bytes of file data in extents (all versions)
STAT_UNIQUE = b"stat.unique_bytes"        # raw bytes of distinct chunks
STAT_STORED = b"stat.stored_bytes"        # bytes of chunk payloads as stored (compressed)
STAT_CHUNKS = b"stat.chunks"              # distinct chunks
STAT_OFFLINE = b"stat.offline_bytes"      # raw bytes of chunks evicted (held by a peer only)
COUNTERS = (STAT_FILES, STAT_LOGICAL, STAT_UNIQUE, STAT_STORED, STAT_CHUNKS, STAT_OFFLINE)

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
CODEC_SAMPLES = 2  # a predictor per colour channel, then zstd (format 4 on)

# chunks: id -> refcount u64, raw length u32, stored length u32, BLAKE3-128 digest of raw bytes
CHUNK_REC = struct.Struct(">QII16s")


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    refcount: int
    raw_len: int
    stored_len: int
    blake3: bytes

    @property
    def offline(self) -> bool:
        """Evicted: its bytes are held by a peer only (no stored chunk is 0 bytes long)."""
        return self.stored_len == 0

    def pack(self) -> bytes:
        return CHUNK_REC.pack(self.refcount, self.raw_len, self.stored_len, self.blake3)

    @classmethod
    def unpack(cls, b: bytes) -> "ChunkRecord":
        return cls(*CHUNK_REC.unpack(b))


# chunkdata: id -> codec u8 + payload (the raw bytes, a zstd frame, or the predictor's header
# and a zstd frame of its residuals: codec.py, docs/store-format.md §4.3).
# An *offline* chunk (format 3) was evicted: its record stays, with stored length 0, and it has
# no chunkdata; a peer holds its bytes (held, below) and a sync or fetch brings them back.

# held: version u64 + peer vault id (16 bytes) -> confirmed ns i64 + the peer's name (UTF-8).
# The peer was seen holding exactly this version's bytes, online, when the two vaults last met:
# what makes the version's chunks safe to evict. Dropped with the version.
# relied: the same layout, the other way round: the peer recorded that it holds this vault's
# copy (it may evict its own), so this vault never evicts the version. Dropped with it.
HELD_REC = struct.Struct(">q")

# ---- epochs -------------------------------------------------------------------------------
# The tree (inodes, directory entries, xattrs) is versioned by epoch, the way bcachefs versions
# its keys by snapshot id. Every record key ends in the bitwise inverse of the epoch that wrote
# it, so a key's versions sort newest first. Epochs form a tree (epochs: epoch -> parent); a
# record is visible at epoch E when it was written at E or at one of E's ancestors, and the
# visible version is the newest of those. A snapshot freezes a branch's epoch and gives the
# branch a new child epoch to write in: nothing is copied. A deletion that must stay invisible
# to the frozen epochs is a tombstone.
MASK64 = (1 << 64) - 1
PRESENT = b"\x01"     # first byte of a versioned value: a record follows
TOMBSTONE = b"\x00"   # the whole value of a deletion
ROOT_EPOCH = 1
MAIN_BRANCH = b"main"

# epochs: epoch u64 -> parent epoch u64 (0 for the first) + created ns
EPOCH_REC = struct.Struct(">Qq")
# snapshots: name -> epoch u64 + created ns + the branch name it was taken of
SNAPSHOT_REC = struct.Struct(">Qq")
# branches: name -> the epoch the branch writes in (u64)


def vkey(base: bytes, epoch: int) -> bytes:
    return base + U64.pack(epoch ^ MASK64)


def epoch_of(key: bytes) -> int:
    return U64.unpack_from(key, len(key) - 8)[0] ^ MASK64


# ---- versions and extents -------------------------------------------------------------------
# A file's content is a *version*: a number from meta next_version, a record, its extents.
# Versions are immutable; each commit of a file makes a new one.
# versions:  version u64 -> committed ns, size u64, mtime ns, data bytes u64,
#                           origin ino u64 (the inode it was committed to)
# timelines: ino u64 + version u64 -> (empty)
# Every version is on exactly one timeline, normally its origin's. A timeline can hold versions
# of other inodes: a file saved by renaming a new one over it keeps its history. Only the origin
# ever names a version as its content.
VERSION_REC = struct.Struct(">qQqQQ")


@dataclass(frozen=True, slots=True)
class Version:
    version: int
    committed_ns: int
    size: int
    mtime_ns: int
    data_bytes: int
    origin: int

    # Read like an inode: reader.read_range takes either.
    @property
    def content(self) -> int:
        return self.version

    @property
    def ino(self) -> int:
        return self.origin

    def pack(self) -> bytes:
        return VERSION_REC.pack(self.committed_ns, self.size, self.mtime_ns, self.data_bytes,
                                self.origin)

    @classmethod
    def unpack(cls, number: int, b: bytes) -> "Version":
        return cls(number, *VERSION_REC.unpack(b))


# media: version u64 -> JSON object: what the version's bytes say as an image or a sidecar
# (media/metadata.py), or {"error": why} when they could not be read. Dropped with the version.

# previews: version u64 -> long side asked u32 + made u8 + a JPEG file (made 1), or the UTF-8
# reason none could be made (made 0). A generated preview of the version's image (an
# on-capture policy's `preview`): derived data, like media; dropped with the version.
PREVIEW_HEAD = struct.Struct(">IB")


@dataclass(frozen=True, slots=True)
class Preview:
    asked: int                          # the long side the policy asked for, in pixels
    jpeg: bytes | memoryview | None     # the proxy, or
    why: str | None = None              # why there is none

    def pack(self) -> bytes:
        body = self.jpeg if self.jpeg is not None else (self.why or "").encode()
        return PREVIEW_HEAD.pack(self.asked, self.jpeg is not None) + bytes(body)

    @classmethod
    def unpack(cls, b: bytes | memoryview) -> "Preview":
        asked, made = PREVIEW_HEAD.unpack_from(b)
        body = b[PREVIEW_HEAD.size:]
        return cls(asked, body, None) if made else cls(asked, None, bytes(body).decode())


# extents: version u64 + file offset u64 -> chunk id (17 bytes) + length u32.
# Extents of one version never overlap; a gap between them is a hole that reads as zeros.
EXTENT_VAL = struct.Struct(">17sI")


def extent_key(version: int, offset: int) -> bytes:
    return U64x2.pack(version, offset)


# ---- inodes -------------------------------------------------------------------------------
# inodes: ino u64 -> mode u32, uid u32, gid u32, nlink u32, size u64, rdev u64,
#                     atime_ns i64, mtime_ns i64, ctime_ns i64, data_bytes u64,
#                     content u64 (the version holding its bytes, 0 for none),
#                     then the symlink target bytes.
INODE_REC = struct.Struct(">IIIIQQqqqQQ")


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
    content: int = 0     # the version holding the file's bytes; 0: none (empty, or not a file)
    target: bytes = field(default=b"")

    def pack(self) -> bytes:
        return INODE_REC.pack(self.mode, self.uid, self.gid, self.nlink, self.size, self.rdev,
                              self.atime_ns, self.mtime_ns, self.ctime_ns,
                              self.data_bytes, self.content) + self.target

    @classmethod
    def unpack(cls, ino: int, b: bytes) -> "Inode":
        head = INODE_REC.unpack_from(b)
        return cls(ino, *head, target=bytes(b[INODE_REC.size:]))


# ---- directories --------------------------------------------------------------------------
# dirents: parent ino u64 + name + NUL -> entry id u64 + child ino u64   (lookup by name)
# dirlist: parent ino u64 + entry id u64 -> name                         (readdir in creation order)
# (then the epoch, as for every versioned key). The NUL, which no name contains, keeps the
# versions of one name together: without it "a" + epoch could sort between "a" and "ab".
# Entry ids only grow, so a readdir offset stays valid while entries come and go.


def dirent_key(parent: int, name: bytes) -> bytes:
    return u64(parent) + name + b"\0"


# ---- xattrs -------------------------------------------------------------------------------
# xattrs: ino u64 + attribute name + NUL -> value


def xattr_key(ino: int, name: bytes) -> bytes:
    return u64(ino) + name + b"\0"


# ---- pending ------------------------------------------------------------------------------
# pending: ino u64 + sequence u64 -> chunk id. A reference taken on a chunk by a file commit that
# spans several transactions. The final transaction of the commit turns the pending references
# into the extents of a new version; after a crash, the next open of the store drops them (and
# frees what they held).
