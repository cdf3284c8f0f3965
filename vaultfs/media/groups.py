"""Which images belong together. Records of the media index (with each file's path) in, groups
out, through an index updated file by file: every relation is looked up in a dictionary, a
camera's timeline or one vectorised scan of the fingerprints, never by comparing every pair of
files, so that a mount keeps up with a camera (tools/bench/similarity.py measures the rate).

Each kind of group is a connected set of files under one relation:

    duplicate  the same bytes (digest) under another name
    pair       a RAW and a JPEG or HEIF of one capture: the same stem in the same folder, the
               same capture second (or no capture time)
    near       the same picture: fingerprints at most NEAR apart and the same capture (capture
               times and cameras agree where both files have them): exports, resizes and
               re-encodings in any format, and the members of a pair. A connected set is
               held to its original (the largest picture, a RAW first): what is not within
               NEAR of it (an export of an export that drifted away) forms groups of its own
    burst      consecutive captures of one camera (serial, else make and model), each at most
               BURST_GAP after the one before, whose pictures are alike (BURST_SIMILAR)
    bracket    consecutive captures of one camera whose exposure steps (bias, or a stop or more
               of exposure value), each taken within BRACKET_GAP of the end of the one before;
               a set ends where an exposure comes back (the next bracket starts)
    edit       XMP (xmpMM:DerivedFrom or OriginalDocumentID naming the other's DocumentID, or
               a shared OriginalDocumentID), or the other's name plus a suffix ("IMG_1-Edit",
               "IMG_1_01", "IMG_1 copy") with a picture changed (more than NEAR: else it is
               the same picture, a near-duplicate) but still alike (EDIT_SIMILAR)

Bursts and brackets link captures, not files: a RAW and its JPEG (or an export that kept the
capture time) are one capture and sit in its group together.

Distances are fingerprint.distance (phash + whash Hamming, 0-128); the thresholds were chosen
from tools/bench/similarity.py's labelled set: unrelated pictures measured 26 and more apart;
resizes, re-encodings, exposure shifts up to 14, 5% crops up to 18.
"""

from __future__ import annotations

import bisect
import itertools
import math
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np

from .metadata import number

KINDS = ("duplicate", "pair", "near", "burst", "bracket", "edit")
SEQUENCES = ("burst", "bracket")  # the groups .vault/bursts shows
NEAR = 20             # same picture
BURST_SIMILAR = 36    # the same scene a moment later
BRACKET_SIMILAR = 48  # the same scene at another exposure (when both have fingerprints)
EDIT_SIMILAR = 44     # an edit named after its original
SIMILAR = 44          # what `vaultfs similar` lists
BURST_GAP = 30.0      # seconds between consecutive frames of a burst
BRACKET_GAP = 2.0     # seconds from the end of one exposure to the next of a bracket
EV_STEP = 0.95        # a bracket's steps: about a stop or more of exposure value...
BIAS_STEP = 0.3       # ...or a third of a stop or more of exposure bias
NAME_SEPARATORS = "-_ (~."
RAW = "raw"
DEVELOPED = ("jpeg", "mpo", "heif")


@dataclass(frozen=True)
class Item:
    """What grouping needs to know of one image file."""
    key: int                      # the file's inode number
    path: str
    version: int
    digest: str | None = None
    phash: int | None = None
    whash: int | None = None
    format: str | None = None
    pixels: int = 0               # of the picture fingerprinted
    time: float | None = None     # capture time, seconds (camera's clock, no zone)
    timekey: str | None = None    # the capture time as recorded
    subsec: bool = False
    camera: str | None = None     # serial number, else make and model
    exposure: float | None = None  # seconds
    ev: float | None = None       # exposure value at ISO 100
    bias: float | None = None
    document_id: str | None = None
    original_document_id: str | None = None
    derived_from: str | None = None

    @cached_property
    def folder(self) -> str:
        return posixpath.dirname(self.path)

    @cached_property
    def stem(self) -> str:
        name = posixpath.basename(self.path)
        return name.rsplit(".", 1)[0].lower() if "." in name[1:] else name.lower()

    @property
    def fingerprinted(self) -> bool:
        return self.phash is not None


