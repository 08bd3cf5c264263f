"""The lease operations a client asks of its pool, as data that runs wherever the record lives.

Every change a client makes to a pool is one of these operations: applied to the record in one
transaction, it says what goes back. A transport (vmpool.transport) carries it to the record:
to the controller's lease server (vmpool.server) while the controller lives, else into a file
transaction here. The decisions are vmpool.leases'; an op only bundles the steps of one round
trip and says what goes back.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Literal, TypeGuard

from pydantic import BaseModel, Field, TypeAdapter

from vmpool import leases
from vmpool.ownership import ProcessRef, hostname, is_alive
from vmpool.state import Holder, Machine, MachineState, Pool, Request


class MachineView(BaseModel):
    """What a client needs of a granted machine: where it is, when it was last known healthy."""

    address: str | None = None
    checked_at: float | None = None


def views(pool: Pool, names: list[str]) -> dict[str, MachineView]:
    """What a client learns of the machines it was granted."""
    return _views([pool.machine(name) for name in names])


def _views(machines: list[Machine]) -> dict[str, MachineView]:
    return {m.name: MachineView(address=m.address, checked_at=m.checked_at) for m in machines}


class CheckoutReply(BaseModel):
    #: the machines granted (the request has left the line), or None while it waits
    granted: list[str] | None = None
    #: why the pool cannot serve this request at all (the request is not in the line)
    problem: str | None = None
    #: the request waited its ``wait`` out and left the line: the pool's summary, for the
    #: CheckoutTimeout
    timeout: str | None = None
    machines: dict[str, MachineView] = Field(default_factory=dict)

    @property
    def final(self) -> bool:
        """Whether the request is done with: granted, refused or timed out."""
        return self.granted is not None or self.problem is not None or self.timeout is not None


class CheckoutStep(BaseModel):
    """Join the line (``join``) or look again; take the grant if served.

    ``wait``: how long the request may wait in line. The lease server answers it only once it
    is granted, refused or out of time (it owns the line); without a server the caller's
    transport looks again until then (vmpool.transport.FileTransport)."""

    kind: Literal["checkout"] = "checkout"
    request: Request
    join: bool = True
    #: join at the head of the line (a request re-asked after a failed pre-ping)
    front: bool = False
    #: reclaim leases of dead processes first, under this policy (a client without a server)
    reclaim: leases.Policy | None = None
    wait: float = 0.0
    now: float

    def parse_reply(self, data: bytes) -> CheckoutReply:
        return CheckoutReply.model_validate_json(data)

    def apply(self, pool: Pool) -> CheckoutReply:
        granted, problem = self._outcome(pool)
        if granted is None:
            return CheckoutReply(problem=problem)
        return CheckoutReply(granted=[m.name for m in granted], machines=_views(granted))

    def look(self, now: float, *, reclaim: leases.Policy | None = None) -> CheckoutStep:
        """This request looked at again at ``now`` (it is in the line already)."""
        return self.model_copy(update={"join": False, "front": False, "now": now,
                                       "reclaim": reclaim})

    def expire(self, pool: Pool, waited: float, now: float) -> CheckoutReply:
        """The request's wait is over: it leaves the line. A grant that came meanwhile is
        still the caller's; otherwise the reply says why nothing was free."""
        ended = Cancel(request=self.request.id, holder=self.request.holder, keep=True,
                       waited=waited, count=self.request.count, now=now).apply(pool)
        if ended.granted is not None:
            return CheckoutReply(granted=ended.granted, machines=ended.machines)
        return CheckoutReply(timeout=ended.timeout or f"check-out of {self.request.count} "
                             "timed out")

    def _outcome(self, pool: Pool) -> tuple[list[Machine] | None, str | None]:
        """The machines granted (None while the request waits), or why none can be."""
        if self.reclaim is not None:
            leases.reclaim(pool, self.reclaim, is_alive, self.now)
        problem = leases.unavailable(pool, self.request.count, _alive_or_me)
        if problem is not None:
            # out of the line, and whatever it was granted goes back as it was
            leases.return_unused(pool, leases.cancel(pool, self.request.id), self.request.holder)
            return None, problem
        joining = self.join and not any(r.id == self.request.id for r in pool.queue)
        if joining:
            # the same request again (its reply was lost: a shared store's connection broke
            # after the commit): its grant, not more machines
            rid = self.request.id
            held = [m for m in pool.machines
                    if m.holder is not None and m.holder.request == rid
                    and m.state is leases.LEASED]
            if held:
                return held, None
        if joining and leases.nobody_waits(pool):
            # nobody ahead: served at once, or it joins the line
            granted = leases.grant(pool, self.request, self.now)
            if granted is not None:
                return granted, None
        if joining:
            # a copy: the record must not share the op's mutable parts (the holder is frozen)
            request = self.request.model_copy(update={"granted": []})
            leases.enqueue(pool, request, front=self.front)
        leases.serve_queue(pool, self.now)
        try:
            names = leases.take_grant(pool, self.request.id)
        except LookupError:
            return None, (
                f"pool {pool.id}: check-out request {self.request.id} vanished "
                "(the controller dropped it: is the pool shutting down?)"
            )
        return (None if names is None else [pool.machine(n) for n in names]), None


class CheckinReply(BaseModel):
    actions: dict[str, leases.Action] = Field(default_factory=dict)
    #: machines whose reset falls to the caller (no spare: the controller will not do it)
    mine: list[str] = Field(default_factory=list)


