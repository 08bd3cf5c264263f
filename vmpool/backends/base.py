"""The Backend protocol every tool module implements, and the small records it exchanges."""

from __future__ import annotations

import builtins
import concurrent.futures
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from vmpool.errors import ReadyTimeout, VmPoolError

#: Names every backend accepts: lowercase letters, digits and '-', starting with a letter.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

#: Label keys vmpool puts on machines (where the backend has labels) and in ownership records.
LABEL_SESSION = "vmpool.session"
LABEL_HOST = "vmpool.host"
LABEL_PID = "vmpool.pid"
#: the pid's start in clock ticks since boot (a wall-clock start before state schema 2)
LABEL_PID_START = "vmpool.pid_start"
LABEL_BOOT_ID = "vmpool.boot_id"
LABEL_CONFIG_HASH = "vmpool.config_hash"
LABEL_POOL = "vmpool.pool"


def validate_name(name: str) -> str:
    """Return ``name`` when every backend accepts it, else raise ValueError saying why."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid machine name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter"
        )
    return name


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run inside a machine."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the basics."""

    #: reset() restores a snapshot taken when the machine became ready (fast, in place).
    reset: bool = False
    #: machines carry labels (owner is read back from list()); else ownership records are used.
    labels: bool = False
    #: machines of one pool can share a private network and report an address.
    network: bool = False


@dataclass(frozen=True)
class MachineSpec:
    """What the controller asks a backend to create."""

    name: str
    labels: Mapping[str, str]
    #: slot number within the pool (0-based); stable across replacements of that slot's machine
    index: int = 0
    #: name of the pool's private network (create_network() was called for it), or None
    network: str | None = None