def item(key: int, path: str, version: int, record: dict) -> Item | None:
    """The Item of a media index record (None: not an image)."""
    if record.get("kind") != "image" and "fingerprint" not in record:
        return None
    fp = record.get("fingerprint") if isinstance(record.get("fingerprint"), dict) else {}
    phash, whash = _hex(fp.get("phash")), _hex(fp.get("whash"))
    if phash is None or whash is None:
        phash = whash = None
    when, subsec = _seconds(record.get("capture_time"))
    exposure = number(record.get("exposure_time"))
    fnumber, iso = number(record.get("fnumber")), number(record.get("iso"))
    ev = None
    if exposure and exposure > 0 and fnumber and fnumber > 0:
        ev = math.log2(fnumber ** 2 / exposure) - math.log2((iso or 100) / 100)
    serial = record.get("serial")
    model = " ".join(p for p in (record.get("make"), record.get("model")) if p) or None
    camera = f"{model or ''} #{serial}" if serial else model
    text = lambda k: record.get(k) if isinstance(record.get(k), str) else None  # noqa: E731
    picture = record.get("picture")
    pixels = picture[0] * picture[1] if isinstance(picture, list) and len(picture) == 2 and \
        all(isinstance(n, int) for n in picture) else 0
    return Item(key, path, version, text("digest"), phash, whash, text("format"), pixels, when,
                record.get("capture_time") if when is not None else None,
                subsec, camera, exposure, ev, _bias(record),
                text("document_id"), text("original_document_id"), text("derived_from"))


def distance(a: Item, b: Item) -> int | None:
    if a.phash is None or b.phash is None:
        return None
    return (a.phash ^ b.phash).bit_count() + (a.whash ^ b.whash).bit_count()


@dataclass
class Group:
    kind: str
    base: str            # the name it would have alone; `name` is made unique among all
    keys: list[int]      # files, in capture order
    paths: list[str]
    name: str = ""

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "files": self.paths}

    def names(self) -> list[str]:
        """The members' file names, made unique inside the group (IMG_1.JPG, IMG_1~2.JPG)."""
        out, seen = [], set()
        for path in self.paths:
            name = posixpath.basename(path)
            stem, dot, ext = name.rpartition(".")
            if not dot or not stem:
                stem, ext, dot = name, "", ""
            n, candidate = 1, name
            while candidate.lower() in seen:
                n += 1
                candidate = f"{stem}~{n}{dot}{ext}"
            seen.add(candidate.lower())
            out.append(candidate)
        return out


class _Fingerprints:
    """Fingerprints in numpy arrays, for one vectorised scan per query."""

    def __init__(self) -> None:
        self.p = np.zeros(64, np.uint64)
        self.w = np.zeros(64, np.uint64)
        self.keys = np.full(64, -1, np.int64)
        self.slots: dict[int, int] = {}
        self.free: list[int] = []
        self.used = 0

    def add(self, it: Item) -> None:
        if self.free:
            slot = self.free.pop()
        else:
            if self.used == len(self.keys):
                self.p, self.w = np.resize(self.p, 2 * self.used), np.resize(self.w, 2 * self.used)
                self.keys = np.concatenate([self.keys, np.full(self.used, -1, np.int64)])
            slot, self.used = self.used, self.used + 1
        self.p[slot], self.w[slot], self.keys[slot] = it.phash, it.whash, it.key
        self.slots[it.key] = slot

    def remove(self, key: int) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.keys[slot] = -1
            self.free.append(slot)

    def within(self, it: Item, limit: int) -> Iterator[tuple[int, int]]:
        """(distance, key) of every fingerprint at most `limit` from it's."""
        n = self.used
        d = (np.bitwise_count(self.p[:n] ^ np.uint64(it.phash))
             + np.bitwise_count(self.w[:n] ^ np.uint64(it.whash)))
        for slot in np.nonzero((d <= limit) & (self.keys[:n] >= 0))[0]:
            yield int(d[slot]), int(self.keys[slot])


@dataclass
class _Camera:
    """One camera's captures in time order: (time, timekey) -> the files of that capture."""
    times: list[tuple[float, str]] = field(default_factory=list)
    files: dict[str, set[int]] = field(default_factory=dict)