class CheckinStep(BaseModel):
    """Return leased machines under the pool's policy (vmpool.leases.checkin)."""

    kind: Literal["checkin"] = "checkin"
    names: list[str]
    holder: Holder
    policy: leases.Policy
    failed: bool = False
    dirty: list[str] = Field(default_factory=list)
    now: float

    def parse_reply(self, data: bytes) -> CheckinReply:
        return CheckinReply.model_validate_json(data)

    def apply(self, pool: Pool) -> CheckinReply:
        actions = leases.checkin(
            pool, self.names, self.holder, self.policy,
            failed=self.failed, dirty=set(self.dirty), now=self.now,
        )
        mine = []
        for name in self.names:
            m = pool.find(name)
            if m is None or m.state is not MachineState.RESETTING:
                continue
            if m.actor is not None and m.actor.same_process(self.holder):
                # ours to do: returned now, or by this check-in sent before (its reply lost)
                actions.setdefault(name, "reset")
                mine.append(name)
        return CheckinReply(actions=actions, mine=mine)


class Applied(BaseModel):
    """The reply of an operation that returns nothing."""


class _Effect(BaseModel):
    """An operation whose reply says only that it was applied."""

    def apply(self, pool: Pool) -> Applied:
        raise NotImplementedError

    def parse_reply(self, data: bytes) -> Applied:
        return Applied.model_validate_json(data)


class ResetDone(_Effect):
    """Record the outcome of a reset this process did (vmpool.leases.finish_reset)."""

    kind: Literal["reset_done"] = "reset_done"
    name: str
    ok: bool
    error: str | None = None
    address: str | None = None
    #: the process that reset it: a machine another process resets now is not its to finish
    #: (its outcome came late, e.g. retried after a lost reply)
    actor: ProcessRef | None = None
    now: float

    def apply(self, pool: Pool) -> Applied:
        leases.finish_reset(
            pool, self.name, ok=self.ok, error=self.error, now=self.now, address=self.address,
            actor=self.actor,
        )
        return Applied()


class CancelReply(BaseModel):
    #: machines granted before the request left the line (the caller keeps them), if any
    granted: list[str] | None = None
    machines: dict[str, MachineView] = Field(default_factory=dict)
    #: with no grant and ``keep``: the pool's summary for the CheckoutTimeout
    timeout: str | None = None


class Cancel(BaseModel):
    """Leave the line (vmpool.leases.cancel). ``keep``: a grant that came meanwhile is the
    caller's (a check-out at its deadline); otherwise it goes back unused (an interrupt)."""

    kind: Literal["cancel"] = "cancel"
    request: str
    holder: Holder
    keep: bool = False
    #: how long the request waited and for how many machines (for the timeout's message)
    waited: float = 0.0
    count: int = 1
    now: float

    def parse_reply(self, data: bytes) -> CancelReply:
        return CancelReply.model_validate_json(data)

    def apply(self, pool: Pool) -> CancelReply:
        granted = leases.cancel(pool, self.request)
        if not self.keep:
            # and a grant whose reply the caller never read (it was interrupted meanwhile)
            granted += [
                m.name for m in pool.machines
                if m.state is MachineState.LEASED and m.holder is not None
                and m.holder.request == self.request and m.name not in granted
            ]
            leases.return_unused(pool, granted, self.holder)
            return CancelReply()
        if granted:
            return CancelReply(granted=granted, machines=views(pool, granted))
        late = leases.timeout_error(pool, self.waited, self.count, self.now)
        return CancelReply(timeout=str(late))


class ReturnUnhealthy(_Effect):
    """A check-out whose pre-ping failed: the ``bad`` machines are replaced
    (vmpool.leases.mark_unhealthy), the others go back unused, as they were."""

    kind: Literal["return_unhealthy"] = "return_unhealthy"
    bad: dict[str, str]
    unused: list[str]
    holder: Holder
    now: float

    def apply(self, pool: Pool) -> Applied:
        for name, error in self.bad.items():
            leases.mark_unhealthy(pool, name, error, self.now)
        leases.return_unused(pool, self.unused, self.holder)
        return Applied()


class StatusReply(BaseModel):
    pool: Pool


class Status(BaseModel):
    """The record as of now (``vmpool status`` asks the live server, not the lagging file)."""

    kind: Literal["status"] = "status"

    def parse_reply(self, data: bytes) -> StatusReply:
        return StatusReply.model_validate_json(data)

    def apply(self, pool: Pool) -> StatusReply:
        return StatusReply(pool=pool.model_copy(deep=True))


def must_wait(op: object, reply: object) -> TypeGuard[CheckoutStep]:
    """Whether ``op`` is a check-out that waits in line (``wait``) and ``reply`` left it there:
    a transport without a server then looks again until it is final."""
    return (
        isinstance(op, CheckoutStep)
        and isinstance(reply, CheckoutReply)
        and not reply.final
        and op.wait > 0
    )


def holder_of(op: Step) -> Holder | None:
    """The process an operation speaks for, if any (the server ties it to the connection)."""
    if isinstance(op, CheckoutStep):
        return op.request.holder
    if isinstance(op, (CheckinStep, Cancel, ReturnUnhealthy)):
        return op.holder
    return None


@functools.cache
def _here() -> tuple[int, str]:
    """(pid, host name) of this process, looked up once, and again in a forked child."""
    return os.getpid(), hostname()


os.register_at_fork(after_in_child=_here.cache_clear)


def _alive_or_me(ref: ProcessRef) -> bool:
    # the server runs in the owner's process: no need to ask the process table
    pid, host = _here()
    return (ref.pid == pid and ref.host == host) or is_alive(ref)


Step = CheckoutStep | CheckinStep | ResetDone | Cancel | ReturnUnhealthy | Status
Op = Annotated[Step, Field(discriminator="kind")]
OP_ADAPTER: TypeAdapter[Step] = TypeAdapter(Op)
