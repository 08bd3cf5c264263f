"""What a Debian guest (systemd, sshd) needs beyond the busybox one.

Its files come from the built Debian image (``debian.py``). Its first NIC (eth0, the image's
static 10.0.2.15) is QEMU user-mode networking with ``restrict=on`` (no traffic leaves the host)
and one forward, 127.0.0.1:PORT to the guest's sshd, the port chosen free at launch; a pool
network is a second NIC (eth1) addressed through the guest agent. Every machine boots the same
disk, so at its first readiness the agent gives it its own hostname, machine-id, ssh host keys
and the pool's ssh key, before the ready snapshot is taken.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from vmpool.backends.qemu import debian
from vmpool.backends.qemu.image import ImagePaths
from vmpool.backends.qemu.network import guest_address_commands
from vmpool.backends.qemu.records import Record
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError

SSH_PORT = 22
#: systemd and sshd want more than the busybox guest's 256 MiB
MIN_MEMORY = 512
_BANNER_TIMEOUT = 5.0


def image_paths(settings: QemuSettings, packages: Iterable[str] = ()) -> ImagePaths:
    """The built Debian image's kernel, initramfs and disk (BackendUnavailable if not built)."""
    root = debian.find_image(settings, packages)
    return ImagePaths(
        kernel=root / debian.KERNEL_FILE,
        initrd=root / debian.INITRD_FILE,
        disk=root / debian.DISK_FILE,
    )


def kernel_cmdline(settings: QemuSettings) -> str:
    return " ".join(filter(None, [debian.KERNEL_CMDLINE, settings.append]))


def memory(settings: QemuSettings) -> int:
    return max(settings.memory, MIN_MEMORY)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (QEMU binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nic_argv(record: Record) -> list[str]:
    """eth0: user-mode networking, nothing but the ssh forward reaches in or out."""
    if record.ssh_port is None:
        raise BackendError(f"qemu machine {record.name}: no ssh port recorded")
    digest = hashlib.sha256(record.name.encode()).digest()
    mac = "52:54:01:" + ":".join(f"{b:02x}" for b in digest[:3])
    netdev = f"user,id=u0,restrict=on,hostfwd=tcp:127.0.0.1:{record.ssh_port}-:{SSH_PORT}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=u0,mac={mac}"]


def identity_argv(record: Record, public_key: str) -> list[str]:
    """A guest command giving the machine its own identity and the pool's ssh key; it prints
    the hostname, the machine-id and (on a pool network) eth1's MAC and address."""
    lines = [
        "set -e",
        'hostname "$1"',
        'echo "$1" > /etc/hostname',
        'printf "127.0.0.1 localhost\\n127.0.1.1 %s\\n::1 localhost\\n" "$1" > /etc/hosts',
        # machine-id: 32 hex digits of the kernel's randomness
        "tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id",
        "rm -f /etc/ssh/ssh_host_*",
        "ssh-keygen -A >/dev/null",
        "install -d -m 700 /root/.ssh",
        'printf "%s\\n" "$2" > /root/.ssh/authorized_keys',
        "chmod 600 /root/.ssh/authorized_keys",
        # sshd read the image's host keys when it started
        "systemctl try-restart ssh.service",
    ]
    setting, printing = guest_address_commands(record, "eth1")
    lines += [*setting, "hostname", "cat /etc/machine-id", *printing]
    script = "\n".join(lines) + "\n"
    return ["sh", "-c", script, "identity", record.name, public_key.strip()]


def check_identity(record: Record, stdout: str) -> None:
    """BackendError unless the identity command's output is this machine's."""
    seen = stdout.split()
    expected_ip = [record.mac, f"{record.ip}/{record.prefix}"] if record.ip is not None else []
    if len(seen) != 2 + len(expected_ip) or seen[0] != record.name or seen[2:] != expected_ip:
        raise BackendError(
            f"qemu machine {record.name}: identity not set, the guest reports {seen}"
        )


def probe_ssh(port: int, deadline: float) -> None:
    """BackendError unless sshd answers on 127.0.0.1:``port`` with its banner.

    (User-mode networking accepts a forwarded connection before the guest does, so a
    connection alone proves nothing.)
    """
    timeout = max(min(deadline - time.monotonic(), _BANNER_TIMEOUT), 0.1)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            banner = sock.recv(64)
    except OSError as exc:
        raise BackendError(f"ssh on 127.0.0.1:{port}: {exc}") from exc
    if not banner.startswith(b"SSH-"):
        raise BackendError(f"ssh on 127.0.0.1:{port} sent {banner[:40]!r}, not an ssh banner")


def read_public_key(key_file: Path) -> str:
    return key_file.with_suffix(".pub").read_text()
