"""A sync between two vaults: list both trees, plan the merge (plan.py), then for each side that
changes, move only the chunks it lacks, the most valuable files first, and apply each file once
all its chunks are there.

Both sides are endpoints (endpoint.py) or their stand-ins over the wire (remote.py): the engine
only calls their operations. It keeps no state of its own between runs; what makes a rerun
resume is in the stores: chunks that arrived wait in the receiver's inbox (so they are not sent
again), applied files agree (so they are not planned again), and each side's *base* records
where the two agreed, path by path, soon after they do (with the next batch of chunks that
settles, or at the end of a side).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..store import StoreError
from . import delta
from . import plan as P
from . import tree
from .endpoint import OFFLINE
from .wire import MAX_ATTACHMENTS
from .tree import Entry

BATCH_SECONDS = 1.0            # aim for a round trip of chunks this long: little is in flight
MIN_BATCH = 256 * 1024
MAX_BATCH = 64 * 1024 * 1024
PATHS_PER_CALL = 2000
EXTENT_PATHS_PER_CALL = 100   # a 100 GB file's extents fit a frame many times over
HASHES_PER_CALL = 20000
PIPELINE = 2                  # batches of chunks in flight at once
# Above this rate (bytes on the wire a second), the bytes a difference saves (delta.py) cross
# faster than the difference is made and rebuilt: chunks are sent as stored.
DELTA_BELOW = 200e6


@dataclass
class Progress:
    direction: str = ""        # "push" or "pull"
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0       # raw bytes of the chunks to send
    bytes_done: int = 0
    wire_bytes: int = 0        # bytes of stored values and differences sent
    tier: str = ""
    path: bytes = b""


@dataclass
class Report:
    local: str = ""
    remote: str = ""
    plan: dict = field(default_factory=lambda: {"push": [], "pull": []})
    conflicts: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)
    offline: list = field(default_factory=list)  # files not sent: evicted at their source
    sent: dict = field(default_factory=lambda: {
        d: _nothing_sent() for d in ("push", "pull")})
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"local": self.local, "remote": self.remote, "plan": self.plan,
                "conflicts": self.conflicts, "snapshots": self.snapshots,
                "offline": self.offline, "sent": self.sent,
                "seconds": round(self.seconds, 3)}


def sync(local, remote, *, push: bool = True, pull: bool = True, only_tier: str | None = None,
         dry_run: bool = False, bwlimit: int = 0,
         progress: Callable[[Progress], None] | None = None) -> Report:
    """Bring `remote` (with `push`) and `local` (with `pull`) to the merge of both trees.
    `bwlimit` caps the chunk bytes sent, per second (they are nearly all of the traffic)."""
    started = time.monotonic()
    ends = (local, remote)
    ids, names = _meet(local, remote)
    report = Report(names[0], names[1])
    trees = tuple({p: Entry.from_wire(w) for p, w in e.listing().items()} for e in ends)
    bases = (local.base(ids[1]), remote.base(ids[0]))
    base = {p: s for p, s in bases[0].items() if bases[1].get(p) == s}
    plan = P.make(trees, base, names, ids)
    sides = [s for s, on in ((1, push), (0, pull)) if on]  # what the field shot goes first
    ops = {s: _chosen(plan.ops[s], only_tier, trees[s], plan.conflicts) for s in sides}
    for s in sides:
        report.plan["push" if s == 1 else "pull"] = [_describe(op) for op in ops[s]]
    made = {s: {op.to or op.path for op in ops[s]} for s in sides}  # what each side gets
    report.conflicts = [{"path": _text(c["path"]), "kept_as": _text(c["kept_as"]),
                         "vault": c["vault"]} for c in plan.conflicts
                        if any(c["kept_as"] in made[s] for s in sides)]
    if dry_run:
        report.seconds = time.monotonic() - started
        return report
    run = _Run(ends, ids, names, trees, progress or (lambda p: None), bwlimit)
    try:
        # Where the trees already agree, the bases say so (a rerun after an interruption), and
        # this vault notes that the other holds those files.
        run.record([p for p in set(trees[0]) | set(trees[1]) | set(bases[0]) | set(bases[1])
                    if P.sig(trees[0].get(p)) == P.sig(trees[1].get(p))
                    and not bases[0].get(p) == bases[1].get(p) == P.sig(trees[0].get(p))])
        run.hold(list(trees[0]))
        run.catch_up()
        for s in sides:
            report.offline += run.side(s, ops[s], report.sent["push" if s == 1 else "pull"])
            noted = [c for c in plan.conflicts if c["kept_as"] in made[s]]
            if noted:
                ends[s].note_conflicts(noted)
            snapshot = ends[s].finish()["snapshot"]
            if snapshot:
                report.snapshots[names[s]] = snapshot
    finally:
        # A run cut short (a lost link: the command retries) leaves no call of its own still
        # running here for the next run to plan around.
        local.idle()
    report.seconds = time.monotonic() - started
    return report


def fetch(local, remote, paths: list[bytes] | None = None, *, bwlimit: int = 0,
          progress: Callable[[Progress], None] | None = None) -> dict:
    """Bring back from `remote` the bytes of files evicted from `local` (those at `paths`, or
    all), where the remote holds the very same content. Neither tree changes: the chunks come
    back online. Returns what was fetched and what the remote could not give."""
    started = time.monotonic()
    ids, names = _meet(local, remote)
    wanted = local.offline(paths)
    extents: dict[bytes, list | str] = {}
    for part in _parts(list(wanted), EXTENT_PATHS_PER_CALL):
        extents.update(remote.extents(part))
    there = [p for p, (size, digest) in wanted.items() if isinstance(extents.get(p), list)
             and tree.content_digest(size, extents[p]) == digest]
    sent = _nothing_sent()
    prog = Progress("fetch", len(there))
    run = _Run((local, remote), ids, names, ({}, {}), progress or (lambda p: None), bwlimit)

    def ready(done: list[bytes]) -> None:
        prog.files_done += len(done)
        sent["files"] += len(done)
        run.progress(prog)
    run.transfer(0, [(p, 1) for p in there], extents, sent, prog, ready)
    local.finish()
    return {"local": names[0], "remote": names[1], "fetched": [_text(p) for p in there],
            "not_on_peer": sorted(_text(p) for p in wanted.keys() - set(there)),
            "sent": sent, "seconds": round(time.monotonic() - started, 3)}


def _meet(local, remote) -> tuple[tuple[bytes, bytes], tuple[str, str]]:
    """The two vaults' ids and names, once they are known to be two and to speak alike."""
    hello = [e.hello() for e in (local, remote)]
    ids, names = (hello[0]["id"], hello[1]["id"]), (hello[0]["name"], hello[1]["name"])
    if ids[0] == ids[1]:
        raise StoreError("both sides are the same vault")
    if hello[0]["protocol"] != hello[1]["protocol"]:
        raise StoreError(f"{names[1]} speaks sync protocol {hello[1]['protocol']}, this vaultfs "
                         f"{hello[0]['protocol']}: run the same vaultfs release on both")
    return ids, names


