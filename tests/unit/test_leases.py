"""The lease protocol: pure decisions on a Pool record, no I/O and no real clock."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import psutil
import pytest
from _procs import process_ref

from vmpool import leases, upkeep
from vmpool.ownership import ProcessRef, is_alive
from vmpool.state import Holder, Machine, MachineState, Pool, Request

NOW = 1000.0
CONTROLLER = ProcessRef(host="h", pid=1, boot_id="b", start_ticks=1)


def ref(pid: int) -> ProcessRef:
    return ProcessRef(host="h", pid=pid, boot_id="b", start_ticks=pid)


def holder(pid: int, test: str | None = None) -> Holder:
    return Holder(**ref(pid).model_dump(), worker=f"gw{pid}", test=test)


def ready(name: str, slot: int, **kw: object) -> Machine:
    fields: dict[str, object] = {
        "name": name,
        "slot": slot,
        "state": MachineState.READY,
        "config_hash": "h1",
        "created_at": NOW - 10,
        "ready_at": NOW - 9,
    }
    fields.update(kw)
    return Machine.model_validate(fields)


def make_pool(size: int = 2, ready_machines: int | None = None) -> Pool:
    n = size if ready_machines is None else ready_machines
    return Pool(
        id="p",
        backend="sim",
        size=size,
        session="s",
        name_prefix="vmpool",
        config_hash="h1",
        created_at=NOW - 100,
        next_serial=n,
        machines=[ready(f"m{i}", i) for i in range(n)],
    )


def new_request(holder: Holder, request_id: str, count: int, fresh: bool, now: float) -> Request:
    """A check-out request as a client makes one (its holder names the request)."""
    return Request(
        id=request_id,
        holder=holder.model_copy(update={"request": request_id}),
        count=count,
        fresh=fresh,
        since=now,
    )


_ids = iter(range(10**9))


def request(pool: Pool, pid: int, count: int = 1, *, fresh: bool = False, now: float = NOW) -> str:
    """Join the line and run the queue; returns the request id."""
    rid = f"r{next(_ids)}"
    leases.enqueue(pool, new_request(holder(pid), rid, count, fresh, now))
    leases.serve_queue(pool, now)
    return rid


def checkout(pool: Pool, pid: int, count: int = 1, *, fresh: bool = False) -> list[str]:
    rid = request(pool, pid, count, fresh=fresh)
    granted = leases.take_grant(pool, rid)
    assert granted is not None, f"request for {count} not granted"
    return granted


def checkin(
    pool: Pool,
    names: list[str],
    pid: int,
    policy: leases.Policy | None = None,
    *,
    failed: bool = False,
    dirty: set[str] | None = None,
    now: float = NOW,
) -> dict[str, leases.Action]:
    return leases.checkin(
        pool, names, ref(pid), policy or leases.Policy(), failed=failed, dirty=dirty, now=now
    )


def state_of(pool: Pool, name: str) -> MachineState:
    return pool.machine(name).state


def plan(
    pool: Pool, policy: leases.Policy | None = None, capacity: int = 10, now: float = NOW
) -> list[upkeep.Work]:
    return upkeep.plan(
        pool,
        policy or leases.Policy(),
        CONTROLLER,
        now,
        capacity=capacity,
        name_for=lambda serial: f"m{serial}",
    )


# -- check-out -------------------------------------------------------------------------------
def test_checkout_leases_a_ready_machine_to_the_holder() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    m = pool.machine(name)
    assert m.state is MachineState.LEASED
    assert m.holder is not None and (m.holder.pid, m.holder.since) == (10, NOW)
    assert (m.uses, m.uses_since_reset) == (1, 1)
    assert pool.queue == []
    assert pool.stats.checkouts == 1


def test_request_waits_when_no_machine_is_free() -> None:
    pool = make_pool(size=1)
    checkout(pool, pid=10)
    rid = request(pool, pid=11)
    assert leases.take_grant(pool, rid) is None
    assert [r.id for r in pool.queue] == [rid]


def test_take_grant_of_unknown_request_raises_lookup_error() -> None:
    with pytest.raises(LookupError):
        leases.take_grant(make_pool(), "nope")


def test_checkin_serves_the_next_waiter() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    rid = request(pool, pid=11)
    checkin(pool, [name], pid=10, policy=leases.Policy(checkin="reuse"))
    assert leases.take_grant(pool, rid) == [name]
    assert pool.machine(name).holder.pid == 11  # type: ignore[union-attr]


def test_machines_beyond_size_are_not_leased() -> None:
    pool = make_pool(size=2)
    pool.size = 1
    assert checkout(pool, pid=10) == ["m0"]
    rid = request(pool, pid=11)
    assert leases.take_grant(pool, rid) is None


def test_machine_of_a_stale_config_is_not_leased() -> None:
    pool = make_pool(size=2)
    pool.machine("m0").config_hash = "h0"
    assert checkout(pool, pid=10) == ["m1"]
    rid = request(pool, pid=11)
    assert leases.take_grant(pool, rid) is None


def test_least_used_machine_is_leased_first() -> None:
    pool = make_pool(size=2)
    pool.machine("m0").uses_since_reset = 3
    assert checkout(pool, pid=10) == ["m1"]


def test_multi_machine_grant_is_all_or_nothing() -> None:
    pool = make_pool(size=3)
    checkout(pool, pid=10)
    rid = request(pool, pid=11, count=3)
    assert leases.take_grant(pool, rid) is None
    assert sum(m.state is MachineState.LEASED for m in pool.machines) == 1
    assert pool.queue[0].granted == []


def test_multi_machine_grant_happens_in_one_step_when_enough_are_free() -> None:
    pool = make_pool(size=3)
    names = checkout(pool, pid=10, count=3)
    assert sorted(names) == ["m0", "m1", "m2"]
    assert all(pool.machine(n).holder.pid == 10 for n in names)  # type: ignore[union-attr]


def test_requests_are_served_in_arrival_order() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    first, second = request(pool, pid=11), request(pool, pid=12)
    checkin(pool, [name], pid=10, policy=leases.Policy(checkin="reuse"))
    assert leases.take_grant(pool, second) is None
    assert leases.take_grant(pool, first) == [name]


def test_large_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    reuse = leases.Policy(checkin="reuse")
    pool = make_pool(size=3)
    held = {pid: checkout(pool, pid=pid) for pid in (10, 11, 12)}
    big = request(pool, pid=20, count=3)
    for pid in (10, 11, 12):
        # a small request arrives before each release; it must queue behind the big one
        small = request(pool, pid=30 + pid)
        assert leases.take_grant(pool, small) is None
        checkin(pool, held[pid], pid=pid, policy=reuse)
    granted = leases.take_grant(pool, big)
    assert granted is not None and len(granted) == 3
    assert [r.count for r in pool.queue] == [1, 1, 1]


def test_fresh_request_gets_only_unused_machines() -> None:
    pool = make_pool(size=2)
    pool.machine("m0").uses_since_reset = 1
    assert checkout(pool, pid=10, fresh=True) == ["m1"]
    rid = request(pool, pid=11, fresh=True)
    assert leases.take_grant(pool, rid) is None


def test_plan_resets_a_used_machine_for_a_fresh_request_at_the_head() -> None:
    pool = make_pool(size=1)
    pool.machine("m0").uses_since_reset = 2
    request(pool, pid=10, fresh=True)
    assert plan(pool) == [upkeep.Work("reset", "m0")]
    assert state_of(pool, "m0") is MachineState.RESETTING
    assert pool.machine("m0").actor == CONTROLLER


def test_plan_replaces_a_used_machine_for_a_fresh_request_without_reset_capability() -> None:
    pool = make_pool(size=1)
    pool.machine("m0").uses_since_reset = 2
    request(pool, pid=10, fresh=True)
    assert plan(pool, leases.Policy(can_reset=False)) == [
        upkeep.Work("replace", "m0"),
        upkeep.Work("create", "m1"),
    ]
    assert state_of(pool, "m0") is MachineState.REPLACING


def test_fresh_request_is_served_after_the_reset_finishes() -> None:
    pool = make_pool(size=1)
    pool.machine("m0").uses_since_reset = 2
    rid = request(pool, pid=10, fresh=True)
    plan(pool)
    leases.finish_reset(pool, "m0", ok=True, error=None, now=NOW)
    assert leases.take_grant(pool, rid) == ["m0"]
    assert pool.machine("m0").uses_since_reset == 1


def test_cancel_returns_machines_granted_meanwhile() -> None:
    pool = make_pool(size=1)
    rid = request(pool, pid=10)
    assert leases.cancel(pool, rid) == ["m0"]
    assert pool.queue == []
    assert leases.cancel(pool, "gone") == []


# -- check-in ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "failed", "expected"),
    [
        (leases.Policy(checkin="reuse"), False, "reuse"),
        (leases.Policy(checkin="reset"), False, "reset"),
        (leases.Policy(checkin="replace"), False, "replace"),
        (leases.Policy(checkin="reuse", failure="reuse"), True, "reuse"),
        (leases.Policy(checkin="reuse", failure="reset"), True, "reset"),
        (leases.Policy(checkin="reuse"), True, "replace"),
    ],
    ids=["pass-reuse", "pass-reset", "pass-replace", "fail-reuse", "fail-reset", "fail-default"],
)
def test_checkin_applies_the_policy(
    policy: leases.Policy, failed: bool, expected: leases.Action
) -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=policy, failed=failed) == {name: expected}


def test_default_policy_resets_after_pass_and_replaces_after_failure() -> None:
    assert leases.Policy().checkin == "reset"
    assert leases.Policy().failure == "replace"


def test_checkin_with_reuse_makes_the_machine_ready() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10, policy=leases.Policy(checkin="reuse"))
    m = pool.machine(name)
    assert (m.state, m.holder, m.uses_since_reset) == (MachineState.READY, None, 1)


def test_checkin_with_reset_leaves_the_reset_to_the_holder() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10)
    m = pool.machine(name)
    assert (m.state, m.holder, m.actor) == (MachineState.RESETTING, None, ref(10))


def test_checkin_after_failure_replaces_machine() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10, failed=True)
    m = pool.machine(name)
    assert (m.state, m.holder, m.actor) == (MachineState.REPLACING, None, None)


def test_replacement_is_created_while_the_old_machine_is_deleted() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10, failed=True)
    assert plan(pool) == [upkeep.Work("replace", name), upkeep.Work("create", "m1")]
    assert pool.machine("m1").slot == pool.machine(name).slot


def test_deletions_have_a_budget_of_their_own_so_successors_are_not_held_back() -> None:
    pool = make_pool(size=2)
    names = [checkout(pool, pid=10)[0], checkout(pool, pid=11)[0]]
    for pid, name in zip((10, 11), names, strict=True):
        checkin(pool, [name], pid=pid, failed=True)
    shared = pool.model_copy(deep=True)
    # one slot of work shared: the first deletion takes it, both successors wait
    assert plan(shared, capacity=1) == [upkeep.Work("replace", names[0])]
    work = upkeep.plan(
        pool,
        leases.Policy(),
        CONTROLLER,
        NOW,
        capacity=1,
        delete_capacity=1,
        name_for=lambda serial: f"m{serial}",
    )
    assert work == [upkeep.Work("replace", names[0]), upkeep.Work("create", "m2")]
    assert pool.machine(names[1]).actor is None  # left, unclaimed, for the next round


def test_dirty_machine_is_at_least_reset() -> None:
    pool = make_pool(size=2)
    names = checkout(pool, pid=10, count=2)
    actions = checkin(pool, names, pid=10, policy=leases.Policy(checkin="reuse"), dirty={names[0]})
    assert actions == {names[0]: "reset", names[1]: "reuse"}


def test_dirty_does_not_weaken_a_replace() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, failed=True, dirty={name}) == {name: "replace"}


def test_machine_is_replaced_after_max_uses() -> None:
    policy = leases.Policy(checkin="reuse", max_uses=2)
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=policy) == {name: "reuse"}
    checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=policy) == {name: "replace"}


def test_machine_is_replaced_at_checkin_after_max_age() -> None:
    policy = leases.Policy(checkin="reuse", max_age=60)
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=policy, now=NOW + 49) == {name: "reuse"}
    checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=policy, now=NOW + 50) == {name: "replace"}


def test_idle_machine_past_max_age_is_replaced_by_plan() -> None:
    pool = make_pool(size=1)
    work = plan(pool, leases.Policy(max_age=60), now=NOW + 50)
    assert work == [upkeep.Work("replace", "m0"), upkeep.Work("create", "m1")]


def test_reset_without_reset_capability_becomes_replace() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=10, policy=leases.Policy(can_reset=False)) == {name: "replace"}


def test_checkin_by_another_process_is_ignored() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    assert checkin(pool, [name], pid=11) == {}
    assert state_of(pool, name) is MachineState.LEASED


def test_checkin_of_a_reclaimed_machine_is_ignored() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    leases.reclaim(pool, leases.Policy(), lambda p: p.pid != 10, NOW)
    assert checkin(pool, [name], pid=10) == {}


def test_successful_reset_makes_the_machine_fresh() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10)
    leases.finish_reset(pool, name, ok=True, error=None, now=NOW)
    m = pool.machine(name)
    assert (m.state, m.actor, m.uses_since_reset, m.uses) == (MachineState.READY, None, 0, 1)
    assert pool.stats.reset == 1


def test_failed_reset_becomes_a_replacement() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    checkin(pool, [name], pid=10)
    leases.finish_reset(pool, name, ok=False, error="boom", now=NOW)
    m = pool.machine(name)
    assert (m.state, m.actor, m.error) == (MachineState.REPLACING, None, "boom")


def test_unhealthy_machine_is_replaced() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    leases.mark_unhealthy(pool, name, "pre-ping failed", NOW)
    m = pool.machine(name)
    assert (m.state, m.holder, m.error) == (MachineState.REPLACING, None, "pre-ping failed")


def test_unused_grant_is_returned_as_it_was() -> None:
    pool = make_pool(size=2)
    names = checkout(pool, pid=10, count=2)
    leases.return_unused(pool, [names[1]], ref(10))
    m = pool.machine(names[1])
    assert (m.state, m.holder, m.uses, m.uses_since_reset) == (MachineState.READY, None, 0, 0)
    assert pool.stats.checkouts == 1
    assert state_of(pool, names[0]) is MachineState.LEASED


# -- reclaim ----------------------------------------------------------------------------------
def test_dead_holders_lease_is_reclaimed_with_the_failure_policy() -> None:
    pool = make_pool(size=2)
    [a] = checkout(pool, pid=10)
    [b] = checkout(pool, pid=11)
    assert leases.reclaim(pool, leases.Policy(), lambda p: p.pid != 10, NOW) == [a]
    assert state_of(pool, a) is MachineState.REPLACING
    assert state_of(pool, b) is MachineState.LEASED
    assert pool.stats.reclaimed == 1


def test_dead_holders_machine_is_never_simply_reused() -> None:
    pool = make_pool(size=1)
    [name] = checkout(pool, pid=10)
    policy = leases.Policy(checkin="reuse", failure="reuse")
    leases.reclaim(pool, policy, lambda p: False, NOW)
    assert state_of(pool, name) is MachineState.RESETTING
    assert pool.machine(name).actor is None
    assert plan(pool, policy) == [upkeep.Work("reset", name)]


def test_lease_of_a_really_dead_process_is_reclaimed(dead_process: ProcessRef) -> None:
    pool = make_pool(size=1)
    dead = Holder(**dead_process.model_dump())
    leases.enqueue(pool, new_request(dead, "r", 1, False, NOW))
    leases.serve_queue(pool, NOW)
    leases.take_grant(pool, "r")
    assert leases.reclaim(pool, leases.Policy(), is_alive, NOW) == ["m0"]


def test_lease_of_a_live_process_is_kept(live_process: ProcessRef) -> None:
    pool = make_pool(size=1)
    live = Holder(**live_process.model_dump())
    leases.enqueue(pool, new_request(live, "r", 1, False, NOW))
    leases.serve_queue(pool, NOW)
    leases.take_grant(pool, "r")
    assert leases.reclaim(pool, leases.Policy(), is_alive, NOW) == []


def test_reused_pid_is_not_mistaken_for_the_holder(live_process: ProcessRef) -> None:
    assert live_process.start_ticks is not None
    impostor = live_process.model_copy(update={"start_ticks": live_process.start_ticks - 100})
    assert is_alive(live_process)
    assert not is_alive(impostor)


def test_exited_but_unreaped_process_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        zombie = process_ref(proc.pid)
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not is_alive(zombie)
    finally:
        proc.wait()


def test_process_on_another_host_is_assumed_alive() -> None:
    assert is_alive(ProcessRef(host="elsewhere.invalid", pid=1, boot_id="b", start_ticks=0))


def test_dead_actors_transition_becomes_a_replacement() -> None:
    pool = make_pool(size=2)
    pool.machines[0].state = MachineState.RESETTING
    pool.machines[0].actor = ref(10)
    pool.machines[1].state = MachineState.CREATING
    pool.machines[1].actor = ref(11)
    assert sorted(leases.reclaim(pool, leases.Policy(), lambda p: False, NOW)) == ["m0", "m1"]
    assert [m.state for m in pool.machines] == [MachineState.REPLACING] * 2
    assert [m.actor for m in pool.machines] == [None, None]


def test_dead_waiter_leaves_the_line() -> None:
    pool = make_pool(size=1)
    checkout(pool, pid=10)
    waiting = request(pool, pid=11)
    behind = request(pool, pid=12)
    assert leases.drop_dead_waiters(pool, lambda p: p.pid != 11) == 1
    assert [r.id for r in pool.queue] == [behind]
    assert waiting not in {r.id for r in pool.queue}


def test_dead_waiters_grant_goes_back_to_the_pool() -> None:
    pool = make_pool(size=1)
    request(pool, pid=11)  # granted, but the waiter dies before taking it
    leases.drop_dead_waiters(pool, lambda p: p.pid != 11)
    m = pool.machine("m0")
    assert (m.state, m.holder, m.uses, m.uses_since_reset) == (MachineState.READY, None, 0, 0)
    assert pool.stats.checkouts == 0


def test_reclaim_serves_the_queue() -> None:
    pool = make_pool(size=1)
    checkout(pool, pid=10)
    rid = request(pool, pid=11)
    leases.reclaim(
        pool,
        leases.Policy(
            checkin="reuse",
            failure="reuse",
        ),
        lambda p: p.pid != 10,
        NOW,
    )
    plan(pool)
    leases.finish_reset(pool, "m0", ok=True, error=None, now=NOW)
    assert leases.take_grant(pool, rid) == ["m0"]


# -- the timeout message --------------------------------------------------------------------
def test_timeout_error_summarises_the_pool_and_names_holders() -> None:
    pool = make_pool(size=4)
    leases.enqueue(pool, new_request(holder(10, "test_a"), "r1", 1, False, NOW - 30))
    leases.serve_queue(pool, NOW - 30)
    pool.machines[1].state = MachineState.CREATING
    pool.machines[2].state = MachineState.BROKEN
    pool.machines[2].error = "BackendError: disk full"
    pool.machines[3].state = MachineState.LEASED
    pool.machines[3].holder = holder(11, "test_b").model_copy(update={"since": NOW - 5})
    leases.enqueue(pool, new_request(holder(12), "r2", 2, False, NOW - 7))
    text = str(leases.timeout_error(pool, 7.0, 2, NOW))
    assert "no machine free after 7.0s (wanted 2) in pool p (sim)" in text
    assert "size 4, 2 leased, 1 warming, 1 broken, 2 request(s) waiting" in text
    assert "m0 held by gw10 (pid 10) for test_a since 30s" in text
    assert "m3 held by gw11 (pid 11) for test_b since 5s" in text
    assert "last error: BackendError: disk full" in text
    assert "--vm-checkout-timeout" in text and "--vm-pool-size" in text


# -- backoff ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", range(1, 8))
def test_backoff_delay_doubles_with_jitter_and_is_capped(attempt: int) -> None:
    rng = random.Random(attempt)
    expected = min(10.0, 0.5 * 2 ** (attempt - 1))
    delays = [upkeep.backoff_delay(attempt, 0.5, 10.0, rng) for _ in range(200)]
    assert all(expected * 0.5 <= d <= expected for d in delays)
    assert max(delays) - min(delays) > 0  # jittered


def test_backoff_delay_of_zero_base_is_zero() -> None:
    assert upkeep.backoff_delay(3, 0.0, 10.0, random.Random(0)) == 0.0


# -- planning ---------------------------------------------------------------------------------
def test_plan_fills_empty_slots_up_to_capacity() -> None:
    pool = make_pool(size=3, ready_machines=0)
    work = plan(pool, capacity=2)
    assert work == [upkeep.Work("create", "m0"), upkeep.Work("create", "m1")]
    assert [(m.slot, m.state, m.actor) for m in pool.machines] == [
        (0, MachineState.CREATING, CONTROLLER),
        (1, MachineState.CREATING, CONTROLLER),
    ]
    assert plan(pool, capacity=2) == [upkeep.Work("create", "m2")]
    assert plan(pool) == []
    assert pool.next_serial == 3


def test_plan_does_not_create_while_closing() -> None:
    pool = make_pool(size=2, ready_machines=0)
    pool.closing = True
    assert plan(pool) == []


def test_plan_retires_slots_beyond_size() -> None:
    pool = make_pool(size=3)
    pool.size = 1
    work = plan(pool)
    assert work == [upkeep.Work("retire", "m1"), upkeep.Work("retire", "m2")]
    assert state_of(pool, "m0") is MachineState.READY


def test_plan_does_not_retire_a_leased_machine_until_it_returns() -> None:
    pool = make_pool(size=2)
    checkout(pool, pid=10, count=2)
    pool.size = 1
    assert plan(pool) == []


def test_plan_replaces_machines_of_a_stale_config() -> None:
    pool = make_pool(size=2)
    pool.config_hash = "h2"
    assert plan(pool) == [
        upkeep.Work("replace", "m0"),
        upkeep.Work("replace", "m1"),
        upkeep.Work("create", "m2"),
        upkeep.Work("create", "m3"),
    ]
    upkeep.record_deleted(pool, "m0", replaced=True)
    upkeep.record_deleted(pool, "m1", replaced=True)
    assert {m.config_hash for m in pool.machines} == {"h2"}
    assert pool.stats.replaced == 2


def test_plan_skips_machines_another_actor_is_working_on() -> None:
    pool = make_pool(size=1)
    pool.machines[0].state = MachineState.RESETTING
    pool.machines[0].actor = ref(10)
    assert plan(pool) == []


def test_plan_waits_for_a_failed_slots_retry_time() -> None:
    pool = make_pool(size=1, ready_machines=0)
    [work] = plan(pool)
    upkeep.record_create_failure(pool, work.name, "boom", retries=2, delay=5.0, now=NOW)
    assert plan(pool, now=NOW + 4.9) == []
    assert plan(pool, now=NOW + 5.0) == [upkeep.Work("create", "m1")]


def test_record_ready_serves_waiters() -> None:
    pool = make_pool(size=1, ready_machines=0)
    rid = request(pool, pid=10)
    [work] = plan(pool)
    upkeep.record_ready(pool, work.name, "10.0.0.1", NOW)
    assert leases.take_grant(pool, rid) == [work.name]
    assert pool.machine(work.name).address == "10.0.0.1"
    assert pool.stats.created == 1 and pool.stats.first_ready_at == NOW


def test_create_failure_is_retried_then_the_slot_is_broken() -> None:
    pool = make_pool(size=1, ready_machines=0)
    outcomes = []
    for attempt in range(3):
        [work] = plan(pool, now=NOW + attempt)
        outcomes.append(
            upkeep.record_create_failure(
                pool, work.name, f"boom {attempt}", retries=2, delay=0.0, now=NOW + attempt
            )
        )
    assert outcomes == [False, False, True]
    [m] = pool.machines
    assert (m.state, m.error, m.actor) == (MachineState.BROKEN, "boom 2", None)
    assert pool.failures[0].attempts == 3
    assert pool.stats.broken == 1 and pool.stats.create_failures == 3
    assert plan(pool, now=NOW + 10) == []
    assert leases.all_broken(pool)


def test_success_clears_a_slots_failure_record() -> None:
    pool = make_pool(size=1, ready_machines=0)
    [work] = plan(pool)
    upkeep.record_create_failure(pool, work.name, "boom", retries=2, delay=0.0, now=NOW)
    [work] = plan(pool)
    upkeep.record_ready(pool, work.name, None, NOW)
    assert pool.failures == {}


def test_pool_with_one_broken_slot_is_not_all_broken() -> None:
    pool = make_pool(size=2)
    pool.machines[0].state = MachineState.BROKEN
    assert not leases.all_broken(pool)
    pool.machines[1].state = MachineState.BROKEN
    assert leases.all_broken(pool)


def test_counts_cover_every_state() -> None:
    pool = make_pool(size=2)
    checkout(pool, pid=10)
    c = leases.counts(pool)
    assert set(c) == {s.value for s in MachineState}
    assert (c["ready"], c["leased"]) == (1, 1)


# -- who resets: the returning holder, or the controller when the pool has a spare ------------
def test_reset_is_left_to_the_holder_when_no_other_machine_is_free() -> None:
    pool = make_pool(size=1)
    pool.owner = CONTROLLER
    [name] = checkout(pool, 7)
    assert checkin(pool, [name], 7) == {name: "reset"}
    m = pool.machine(name)
    assert m.state is MachineState.RESETTING and m.actor == ref(7)


def test_reset_goes_to_the_controller_when_a_spare_is_ready_and_nobody_waits() -> None:
    pool = make_pool(size=2)
    pool.owner = CONTROLLER
    [name] = checkout(pool, 7)
    assert checkin(pool, [name], 7) == {name: "reset"}
    m = pool.machine(name)
    assert m.state is MachineState.RESETTING and m.actor is None
    work = upkeep.plan(pool, leases.Policy(), CONTROLLER, NOW, capacity=4, name_for=str)
    assert upkeep.Work("reset", name) in work


def test_reset_stays_with_the_holder_when_someone_waits() -> None:
    pool = make_pool(size=2)
    pool.owner = CONTROLLER
    first = checkout(pool, 7)
    second = checkout(pool, 8)
    request(pool, 9, 2)  # waits for both
    checkin(pool, first, 7)
    assert pool.machine(first[0]).actor == ref(7)
    del second


def test_reset_stays_with_the_holder_when_no_controller_runs() -> None:
    pool = make_pool(size=2)  # owner None: a kept, idle pool
    [name] = checkout(pool, 7)
    checkin(pool, [name], 7)
    assert pool.machine(name).actor == ref(7)


@pytest.mark.parametrize("checkin", ["reuse", "reset", "replace"])
@pytest.mark.parametrize("failure", ["reuse", "reset", "replace"])
@pytest.mark.parametrize("can_reset", [True, False])
@pytest.mark.parametrize("worn", [False, True])
def test_may_reset_is_exactly_whether_decide_can_reset(
    checkin: leases.Action, failure: leases.Action, can_reset: bool, worn: bool
) -> None:
    # PoolClient.checkin(wait=False) skips the wait only when may_reset says no reset can
    # fall to the holder: it must never say no when decide() then resets
    policy = leases.Policy(checkin=checkin, failure=failure, max_uses=3, can_reset=can_reset)
    m = Machine(
        name="vmpool-s-0",
        slot=0,
        state=MachineState.LEASED,
        config_hash="h",
        created_at=0.0,
        uses=3 if worn else 1,
    )
    for failed in (False, True):
        for dirty in (False, True):
            resets = leases.decide(m, policy, failed=failed, dirty=dirty, now=1.0) == "reset"
            may = policy.may_reset(failed=failed, dirty=dirty)
            assert may == resets if not worn else (may or not resets)
