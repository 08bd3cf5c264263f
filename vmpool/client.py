"""Check-out and check-in from any process (an xdist worker, the CLI, a library user).

``PoolClient`` drives the lease protocol through a transport (vmpool.transport); ``VM`` is
the handle a test gets.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmpool import leases, ops, transfer
from vmpool._files import private_opener
from vmpool.backends.base import Backend, ExecResult, SshAccess, probe_until
from vmpool.errors import (
    CapabilityError,
    CheckoutTimeout,
    CommandFailed,
    CommandSucceeded,
    PoolUnavailable,
    StateError,
    TransferError,
    UnitFailed,
    VmPoolError,
    WaitTimeout,
)
from vmpool.ownership import ProcessRef, current_process
from vmpool.state import Holder, JsonStore, Request
from vmpool.transport import Transport, connect

if TYPE_CHECKING:
    from vmpool.pgstore.store import PgStore

log = logging.getLogger(__name__)


class VM:
    """One leased machine, as a test sees it."""

    def __init__(self, name: str, backend: Backend, address: str | None, lease: Lease) -> None:
        self.name = name
        self.backend = backend
        self.address = address
        # the lease's set, not the lease: a lease lists its VMs, and a VM pointing back would
        # make every check-out a reference cycle, garbage only the cyclic collector frees
        # (whose full collections stalled a worker for milliseconds)
        self._dirty = lease.dirty

    def exec(
        self, cmd: Sequence[str] | str, *, timeout: float = 60.0, check: bool = False
    ) -> ExecResult:
        """Run ``cmd`` in the machine: an argv list, or a string for the guest's ``sh -c``.

        ``check=True`` raises CommandFailed (command, exit code, stdout, stderr) on non-zero.
        """
        argv = _argv(cmd)
        result = self.backend.exec(self.name, argv, timeout)
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
        return result

    @property
    def ssh(self) -> SshAccess:
        """How deploy tools log in (``.host``, ``.port``, ``.user``, ``.key_file``,
        ``.argv(*cmd)``); CapabilityError for a machine without an ssh endpoint."""
        access = self.backend.ssh(self.name)
        if access is None:
            raise CapabilityError(
                f"{self.name} ({self.backend.name}) has no ssh endpoint: use a machine with "
                'sshd, e.g. [podman] distro = "debian"'
            )
        return access

    # -- the VM-test API (named as in the NixOS test driver) ---------------------------------
    def succeed(self, cmd: Sequence[str] | str, *, timeout: float = 60.0) -> str:
        """Run ``cmd`` and return its stdout; CommandFailed (with the output) unless it exits 0."""
        return self.exec(cmd, timeout=timeout, check=True).stdout

    def fail(self, cmd: Sequence[str] | str, *, timeout: float = 60.0) -> str:
        """Run ``cmd`` and return its stdout; CommandSucceeded unless it exits non-zero."""
        result = self.exec(cmd, timeout=timeout)
        if result.returncode == 0:
            raise CommandSucceeded(_argv(cmd), result.stdout, result.stderr)
        return result.stdout

    def wait_until_succeeds(self, cmd: Sequence[str] | str, *, timeout: float = 60.0) -> str:
        """Run ``cmd`` until it exits 0 (backing off between tries) and return its stdout;
        WaitTimeout with the last try's output after ``timeout`` seconds."""
        out: list[str] = []

        def attempt(left: float) -> None:
            out[:] = [self.exec(cmd, timeout=left, check=True).stdout]

        self._poll(attempt, timeout, f"{_argv(cmd)!r} did not succeed")
        return out[0]

    def wait_for_unit(self, unit: str, *, timeout: float = 60.0) -> None:
        """Wait until the systemd unit ``unit`` is active. A unit that fails raises UnitFailed
        at once with its ``systemctl status``; a machine without systemd, CapabilityError."""
        if self.exec(["test", "-d", "/run/systemd/system"], timeout=timeout).returncode != 0:
            raise CapabilityError(
                f"wait_for_unit({unit!r}): {self.name} does not run systemd (no "
                "/run/systemd/system); use a systemd machine, e.g. [podman] distro = \"debian\""
            )

        def attempt(left: float) -> None:
            show = self.exec(
                ["systemctl", "show", "--property=ActiveState,LoadState,SubState", "--", unit],
                timeout=left,
                check=True,
            ).stdout
            props = dict(line.partition("=")[::2] for line in show.splitlines())
            state = props.get("ActiveState", "")
            if state == "active":
                return
            if state == "failed":
                status = self.exec(
                    ["systemctl", "status", "--no-pager", "--full", "--lines=20", "--", unit],
                    timeout=max(left, 5.0),
                )
                raise UnitFailed(
                    f"unit {unit} in {self.name} failed:\n{status.stdout.rstrip()}"
                    f"{status.stderr.rstrip()}"
                )
            raise WaitTimeout(
                f"unit {unit} is {state or '?'} ({props.get('SubState', '?')}, load state "
                f"{props.get('LoadState', '?')})"
            )

        self._poll(attempt, timeout, f"unit {unit} did not become active", fatal=(UnitFailed,))

    def wait_for_port(self, port: int, *, timeout: float = 60.0) -> None:
        """Wait until something listens on TCP ``port`` inside the machine (any address).

        Reads the machine's /proc/net/tcp and tcp6, so nothing connects from the host.
        """
        if not 0 < port < 65536:
            raise ValueError(f"wait_for_port: port {port} is not in 1-65535")

        def attempt(left: float) -> None:
            table = self.exec(
                "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", timeout=left
            ).stdout
            if port not in _listening_ports(table):
                raise WaitTimeout(f"nothing listens on TCP port {port}")

        self._poll(attempt, timeout, f"TCP port {port} is not listening")

    def copy_to(
        self, host_path: os.PathLike[str] | str, machine_path: str, *, timeout: float = 60.0
    ) -> None:
        """Copy a host file or directory (recursively, modes kept) to ``machine_path``, the
        name it gets in the machine (its parents are made; an existing directory is merged)."""
        parent, name = transfer.split_machine_path(machine_path)
        data = transfer.pack(Path(host_path), name)
        encoded = base64.b64encode(data).decode("ascii")
        what = f"copy_to {host_path} -> {self.name}:{machine_path}"
        try:
            staging = self.succeed(["mktemp"], timeout=timeout).strip()
            for i in range(0, len(encoded), transfer.CHUNK):
                chunk = encoded[i : i + transfer.CHUNK]
                self.succeed(
                    ["sh", "-c", 'printf %s "$1" >> "$2"', "sh", chunk, staging], timeout=timeout
                )
            self.succeed(["sh", "-c", transfer.UNPACK_SCRIPT, "sh", staging, parent],
                         timeout=timeout)
        except CommandFailed as exc:
            raise TransferError(f"{what}: {exc}") from exc

    def copy_from(
        self, machine_path: str, host_path: os.PathLike[str] | str, *, timeout: float = 60.0
    ) -> None:
        """Copy a file or directory of the machine (recursively, modes kept) to ``host_path``.

        The archive is unpacked with tarfile's safety checks into a private directory and
        renamed into place: nothing in it can make the host write outside ``host_path``.
        """
        parent, name = transfer.split_machine_path(machine_path)
        try:
            encoded = self.succeed(["sh", "-c", transfer.PACK_SCRIPT, "sh", parent, name],
                                   timeout=timeout)
        except CommandFailed as exc:
            raise TransferError(f"copy_from {self.name}:{machine_path}: {exc}") from exc
        try:
            data = base64.b64decode(encoded)
        except ValueError as exc:
            raise TransferError(f"copy_from {self.name}:{machine_path}: bad base64: {exc}") from exc
        transfer.unpack(data, name, Path(host_path))

    def _poll(
        self,
        attempt: Callable[[float], None],
        timeout: float,
        what: str,
        *,
        fatal: tuple[type[Exception], ...] = (),
    ) -> None:
        """Call ``attempt(seconds_left)`` until it returns, backing off; WaitTimeout at the
        deadline naming ``what``, the timeout and the last error."""
        deadline = time.monotonic() + timeout

        def probe() -> None:
            attempt(max(deadline - time.monotonic(), 1.0))

        def late(attempts: int, last: str) -> WaitTimeout:
            return WaitTimeout(
                f"{self.name}: {what} within {timeout:g}s ({attempts} tries); last: {last}"
            )

        probe_until(probe, timeout=timeout, what=what, fatal=fatal, on_timeout=late,
                    max_interval=0.5)

    def mark_dirty(self) -> None:
        """Force a reset (or the stronger policy) when this machine is checked in."""
        self._dirty.add(self.name)

    def __repr__(self) -> str:
        return f"VM({self.name!r}, backend={self.backend.name!r}, address={self.address!r})"


