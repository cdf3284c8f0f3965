"""The first things a photographer does: copy files in, read them back, remount."""

from __future__ import annotations

import filecmp
import shutil

from conftest import CORPUS, needs_fuse

pytestmark = needs_fuse


def test_corpus_round_trip_and_remount(make_mount):
    m = make_mount()
    shutil.copytree(CORPUS, m.path / "corpus")
    m.stop()
    m2 = make_mount()
    cmp = filecmp.dircmp(CORPUS, m2.path / "corpus")
    files = [p for p in CORPUS.rglob("*") if p.is_file()]
    assert len(files) > 100
    for p in files:
        assert (m2.path / "corpus" / p.relative_to(CORPUS)).read_bytes() == p.read_bytes(), p
    assert not cmp.diff_files