def _chosen(ops: list[P.Op], only_tier: str | None, tree: dict[bytes, Entry],
            conflicts: list[dict]) -> list[P.Op]:
    """With --only-tier, the files of that tier that arrive new or over a file, and the
    folders they need. Conflicts and changes of kind wait for a whole sync: carried out in
    part they would put a version where the other one has not been kept aside yet."""
    if only_tier is None:
        return ops
    held = {c[k] for c in conflicts for k in ("path", "kept_as")}

    def free(path: bytes, kind: str) -> bool:
        return path not in held and tree.get(path, Entry(kind, 0, 0, 0, b"", [], "", 0)
                                             ).kind == kind
    files = [op for op in ops if op.kind == "put" and op.entry.kind == "f"
             and op.entry.tier == only_tier and free(op.path, "f")
             and all(free(p, "d") for p in _parents(op.path))]
    needed = {p for op in files for p in _parents(op.path)}
    return [op for op in ops if op.kind == "put" and op.entry.kind == "d"
            and op.path in needed] + files


def _parents(path: bytes) -> list[bytes]:
    parts = path.split(b"/")[:-1]
    return [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _describe(op: P.Op) -> dict:
    out = {"op": op.kind, "path": _text(op.path)}
    if op.kind == "move":
        out["to"] = _text(op.to)
    if op.entry is not None and op.entry.kind == "f":
        out["size"] = op.entry.size
        out["tier"] = op.entry.tier
    return out


def _text(path: bytes) -> str:
    return path.decode(errors="surrogateescape")


class _Run:
    """One run of the engine: applying one side's ops and keeping the bases up to date.

    Calls that only record something, and the applying of files as their chunks arrive, do not
    wait for their replies (`call`): over a link, waiting for one would also wait for the
    batch of chunks in flight before it, and leave the link idle while the next is read and
    sent (with 50 ms each way, a card took 10-11 s instead of 6-6.5). A side answers its calls
    in order, so once a batch sent after them is settled, the receiver's replies to them are
    at hand; `catch_up` takes them then, and this vault's own (quick) with them, raising what
    a call raised."""

    def __init__(self, ends, ids, names, trees, progress, bwlimit: int):
        self.ends, self.ids, self.names, self.progress = ends, ids, names, progress
        self.now = [dict(trees[0]), dict(trees[1])]  # each side's tree as it becomes
        self.bwlimit = bwlimit
        self.started, self.wire_bytes = time.monotonic(), 0
        self.settled = self.started
        self.batch = 4 * 1024 * 1024
        self.moved: dict[tuple[int, bytes], bytes] = {}  # (side, path) -> where it went
        self.sent_batches = 0  # batches of chunks submitted so far
        self.refs: dict[bytes, delta.Ref] = {}  # chunks to send -> a near copy the receiver has
        # Bytes on the wire a second, of the fastest batch settled yet. Between two stores on
        # this machine nothing crosses a link: differences would only cost.
        self.link_rate = 0.0 if any(e.over_wire for e in ends) else math.inf
        # calls made, not yet taken: (reply, what to do with its result, batches sent before)
        self.later: collections.deque[tuple[object, Callable | None, int]] = \
            collections.deque()

    def call(self, side: int, method: str, *args, then: Callable | None = None) -> None:
        """Make a call on one side without waiting for it; `then(result)` when it is taken."""
        self.later.append((self.ends[side].submit(method, *args), then, self.sent_batches))

    def catch_up(self, settled: int | None = None) -> None:
        """Take the replies of the calls made before batch number `settled` was submitted
        (all of them, waiting, when None)."""
        while self.later and (settled is None or self.later[0][2] <= settled):
            reply, then, _ = self.later.popleft()
            result = reply.result()
            if then is not None:
                then(result)

    def record(self, paths: list[bytes]) -> None:
        """Tell both bases what the sides agree on at `paths` now."""
        updates = [[p, P.sig(self.now[0].get(p))] for p in paths
                   if P.sig(self.now[0].get(p)) == P.sig(self.now[1].get(p))]
        for i in range(0, len(updates), PATHS_PER_CALL):
            part = updates[i:i + PATHS_PER_CALL]
            self.call(0, "set_base", self.ids[1], part)
            self.call(1, "set_base", self.ids[0], part)
        self.hold(paths)

    def hold(self, paths: list[bytes]) -> None:
        """Tell this vault (side 0) which of the files at `paths` the other now holds online
        with the same content (the other's own listing or its apply says so), and the other
        that this vault relies on its copy of them. (Only this side records a hold: a vault
        does not take a client's word that its data is safe elsewhere; being relied on only
        keeps more.)"""
        mine, theirs = self.now
        held = [[p, mine[p].content] for p in paths if p in mine and mine[p].kind == "f"
                and theirs.get(p) is not None and mine[p].same_content(theirs[p])
                and not theirs[p].offline]
        for part in _parts(held, PATHS_PER_CALL):
            # The hold lets this vault evict its copy: only once the other has recorded that
            # it must keep its own.
            self.call(1, "rely", self.ids[0], self.names[0], part,
                      then=lambda _, part=part: self.call(0, "hold", self.ids[1],
                                                          self.names[1], part))

    def apply(self, s: int, ops: list[P.Op], extents: dict[bytes, list]) -> None:
        """Have side `s` carry out `ops`; the trees and bases follow once it has."""
        wire = [[op.kind, op.path, op.entry.wire() if op.kind == "put" else None, op.to,
                 extents.get(op.path) if op.kind == "put" and op.entry.kind == "f" else None]
                for op in ops]
        self.call(s, "apply", wire, then=lambda results: self._applied(s, ops, results))

    def _applied(self, s: int, ops: list[P.Op], results: list) -> None:
        now = self.now[s]
        for op, skipped in zip(ops, results):
            if skipped:
                continue
            if op.kind == "move":
                now[op.to] = now.pop(op.path)
                self.moved[(s, op.path)] = op.to
            elif op.kind == "delete":
                now.pop(op.path, None)
            else:
                now[op.path] = op.entry
        self.record([p for op in ops for p in (op.path, op.to) if p])

    def side(self, s: int, ops: list[P.Op], sent: dict) -> list[str]:
        """Apply one side's ops: first those that move no bytes, then the files, selects
        first (by the source vault's tier priorities) and newest first. Returns the files
        left out because their source evicted their bytes."""
        moves_bytes = [op.kind == "put" and op.entry.kind == "f" for op in ops]
        files = [op for op, m in zip(ops, moves_bytes) if m]
        for part in _parts([op for op, m in zip(ops, moves_bytes) if not m], PATHS_PER_CALL):
            self.apply(s, part, {})
        self.catch_up()  # (the files' extents are asked for where the moves put them)
        files.sort(key=lambda op: (op.entry.priority, -op.entry.mtime_ns, op.path))
        extents: dict[bytes, list | str] = {}  # by the path the file goes to
        for src in (0, 1):
            at = {self.moved.get((src, op.origin), op.origin): op.path for op in files
                  if op.source == src}
            for part in _parts(list(at), EXTENT_PATHS_PER_CALL):
                extents.update((at[p], x) for p, x in self.ends[src].extents(part).items())
        for op in files:
            if op.path not in extents:
                raise StoreError(f"{_text(op.path)} changed on the other side during the sync; "
                                 f"run it again")
        offline = [_text(op.path) for op in files if extents[op.path] == OFFLINE]
        files = [op for op in files if extents[op.path] != OFFLINE]
        by_path = {op.path: op for op in files}
        prog = Progress("push" if s == 1 else "pull", len(files))

        def ready(paths: list[bytes]) -> None:
            for part in _parts([by_path[p] for p in paths], EXTENT_PATHS_PER_CALL):
                self.apply(s, part, extents)
                prog.files_done += len(part)
                sent["files"] += len(part)
                prog.tier, prog.path = part[-1].entry.tier, part[-1].path
                self.progress(prog)
        self.transfer(s, [(op.path, op.source) for op in files], extents, sent, prog, ready)
        self.catch_up()
        return offline

    def transfer(self, s: int, files: list[tuple[bytes, int]], extents: dict[bytes, list],
                 sent: dict, prog: Progress, ready: Callable[[list[bytes]], None]) -> None:
        """Move the chunks that side `s` lacks of `files` ([(path, side holding it)], whose
        `extents` are given), calling `ready` with the paths of files in order as soon as all
        their chunks are there."""
        dst = self.ends[s]
        # hash -> (raw length, the side that has it), in the order the files need them
        need = {x[2]: (x[1], src) for path, src in files if src != s for x in extents[path]}
        missing: dict[bytes, tuple[int, int]] = {}
        for part in _parts(list(need), HASHES_PER_CALL):
            missing.update((h, need[h]) for h in dst.missing(part))
        missing = {h: v for h, v in need.items() if h in missing}
        self.refs = {}
        if self.link_rate < DELTA_BELOW and missing:
            sending = [(p, extents[p]) for p, src in files if src != s]
            near = self._held(s, [p for p, x in sending if any(c[2] in missing for c in x)])
            self.refs = delta.references(sending, set(missing), near)
        prog.bytes_total = sum(n for n, _ in missing.values())
        self.progress(prog)
        queue = collections.deque(missing.items())
        pending = collections.deque(path for path, _ in files)
        inflight: collections.deque = collections.deque()
        while pending:
            done = []
            while pending and not any(x[2] in missing for x in extents[pending[0]]):
                done.append(pending.popleft())
            if done:
                ready(done)
            if not pending:
                break
            # PIPELINE batches in flight: the next one travels while the receiver checks and
            # commits the one before.
            batch = self.submit(s, queue) if len(inflight) < PIPELINE else None
            if batch is not None:
                inflight.append(batch)
            elif inflight:
                self.settle(inflight.popleft(), missing, sent, prog, queue)
            else:
                raise StoreError("sync lost track of chunks it needs; run it again")

    def _held(self, s: int, paths: list[bytes]) -> dict[bytes, list]:
        """The extents of side `s`'s own files at `paths`, where it has one (a near copy of
        what is sent there: delta.py)."""
        held = [p for p in paths if (e := self.now[s].get(p)) is not None and e.kind == "f"
                and not e.offline]
        out: dict[bytes, list] = {}
        for part in _parts(held, EXTENT_PATHS_PER_CALL):
            out.update((p, x) for p, x in self.ends[s].extents(part).items() if x != OFFLINE)
        return out

    def submit(self, s: int, queue: collections.deque) -> tuple | None:
        """Send the next batch of chunks (about BATCH_SECONDS' worth at the rate measured)
        without waiting for the receiver; None when none is left."""
        batch: dict[int, list[bytes]] = {}
        size = 0
        count = 0
        while queue:
            h, (length, src) = queue.popleft()
            batch.setdefault(src, []).append(h)
            size += length
            count += 1
            if size >= self.batch or count >= MAX_ATTACHMENTS:
                break
        if not batch:
            return None
        replies = []
        for src, hashes in batch.items():
            refs = [self.refs.get(h) for h in hashes] if self.link_rate < DELTA_BELOW else None
            chunks = self.ends[src].get_chunks(hashes, refs)
            replies.append((self.ends[s].submit("put_chunks", chunks), hashes,
                            {c[0] for c in chunks if len(c) == 5}))
        self.sent_batches += 1
        return replies, size, self.sent_batches - 1

    def settle(self, inflight: tuple, missing: dict, sent: dict, prog: Progress,
               queue: collections.deque) -> None:
        """Wait for the receiver to have checked a batch (its commit is queued before anything
        else it does); queue again, to go whole, the differences it could not rebuild (a chunk
        they name is damaged there); adapt the next batches' size."""
        replies, size, number = inflight
        batch_wire = 0
        again: list[tuple[bytes, tuple[int, int]]] = []
        for reply, hashes, differences in replies:
            wire, unresolved = reply.result()
            batch_wire += wire
            self.wire_bytes += wire
            sent["wire_bytes"] += wire
            prog.wire_bytes += wire
            failed = set(unresolved) & differences
            sent["chunks"] += len(hashes) - len(failed)
            sent["differences"] += len(differences) - len(failed)
            for h in hashes:
                if h in failed:
                    self.refs.pop(h, None)
                    again.append((h, missing[h]))
                    size -= missing[h][0]
                else:
                    del missing[h]
        # First in the next batch: the files wait for them in order (selects first), and the
        # differences queued behind them that name them find them there.
        queue.extendleft(reversed(again))
        sent["raw_bytes"] += size
        prog.bytes_done += size
        self.progress(prog)
        self.catch_up(number)
        now = time.monotonic()
        rate = size / max(now - self.settled, 1e-3)  # (batches overlap: from the last one)
        # The fastest batch yet says what the link can carry (a slow one may have waited for
        # the start, or for the receiver's disk), up to the limit the user set. (Batches of
        # mostly differences keep it low: where nearly all is near copies, they pay anyway.)
        self.link_rate = min(max(self.link_rate, batch_wire / max(now - self.settled, 1e-3)),
                             self.bwlimit or math.inf)
        self.settled = now
        if self.bwlimit:  # wait until the average since the start is back under the limit
            time.sleep(max(0.0, self.wire_bytes / self.bwlimit - (now - self.started)))
            rate = min(rate, self.bwlimit)
        self.batch = int(min(MAX_BATCH, max(MIN_BATCH, rate * BATCH_SECONDS)))


def _nothing_sent() -> dict[str, int]:
    """A report's count of what went one way: chunks (of them, as differences: delta.py),
    their raw bytes, and the bytes that carried them (stored values and differences)."""
    return {"files": 0, "chunks": 0, "differences": 0, "raw_bytes": 0, "wire_bytes": 0}


def _parts(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]