class GroupIndex:
    def __init__(self) -> None:
        self.items: dict[int, Item] = {}
        self._seen: dict[int, tuple] = {}  # what update() was given last
        self._edges: dict[str, dict[int, set[int]]] = {k: defaultdict(set) for k in KINDS}
        self._digests: dict[str, set[int]] = defaultdict(set)
        self._seconds: dict[int, set[int]] = defaultdict(set)
        self._stems: dict[tuple[str, str], set[int]] = defaultdict(set)  # (folder, stem)
        self._names: dict[str, set[int]] = defaultdict(set)      # stem -> files
        self._prefixes: dict[str, set[int]] = defaultdict(set)   # stem before a suffix -> files
        self._ids: dict[str, set[int]] = defaultdict(set)        # XMP document ids
        self._all = _Fingerprints()
        self._undated = _Fingerprints()  # fingerprinted files with no capture time
        self._cameras: dict[str, _Camera] = defaultdict(_Camera)
        # Groups are kept per connected part of each kind's links, and only the parts whose
        # nodes were touched since are found again.
        self._dirty: dict[str, set] = {k: set() for k in KINDS}
        self._parts: dict[str, dict[int, list[Group]]] = {k: {} for k in KINDS}
        self._part_nodes: dict[str, dict[int, set]] = {k: {} for k in KINDS}
        self._part_of: dict[str, dict] = {k: {} for k in KINDS}
        self._tokens = itertools.count()
        self._sorted: dict[str, list[Group] | None] = {k: None for k in KINDS}

    # ---- keeping up ---------------------------------------------------------------------------
    def update(self, files: Iterable[tuple[int, str, int, dict]]) -> None:
        """Make the index hold exactly these files, (key, path, version, record) each: only
        those whose path, version or record (analysed since) changed are read again, taken
        out and put back."""
        fresh: dict[int, tuple] = {}
        for key, path, version, record in files:
            state = (path, version, record.get("kind"), record.get("digest"))
            was = fresh.get(key, self._seen.get(key))
            fresh[key] = state
            if was != state:
                self.remove(key)
                it = item(key, path, version, record)
                if it is not None:
                    self.add(it)
        for key in [k for k in self._seen if k not in fresh]:
            self.remove(key)
        self._seen = fresh

    def add(self, it: Item) -> None:
        self.items[it.key] = it
        if it.digest:
            self._link_all("duplicate", it, self._digests[it.digest])
            self._digests[it.digest].add(it.key)
        pair_key = (it.folder, it.stem)
        self._link_all("pair", it, (k for k in self._stems[pair_key] if self._pair(it, k)))
        self._stems[pair_key].add(it.key)
        if it.time is not None:
            self._seconds[int(it.time)].add(it.key)
        if it.fingerprinted:
            self._link_all("near", it, self._near(it))
            self._all.add(it)
            if it.time is None:
                self._undated.add(it)
        self._link_all("edit", it, self._edits(it))
        self._names[it.stem].add(it.key)
        for prefix in _prefixes(it.stem):
            self._prefixes[prefix].add(it.key)
        for doc in (it.document_id, it.original_document_id, it.derived_from):
            if doc:
                self._ids[doc].add(it.key)
        if it.camera and it.time is not None:
            self._capture_added(it)

    def remove(self, key: int) -> None:
        it = self.items.pop(key, None)
        if it is None:
            return
        for kind, edges in self._edges.items():
            self._touch(kind, key)
            for other in edges.pop(key, ()):
                self._touch(kind, other)
                edges[other].discard(key)
                if not edges[other]:
                    del edges[other]
        _discard(self._digests, it.digest, key)
        _discard(self._stems, (it.folder, it.stem), key)
        _discard(self._seconds, int(it.time) if it.time is not None else None, key)
        _discard(self._names, it.stem, key)
        for prefix in _prefixes(it.stem):
            _discard(self._prefixes, prefix, key)
        for doc in (it.document_id, it.original_document_id, it.derived_from):
            _discard(self._ids, doc, key)
        self._all.remove(key)
        self._undated.remove(key)
        if it.camera and it.time is not None:
            self._capture_removed(it)

    # ---- relations between files --------------------------------------------------------------
    def _link_all(self, kind: str, it: Item, others: Iterable[int]) -> None:
        edges = self._edges[kind]
        for other in others:
            if other != it.key:
                edges[it.key].add(other)
                edges[other].add(it.key)
                self._touch(kind, it.key, other)

    def _touch(self, kind: str, *nodes) -> None:
        self._dirty[kind].update(nodes)
        self._sorted[kind] = None

    def _pair(self, it: Item, key: int) -> bool:
        other = self.items[key]
        formats = {it.format, other.format}
        return RAW in formats and bool(formats & set(DEVELOPED)) and _same_second(it, other)

    def _near(self, it: Item) -> Iterator[int]:
        if it.time is None:
            found = self._all.within(it, NEAR)
        else:
            found = self._undated.within(it, NEAR)
            same_second = (k for k in self._seconds.get(int(it.time), ())
                           if k != it.key and self.items[k].fingerprinted)
            found = [*found, *((distance(it, self.items[k]), k) for k in same_second)]
        for d, key in found:
            if key != it.key and d <= NEAR and _same_capture(it, self.items[key]):
                yield key

    def _edits(self, it: Item) -> Iterator[int]:
        for doc in (it.document_id, it.original_document_id, it.derived_from):
            for key in self._ids.get(doc, ()) if doc else ():
                if _derived(it, self.items[key]) or _derived(self.items[key], it):
                    yield key
        if not it.fingerprinted:
            return
        named = set(self._prefixes.get(it.stem, ()))
        for prefix in _prefixes(it.stem):
            named |= self._names.get(prefix, set())
        for key in named:
            other = self.items[key]
            d = distance(it, other)
            if _within(d, EDIT_SIMILAR) and not _within(d, NEAR):
                yield key

    # ---- captures on a camera's timeline ------------------------------------------------------
    def _capture_added(self, it: Item) -> None:
        cam = self._cameras[it.camera]
        if it.timekey not in cam.files:
            at = bisect.bisect(cam.times, (it.time, it.timekey))
            cam.times.insert(at, (it.time, it.timekey))
            cam.files[it.timekey] = {it.key}
            self._relink(it.camera, at - 1, at + 1, drop=True)  # no longer neighbours
        else:
            cam.files[it.timekey].add(it.key)
            at = bisect.bisect_left(cam.times, (it.time, it.timekey))
        self._relink(it.camera, at - 1, at)
        self._relink(it.camera, at, at + 1)

    def _capture_removed(self, it: Item) -> None:
        cam = self._cameras[it.camera]
        files = cam.files.get(it.timekey)
        if files is None:
            return
        files.discard(it.key)
        at = bisect.bisect_left(cam.times, (it.time, it.timekey))
        if files:
            self._relink(it.camera, at - 1, at)
            self._relink(it.camera, at, at + 1)
            return
        self._relink(it.camera, at - 1, at, drop=True)
        self._relink(it.camera, at, at + 1, drop=True)
        del cam.files[it.timekey], cam.times[at]
        if not cam.times:
            del self._cameras[it.camera]
            return
        self._relink(it.camera, at - 1, at)

    def _relink(self, camera: str, i: int, j: int, drop: bool = False) -> None:
        """Decide (again) what links captures i and j of a camera, which are neighbours now
        (or were, with `drop`)."""
        cam = self._cameras[camera]
        if i < 0 or j >= len(cam.times):
            return
        a, b = ((camera, cam.times[i][1]), (camera, cam.times[j][1]))
        for kind in SEQUENCES:
            self._touch(kind, a, b)
            self._edges[kind].get(a, set()).discard(b)
            self._edges[kind].get(b, set()).discard(a)
            for node in (a, b):
                if node in self._edges[kind] and not self._edges[kind][node]:
                    del self._edges[kind][node]
        kind = None if drop else self._sequence(cam, i, j)
        if kind is not None:
            self._edges[kind][a].add(b)
            self._edges[kind][b].add(a)

    def _sequence(self, cam: _Camera, i: int, j: int) -> str | None:
        """'bracket', 'burst' or None for two consecutive captures of a camera."""
        (ta, ka), (tb, kb) = cam.times[i], cam.times[j]
        a = [self.items[k] for k in cam.files[ka]]
        b = [self.items[k] for k in cam.files[kb]]
        dists = [d for x in a for y in b if (d := distance(x, y)) is not None]
        alike = min(dists) if dists else None
        ea, eb = _exposure(a), _exposure(b)
        gap = tb - ta
        if _steps(ea, eb) and gap <= (ea[0] or 0) + BRACKET_GAP and \
                (alike is None or alike <= BRACKET_SIMILAR):
            return "bracket"
        if gap <= BURST_GAP and _within(alike, BURST_SIMILAR):
            return "burst"
        return None

    # ---- groups -------------------------------------------------------------------------------
    def groups(self, kind: str | None = None) -> list[Group]:
        """Every group (of one kind), sorted by name; what changed is found again."""
        if kind is None:
            return sorted((g for k in KINDS for g in self.groups(k)),
                          key=lambda g: (g.name, g.kind))
        if self._sorted[kind] is None:
            self._regroup(kind)
            out = sorted((g for gs in self._parts[kind].values() for g in gs),
                         key=lambda g: (g.base, g.paths))
            seen: dict[str, int] = {}
            for g in out:  # names unique among files with the same first name
                n = seen[g.base] = seen.get(g.base, 0) + 1
                g.name = g.base if n == 1 else f"{g.base}~{n}"
            self._sorted[kind] = out
        return self._sorted[kind]

    def groups_of(self, key: int) -> list[Group]:
        return [g for g in self.groups() if key in g.keys]

    def similar(self, it: Item, limit: int = SIMILAR) -> list[tuple[int, int]]:
        """(distance, key) of the fingerprinted files at most `limit` from `it`, nearest
        first (at any time: this is "what looks like it")."""
        if not it.fingerprinted:
            return []
        return sorted((d, k) for d, k in self._all.within(it, limit) if k != it.key)

    def _regroup(self, kind: str) -> None:
        """Find again the parts of a kind's links that hold a touched node: a part that
        joined another, or split, is dropped whole and its nodes are looked at again."""
        edges, part_of = self._edges[kind], self._part_of[kind]
        parts, nodes_of = self._parts[kind], self._part_nodes[kind]
        work, self._dirty[kind] = self._dirty[kind], set()
        done: set = set()

        def drop(node) -> None:
            token = part_of.pop(node, None)
            if token is not None:
                del parts[token]
                for n in nodes_of.pop(token):
                    part_of.pop(n, None)
                    work.add(n)

        while work:
            node = work.pop()
            if node in done:
                continue
            part = _component(edges, node)
            done |= part
            for n in part:
                drop(n)
            if len(part) > 1:
                token = next(self._tokens)
                parts[token], nodes_of[token] = list(self._groups_in(kind, part)), part
                for n in part:
                    part_of[n] = token

    def _groups_in(self, kind: str, part: set) -> Iterator[Group]:
        if kind in SEQUENCES:
            for captures in self._sets(kind, part):
                yield self._group(kind, [k for c in captures for k in sorted(
                    self._cameras[c[0]].files[c[1]], key=lambda k: self.items[k].path)])
            return
        for members in (self._anchored(part) if kind == "near" else [part]):
            yield self._group(kind, sorted(members, key=lambda k: (self.items[k].time or 0,
                                                                   self.items[k].path)))

    def _anchored(self, part: set[int]) -> Iterator[set[int]]:
        """A connected set of near-duplicates held to its original (the largest picture, a
        RAW first): what drifted further than NEAR from it is grouped apart."""
        part = set(part)
        while len(part) > 1:
            anchor = self.items[max(part, key=lambda k: (self.items[k].format == RAW,
                                                        self.items[k].pixels,
                                                        -k))]
            members = {k for k in part if k == anchor.key
                       or _within(distance(anchor, self.items[k]), NEAR)}
            if len(members) > 1:
                yield members
            part -= members

    def _sets(self, kind: str, part: set) -> Iterator[list[tuple[str, str]]]:
        """A linked run of captures in time order; a bracket run is cut where an exposure
        comes back (the camera started the next bracket)."""
        def when(c: tuple[str, str]) -> float:
            return self.items[next(iter(self._cameras[c[0]].files[c[1]]))].time

        run = sorted(part, key=when)
        if kind == "burst":
            yield run
            return
        current: list = []
        seen: set = set()
        for c in run:
            exposure = _exposure([self.items[k] for k in self._cameras[c[0]].files[c[1]]])
            mark = (round((exposure[1] or 0) * 3), round((exposure[2] or 0) * 3))
            if mark in seen and len(current) > 1:
                yield current
                current, seen = [], set()
            current.append(c)
            seen.add(mark)
        if len(current) > 1:
            yield current

    def _group(self, kind: str, keys: list[int]) -> Group:
        first = self.items[keys[0]]
        when = "undated"
        if first.time is not None:
            when = datetime.fromisoformat(first.timekey[:19]).strftime("%Y-%m-%d_%H%M%S")
        name = f"{when}_{kind}_{posixpath.basename(first.path).rsplit('.', 1)[0]}"[:200]
        return Group(kind, name, keys, [self.items[k].path for k in keys])


