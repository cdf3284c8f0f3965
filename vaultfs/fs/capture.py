"""On-capture policies (vault.toml [[capture]]) applied by the mount: once a new image's
metadata is read, the first policy for its folder or tier renames it by its template (only
when the policy has one; its own sidecars go with it) and gives it an XMP sidecar with the
policy's metadata. (Its `preview`, for every version of an image, is made by previews.py.) The captured file's bytes are never changed, and a sidecar already there is
left as it is.

Everything here blocks: it runs in a worker thread, never on the trio loop.
"""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass

from ..media import capture, sidecars
from ..media.tiers import Tiers, variables
from ..store import Store, Txn, treeops
from ..store.policy import CapturePolicy
from ..store.tags import TIER_XATTR
from .importfile import import_file, new_folder


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


class CapturePolicies:
    def __init__(self, store: Store, policies: list[CapturePolicy], tiers: Tiers):
        self.store, self.policies, self.tiers = store, policies, tiers

    def apply(self, ino: int, path: str, record: dict, rename: bool = True) -> list[Placed]:
        """Apply the policy for the image `ino`, captured at `path` (renaming it only if
        `rename` and the policy has a template): what was placed."""
        with self.store.reader() as tx:
            policy = self.policy_for(tx, path, record)
            node = tx.inode(ino)
        if policy is None or node is None:
            return []
        placed = []
        if policy.rename and rename:
            placed = self._rename(ino, path, policy.rename,
                                  capture.rename_fields(path, record, node.mtime_ns))
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

    def _rename(self, ino: int, path: str, template: str, fields: dict) -> list[Placed]:
        """The file moved to the first free path the template gives, with the sidecars that
        are its alone (IMG_0001.xmp, IMG_0001.CR2.xmp -> <new name>.xmp...), in one
        transaction; [] when it is no longer at `path`."""
        now = time.time_ns()
        folder, name = posixpath.split(path)

        def move(tx: Txn) -> list[Placed]:
            seq = 1
            while tx.resolve(new := capture.renamed(template, path, fields, seq)) is not None:
                seq += 1  # (the first free number: the writer runs one change at a time)
            done = treeops.relocate(tx, os.fsencode(path), os.fsencode(new), ino, now,
                                    new_folder)
            if done is None:
                return []
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
