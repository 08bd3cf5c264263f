"""ssh for deploy tools: the pool's login key, and an Ansible inventory of leased machines.

Each state directory has one ed25519 key (``<state_dir>/ssh/id_ed25519``, 0600, in a 0700
directory), made with ``ssh-keygen`` the first time a machine needs it; backends install its
public half in each machine when they create it. Machines are throwaway and their host keys
change with every machine, so host keys are not checked (``SSH_OPTIONS``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vmpool import _proc
from vmpool._files import atomic_write, private_dir
from vmpool._lock import file_lock
from vmpool.backends.base import SSH_OPTIONS
from vmpool.errors import CapabilityError

if TYPE_CHECKING:
    from vmpool.client import VM

KEY_NAME = "id_ed25519"


def pool_key(state_dir: Path, *, timeout: float = 30.0) -> Path:
    """The private key of ``state_dir``'s pool, made (with its ``.pub``) if missing."""
    folder = Path(state_dir) / "ssh"
    key = folder / KEY_NAME
    if key.is_file() and key.with_suffix(".pub").is_file():
        return key
    private_dir(folder)  # missing parents are made 0700 too, not with the umask's mode
    with file_lock(folder / "key.lock", timeout=timeout):
        if key.is_file() and key.with_suffix(".pub").is_file():
            return key  # another process made it while this one waited
        with tempfile.TemporaryDirectory(dir=folder, prefix=".keygen-") as tmp:
            made = Path(tmp) / KEY_NAME
            _proc.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmpool", "-f", str(made)],
                timeout=timeout,
                install_hint="apt-get install openssh-client",
            ).check("ssh-keygen")
            for path in (made, made.with_suffix(".pub")):
                os.chmod(path, 0o600)
            # ssh-keygen's own files, moved into place (not data to write): the public half
            # first, so a reader that sees the private key finds both
            os.replace(made.with_suffix(".pub"), key.with_suffix(".pub"))
            os.replace(made, key)
    return key


def ansible_inventory(vms: Iterable[VM], path: os.PathLike[str] | str) -> Path:
    """Write an Ansible INI inventory of ``vms`` (group ``vmpool``) to ``path``; return it.

    Each host is the machine's name with ``ansible_host``, ``ansible_port``, ``ansible_user``
    and ``ansible_ssh_private_key_file``; host key checking is off for the group. The file is
    written 0600 and atomically. A machine without ssh raises CapabilityError.
    """
    lines = ["[vmpool]"]
    for vm in vms:
        access = vm.ssh
        lines.append(
            f"{vm.name} ansible_host={access.host} ansible_port={access.port} "
            f"ansible_user={access.user} ansible_ssh_private_key_file={access.key_file}"
        )
    if len(lines) == 1:
        raise CapabilityError("ansible_inventory: no machines given")
    common = " ".join(SSH_OPTIONS)
    lines += [
        "",
        "[vmpool:vars]",
        "ansible_host_key_checking=False",
        f"ansible_ssh_common_args='{common}'",
        "ansible_python_interpreter=/usr/bin/python3",
    ]
    target = Path(path)
    # made again for each run: atomic for its readers, but not worth an fsync
    atomic_write(target, "\n".join(lines) + "\n", fsync=False)
    return target

