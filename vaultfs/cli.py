"""The `vaultfs` command: parses arguments, wires the layers, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .store import Store, StoreBusy, StoreError, policy

log = logging.getLogger("vaultfs")

MOUNT_WAIT = 30.0


def default_store() -> Path:
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "vaultfs" / "default"


def default_mountpoint() -> Path:
    return Path.home() / "Capture"


class CliError(Exception):
    """One sentence for the user; the command exits non-zero."""


# ---- commands ----------------------------------------------------------------------------------
def cmd_init(args) -> int:
    path = Store.init(args.store)
    print(f"created vault store {path}")
    return 0


def cmd_mount(args) -> int:
    from .fs import mount as fsmount  # pyfuse3 loads only for the commands that mount

    if (args.store is None) != (args.mountpoint is None):
        raise CliError("give both STORE and MOUNTPOINT, or neither for the default vault")
    store_path = Path(args.store or default_store()).expanduser().absolute()
    mountpoint = Path(args.mountpoint or default_mountpoint()).expanduser().absolute()
    if args.store is None:
        if not (store_path / "vault.toml").exists():
            Store.init(store_path)
            print(f"created the default vault store {store_path}")
        mountpoint.mkdir(parents=True, exist_ok=True)
    options = _mount_options(args.options)
    try:
        fsmount.check_mountpoint(mountpoint)
    except fsmount.MountError as e:
        raise CliError(str(e)) from None

    if args.foreground:
        fsmount.tune_malloc()
        _log_to(store_path, also_stderr=True, debug=args.debug)
        with Store.open(store_path, writable=True, branch=args.branch.encode()) as store:
            fsmount.run(store, mountpoint, allow_other="allow_other" in options,
                        vault_visible="vault_visible" in options, mirror=args.mirror)
        return 0

    with Store.open(store_path, branch=args.branch.encode()) as store:  # a clear error now,
        rules = policy.load(store_path, mirror=args.mirror)              # not in a daemon's log
        if rules.mirror is not None:
            from .fs.mirror import open_store
            mirror, created = open_store(store, rules.mirror, mountpoint)
            mirror.close()
            if created:
                print(f"created the mirror store {mirror.path}")
    daemon = _start_daemon(store_path, mountpoint, options, args.branch, args.debug,
                           rules.mirror if args.mirror is not None else None)
    print(f"mounted {store_path} on {mountpoint} (daemon pid {daemon.pid})")
    return 0


def _start_daemon(store_path: Path, mountpoint: Path, options: set[str], branch: str = "main",
                  debug: bool = False, mirror: Path | None = None) -> subprocess.Popen:
    """Mount in a daemon of its own (`mount --foreground` in a new session), returned once the
    mount answers."""
    from .fs import mount as fsmount

    log_file = store_path / "vaultfs.log"
    start = log_file.stat().st_size if log_file.exists() else 0
    cmd = [sys.executable, "-m", "vaultfs", "mount", "--foreground", str(store_path),
           str(mountpoint)]
    if options:
        cmd += ["-o", ",".join(sorted(options))]
    if branch != "main":
        cmd += ["--branch", branch]
    if mirror is not None:
        cmd += ["--mirror", str(mirror)]
    if debug:
        cmd.append("--debug")
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as out:
        child = subprocess.Popen(cmd, stdin=devnull, stdout=out, stderr=out,
                                 start_new_session=True)
    deadline = time.monotonic() + MOUNT_WAIT
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):  # answered: the kernel has the daemon's INIT reply
            fsmount.raise_read_ahead(mountpoint)
            return child
        if child.poll() is not None:
            tail = log_file.read_bytes()[start:].decode(errors="replace").strip().splitlines()
            errors = [line.removeprefix("vaultfs: error: ") for line in tail
                      if "error" in line.lower()] or tail[-3:]
            raise CliError("the mount daemon stopped: " + (" / ".join(errors) or "no reason"))
        time.sleep(0.05)
    child.terminate()
    raise CliError(f"the mount did not come up within {MOUNT_WAIT:.0f} s; see {log_file}")


def cmd_umount(args) -> int:
    from .fs import mount as fsmount

    mountpoint = Path(args.mountpoint).expanduser().absolute()
    try:
        fsmount.unmount_vault(mountpoint)
    except fsmount.MountError as e:
        raise CliError(str(e)) from None
    print(f"unmounted {mountpoint}")
    return 0


def cmd_status(args) -> int:
    from .fs.mirror import figures as copies_figures
    from .store import evict

    with Store.open(args.store) as store:
        figures = store.figures()
        figures.update(copies_figures(store, _catalog(store)))
        with store.reader() as tx:
            figures["offline"] = evict.offline_files(tx)
        for name, tp in policy.load(store.path).tier_policies.items():
            if tp.compression:
                figures["tiers"].setdefault(name, {"files": 0, "bytes": 0})["compression"] = \
                    tp.compression
    if _json(args, figures):
        return 0
    rows = [
        ("store", figures["store"]),
        ("files", f"{figures['files']:,}"),
        ("logical", _size(figures["logical_bytes"])),
        ("unique", _size(figures["unique_bytes"])),
        ("stored", _size(figures["stored_bytes"])),
        ("dedup ratio", f"{figures['dedup_ratio']:.2f}x"),
        ("compression ratio", f"{figures['compression_ratio']:.2f}x"),
        ("free on disk", _size(figures["free_bytes"])),
    ]
    if figures["mirror"]:
        rows.append(("mirror", figures["mirror"]["path"]))
    for name, t in sorted(figures["tiers"].items()):
        rows.append((f"tier {name}", _tier_line(t)))
    for r in figures["repairs"][-5:]:
        mended = f"{r['copy']}'s copy, from the {'mirror' if r['copy'] == 'vault' else 'vault'}"
        rows.append(("repaired", f"{', '.join(r['paths'])}: the {mended} ({r['by']}, "
                                 f"{_when(r['at'])})"))
    for c in figures["conflicts"]:
        rows.append(("conflict", f"{c['path']}: {c['vault']}'s version is {c['kept_as']}"))
    for f in figures["offline"]:
        rows.append(("offline", f"{f['path']}: {_size(f['offline_bytes'])} evicted, held by "
                                f"{', '.join(f['held_by']) or 'no peer on record'}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _tier_line(t: dict) -> str:
    """'120 files, 2.9 GiB, 2 copies: 118, mirroring 2, scrubbed <when>, clean'"""
    line = f"{t['files']:,} files, {_size(t['bytes'])}"
    if t.get("copies", 1) > 1:
        line += f", 2 copies: {t['mirrored']:,}" + (f", mirroring {t['mirroring']:,}"
                                                    if t["mirroring"] else "")
    elif t.get("mirrored"):
        line += f", the mirror holds {t['mirrored']:,}"
    if t.get("compression"):
        done = sum(n for level, n in t.get("recompressed", {}).items()
                   if int(level) >= t["compression"])
        line += f", zstd level {t['compression']}: {done:,} recompressed"
    last = t.get("last_scrub")
    if last is None:
        return line + ", never scrubbed"
    line += f", scrubbed {_when(last['finished_ns'])}" + (
        f", {len(last['damaged'])} DAMAGED" if last["damaged"] else ", clean")
    if last.get("repaired"):
        line += f", {len(last['repaired'])} repaired from the mirror"
    theirs = last.get("mirror")
    if theirs:
        line += "; the mirror's copies " + (f"{len(theirs['damaged'])} DAMAGED"
                                            if theirs["damaged"] else "clean")
        if theirs["repaired"]:
            line += f", {len(theirs['repaired'])} repaired from the vault"
    return line


def cmd_verify(args) -> int:
    from .store.verify import verify

    with Store.open(args.store) as store:
        with _progress(args, store.figures()["unique_bytes"], "verifying") as bar:
            report = verify(store, progress=lambda done: bar.update(done - bar.n))
    if _json(args, report.as_dict()):
        return 0 if report.ok else 1
    print(f"checked {report.chunks:,} chunks ({_size(report.bytes_checked)}) "
          f"and {report.files:,} files")
    for chunk, why in report.bad_chunks.items():
        print(f"damaged chunk {chunk}: {why}")
    for path, ranges in report.damaged_files.items():
        spans = ", ".join(f"bytes {o}-{o + n - 1}" for o, n in ranges)
        print(f"damaged file {path}: {spans}")
    for problem in report.problems:
        print(f"problem: {problem}")
    print("store is clean" if report.ok else "store is DAMAGED")
    return 0 if report.ok else 1


def cmd_snapshot(args) -> int:
    if args.delete:
        if not args.name:
            raise CliError("name the snapshot to delete")
        return _delete(args, "snapshot")
    result = _admin(args.store, "snapshot", name=args.name, branch=args.branch)
    if not _json(args, result):
        print(f"snapshot {result['name']} of branch {result['branch']}")
    return 0


def cmd_snapshots(args) -> int:
    from .store import history

    with Store.open(args.store) as store:
        snaps = history.list_snapshots(store)
    if _json(args, snaps):
        return 0
    rows = [("NAME", "CREATED", "FILES", "SIZE", "ONLY HERE")]
    for s in snaps:
        rows.append((s["name"], _when(s["created_ns"]), f"{s['files']:,}",
                     _size(s["logical_bytes"]), _size(s["exclusive_bytes"])))
    _table(rows)
    return 0


def cmd_log(args) -> int:
    from .store import history

    with Store.open(args.store) as store:
        entries = history.file_log(store, args.path)
    if _json(args, entries):
        return 0
    rows = [("VERSION", "COMMITTED", "SIZE", "CHANGED", "METADATA")]
    for e in entries:
        changes = ", ".join(f"{k} {a if a is not None else '-'} -> {b if b is not None else '-'}"
                            for k, (a, b) in e["metadata_changes"].items())
        rows.append((e["name"], _when(e["committed_ns"]), _size(e["size"]),
                     _size(e["changed_bytes"]), changes))
    _table(rows)
    return 0


def cmd_diff(args) -> int:
    from .store import history

    with Store.open(args.store) as store:
        changes = history.diff(store, args.a, args.b)
    if _json(args, changes):
        return 0
    marks = {"added": "+", "removed": "-", "modified": "M", "renamed": "R"}
    for c in changes:
        line = f"{marks[c['change']]} {c['path']}"
        if c["change"] == "renamed":
            line = f"R {c['from']} -> {c['path']}"
        if args.stat:
            line += f"  ({_size(c.get('old_size', 0))} -> {_size(c.get('size', 0))})"
        print(line)
    if args.stat:
        counts = {k: sum(1 for c in changes if c["change"] == k) for k in marks}
        print(", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cmd_events(args) -> int:
    from .client import Vault

    try:
        for event in Vault(args.mountpoint).events():
            print(json.dumps(event), flush=True)
    except BrokenPipeError:  # `vaultfs events M | head`
        pass
    return 0


def cmd_safe(args) -> int:
    from .client import Vault

    vault = Vault(args.mountpoint)
    answers = [vault.safe(os.path.relpath(os.path.abspath(p), vault.mountpoint))
               for p in args.paths]
    if not _json(args, answers):
        for a in answers:
            wanted = f" of {a['copies_wanted']}" if a.get("copies_wanted", 1) > 1 else ""
            print(f"{a['path']}: {'safe' if a['safe'] else 'NOT YET SAFE'} "
                  f"({a['copies']} cop{'y' if a['copies'] == 1 else 'ies'}{wanted})")
    return 0 if all(a["safe"] for a in answers) else 1


def cmd_import(args) -> int:
    import tempfile

    from . import cardimport
    from .fs import control
    from .fs import mount as fsmount

    store_path = Path(args.store).expanduser().absolute()
    report = cardimport.plan([os.path.abspath(c) for c in args.cards], args.into)
    try:
        Store.open(store_path, writable=True).close()
        policy.load(store_path)
        mountpoint: Path | None = Path(tempfile.mkdtemp(prefix="vaultfs-import-"))
    except StoreBusy:
        mountpoint = None  # mounted: the mount imports
    if mountpoint is not None:  # mounted for the import, by a daemon as `vaultfs mount` does
        try:
            daemon = _start_daemon(store_path, mountpoint, set())
        except BaseException:
            mountpoint.rmdir()
            raise
    try:
        with Store.open(store_path) as store:
            def request(op: str, **kw):
                return control.request(store, op, **kw)

            with _progress(args, sum(f.size for f in report.files), "importing") as bar:
                cardimport.run(store, request, report, progress=bar.update)
            if mountpoint is not None and not cardimport.wait_analysed(request):
                print("vaultfs: the metadata of some files is still to be read; the next "
                      "mount reads it", file=sys.stderr)
    finally:
        if mountpoint is not None:
            try:
                fsmount.unmount_vault(mountpoint)
                daemon.wait()
            finally:
                mountpoint.rmdir()
    if _json(args, report.as_dict()):
        return 0 if report.safe() else 1
    for card in report.as_dict()["cards"]:
        print(f"{card['card']}: {card['files']:,} files ({_size(card['bytes'])}): "
              f"{card['imported']:,} imported, {card['held']:,} already in the vault")
        unsafe = [f for f in report.card_files(card["card"]) if not f.safe]
        if not unsafe:
            print("  SAFE TO FORMAT: every file on it is in the vault, read back and matched")
        else:
            print(f"  NOT SAFE TO FORMAT: {len(unsafe):,} file{'s are' if len(unsafe) > 1 else ' is'}"
                  f" not safely in the vault:")
            for f in unsafe:
                print(f"    {f.path}: {f.why}")
        if args.list:
            for f in report.card_files(card["card"]):
                if f.safe:
                    print(f"    {f.path} -> {f.vault_path} ({f.state})")
    return 0 if report.safe() else 1


def cmd_find(args) -> int:
    with Store.open(args.store) as store:
        entries = _catalog(store).files.values()
    rating = _comparison(args.rating) if args.rating else None
    found = []
    for e in sorted(entries, key=lambda e: e.path):
        m = e.meta
        camera = " ".join(p for p in (m.get("make"), m.get("model")) if p)
        when = m.get("capture_time", "")
        if (args.tier and e.tier != args.tier
                or rating and not (m.get("kind") == "image" and rating(m.get("rating", 0)))
                or args.label and m.get("label") != args.label.lower()
                or args.camera and args.camera.lower() not in (camera.lower(),
                                                               m.get("model", "").lower())
                or args.since and (not when or when[:10] < args.since)
                or args.until and (not when or when[:10] > args.until)
                or args.keyword and args.keyword not in m.get("keywords", [])):
            continue
        found.append({"path": e.path, "tier": e.tier, "metadata": m, "sidecars": e.sidecars})
    if not _json(args, found):
        for f in found:
            print(f["path"])
    return 0


def cmd_groups(args) -> int:
    with Store.open(args.store) as store:
        cat = _catalog(store)
    found = _group_index(cat).groups(args.kind)
    if _json(args, [g.as_dict() for g in found]):
        return 0
    rows = [("KIND", "GROUP", "FILES")]
    for g in found:
        rows += [(g.kind if i == 0 else "", g.name if i == 0 else "", p)
                 for i, p in enumerate(g.paths)]
    if found:
        _table(rows)
    else:
        print("no groups" + (f" of kind {args.kind}" if args.kind else ""))
    _not_fingerprinted(cat)
    return 0


def cmd_similar(args) -> int:
    from .media import fingerprint, groups, metadata

    with Store.open(args.store) as store:
        cat = _catalog(store)
        path = _vault_path(store, args.file)
    index = _group_index(cat)
    target = next((it for it in index.items.values() if it.path == path), None)
    if target is None:  # a file outside the vault: read it here
        from .fs.analysis import MAX_BYTES

        try:
            if os.path.getsize(args.file) > MAX_BYTES:
                raise CliError(f"{args.file} is larger than the {MAX_BYTES >> 20} MiB the vault "
                               f"reads of an image to fingerprint it")
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise CliError(f"{args.file} is neither a file in the vault nor a readable file: "
                           f"{e.strerror}") from None
        if metadata.sniff(data[:512], Path(args.file).name) != "image":
            raise CliError(f"{args.file} is neither a file in the vault nor an image")
        try:
            record = metadata.read(data)
        except metadata.MetadataError:
            record = {"kind": "image"}
        record.update(fingerprint.image_record(data))
        target = groups.item(-1, os.path.abspath(args.file), 0, record)
        index.add(target)
    if not target.fingerprinted:
        print(f"vaultfs: {target.path} has no fingerprint; only its groups are listed",
              file=sys.stderr)
    found: dict[int, dict] = {}
    for d, key in index.similar(target):
        found[key] = {"path": index.items[key].path, "distance": d, "groups": []}
    for g in index.groups_of(target.key):
        for key in g.keys:
            if key != target.key:
                found.setdefault(key, {"path": index.items[key].path,
                                       "distance": groups.distance(target, index.items[key]),
                                       "groups": []})["groups"].append(g.kind)
    listed = sorted(found.values(), key=lambda f: (f["distance"] is None, f["distance"] or 0,
                                                  f["path"]))
    if _json(args, {"file": target.path, "similar": listed}):
        return 0
    if not listed:
        print(f"nothing in the vault looks like {target.path}")
        return 0
    _table([("DISTANCE", "GROUPS", "FILE")] + [
        ("-" if f["distance"] is None else str(f["distance"]), ",".join(f["groups"]) or "-",
         f["path"]) for f in listed])
    return 0


def cmd_tag(args) -> int:
    if (args.tier is None) == (not args.clear):
        raise CliError("give --tier NAME, or --clear")
    result = _admin(args.store, "tag", paths=args.paths, tier=args.tier)
    for p in result["paths"]:
        print(f"{p}: {'tier ' + result['tier'] if result['tier'] else 'tag cleared'}")
    return 0


def cmd_branch(args) -> int:
    if args.delete:
        return _delete(args, "branch")
    result = _admin(args.store, "branch", name=args.name, source=args.source)
    print(f"branch {result['name']} from {result['from']}")
    return 0


def cmd_branches(args) -> int:
    from .store import branches

    with Store.open(args.store) as store:
        listed = branches.list_branches(store)
    if _json(args, listed):
        return 0
    _table([("NAME", "FILES")] + [(b["name"], f"{b['files']:,}") for b in listed])
    return 0


def cmd_merge(args) -> int:
    report = _admin(args.store, "merge", source=args.source, into=args.into)
    if _json(args, report):
        return 0
    print(f"merged {args.source} into {args.into}: {len(report['applied'])} changes applied")
    for c in report["conflicts"]:
        print(f"conflict: {c['path']} changed on both; {args.source}'s version kept as "
              f"{c['kept_as']}")
    for p in report["kept"]:
        print(f"kept {p}: deleted on {args.source} but changed on {args.into}")
    return 0


def cmd_prune(args) -> int:
    keep = {rule: getattr(args, f"keep_{rule}") for rule in policy.RULES}
    report = _admin(args.store, "prune", keep=keep, versions=args.versions,
                    prefix=args.prefix, dry_run=args.dry_run)
    if _json(args, report):
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name in report["snapshots_removed"]:
        print(f"{verb} snapshot {name}")
    if args.versions:
        print(f"{verb} {report['versions_removed']:,} file versions")
    if not args.dry_run:
        print(f"freed {_size(report['freed_bytes'])}")
    return 0


def cmd_gc(args) -> int:
    report = _admin(args.store, "gc")
    print(f"merged {report['epochs_merged']} epochs, dropped {report['tombstones_dropped']} "
          f"tombstones, freed {report['files_freed']} files")
    if report["inbox_chunks_released"]:
        print(f"released {report['inbox_chunks_released']:,} chunks an interrupted sync left")
    if args.compact:
        before, after = Store.compact(args.store)
        print(f"compacted the database: {_size(before)} -> {_size(after)}")
    return 0


def cmd_sync(args) -> int:
    from .sync import engine
    from .sync.endpoint import Endpoint
    from .sync.remote import open_peer, with_retries

    push, pull = args.push or not args.pull, args.pull or not args.push
    bars: dict[str, object] = {}

    def show(p: engine.Progress) -> None:
        bar = bars.get(p.direction)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[p.direction] = _progress(args, p.bytes_total, p.direction)
        bar.set_description(f"{p.direction} {p.tier}".rstrip())
        bar.set_postfix_str(f"{p.files_done:,}/{p.files_total:,} files")
        bar.update(p.bytes_done - bar.n)

    def attempt() -> engine.Report:
        with open_peer(args.peer, store, args.timeout) as peer:
            return engine.sync(local, peer, push=push, pull=pull, only_tier=args.only_tier,
                               dry_run=args.dry_run, bwlimit=_rate(args.bwlimit), progress=show)

    with _unmounted(args.store, "sync") as store:
        local = Endpoint(store)
        try:
            report = with_retries(attempt, args.retries, _reconnecting)
        finally:
            local.close()
            for bar in bars.values():
                bar.close()
        # Under its free-space floor, a field vault makes room with what the peer now holds.
        evicted = None if args.dry_run else _evict(store, None, dry_run=False, if_short=True)
    if _json(args, dict(report.as_dict(), evicted=evicted)):
        return 0
    for direction, ops in report.plan.items():
        if args.dry_run:
            for op in ops:
                size = f" ({_size(op['size'])}, {op['tier']})" if "size" in op else ""
                to = f" -> {op['to']}" if "to" in op else ""
                print(f"{direction}: {op['op']} {op['path']}{to}{size}")
        elif direction in ("push", "pull") and (push if direction == "push" else pull):
            sent = report.sent[direction]
            print(f"{direction}ed {sent['files']:,} files, {len(ops):,} changes: "
                  f"{sent['chunks']:,} chunks, {_size(sent['raw_bytes'])} "
                  f"({_size(sent['wire_bytes'])} as stored"
                  + (f" or as {sent['differences']:,} differences" if sent['differences']
                     else "") + ")")
    for c in report.conflicts:
        print(f"conflict: {c['path']}: {c['vault']}'s version kept as {c['kept_as']}")
    for vault, name in report.snapshots.items():
        print(f"{vault}: the tree before this sync is snapshot {name}")
    for path in report.offline:
        print(f"not sent: {path} is offline where it was (evicted; fetch it there first)")
    if evicted:
        _print_evicted(evicted)
    return 0


def cmd_evict(args) -> int:
    result = _evict(args.store, args.paths or None, dry_run=args.dry_run,
                    if_short=not args.paths)
    missing = result["missing"] if result is not None else []
    if _json(args, result):
        return 1 if missing else 0
    if result is None:
        print("nothing to evict: the vault is above its free-space floor")
        return 0
    _print_evicted(result)
    for path in missing:
        print(f"vaultfs: {path}: not in the vault", file=sys.stderr)
    return 1 if missing else 0


def cmd_fetch(args) -> int:
    from .store import evict
    from .sync import engine
    from .sync.endpoint import Endpoint
    from .sync.remote import open_peer, with_retries

    roots = [p.strip("/") for p in args.paths]
    with _unmounted(args.store, "fetch") as store:
        with store.reader() as tx:
            wanted = [f for f in evict.offline_files(tx) if not roots or any(
                f["path"] == r or f["path"].startswith(r + "/") for r in roots)]
        need = sum(f["offline_bytes"] for f in wanted)
        room = evict.space(store, policy.load(store.path).keep_free_percent)
        if need > room["free_bytes"] - room["floor_bytes"]:
            raise CliError(f"fetching {_size(need)} would take the vault under its free-space "
                           f"floor ({_size(room['free_bytes'])} free, the floor is "
                           f"{_size(room['floor_bytes'])}); fetch fewer files, or lower "
                           f"[space] keep_free_percent in vault.toml")
        local = Endpoint(store)
        with _progress(args, need, "fetch") as bar:
            def attempt() -> dict:
                with open_peer(args.peer, store, args.timeout) as peer:
                    return engine.fetch(local, peer, [f["path"].encode(errors="surrogateescape")
                                                      for f in wanted], bwlimit=_rate(args.bwlimit),
                                        progress=lambda p: bar.update(p.bytes_done - bar.n))
            try:
                result = with_retries(attempt, args.retries, _reconnecting)
            finally:
                local.close()
    if _json(args, result):
        return 0 if not result["not_on_peer"] else 1
    print(f"fetched {len(result['fetched']):,} files ({_size(result['sent']['raw_bytes'])}) "
          f"from {result['remote']}")
    for path in result["not_on_peer"]:
        print(f"NOT FETCHED {path}: {result['remote']} does not hold this version")
    return 0 if not result["not_on_peer"] else 1


def cmd_serve(args) -> int:
    from .sync import remote

    store = Path(args.store).expanduser()
    Store.open(store).close()  # a clear error now if it is not a store
    if args.stdio:
        remote.serve_stdio(store)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def stop(signum, frame):  # as Ctrl-C: sessions hang up, the announcement is withdrawn
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    remote.serve(store, args.listen, ready=lambda a: print(
        f"serving {store} on {a[0]}:{a[1]}", flush=True), announce=not args.no_announce)
    return 0


def cmd_peers(args) -> int:
    from .sync import discovery

    found = discovery.browse(args.wait)
    if _json(args, found):
        return 0
    if not found:
        print(f"no vault announced itself on the local network in {args.wait:g} s")
    for p in found:
        print(f"{p['name']}  {' '.join(p['urls'])}  (id {p['id']})")
    return 0


def cmd_pair(args) -> int:
    from .sync import remote

    store = Path(args.store).expanduser()
    if args.peer is None:
        code = remote.new_code()
        name = remote.pair_listen(store, args.listen, code, ready=lambda a: print(
            f"pairing code: {code}\nwaiting on {a[0]}:{a[1]} for the other vault "
            f"(vaultfs pair OTHER-STORE tcp://THIS-HOST:{a[1]} {code})", flush=True))
    else:
        if args.code is None:
            raise CliError("give the code the other vault shows: vaultfs pair STORE PEER CODE")
        name = remote.pair_connect(store, args.peer, args.code)
    print(f"paired with {name}")
    return 0


def cmd_restore(args) -> int:
    from .store import restore

    tree, _, path = args.source.partition(":")
    with Store.open(args.store) as store:
        plan = restore.plan(store, tree, path or "/")
        with _progress(args, plan.bytes, "restoring") as bar:
            report = restore.run(store, plan, Path(args.dest), overwrite=args.overwrite,
                                 progress=lambda n: bar.update(n))
    if not _json(args, report):
        print(f"restored {report['files']:,} files ({_size(report['bytes'])}) to {args.dest}")
        for p in report["skipped_newer"]:
            print(f"kept newer {p} (use --overwrite to replace it)")
        for p, why in report["failed"].items():
            print(f"FAILED {p}: {why}")
    return 1 if report["failed"] else 0


# ---- helpers -----------------------------------------------------------------------------------
def _admin(store_path: str, op: str, **args):
    """Run a command that changes the store: here, or by the mount that holds the store."""
    from .fs import control
    from .store import admin

    try:
        store = Store.open(store_path, writable=True)
    except StoreBusy:
        with Store.open(store_path) as store:
            return control.request(store, op, **args)
    with store:
        return admin.OPERATIONS[op](store, **args)


def _unmounted(store_path: str, what: str) -> Store:
    """The store opened for writing by this process, or one sentence: it is mounted."""
    try:
        return Store.open(store_path, writable=True)
    except StoreBusy:
        raise CliError(f"{store_path} is mounted; unmount it (vaultfs umount) to "
                       f"{what}") from None


def _reconnecting(e: Exception, delay: float) -> None:
    print(f"vaultfs: connection lost ({e}); resuming in {delay:.0f} s", file=sys.stderr)


def _evict(store: Store | str, paths: list[str] | None, dry_run: bool,
           if_short: bool) -> dict | None:
    """Evict files a peer holds: those at `paths`, or by policy (the tiers that allow it,
    oldest first) until the vault is back above its free-space floor; with `if_short`, only
    when it is under it (None when it is not). `store` is one this process holds for writing,
    or the path of one to open (or to reach through its mount). The result's `missing` names
    the `paths` that are not in the vault."""
    from .store import evict

    def plan(s: Store) -> tuple:
        rules = policy.load(s.path)
        want = None  # (files named: all of them that may go)
        if if_short:
            want = evict.space(s, rules.keep_free_percent)["short_bytes"] \
                if rules.keep_free_percent else 0
        with s.reader() as tx:
            missing = [p for p in paths or () if tx.resolve(p.strip("/")) is None]
        cat = _catalog(s)
        return want, missing, cat, cat.eviction_order(rules, paths)

    if isinstance(store, Store):
        want, missing, cat, order = plan(store)
    else:
        with Store.open(store) as s:
            want, missing, cat, order = plan(s)
    if if_short and not want:
        return None
    if isinstance(store, Store):
        result = evict.evict(store, order, want, dry_run)
    else:
        result = _admin(store, "evict", candidates=order, want=want, dry_run=dry_run)
    result["missing"] = missing
    if paths is not None:
        listed = {c[2] for c in order}
        result["skipped"] += [{"path": e.path, "why": f"tier {e.tier} is not evicted"}
                              for e in cat.under(paths) if e.path not in listed]
    return result


def _print_evicted(result: dict) -> None:
    verb = "would evict" if result["dry_run"] else "evicted"
    for e in result["evicted"]:
        print(f"{verb} {e['path']} ({_size(e['bytes'])}; held by {', '.join(e['held_by'])})")
    for e in result["skipped"]:
        print(f"kept {e['path']}: {e['why']}")
    print(f"{verb} {len(result['evicted']):,} files, {_size(result['freed_bytes'])} freed")


def _catalog(store: Store):
    """The live tree's catalogue (files, metadata, tiers), by the store's tier rules."""
    from .media import catalog

    with store.reader() as tx:
        return catalog.build(tx, catalog.tier_rules(policy.load(store.path)))


def _group_index(cat):
    """Groups of the catalogue's images (media/groups.py), indexed from scratch."""
    from .media.groups import GroupIndex

    index = GroupIndex()
    index.update(cat.group_files())
    return index


