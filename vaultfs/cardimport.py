"""Importing camera cards into a mounted vault, and the safe-to-format report.

Each file on the card goes to `INTO/<its path on the card>`, where the `DCIM/` level is left
out (`DCIM/100CANON/IMG_0001.CR2` -> `2026-11-24/100CANON/IMG_0001.CR2`) and `{date}` in INTO
is the local date of the file's modification time (a camera sets it to the capture time). A
file the vault already holds, at that path or any other, is not copied again: the candidates
are the vault's files of its size at its destination or of its name and time, and the others
of its size whose first chunk is its own (as the mount cuts it); the card's bytes are matched
against the store's chunk digests (store/compare.py). The others are
committed by the mount itself, read straight from the card (the `import-file` op: the same
ingest, read-back and analysis as a tethered capture). At the end every file's vault path is
asked for `safe` (read back from the store and matched), and the report says, per card, whether
every file on it is safe: the card may be formatted. A vault's own files are refused as a card
(a folder on a vaultfs mount, a store or a folder in one, a folder holding either): each of
them would be found held, by itself, and formatting them would delete the only copy.

Mirrors (a second copy, per tier) are not built yet: one verified copy is what a vault holds,
and what `safe` counts.
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chunking import MAX_SIZE, boundaries, is_zero, read_at, split
from .fs.mount import mounts
from .store import Store, StoreError, is_store
from .store.codec import xxh3
from .store.compare import Held, Holdings, matches

# Left out of an import: what operating systems leave on a card, not what a camera wrote.
IGNORED = {"System Volume Information", "$RECYCLE.BIN", ".Trashes", ".Spotlight-V100",
           ".fseventsd", ".DS_Store", "Thumbs.db"}
DEFAULT_INTO = "{date}"
IN_FLIGHT = 2  # files being imported at once: one is read while the other's last commit syncs

Request = Callable[..., Any]  # request(op, **args) -> the mount's answer


@dataclass
class CardFile:
    card: str          # the card's root, as given
    path: str          # the file's path on the card ('/'-separated)
    size: int = 0
    mtime_ns: int = 0
    dest: str = ""     # where it goes in the vault
    state: str = "pending"  # imported, held (already in the vault), unreadable, failed
    vault_path: str = ""    # the vault path holding its bytes
    version: int = 0        # ... and the version there that matched
    verified: bool = False  # read back from the store and matched, at the end
    why: str = ""           # why it is not safe

    @property
    def safe(self) -> bool:
        return self.state in ("imported", "held") and self.verified

    def as_dict(self) -> dict:
        return {"card": self.card, "path": self.path, "size": self.size, "state": self.state,
                "vault_path": self.vault_path or None, "safe": self.safe,
                **({"why": self.why} if self.why else {})}


@dataclass
class Report:
    cards: list[str]
    files: list[CardFile] = field(default_factory=list)

    def card_files(self, card: str) -> list[CardFile]:
        return [f for f in self.files if f.card == card]

    def safe(self, card: str | None = None) -> bool:
        """Whether every file (of `card`) is in the vault, verified: the card may be
        formatted."""
        return all(f.safe for f in (self.files if card is None else self.card_files(card)))

    def as_dict(self) -> dict:
        cards = []
        for card in self.cards:
            files = self.card_files(card)
            cards.append({"card": card, "safe_to_format": self.safe(card), "files": len(files),
                          "bytes": sum(f.size for f in files),
                          "imported": sum(f.state == "imported" for f in files),
                          "held": sum(f.state == "held" for f in files),
                          "not_safe": sum(not f.safe for f in files)})
        return {"safe_to_format": self.safe(), "cards": cards,
                "files": [f.as_dict() for f in self.files]}


def scan(card: str, into: str = DEFAULT_INTO) -> list[CardFile]:
    """The files on a card, in the order a camera wrote them (sorted paths), with where each
    goes; a folder that cannot be listed is one unreadable entry."""
    root = Path(card)
    if not root.is_dir():
        raise StoreError(f"{card} is not a folder (give the card's mount point)")
    vaults = _vault_mounts()
    _not_a_vault(card, vaults)
    out: list[CardFile] = []

    def unreadable(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        out.append(CardFile(card, rel + "/", state="unreadable",
                            why=f"the folder cannot be listed: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        if is_store(Path(dirpath)):
            raise _vault_files(f"{card} holds the vault store {dirpath}")
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED)
        for name in sorted(filenames):
            if name in IGNORED or name.startswith("._"):  # (macOS AppleDouble files)
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            f = CardFile(card, rel)
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError as e:
                f.state, f.why = "unreadable", f"cannot be read from the card: {e.strerror}"
                out.append(f)
                continue
            if not os.path.isfile(full) or os.path.islink(full):
                continue  # (a card holds files and folders; anything else is not a capture)
            if st.st_dev in vaults:
                raise _vault_files(f"{card} reaches into the vault mounted on "
                                   f"{vaults[st.st_dev]} ({rel})")
            f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
            f.dest = destination(rel, f.mtime_ns, into)
            out.append(f)
    return out


def _vault_mounts() -> dict[int, str]:
    """The device number of each vaultfs mount, and where it is mounted."""
    out = {}
    for m in mounts():
        if m.fstype == "fuse.vaultfs":
            major, minor = m.device.split(":")
            out[os.makedev(int(major), int(minor))] = m.mountpoint
    return out


def _not_a_vault(card: str, vaults: dict[int, str]) -> None:
    """Refuse a card that is a vault's own files: on a vaultfs mount (its files would each be
    found held, by themselves), or a store or a folder inside one."""
    real = Path(os.path.realpath(card))
    on = vaults.get(os.stat(real).st_dev)
    if on is not None:
        raise _vault_files(f"{card} is in the vault mounted on {on}")
    for folder in (real, *real.parents):
        if is_store(folder):
            raise _vault_files(f"{card} is {'' if folder == real else 'in '}the vault store "
                               f"{folder}")


def _vault_files(where: str) -> StoreError:
    return StoreError(f"{where}: a vault's own files are no card to import, and formatting "
                      f"them would delete them")


def destination(rel: str, mtime_ns: int, into: str) -> str:
    """Where a card file goes: INTO ({date}: the file's local date) / its path without DCIM."""
    parts = rel.split("/")
    if len(parts) > 1 and parts[0].upper() == "DCIM":
        parts = parts[1:]
    date = time.strftime("%Y-%m-%d", time.localtime(mtime_ns / 1e9))
    base = [p for p in into.replace("{date}", date).split("/") if p]
    if any(p in (".", "..") for p in base) or base[:1] == [".vault"]:
        raise StoreError(f"--into {into}: give a folder inside the vault, without . or ..")
    return "/".join(base + parts)


def plan(cards: list[str], into: str = DEFAULT_INTO) -> Report:
    """The files of the cards and where each goes, nothing done yet."""
    report = Report(cards)
    for card in cards:
        report.files += scan(card, into)
    return report


def run(store: Store, request: Request, report: Report,
        progress: Callable[[int], None] | None = None) -> None:
    """Import the planned files into the mount of `store` (opened read-only; `request` reaches
    the mount) and check every one: the report then says what is safe."""
    todo = [f for f in report.files if f.state == "pending"]
    with store.reader() as tx:
        holdings = Holdings.of(tx, {f.size for f in todo})
    lock = threading.Lock()

    def one(f: CardFile) -> None:
        try:
            match = _held(store, f, holdings, lock)
            if match is not None:
                f.state, f.vault_path, f.version = "held", match.path, match.version
            else:
                _import(request, f)
                if f.state == "imported":  # (the same bytes on another card are held)
                    with lock, store.reader() as tx:
                        holdings.add(tx, f.vault_path, f.version, f.size, f.mtime_ns)
        except OSError as e:
            f.state, f.why = "unreadable", f"cannot be read from the card: {e.strerror or e}"
        except StoreError as e:
            f.state, f.why = "failed", str(e)
        if progress is not None:
            progress(f.size)

    pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="vaultfs-import")
    try:
        list(pool.map(one, todo))
        list(pool.map(lambda f: _check(request, f),
                      [f for f in report.files if f.state in ("imported", "held")]))
    finally:  # (Ctrl-C: the files under way finish, the others are not begun)
        pool.shutdown(cancel_futures=True)


