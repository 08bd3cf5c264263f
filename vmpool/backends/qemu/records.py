"""A machine's run directory: its file names, the record create() writes, JSON in and out.

Each machine is ``<state_dir>/qemu/<name>``: labels, a qcow2 overlay of the image's disk, the
pidfile, the console log, and the record below; its QMP and guest-agent sockets live in
``sock_dir`` (the run directory, or a short fallback when the path would not fit a socket).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from vmpool._files import atomic_write
from vmpool.errors import BackendError

Accel = Literal["kvm", "tcg"]

NETWORKS_DIR = "networks"
LABELS = "labels.json"
RECORD = "machine.json"
OVERLAY = "overlay.qcow2"
PIDFILE = "qemu.pid"
CONSOLE = "console.log"
QMP_SOCK = "qmp.sock"
QGA_SOCK = "qga.sock"


@dataclass(frozen=True)
class Record:
    """What create() decided about a machine; start() and friends read it back."""

    name: str
    index: int
    sock_dir: str
    kernel: str
    initrd: str
    network: str | None = None
    ip: str | None = None
    prefix: int | None = None
    mac: str | None = None
    #: the network hub's socket (-netdev stream connects to it)
    hub: str | None = None
    accel: str | None = None
    #: the template state this machine was restored from (None: it booted)
    template: str | None = None
    #: identity of that state file ("inode:mtime_ns:size"), to discard exactly it if it fails
    template_stamp: str | None = None
    #: the clone still needs its restore checked and its identity set (done by wait_ready)
    clone_pending: bool = False
    #: time.monotonic() at launch (system-wide on Linux): bounds the clone's restore
    launched_at: float | None = None
    #: "busybox" or "debian" ([qemu] distro when it was created)
    distro: str = "busybox"
    #: the 127.0.0.1 port forwarded to a Debian guest's sshd (chosen at each launch)
    ssh_port: int | None = None
    #: a Debian guest got its own identity and the pool's ssh key (at its first readiness)
    prepared: bool = False

    @property
    def qmp_sock(self) -> Path:
        return Path(self.sock_dir) / QMP_SOCK

    @property
    def qga_sock(self) -> Path:
        return Path(self.sock_dir) / QGA_SOCK


def load_record(run_dir: Path) -> Record:
    data = read_json(run_dir / RECORD)
    try:
        return Record(**data)
    except TypeError as exc:
        raise BackendError(f"{run_dir / RECORD} is unreadable: {exc}") from exc


def save_record(run_dir: Path, record: Record) -> None:
    write_json(run_dir / RECORD, asdict(record))


def write_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", fsync=False)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"{path} does not hold a JSON object")
    return data


def read_json_quiet(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except BackendError:
        return {}


def read_labels(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def file_identity(path: Path) -> str:
    """``"size:mtime_ns"`` of ``path``, or ``"?"`` when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return "?"
    return f"{st.st_size}:{st.st_mtime_ns}"


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
