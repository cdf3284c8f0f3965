"""On-capture policies (vault.toml [[capture]]) applied by the mount: the first policy for a
new image's folder or tier renames it by its template (only when the policy has one; its own
sidecars go with it) and gives it an XMP sidecar with the policy's metadata. (Its `preview`,
for every version of an image, is made by previews.py.) The captured file's bytes are never
changed, and a sidecar already there is left as it is.

A capture is a file created under a name that no file held before in this mount, whose
metadata says it is an image: a file put in another's place (renamed over it, or after it was
moved aside or removed: how editors and exiftool save) is an edit of it, and gets nothing. The
policy waits until the capture's writer is done with it: no handle open, QUIET_S since its
last close, rename or commit, and a name with an image's extension (a temporary name waits for
its rename into place). A card's file is a capture as the import names it.

The bookkeeping of who waits (the `note_*` methods, `due` and `done`) runs on the trio loop and
goes by version: the reading of an earlier version never makes a capture due, and a capture
stays listed until its policy was applied (a commit between its being due and the policy's
reading of it makes it wait for the new version's reading; one after, and the policy is not
applied twice). Applying a policy blocks: it runs in a worker thread.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..media import capture, sidecars
from ..media.metadata import is_image_name
from ..media.tiers import Tiers, variables
from ..store import Store, Txn, treeops
from ..store.policy import CapturePolicy
from ..store.tags import TIER_XATTR
from .importfile import import_file, new_folder

QUIET_S = 2.0         # a capture is its writer's until this long after its last close or rename
NAMES_KEPT = 65536    # names that files left, remembered (the oldest forgotten first)
SHOTS_KEPT = 4096     # shots whose number is remembered, for their other files

Where = tuple[int, bytes]  # (parent inode, name)


@dataclass
class Placed:
    """A file that got a new name: where, the parts of its path, the first new one."""
    path: str
    ino: int
    chain: treeops.Chain
    new: int
    left: tuple[int, bytes] | None = None  # (parent, name) it left, when it moved
    size: int | None = None  # a new file's size (None: a file moved)
    was: str = ""            # the path it left


@dataclass
class _Waiting:
    """A capture waiting for its policy."""
    imported: bool
    since: float           # monotonic time of its last close, rename or commit
    version: int           # of its last commit
    image: bool = False    # the metadata of that version is read, and it is an image
    parked: bool = False   # its name is no image's: it waits for a rename
    applying: bool = False  # due: its policy is being applied


class CapturePolicies:
    def __init__(self, store: Store, policies: list[CapturePolicy], tiers: Tiers):
        self.store, self.policies, self.tiers = store, policies, tiers
        self._waiting: dict[int, _Waiting] = {}
        self._left: OrderedDict[Where, None] = OrderedDict()
        self._shots: OrderedDict[tuple[str, str, str], int] = OrderedDict()  # -> its {seq}

    # ---- which files are captures, and when (on the trio loop) -------------------------------
    def note_committed(self, ino: int, version: int, first: bool, imported: bool = False
                       ) -> None:
        """A file's content was committed as `version` (`first`: its first): a new file waits;
        one that waits is still being written."""
        waiting = self._waiting.get(ino)
        if waiting is not None:  # (read again, then due)
            waiting.since, waiting.version, waiting.image = time.monotonic(), version, False
        elif first:
            self._waiting[ino] = _Waiting(imported, time.monotonic(), version)

    def note_analysed(self, ino: int, version: int, image: bool) -> None:
        """The metadata of a file's `version` was read (an earlier one's says nothing)."""
        waiting = self._waiting.get(ino)
        if waiting is not None and waiting.version == version:
            if image:
                waiting.image = True
            else:
                del self._waiting[ino]

    def note_touched(self, ino: int) -> None:
        """Its last handle was closed, or it was renamed."""
        waiting = self._waiting.get(ino)
        if waiting is not None:
            waiting.since, waiting.parked = time.monotonic(), False

    def note_left(self, where: Where) -> None:
        """A file left this name (removed, moved away, or replaced by a rename): a file that
        takes it later is an edit of it."""
        self._left[where] = None
        self._left.move_to_end(where)
        if len(self._left) > NAMES_KEPT:
            self._left.popitem(last=False)

    def note_gone(self, ino: int) -> None:
        self._waiting.pop(ino, None)

    @property
    def waiting(self) -> bool:
        """Whether images read as captures wait for their policy or have it applied (but those
        under a temporary name; one whose metadata is still to be read is the analyser's).
        Asked from a worker thread (the `analysing` control op): it reads a copy, which the
        loop's changes to the dict cannot break."""
        return any(w.image and not w.parked for w in tuple(self._waiting.values()))

    def due(self, is_open: Callable[[int], bool],
            where: Callable[[int], Where | None]) -> list[tuple[int, int, bool]]:
        """(inode, version, imported) of the captures whose policy may be applied now, in the
        order they became quiet; each is applying until `done`. A file found to be an edit,
        or without a name, no longer waits."""
        now = time.monotonic()
        quiet = [(ino, w) for ino, w in self._waiting.items()
                 if w.image and not w.parked and not w.applying and now - w.since >= QUIET_S
                 and not is_open(ino)]
        out = []
        for ino, w in sorted(quiet, key=lambda item: item[1].since):
            at = where(ino)
            if at is not None and not w.imported:
                if at in self._left:
                    at = None  # an edit
                elif not is_image_name(at[1].decode(errors="surrogateescape")):
                    w.parked = True
                    continue
            if at is None:
                del self._waiting[ino]
            else:
                w.applying = True
                out.append((ino, w.version, w.imported))
        return out

    def done(self, ino: int, applied: bool) -> None:
        """A due capture's policy was applied (or failed), or, not `applied`, found it
        committed again: it waits for that version's reading."""
        waiting = self._waiting.get(ino)
        if waiting is not None:
            if applied:
                del self._waiting[ino]
            else:
                waiting.applying = False

    # ---- applying a policy (blocking) ---------------------------------------------------------
    def apply(self, ino: int, version: int, path: str, rename: bool = True
              ) -> list[Placed] | None:
        """Apply the policy for `version` of the image `ino`, captured at `path` (renaming it
        only if `rename` and the policy has a template): what was placed; None when the file
        was committed again since (its new version decides)."""
        with self.store.reader() as tx:
            node = tx.inode(ino)
            if node is None:
                return []
            if node.content != version:
                return None
            record = tx.media(version)
            if record is None:
                return []
            policy = self.policy_for(tx, path, record)
        if policy is None:
            return []
        placed = []
        if policy.rename and rename:
            placed = self._rename(ino, path, policy.rename, record, node.mtime_ns)
            if not placed:
                return []  # moved or removed meanwhile: the capture software has it
            path = placed[0].path
        if policy.metadata:
            side = self._sidecar(capture.sidecar_path(path), capture.sidecar(policy.metadata))
            if side is not None:
                placed.append(side)
        return placed

    def policy_for(self, tx: Txn, path: str, record: dict) -> CapturePolicy | None:
        """The first policy for an image at `path` whose metadata is `record`, if any."""
        tier = self.tiers.tier_of(variables(record, path, False), _tag(tx, path))
        return next((p for p in self.policies if capture.applies(p, path, tier)), None)

    def _rename(self, ino: int, path: str, template: str, record: dict,
                mtime_ns: int) -> list[Placed]:
        """The file moved to the path the template gives with the first number that no file
        there has taken (or the one the other files of its shot took: a RAW and its JPEG keep
        one number), with the sidecars that are its alone (IMG_0001.xmp, IMG_0001.CR2.xmp ->
        <new name>.xmp...), in one transaction; [] when it is no longer at `path`."""
        now = time.time_ns()
        folder, name = posixpath.split(path)
        fields = capture.rename_fields(path, record, mtime_ns)
        shot = capture.shot(path, record, mtime_ns)

        def move(tx: Txn) -> list[Placed]:
            def free(seq: int) -> bool:
                return tx.resolve(capture.renamed(template, path, fields, seq)) is None

            seq = self._shots.get(shot)
            if seq is None or not free(seq):
                at = tx.resolve(posixpath.dirname(capture.renamed(template, path, fields, 1)))
                taken = capture.numbers(template, path, fields, [
                    n.decode(errors="surrogateescape") for _, n, _ in tx.entries(at)
                ] if at is not None else [])
                seq = next(n for n in itertools.count(1) if n not in taken and free(n))
            new = capture.renamed(template, path, fields, seq)
            done = treeops.relocate(tx, os.fsencode(path), os.fsencode(new), ino, now,
                                    new_folder)
            if done is None:
                return []
            self._shots[shot] = seq  # (the writer runs one change at a time)
            if len(self._shots) > SHOTS_KEPT:
                self._shots.popitem(last=False)
            moved = [Placed(new, ino, *done, was=path)]
            parent = tx.resolve(folder)
            names = [n.decode(errors="surrogateescape")
                     for _, n, _ in tx.entries(parent)] + [name]
            owners: dict[str, list[str]] = {}
            for image, sides in sidecars.link(names).items():
                for side in sides:
                    owners.setdefault(side, []).append(image)
            stem, new_stem = posixpath.splitext(name)[0], posixpath.splitext(new)[0]
            for side, images in owners.items():
                side_ino = tx.lookup(parent, os.fsencode(side))
                if images != [name] or side_ino is None:
                    continue  # (shared by a RAW and its JPEG: it stays with the other)
                to = new_stem + side[len(stem):]
                done = treeops.relocate(tx, os.fsencode(posixpath.join(folder, side)),
                                        os.fsencode(to), side_ino, now, new_folder)
                if done is not None:
                    moved.append(Placed(to, side_ino, *done,
                                        was=posixpath.join(folder, side)))
            return moved

        return self.store.write(move)

    def _sidecar(self, path: str, body: bytes) -> Placed | None:
        fd = os.memfd_create("vaultfs-sidecar", os.MFD_CLOEXEC)
        try:
            os.write(fd, body)
            ino, chain, new = import_file(self.store, fd, len(body), time.time_ns(),
                                          os.fsencode(path), exclusive=True)
        except FileExistsError:
            return None  # a sidecar is there already: never changed
        finally:
            os.close(fd)
        return Placed(path, ino, chain, new, size=len(body))


def _tag(tx: Txn, path: str) -> str | None:
    """The tier tag (user.vaultfs.tier) of the file or of the nearest folder above it."""
    while True:
        ino = tx.resolve(path)
        value = tx.xattr(ino, TIER_XATTR) if ino is not None else None
        if value is not None:
            return value.decode(errors="replace")
        if not path:
            return None
        path = posixpath.dirname(path)
