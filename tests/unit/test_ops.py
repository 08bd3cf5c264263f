"""vmpool.ops.Encoder: the request lines a client sends are the operations the models define."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from test_leases import make_pool

from vmpool import leases, ops
from vmpool.ownership import ProcessRef, boot_id, hostname
from vmpool.state import Holder, MachineState, Pool, Request

_text = st.text(max_size=40)  # any unicode: quotes, backslashes, control characters, emoji
_finite = st.floats(allow_nan=False, allow_infinity=False)
_holders = st.builds(
    Holder,
    host=_text,
    pid=st.integers(min_value=0, max_value=2**31),
    boot_id=st.none() | _text,
    start_ticks=st.none() | st.integers(min_value=0, max_value=2**63),
    worker=_text,
    test=st.none() | _text,
    since=_finite,
    request=_text,
)
_policies = st.builds(
    leases.Policy,
    checkin=st.sampled_from(["reuse", "reset", "replace"]),
    failure=st.sampled_from(["reuse", "reset", "replace"]),
    max_uses=st.none() | st.integers(min_value=1, max_value=10**6),
    max_age=st.none() | st.floats(min_value=0.001, max_value=1e9),
    can_reset=st.booleans(),
)


@given(
    holder=_holders,
    policy=_policies,
    count=st.integers(min_value=1, max_value=256),
    fresh=st.booleans(),
    since=_finite,
    join=st.booleans(),
    front=st.booleans(),
    reclaim=st.booleans(),
    now=_finite,
)
def test_a_checkout_line_is_the_checkout_the_models_build(
    holder: Holder,
    policy: leases.Policy,
    count: int,
    fresh: bool,
    since: float,
    join: bool,
    front: bool,
    reclaim: bool,
    now: float,
) -> None:
    encoded = ops.Encoder(policy).checkout(
        holder=holder,
        count=count,
        fresh=fresh,
        since=since,
        join=join,
        front=front,
        reclaim=reclaim,
        now=now,
    )
    expected = ops.CheckoutStep(
        request=Request(id=holder.request, holder=holder, count=count, fresh=fresh, since=since),
        join=join,
        front=front,
        reclaim=policy if reclaim else None,
        now=now,
    )
    assert encoded.kind == "checkout"
    assert encoded.decode() == expected
    assert json.loads(encoded.model_dump_json()) == json.loads(expected.model_dump_json())


@given(
    names=st.lists(_text, max_size=4),
    holder=_holders,
    policy=_policies,
    failed=st.booleans(),
    dirty=st.lists(_text, max_size=4),
    now=_finite,
)
def test_a_checkin_line_is_the_checkin_the_models_build(
    names: list[str],
    holder: Holder,
    policy: leases.Policy,
    failed: bool,
    dirty: list[str],
    now: float,
) -> None:
    encoded = ops.Encoder(policy).checkin(
        names=names, holder=holder, failed=failed, dirty=dirty, now=now
    )
    expected = ops.CheckinStep(
        names=names, holder=holder, policy=policy, failed=failed, dirty=dirty, now=now
    )
    assert encoded.kind == "checkin"
    assert encoded.decode() == expected
    assert json.loads(encoded.model_dump_json()) == json.loads(expected.model_dump_json())


def _holder(request: str = "r", test: str | None = "t") -> Holder:
    return Holder(
        host="h", pid=1, boot_id="b", start_ticks=2, worker="gw0", test=test, request=request
    )


def _ask(
    encoder: ops.Encoder, pool: Pool, holder: Holder, *, join: bool = True, now: float = 1.0
) -> ops.CheckoutReply:
    """One check-out of one machine, applied to ``pool`` as a store without a server does."""
    return encoder.checkout(
        holder=holder, count=1, fresh=False, since=1.0, join=join, now=now
    ).apply(pool)


def _keys(value: Any, model: type[BaseModel]) -> None:
    """Every field of ``model`` (and of the models nested in it) is written out, none more."""
    assert set(value) == set(model.model_fields), model.__name__
    for name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            _keys(value[name], nested)


@pytest.mark.parametrize("reclaim", [False, True])
def test_the_templates_name_every_field_of_the_models(reclaim: bool) -> None:
    """A field added to a model and not to the template would reach the server as its default:
    this fails first."""
    holder = _holder()
    encoder = ops.Encoder(leases.Policy())
    out = json.loads(
        encoder.checkout(
            holder=holder, count=1, fresh=False, since=1.0, join=True, reclaim=reclaim, now=1.0
        ).line
    )
    _keys(out, ops.CheckoutStep)
    _keys(out["request"], Request)
    _keys(out["request"]["holder"], Holder)
    out = json.loads(
        encoder.checkin(names=["m"], holder=holder, failed=False, dirty=[], now=1.0).line
    )
    _keys(out, ops.CheckinStep)
    _keys(out["holder"], Holder)
    policy_fields = set(json.loads(ops._POLICY_JSON.dump_json(leases.Policy())))
    assert set(out["policy"]) == policy_fields


def test_an_encoded_operation_applies_and_reads_its_reply_like_the_model() -> None:
    """Without a lease server the store applies the line itself, parsed as the server parses it."""
    pool = make_pool(size=1)
    holder = _holder()
    encoder = ops.Encoder(leases.Policy(checkin="reuse"))
    reply = _ask(encoder, pool, holder)
    assert isinstance(reply, ops.CheckoutReply)
    assert reply.granted == ["m0"]
    assert pool.machines[0].holder is not None and pool.machines[0].holder.test == "t"
    back = encoder.checkin(names=["m0"], holder=holder, failed=False, dirty=[], now=2.0)
    assert back.parse_reply(back.apply(pool).model_dump_json().encode()).actions == {"m0": "reuse"}
    assert pool.machines[0].state is MachineState.READY


def test_a_checkout_with_nobody_waiting_is_served_at_once_and_leaves_no_request() -> None:
    pool = make_pool(size=2)
    reply = _ask(ops.Encoder(leases.Policy()), pool, _holder("r1", test=None), now=5.0)
    assert reply.granted == ["m0"] and pool.queue == []
    leased = pool.machine("m0")
    assert leased.holder is not None and leased.holder.since == 5.0 and leased.uses == 1
    assert pool.stats.checkouts == 1


def test_a_checkout_never_overtakes_a_request_waiting_in_line() -> None:
    """A machine free while a request waits (freed by a step that did not serve the line):
    a newcomer joins behind it and the waiter is served first."""
    pool = make_pool(size=1)
    encoder = ops.Encoder(leases.Policy())

    def ask(request: str, join: bool = True) -> ops.CheckoutReply:
        return _ask(encoder, pool, _holder(request, test=None), join=join, now=2.0)

    assert ask("first").granted == ["m0"]
    assert ask("waiter").granted is None  # the only machine is leased: in line
    pool.machine("m0").holder = None
    pool.machine("m0").state = MachineState.READY
    assert ask("newcomer").granted is None
    assert [r.id for r in pool.queue] == ["waiter", "newcomer"]
    assert ask("waiter", join=False).granted == ["m0"]


def _both_replies(op: ops.CheckoutStep, pool: Pool) -> tuple[ops.CheckoutReply, bytes]:
    """``op`` applied to two copies of ``pool``: as a model, and as the lease server writes it."""
    return op.apply(pool.model_copy(deep=True)), op.apply_json(pool.model_copy(deep=True))


@given(
    names=st.lists(_text, min_size=1, max_size=4, unique=True),
    address=st.none() | _text,
    checked_at=st.none() | st.floats(),  # infinities and NaN too: pydantic writes null
    count=st.integers(min_value=1, max_value=5),
)
def test_a_checkout_reply_written_by_the_server_is_the_reply_the_model_dumps(
    names: list[str], address: str | None, checked_at: float | None, count: int
) -> None:
    """Granted (any names and addresses), waiting (more asked than free) or refused (more
    asked than the pool has): apply_json() writes what apply() builds, for a client to read."""
    pool = make_pool(size=4, ready_machines=len(names))
    for m, name in zip(pool.machines, names, strict=True):
        m.name, m.address, m.checked_at = name, address, checked_at
    op = ops.OP_ADAPTER.validate_json(
        ops.Encoder(leases.Policy())
        .checkout(holder=_holder(), count=count, fresh=False, since=1.0, join=True, now=2.0)
        .line
    )
    assert isinstance(op, ops.CheckoutStep)
    model, line = _both_replies(op, pool)
    assert json.loads(line) == json.loads(model.model_dump_json())
    assert op.parse_reply(line) == ops.CheckoutReply.model_validate_json(model.model_dump_json())
    if count > 4:
        assert model.problem is not None
    elif count > len(names):
        assert model.granted is None and model.problem is None
    else:
        assert model.granted is not None and len(model.granted) == count


@given(holders=st.lists(_holders, min_size=1, max_size=5))
def test_one_encoder_writes_each_holder_as_the_model_does(holders: list[Holder]) -> None:
    """The encoder remembers the last holder it wrote (a check-in names its check-out's): a
    different holder, equal or not, is written anew."""
    encoder = ops.Encoder(leases.Policy())
    for h in [*holders, *holders[:1], holders[-1]]:
        assert json.loads(encoder.holder(h)) == json.loads(h.model_dump_json())


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
    encoder = ops.Encoder(leases.Policy())

    def ask(request: str, *, since: float, now: float, join: bool = True) -> ops.CheckoutReply:
        holder = _holder(request).model_copy(update={"since": since})
        return encoder.checkout(
            holder=holder, count=1, fresh=False, since=since, join=join, now=now
        ).apply(pool)

    assert ask("first", since=2.0, now=2.0).granted == ["m0"]  # at once: as the client sent it
    first = pool.machine("m0").holder
    assert first is not None and (first.request, first.since) == ("first", 2.0)
    assert ask("waiter", since=3.0, now=3.0).granted is None
    pool.machine("m0").holder = None
    pool.machine("m0").state = MachineState.READY
    assert ask("waiter", since=3.0, now=7.0, join=False).granted == ["m0"]  # from the line
    waiter = pool.machine("m0").holder
    assert waiter is not None and (waiter.request, waiter.since) == ("waiter", 7.0)