def _within(d: int | None, limit: int) -> bool:
    return d is not None and d <= limit


def _component(edges: dict, start) -> set:
    """The nodes linked to `start`, itself included."""
    part, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in part:
            part.add(node)
            todo.extend(edges.get(node, ()))
    return part


def _prefixes(stem: str) -> list[str]:
    """The stem before each suffix an editor may add: 'img_1-edit' -> ['img', 'img_1']."""
    return [stem[:i] for i in range(1, len(stem)) if stem[i] in NAME_SEPARATORS]


def _derived(a: Item, b: Item) -> bool:
    """a is an edit of b, or both are edits of one original, by their XMP ids."""
    if a.digest and a.digest == b.digest:
        return False  # the same bytes: a duplicate, not an edit
    if b.document_id and b.document_id in (a.derived_from, a.original_document_id) and \
            a.document_id != b.document_id:
        return True
    return bool(a.original_document_id) and a.original_document_id == b.original_document_id \
        and a.document_id != b.document_id


def _same_second(a: Item, b: Item) -> bool:
    return a.time is None or b.time is None or int(a.time) == int(b.time)


def _same_capture(a: Item, b: Item) -> bool:
    """Could a and b come from one capture? Capture times agree (to the sub-second where both
    recorded one), and so do the cameras, where both files say."""
    if not _same_second(a, b) or a.camera and b.camera and a.camera != b.camera:
        return False
    return not (a.subsec and b.subsec) or a.time == b.time


