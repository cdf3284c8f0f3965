"""The live tree seen as a photographer's catalogue: every file with its metadata (its own and
its sidecars', from the store's media index), its tier, rating and label. Views, `vaultfs find`,
`vaultfs status` and sync's ordering read it. (The one module of media/ that reads the store:
through a read transaction it is given, never opening or writing one.)

Built by one walk of the tree in one read transaction; a mount rebuilds it when the store has
committed something since (at most twice a second).
"""

from __future__ import annotations

import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..store import ROOT_INO, Inode, StoreError, Txn
from ..store import policy
from ..store.recompress import MEDIA_KEY as LEVEL_KEY
from . import sidecars, tiers
from ..store.tags import TIER_XATTR

if TYPE_CHECKING:  # (numpy and Exiv2 come with groups: a sync needs neither to start)
    from .groups import Group

FINGERPRINT_KEYS = ("digest", "fingerprint", "fingerprint_error", "picture", "format", "preview")
KEPT_KEYS = FINGERPRINT_KEYS + (LEVEL_KEY,)  # of a record whose metadata could not be read


@dataclass
class Entry:
    path: str
    node: Inode
    meta: dict            # effective: the file's own metadata with its sidecars'
    tier: str
    sidecars: list[str]   # paths
    own: dict             # the file's own record (fingerprint, preview, capture...)
    analysed: bool        # its version has a record: its metadata was read (or failed to be)


@dataclass
class Catalog:
    files: dict[int, Entry] = field(default_factory=dict)          # ino -> entry
    members: dict[tuple, set[int]] = field(default_factory=lambda: defaultdict(set))
    # ("tier", name) / ("rating", 0..5) / ("label", colour) / ("preview", "") -> file inos,
    # and the folders that hold them somewhere below
    folders: dict[tuple, set[int]] = field(default_factory=lambda: defaultdict(set))
    groups: list[Group] = field(default_factory=list)  # bursts and brackets (a mount's)

    def group_files(self) -> Iterator[tuple[int, str, int, dict]]:
        """What GroupIndex.update takes: (inode, path, version, own record) of every file."""
        for ino, e in self.files.items():
            yield ino, e.path, e.node.content, e.own

    def tier_figures(self, scrubs: dict[str, dict]) -> dict[str, dict]:
        """Per tier: its files and their bytes, its last scrub, and how many of its files have
        chunks recompressed at each stronger zstd level ("recompressed": {level: files})
        (`vaultfs status`)."""
        out: dict[str, dict] = {}
        for e in self.files.values():
            t = out.setdefault(e.tier, {"files": 0, "bytes": 0})
            t["files"] += 1
            t["bytes"] += e.node.size
            level = e.own.get(LEVEL_KEY)
            if level:
                counts = t.setdefault("recompressed", {})
                counts[str(level)] = counts.get(str(level), 0) + 1
        for tier, result in scrubs.items():
            out.setdefault(tier, {"files": 0, "bytes": 0})["last_scrub"] = result
        return out

    def eviction_order(self, rules: policy.Policy, under: list[str] | None = None
                       ) -> list[list]:
        """[ino, content version, path] of the files whose tier lets them be evicted once a
        peer holds them (store/evict.py), oldest first; with `under`, only files at or below
        those paths. Sidecars stay: they are small and hold the edits."""
        tiers_ok = {name for name, tp in rules.tier_policies.items() if tp.evict}
        files = [e for e in self.under(under) if e.tier in tiers_ok and e.node.content
                 and not sidecars.is_sidecar(e.path.rsplit("/", 1)[-1])]
        files.sort(key=lambda e: (e.node.mtime_ns, e.path))
        return [[e.node.ino, e.node.content, e.path] for e in files]

    def recompression_due(self, levels: dict[str, int]) -> list[tuple[int, int]]:
        """(content version, level) of the files in a tier of a stronger zstd level (`levels`:
        tier -> level) whose chunks were not compressed at that level yet (store/
        recompress.py), in path order. Only files whose metadata is read: before that, their
        tier is not known."""
        due: dict[int, int] = {}
        for e in sorted(self.files.values(), key=lambda e: e.path):
            level = levels.get(e.tier, 0)
            if e.node.content and e.analysed and e.own.get(LEVEL_KEY, 0) < level:
                due[e.node.content] = max(level, due.get(e.node.content, 0))
        return list(due.items())

    def under(self, paths: list[str] | None) -> list[Entry]:
        """The files at or below `paths` (relative to the root; None: all)."""
        if paths is None:
            return list(self.files.values())
        roots = [p.strip("/") for p in paths]
        return [e for e in self.files.values()
                if any(not r or e.path == r or e.path.startswith(r + "/") for r in roots)]

    def add(self, key: tuple, ino: int, parents: list[int]) -> None:
        self.members[key].add(ino)
        self.folders[key].update(parents)


def tier_rules(rules: policy.Policy) -> tiers.Tiers:
    """The store's tiers, compiled; a rule that does not read is a clear error."""
    try:
        return tiers.Tiers(rules.tiers)
    except tiers.RuleError as e:
        raise StoreError(f"vault.toml, [[tiers]]: {e}") from None


