"""The lease protocol as pure decisions on a Pool record (no I/O, no clock of its own).

Every function here mutates the ``Pool`` it is given and is meant to run inside
``store.transaction()``; the caller does the slow work (backend calls) outside the lock.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vmpool.errors import CheckoutTimeout
from vmpool.ownership import ProcessRef
from vmpool.state import Holder, Machine, MachineState, Pool, Request

Action = Literal["reuse", "reset", "replace"]
Alive = Callable[[ProcessRef], bool]
_ORDER: dict[str, int] = {"reuse": 0, "reset": 1, "replace": 2}


@dataclass(frozen=True)
class Policy:
    """The check-in rules of one pool."""

    checkin: Action = "reset"
    failure: Action = "replace"
    max_uses: int | None = None
    max_age: float | None = None
    #: the backend restores snapshots; without it a reset becomes a replace
    can_reset: bool = True

    def may_reset(self, *, failed: bool, dirty: bool) -> bool:
        """Whether a check-in with this outcome can end in a reset (decide() can only make
        it a replacement beyond that)."""
        return self.asked(failed=failed, dirty=dirty) == "reset" and self.can_reset

    def asked(self, *, failed: bool, dirty: bool) -> Action:
        """What the policy asks for a machine back from a test, before max_uses and max_age."""
        action: Action = self.failure if failed else self.checkin
        return _worst(action, "reset") if dirty else action

    @property
    def needs_snapshot(self) -> bool:
        """Whether a machine can ever be reset: not when every check-in replaces it."""
        return self.can_reset and (self.checkin != "replace" or self.failure != "replace")


#: the states as module names: a member looked up on its enum class costs ~0.2 us on
#: Python 3.11 (EnumType.__getattr__), and the lease decisions test every machine of the pool
READY, LEASED, BROKEN = MachineState.READY, MachineState.LEASED, MachineState.BROKEN
RESETTING, REPLACING = MachineState.RESETTING, MachineState.REPLACING
_USABLE = frozenset({READY, LEASED})


def _worst(a: Action, b: Action) -> Action:
    return a if _ORDER[a] >= _ORDER[b] else b


# -- check-out ---------------------------------------------------------------------------------
def enqueue(pool: Pool, request: Request, *, front: bool = False) -> None:
    """Join the line. ``front`` is for a request re-queued after a failed pre-ping."""
    if front:
        pool.queue.insert(0, request)
    else:
        pool.queue.append(request)


def free_machines(pool: Pool, fresh: bool) -> list[Machine]:
    # a stale machine (made under another config, e.g. in an adopted pool) waits for plan()
    # to replace it: no test may run on it meanwhile
    size, config_hash = pool.size, pool.config_hash
    return [
        m
        for m in pool.machines
        if m.holder is None
        and m.state is READY
        and m.slot < size
        and m.config_hash == config_hash
        and (not fresh or m.uses_since_reset == 0)
    ]


_WEAR = operator.attrgetter("uses_since_reset", "slot")


def _choose(free: list[Machine], count: int) -> list[Machine]:
    """Prefer machines used least since their reset, then the oldest slot: spreads wear."""
    return heapq.nsmallest(count, free, key=_WEAR)


def serve_queue(pool: Pool, now: float) -> None:
    """Grant machines to waiting requests strictly in arrival order, all-or-nothing per request.

    A request for N machines is granted all N in this one transaction or nothing; nobody behind
    it is served first, so a large request is never starved by a stream of small ones.
    """
    for req in pool.queue:
        if req.granted:
            continue
        granted = grant(pool, req, now)
        if granted is None:
            return
        req.granted = [m.name for m in granted]


def nobody_waits(pool: Pool) -> bool:
    """Whether every request in the line has been granted (a newcomer would be served next)."""
    return all(req.granted for req in pool.queue)


def grant(pool: Pool, req: Request, now: float) -> list[Machine] | None:
    """Lease ``req.count`` free machines to ``req.holder`` now, all or none; the machines, or
    None when too few are free. Does not touch the line: serve_queue() calls it for the head
    of the line, and a check-out with nobody ahead of it may call it without queueing."""
    free = free_machines(pool, req.fresh)
    if len(free) < req.count:
        return None
    chosen = _choose(free, req.count)
    # the holder as it leases now (frozen, so shared when the client sent it so already)
    held = req.holder if req.holder.since == now else req.holder.model_copy(update={"since": now})
    for m in chosen:
        m.state = LEASED
        m.holder = held
        m.uses += 1
        m.uses_since_reset += 1
        m.generation += 1
    pool.stats.checkouts += req.count
    return chosen


def take_grant(pool: Pool, request_id: str) -> list[str] | None:
    """The machines granted to ``request_id`` (and it leaves the line), or None if waiting."""
    for i, req in enumerate(pool.queue):
        if req.id == request_id:
            if not req.granted:
                return None
            del pool.queue[i]
            return list(req.granted)
    raise LookupError(request_id)


def cancel(pool: Pool, request_id: str) -> list[str]:
    """Leave the line; returns machines that were granted meanwhile (the caller keeps them)."""
    for i, req in enumerate(pool.queue):
        if req.id == request_id:
            del pool.queue[i]
            return list(req.granted)
    return []


def _ungrant(pool: Pool, m: Machine) -> None:
    """Undo a grant that was never used by a test: the machine is as it was before."""
    m.holder = None
    m.state = READY
    m.uses -= 1
    m.uses_since_reset -= 1
    pool.stats.checkouts -= 1


def drop_dead_waiters(pool: Pool, alive: Alive) -> int:
    """Requests whose process died leave the line; their grants go back to the pool."""
    dead = [r for r in pool.queue if not alive(r.holder)]
    for req in dead:
        pool.queue.remove(req)
        for name in req.granted:
            m = pool.find(name)
            if m is not None and m.holder is not None and m.holder.request == req.id:
                _ungrant(pool, m)
    return len(dead)


def return_unused(pool: Pool, names: list[str], holder: ProcessRef) -> None:
    """Give back machines granted to ``holder`` that no test has used (e.g. the healthy part
    of a check-out whose pre-ping failed): they are ready again, not reset or replaced."""
    for name in names:
        m = pool.find(name)
        if (
            m is not None
            and m.state is LEASED
            and m.holder is not None
            and m.holder.same_process(holder)
        ):
            _ungrant(pool, m)


def unavailable(pool: Pool, count: int, alive: Alive | None = None) -> str | None:
    """Why ``pool`` cannot serve ``count`` machines at all: closing, its controller's error
    (Pool.error), too small, all broken, or
    (given ``alive``) its controller is dead: its last grants may never have reached the file
    (vmpool.writeback), so nothing more is granted from it."""
    if pool.closing:
        return f"pool {pool.id} is shutting down"
    if pool.error is not None:
        return f"pool {pool.id}: its controller failed: {pool.error}"
    if alive is not None and not pool.durable and pool.owner is not None and not alive(pool.owner):
        return (
            f"pool {pool.id}: its controller (pid {pool.owner.pid} on {pool.owner.host}) is "
            "gone, so it grants no more machines; `vmpool gc` or the next session reaps it"
        )
    if count > pool.size:
        return f"asked for {count} machines but pool {pool.id} has only {pool.size}"
    if all_broken(pool):
        return no_machine_problem(pool)
    return None


def no_machine_problem(pool: Pool) -> str:
    """Why a pool whose every machine is broken serves nothing, ending with what to run."""
    errors = [m.error for m in pool.machines if m.error]
    last = (errors[-1] if errors else "unknown").rstrip(". ")
    return (
        f"pool {pool.id} ({pool.backend}): no machine could be made; last error: {last}. "
        f"Run `vmpool doctor --backend {pool.backend}` to check what this host lacks"
    )


def timeout_error(pool: Pool, waited: float, count: int, now: float) -> CheckoutTimeout:
    """The standard CheckoutTimeout: pool size, leased/warming/broken counts and the holders."""
    by_state: dict[MachineState, list[Machine]] = {}
    for m in pool.machines:
        by_state.setdefault(m.state, []).append(m)
    leased = by_state.get(LEASED, [])
    warming = sum(
        len(by_state.get(s, []))
        for s in (MachineState.CREATING, MachineState.STARTING, RESETTING)
    )
    broken = by_state.get(BROKEN, [])
    holders = "; ".join(
        f"{m.name} held by {m.holder.worker} (pid {m.holder.pid}) for "
        f"{m.holder.test or '?'} since {now - m.holder.since:.0f}s"
        for m in leased
        if m.holder is not None
    )
    msg = (
        f"no machine free after {waited:.1f}s (wanted {count}) in pool {pool.id} "
        f"({pool.backend}): size {pool.size}, {len(leased)} leased, {warming} warming, "
        f"{len(broken)} broken, {len(pool.queue)} request(s) waiting"
    )
    if holders:
        msg += f"; holders: {holders}"
    if broken:
        msg += f"; last error: {broken[-1].error}"
    msg += ". Raise --vm-checkout-timeout or --vm-pool-size, or look for a test that hangs."
    return CheckoutTimeout(msg)


# -- check-in ----------------------------------------------------------------------------------
def decide(machine: Machine, policy: Policy, *, failed: bool, dirty: bool, now: float) -> Action:
    """What to do with a machine coming back from a test."""
    action = policy.asked(failed=failed, dirty=dirty)
    if policy.max_uses is not None and machine.uses >= policy.max_uses:
        action = "replace"
    if policy.max_age is not None and now - machine.created_at >= policy.max_age:
        action = "replace"
    if action == "reset" and not policy.can_reset:
        action = "replace"
    return action


def _same_lease(held: Holder, holder: ProcessRef) -> bool:
    """Whether ``holder`` returns the lease ``held`` records (its request id, when it says)."""
    return not isinstance(holder, Holder) or not holder.request or holder.request == held.request


def _release(machine: Machine, action: Action, actor: ProcessRef | None) -> None:
    machine.holder = None
    if action == "reuse":
        machine.state = READY
    elif action == "reset":
        machine.state = RESETTING
        machine.actor = actor
    else:
        machine.state = REPLACING
        machine.actor = None


def checkin(
    pool: Pool,
    names: list[str],
    holder: ProcessRef,
    policy: Policy,
    *,
    failed: bool,
    dirty: set[str] | None = None,
    now: float,
) -> dict[str, Action]:
    """Return leased machines. A replacement is left to the controller (state replacing, no
    actor). A reset is left to ``holder`` (state resetting, actor=holder), who does it now,
    unless the pool has a spare ready machine and nobody waits: then the controller resets in
    the background (no actor) and the holder's next check-out is served from the spare."""
    returned: list[tuple[Machine, Action]] = []
    for name in names:
        m = pool.find(name)
        if m is None or m.state is not LEASED or m.holder is None:
            continue  # reclaimed meanwhile: nothing of ours to return
        if not m.holder.same_process(holder) or not _same_lease(m.holder, holder):
            continue  # another lease's now (this one was reclaimed and granted again)
        dirtied = name in (dirty or set())
        # a pool being destroyed deletes what comes back: no reset or replacement first
        action = (
            "reuse" if pool.closing else decide(m, policy, failed=failed, dirty=dirtied, now=now)
        )
        returned.append((m, action))
    # a spare is a machine other than those returned here; the scan is made only when a reset
    # asks for it (the common reuse check-in skips it)
    background = (
        any(action == "reset" for _, action in returned)
        and pool.owner is not None  # a controller runs to do it (a kept, idle pool has none)
        and bool(free_machines(pool, False))
        and nobody_waits(pool)
    )
    out: dict[str, Action] = {}
    for m, action in returned:
        _release(m, action, None if background else holder)
        if action == "reuse" and not failed:
            m.checked_at = now
        out[m.name] = action
    serve_queue(pool, now)
    return out


