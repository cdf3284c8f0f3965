"""The store's policies, read from vault.toml: automatic snapshots and what retention keeps.

    [snapshots]
    every_minutes = 15   # while files change; 0 turns automatic snapshots off
    at_unmount = true    # one more when a mount ends with changes since the last
    on_select = true     # and one when a file newly counts as a select
    keep_last = 20       # automatic snapshots (named auto-...) kept by these rules
    keep_hourly = 24
    keep_daily = 30
    keep_weekly = 8
    keep_monthly = 12

    [versions]           # each file's timeline, thinned by the same kind of rules
    keep_last = 50
    keep_daily = 30
    keep_monthly = 12

    [space]
    keep_free_percent = 20   # under this, files a peer holds are evicted (0: never)

    [mirror]
    path = "/media/ssd2/vault"   # a second copy on another device (relative: to the store's
                                 # folder); `vaultfs mount --mirror PATH` wins over it

    [[tiers]]            # priority tiers, in order: the first rule that holds names the tier
    name = "select"      # (rules: media/tiers.py)
    rule = "rating >= 4 or pick or label == 'red'"
    verify_days = 7      # a mount re-reads and re-hashes the tier's chunks this often (0: never)
    sync_priority = 1    # the order in which tiers leave the vault when it syncs
    evict = false        # whether its files may be evicted once a peer holds them
    copies = 2           # 2: a file is safe once the mirror holds it too (fs/mirror.py); the
                         # default is 2 for select where a mirror is configured, else 1
    compression = 19     # a stronger zstd level (1-19) for the tier's chunks, re-encoded in
                         # the background once a file is in the tier (store/recompress.py);
                         # default: the ingest level, nothing re-encoded
    [[tiers]]
    name = "reject"
    rule = "reject"
    evict = true
    [[tiers]]
    name = "general"
    rule = "true"
    evict = true

    [[capture]]          # on-capture policies: what a new file gets, after its metadata is read
    folder = "weddings"  # files captured under this folder of the vault (or: tier = "select")
    copyright = "(c) 2026 Ana Lima"     # written as an XMP sidecar, never into the file
    creator = "Ana Lima"
    keywords = ["wedding"]
    session = "Ana & Tom"               # (XMP photoshop:TransmissionReference, IPTC Job Id)
    rename = "{date}/{camera}_{seq}{ext}"   # only when given: the file's new path, from its
                                            # folder ({date} {camera} {seq} {name} {ext})
    preview = 2048       # a JPEG proxy this long a side, for .vault/previews, of each version
                         # of an image without an embedded JPEG preview as large (fs/previews.py)

A missing key takes the default above; `vaultfs init` writes them all (the mirror's path and
`copies` as comments: their defaults depend on each other; `compression` as a comment), so they
can be read and changed in one place. Snapshots made by hand are never pruned by policy. A tier that asks for 2 copies
without a mirror, or for 2 copies and eviction, is an error: never silently one copy.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .codec import DEFAULT_LEVEL, MAX_LEVEL
from .txn import StoreError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")  # see history.retained
DEFAULT_SNAPSHOT_KEEP = {"last": 20, "hourly": 24, "daily": 30, "weekly": 8, "monthly": 12}
DEFAULT_VERSION_KEEP = {"last": 50, "daily": 30, "monthly": 12}
AUTO_PREFIX = "auto-"


DEFAULT_TIERS = (("select", "rating >= 4 or pick or label == 'red'"),
                 ("reject", "reject"),
                 ("general", "true"))


DEFAULT_VERIFY_DAYS = {"select": 7, "reject": 0}
EVICTABLE = ("general", "reject")  # by default; a select is never evicted
DEFAULT_KEEP_FREE_PERCENT = 20.0
MIRRORED = ("select",)  # the tiers kept in two copies by default where a mirror is configured


@dataclass
class TierPolicy:
    verify_days: float   # re-read and re-hash the tier's chunks this often; 0: never
    sync_priority: int   # lower leaves first when the vault syncs (issue 6)
    evict: bool = False  # its files may be evicted once a peer holds them
    copies: int = 1      # 2: safe only once the mirror holds the file too
    compression: int | None = None  # a zstd level above the ingest level: chunks re-encoded


CAPTURE_METADATA = ("copyright", "creator", "keywords", "session")
RENAME_FIELDS = ("date", "camera", "seq", "name", "ext")
PREVIEW_SIDES = (64, 8192)  # the long sides a policy may ask a generated preview to have


@dataclass
class CapturePolicy:
    folder: str | None   # files captured under this folder ('' is the whole vault)...
    tier: str | None     # ...or files of this tier when captured
    metadata: dict       # copyright, creator, session (strings), keywords (strings)
    rename: str | None   # the template of a new path, relative to the file's folder
    preview: int | None = None  # the long side of a generated preview, in pixels


@dataclass
class Policy:
    tiers: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_TIERS))
    snapshot_every_s: float = 15 * 60.0
    snapshot_at_unmount: bool = True
    snapshot_on_select: bool = True
    snapshot_keep: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SNAPSHOT_KEEP))
    version_keep: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_VERSION_KEEP))
    tier_policies: dict[str, TierPolicy] = field(default_factory=dict)
    keep_free_percent: float = DEFAULT_KEEP_FREE_PERCENT
    mirror: Path | None = None  # the mirror store's path, when one is configured
    capture: list[CapturePolicy] = field(default_factory=list)


def default_toml() -> str:
    """The policy part of a new store's vault.toml."""
    lines = ["", "[snapshots]", "every_minutes = 15", "at_unmount = true", "on_select = true"]
    lines += [f"keep_{k} = {v}" for k, v in DEFAULT_SNAPSHOT_KEEP.items()]
    lines += ["", "[versions]"] + [f"keep_{k} = {v}" for k, v in DEFAULT_VERSION_KEEP.items()]
    lines += ["", "[space]", f"keep_free_percent = {DEFAULT_KEEP_FREE_PERCENT:g}"]
    lines += ["", "[mirror]", '# path = "/media/ssd2/vault"   # a second copy of the tiers with '
              'copies = 2', "# (select, by default, once a mirror is set: copies = 2)"]
    for i, (name, rule) in enumerate(DEFAULT_TIERS, 1):
        lines += ["", "[[tiers]]", f'name = "{name}"', f'rule = "{rule}"',
                  f"verify_days = {DEFAULT_VERIFY_DAYS.get(name, 30)}", f"sync_priority = {i}",
                  f"evict = {'true' if name in EVICTABLE else 'false'}"]
        if i == 1:
            lines += [f"# compression = 9   # a stronger zstd level ({DEFAULT_LEVEL + 1}-"
                      f"{MAX_LEVEL}) for the tier's chunks, in the background"]
    return "\n".join(lines) + "\n"


