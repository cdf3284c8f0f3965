"""The real programs a photographer's machine runs on the mount: cp, rsync, tar, git, sqlite3,
and the write-temp-fsync-rename pattern of tethering software.

Each test drives a real mount with the real program, then compares the result with the source
exactly (bytes, modes, nanosecond mtimes, links, xattrs), most of them again after a remount.
Debian packages these tests need: coreutils, rsync, tar, git, sqlite3 (and fuse3).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CORPUS, needs_fuse

pytestmark = needs_fuse


def run(*cmd, cwd=None, input=None, env=None) -> str:
    """Run a program; it must succeed. Returns its stdout."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, input=input, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n" \
                              f"{r.stdout}\n{r.stderr}"
    return r.stdout


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, *, xattrs: bool = False, owner: bool = True,
             dir_mtimes: bool = True) -> dict:
    """Everything about a tree that a faithful copy keeps: per relative path its type, mode,
    size, content digest or link target, mtime in ns, hard-link group and user xattrs."""
    out: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root_b)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                content = _digest(Path(os.fsdecode(p)))
                first = inodes.setdefault(st.st_ino, rel)  # hard links: same first name
                link = (first, st.st_nlink)
            elif stat.S_ISLNK(kind):
                content, link = os.readlink(p), None
            else:
                content, link = None, None
            mtime = None if (stat.S_ISDIR(kind) and not dir_mtimes) else st.st_mtime_ns
            entry = [kind, stat.S_IMODE(st.st_mode), st.st_size if not stat.S_ISDIR(kind) else 0,
                     content, mtime, link]
            if owner:
                entry += [st.st_uid, st.st_gid]
            if xattrs and not stat.S_ISLNK(kind):
                entry.append(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                    for n in os.listxattr(p, follow_symlinks=False)
                                    if n.startswith(("user.", "system.posix_acl"))))
            out[rel] = tuple(entry)
    return out


def assert_same_tree(a: Path, b: Path, **kw) -> None:
    sa, sb = snapshot(a, **kw), snapshot(b, **kw)
    assert sa.keys() == sb.keys(), (sorted(set(sa) ^ set(sb))[:20])
    diffs = [(k, sa[k], sb[k]) for k in sa if sa[k] != sb[k]]
    assert not diffs, "\n".join(f"{k!r}:\n  {x}\n  {y}" for k, x, y in diffs[:10])
    assert len(sa) > 0


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_access value (version 2): (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def make_tree(root: Path) -> str:
    """A tree with what rsync -aHAX must keep: hard links (also across directories), symlinks
    (relative, absolute, dangling, to a directory), user xattrs, an ACL, odd modes and names,
    sparse and empty files, and camera files from the corpus."""
    rng = random.Random(42)
    (root / "raw" / "day1").mkdir(parents=True)
    (root / "raw" / "day2").mkdir()
    (root / "empty_dir").mkdir()
    cam = sorted(p for p in (CORPUS / "raw_metadata_only").iterdir() if p.is_file())[:6]
    for p in cam:
        shutil.copy2(p, root / "raw" / "day1" / p.name)
    (root / "notes.txt").write_text("shot list\n" * 100)
    (root / "random.bin").write_bytes(rng.randbytes(3 * 1024 * 1024 + 17))
    (root / "empty").write_bytes(b"")
    with open(root / "sparse.img", "wb") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"end")
    (root / "caf\xe9-latin1".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(
        b"non-UTF-8 name")
    (root / ("L" * 255)).write_bytes(b"a 255-byte name")
    # hard links: a pair in one folder, a triple across folders
    os.link(root / "notes.txt", root / "notes-link.txt")
    first = root / "raw" / "day1" / cam[0].name
    os.link(first, root / "raw" / "day2" / cam[0].name)
    os.link(first, root / "raw" / "select.raw")
    # symlinks
    os.symlink("day1/" + cam[1].name, root / "raw" / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("raw/day1", root / "dir-link")
    # modes
    os.chmod(root / "notes.txt", 0o600)
    os.chmod(root / "random.bin", 0o755)
    os.chmod(root / "empty_dir", 0o700)
    os.chmod(root / "sparse.img", 0o640 | stat.S_ISGID)
    # xattrs, as photo tools and vaultfs tagging use them, and an ACL
    os.setxattr(root / "random.bin", "user.vaultfs.tier", b"select")
    os.setxattr(root / "random.bin", "user.comment", b"\x00binary\xffvalue")
    os.setxattr(root / "raw" / "day1", "user.xdg.origin", b"card A")
    os.setxattr(root / "notes.txt", "user.big", rng.randbytes(3000))
    os.setxattr(root / "empty", "system.posix_acl_access", _acl([
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1000), (ACL_GROUP_OBJ, 4, NO_ID),
        (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)]))
    # nanosecond mtimes, set last (bottom-up) so that directory times stick
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i * 1_001),
                 follow_symlinks=False)
    return cam[0].name


