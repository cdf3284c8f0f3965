"""Deciding what a sync changes: a three-way merge of two live trees by path, against the
signatures both vaults recorded where they last agreed (their *base*).

Per path: what only one side changed since the base is taken; where both changed, nothing is
lost: the newer version keeps the path and the other is kept beside it as
`<stem>.conflict-<its vault>-<its mtime, UTC><ext>` on both sides (a folder always keeps the
path against a file). A deletion against a change keeps the change. Without a base (two vaults
that never met, or a path on which they disagree about it) every difference is such a conflict.
Pure functions: no store, no network.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .tree import Entry

FOLDER = Entry("d", 0o40755, 0, 0, b"", [], "", 0)  # a parent neither side has (0: made now)


@dataclass
class Op:
    kind: str                   # "move" (to `to`), "delete", "put"
    path: bytes
    entry: Entry | None = None  # put: what; delete, move: what is there now
    source: int = -1            # put: the side whose bytes it is (0 local, 1 remote; -1 none)
    origin: bytes = b""         # put: where that side had it when the plan was made
    to: bytes = b""             # move: the new name (same folder)


@dataclass
class Plan:
    target: dict[bytes, tuple[Entry, int, bytes]]  # path -> (entry, side it comes from, path
                                                   # there)
    ops: tuple[list[Op], list[Op]]                # for side 0 and side 1, in order
    conflicts: list[dict] = field(default_factory=list)


def sig(e: Entry | None) -> bytes | None:
    return e.signature if e is not None else None


def make(trees: tuple[dict[bytes, Entry], dict[bytes, Entry]], base: dict[bytes, bytes],
         names: tuple[str, str], ids: tuple[bytes, bytes]) -> Plan:
    """The plan that brings both trees to their merge. `names` name the vaults in conflict
    names; `ids` break ties between versions of equal mtime the same way on both sides."""
    target: dict[bytes, tuple[Entry, int]] = {}
    losers: list[tuple[bytes, int]] = []  # (path, side) of versions kept under a conflict name
    for path in sorted(trees[0].keys() | trees[1].keys()):
        pair = (trees[0].get(path), trees[1].get(path))
        s0, s1 = sig(pair[0]), sig(pair[1])
        b = base.get(path)
        if s0 == s1 or s1 == b:
            side = 0
        elif s0 == b:
            side = 1
        elif None in pair:
            side = 0 if pair[1] is None else 1  # a change against a deletion: the change
        else:
            side = _newer(pair, ids)
            other = pair[1 - side]
            if pair[side].kind == "d" or other.kind == "d":
                side = 0 if pair[0].kind == "d" else 1  # a folder keeps the path
                if pair[1 - side].kind != "d":
                    losers.append((path, 1 - side))
            elif not pair[side].same_content(other):
                losers.append((path, 1 - side))
            elif pair[side].xattrs != other.xattrs:  # a tag here, a label there: keep both
                names_ = {x[0] for x in pair[side].xattrs}
                merged = sorted(pair[side].xattrs + [x for x in other.xattrs
                                                     if x[0] not in names_])
                pair = tuple(dataclasses.replace(e, xattrs=merged) for e in pair)
        if pair[side] is not None:
            target[path] = (pair[side], side, path)
    conflicts = []
    taken = set(trees[0]) | set(trees[1]) | set(target)
    for path, side in losers:
        kept_as = _conflict_name(path, names[side], trees[side][path], taken, trees)
        taken.add(kept_as)
        target[kept_as] = (trees[side][path], side, path)
        conflicts.append({"path": path, "kept_as": kept_as, "vault": names[side], "side": side})
    _parents(target, trees, names, taken, conflicts)
    return Plan(target, (_ops(trees[0], target, conflicts, 0),
                         _ops(trees[1], target, conflicts, 1)), conflicts)


def _newer(pair: tuple[Entry, Entry], ids: tuple[bytes, bytes]) -> int:
    return 0 if (pair[0].mtime_ns, ids[0]) > (pair[1].mtime_ns, ids[1]) else 1


def _conflict_name(path: bytes, vault: str, e: Entry, taken: set[bytes], trees) -> bytes:
    """`<stem>.conflict-<vault>-<mtime>[-n]<ext>`, within 255 bytes (the stem is cut at a
    character boundary); a name already holding this very version (a conflict an interrupted
    or one-way sync kept already) is used again rather than copied twice."""
    folder, name = posixpath.split(path)
    stem, ext = posixpath.splitext(name)
    stamp = datetime.fromtimestamp(e.mtime_ns / 1e9, timezone.utc).strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        tail = f".conflict-{vault}-{stamp}{'' if n == 1 else f'-{n}'}".encode() + ext[:32]
        candidate = posixpath.join(folder, _cut(stem, 255 - len(tail)) + tail)
        held = [t[candidate] for t in trees if candidate in t]
        if held and all(sig(h) == sig(e) for h in held):
            return candidate
        if candidate not in taken:
            return candidate
        n += 1


def _cut(stem: bytes, room: int) -> bytes:
    """The first `room` bytes of a name, not ending inside a UTF-8 character."""
    for k in range(min(4, room + 1)):
        try:
            return stem[:room - k].decode().encode()
        except UnicodeDecodeError:
            continue
    return stem[:room]  # (not UTF-8 anyway)


def _parents(target: dict[bytes, tuple[Entry, int, bytes]], trees, names, taken: set[bytes],
             conflicts: list[dict]) -> None:
    """Every path of the merge needs folders above it: a folder one side deleted while the
    other put something in it stays, and a file where a folder must be is kept aside."""
    for path in sorted(target, key=lambda p: p.count(b"/"), reverse=True):
        parent = posixpath.dirname(path)
        while parent:
            held = target.get(parent)
            if held is not None and held[0].kind == "d":
                break
            if held is not None:  # a file where a folder must be: kept under a conflict name
                kept_as = _conflict_name(parent, names[held[1]], held[0], taken, trees)
                taken.add(kept_as)
                target[kept_as] = held
                conflicts.append({"path": parent, "kept_as": kept_as, "vault": names[held[1]],
                                  "side": held[1]})
            side = next((s for s in (0, 1) if trees[s].get(parent) is not None
                         and trees[s][parent].kind == "d"), -1)
            target[parent] = (trees[side][parent], side, parent) if side >= 0 else \
                (FOLDER, -1, parent)
            parent = posixpath.dirname(parent)


def _ops(tree: dict[bytes, Entry], target: dict[bytes, tuple[Entry, int, bytes]],
         conflicts: list[dict], side: int) -> list[Op]:
    """What side `side` does to reach the target: its own versions that lost a conflict are
    renamed (keeping their timelines), then deletions deepest first, then folders shallowest
    first, then everything else."""
    now = dict(tree)
    moves = []
    for c in conflicts:
        if c["side"] == side and sig(now.get(c["path"])) == sig(target[c["kept_as"]][0]):
            moves.append(Op("move", c["path"], now[c["path"]], to=c["kept_as"]))
            now[c["kept_as"]] = now.pop(c["path"])
    deletes = [Op("delete", p, e) for p, e in now.items() if p not in target]
    deletes.sort(key=lambda op: op.path.count(b"/"), reverse=True)
    puts = [Op("put", p, e, s, origin) for p, (e, s, origin) in target.items()
            if sig(now.get(p)) != sig(e)]
    folders = sorted((op for op in puts if op.entry.kind == "d"),
                     key=lambda op: op.path.count(b"/"))
    return moves + deletes + folders + [op for op in puts if op.entry.kind != "d"]
