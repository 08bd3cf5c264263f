"""Who owns what: session ids, machine names, owner labels, and "is this process alive?"."""

from __future__ import annotations

import functools
import os
import secrets
import socket
import string

from pydantic import BaseModel, ConfigDict

from vmpool.backends.base import (
    LABEL_BOOT_ID,
    LABEL_CONFIG_HASH,
    LABEL_HOST,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_POOL,
    LABEL_SESSION,
    NAME_RE,
    Backend,
    validate_name,
)

_ALPHABET = string.ascii_lowercase + string.digits
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class ProcessRef(BaseModel):
    """A process, identified so that neither a reused pid nor a stepped clock misleads.

    ``boot_id`` and ``start_ticks`` (the kernel's start time, in clock ticks since boot) never
    change while the process runs, whatever the wall clock does; a start time in seconds since
    the epoch (boot time + ticks) moves with every clock step (psutil #1724, #2526). Both are
    None in records of vmpool before state schema 2, which recorded a wall-clock "pid_start"
    instead (ignored now, as any unknown key): such a process is judged by its pid alone.
    """

    model_config = ConfigDict(frozen=True)

    host: str
    pid: int
    boot_id: str | None = None
    start_ticks: int | None = None

    def same_process(self, other: ProcessRef) -> bool:
        """Whether ``other`` names this process (a Holder is compared as its process)."""
        return (self.pid, self.start_ticks, self.boot_id, self.host) == (
            other.pid,
            other.start_ticks,
            other.boot_id,
            other.host,
        )


@functools.cache
def hostname() -> str:
    """This host's name in records and labels: ``VMPOOL_HOST_ID`` when set (several "hosts"
    on one machine, each judging only its own processes by the process table), else the
    system's host name."""
    return os.environ.get("VMPOOL_HOST_ID") or socket.gethostname()


@functools.cache
def boot_id() -> str:
    """This boot of this host's kernel (a random UUID, new at every boot)."""
    with open(_BOOT_ID) as fh:
        return fh.read().strip()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start in clock ticks since boot) of ``pid`` from /proc/PID/stat, None if gone.

    The command name (field 2) is in parentheses and may itself hold spaces and ')': the
    fields are counted from the last ')'. PermissionError propagates (a hidepid /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19]
    return fields[0].decode(), int(fields[19])


def current_process() -> ProcessRef:
    """This process, as other processes will check it."""
    pid = os.getpid()
    stat = proc_stat(pid)
    if stat is None:  # only with a /proc that is not this pid namespace's
        raise RuntimeError(f"/proc/{pid}/stat: this process is missing from /proc")
    return ProcessRef(host=hostname(), pid=pid, boot_id=boot_id(), start_ticks=stat[1])


def is_alive(ref: ProcessRef) -> bool:
    """True while ``ref`` runs; a process on another host is assumed alive (it can't be checked)."""
    if ref.host != hostname():
        return True
    if ref.boot_id is not None and ref.boot_id != boot_id():
        return False  # this host has rebooted since
    try:
        stat = proc_stat(ref.pid)
    except PermissionError:
        return True  # cannot tell
    if stat is None:
        return False
    state, start = stat
    if ref.start_ticks is not None and start != ref.start_ticks:
        return False  # the pid was reused
    # a zombie has exited, its parent just has not reaped it yet
    return state not in ("Z", "X")


def new_session_id() -> str:
    """A short random id: 6 characters give 2 billion values, plenty for one host."""
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(_ALPHABET) for _ in range(5)
    )


def pool_id(prefix: str, session: str, profile: str) -> str:
    """Pools are named like their machines, without the number."""
    if profile == "default":
        return validate_name(f"{prefix}-{session}")
    return validate_name(f"{prefix}-{session}-{profile}")


def check_pool_id(value: str) -> str:
    """``value`` when it can name a pool (as pool_id makes them), else ValueError saying why:
    a pool id names files in the state directory, so it must never be a path."""
    if not NAME_RE.match(value):
        raise ValueError(
            f"invalid pool id {value!r}: a pool id is 1-63 lowercase letters, digits and '-', "
            "starting with a letter (see `vmpool status`)"
        )
    return value


def machine_name(pool: str, serial: int) -> str:
    return validate_name(f"{pool}-{serial}")


def network_name(pool: str) -> str:
    return validate_name(f"{pool}-net")


def pool_network(backend: Backend, pool: str) -> str | None:
    """The network ``pool`` would have on ``backend`` (None where it can have none): the name
    to clean up when the pool's record is unreadable (deleting a missing network is fine)."""
    return network_name(pool) if backend.capabilities.network else None


def owner_labels(pool: str, session: str, owner: ProcessRef, config_hash: str) -> dict[str, str]:
    """Labels that let any later process decide whether a machine's owner is gone."""
    return {
        LABEL_POOL: pool,
        LABEL_SESSION: session,
        LABEL_HOST: owner.host,
        LABEL_PID: str(owner.pid),
        LABEL_PID_START: "" if owner.start_ticks is None else str(owner.start_ticks),
        LABEL_BOOT_ID: owner.boot_id or "",
        LABEL_CONFIG_HASH: config_hash,
    }


def pool_machines(backend: Backend, pool: str) -> set[str]:
    """The machines ``backend`` holds under ``pool``'s label (raises what listing raises)."""
    return {info.name for info in backend.list(pool + "-") if info.labels.get(LABEL_POOL) == pool}


def owner_from_labels(labels: dict[str, str] | None) -> ProcessRef | None:
    """The controller that created a machine, or None when the labels don't say.

    Labels of vmpool before state schema 2 have no boot id and a wall-clock start: that owner
    is judged by its pid alone (see ProcessRef)."""
    if not labels:
        return None
    try:
        host, pid = labels[LABEL_HOST], int(labels[LABEL_PID])
        boot = labels.get(LABEL_BOOT_ID) or None
        ticks = labels.get(LABEL_PID_START, "")
        start = int(ticks) if boot is not None and ticks else None
    except (KeyError, ValueError):
        return None
    return ProcessRef(host=host, pid=pid, boot_id=boot, start_ticks=start)
