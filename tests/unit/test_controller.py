"""The controller on the sim backend: warm-up, retries, teardown, adoption, reclaim, check-out."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vmpool.backends.base import MachineSpec
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config import Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller, policy_for
from vmpool.errors import CheckoutTimeout, PoolUnavailable
from vmpool.state import JsonStateDir, MachineState, Pool


class RecordingSim(SimBackend):
    """The sim backend, counting how many creates run at once and when each began."""

    def __init__(self, settings: SimSettings, state_dir: Path) -> None:
        super().__init__(settings, state_dir)
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.create_times: list[float] = []

    def create(self, spec: MachineSpec) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.create_times.append(time.monotonic())
        try:
            super().create(spec)
        finally:
            with self._lock:
                self.active -= 1


class FixedJitter:
    """An rng whose jitter is always 1.0, so a backoff delay is exactly base * 2**(n-1)."""

    def uniform(self, a: float, b: float) -> float:
        return b


Factory = Callable[..., tuple[Controller, RecordingSim]]


@pytest.fixture
def start_pool(state_dir: JsonStateDir, make_profile: Callable[..., Profile]) -> Iterator[Factory]:
    """``start_pool(size, sim={...}, **pool_keys)``: a started controller and its backend."""
    made: list[Controller] = []

    def start(
        size: int,
        *,
        sim: dict[str, Any] | None = None,
        session: str = "s1",
        rng: Any = None,
        serve: bool = True,
        **pool: Any,
    ) -> tuple[Controller, RecordingSim]:
        pool.setdefault("backoff", 0.0)
        profile = make_profile(sim=sim, **pool)
        backend = RecordingSim(profile.sim, state_dir.path)
        controller = Controller(
            directory=state_dir,
            backend=backend,
            profile=profile,
            size=size,
            session=session,
            rng=rng,
            serve=serve,
        )
        controller.start()
        made.append(controller)
        return controller, backend

    yield start
    for controller in made:
        if not controller._stop.is_set():
            controller.stop(lease_timeout=0)


def client_for(controller: Controller, **kw: Any) -> PoolClient:
    return PoolClient(
        controller.store,
        controller.backend,
        policy_for(controller.profile, controller.backend),
        **kw,
    )


def creates(backend: SimBackend) -> int:
    """Creates so far, counted by the sim across processes."""
    counter = backend.root / "creates"
    return int(counter.read_text()) if counter.exists() else 0


def ready_names(pool: Pool) -> list[str]:
    return sorted(m.name for m in pool.machines if m.state is MachineState.READY)


# -- warm-up ----------------------------------------------------------------------------------
def test_warmup_runs_creates_in_parallel_up_to_warmup_parallelism(start_pool: Factory) -> None:
    controller, backend = start_pool(6, warmup_parallelism=3, sim={"create_latency": 0.15})
    pool = controller.wait_until_ready(6, 10)
    assert backend.max_active == 3  # in parallel, and never more than warmup_parallelism
    assert len(ready_names(pool)) == 6
    assert len(backend.list("vmpool-")) == 6


def test_ready_machines_get_an_address_on_the_pools_network(start_pool: Factory) -> None:
    controller, backend = start_pool(2)
    pool = controller.wait_until_ready(2, 10)
    assert pool.network == f"{pool.id}-net"
    assert [n.name for n in backend.list_networks("vmpool-")] == [pool.network]
    assert all(m.address and m.address.startswith("10.99.") for m in pool.machines)


def test_failed_create_is_retried_after_a_backoff_then_succeeds(start_pool: Factory) -> None:
    controller, backend = start_pool(1, sim={"fail_create": [1]}, backoff=0.2, rng=FixedJitter())
    pool = controller.wait_until_ready(1, 10)
    first, second = backend.create_times
    assert second - first >= 0.2
    assert (pool.stats.create_failures, pool.stats.created, pool.stats.broken) == (1, 1, 0)
    assert pool.failures == {}


def test_machine_that_keeps_failing_is_broken_and_the_pool_degraded(start_pool: Factory) -> None:
    controller, _ = start_pool(2, warmup_parallelism=1, retries=2, sim={"fail_create": [1, 2, 3]})
    pool = wait_until(
        lambda: (
            (p := controller.snapshot()) and len(ready_names(p)) == 1 and p.stats.broken == 1 and p
        ),
        what="one machine ready and one broken",
    )
    broken = [m for m in pool.machines if m.state is MachineState.BROKEN]
    assert [m.slot for m in broken] == [0]
    assert "injected failure of create #3" in (broken[0].error or "")
    assert pool.failures[0].attempts == 3
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    assert lease.names == ready_names(pool)
    client.checkin(lease)


def test_degraded_pool_times_out_a_request_it_cannot_serve(start_pool: Factory) -> None:
    controller, _ = start_pool(2, warmup_parallelism=1, retries=0, sim={"fail_create": [1]})
    wait_until(lambda: controller.snapshot().stats.broken == 1, what="a broken machine")
    controller.wait_until_ready(1, 10)
    with pytest.raises(CheckoutTimeout, match="1 broken") as info:
        client_for(controller).checkout(2, timeout=0.3)
    assert "injected failure of create #1" in str(info.value)


def test_pool_where_every_create_fails_is_unavailable_with_the_last_error(
    start_pool: Factory,
) -> None:
    controller, _ = start_pool(2, retries=1, sim={"fail_every_create": True})
    with pytest.raises(PoolUnavailable, match="no machine could be made") as info:
        controller.wait_until_ready(2, 10)
    assert "BackendError: sim: injected failure of create #" in str(info.value)
    with pytest.raises(PoolUnavailable, match="injected failure of create #"):
        client_for(controller).checkout(1, timeout=5)
    assert controller.snapshot().stats.create_failures == 4


def test_machine_that_never_becomes_ready_times_out_and_is_retried_then_broken(
    start_pool: Factory,
) -> None:
    controller, backend = start_pool(1, retries=1, ready_timeout=0.2, sim={"hang_on_start": True})
    with pytest.raises(PoolUnavailable) as info:
        controller.wait_until_ready(1, 10)
    assert "ReadyTimeout" in str(info.value)
    assert "hangs on start" in str(info.value)
    assert creates(backend) == 2
    # the failed attempts' machines were deleted, not left running
    wait_until(lambda: backend.list("vmpool-") == [], what="every machine deleted")


# -- teardown ---------------------------------------------------------------------------------
def test_teardown_destroys_every_machine_network_and_the_pool_file(
    start_pool: Factory, state_dir: JsonStateDir
) -> None:
    controller, backend = start_pool(3)
    controller.wait_until_ready(3, 10)
    final = controller.stop()
    assert final is not None and len(final.machines) == 3
    assert backend.list("") == []
    assert backend.list_networks("") == []
    assert state_dir.pool_ids() == []


def test_teardown_during_warmup_leaves_no_machine(
    start_pool: Factory, state_dir: JsonStateDir
) -> None:
    controller, backend = start_pool(4, sim={"create_latency": 0.1, "start_latency": 0.1})
    wait_until(lambda: backend.active, what="a create under way")
    controller.stop()
    assert backend.list("") == []
    assert state_dir.pool_ids() == []


def test_teardown_waits_for_a_lease_then_proceeds(start_pool: Factory) -> None:
    controller, backend = start_pool(1)
    controller.wait_until_ready(1, 10)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    timer = threading.Timer(0.2, client.checkin, args=(lease,))
    timer.start()
    started = time.monotonic()
    controller.stop(lease_timeout=5)
    timer.join()
    assert 0.15 <= time.monotonic() - started < 5
    assert backend.list("") == []


class BatchSim(SimBackend):
    """The sim with a ``delete_many`` that records its calls and can refuse one machine."""

    def __init__(self, settings: SimSettings, state_dir: Path, refuse: str = "") -> None:
        super().__init__(settings, state_dir)
        self.batches: list[list[str]] = []
        self.refuse = refuse

    def delete_many(self, names: list[str]) -> dict[str, str]:
        self.batches.append(list(names))
        errors = {}
        for name in names:
            if name == self.refuse:
                errors[name] = "refused"
            else:
                self.delete(name)
        return errors


def _batch_pool(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile], refuse: str = ""
) -> tuple[Controller, BatchSim]:
    profile = make_profile(sim=None, backoff=0.0)
    backend = BatchSim(profile.sim, state_dir.path, refuse)
    controller = Controller(
        directory=state_dir, backend=backend, profile=profile, size=3, session="s1"
    )
    controller.start()
    controller.wait_until_ready(3, 10)
    return controller, backend


def test_teardown_deletes_the_pool_in_one_batch_where_the_backend_can(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    controller, backend = _batch_pool(state_dir, make_profile)
    controller.stop()
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 3
    assert backend.list("") == []
    assert state_dir.pool_ids() == []


def test_machines_a_batch_could_not_delete_stay_in_the_record_for_gc(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    controller, _ = _batch_pool(state_dir, make_profile)
    refused = controller.snapshot().machines[0].name
    controller.backend.refuse = refused  # type: ignore[attr-defined]
    controller.stop()
    [pool_id] = state_dir.pool_ids()
    left = state_dir.store(pool_id).read()
    assert left is not None and [m.name for m in left.machines] == [refused]


class ForgetfulSim(BatchSim):
    """A tool that reports success for the first ``misses`` removals of ``name`` without
    doing them (as a tool process interrupted halfway might)."""

    def __init__(self, settings: SimSettings, state_dir: Path, name: str, misses: int) -> None:
        super().__init__(settings, state_dir)
        self.name, self.misses = name, misses

    def delete_many(self, names: list[str]) -> dict[str, str]:
        if self.name in names and self.misses > 0:
            self.misses -= 1
            names = [n for n in names if n != self.name]
        return super().delete_many(names)


def _forgetful_pool(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile], misses: int
) -> tuple[Controller, ForgetfulSim]:
    controller, _ = _batch_pool(state_dir, make_profile)
    name = controller.snapshot().machines[0].name
    backend = ForgetfulSim(controller.profile.sim, state_dir.path, name, misses)
    controller.backend = backend
    return controller, backend


def test_teardown_checks_with_the_backend_and_deletes_what_is_still_there(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    # a leak CI once showed: a podman container was still there after a teardown that had
    # deleted it without an error
    controller, backend = _forgetful_pool(state_dir, make_profile, misses=2)
    controller.stop()
    assert backend.list("") == []
    assert len(backend.batches) == 3  # the pool, then the one machine twice
    assert state_dir.pool_ids() == []


def test_machine_still_there_after_every_round_stays_in_the_record_for_gc(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    controller, backend = _forgetful_pool(state_dir, make_profile, misses=99)
    controller.stop()
    assert [i.name for i in backend.list("")] == [backend.name]
    [pool_id] = state_dir.pool_ids()
    left = state_dir.store(pool_id).read()
    assert left is not None and [m.name for m in left.machines] == [backend.name]


class GrumblingSim(BatchSim):
    """Deletes everything but reports an error for ``name`` (a tool that fails on the way
    out of a removal it did)."""

    def __init__(self, settings: SimSettings, state_dir: Path, name: str) -> None:
        super().__init__(settings, state_dir)
        self.name = name

    def delete_many(self, names: list[str]) -> dict[str, str]:
        errors = super().delete_many(names)
        return {**errors, self.name: "error after the fact"} if self.name in names else errors


def test_failed_deletion_of_a_machine_that_is_gone_leaves_no_record(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    controller, _ = _batch_pool(state_dir, make_profile)
    name = controller.snapshot().machines[0].name
    backend = GrumblingSim(controller.profile.sim, state_dir.path, name)
    controller.backend = backend
    controller.stop()
    assert backend.list("") == []
    assert state_dir.pool_ids() == []  # the backend holds nothing: nothing for gc to finish


# -- keep and adopt -----------------------------------------------------------------------------
def test_kept_pool_is_left_ready_without_an_owner(
    start_pool: Factory, state_dir: JsonStateDir
) -> None:
    controller, backend = start_pool(2)
    controller.wait_until_ready(2, 10)
    controller.stop(keep=True)
    [pool] = state_dir.pools()
    assert (pool.keep, pool.owner, pool.closing) == (True, None, False)
    assert len(ready_names(pool)) == 2
    assert sorted(i.name for i in backend.list("vmpool-") if i.running) == ready_names(pool)


_Queued = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class QueuedExecutor:
    """An executor whose workers are all busy: what is submitted waits in its queue until
    shutdown, which runs it, or cancels it as ThreadPoolExecutor does with cancel_futures."""

    def __init__(self) -> None:
        self.queued: list[_Queued] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.queued.append((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for future, fn, args in self.queued:
            if cancel_futures:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                future.set_result(fn(*args))


def test_kept_pool_finishes_a_reset_that_was_planned_but_not_begun(
    start_pool: Factory, state_dir: JsonStateDir
) -> None:
    # CI once kept 1 of 2 machines: a background reset queued behind a finishing worker was
    # cancelled at teardown, and the machine left resetting was deleted instead of kept
    controller, _ = start_pool(2, checkin_policy="reset")
    controller.wait_until_ready(2, 10)
    queue = QueuedExecutor()
    controller._executor = queue  # type: ignore[assignment]
    client = client_for(controller)
    lease = client.checkout(test="t")
    assert client.checkin(lease) == {lease.names[0]: "reset"}
    # the controller took the reset on and it waits in line
    wait_until(lambda: queue.queued, what="the reset queued")
    controller.stop(keep=True)
    [pool] = state_dir.pools()
    assert len(ready_names(pool)) == 2 and lease.names[0] in ready_names(pool)


def test_next_session_adopts_a_kept_pool_without_creating(start_pool: Factory) -> None:
    first, backend = start_pool(2)
    first.wait_until_ready(2, 10)
    machines = ready_names(first.snapshot())
    first.stop(keep=True)
    before = creates(backend)

    second, _ = start_pool(2, session="s2")
    assert second.adopted_from == first.pool_id
    pool = second.wait_until_ready(2, 10)
    assert ready_names(pool) == machines
    assert pool.owner == second.me and not pool.keep
    # nothing happening is the behaviour under test: a maintainer tick or two, still no create
    time.sleep(0.3)
    assert creates(backend) == before


def test_adopting_with_changed_machine_config_replaces_the_stale_machines(
    start_pool: Factory,
) -> None:
    first, backend = start_pool(2)
    first.wait_until_ready(2, 10)
    old = set(ready_names(first.snapshot()))
    first.stop(keep=True)
    before = creates(backend)

    second, _ = start_pool(2, session="s2", sim={"create_latency": 0.01})
    assert second.adopted_from == first.pool_id
    assert second.config_hash != first.config_hash

    def renewed() -> Pool | None:
        pool = second.snapshot()
        fresh = [m for m in pool.machines if m.config_hash == second.config_hash]
        done = len(pool.machines) == 2 and len(ready_names(pool)) == 2 and len(fresh) == 2
        return pool if done else None

    pool = wait_until(renewed, what="the stale machines replaced")
    assert old.isdisjoint(ready_names(pool))
    assert creates(backend) == before + 2
    assert old.isdisjoint(i.name for i in backend.list("vmpool-"))


def test_a_live_sessions_pool_is_not_adopted(start_pool: Factory) -> None:
    first, _ = start_pool(1)
    first.wait_until_ready(1, 10)
    second, _ = start_pool(1, session="s2")
    assert second.adopted_from is None
    assert second.pool_id != first.pool_id


# -- reclaim ----------------------------------------------------------------------------------
_WORKER = """
import sys
from pathlib import Path
from vmpool import leases
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config_backends import SimSettings
from vmpool.state import JsonStateDir