def _not_fingerprinted(cat) -> None:
    """Say on stderr how many images the mount has not analysed yet (they are in no group)."""
    waiting = sum(1 for e in cat.files.values() if e.own.get("kind") == "image"
                  and "fingerprint" not in e.own and "fingerprint_error" not in e.own)
    if waiting:
        print(f"vaultfs: {waiting:,} images are not fingerprinted yet: a mount of the vault "
              f"analyses them", file=sys.stderr)


def _vault_path(store: Store, name: str) -> str:
    """A path inside the vault: as given (`day1/a.NEF`), or a file under a mount of it."""
    from .fs.mount import find_mount

    absolute = Path(name).expanduser().absolute()
    for parent in absolute.parents:
        entry = find_mount(parent)
        if entry is not None and entry.fstype == "fuse.vaultfs" and \
                os.path.realpath(entry.source) == os.path.realpath(store.path):
            return str(absolute.relative_to(parent))
    return name.strip("/")


def _comparison(text: str):
    """'>=4', '4', '<2' -> a test of a number."""
    import operator
    import re

    m = re.fullmatch(r"\s*(>=|<=|==|!=|>|<|=)?\s*(-?\d+)\s*", text)
    if m is None:
        raise CliError(f"{text!r} is not a comparison like '>=4', '3' or '<2'")
    op = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
          "!=": operator.ne}.get(m.group(1) or "==", operator.eq)
    return lambda value: op(value, int(m.group(2)))