def load(store_path: Path, mirror: str | os.PathLike | None = None) -> Policy:
    """The policy of a store; a bad value is an error that names it. `mirror` (the mount's
    --mirror) wins over the mirror vault.toml names."""
    path = store_path / "vault.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid TOML: {e}") from None
    p = Policy()
    snaps, versions = doc.get("snapshots", {}), doc.get("versions", {})
    every = snaps.get("every_minutes", 15)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0:
        raise StoreError(f"{path}: snapshots.every_minutes must be a number >= 0")
    p.snapshot_every_s = float(every) * 60
    at_unmount = snaps.get("at_unmount", True)
    if not isinstance(at_unmount, bool):
        raise StoreError(f"{path}: snapshots.at_unmount must be true or false")
    p.snapshot_at_unmount = at_unmount
    on_select = snaps.get("on_select", True)
    if not isinstance(on_select, bool):
        raise StoreError(f"{path}: snapshots.on_select must be true or false")
    p.snapshot_on_select = on_select
    keep_free = doc.get("space", {}).get("keep_free_percent", DEFAULT_KEEP_FREE_PERCENT)
    if isinstance(keep_free, bool) or not isinstance(keep_free, (int, float)) or \
            not 0 <= keep_free < 100:
        raise StoreError(f"{path}: space.keep_free_percent must be a number from 0 to 99")
    p.keep_free_percent = float(keep_free)
    p.mirror = _mirror(path, doc, mirror)
    p.snapshot_keep = _rules(path, "snapshots", snaps, DEFAULT_SNAPSHOT_KEEP)
    p.version_keep = _rules(path, "versions", versions, DEFAULT_VERSION_KEEP)
    tiers = doc.get("tiers", [dict(name=n, rule=r) for n, r in DEFAULT_TIERS])
    if not isinstance(tiers, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"]
            and "/" not in t["name"] and t["name"] not in (".", "..")
            and isinstance(t.get("rule", "true"), str) for t in tiers) or \
            len({t["name"] for t in tiers}) != len(tiers):
        raise StoreError(f'{path}: each [[tiers]] needs a name = "..." of its own (not "." or '
                         f'"..", no "/") and a rule = "..."')
    p.tiers = [(t["name"], t.get("rule", "true")) for t in tiers]
    for i, t in enumerate(tiers):
        unknown = set(t) - {"name", "rule", "verify_days", "sync_priority", "evict", "copies",
                            "compression"}
        if unknown:
            raise StoreError(f"{path}: tier {t['name']}: {', '.join(sorted(unknown))} "
                             f"is not something this vaultfs does (yet)")
        days = t.get("verify_days", DEFAULT_VERIFY_DAYS.get(t["name"], 30))
        prio = t.get("sync_priority", i + 1)
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0:
            raise StoreError(f"{path}: tier {t['name']}: verify_days must be a number >= 0")
        if isinstance(prio, bool) or not isinstance(prio, int):
            raise StoreError(f"{path}: tier {t['name']}: sync_priority must be a whole number")
        evict = t.get("evict", t["name"] in EVICTABLE)
        if not isinstance(evict, bool):
            raise StoreError(f"{path}: tier {t['name']}: evict must be true or false")
        if evict and t["name"] == "select":
            raise StoreError(f"{path}: tier select: a select is never evicted (evict = false)")
        copies = t.get("copies", 2 if p.mirror and t["name"] in MIRRORED else 1)
        if type(copies) is not int or copies not in (1, 2):
            raise StoreError(f"{path}: tier {t['name']}: copies must be 1 or 2")
        if copies == 2 and p.mirror is None:
            raise StoreError(f"{path}: tier {t['name']} asks for copies = 2 and no mirror is "
                             f"configured: mount with --mirror PATH, or set path in [mirror]")
        if copies == 2 and evict:
            raise StoreError(f"{path}: tier {t['name']}: a tier kept in two copies is not "
                             f"evicted (evict = false, or copies = 1)")
        level = t.get("compression", DEFAULT_LEVEL)
        if type(level) is not int or not 1 <= level <= MAX_LEVEL:
            raise StoreError(f"{path}: tier {t['name']}: compression must be a zstd level from "
                             f"1 to {MAX_LEVEL} (default {DEFAULT_LEVEL}, the ingest level)")
        p.tier_policies[t["name"]] = TierPolicy(float(days), prio, evict, copies,
                                                level if level > DEFAULT_LEVEL else None)
    p.tier_policies.setdefault("general", TierPolicy(30.0, len(tiers) + 1, True))
    capture = doc.get("capture", [])
    if not isinstance(capture, list) or not all(isinstance(c, dict) for c in capture):
        raise StoreError(f"{path}: capture policies are [[capture]] tables")
    p.capture = [_capture(path, c, p.tier_policies) for c in capture]
    return p


