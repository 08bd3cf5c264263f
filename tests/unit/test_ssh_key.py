"""The pool's ssh key: made once, 0600, in directories nobody else can open."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmpool.backends.base import SshAccess
from vmpool.ssh import ansible_inventory, pool_key


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

class _Vm:
    """What ansible_inventory reads of a VM handle: its name and ssh access."""

    def __init__(self, name: str, port: int, key: Path) -> None:
        self.name = name
        self.ssh = SshAccess(host="127.0.0.1", port=port, user="root", key_file=key)


def test_the_ansible_inventory_is_private_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "inventory.ini"
    target.write_text("stale\n")
    vms = [_Vm("m-a", 2201, tmp_path / "k"), _Vm("m-b", 2202, tmp_path / "k")]
    assert ansible_inventory(vms, target) == target  # type: ignore[arg-type]
    lines = target.read_text().splitlines()
    assert lines[:3] == [
        "[vmpool]",
        f"m-a ansible_host=127.0.0.1 ansible_port=2201 ansible_user=root "
        f"ansible_ssh_private_key_file={tmp_path / 'k'}",
        f"m-b ansible_host=127.0.0.1 ansible_port=2202 ansible_user=root "
        f"ansible_ssh_private_key_file={tmp_path / 'k'}",
    ]
    assert "stale" not in lines and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["inventory.ini"]  # no temp file stays
