"""Every lease operation, through the transport each store is used by, on both stores.

The JSON file (FileTransport) and PostgreSQL (StoreTransport) run the same vmpool.ops and
vmpool.leases code; these tests hold each store to the same behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests._waiting import wait_until
from vmpool import leases, ops
from vmpool.ownership import ProcessRef, current_process
from vmpool.pgstore.store import PgStore
from vmpool.state import Holder, JsonStore, MachineState, Request
from vmpool.transport import Transport, connect

REUSE = leases.Policy(checkin="reuse", failure="replace")
RESET = leases.Policy(checkin="reset", failure="replace")


@pytest.fixture
def transport(any_store: JsonStore | PgStore) -> Iterator[Transport]:
    t = connect(any_store, REUSE)
    yield t
    t.close()


def holder(request: str, ref: ProcessRef | None = None) -> Holder:
    return Holder(**(ref or current_process()).model_dump(), request=request, since=time.time())


def checkout(t: Transport, request: str, count: int = 1, *, wait: float = 0.0,
             ref: ProcessRef | None = None) -> ops.CheckoutReply:
    h = holder(request, ref)
    return t.run(ops.CheckoutStep(
        request=Request(id=request, holder=h, count=count, since=h.since), wait=wait, now=h.since,
    ))


def checkin(t: Transport, names: list[str], request: str, policy: leases.Policy = REUSE, *,
            failed: bool = False, ref: ProcessRef | None = None) -> ops.CheckinReply:
    return t.run(ops.CheckinStep(names=names, holder=holder(request, ref), policy=policy,
                                 failed=failed, now=time.time()))


def look(t: Transport, request: str, count: int = 1) -> ops.CheckoutReply:
    h = holder(request)
    return t.run(ops.CheckoutStep(request=Request(id=request, holder=h, count=count,
                                                  since=h.since), join=False, now=h.since))


def record(store: JsonStore | PgStore) -> dict[str, MachineState]:
    pool = store.read()
    assert pool is not None
    return {m.name: m.state for m in pool.machines}


def test_a_checkout_leases_a_machine_and_bumps_its_generation(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    reply = checkout(transport, "r1")
    assert reply.granted is not None and len(reply.granted) == 1
    pool = any_store.read()
    assert pool is not None
    m = pool.machine(reply.granted[0])
    assert m.state is MachineState.LEASED and m.holder is not None
    assert m.holder.request == "r1" and m.generation == 1 and pool.stats.checkouts == 1


def test_a_three_machine_request_keeps_its_place_among_one_machine_requests(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    first = checkout(transport, "a")
    assert first.granted is not None
    assert checkout(transport, "big", 3).granted is None  # 2 free: it waits in line
    # two machines are free, but a 1-machine request arriving later waits behind the 3
    assert checkout(transport, "small").granted is None
    assert look(transport, "small").granted is None
    checkin(transport, first.granted, "a")
    big = look(transport, "big", 3)
    assert big.granted is not None and sorted(big.granted) == ["m0", "m1", "m2"]
    assert look(transport, "small").granted is None
    checkin(transport, big.granted, "big")
    assert look(transport, "small").granted is not None
    pool = any_store.read()
    assert pool is not None and pool.queue == []


@pytest.mark.parametrize(
    ("policy", "failed", "state"),
    [(REUSE, False, MachineState.READY), (RESET, False, MachineState.RESETTING),
     (leases.Policy(checkin="replace"), False, MachineState.REPLACING),
     (REUSE, True, MachineState.REPLACING)],
)
def test_checkin_applies_the_pools_policy(
    any_store: JsonStore | PgStore, transport: Transport, policy: leases.Policy,
    failed: bool, state: MachineState,
) -> None:
    granted = checkout(transport, "r").granted
    assert granted is not None
    reply = checkin(transport, granted, "r", policy, failed=failed)
    assert record(any_store)[granted[0]] is state
    # no controller (an owner-less pool): a reset falls to the caller
    assert reply.mine == ([granted[0]] if state is MachineState.RESETTING else [])


def test_reset_done_makes_the_machine_ready_and_fresh(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    granted = checkout(transport, "r").granted
    assert granted is not None
    checkin(transport, granted, "r", RESET)
    transport.run(ops.ResetDone(name=granted[0], ok=True, address="10.0.0.9", now=time.time()))
    pool = any_store.read()
    assert pool is not None
    m = pool.machine(granted[0])
    assert m.state is MachineState.READY and m.uses_since_reset == 0 and m.address == "10.0.0.9"


def test_cancel_leaves_the_line_and_gives_back_an_unread_grant(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    held = checkout(transport, "a", 3).granted
    assert held is not None
    assert checkout(transport, "w").granted is None
    transport.run(ops.Cancel(request="w", holder=holder("w"), now=time.time()))
    pool = any_store.read()
    assert pool is not None and pool.queue == []
    checkin(transport, held[:1], "a")
    # a grant the caller never read (it was interrupted) goes back unused
    assert checkout(transport, "x").granted == held[:1]
    transport.run(ops.Cancel(request="x", holder=holder("x"), now=time.time()))
    assert record(any_store)[held[0]] is MachineState.READY


def _dead_process() -> ProcessRef:
    proc = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    me = current_process()
    return ProcessRef(host=me.host, pid=int(out), boot_id=me.boot_id, start_ticks=1)


def test_a_dead_holders_lease_is_reclaimed_by_a_waiting_checkout(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    dead = _dead_process()
    held = checkout(transport, "gone", 3, ref=dead).granted
    assert held is not None
    # with no controller, a waiting check-out reclaims (every second at most) as it waits;
    # the machines go to replacement (a test died in them), the controller's job
    reply = checkout(transport, "alive", wait=1.5)
    assert reply.timeout is not None and "3 leased" not in reply.timeout
    pool = any_store.read()
    assert pool is not None and pool.stats.reclaimed == 3
    assert set(record(any_store).values()) == {MachineState.REPLACING}


def test_status_is_the_record_as_of_now(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    granted = checkout(transport, "r").granted
    status = transport.run(ops.Status())
    assert granted is not None and status.pool.machine(granted[0]).state is MachineState.LEASED


def test_a_retried_checkout_finds_its_grant_and_takes_no_more(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    first = checkout(transport, "r1", 2)
    again = checkout(transport, "r1", 2)  # its first reply was lost
    assert first.granted is not None and sorted(first.granted) == sorted(again.granted or [])
    assert list(record(any_store).values()).count(MachineState.LEASED) == 2


def test_a_retried_checkin_changes_nothing_the_second_time(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    granted = checkout(transport, "r1").granted
    assert granted is not None
    first = checkin(transport, granted, "r1", RESET)
    again = checkin(transport, granted, "r1", RESET)  # its first reply was lost
    assert first == again and again.mine == granted
    before = any_store.read()
    assert checkin(transport, granted, "r1", REUSE).actions == {"m0": "reset"}
    assert any_store.read() == before


def test_a_late_checkin_of_a_reclaimed_lease_changes_nothing(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    """The same process leased the machine again under a new request: the old lease's
    check-in (its request id) is fenced off."""
    old = checkout(transport, "old", 3).granted
    assert old is not None
    with any_store.transaction() as pool:  # reclaimed (an expired lease), made ready again
        for m in pool.machines:
            m.holder, m.state = None, MachineState.READY
    new = checkout(transport, "new", 3).granted
    assert new is not None
    assert checkin(transport, old, "old").actions == {}
    pool = any_store.read()
    assert pool is not None
    assert all(m.holder is not None and m.holder.request == "new" and m.generation == 2
               for m in pool.machines)


def test_a_waiting_checkout_is_answered_when_a_checkin_frees_a_machine(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    held = checkout(transport, "a", 3).granted
    assert held is not None
    got: list[ops.CheckoutReply] = []
    waiter = connect(any_store, REUSE)
    t = threading.Thread(target=lambda: got.append(checkout(waiter, "w", wait=20.0)))
    t.start()
    wait_until(lambda: any((p := any_store.read()) and p.queue), 10, "the waiter in line")
    freed = time.monotonic()
    checkin(transport, held[:1], "a")
    t.join(20)
    took = time.monotonic() - freed
    waiter.close()
    assert got and got[0].granted == held[:1]
    # woken by the NOTIFY (PostgreSQL) or its next look (the file: at most 0.1 s apart)
    assert took < 1.0, took


def test_a_waiting_checkout_on_postgresql_looks_when_woken_not_on_a_timer(
    pg_store: PgStore,
) -> None:
    from vmpool.pgstore.transport import StoreTransport

    transport = StoreTransport(pg_store, REUSE, look_every=5.0)
    held = checkout(transport, "a", 3).granted
    assert held is not None
    waiter = StoreTransport(PgStore(pg_store.dsn, pg_store.pool_id), REUSE, look_every=5.0)
    got: list[ops.CheckoutReply] = []
    t = threading.Thread(target=lambda: got.append(checkout(waiter, "w", wait=20.0)))
    t.start()
    wait_until(lambda: (p := pg_store.read()) and p.queue, 10, "the waiter in line")
    wait_until(lambda: waiter.looks >= 1, 10, "its first look after LISTEN")
    freed = time.monotonic()
    checkin(transport, held[:1], "a")
    t.join(20)
    took = time.monotonic() - freed
    waiter.close()
    transport.close()
    assert got and got[0].granted == held[:1]
    # its fallback look is 5 s away: only the NOTIFY can have woken it
    assert took < 1.0 and waiter.looks == 2, (took, waiter.looks)


def test_holder_ids_name_the_host_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmpool import ownership

    ownership.hostname.cache_clear()
    monkeypatch.setenv("VMPOOL_HOST_ID", "ci-runner-7")
    try:
        assert current_process().host == "ci-runner-7"
    finally:
        monkeypatch.delenv("VMPOOL_HOST_ID")
        ownership.hostname.cache_clear()
    assert current_process().host == os.uname().nodename


def test_a_late_reset_outcome_of_another_process_changes_nothing(
    any_store: JsonStore | PgStore, transport: Transport
) -> None:
    granted = checkout(transport, "r").granted
    assert granted is not None
    checkin(transport, granted, "r", RESET)  # resetting, with this process as its actor
    other = _dead_process()
    transport.run(ops.ResetDone(name=granted[0], ok=True, actor=other, now=time.time()))
    assert record(any_store)[granted[0]] is MachineState.RESETTING
    transport.run(ops.ResetDone(name=granted[0], ok=True, actor=current_process(),
                                now=time.time()))
    assert record(any_store)[granted[0]] is MachineState.READY
