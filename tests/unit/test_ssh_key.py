"""The pool's ssh key: made once, 0600, in directories nobody else can open."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmpool.ssh import pool_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_key_and_every_directory_made_for_it_are_private_under_umask_022(
    tmp_path: Path,
) -> None:
    old = os.umask(0o022)
    try:
        key = pool_key(tmp_path / "state" / "deep")
    finally:
        os.umask(old)
    assert key == tmp_path / "state" / "deep" / "ssh" / "id_ed25519"
    for d in (tmp_path / "state", tmp_path / "state" / "deep", key.parent):
        assert _mode(d) == 0o700, d
    assert _mode(key) == 0o600 and _mode(key.with_suffix(".pub")) == 0o600
    assert key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")


def test_a_second_call_returns_the_same_key(tmp_path: Path) -> None:
    first = pool_key(tmp_path).read_bytes()
    assert pool_key(tmp_path).read_bytes() == first