def _json(args, data) -> bool:
    """Print `data` as JSON for scripts when --json was given; say whether it was."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
        return True
    return False


def _progress(args, total: int, desc: str):
    """A progress bar in bytes on a terminal's stderr; none for --json or when redirected."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                disable=getattr(args, "json", False) or not sys.stderr.isatty())


def _delete(args, what: str) -> int:
    """Forget the snapshot or branch args.name; say what space came back."""
    result = _admin(args.store, f"delete-{what}", name=args.name)
    print(f"deleted {what} {result['name']}, freed {_size(result['freed_bytes'])}")
    return 0


def _rate(text: str | None) -> int:
    """'200k' -> 204800 bytes per second (k, m, g: powers of 1024, as rsync); None -> 0."""
    import re

    if text is None:
        return 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)[bB]?(?:/s)?\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise CliError(f"{text!r} is not a rate like 200k or 5m (bytes per second)")
    return int(float(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " "))


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _mount_options(opts: list[str]) -> set[str]:
    known = {"allow_other", "vault_visible"}
    out = set()
    for group in opts:
        for o in filter(None, group.split(",")):
            if o not in known:
                raise CliError(f"unknown mount option {o!r} (known: {', '.join(sorted(known))})")
            out.add(o)
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _log_to(store_path: Path, also_stderr: bool, debug: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers = [logging.FileHandler(store_path / "vaultfs.log")]
    if also_stderr and not _stderr_is(store_path / "vaultfs.log"):
        handlers.append(logging.StreamHandler(sys.stderr))  # the journal, under systemd
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def _stderr_is(path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(2), os.stat(path))
    except OSError:
        return False


def _command(sub, name: str, fn, help: str, json: bool = False) -> argparse.ArgumentParser:
    """A subcommand that works on a store: STORE first, then its own arguments."""
    s = sub.add_parser(name, help=help)
    s.add_argument("store")
    if json:
        s.add_argument("--json", action="store_true")
    s.set_defaults(fn=fn)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaultfs", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"vaultfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    _command(sub, "init", cmd_init, "create a vault store")

    s = sub.add_parser("mount", help="mount a store (no arguments: the default vault)")
    s.add_argument("store", nargs="?")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    s.add_argument("--branch", default="main", help="the branch to mount (default: main)")
    s.add_argument("-o", dest="options", action="append", default=[],
                   help="allow_other, vault_visible")
    s.add_argument("--debug", action="store_true", help="log every detail")
    s.add_argument("--mirror", metavar="PATH",
                   help="a second copy of the tiers that ask for one, on another disk "
                        "(created when missing; default: [mirror] path in vault.toml)")
    s.set_defaults(fn=cmd_mount)

    s = sub.add_parser("events", help="what happens to files, as JSON lines, as it happens")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_events)

    s = sub.add_parser("safe", help="whether files are committed, verified (and mirrored) yet")
    s.add_argument("paths", nargs="+", metavar="FILE", help="files under a vaultfs mount")
    s.add_argument("--mountpoint", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_safe)

    s = _command(sub, "import", cmd_import,
                 "copy camera cards into the vault; say whether each is safe to format",
                 json=True)
    s.add_argument("cards", nargs="+", metavar="CARD", help="a card's mount point (or folder)")
    s.add_argument("--into", default="{date}", metavar="PATH",
                   help="where in the vault: {date} is each file's date (default %(default)s)")
    s.add_argument("--list", action="store_true", help="show where every file is in the vault")

    s = sub.add_parser("umount", help="commit and unmount")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_umount)

    _command(sub, "status", cmd_status, "files, sizes, dedup and compression of a store",
             json=True)
    _command(sub, "verify", cmd_verify, "re-read and re-hash every chunk and every file",
             json=True)

    s = _command(sub, "snapshot", cmd_snapshot, "freeze the tree as it is now (or --delete one)",
                 json=True)
    s.add_argument("name", nargs="?", help="default: the local date and time")
    s.add_argument("--delete", action="store_true", help="delete the named snapshot")
    s.add_argument("--branch", help="the branch to freeze (default: main, or the mounted one)")

    s = _command(sub, "branch", cmd_branch,
                 "a writable line of history from a snapshot or branch")
    s.add_argument("name")
    s.add_argument("--from", dest="source", help="a snapshot or branch (default: main now)")
    s.add_argument("--delete", action="store_true", help="delete the named branch")

    _command(sub, "branches", cmd_branches, "list branches", json=True)

    s = _command(sub, "merge", cmd_merge, "apply what changed on FROM since it diverged to INTO",
                 json=True)
    s.add_argument("source", metavar="FROM")
    s.add_argument("into", metavar="INTO")

    _command(sub, "snapshots", cmd_snapshots, "list snapshots with what each holds", json=True)

    s = _command(sub, "log", cmd_log, "the timeline of one file's versions", json=True)
    s.add_argument("path", help="the file's path inside the vault")

    s = _command(sub, "diff", cmd_diff, "files added, removed, modified, renamed between trees",
                 json=True)
    s.add_argument("a", help="a snapshot name, or a branch (main: the live tree)")
    s.add_argument("b")
    s.add_argument("--stat", action="store_true", help="with sizes")

    s = _command(sub, "find", cmd_find, "files by metadata: rating, label, camera, date...",
                 json=True)
    s.add_argument("--tier")
    s.add_argument("--rating", help="'>=4', '5', '<2' (images only)")
    s.add_argument("--label", help="a colour label: red, yellow, green, blue, purple")
    s.add_argument("--camera", help="'NIKON Z 9': make and model, or model")
    s.add_argument("--since", help="captured on or after, YYYY-MM-DD")
    s.add_argument("--until", help="captured on or before, YYYY-MM-DD")
    s.add_argument("--keyword")

    s = _command(sub, "groups", cmd_groups, "bursts, brackets, RAW+JPEG pairs, duplicates, "
                 "near-duplicates and edits", json=True)
    s.add_argument("--kind", choices=("burst", "bracket", "pair", "duplicate", "near", "edit"))

    s = _command(sub, "similar", cmd_similar, "the images that look like FILE, and its groups",
                 json=True)
    s.add_argument("file", metavar="FILE",
                   help="a path in the vault, a file under its mount, or any image file")

    s = _command(sub, "tag", cmd_tag, "put files, folders or globs in a tier by hand")
    s.add_argument("paths", nargs="+", metavar="PATH", help="inside the vault; globs allowed")
    s.add_argument("--tier")
    s.add_argument("--clear", action="store_true", help="back to the rules")

    s = _command(sub, "prune", cmd_prune, "forget snapshots (and versions) by keep rules",
                 json=True)
    for rule in policy.RULES:
        s.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    s.add_argument("--versions", action="store_true",
                   help="apply the rules to each file's timeline too")
    s.add_argument("--prefix", default="", help="only snapshots whose names start so")
    s.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")

    s = _command(sub, "gc", cmd_gc, "merge what snapshots no longer need; --compact the file")
    s.add_argument("--compact", action="store_true",
                   help="give freed space back to the disk (only while not mounted)")

    s = _command(sub, "sync", cmd_sync, "bring two vaults to the same tree, selects first",
                 json=True)
    s.add_argument("peer", metavar="PEER",
                   help="another store's path, tcp://host:port (vaultfs serve) or ssh://host/path")
    s.add_argument("--push", action="store_true", help="only send (default: both ways)")
    s.add_argument("--pull", action="store_true", help="only receive")
    s.add_argument("--only-tier", metavar="TIER", help="only the files of this tier")
    s.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    s.add_argument("--bwlimit", metavar="RATE", help="bytes per second each way: 200k, 5m")
    s.add_argument("--retries", type=int, default=8, metavar="N",
                   help="reconnect and resume this often when the link drops (default 8)")
    s.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a TCP link silent this long counts as lost (default 120)")

    s = _command(sub, "evict", cmd_evict, "make room: drop the bytes of files a peer holds",
                 json=True)
    s.add_argument("paths", nargs="*", metavar="PATH",
                   help="files or folders (default: by policy, until above the free-space floor)")
    s.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")

    s = _command(sub, "fetch", cmd_fetch, "bring back evicted files from a peer", json=True)
    s.add_argument("peer", metavar="PEER",
                   help="another store's path, tcp://host:port (vaultfs serve) or ssh://host/path")
    s.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (default: all)")
    s.add_argument("--bwlimit", metavar="RATE", help="bytes per second: 200k, 5m")
    s.add_argument("--retries", type=int, default=8, metavar="N",
                   help="reconnect and resume this often when the link drops (default 8)")
    s.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a TCP link silent this long counts as lost (default 120)")

    s = _command(sub, "serve", cmd_serve, "answer syncs from paired vaults over TCP")
    s.add_argument("--listen", default=f"0.0.0.0:{7787}", metavar="HOST:PORT")
    s.add_argument("--stdio", action="store_true", help="one session on stdin/stdout (ssh)")
    s.add_argument("--no-announce", action="store_true",
                   help="do not announce the vault on the local network (mDNS)")

    s = sub.add_parser("peers", help="vaults that announce themselves on the local network")
    s.add_argument("--wait", type=float, default=3.0, metavar="SECONDS",
                   help="how long to listen (default 3)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_peers)

    s = _command(sub, "pair", cmd_pair, "show a code here, or type the other vault's code")
    s.add_argument("peer", nargs="?", metavar="PEER", help="tcp://host:port of the other vault")
    s.add_argument("code", nargs="?", metavar="CODE")
    s.add_argument("--listen", default=f"0.0.0.0:{7787}", metavar="HOST:PORT",
                   help="where to wait for the other vault (without PEER)")

    s = _command(sub, "restore", cmd_restore, "write files of a snapshot out to a folder",
                 json=True)
    s.add_argument("source", help="SNAPSHOT or SNAPSHOT:PATH (or a branch)")
    s.add_argument("dest")
    s.add_argument("--overwrite", action="store_true", help="replace newer files too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (StoreError, CliError) as e:
        print(f"vaultfs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"vaultfs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