def _exposure(files: list[Item]) -> tuple[float | None, float | None, float | None]:
    """(exposure seconds, exposure value, bias) of a capture: of its first file that says."""
    for f in files:
        if f.ev is not None or f.bias is not None:
            return f.exposure, f.ev, f.bias
    return None, None, None


def _steps(a: tuple, b: tuple) -> bool:
    _, ev_a, bias_a = a
    _, ev_b, bias_b = b
    if bias_a is not None and bias_b is not None and abs(bias_a - bias_b) >= BIAS_STEP:
        return True
    return ev_a is not None and ev_b is not None and abs(ev_a - ev_b) >= EV_STEP


def _seconds(text) -> tuple[float | None, bool]:
    """'2026-11-24T09:15:12.25' -> (seconds on the camera's clock, has sub-seconds)."""
    if not isinstance(text, str):
        return None, False
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None, False
    return (t.replace(tzinfo=None) - datetime(1970, 1, 1)).total_seconds(), "." in text[19:20]


def _bias(record: dict) -> float | None:
    """Exposure bias with the maker notes' bracket step (whichever the camera fills in)."""
    bias, bracket = number(record.get("exposure_bias")), number(record.get("bracket"))
    return None if bias is None and bracket is None else (bias or 0) + (bracket or 0)


def _hex(text) -> int | None:
    """A 64-bit hash from its 16 hex digits (anything else: None)."""
    try:
        return int(text, 16) if isinstance(text, str) and len(text) == 16 else None
    except ValueError:
        return None


def _discard(index: dict, key, value: int) -> None:
    if key is None or key not in index:
        return
    index[key].discard(value)
    if not index[key]:
        del index[key]
