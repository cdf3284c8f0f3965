"""A small client for programs that work with a mounted vault (tethering software, scripts):
its events as they happen, whether a file is safe yet, and tagging, over the mount's control
socket.

    from vaultfs.client import Vault

    vault = Vault("/home/me/Capture")
    print(vault.safe("day1/DSC_0001.NEF"))   # {'committed': True, 'verified': True, 'safe': ...,
                                              #  'copies': 2, 'copies_wanted': 2, 'mirrored': True}
    vault.tag(["day1/DSC_0001.NEF"], tier="select")
    for event in vault.events():              # blocks; one dict per event
        if event["event"] == "verified":
            print("safe:", event["path"])
        elif event["event"] == "tiered":       # {'tier': 'select', 'from': 'general', ...}
            print(event["path"], "is now", event["tier"])

Events (fs/events.py): committed, verified, mirrored, analysed, fingerprinted, tiered (`tier`,
and `from` when it changed), burst, renamed, error; each with `event`, `path` (relative to the
mount) and `time` (Unix seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .fs import control
from .fs.mount import find_mount
from .store import Store, StoreError


class Vault:
    def __init__(self, mountpoint: str | Path):
        self.mountpoint = Path(mountpoint).expanduser().absolute()
        entry = find_mount(self.mountpoint)
        if entry is None or entry.fstype != "fuse.vaultfs":
            raise StoreError(f"{self.mountpoint} is not a vaultfs mount")
        self.store_path = Path(entry.source)

    def _store(self) -> Store:
        return Store.open(self.store_path)

    def events(self) -> Iterator[dict]:
        """Every event of the mount from now on: {'event', 'path', 'time', ...}. A path that
        is not UTF-8 has its other bytes as \\xNN in 'path' (for people), and comes exactly in
        'path_b64' (likewise 'from_b64' for 'from'): base64.b64decode(event['path_b64']) is
        the name's bytes, relative to the mount."""
        with self._store() as store:
            yield from control.listen(store, "events")

    def safe(self, path: str) -> dict:
        """Whether the file at `path` (relative to the mount) is safe: committed, verified,
        and mirrored where its tier wants two copies ({'safe', 'committed', 'verified',
        'copies', 'version'}, and with a mirror 'copies_wanted' and 'mirrored')."""
        with self._store() as store:
            return control.request(store, "safe", path=path)

    def tag(self, paths: list[str], tier: str | None) -> dict:
        """Put files, folders or globs in a tier (None: back to the rules)."""
        with self._store() as store:
            return control.request(store, "tag", paths=paths, tier=tier)