state, pool_id, root = sys.argv[1:]
backend = SimBackend(SimSettings(root=Path(root)), Path(state))
client = PoolClient(JsonStateDir(Path(state)).store(pool_id), backend, leases.Policy(),
                    worker="gw0", pre_ping=False)
lease = client.checkout(1, test="test_crashes", timeout=10)
print(lease.names[0], flush=True)
"""


@pytest.mark.parametrize("serve", [True, False], ids=["connection-closes", "maintainer-sweep"])
def test_dead_workers_lease_is_reclaimed(
    start_pool: Factory, state_dir: JsonStateDir, serve: bool
) -> None:
    """Through the lease server, the worker's connection closing gives its lease up; a worker
    on the file (no server) is found dead by the controller's sweep."""
    controller, backend = start_pool(1, serve=serve)
    controller.wait_until_ready(1, 10)
    worker = subprocess.run(
        [sys.executable, "-c", _WORKER, str(state_dir.path), controller.pool_id, str(backend.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    leased = worker.stdout.strip()  # the worker exited without checking it in

    def replaced() -> Pool | None:
        pool = controller.snapshot()
        return pool if pool.find(leased) is None and len(ready_names(pool)) == 1 else None

    pool = wait_until(replaced, what="the machine replaced")
    assert pool.stats.reclaimed == 1
    assert leased not in {i.name for i in backend.list("vmpool-")}
    assert (controller.server is not None) == serve
    if controller.server is not None:
        assert controller.server.stats.reclaimed_on_close == 1
    lease = client_for(controller).checkout(1, timeout=5)
    assert lease.names != [leased]


# -- check-out and check-in -------------------------------------------------------------------
def test_checkout_times_out_when_every_machine_is_held(start_pool: Factory) -> None:
    controller, _ = start_pool(1)
    controller.wait_until_ready(1, 10)
    client = client_for(controller, worker="gw3")
    lease = client.checkout(1, test="test_holds_it", timeout=5)
    started = time.monotonic()
    with pytest.raises(CheckoutTimeout) as info:
        client.checkout(1, test="test_waits", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    text = str(info.value)
    assert "size 1, 1 leased" in text
    assert f"{lease.names[0]} held by gw3" in text and "test_holds_it" in text
    assert controller.snapshot().queue == []  # the timed-out request left the line


def test_machine_freed_after_a_timeout_goes_to_the_next_request(start_pool: Factory) -> None:
    controller, _ = start_pool(1, checkin_policy="reuse")
    controller.wait_until_ready(1, 10)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    with pytest.raises(CheckoutTimeout):
        client.checkout(1, timeout=0.05)
    client.checkin(lease)
    again = client.checkout(1, timeout=2)
    assert again.names == lease.names


@pytest.mark.parametrize("serve", [True, False], ids=["server", "file"])
def test_interrupted_checkout_leaves_the_line(start_pool: Factory, serve: bool) -> None:
    controller, _ = start_pool(1, checkin_policy="reuse", serve=serve)
    controller.wait_until_ready(1, 10)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            client.checkout(1, timeout=5)  # waits in line until interrupted
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert controller.snapshot().queue == []
    if serve:
        # the interrupted call gave its connection up, and with it what this process held
        # on the pool (vmpool._wire.Connection): the earlier lease is reclaimed, not leaked
        assert controller.server is not None
        wait_until(lambda: controller.server is not None
                   and controller.server.stats.reclaimed_on_close == 1, 5, "the reclaim")
    client.checkin(lease)  # a lease taken back meanwhile is skipped, not an error
    again = client.checkout(1, timeout=5)  # the same client goes on, on a new connection
    assert len(again.names) == 1
    client.checkin(again)


def test_request_larger_than_the_pool_is_unavailable(start_pool: Factory) -> None:
    controller, _ = start_pool(1)
    with pytest.raises(PoolUnavailable, match=r"asked for 2 machines but pool .* has only 1"):
        client_for(controller).checkout(2, timeout=1)


def test_checkin_with_reset_restores_the_snapshot(start_pool: Factory) -> None:
    controller, _ = start_pool(1, checkin_policy="reset")
    controller.wait_until_ready(1, 10)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    lease.vms[0].exec("echo x > leftover", check=True)
    assert client.checkin(lease) == {lease.names[0]: "reset"}
    again = client.checkout(1, timeout=5)
    assert again.names == lease.names
    assert again.vms[0].exec("ls").stdout == ""
    client.checkin(again)


def test_a_lease_and_its_vms_are_freed_without_the_cyclic_collector(
    start_pool: Factory,
) -> None:
    """A VM pointing back at its lease made every check-out a reference cycle: garbage only
    the cyclic collector frees, whose full collections stalled busy workers for milliseconds."""
    controller, _ = start_pool(1, checkin_policy="reuse")
    controller.wait_until_ready(1, 10)
    client = client_for(controller, pre_ping=False)
    lease = client.checkout(1, timeout=5)
    lease.vms[0].mark_dirty()
    assert lease.dirty == {lease.names[0]}
    client.checkin(lease)
    gone = weakref.ref(lease)
    vm = weakref.ref(lease.vms[0])
    del lease
    assert gone() is None and vm() is None  # freed by reference counting, at once


def test_checkin_first_releases_what_the_backend_keeps_open_to_the_machines(
    start_pool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller, backend = start_pool(2, checkin_policy="reuse")
    controller.wait_until_ready(2, 10)
    events: list[str] = []
    monkeypatch.setattr(backend, "release", lambda name: events.append(f"release {name}"),
                        raising=False)
    client = client_for(controller)
    real_run = client.transport.run

    def run(op: Any) -> Any:
        events.append(op.kind)
        return real_run(op)

    monkeypatch.setattr(client.transport, "run", run)
    lease = client.checkout(2, timeout=5)
    events.clear()
    client.checkin(lease)
    # released before the check-in reaches the pool: the next holder finds the machines free
    assert events == [*(f"release {n}" for n in lease.names), "checkin"]


def test_checkin_after_failure_replaces_machine(start_pool: Factory) -> None:
    controller, backend = start_pool(1)
    controller.wait_until_ready(1, 10)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    assert client.checkin(lease, failed=True) == {lease.names[0]: "replace"}
    again = client.checkout(1, timeout=5)
    assert again.names != lease.names
    # the deletion is recorded just after the backend's delete returns: wait for both
    wait_until(
        lambda: [i.name for i in backend.list("vmpool-")] == again.names
        and controller.snapshot().stats.replaced == 1,
        what="the backend listing only the leased machine, the replacement recorded",
    )


def test_pre_ping_failure_replaces_the_machine_and_checkout_still_succeeds(
    start_pool: Factory,
) -> None:
    controller, backend = start_pool(2)
    controller.wait_until_ready(2, 10)
    first = ready_names(controller.snapshot())[0]  # the one a check-out is offered first
    backend.kill(first)
    client = client_for(controller)
    lease = client.checkout(1, timeout=5)
    assert lease.names != [first]
    wait_until(lambda: controller.snapshot().find(first) is None, what=f"{first} gone")
    wait_until(lambda: len(ready_names(controller.snapshot())) == 1,
               what=f"a replacement ({controller.snapshot().machines})")


def test_pre_ping_failure_in_a_multi_machine_checkout_still_succeeds(
    start_pool: Factory,
) -> None:
    controller, backend = start_pool(2)
    controller.wait_until_ready(2, 10)
    names = ready_names(controller.snapshot())
    backend.kill(names[0])
    lease = client_for(controller).checkout(2, timeout=5)
    assert len(lease.names) == 2 and names[0] not in lease.names and names[1] in lease.names
    m = controller.snapshot().machine(names[1])
    assert m.uses == 1  # the healthy machine went back unused, then was granted once


def test_wait_until_ready_returns_the_pool_snapshot(start_pool: Factory) -> None:
    controller, _ = start_pool(2)
    pool = controller.wait_until_ready(2, 10)
    assert pool.id == controller.pool_id
    assert pool.stats.created == 2 and pool.stats.first_ready_at is not None


def test_replace_only_pool_takes_no_snapshot(start_pool: Factory) -> None:
    controller, backend = start_pool(1, checkin_policy="replace", failure_policy="replace")
    pool = controller.wait_until_ready(1, 10)
    name = pool.machines[0].name
    assert not (backend.root / "machines" / name / "snapshot").exists()


def test_pool_that_may_reset_takes_a_snapshot(start_pool: Factory) -> None:
    controller, backend = start_pool(1, checkin_policy="replace", failure_policy="reset")
    pool = controller.wait_until_ready(1, 10)
    assert (backend.root / "machines" / pool.machines[0].name / "snapshot").is_dir()


@pytest.mark.parametrize("garbage", [b"{not json", b'{"schema_version": 2, "id": 3}', b""])
def test_teardown_with_a_corrupt_record_still_deletes_the_network(
    start_pool: Factory, state_dir: JsonStateDir, garbage: bytes
) -> None:
    controller, backend = start_pool(2)
    controller.wait_until_ready(2, 10)
    assert [n.name for n in backend.list_networks("")] == [f"{controller.pool_id}-net"]
    # e.g. a disk filled mid-write, or a hand edit; under the pool's lock, so that the owner,
    # who keeps the record in memory while busy (vmpool.writeback), lets go and reads it again
    with state_dir.store(controller.pool_id)._locked():
        controller.store.path.write_bytes(garbage)
    controller.stop()
    assert backend.list("") == []
    assert backend.list_networks("") == []


# -- errors of the maintainer thread ------------------------------------------------------------
def test_maintainer_survives_an_oserror_and_fails_waiting_checkouts_with_it(
    start_pool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller, _ = start_pool(1)
    controller.wait_until_ready(1, 10)
    client = client_for(controller, worker="gw1")
    held = client.checkout(1, test="test_holds_it", timeout=5)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("vmpool.controller.upkeep.plan", broken)
    started = time.monotonic()
    with pytest.raises(PoolUnavailable, match="OSError: \\[Errno 24\\] Too many open files"):
        client.checkout(1, test="test_waits", timeout=30)
    assert time.monotonic() - started < 5  # at once, not after the check-out timeout
    assert controller._thread is not None and controller._thread.is_alive()

    monkeypatch.undo()  # the cause goes away: the pool serves again
    wait_until(lambda: controller.snapshot().error is None, what="the error cleared")
    client.checkin(held)
    assert client.checkout(1, test="test_after", timeout=10).names


def test_a_failed_checkin_starts_its_replacement_at_once_not_at_the_next_tick(
    start_pool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease server tells the controller it has work; no periodic tick is needed."""
    controller, backend = start_pool(1)
    controller.wait_until_ready(1, 10)
    client = client_for(controller, pre_ping=False)
    lease = client.checkout(1, timeout=5)
    monkeypatch.setattr("vmpool.controller._TICK", 3600.0)
    monkeypatch.setattr("vmpool.controller._IDLE_TICK", 3600.0)
    time.sleep(0.3)  # let the controller settle into its (now hour-long) wait
    before = creates(backend)
    assert client.checkin(lease, failed=True) == {lease.names[0]: "replace"}
    wait_until(lambda: creates(backend) > before, 5, "the replacement's create")