def build(tx: Txn, rules: tiers.Tiers) -> Catalog:
    cat = Catalog()
    _walk(tx, rules, cat, ROOT_INO, "", [ROOT_INO], None, {})
    return cat


def _walk(tx: Txn, rules: tiers.Tiers, cat: Catalog, dino: int, prefix: str,
          parents: list[int], inherited_tag: str | None, adopted: dict[int, int]) -> None:
    """Catalogue a folder and what is below it. `adopted`: sidecars found from a folder above
    (Capture One's), by inode -> their image's inode."""
    tag = _tag(tx, dino) or inherited_tag
    nodes: dict[str, Inode] = {}
    for _, name, child in tx.entries(dino):
        node = tx.inode(child)
        if node is not None:
            nodes[name.decode(errors="surrogateescape")] = node
    links = sidecars.link(n for n, node in nodes.items()  # (Capture One's are linked above)
                          if stat.S_ISREG(node.mode) and node.ino not in adopted)
    owner = {s: image for image, sides in links.items() for s in sides}
    # (path from this folder, inode) of each image's sidecars, Capture One's two folders down
    side_nodes = {image: [(s, nodes[s]) for s in sides] for image, sides in links.items()}
    for image, found in _capture_one(tx, nodes).items():
        side_nodes.setdefault(image, []).extend(found)
        adopted.update((snode.ino, nodes[image].ino) for _, snode in found)
    # Images first: a sidecar goes where its image goes (Capture One's folder too).
    for name, node in sorted(nodes.items(), key=lambda kv: (
            kv[0] in owner, kv[0].lower() == sidecars.CAPTURE_ONE)):
        path = prefix + name
        if stat.S_ISDIR(node.mode):
            _walk(tx, rules, cat, node.ino, path + "/", parents + [node.ino], tag, adopted)
            continue
        if not stat.S_ISREG(node.mode):
            continue
        record = tx.media(node.content)
        own = _meta(record)
        version = tx.version(node.content)
        side = []
        for _, snode in side_nodes.get(name, []):
            sversion = tx.version(snode.content)
            if sversion is not None:
                side.append((_meta(tx.media(snode.content)), sversion.committed_ns))
        meta = tiers.effective(own, version.committed_ns if version else 0, side)
        image_ino = nodes[owner[name]].ino if name in owner else adopted.get(node.ino)
        image = cat.files.get(image_ino) if image_ino is not None else None
        tier = image.tier if image is not None else rules.tier_of(
            tiers.variables(meta, path, bool(side)), _tag(tx, node.ino) or tag)
        entry = Entry(path, node, meta, tier, [prefix + s for s, _ in side_nodes.get(name, [])],
                      own, record is not None)
        cat.files[node.ino] = entry
        cat.add(("tier", tier), node.ino, parents)
        if "preview" in own:
            cat.add(("preview", ""), node.ino, parents)
        if image is not None:  # a sidecar is listed beside its image in every view
            for key in ("rating", "label"):
                for k, inos in list(cat.members.items()):
                    if k[0] == key and image.node.ino in inos:
                        cat.add(k, node.ino, parents)
        elif not sidecars.is_sidecar(name) and (own.get("kind") == "image" or side):
            rating = meta.get("rating", 0)
            if 0 <= rating <= 5:
                cat.add(("rating", rating), node.ino, parents)
            if meta.get("label"):
                cat.add(("label", meta["label"]), node.ino, parents)


def _capture_one(tx: Txn, nodes: dict[str, Inode]) -> dict[str, list[tuple[str, Inode]]]:
    """Capture One's settings of a folder's images, CaptureOne/Settings<N>/IMG_0001.CR3.cos:
    {image name: [(path from the folder, inode)]}."""
    images = [n for n, node in nodes.items()
              if stat.S_ISREG(node.mode) and not sidecars.is_sidecar(n)]
    out: dict[str, list[tuple[str, Inode]]] = {}
    for folder, node in nodes.items():
        if folder.lower() != sidecars.CAPTURE_ONE or not stat.S_ISDIR(node.mode):
            continue
        for _, raw, child in tx.entries(node.ino):
            sub, settings = raw.decode(errors="surrogateescape"), tx.inode(child)
            if settings is None or not stat.S_ISDIR(settings.mode) or \
                    not sidecars.is_capture_one_settings(folder, sub):
                continue
            files = {}
            for _, fname, fino in tx.entries(child):
                f = tx.inode(fino)
                if f is not None and stat.S_ISREG(f.mode):
                    files[fname.decode(errors="surrogateescape")] = f
            for image, cos in sidecars.capture_one(images, files).items():
                out.setdefault(image, []).extend((f"{folder}/{sub}/{c}", files[c]) for c in cos)
    return out


def _meta(record: dict | None) -> dict:
    """A version's record; of one whose metadata could not be read, only what its fingerprint
    gave (a picture can be decodable with metadata Exiv2 refuses) and its chunks' level."""
    meta = record or {}
    if "error" in meta:
        return {k: meta[k] for k in KEPT_KEYS if k in meta}
    return meta


def _tag(tx: Txn, ino: int) -> str | None:
    value = tx.xattr(ino, TIER_XATTR)
    return bytes(value).decode(errors="replace").strip() or None if value else None