def _argv(cmd: Sequence[str] | str) -> list[str]:
    """A command as the machine runs it: a string goes to the guest's ``sh -c``."""
    return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]


def _listening_ports(table: str) -> set[int]:
    """TCP ports in LISTEN state in the text of /proc/net/tcp and /proc/net/tcp6."""
    ports = set()
    for line in table.splitlines():
        fields = line.split()
        # sl local_address rem_address st ...; LISTEN is state 0A
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            try:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


@dataclass
class Lease:
    """Machines checked out together; check them in together."""

    request_id: str
    names: list[str]
    addresses: dict[str, str | None]
    holder: Holder
    waited: float
    dirty: set[str] = field(default_factory=set)
    vms: list[VM] = field(default_factory=list)
    #: what holds the lease: its connection to the lease server is the lease's lifeline (the
    #: server reclaims what a closed connection held), so it lives as long as the lease
    transport: Transport | None = field(default=None, repr=False, compare=False)


class PoolClient:
    """Check machines out of one pool and back in.

    Its transport (vmpool.transport) is chosen once, here: the pool's lease server if one
    answers, else the pool file. ``close()`` gives its connection up (and with it, to the
    server, whatever this process still holds)."""

    def __init__(
        self,
        store: JsonStore | PgStore,
        backend: Backend,
        policy: leases.Policy,
        *,
        worker: str = "main",
        pre_ping: bool = True,
        pre_ping_after: float = 0.0,
        ping_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
        wait_log: os.PathLike[str] | str | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.policy = policy
        self.worker = worker
        self.pre_ping = pre_ping
        self.pre_ping_after = pre_ping_after
        self.ping_timeout = ping_timeout
        self.clock = clock
        self.wait_log = wait_log
        self.transport = transport if transport is not None else connect(store, policy)
        self._me = current_process()  # reads /proc: once, and again in a forked child

    def close(self) -> None:
        self.transport.close()

    def checkout(
        self,
        count: int = 1,
        *,
        fresh: bool = False,
        test: str | None = None,
        timeout: float = 300.0,
    ) -> Lease:
        """Take ``count`` machines at once (all or none), waiting in line up to ``timeout``.

        Raises CheckoutTimeout (with the pool's summary) or PoolUnavailable.
        """
        started = self.clock()
        begun = time.monotonic()
        front = False
        while True:
            left = max(timeout - (time.monotonic() - begun), 0.0)
            since = self.clock() if front else started
            names, holder, views = self._wait_for_grant(count, fresh, test, left, front, since)
            try:
                addresses = {n: views[n].address if n in views else None for n in names}
                bad = self._ping(self._needs_ping(views, names)) if self.pre_ping else {}
                if not bad:
                    waited = self.clock() - started
                    lease = Lease(holder.request, names, addresses, holder, waited,
                                  transport=self.transport)
                    lease.vms = [VM(n, self.backend, addresses[n], lease) for n in names]
                    self._record_wait(waited)
                    return lease
            except BaseException:
                # an interrupt during the pre-ping: nobody would ever check this lease in
                self._give_back(holder)
                raise
            # the healthy ones were never used: back as they were (a check-in would leave
            # them resetting with us as actor, a reset nobody here performs)
            self.transport.run(ops.ReturnUnhealthy(
                bad=bad, unused=[n for n in names if n not in bad], holder=holder,
                now=self.clock(),
            ))
            log.warning("pre-ping failed for %s; replacing and asking again", sorted(bad))
            front = True

    def _wait_for_grant(
        self,
        count: int,
        fresh: bool,
        test: str | None,
        wait: float,
        front: bool,
        since: float,
    ) -> tuple[list[str], Holder, dict[str, ops.MachineView]]:
        """Join the line (at ``since``) and wait up to ``wait`` seconds for the grant; returns
        it with what the caller needs of each machine (address, last health check)."""
        request_id = os.urandom(6).hex()
        if self._me.pid != os.getpid():
            self._me = current_process()
        holder = Holder(**self._me.model_dump(), worker=self.worker, test=test,
                        request=request_id, since=since)
        step = ops.CheckoutStep(
            request=Request(id=request_id, holder=holder, count=count, fresh=fresh, since=since),
            front=front, wait=wait, now=since,
        )
        try:
            reply = self.transport.run(step)
        except BaseException:
            # an interrupt, or a pool that could not be reached: leave the line, and give
            # back anything granted meanwhile
            self._give_back(holder)
            raise
        if reply.problem is not None:
            raise PoolUnavailable(reply.problem)
        if reply.granted is None:
            raise CheckoutTimeout(reply.timeout or f"check-out of {count} timed out")
        return reply.granted, holder, reply.machines

    def _give_back(self, holder: Holder) -> None:
        """Take ``holder``'s request out of the line and return what it was granted, unused."""
        with contextlib.suppress(StateError):
            self.transport.run(ops.Cancel(request=holder.request, holder=holder,
                                          now=self.clock()))

    def _needs_ping(self, views: dict[str, ops.MachineView], names: list[str]) -> list[str]:
        """Machines not known healthy within ``pre_ping_after`` seconds."""
        if self.pre_ping_after <= 0:
            return names
        now = self.clock()
        out = []
        for name in names:
            v = views.get(name)
            if v is None or v.checked_at is None or now - v.checked_at > self.pre_ping_after:
                out.append(name)
        return out

    def _ping(self, names: list[str]) -> dict[str, str]:
        bad = {}
        for name in names:
            try:
                res = self.backend.exec(name, ["true"], self.ping_timeout)
                if res.returncode != 0:
                    bad[name] = f"pre-ping exited {res.returncode}: {res.stderr.strip()}"
            except VmPoolError as exc:
                bad[name] = f"pre-ping failed: {exc}"
        return bad

    def _record_wait(self, waited: float) -> None:
        if self.wait_log is None:
            return
        with contextlib.suppress(OSError), open(self.wait_log, "a", opener=private_opener) as fh:
            fh.write(f"{self.clock():.3f} {waited:.6f} {self.worker}\n")

    def checkin(self, lease: Lease, *, failed: bool = False) -> dict[str, leases.Action]:
        """Return the machines: reuse, reset (here and now, or by the controller when the pool
        has a spare) or replace (the controller's job). Returns what was done with each.

        Always answered: a check-in the pool refuses raises StateError here, in the test that
        made it, rather than in a log line of the lease server.
        """
        # what this process keeps open to a machine (qemu's guest-agent connection) would
        # block its next holder
        for name in lease.names:
            try:
                self.backend.release(name)
            except VmPoolError as exc:
                log.warning("releasing %s: %s", name, exc)
        reply = self.transport.run(ops.CheckinStep(
            names=lease.names,
            holder=lease.holder,
            policy=self.policy,
            failed=failed,
            dirty=sorted(lease.dirty),
            now=self.clock(),
        ))
        for name in reply.mine:
            reset_machine(self.transport, self.backend, name, self.clock, self._me)
        return reply.actions


def reset_machine(
    transport: Transport, backend: Backend, name: str, clock: Callable[[], float],
    actor: ProcessRef | None = None,
) -> bool:
    """Restore a machine in state ``resetting`` to its snapshot and record the outcome.

    A failed reset turns into a replacement (the controller's job); returns True on success.
    ``actor``: this process, the reset's actor (a late outcome of another's changes nothing).
    """
    error = None
    address = None
    try:
        backend.reset(name)
        address = backend.address(name)  # a reset may change it (podman recreates)
    except VmPoolError as exc:
        error = str(exc)
        log.warning("reset of %s failed, it will be replaced: %s", name, exc)
    try:
        transport.run(ops.ResetDone(name=name, ok=error is None, error=error, address=address,
                                    actor=actor, now=clock()))
    except StateError as exc:
        log.warning("cannot record the reset of %s: %s", name, exc)
    return error is None
