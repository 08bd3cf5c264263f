"""The lease operations a client asks of its pool, as data that runs wherever the record lives.

``StateStore.run(op)`` applies an op to the pool record in one transaction: in this process under
the file lock, or in the controller's lease server (vmpool.server), which commits the ops of many
clients in one write. Either way the decisions are vmpool.leases'; an op only bundles the steps of
one round trip and says what goes back.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Annotated, Generic, Literal, TypeVar, cast

from pydantic import BaseModel, Field, TypeAdapter

from vmpool import leases
from vmpool.ownership import ProcessRef, hostname, is_alive
from vmpool.state import Holder, Machine, Pool, Request


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
    machines: dict[str, MachineView] = Field(default_factory=dict)


class CheckoutStep(BaseModel):
    """Join the line (first step) or look again (later steps); take the grant if served."""

    kind: Literal["checkout"] = "checkout"
    request: Request
    join: bool = True
    #: join at the head of the line (a request re-asked after a failed pre-ping)
    front: bool = False
    #: reclaim leases of dead processes first, under this policy
    reclaim: leases.Policy | None = None
    now: float

    def parse_reply(self, data: bytes) -> CheckoutReply:
        return CheckoutReply.model_validate_json(data)

    def apply(self, pool: Pool) -> CheckoutReply:
        granted, problem = self._outcome(pool)
        if granted is None:
            return CheckoutReply(problem=problem)
        return CheckoutReply(granted=[m.name for m in granted], machines=_views(granted))

    def apply_quietly(self, pool: Pool) -> None:
        """Apply it for a client that does not wait for the reply (none is built)."""
        self._outcome(pool)

    def apply_json(self, pool: Pool) -> bytes:
        """``apply(pool).model_dump_json()``, written straight from the outcome: the lease
        server answers every check-out, and building the reply's models to dump them cost
        it about 4 us of the 15 us a check-out takes it (warm; about twice that on a busy
        host). tests/unit/test_ops.py checks that both parse to the same reply."""
        granted, problem = self._outcome(pool)
        if granted is None:
            return f'{{"granted":null,"problem":{_j(problem)},"machines":{{}}}}'.encode()
        views = ",".join(
            f'{_str(m.name)}:{{"address":{_j(m.address)},"checked_at":{_number(m.checked_at)}}}'
            for m in granted
        )
        return (
            f'{{"granted":{_list([m.name for m in granted])},"problem":null,'
            f'"machines":{{{views}}}}}'
        ).encode()

    def _outcome(self, pool: Pool) -> tuple[list[Machine] | None, str | None]:
        """The machines granted (None while the request waits), or why none can be."""
        if self.reclaim is not None:
            leases.reclaim(pool, self.reclaim, is_alive, self.now)
        problem = leases.unavailable(pool, self.request.count, _alive_or_me)
        if problem is not None:
            return None, problem
        joining = self.join and not any(r.id == self.request.id for r in pool.queue)
        if joining and leases.nobody_waits(pool):
            # served at once or not at all: the line it would join and leave in this same
            # transaction is skipped (as is the copy of the request that joining needs)
            granted = leases.grant(pool, self.request, self.now)
            if granted is not None:
                return granted, None
        if joining:
            # a copy (the holder is frozen): the record must not share the op's mutable parts,
            # for the server may apply the op again (a batch is redone without an op that raised)
            request = self.request.model_copy(update={"granted": list(self.request.granted)})
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

    def apply_json(self, pool: Pool) -> bytes:
        """``apply(pool).model_dump_json()``, as the lease server sends it."""
        return self.apply(pool).model_dump_json().encode()

    def apply_quietly(self, pool: Pool) -> None:
        """Apply it for a client that does not wait for the reply (none is built)."""
        self._checkin(pool)

    def _checkin(self, pool: Pool) -> dict[str, leases.Action]:
        return leases.checkin(
            pool,
            self.names,
            self.holder,
            self.policy,
            failed=self.failed,
            dirty=set(self.dirty),
            now=self.now,
        )

    def apply(self, pool: Pool) -> CheckinReply:
        actions = self._checkin(pool)
        mine = []
        for name, action in actions.items():
            if action != "reset":
                continue
            actor = pool.machine(name).actor
            if actor and actor.same_process(self.holder):
                mine.append(name)
        return CheckinReply(actions=actions, mine=mine)


class _Effect(BaseModel):
    """An operation whose reply says only that it was applied."""

    def apply(self, pool: Pool) -> Applied:
        raise NotImplementedError

    def parse_reply(self, data: bytes) -> Applied:
        return Applied.model_validate_json(data)

    def apply_json(self, pool: Pool) -> bytes:
        return self.apply(pool).model_dump_json().encode()

    def apply_quietly(self, pool: Pool) -> None:
        self.apply(pool)


class ResetDone(_Effect):
    """Record the outcome of a reset this process did (vmpool.leases.finish_reset).

    Through the lease server, not a transaction of the caller's own: the record's owner holds
    its lock while it keeps it in memory, and handing the lock over costs a worker about 0.2 s
    per reset here, ten times a live podman reset."""

    kind: Literal["reset_done"] = "reset_done"
    name: str
    ok: bool
    error: str | None = None
    address: str | None = None
    now: float

    def apply(self, pool: Pool) -> Applied:
        leases.finish_reset(
            pool, self.name, ok=self.ok, error=self.error, now=self.now, address=self.address
        )
        return Applied()


class Applied(BaseModel):
    """The reply of an operation that returns nothing."""


class CancelReply(BaseModel):
    #: machines granted before the request left the line (the caller keeps them), if any
    granted: list[str] | None = None
    machines: dict[str, MachineView] = Field(default_factory=dict)
    #: with no grant and ``timed_out``: the pool's summary for the CheckoutTimeout
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

    def apply_json(self, pool: Pool) -> bytes:
        return self.apply(pool).model_dump_json().encode()

    def apply_quietly(self, pool: Pool) -> None:
        self.apply(pool)

    def apply(self, pool: Pool) -> CancelReply:
        granted = leases.cancel(pool, self.request)
        if not self.keep:
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


@functools.cache
def _here() -> tuple[int, str]:
    """(pid, host name) of this process, looked up once (every check-out asks _alive_or_me),
    and again in a forked child."""
    return os.getpid(), hostname()


os.register_at_fork(after_in_child=_here.cache_clear)


def _alive_or_me(ref: ProcessRef) -> bool:
    # the server runs in the owner's process: no need to ask the process table
    pid, host = _here()
    return (ref.pid == pid and ref.host == host) or is_alive(ref)


Step = CheckoutStep | CheckinStep | ResetDone | Cancel | ReturnUnhealthy
Op = Annotated[Step, Field(discriminator="kind")]
OP_ADAPTER: TypeAdapter[Step] = TypeAdapter(Op)


R = TypeVar("R", CheckoutReply, CheckinReply)
_POLICY_JSON: TypeAdapter[leases.Policy] = TypeAdapter(leases.Policy)


class Encoded(Generic[R]):
    """A lease operation made by an Encoder: its request line, and what its reply is.

    It is an Operation (vmpool.state) like the models: the store sends the line to the lease
    server, which parses it with OP_ADAPTER; without a server the store applies it here, parsed
    the same way.
    """

    __slots__ = ("_reply", "kind", "line")

    def __init__(self, kind: Literal["checkout", "checkin"], line: str, reply: type[R]) -> None:
        self.kind = kind
        self.line = line
        self._reply: type[R] = reply

    def model_dump_json(self) -> str:
        return self.line

    def decode(self) -> Step:
        """The operation as the lease server reads it."""
        return OP_ADAPTER.validate_json(self.line)

    def apply(self, pool: Pool) -> R:
        return cast(R, self.decode().apply(pool))

    def parse_reply(self, data: bytes) -> R:
        return self._reply.model_validate_json(data)

    def __repr__(self) -> str:
        return f"Encoded({self.line!r})"


_str = json.encoder.encode_basestring_ascii  # what json.dumps does with a str


def _j(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _list(values: Sequence[str]) -> str:
    return f"[{','.join(map(_str, values))}]"


def _number(value: float | None) -> str:
    """A float as pydantic dumps it by default: null when it is None, infinite or NaN."""
    return repr(value) if value is not None and math.isfinite(value) else "null"


class Encoder:
    """A client's check-out and check-in requests, encoded from templates.

    Every test makes one check-out and one check-in. Building their pydantic models and
    serialising them cost a worker about 50 us of CPU per cycle on a busy host (eight workers
    on two cores: caches are cold after every context switch); filling these templates costs a
    fraction of it (bench/README.md, "Check-out + check-in latency"). The models stay the
    protocol: the lease server parses every line with OP_ADAPTER, and tests/unit/test_ops.py
    checks that a line parses to the very operation the models build, for arbitrary values, and
    that the templates name every field of the models.
    """

    def __init__(self, policy: leases.Policy) -> None:
        self.policy = policy
        self._policy = _POLICY_JSON.dump_json(policy).decode()
        self._who: tuple[tuple[str, int, str | None, int | None, str], str] | None = None
        self._last: tuple[Holder | None, str] = (None, "")

    def holder(self, h: Holder) -> str:
        """A Holder's JSON (its process and worker part made once: they rarely change; the
        whole of it once for a check-out and its check-in, which name the same Holder)."""
        if h is self._last[0]:
            return self._last[1]
        key = (h.host, h.pid, h.boot_id, h.start_ticks, h.worker)
        if self._who is None or self._who[0] != key:
            ticks = "null" if h.start_ticks is None else str(int(h.start_ticks))
            self._who = (
                key,
                (
                    f'"host":{_j(h.host)},"pid":{int(h.pid)},"boot_id":{_j(h.boot_id)},'
                    f'"start_ticks":{ticks},"worker":{_j(h.worker)}'
                ),
            )
        out = (
            f'{{{self._who[1]},"test":{_j(h.test)},"since":{float(h.since)!r},'
            f'"request":{_j(h.request)}}}'
        )
        self._last = (h, out)  # a Holder is frozen
        return out

    def checkout(
        self,
        *,
        holder: Holder,
        count: int,
        fresh: bool,
        since: float,
        join: bool,
        front: bool = False,
        reclaim: bool = False,
        now: float,
    ) -> Encoded[CheckoutReply]:
        """A CheckoutStep for request ``holder.request``; ``reclaim`` asks for a reclaim under
        this encoder's policy."""
        return Encoded(
            "checkout",
            f'{{"kind":"checkout","request":{{"id":{_j(holder.request)},'
            f'"holder":{self.holder(holder)},"count":{int(count)},'
            f'"fresh":{_bool(fresh)},"since":{float(since)!r},"granted":[]}},'
            f'"join":{_bool(join)},"front":{_bool(front)},'
            f'"reclaim":{self._policy if reclaim else "null"},"now":{float(now)!r}}}',
            CheckoutReply,
        )

    def checkin(
        self,
        *,
        names: Sequence[str],
        holder: Holder,
        failed: bool,
        dirty: Sequence[str],
        now: float,
    ) -> Encoded[CheckinReply]:
        """A CheckinStep under this encoder's policy."""
        return Encoded(
            "checkin",
            f'{{"kind":"checkin","names":{_list(names)},'
            f'"holder":{self.holder(holder)},"policy":{self._policy},'
            f'"failed":{_bool(failed)},"dirty":{_list(dirty)},"now":{float(now)!r}}}',
            CheckinReply,
        )


def _bool(value: bool) -> str:
    return "true" if value else "false"
