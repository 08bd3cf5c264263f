"""Check-out and check-in from any process (an xdist worker, the CLI, a library user).

``PoolClient`` drives the lease protocol against a StateStore; ``VM`` is the handle a test gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

from vmpool import leases, ops
from vmpool.backends.base import Backend, ExecResult
from vmpool.errors import CommandFailed, PoolUnavailable, StateError, VmPoolError
from vmpool.ownership import current_process
from vmpool.state import Holder, StateStore

log = logging.getLogger(__name__)

_FIRST_POLL = 0.002
_MAX_POLL = 0.1
_RECLAIM_EVERY = 1.0


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
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        result = self.backend.exec(self.name, argv, timeout)
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
        return result

    def mark_dirty(self) -> None:
        """Force a reset (or the stronger policy) when this machine is checked in."""
        self._dirty.add(self.name)

    def __repr__(self) -> str:
        return f"VM({self.name!r}, backend={self.backend.name!r}, address={self.address!r})"


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


class PoolClient:
    """Check machines out of one pool and back in."""

    def __init__(
        self,
        store: StateStore,
        backend: Backend,
        policy: leases.Policy,
        *,
        worker: str = "main",
        pre_ping: bool = True,
        pre_ping_after: float = 0.0,
        ping_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
        wait_log: os.PathLike[str] | str | None = None,
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
        self._me = current_process()
        self._base: Holder | None = None  # this process as holder, for self.worker
        self._encoder: ops.Encoder | None = None  # requests under self.policy

    def _holder(self, test: str | None, request_id: str, since: float) -> Holder:
        """This process as the holder of request ``request_id``, made at ``since`` (the lease
        server records it as is when it grants the request at once, as most are)."""
        base = self._base
        if base is None or base.worker != self.worker:
            base = self._base = Holder(**self._me.model_dump(), worker=self.worker)
        return base.model_copy(update={"test": test, "request": request_id, "since": since})

    def _lines(self) -> ops.Encoder:
        """How this client's requests are encoded (vmpool.ops.Encoder), under its policy."""
        encoder = self._encoder
        if encoder is None or (encoder.policy is not self.policy and encoder.policy != self.policy):
            encoder = self._encoder = ops.Encoder(self.policy)
        return encoder

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
        deadline = started + timeout
        front = False
        while True:
            names, request_id, holder, views = self._wait_for_grant(
                count, fresh, test, deadline, front, self.clock() if front else started
            )
            addresses = {n: views[n].address if n in views else None for n in names}
            bad = self._ping(self._needs_ping(views, names)) if self.pre_ping else {}
            if not bad:
                waited = self.clock() - started
                lease = Lease(request_id, names, addresses, holder, waited)
                lease.vms = [VM(n, self.backend, addresses[n], lease) for n in names]
                self._record_wait(waited)
                return lease
            with self.store.transaction() as pool:
                now = self.clock()
                for name in bad:
                    leases.mark_unhealthy(pool, name, bad[name], now)
                # the healthy ones were never used: back as they were (a check-in would leave
                # them resetting with us as actor, a reset nobody here performs)
                leases.return_unused(pool, [n for n in names if n not in bad], holder)
            log.warning("pre-ping failed for %s; replacing and asking again", sorted(bad))
            front = True

    def _wait_for_grant(
        self,
        count: int,
        fresh: bool,
        test: str | None,
        deadline: float,
        front: bool,
        since: float,
    ) -> tuple[list[str], str, Holder, dict[str, ops.MachineView]]:
        """Join the line (at ``since``) and wait; returns the grant with what the caller needs
        of each machine (address, last health check) as of the grant, so it needs no extra
        read."""
        request_id = os.urandom(6).hex()
        holder = self._holder(test, request_id, since)
        # Errors are raised after a transaction, never inside it: an exception inside one
        # discards its changes, and a cancel that is not written leaves a ghost request at the
        # head of the line that is granted machines nobody takes.
        encode = self._lines().checkout

        def ask(*, join: bool, now: float, reclaim: bool = False) -> ops.Encoded[ops.CheckoutReply]:
            return encode(
                holder=holder,
                count=count,
                fresh=fresh,
                since=since,
                join=join,
                front=front and join,
                reclaim=reclaim,
                now=now,
            )

        reply = self.store.run(ask(join=True, now=since))
        if reply.problem is not None:
            raise PoolUnavailable(reply.problem)
        interval = _FIRST_POLL
        last_reclaim = since  # no clock read for the check-out served at once
        try:
            while reply.granted is None:
                now = self.clock()
                if now >= deadline:
                    late = None
                    with self.store.transaction() as pool:
                        granted = leases.cancel(pool, request_id) or None
                        if granted is None:
                            late = leases.timeout_error(pool, now - since, count, now)
                        else:
                            reply = ops.CheckoutReply(
                                granted=granted, machines=ops.views(pool, granted)
                            )
                    if late is not None:
                        raise late
                    break
                time.sleep(min(interval, max(deadline - now, 0)))
                interval = min(interval * 2, _MAX_POLL)
                reclaim = self.clock() - last_reclaim >= _RECLAIM_EVERY
                reply = self.store.run(ask(join=False, reclaim=reclaim, now=self.clock()))
                if reclaim:
                    last_reclaim = self.clock()
                if reply.problem is not None:
                    raise PoolUnavailable(reply.problem)
        except BaseException:
            # timeout, unusable pool, or an interrupt while waiting: leave the line, and give
            # back anything granted meanwhile
            with contextlib.suppress(StateError), self.store.transaction() as pool:
                leases.return_unused(pool, leases.cancel(pool, request_id), holder)
            raise
        assert reply.granted is not None  # the loop only ends with a grant
        return reply.granted, request_id, holder, reply.machines

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
        with contextlib.suppress(OSError), open(self.wait_log, "a") as fh:
            fh.write(f"{self.clock():.3f} {waited:.6f} {self.worker}\n")

    @overload
    def checkin(
        self, lease: Lease, *, failed: bool = False, wait: Literal[True] = True
    ) -> dict[str, leases.Action]: ...

    @overload
    def checkin(
        self, lease: Lease, *, failed: bool = False, wait: bool
    ) -> dict[str, leases.Action] | None: ...

    def checkin(
        self, lease: Lease, *, failed: bool = False, wait: bool = True
    ) -> dict[str, leases.Action] | None:
        """Return the machines: reuse, reset (here and now, or by the controller when the pool
        has a spare) or replace (the controller's job). Returns what was done with each.

        ``wait=False`` does not wait for the pool's answer when none of it can fall to this
        process (the policy cannot ask for a reset: a reuse, or a replacement, which is the
        controller's job) and returns None: the lease server applies the check-in before this
        process's next operation. Otherwise it waits as usual.
        """
        # what this process keeps open to a machine (qemu's guest-agent connection) would
        # block its next holder
        release = getattr(self.backend, "release", None)
        if release is not None:
            for name in lease.names:
                try:
                    release(name)
                except VmPoolError as exc:
                    log.warning("releasing %s: %s", name, exc)
        step = self._lines().checkin(
            names=lease.names,
            holder=lease.holder,
            failed=failed,
            dirty=sorted(lease.dirty) if lease.dirty else [],
            now=self.clock(),
        )
        if not wait and not self.policy.may_reset(failed=failed, dirty=bool(lease.dirty)):
            self.store.post(step)
            return None
        reply = self.store.run(step)
        actions, mine = reply.actions, reply.mine
        for name in mine:
            reset_machine(self.store, self.backend, name, self.clock)
        return actions


def reset_machine(
    store: StateStore, backend: Backend, name: str, clock: Callable[[], float]
) -> bool:
    """Restore a machine in state ``resetting`` to its snapshot and record the outcome.

    A failed reset turns into a replacement (the controller's job); returns True on success.
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
        store.run(
            ops.ResetDoneStep(
                name=name, ok=error is None, error=error, address=address, now=clock()
            )
        )
    except StateError as exc:
        log.warning("cannot record the reset of %s: %s", name, exc)
    return error is None
