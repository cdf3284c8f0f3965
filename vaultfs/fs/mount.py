"""Running a mount: pyfuse3's session life cycle, signals, and a clean stop.

This module holds pyfuse3's session life cycle; operations.py (and the small views.py and
acl.py beside it) use its request types. Nothing outside vaultfs/fs/ imports pyfuse3, so that
another binding would change this folder only.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from ..store import Store, admin, evict, history, policy, recompress, scrub
from . import control
from ..media.catalog import tier_rules
from .analysis import Analyzer
from .capture import CapturePolicies
from .decoder import Decoder
from .mirror import Mirror, note as note_mirror
from .operations import VaultOperations
from .previews import Previews

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # measured: ~1.5x faster cold reads than the 128 KiB default
VERSION_THINNING_S = 3600.0  # how often the timelines are thinned by the versions policy
SELECT_CHECK_S = 10.0  # how often the catalogue is rebuilt to look for new selects
SELECT_SNAPSHOT_GAP_S = 60.0  # new selects in a culling session: one snapshot a minute at most
SCRUB_CHECK_S = 60.0  # how often the tiers' scrub schedules are looked at
RECOMPRESS_CHECK_S = 10.0  # how often files newly in a stronger-compressed tier are looked for
SPACE_CHECK_S = 5.0  # how often free space is held against the floor (a statvfs and a stat)
SPACE_STUCK_S = 60.0  # when nothing more could be evicted (only a sync or a new tier changes it)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (malloc.h)


class MountError(Exception):
    """A mount that cannot start: the message says why, for a person."""


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mount point that is missing, busy or not empty; unmount a stale one (left by a
    daemon that died, answering ENOTCONN) so that it can be mounted again."""
    try:
        os.statvfs(mountpoint)  # unlike stat(), never answered from the kernel's cache
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
        log.warning("%s is a stale mount of a daemon that died; unmounting it", mountpoint)
        unmount(mountpoint, lazy=True)
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")
    if any(mountpoint.iterdir()):
        raise MountError(f"mount point {mountpoint} is not empty")