def remount(m, make_mount):
    m.stop()
    return make_mount()


# ---- cp -a -----------------------------------------------------------------------------------
def test_cp_a_corpus_in_and_out(make_mount, tmp_path):
    m = make_mount()
    run("cp", "-a", CORPUS, m.path / "corpus")
    assert_same_tree(CORPUS, m.path / "corpus")
    m = remount(m, make_mount)
    assert_same_tree(CORPUS, m.path / "corpus")
    run("cp", "-a", m.path / "corpus", tmp_path / "out")
    assert_same_tree(CORPUS, tmp_path / "out")
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) > 100


# ---- rsync -aHAX ------------------------------------------------------------------------------
def _itemize(src: Path, dst: Path) -> list[str]:
    """What `rsync -aHAX --checksum` would still change: nothing, for a faithful copy."""
    out = run("rsync", "-aHAXnc", "--itemize-changes", f"{src}/", f"{dst}/")
    return [line for line in out.splitlines() if line.strip()]


def test_rsync_aHAX_in_and_out(make_mount, tmp_path):
    src = tmp_path / "src"
    linked = make_tree(src)
    m = make_mount()
    dst = m.path / "tree"
    run("rsync", "-aHAX", f"{src}/", f"{dst}/")
    assert _itemize(src, dst) == []
    assert_same_tree(src, dst, xattrs=True)
    # the hard links are links in the vault, not copies
    a, b, c = (os.stat(dst / "raw" / p) for p in (f"day1/{linked}", f"day2/{linked}",
                                                   "select.raw"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3

    m = remount(m, make_mount)
    dst = m.path / "tree"
    assert _itemize(src, dst) == []
    back = tmp_path / "back"
    run("rsync", "-aHAX", f"{dst}/", f"{back}/")
    assert _itemize(src, back) == []
    assert_same_tree(src, back, xattrs=True)
    # an incremental run after a change moves just that file, and the result is exact again
    with open(src / "random.bin", "r+b") as f:  # same size and mtime: only --checksum sees it
        f.seek(1_000_000)
        f.write(b"changed")
    os.utime(src / "random.bin", ns=(1, os.stat(dst / "random.bin").st_mtime_ns))
    changes = _itemize(src, dst)
    assert [c.split()[-1] for c in changes] == ["random.bin"], changes
    run("rsync", "-aHAXc", "--inplace", f"{src}/", f"{dst}/")  # rewrite it in place
    assert _itemize(src, dst) == []
    assert_same_tree(src, dst, xattrs=True)


# ---- tar --------------------------------------------------------------------------------------
def test_tar_create_from_and_extract_into_the_mount(make_mount, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    shutil.copytree(CORPUS / "jpeg", src / "jpeg", copy_function=shutil.copy2)
    tar = ["tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "--acls"]
    src_tar = tmp_path / "src.tar"
    run(*tar, "-cf", src_tar, "-C", src, ".")

    m = make_mount()
    (m.path / "x").mkdir()
    run(*tar, "-xpf", src_tar, "-C", m.path / "x")
    assert_same_tree(src, m.path / "x", xattrs=True, dir_mtimes=False)
    run(*tar, "-df", src_tar, "-C", m.path / "x")  # tar's own compare: no difference

    m = remount(m, make_mount)
    mnt_tar = tmp_path / "from-mount.tar"
    run(*tar, "-cf", mnt_tar, "-C", m.path / "x", ".")
    out = tmp_path / "out"
    out.mkdir()
    run(*tar, "-xpf", mnt_tar, "-C", out)
    assert_same_tree(src, out, xattrs=True, dir_mtimes=False)
    run(*tar, "-df", mnt_tar, "-C", src)
    # the listing of the two archives agrees name for name
    assert sorted(run("tar", "-tvf", src_tar).splitlines()) == \
        sorted(run("tar", "-tvf", mnt_tar).splitlines())


# ---- git --------------------------------------------------------------------------------------
def test_git_in_the_mount(make_mount, tmp_path):
    m = make_mount()
    repo = m.path / "project"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "Field", "GIT_AUTHOR_EMAIL": "f@example.org",
           "GIT_COMMITTER_NAME": "Field", "GIT_COMMITTER_EMAIL": "f@example.org",
           "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args):
        return run("git", *args, cwd=repo, env=env)

    git("init", "-q", "-b", "main")
    shutil.copytree(CORPUS / "sidecars", repo / "sidecars")
    shutil.copy2(CORPUS / "jpeg" / "medium" / sorted(os.listdir(CORPUS / "jpeg" / "medium"))[0],
                 repo / "cover.jpg")
    git("add", "-A")
    git("commit", "-q", "-m", "import sidecars")
    for i in range(5):
        with open(repo / "edits.log", "a") as f:
            f.write(f"edit {i}\n" * 50)
        (repo / f"note{i}.md").write_text(f"# note {i}\n")
        git("add", "-A")
        git("commit", "-q", "-m", f"edit {i}")
    git("mv", "note0.md", "renamed.md")
    git("rm", "-q", "note1.md")
    git("commit", "-q", "-m", "tidy")
    assert len(git("log", "--oneline").splitlines()) == 7
    git("fsck", "--full", "--strict")
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    assert git("status", "--porcelain") == ""
    head = git("rev-parse", "HEAD")

    m = remount(m, make_mount)
    repo = m.path / "project"
    git("fsck", "--full", "--strict")
    assert git("rev-parse", "HEAD") == head
    assert git("status", "--porcelain") == ""
    assert "tidy" in git("log", "-1", "--format=%s")
    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, env=env)
    tracked = git("ls-files").splitlines()
    assert len(tracked) > 20
    for name in tracked:  # a fresh checkout has its own mtimes: compare the bytes
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name


# ---- sqlite3 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite3_in_the_mount(make_mount, journal):
    m = make_mount()
    db = m.path / "catalog.db"
    run("sqlite3", db, f"PRAGMA journal_mode={journal};",
        "CREATE TABLE photo(id INTEGER PRIMARY KEY, name TEXT, rating INT, blob BLOB);",
        "CREATE INDEX by_rating ON photo(rating);")
    for t in range(8):  # several transactions, each thousands of rows, one with a rollback
        run("sqlite3", db,
            "BEGIN;"
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) "
            f"INSERT INTO photo(name, rating, blob) SELECT 'IMG_' || ({t} * 2500 + i), "
            f"(i * 7 + {t}) % 6, randomblob(i % 300) FROM n;"
            "COMMIT;")
        if t == 3:
            run("sqlite3", db, "BEGIN; DELETE FROM photo; ROLLBACK;")
        if t == 5:
            run("sqlite3", db, "UPDATE photo SET rating = 5 WHERE id % 100 = 0;"
                "DELETE FROM photo WHERE id % 1000 = 1;")
    query = ("SELECT count(*), sum(rating), sum(length(blob)), max(id) FROM photo;"
             "SELECT count(*) FROM photo WHERE rating = 5;")
    assert run("sqlite3", db, "PRAGMA integrity_check;").strip() == "ok"
    before = run("sqlite3", db, query)
    assert before.splitlines()[0].split("|")[0] == str(8 * 2500 - 15)  # 15 deleted at t=5
    run("sqlite3", db, "VACUUM;")
    assert run("sqlite3", db, query) == before

    m = remount(m, make_mount)
    db = m.path / "catalog.db"
    assert run("sqlite3", db, "PRAGMA integrity_check;").strip() == "ok"
    assert run("sqlite3", db, query) == before
    assert run("sqlite3", db, "PRAGMA journal_mode;").strip() == journal


# ---- tethering software -----------------------------------------------------------------------
def test_tethering_write_temp_fsync_rename(make_mount):
    """Capture software writes each frame to a temporary name, fsyncs it and renames it into
    place, sometimes over an earlier frame of the same name, from several threads."""
    sources = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.stat().st_size > 0)
    assert len(sources) > 100
    m = make_mount()
    out = m.path / "Capture"
    out.mkdir()
    rng = random.Random(7)
    jobs = []
    for i in range(300):
        src = rng.choice(sources)
        name = f"IMG_{i % 240:04d}{src.suffix}"  # the last 60 replace earlier frames
        jobs.append((name, src.read_bytes() + i.to_bytes(4, "big")))
    expected = {}
    for name, data in jobs:
        expected[name] = data

    def capture(job: tuple[str, bytes]) -> None:
        name, data = job
        tmp = out / f".{name}.{os.getpid()}.{id(job)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view[:256 * 1024])
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, out / name)

    # frames of one name are written in order; different names concurrently
    by_name: dict[str, list] = {}
    for job in jobs:
        by_name.setdefault(job[0], []).append(job)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda js: [capture(j) for j in js], by_name.values()))
    dirfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dirfd)
    os.close(dirfd)

    def check(folder: Path) -> None:
        assert sorted(os.listdir(folder)) == sorted(expected)  # no temporary name is left
        for name, data in expected.items():
            assert (folder / name).read_bytes() == data, name

    check(out)
    m = remount(m, make_mount)
    check(m.path / "Capture")
