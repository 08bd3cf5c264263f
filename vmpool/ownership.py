"""Who owns what: session ids, machine names, owner labels, and "is this process alive?"."""

from __future__ import annotations

import functools
import os
import secrets
import socket
import string

import psutil
from pydantic import BaseModel, ConfigDict

from vmpool.backends.base import (
    LABEL_CONFIG_HASH,
    LABEL_HOST,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_POOL,
    LABEL_SESSION,
    Backend,
    validate_name,
)

_ALPHABET = string.ascii_lowercase + string.digits
#: process start times from /proc have 10 ms resolution; psutil rounds differently per call path
_START_TOLERANCE = 0.05


class ProcessRef(BaseModel):
    """A process, identified so that a reused pid is not mistaken for it."""

    model_config = ConfigDict(frozen=True)

    host: str
    pid: int
    pid_start: float


@functools.cache
def hostname() -> str:
    return socket.gethostname()


def current_process() -> ProcessRef:
    """This process, as other processes will check it."""
    pid = os.getpid()
    return ProcessRef(host=hostname(), pid=pid, pid_start=psutil.Process(pid).create_time())


def is_alive(ref: ProcessRef) -> bool:
    """True while ``ref`` runs; a process on another host is assumed alive (it can't be checked)."""
    if ref.host != hostname():
        return True
    try:
        proc = psutil.Process(ref.pid)
        if abs(proc.create_time() - ref.pid_start) >= _START_TOLERANCE:
            return False
        # a zombie has exited, its parent just has not reaped it yet
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


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


def machine_name(pool: str, serial: int) -> str:
    return validate_name(f"{pool}-{serial}")


def network_name(pool: str) -> str:
    return validate_name(f"{pool}-net")


def owner_labels(pool: str, session: str, owner: ProcessRef, config_hash: str) -> dict[str, str]:
    """Labels that let any later process decide whether a machine's owner is gone."""
    return {
        LABEL_POOL: pool,
        LABEL_SESSION: session,
        LABEL_HOST: owner.host,
        LABEL_PID: str(owner.pid),
        LABEL_PID_START: repr(owner.pid_start),
        LABEL_CONFIG_HASH: config_hash,
    }


def pool_machines(backend: Backend, pool: str) -> set[str]:
    """The machines ``backend`` holds under ``pool``'s label (raises what listing raises)."""
    return {info.name for info in backend.list(pool + "-") if info.labels.get(LABEL_POOL) == pool}


def owner_from_labels(labels: dict[str, str] | None) -> ProcessRef | None:
    """The controller that created a machine, or None when the labels don't say."""
    if not labels:
        return None
    try:
        return ProcessRef(
            host=labels[LABEL_HOST],
            pid=int(labels[LABEL_PID]),
            pid_start=float(labels[LABEL_PID_START]),
        )
    except (KeyError, ValueError):
        return None