def tune_malloc() -> None:
    """Let the daemon's threads share two malloc arenas instead of glibc's default of eight per
    core: each arena keeps what its threads freed, and the daemon's threads pass large buffers
    around (measured, a 2 GB card import: peak anonymous memory 540-610 -> 323 MiB, same CPU
    time). And keep the buffers it frees: by default glibc hands a freed buffer of more than
    128 KiB (a threshold that follows the sizes freed, up to 32 MiB) back to the kernel at
    once, and the next one is faulted in again page by page, zeroed; the daemon handles a
    file's bytes tens of MB at a time. Up to 32 MiB (glibc's limit) now comes from the heap,
    and up to 512 MiB freed at its top stays (the DNG card import: 11.3-11.6 -> 10.5-10.6 CPU s
    per GB, the same anonymous memory). Call before threads start; a libc without mallopt is
    left as it is."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 2)
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 512 << 20)


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(r.stderr.strip() or f"fusermount3 failed on {mountpoint}")


def run(store: Store, mountpoint: Path, *, allow_other: bool = False,
        vault_visible: bool = False, mirror: str | Path | None = None) -> None:
    """Serve the mount until it is unmounted or the process gets SIGTERM/SIGINT; with a
    mirror (`mirror`, else vault.toml's), hold it open for as long."""
    # A bad vault.toml, or a mirror that cannot be, stops the mount before it starts.
    rules = policy.load(store.path, mirror=mirror)
    ops = VaultOperations(store, vault_visible=vault_visible, rules=tier_rules(rules))
    ops.mirror = Mirror.open(store, rules, mountpoint) if rules.mirror is not None else None
    if ops.mirror is None:
        note_mirror(store, None)
    try:
        _serve(store, ops, rules, mountpoint, allow_other)
    finally:
        if ops.mirror is not None:
            ops.mirror.close()


def _serve(store: Store, ops: VaultOperations, rules: policy.Policy, mountpoint: Path,
           allow_other: bool) -> None:
    decode = Decoder()  # images are read in a child process (decoder.py)
    ops.analyzer = Analyzer(store, ops.cache, decode)
    ops.analyzer.on_analysed = ops.analysed
    ops.analyzer.name_of = lambda ino: ops.event_path(ino).rsplit("/", 1)[-1]
    if rules.capture:
        ops.capture = CapturePolicies(store, rules.capture, ops.rules)
    ops.previews = Previews(store, ops.cache, ops.capture, decode)
    ops.previews.on_made = ops.want_catalog
    store.mounted = True
    logging.getLogger("pyfuse3").addFilter(_dropped_replies)
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname={store.path}", "subtype=vaultfs", "noatime"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, str(mountpoint), options)
    log.info("mounted %s on %s", store.path, mountpoint)
    stopped_by_signal = False
    try:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    # Stays installed until the end, so that a second signal cannot kill the
                    # daemon in the middle of its last commits.
                    nonlocal stopped_by_signal
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            if not stopped_by_signal:
                                stopped_by_signal = True
                                pyfuse3.terminate()
                            log.info("signal %d: stopping after the last commits", signum)
                nursery.start_soon(on_signal)
                ops.nursery = nursery
                nursery.start_soon(_raise_read_ahead, mountpoint)
                await nursery.start(control.serve, store, admin.OPERATIONS,
                                    {"safe": ops.safety, "import-file": ops.import_file,
                                     "analysing": lambda: ops.analyzer.busy or (
                                         ops.capture is not None and ops.capture.waiting)},
                                    {"events": ops.events.listen})
                nursery.start_soon(_policies, store, ops, rules)
                nursery.start_soon(ops.analyzer.run)
                nursery.start_soon(ops.previews.run)
                nursery.start_soon(ops.keep_catalog)
                if ops.capture is not None:
                    nursery.start_soon(ops.keep_captures)
                nursery.start_soon(_scrubs, store, ops, rules)
                nursery.start_soon(_recompress, store, ops, rules)
                if ops.mirror is not None:
                    nursery.start_soon(ops.mirror.run, ops)
                if rules.keep_free_percent:
                    nursery.start_soon(_space, store, ops, rules)
                if rules.snapshot_on_select:
                    nursery.start_soon(_on_select, store, ops, rules)
                await pyfuse3.main()
                await ops.shutdown()
                ops.stopping.set()  # long background work (a scrub) ends early
                if rules.snapshot_at_unmount and ops.changed:
                    try:
                        await _auto_snapshot(store, ops, rules)
                    except Exception:  # everything is committed: only the snapshot is lost
                        log.exception("the snapshot at unmount failed")
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        # After fusermount -u the session is already gone; after a signal we unmount here.
        pyfuse3.close(unmount=stopped_by_signal)
        decode.close()
        log.info("unmounted %s", mountpoint)


async def _policies(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    """Automatic snapshots while files change, and the timelines thinned, by the store's
    policy (vault.toml). A failure is logged and tried again at the next turn."""
    every = rules.snapshot_every_s
    last_snapshot = last_thinning = time.monotonic()
    while True:
        await trio.sleep(min(60.0, every / 2) if every else 60.0)
        now = time.monotonic()
        try:
            if every and ops.changed and now - last_snapshot >= every:
                await _auto_snapshot(store, ops, rules)
                last_snapshot = now
            if now - last_thinning >= VERSION_THINNING_S:
                await trio.to_thread.run_sync(
                    lambda: history.prune_versions(store, keep=rules.version_keep))
                last_thinning = now
        except Exception:
            log.exception("automatic snapshot or pruning failed; trying again later")


async def _on_select(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    """A snapshot when files newly count as selects (a rating, label or tag changed), once the
    index has caught up with them (policy snapshots.on_select): after the analyser's queue is
    empty, and at most one a minute however fast a culling session goes."""
    await ops.analyzer.caught_up()  # the backlog of an earlier mount is not "new"
    seen: set[int] | None = None
    last = 0.0
    while True:
        try:
            if seen is not None and (ops.analyzer.busy
                                     or time.monotonic() - last < SELECT_SNAPSHOT_GAP_S):
                continue
            selects = set((await ops.fresh_catalog()).members.get(("tier", "select"), ()))
            if seen is not None and selects - seen:
                await _auto_snapshot(store, ops, rules)
                last = time.monotonic()
            seen = selects
        except Exception:
            log.exception("snapshot on a new select failed; trying again later")
        finally:
            await trio.sleep(SELECT_CHECK_S)


async def _scrubs(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    """Each tier's chunks re-read and re-hashed as often as its policy says (verify_days),
    paced to a quarter of a core; damage is logged and kept for `vaultfs status`."""
    shortest = min((tp.verify_days * 86400 for tp in rules.tier_policies.values()
                    if tp.verify_days), default=0)
    if not shortest:
        return
    while True:
        await trio.sleep(min(SCRUB_CHECK_S, shortest / 2))
        try:
            done = await trio.to_thread.run_sync(scrub.results, store)
            now = time.time_ns()
            for tier, tp in rules.tier_policies.items():
                last = done.get(tier, {}).get("finished_ns", 0)
                if tp.verify_days and now - last >= tp.verify_days * 86400e9:
                    await trio.to_thread.run_sync(_scrub_tier, store, ops, tier)
        except Exception:
            log.exception("scrubbing failed; trying again later")


def _scrub_tier(store: Store, ops: VaultOperations, tier: str) -> None:
    cat = ops.refresh_catalog()
    owners: dict[bytes, list[str]] = {}
    with store.reader() as tx:
        for ino in cat.members.get(("tier", tier), ()):
            entry = cat.files[ino]
            for _, chunk_id, _ in tx.extents(entry.node.content):
                owners.setdefault(chunk_id, []).append(entry.path)
    chunks, nbytes, bad = scrub.check(store, owners, stop=ops.stopping)
    # Damage in one copy is mended from the other; the mirror's copies are scrubbed too.
    repaired, mirrored = ops.mirror.scrub(tier, owners, bad, ops.stopping) if ops.mirror \
        else (set(), None)
    if ops.stopping.is_set():
        return  # unmounting: the scrub is done again at the next mount
    damaged = sorted({p for c in bad.keys() - repaired for p in owners[c]})
    for chunk_id in bad.keys() - repaired:
        log.error("scrub of tier %s: chunk %s of %s: %s", tier, chunk_id.hex(),
                  ", ".join(owners[chunk_id]), bad[chunk_id])
    scrub.record(store, tier, chunks, nbytes, damaged,
                 sorted({p for c in repaired for p in owners[c]}), mirrored)
    log.info("scrubbed tier %s: %d chunks, %d damaged files", tier, chunks, len(damaged))


async def _recompress(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    """The chunks of files in a tier of a stronger zstd level (`compression`) encoded again at
    that level (store/recompress.py), once their metadata is read and the analyser has caught
    up (their tier is known then), at the scrub's pace; again for a file that moves to such a
    tier later. What was done is kept in the media index: a remount does not do it again."""
    levels = {t: tp.compression for t, tp in rules.tier_policies.items() if tp.compression}
    if not levels:
        return
    while True:
        await trio.sleep(RECOMPRESS_CHECK_S)
        if ops.analyzer.busy:
            continue
        try:
            due = (await ops.fresh_catalog()).recompression_due(levels)
            if due:
                done = await trio.to_thread.run_sync(
                    lambda: recompress.recompress(store, due, stop=ops.stopping))
                log.info("recompressed %d of %d files: %d chunks (%d replaced), %d bytes saved",
                         done.versions, len(due), done.chunks, done.replaced, done.saved_bytes)
        except Exception:
            log.exception("recompressing failed; trying again later")


async def _space(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    """Under the free-space floor (space.keep_free_percent), evict files of the tiers that
    allow it whose bytes a peer holds, oldest first, until back above it."""
    stuck = False  # (said once, not every turn; and looked at again less often)
    while True:
        await trio.sleep(SPACE_STUCK_S if stuck else SPACE_CHECK_S)
        try:
            short = await trio.to_thread.run_sync(_make_room, store, ops, rules)
            if short and not stuck:
                log.warning("the store's disk is %d bytes under its free-space floor and "
                            "nothing more can be evicted (sync with a peer so that it holds "
                            "more)", short)
            stuck = bool(short)
        except Exception:
            log.exception("making room failed; trying again later")


def _make_room(store: Store, ops: VaultOperations, rules: policy.Policy) -> int:
    """Evict what is needed to be back above the floor; the bytes still missing."""
    short = evict.space(store, rules.keep_free_percent)["short_bytes"]
    if not short:
        return 0
    done = evict.evict(store, ops.refresh_catalog().eviction_order(rules), want=short)
    for e in done["evicted"]:
        log.info("evicted %s (%d bytes; held by %s)", e["path"], e["bytes"],
                 ", ".join(e["held_by"]))
    return max(0, short - done["freed_bytes"])


async def _auto_snapshot(store: Store, ops: VaultOperations, rules: policy.Policy) -> None:
    ops.changed = False

    def snap() -> None:
        made = history.create_snapshot(store, prefix=policy.AUTO_PREFIX)
        gone = history.prune(store, keep=rules.snapshot_keep, prefix=policy.AUTO_PREFIX)
        log.info("automatic snapshot %s; pruned %d", made["name"],
                 len(gone["snapshots_removed"]))

    await trio.to_thread.run_sync(snap)


def _dropped_replies(record: logging.LogRecord) -> bool:
    """A reply refused with ENOENT answers a request the kernel has dropped: an interrupted call,
    or a RELEASE still pending when the file system is unmounted (every unmount right after a
    close). libfuse treats that as normal; pyfuse3 logs it as an error. Keep it at debug level."""
    if "fuse_reply_* failed with No such file or directory" in record.getMessage():
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
    return True


async def _raise_read_ahead(mountpoint: Path) -> None:
    # The kernel sets read-ahead from our reply to its INIT request, so wait until that is
    # answered (`vaultfs mount` does it at once from outside, as soon as the mount is up).
    await trio.sleep(1)
    raise_read_ahead(mountpoint)


def raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read ahead further than its 128 KiB default on this mount. The device
    number comes from mountinfo: a stat() of our own mount point from the thread that answers
    requests would wait on itself for ever."""
    entry = find_mount(mountpoint)
    if entry is None:
        return
    bdi = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    try:
        bdi.write_text(str(READ_AHEAD_KB))
    except OSError as e:  # needs root; a plain user keeps the kernel's default
        log.debug("could not raise read-ahead of %s: %s", mountpoint, e)


@dataclass(frozen=True)
class MountEntry:
    device: str      # major:minor
    mountpoint: str
    fstype: str
    source: str


def mounts() -> list[MountEntry]:
    """Every mount of this process's namespace, from /proc/self/mountinfo (whose fields escape
    spaces, tabs, newlines and backslashes as octal), in its order: the last of those on one
    mount point is the one on top."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-")
        out.append(MountEntry(fields[2], _unescape(fields[4]), fields[sep + 1],
                              _unescape(fields[sep + 2])))
    return out


def find_mount(mountpoint: Path) -> MountEntry | None:
    """The mount on `mountpoint`."""
    target = os.path.abspath(mountpoint)
    return next((m for m in reversed(mounts()) if m.mountpoint == target), None)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def unmount_vault(mountpoint: Path, wait: float = 600.0) -> None:
    """Unmount a vault and wait until its daemon has committed what was left and exited."""
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != "fuse.vaultfs":
        raise MountError(f"{mountpoint} is not a vaultfs mount")
    try:
        pid: int | None = int((Path(entry.source) / "mount.lock").read_text().strip())
    except (OSError, ValueError):
        pid = None
    unmount(mountpoint)
    deadline = time.monotonic() + wait
    while pid and _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"{mountpoint} is unmounted but its daemon (pid {pid}) is still "
                             f"committing after {wait:.0f} s; wait before unplugging the disk")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has finished its work
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