def finish_reset(
    pool: Pool,
    name: str,
    *,
    ok: bool,
    error: str | None,
    now: float,
    address: str | None = None,
    actor: ProcessRef | None = None,
) -> None:
    """Record the outcome of a reset (and the address, which a reset may change); a failed
    one becomes a replacement. Given its ``actor``, nothing changes unless that process is
    the machine's actor now (fencing a late outcome)."""
    m = pool.find(name)
    if m is None or m.state is not RESETTING:
        return
    if actor is not None and m.actor is not None and not m.actor.same_process(actor):
        return
    m.actor = None
    if ok:
        m.state = READY
        m.uses_since_reset = 0
        m.error = None
        m.checked_at = now
        if address is not None:
            m.address = address
        pool.stats.reset += 1
    else:
        m.state = REPLACING
        m.error = error
    serve_queue(pool, now)


def mark_unhealthy(pool: Pool, name: str, error: str, now: float) -> None:
    """A leased machine failed its pre-ping: it is replaced."""
    m = pool.find(name)
    if m is None:
        return
    m.holder = None
    m.state = REPLACING
    m.actor = None
    m.error = error
    serve_queue(pool, now)


# -- reclaim and maintenance (controller) ------------------------------------------------------
def reclaim(pool: Pool, policy: Policy, alive: Alive, now: float) -> list[str]:
    """Leases and transitions whose process died are taken back.

    A dead holder's machine gets the failure policy (never simply reused: the test died in it);
    a dead actor's half-done transition becomes a replacement.
    """
    out = []
    drop_dead_waiters(pool, alive)
    for m in pool.machines:
        if m.state is LEASED and m.holder is not None and not alive(m.holder):
            action = decide(m, policy, failed=True, dirty=True, now=now)
            _release(m, action, None)
            pool.stats.reclaimed += 1
            out.append(m.name)
        elif (
            m.state in (MachineState.CREATING, MachineState.STARTING, RESETTING)
            and m.actor is not None
            and not alive(m.actor)
        ):
            m.state = REPLACING
            m.actor = None
            pool.stats.reclaimed += 1
            out.append(m.name)
    if out:
        serve_queue(pool, now)
    return out


def all_broken(pool: Pool) -> bool:
    if pool.size <= 0 or any(m.state in _USABLE for m in pool.machines):
        return False  # the usual answer, without counting (on every check-out)
    broken = sum(1 for m in pool.machines if m.state is BROKEN and m.slot < pool.size)
    return broken >= pool.size


def counts(pool: Pool) -> dict[str, int]:
    out: dict[str, int] = {s.value: 0 for s in MachineState}
    for m in pool.machines:
        out[m.state.value] += 1
    return out
