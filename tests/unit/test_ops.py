"""vmpool.ops: the lease operations, applied to a record as a server or a file transaction does."""

from __future__ import annotations

import os

from test_leases import make_pool

from vmpool import leases, ops
from vmpool.ownership import ProcessRef, boot_id, current_process, hostname
from vmpool.state import Holder, MachineState, Pool, Request


def _holder(request: str = "r1", **fields: object) -> Holder:
    return Holder(**current_process().model_dump(), request=request, **fields)


def _ask(pool: Pool, request: str, *, join: bool = True, since: float = 1.0, now: float = 2.0,
         count: int = 1) -> ops.CheckoutReply:
    holder = _holder(request, since=since)
    step = ops.CheckoutStep(
        request=Request(id=request, holder=holder, count=count, since=since), join=join, now=now
    )
    return step.apply(pool)


def test_an_operation_survives_its_trip_over_the_wire() -> None:
    """What a client sends is what the server applies, and the reply reads back the same."""
    pool = make_pool(size=2)
    step = ops.CheckoutStep(
        request=Request(id="r1", holder=_holder("r1"), count=2, since=1.0), wait=3.0, now=2.0
    )
    again = ops.OP_ADAPTER.validate_json(step.model_dump_json())
    assert again == step
    reply = again.apply(pool)
    assert isinstance(reply, ops.CheckoutReply)
    assert step.parse_reply(reply.model_dump_json().encode()) == reply
    assert reply.granted is not None and sorted(reply.granted) == ["m0", "m1"]


def test_a_checkout_with_nobody_waiting_is_served_at_once_and_leaves_no_request() -> None:
    pool = make_pool(size=2)
    reply = _ask(pool, "r1", now=5.0)
    assert reply.granted == ["m0"] and pool.queue == []
    leased = pool.machine("m0")
    assert leased.holder is not None and leased.holder.since == 5.0 and leased.uses == 1
    assert pool.stats.checkouts == 1


def test_a_checkout_never_overtakes_a_request_waiting_in_line() -> None:
    """A machine free while a request waits (freed by a step that did not serve the line):
    a newcomer joins behind it and the waiter is served first."""
    pool = make_pool(size=1)
    assert _ask(pool, "first").granted == ["m0"]
    assert _ask(pool, "waiter").granted is None  # the only machine is leased: in line
    pool.machine("m0").holder = None
    pool.machine("m0").state = MachineState.READY
    assert _ask(pool, "newcomer").granted is None
    assert [r.id for r in pool.queue] == ["waiter", "newcomer"]
    assert _ask(pool, "waiter", join=False).granted == ["m0"]


def test_a_refused_request_leaves_the_line() -> None:
    pool = make_pool(size=1)
    assert _ask(pool, "first").granted == ["m0"]
    assert _ask(pool, "waiter").granted is None
    pool.closing = True
    reply = _ask(pool, "waiter", join=False)
    assert reply.problem is not None and "shutting down" in reply.problem
    assert pool.queue == []


def test_an_expired_request_leaves_the_line_with_the_pools_summary() -> None:
    pool = make_pool(size=1)
    assert _ask(pool, "first").granted == ["m0"]
    step = ops.CheckoutStep(
        request=Request(id="late", holder=_holder("late"), since=1.0), wait=0.5, now=2.0
    )
    assert step.apply(pool).granted is None
    reply = step.expire(pool, waited=0.5, now=2.5)
    assert reply.final and reply.granted is None
    assert reply.timeout is not None and "size 1, 1 leased" in reply.timeout
    assert pool.queue == []


def test_a_cancel_gives_back_a_grant_whose_reply_was_never_read() -> None:
    """An interrupted client never read its grant: its cancel returns the machine unused."""
    pool = make_pool(size=1)
    assert _ask(pool, "r1").granted == ["m0"]  # granted and out of the line
    ops.Cancel(request="r1", holder=_holder("r1"), now=3.0).apply(pool)
    m = pool.machine("m0")
    assert m.state is MachineState.READY and m.holder is None and m.uses == 0


def test_status_is_a_copy_of_the_record() -> None:
    pool = make_pool(size=1)
    reply = ops.Status().apply(pool)
    pool.machine("m0").state = MachineState.BROKEN
    assert reply.pool.machine("m0").state is MachineState.READY


def test_checkin_reply_names_the_resets_that_fall_to_the_caller() -> None:
    pool = make_pool(size=1)
    pool.owner = None  # no controller to reset in the background
    assert _ask(pool, "r1").granted == ["m0"]
    holder = pool.machine("m0").holder
    assert holder is not None
    reply = ops.CheckinStep(names=["m0"], holder=holder, policy=leases.Policy(), now=3.0).apply(
        pool
    )
    assert reply.actions == {"m0": "reset"} and reply.mine == ["m0"]


def test_a_forked_child_is_not_taken_for_its_parent() -> None:
    """The server's check for its own process is made once per process, and again in a child."""
    me = ProcessRef(host=hostname(), pid=os.getpid(), boot_id=boot_id(), start_ticks=-1)  # wrong:
    assert ops._alive_or_me(me)  # only the shortcut for this very process says alive
    pid = os.fork()
    if pid == 0:
        child = me.model_copy(update={"pid": os.getpid()})
        os._exit(0 if ops._alive_or_me(child) and not ops._alive_or_me(me) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_machine_is_held_since_its_grant_served_at_once_or_from_the_line() -> None:
    pool = make_pool(size=1)
    assert _ask(pool, "first", since=2.0, now=2.0).granted == ["m0"]
    first = pool.machine("m0").holder
    assert first is not None and (first.request, first.since) == ("first", 2.0)
    assert _ask(pool, "waiter", since=3.0, now=3.0).granted is None
    pool.machine("m0").holder = None
    pool.machine("m0").state = MachineState.READY
    assert _ask(pool, "waiter", since=3.0, now=7.0, join=False).granted == ["m0"]
    waiter = pool.machine("m0").holder
    assert waiter is not None and (waiter.request, waiter.since) == ("waiter", 7.0)