def _mirror(path: Path, doc: dict, given: str | os.PathLike | None) -> Path | None:
    """The mirror's path: the mount's --mirror, else [mirror] path (relative to the store's
    folder), else none."""
    if given is not None:
        return Path(given).expanduser().absolute()
    table = doc.get("mirror", {})
    named = table.get("path") if isinstance(table, dict) else None
    if named is None:
        return None
    if not isinstance(named, str) or not named.strip():
        raise StoreError(f'{path}: mirror.path must be a path, like "/media/ssd2/vault"')
    return (path.parent / Path(named).expanduser()).absolute()


def _capture(path: Path, c: dict, tiers: dict) -> CapturePolicy:
    where = f"{path}: [[capture]] {c.get('folder', c.get('tier', ''))!r}"
    unknown = set(c) - {"folder", "tier", "rename", "preview", *CAPTURE_METADATA}
    if unknown:
        raise StoreError(f"{where}: {', '.join(sorted(unknown))} is not something this vaultfs "
                         f"does (keys: folder or tier, {', '.join(CAPTURE_METADATA)}, rename, "
                         f"preview)")
    if ("folder" in c) == ("tier" in c):
        raise StoreError(f'{where}: give folder = "..." or tier = "...", one of them')
    folder, tier = c.get("folder"), c.get("tier")
    if folder is not None and (not isinstance(folder, str) or
                               any(part in (".", "..") for part in folder.split("/"))):
        raise StoreError(f"{where}: folder must be a path in the vault, without . or ..")
    if tier is not None and tier not in tiers:
        raise StoreError(f"{where}: there is no tier {tier!r} (tiers: {', '.join(tiers)})")
    for key in ("copyright", "creator", "session", "rename"):
        if key in c and (not isinstance(c[key], str) or not c[key].strip()):
            raise StoreError(f"{where}: {key} must be a string")
    keywords = c.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k for k in keywords):
        raise StoreError(f'{where}: keywords must be a list of strings: ["eagle", "nest"]')
    rename = c.get("rename")
    if rename is not None:
        fields = re.findall(r"\{([^{}]*)\}", rename)
        if set(fields) - set(RENAME_FIELDS) or "seq" not in fields or rename.startswith("/") \
                or any(part in ("", ".", "..") for part in rename.split("/")):
            raise StoreError(f"{where}: rename {rename!r} must be a relative path made of "
                             f"{{{'}, {'.join(RENAME_FIELDS)}}} and text, with {{seq}} "
                             f"(so that no two files get one name)")
    preview = c.get("preview")
    if preview is not None and (type(preview) is not int or
                                not PREVIEW_SIDES[0] <= preview <= PREVIEW_SIDES[1]):
        raise StoreError(f"{where}: preview must be the long side of a generated preview in "
                         f"pixels, a whole number from {PREVIEW_SIDES[0]} to {PREVIEW_SIDES[1]}")
    metadata = {k: c[k] for k in CAPTURE_METADATA if k in c and c[k]}
    return CapturePolicy(folder.strip("/") if folder is not None else None, tier, metadata,
                         rename, preview)


def _rules(path: Path, section: str, table: dict, default: dict[str, int]) -> dict[str, int]:
    given = {k.removeprefix("keep_"): v for k, v in table.items() if k.startswith("keep_")}
    for k, v in given.items():
        if k not in RULES or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise StoreError(f"{path}: {section}.keep_{k} must be one of keep_"
                             f"{', keep_'.join(RULES)} with a whole number >= 0")
    rules = given if given else dict(default)
    if not any(rules.values()):
        raise StoreError(f"{path}: {section} keeps nothing; give at least one keep_ rule")
    return rules
