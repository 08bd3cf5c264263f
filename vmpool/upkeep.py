"""The controller's upkeep as pure decisions on a Pool record: what to create, reset, replace
or retire next (``plan``), and the outcomes of that work. Like vmpool.leases, no I/O and no
clock of its own; the controller does the slow work outside the lock."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from vmpool import leases
from vmpool.ownership import ProcessRef
from vmpool.state import Machine, MachineState, Pool, SlotFailure

#: states in which a machine still occupies its slot
_OCCUPYING = {
    MachineState.CREATING,
    MachineState.STARTING,
    MachineState.READY,
    MachineState.LEASED,
    MachineState.RESETTING,
    MachineState.BROKEN,
}


@dataclass(frozen=True)
class Work:
    """Slow work the controller must do outside the lock."""

    kind: Literal["create", "reset", "replace", "retire"]
    name: str

    @property
    def deletes(self) -> bool:
        """Whether this work deletes its machine (it runs on the deletion budget, see plan)."""
        return self.kind in ("replace", "retire")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base * 2**(attempt-1), capped, times U(0.5, 1)."""
    delay: float = min(cap, base * (2 ** max(attempt - 1, 0))) * rng.uniform(0.5, 1.0)
    return delay


def plan(
    pool: Pool,
    policy: leases.Policy,
    me: ProcessRef,
    now: float,
    *,
    capacity: int,
    name_for: Callable[[int], str],
    delete_capacity: int | None = None,
) -> list[Work]:
    """Claim work for the controller ``me``: up to ``capacity`` creates and resets, and up to
    ``delete_capacity`` deletions (replace, retire) besides; None: deletions share ``capacity``.

    With a budget of their own, the deletions of replaced machines never hold back the creation
    of their successors, which are what waiting check-outs need (the slot of a machine being
    replaced is free at once)."""
    work: list[Work] = []
    deletes: list[Work] = []
    shared = delete_capacity is None

    def full(item: Work) -> bool:
        if item.deletes and not shared:
            return len(deletes) >= (delete_capacity or 0)
        return len(work) + (len(deletes) if shared else 0) >= capacity

    def claim(m: Machine, kind: Literal["reset", "replace", "retire"]) -> bool:
        item = Work(kind, m.name)
        if full(item):
            return False
        m.actor = me
        (deletes if item.deletes else work).append(item)
        return True

    max_age = policy.max_age
    for m in pool.machines:
        if m.actor is not None:
            continue
        if m.state is MachineState.REPLACING:
            claim(m, "replace")
        elif m.state is MachineState.RESETTING:
            claim(m, "reset")
        elif m.state is MachineState.READY and m.holder is None:
            kind: Literal["retire", "replace"]
            if m.slot >= pool.size:
                kind = "retire"
            elif m.config_hash != pool.config_hash or (
                max_age is not None and now - m.created_at >= max_age
            ):
                kind = "replace"
            else:
                continue
            if claim(m, kind):
                m.state = MachineState.REPLACING

    # a fresh request at the head of the line: reset used machines for it
    head = next((r for r in pool.queue if not r.granted), None)
    if head is not None and head.fresh:
        fresh = len(leases.free_machines(pool, True))
        for m in leases.free_machines(pool, False):
            if fresh >= head.count:
                break
            if m.uses_since_reset > 0:
                again: Literal["reset", "replace"] = "reset" if policy.can_reset else "replace"
                if not claim(m, again):
                    break
                m.state = MachineState.RESETTING if again == "reset" else MachineState.REPLACING
                fresh += 1

    if pool.closing:
        return deletes + work
    occupied = {m.slot for m in pool.machines if m.state in _OCCUPYING}
    create = Work("create", "")  # what full() weighs a creation as
    for slot in range(pool.size):
        if slot in occupied:  # first: the usual answer, and cheaper than full() (every tick)
            continue
        if full(create):
            break
        failure = pool.failures.get(slot)
        if failure is not None and failure.retry_at > now:
            continue
        name = name_for(pool.next_serial)
        pool.next_serial += 1
        pool.machines.append(
            Machine(
                name=name,
                slot=slot,
                state=MachineState.CREATING,
                config_hash=pool.config_hash,
                created_at=now,
                actor=me,
            )
        )
        work.append(Work("create", name))
    return deletes + work


def record_ready(pool: Pool, name: str, address: str | None, now: float) -> None:
    m = pool.find(name)
    if m is None:
        return
    m.state = MachineState.READY
    m.actor = None
    m.ready_at = now
    m.checked_at = now
    m.address = address
    m.uses_since_reset = 0
    m.error = None
    pool.failures.pop(m.slot, None)
    pool.stats.created += 1
    if pool.stats.first_ready_at is None:
        pool.stats.first_ready_at = now
    leases.serve_queue(pool, now)


def record_create_failure(
    pool: Pool, name: str, error: str, *, retries: int, delay: float, now: float
) -> bool:
    """A create/start/ready failed: retry the slot later, or mark it broken. True if broken."""
    m = pool.find(name)
    if m is None:
        return False
    pool.stats.create_failures += 1
    failure = pool.failures.setdefault(m.slot, SlotFailure())
    failure.attempts += 1
    failure.last_error = error
    failure.retry_at = now + delay
    if failure.attempts > retries:
        m.state = MachineState.BROKEN
        m.actor = None
        m.error = error
        pool.stats.broken += 1
        return True
    pool.machines.remove(m)
    return False


def idle_ready(pool: Pool) -> list[str]:
    """Ready machines nobody holds or works on (what Backend.unreachable is asked about)."""
    return [m.name for m in pool.machines
            if m.state is MachineState.READY and m.holder is None and m.actor is None]


def mark_unreachable(pool: Pool, lost: Mapping[str, str]) -> list[str]:
    """Idle ready machines of ``lost`` (name -> why, from Backend.unreachable) are replaced."""
    out = []
    for m in pool.machines:
        if m.name in lost and m.state is MachineState.READY and m.holder is None \
                and m.actor is None:
            m.state = MachineState.REPLACING
            m.error = lost[m.name]
            out.append(m.name)
    return out


def record_deleted(pool: Pool, name: str, *, replaced: bool) -> None:
    m = pool.find(name)
    if m is not None:
        pool.machines.remove(m)
        if replaced:
            pool.stats.replaced += 1
