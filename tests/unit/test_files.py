"""vmpool._files: what vmpool creates is 0600/0700 whatever the umask; looser leftovers of an
older vmpool are tightened when used."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool._files import atomic_write, private_dir, private_opener, tighten_tree


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)  # the loosest: anything made without an explicit mode shows
    try:
        yield
    finally:
        os.umask(old)


def test_private_dir_makes_every_missing_level_0700(tmp_path: Path, open_umask: None) -> None:
    private_dir(tmp_path / "a" / "b" / "c")
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_private_dir_tightens_an_existing_directory_but_not_its_parents(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir(mode=0o755)
    os.chmod(tmp_path / "old", 0o755)
    os.chmod(tmp_path, 0o755)
    private_dir(tmp_path / "old")
    assert (mode(tmp_path / "old"), mode(tmp_path)) == (0o700, 0o755)


def test_atomic_write_makes_a_0600_file_and_leaves_no_temp_file(
    tmp_path: Path, open_umask: None
) -> None:
    atomic_write(tmp_path / "r.json", "{}")
    atomic_write(tmp_path / "r.json", b"[]")
    assert (tmp_path / "r.json").read_text() == "[]"
    assert mode(tmp_path / "r.json") == 0o600
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_lock_file_is_0600_new_or_left_by_an_older_vmpool(
    tmp_path: Path, open_umask: None
) -> None:
    old = tmp_path / "old.lock"
    old.write_text("")
    os.chmod(old, 0o644)
    for path in (tmp_path / "new.lock", old):
        with open(path, "a", opener=private_opener):
            pass
        assert mode(path) == 0o600


def test_tighten_tree_fixes_a_cache_and_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("")
    os.chmod(outside, 0o644)
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    (cache / "images" / "vmlinuz").write_text("")
    os.chmod(cache / "images" / "vmlinuz", 0o755)
    (cache / "link").symlink_to(outside)
    tighten_tree(cache)
    assert mode(cache) & 0o077 == 0 and mode(cache / "images") & 0o077 == 0
    assert mode(cache / "images" / "vmlinuz") == 0o700
    assert mode(outside) == 0o644