def _held(store: Store, f: CardFile, holdings: Holdings,
          lock: threading.Lock) -> Held | None:
    """The vault file that holds this card file's bytes, if any. The cheap guesses (its own
    destination, a file of the same name and time) are compared whole; any other file of its
    size only if its first chunk is the card file's, as the mount would cut it. The card file
    is read front to back, once, and only when the vault has files of its size."""
    with lock:
        sized = holdings.sized(f.size)
    if not sized:
        return None
    name = posixpath.basename(f.path)
    likely = sorted((h for h in sized if h.path == f.dest or (
        posixpath.basename(h.path) == name and h.mtime_ns == f.mtime_ns)),
        key=lambda h: h.path != f.dest)
    fd = os.open(os.path.join(f.card, f.path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def read(off: int, n: int) -> bytes:
            return read_at(fd, n, off)

        with store.reader() as tx:
            for h in likely:
                if matches(tx, h.version, f.size, read):
                    return h
            with lock:
                others = [h for h in holdings.headed(f.size, _first_chunk(read, f.size))
                          if h not in likely]
            return next((h for h in others if matches(tx, h.version, f.size, read)), None)
    finally:
        os.close(fd)


def _first_chunk(read: Callable[[int, int], bytes], size: int) -> bytes:
    """The XXH3-128 of the first chunk the mount cuts of a file (b"" for a hole): between the
    format's cut points, content-defined, decided within the first MAX_SIZE bytes."""
    end = min([b for b in boundaries(read, size) if b > 0] + [size])
    data = read(0, min(end, MAX_SIZE))
    length = next(split(data), (0, 0))[1]
    return xxh3(data[:length]) if length and not is_zero(data[:length]) else b""


def _ask(request: Request, op: str, **args: Any) -> Any:
    """A request to the mount; a lost connection is the mount's failure, not the card's."""
    try:
        return request(op, **args)
    except OSError as e:
        raise StoreError(f"the mount did not answer: {e.strerror or e}") from None


def _import(request: Request, f: CardFile) -> None:
    answer = _ask(request, "import-file",
                  source=os.path.abspath(os.path.join(f.card, f.path)), dest=f.dest)
    if "error" in answer:
        f.state = "unreadable" if answer.get("errno") in _READ_ERRORS else "failed"
        f.why = (f"cannot be read from the card: {answer['error']}" if f.state == "unreadable"
                 else f"not imported: {answer['error']}")
        return
    f.state, f.vault_path, f.version = "imported", answer["path"], answer["version"]


_READ_ERRORS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.ENOENT}  # (ENODEV: card pulled)


def _check(request: Request, f: CardFile) -> None:
    """Is the vault path still holding the matched version, read back and verified?"""
    try:
        answer = _ask(request, "safe", path=f.vault_path)
    except StoreError as e:
        f.why = f"not verified: {e}"
        return
    if answer["version"] != f.version:
        f.why = f"{f.vault_path} changed in the vault since it was matched"
    elif not answer["verified"]:
        f.why = f"{f.vault_path} did not read back as written (see the vault's log)"
    else:
        f.verified = True


def wait_analysed(request: Request, timeout: float = 3600.0) -> bool:
    """Wait until the mount has read the metadata of everything committed and applied the
    on-capture policies (before a mount made for the import is taken down); False if it has
    not within `timeout`."""
    deadline = time.monotonic() + timeout
    while request("analysing"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