@dataclass(frozen=True)
class MachineInfo:
    """A machine as the backend's tool lists it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    running: bool = False


#: ssh options that make a login non-interactive and trust a throwaway machine's host key
#: (each machine makes its own when it first starts, so none could be known ahead)
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
)


@dataclass(frozen=True)
class SshAccess:
    """How a deploy tool (ssh, Ansible, testinfra, Fabric) logs in to a machine."""

    host: str
    port: int
    user: str
    key_file: Path

    def argv(self, *cmd: str) -> builtins.list[str]:
        """An ssh command line running ``cmd`` in the machine (a login shell without ``cmd``)."""
        return [
            "ssh", *SSH_OPTIONS, "-i", str(self.key_file), "-p", str(self.port),
            f"{self.user}@{self.host}", *cmd,
        ]


@runtime_checkable
class Backend(Protocol):
    """A tool that makes machines. Every method may raise BackendError (or a subclass)."""

    name: str
    capabilities: Capabilities

    def check(self) -> None:
        """Raise BackendUnavailable saying what to install when the tool or image is missing."""

    def create(self, spec: MachineSpec) -> None:
        """Create (but not necessarily start) the machine ``spec.name``."""

    def start(self, name: str) -> None:
        """Start the machine; returns once the tool has started it (not necessarily ready)."""

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe until the machine answers, or raise ReadyTimeout with the last probe error."""

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` in the machine; raise ExecTimeout after ``timeout`` seconds."""

    def snapshot(self, name: str) -> None:
        """Record the ready state that reset() returns to (no-op without the reset capability)."""

    def reset(self, name: str) -> None:
        """Return the machine to its snapshot; only called when ``capabilities.reset``."""

    def delete(self, name: str) -> None:
        """Destroy the machine and everything it owns; a missing machine is success."""

    def list(self, prefix: str) -> builtins.list[MachineInfo]:
        """Machines whose name starts with ``prefix`` (with their labels where supported)."""

    def address(self, name: str) -> str | None:
        """An address the pool's other machines can reach this one at, or None."""

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Create the pool's private network (only with ``capabilities.network``)."""

    def delete_network(self, name: str) -> None:
        """Remove the network; a missing network is success."""

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        """Networks whose name starts with ``prefix``, with labels where supported."""

    def ssh(self, name: str) -> SshAccess | None:
        """How to log in to the machine by ssh, or None when it has no ssh endpoint."""

    # -- hooks: BackendBase gives each a default; callers call them, never probe for them ----
    def prepare(self, *, networked: bool) -> None:
        """Do the slow one-off work before any machine is asked for (the plugin calls this
        while tests are collected); ``networked``: the pool's machines share a network."""

    def release(self, name: str) -> None:
        """Let go of what this process keeps open to ``name`` (called at check-in), so that
        the machine's next holder, in another process, can use it."""

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """``delete()`` each of ``names``; returns ``{name: error}`` for those that failed."""

    def close(self) -> None:
        """End what ``prepare()`` left running for this object (podman: its API service);
        called once the object's work is done (the plugin: after the session's last reap)."""

    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> builtins.list[str]:
        """Remove what the backend keeps beside machines named ``prefix…`` that are not in
        ``existing`` (removed outside vmpool), once untouched for ``older_than`` seconds;
        returns what went (with ``dry_run``, what would)."""

    def list_answering(
        self, prefix: str, *, networks: bool = False
    ) -> tuple[builtins.list[MachineInfo], builtins.list[str]]:
        """Machines (or networks) named ``prefix…`` on every part of the backend that answers,
        and one line per part that does not (the reaper reaps the rest: podman's fleet lists
        each host); ``list()`` and ``list_networks()`` instead fail when any part is silent."""

    def unreachable(self, names: Sequence[str]) -> dict[str, str]:
        """Those of ``names`` that can no longer be reached (their host stopped answering),
        each with why; the controller replaces them while idle. Asked about twice a second:
        it must be cheap and must not block."""


class BackendBase:
    """The base of every backend: the optional hooks of Backend, each with its default.

    A backend overrides the hooks its tool needs (qemu: prepare, release; podman: prepare,
    close, delete_many, forget_missing; podman's fleet: list_answering, unreachable), as
    pytest-xdist's schedulers implement its scheduler protocol; callers call every hook
    unconditionally.
    """

    #: machines the default delete_many deletes at once (the default warmup_parallelism)
    delete_parallelism = 4

    def delete(self, name: str) -> None:
        """Destroy the machine (see Backend.delete); every backend implements it."""
        raise NotImplementedError

    def prepare(self, *, networked: bool) -> None:
        """Nothing to prepare."""

    def release(self, name: str) -> None:
        """Nothing is kept open to a machine."""

    def close(self) -> None:
        """Nothing was left running."""

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """``delete()`` each (``delete_parallelism`` at once); a BackendError is collected
        as the machine's error, anything else propagates."""
        errors: dict[str, str] = {}
        names = sorted(set(names))
        if not names:
            return errors
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self.delete_parallelism, len(names)),
            thread_name_prefix="vmpool-delete",
        ) as ex:
            for name, fut in [(n, ex.submit(self.delete, n)) for n in names]:
                try:
                    fut.result()
                except VmPoolError as exc:
                    errors[name] = str(exc)
        return errors

    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> builtins.list[str]:
        """Nothing is kept beside machines."""
        return []

    def list_answering(
        self, prefix: str, *, networks: bool = False
    ) -> tuple[builtins.list[MachineInfo], builtins.list[str]]:
        """One part, which answers or raises: ``list()`` (or ``list_networks()``)."""
        me = cast(Backend, self)  # every backend implements the protocol's listings
        return (me.list_networks(prefix) if networks else me.list(prefix)), []

    def unreachable(self, names: Sequence[str]) -> dict[str, str]:
        """Every machine is on this machine: none is ever out of reach."""
        return {}


def probe_until(
    probe: Callable[[], None],
    *,
    timeout: float,
    what: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    first_interval: float = 0.05,
    max_interval: float = 1.0,
    fatal: tuple[type[Exception], ...] = (),
    on_timeout: Callable[[int, str], Exception] | None = None,
) -> None:
    """Call ``probe`` until it returns without raising, or raise ReadyTimeout.

    The interval grows from ``first_interval`` to ``max_interval``; the last probe error is
    part of the ReadyTimeout message. Errors of a ``fatal`` type end the wait at once;
    ``on_timeout(attempts, last_error)`` makes the exception raised at the deadline instead.
    """
    deadline = clock() + timeout
    interval = first_interval
    last: str = "no probe ran"
    attempts = 0
    while True:
        attempts += 1
        try:
            probe()
            return
        except fatal:
            raise
        except VmPoolError as exc:
            last = str(exc)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        remaining = deadline - clock()
        if remaining <= 0:
            if on_timeout is not None:
                raise on_timeout(attempts, last)
            raise ReadyTimeout(
                f"{what} not ready after {timeout:g}s ({attempts} probes); last error: {last}"
            )
        sleep(min(interval, remaining))
        interval = min(interval * 2, max_interval)
