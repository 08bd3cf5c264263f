"""The controller's lease server: check-outs and check-ins over its socket, and the fallbacks."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vmpool import _wire, cli, ops
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config import Profile
from vmpool.controller import Controller, policy_for
from vmpool.errors import BackendError, CheckoutTimeout, PoolUnavailable, VmPoolError
from vmpool.ownership import ProcessRef, current_process
from vmpool.state import Holder, JsonStateDir, MachineState, Request
from vmpool.transport import LocalTransport, SocketTransport
from vmpool.writeback import WriteBackStore

Start = Callable[..., Controller]


@pytest.fixture
def start(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> Iterator[Callable[..., Controller]]:
    made: list[Controller] = []

    def go(directory: JsonStateDir = state_dir, *, serve: bool = True, **pool: Any) -> Controller:
        pool.setdefault("checkin_policy", "reuse")
        profile = make_profile(backoff=0.0, pre_ping=False, **pool)
        backend = SimBackend(profile.sim, directory.path)
        c = Controller(
            directory=directory,
            backend=backend,
            profile=profile,
            size=pool.get("size", 2),
            session="srv001",
            serve=serve,
        )
        c.start()
        made.append(c)
        c.wait_until_ready(c.size, 20)
        return c

    yield go
    for c in made:
        c.stop(lease_timeout=0)


def worker_client(c: Controller) -> PoolClient:
    """A client as a worker process makes one: its own store object on the state directory."""
    return PoolClient(
        c.directory.store(c.pool_id), c.backend, policy_for(c.profile, c.backend), pre_ping=False
    )


def test_checkouts_and_checkins_go_through_the_server(start: Start) -> None:
    c = start(size=2)
    assert c.server is not None and c.server.path.exists()
    client = worker_client(c)
    lease = client.checkout(2, timeout=5)
    assert sorted(lease.names) == sorted(m.name for m in c.snapshot().machines)
    assert all(lease.addresses[n] for n in lease.names)
    assert client.checkin(lease) == {n: "reuse" for n in lease.names}
    assert c.server.stats.ops == 2
    pool = c.directory.store(c.pool_id).read_current()
    assert pool is not None
    assert [m.uses for m in pool.machines] == [1, 1]
    assert all(m.state is MachineState.READY and m.holder is None for m in pool.machines)


def test_a_running_server_keeps_what_its_process_held_out_of_full_collections(
    start: Start,
) -> None:
    assert gc.get_freeze_count() == 0
    c = start(size=1)
    assert gc.get_freeze_count() > 1000  # modules, pytest's own objects: never walked now
    c.stop(lease_timeout=0)
    assert gc.get_freeze_count() == 0


def test_without_a_server_clients_use_the_file(start: Start) -> None:
    c = start(size=1, serve=False)
    assert c.server is None and not c.store.socket_path.exists()
    client = worker_client(c)
    client.checkin(client.checkout(1, timeout=5))
    pool = c.directory.store(c.pool_id).read()
    assert pool is not None and pool.stats.checkouts == 1


def test_stale_socket_is_ignored_by_clients_and_replaced_by_the_server(start: Start) -> None:
    c = start(size=1, serve=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(c.store.socket_path))  # bound, never listening, then gone: refuses
    stale.close()
    client = worker_client(c)
    client.checkin(client.checkout(1, timeout=5))  # falls back to the file
    c.stop(lease_timeout=0)
    c2 = start(size=1)  # a new controller claims the path
    assert c2.server is not None
    worker_client(c2).checkin(worker_client(c2).checkout(1, timeout=5))
    assert c2.server.stats.ops == 2


def test_long_state_dir_path_is_served(tmp_path: Path, start: Start) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    c = start(JsonStateDir(deep), size=1)
    assert len(str(c.store.socket_path)) > 108
    client = worker_client(c)
    client.checkin(client.checkout(1, timeout=5))
    assert c.server is not None and c.server.stats.ops == 2


def _request(name: str = "r1") -> ops.CheckoutStep:
    holder = Holder(**current_process().model_dump(), worker="raw")
    req = Request(id=name, holder=holder, since=0.0)
    return ops.CheckoutStep(request=req, now=1.0)


class _Raw:
    """A client speaking the wire protocol by hand on one connection (closing it gives up
    what its process holds, so tests look at the pool while it is open)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def call(self, *lines: bytes) -> list[dict[str, Any]]:
        self.sock.sendall(b"".join(lines))
        data = b""
        while data.count(b"\n") < len(lines):
            chunk = self.sock.recv(65536)
            assert chunk, "server closed the connection"
            data += chunk
        return [json.loads(line) for line in data.splitlines()]

    def close(self) -> None:
        self.sock.close()


def _raw_call(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send ``lines`` on one connection; their replies."""
    raw = _Raw(path)
    try:
        return raw.call(*lines)
    finally:
        raw.close()


def test_malformed_request_gets_an_error_and_the_rest_is_served(start: Start) -> None:
    c = start(size=1)
    assert c.server is not None
    bad, good = _raw_call(
        c.server.path, b'{"kind": "explode"}\n', _request().model_dump_json().encode() + b"\n"
    )
    assert "not a lease operation" in bad["error"]
    assert good["ok"]["granted"] == [c.snapshot().machines[0].name]


def test_operation_that_raises_is_dropped_alone(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = start(size=2)
    assert c.server is not None

    def broken(self: ops.CheckoutStep, pool: Any) -> Any:
        if self.request.id == "bad":
            pool.machines[0].state = MachineState.BROKEN  # a half-made change: rolled back
            raise RuntimeError("bug in an operation")
        return original(self, pool)

    original = ops.CheckoutStep._outcome
    monkeypatch.setattr(ops.CheckoutStep, "_outcome", broken)
    raw = _Raw(c.server.path)
    try:
        one, bad, two = raw.call(
            *(_request(r).model_dump_json().encode() + b"\n" for r in ("one", "bad", "two")),
        )
        assert "bug in an operation" in bad["error"]
        assert len(one["ok"]["granted"]) == len(two["ok"]["granted"]) == 1
        pool = c.snapshot()
        assert sorted(m.state for m in pool.machines) == [MachineState.LEASED] * 2
    finally:
        raw.close()


def test_pool_of_a_dead_controller_grants_nothing(start: Start, dead_process: ProcessRef) -> None:
    c = start(size=1, serve=False)
    with c.store.transaction() as pool:
        pool.owner = dead_process  # as if the controller had been SIGKILLed
    with pytest.raises(PoolUnavailable, match=r"controller .* is gone"):
        worker_client(c).checkout(1, timeout=5)
    with c.store.transaction() as pool:
        pool.owner = c.me


# -- check-ins: always answered ------------------------------------------------------------
def test_checkin_is_applied_before_the_next_checkout(start: Start) -> None:
    c = start(size=1)
    assert c.server is not None
    client = worker_client(c)
    for _ in range(20):  # one machine: each check-out needs the check-in sent just before it
        lease = client.checkout(1, timeout=5)
        assert client.checkin(lease) == {lease.names[0]: "reuse"}
    pool = c.directory.store(c.pool_id).read_current()
    assert pool is not None and pool.stats.checkouts == 20
    assert pool.machines[0].state is MachineState.READY and pool.machines[0].holder is None
    assert c.server.stats.ops == 40


def test_checkin_whose_reset_falls_to_this_process_resets_here(start: Start) -> None:
    # a reset with no spare is the holder's to do, so the holder must hear of it
    c = start(size=1, checkin_policy="reset")
    client = worker_client(c)
    lease = client.checkout(1, timeout=5)
    assert client.checkin(lease) == {lease.names[0]: "reset"}
    assert c.snapshot().machines[0].state is MachineState.READY
    assert c.snapshot().stats.reset == 1


def test_a_worker_reports_its_reset_to_the_server_not_through_the_file_lock(
    start: Start,
) -> None:
    # the owner holds the record's lock while it keeps it in memory: a worker taking it to
    # record its reset waited about 0.2 s per reset for the hand-over
    c = start(size=1, checkin_policy="reset")
    assert c.server is not None
    client = worker_client(c)
    lease = client.checkout(1, timeout=5)
    assert client.checkin(lease) == {lease.names[0]: "reset"}
    assert c.server.stats.ops == 3  # check-out, check-in, and the reset's outcome
    assert c.snapshot().machines[0].state is MachineState.READY
    assert c.snapshot().stats.reset == 1


def test_checkin_without_a_server_uses_the_file(start: Start) -> None:
    c = start(size=1, serve=False)
    client = worker_client(c)
    lease = client.checkout(1, timeout=5)
    assert client.checkin(lease) == {lease.names[0]: "reuse"}
    pool = c.directory.store(c.pool_id).read()
    assert pool is not None and pool.machines[0].state is MachineState.READY


_POST_AND_DIE = """
import os, signal, sys
from pathlib import Path
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config_backends import SimSettings
from vmpool.leases import Policy
from vmpool.state import JsonStateDir

directory = JsonStateDir(Path(sys.argv[1]))
client = PoolClient(
    directory.store(sys.argv[2]), SimBackend(SimSettings(), directory.path),
    Policy(checkin="reuse"), pre_ping=False,
)
lease = client.checkout(1, test="t::dies", timeout=10)
print(lease.names[0], flush=True)
client.checkin(lease)
os.kill(os.getpid(), signal.SIGKILL)  # at once: nothing flushed, closed or waited for
"""


def test_checkin_survives_its_sender_dying_at_once(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no reclaim meanwhile: the machine must come back through the check-in itself
    monkeypatch.setattr("vmpool.controller._RECLAIM_EVERY", 3600.0)
    c = start(size=1)
    proc = subprocess.run(
        [sys.executable, "-c", _POST_AND_DIE, str(c.directory.path), c.pool_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name = proc.stdout.strip()

    def returned() -> bool:
        m = c.snapshot().machine(name)
        return m.state is MachineState.READY and m.holder is None

    deadline = time.monotonic() + 10
    while not returned():
        assert time.monotonic() < deadline, c.snapshot().machine(name)
        time.sleep(0.01)
    assert c.snapshot().stats.reclaimed == 0
    assert c.snapshot().machine(name).uses == 1


def test_a_worker_never_writes_the_pool_file_while_its_controller_lives(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the lease server is the only writer: a check-out, a cancel at the deadline, a failed
    # pre-ping and a check-in are all operations it answers
    c = start(size=2)
    store = c.directory.store(c.pool_id)

    def forbidden(*args: object, **kwargs: object) -> Any:
        raise AssertionError("a worker wrote the pool file during a live session")

    monkeypatch.setattr(store, "transaction", forbidden)
    monkeypatch.setattr(store, "_write", forbidden)
    real_exec = c.backend.exec
    pings: list[str] = []

    def exec_failing_first_ping(name: str, argv: list[str], timeout: float) -> Any:
        pings.append(name)
        if len(pings) == 1:
            raise BackendError(f"{name}: not answering")
        return real_exec(name, argv, timeout)

    monkeypatch.setattr(c.backend, "exec", exec_failing_first_ping)
    client = PoolClient(store, c.backend, policy_for(c.profile, c.backend), pre_ping=True)
    both = client.checkout(2, timeout=20)  # the first ping fails: replaced, asked again
    assert len(pings) >= 3 and c.snapshot().stats.checkouts >= 1
    with pytest.raises(CheckoutTimeout):
        client.checkout(1, timeout=0.05)  # leaves the line through the server
    assert client.checkin(both) == {n: "reuse" for n in both.names}
    assert not c.snapshot().queue


# -- events, not polls ---------------------------------------------------------------------
def test_a_waiting_checkout_is_answered_at_the_checkin_that_frees_a_machine(
    start: Start,
) -> None:
    """The waiter sends one request and hears back within 20 ms of the check-in; nothing is
    re-sent meanwhile (the server counts what it received)."""
    c = start(size=1)
    assert c.server is not None
    holder, waiter = worker_client(c), worker_client(c)
    delays = []
    for _ in range(5):
        lease = holder.checkout(1, timeout=5)
        got: list[float] = []
        thread = threading.Thread(target=_timed_checkout, args=(waiter, got))
        before = dict(c.server.stats.requests)
        thread.start()
        deadline = time.monotonic() + 10
        while not c.server._waiting:  # the waiter is in line
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.2)  # a poller would have re-sent its request many times by now
        holder.checkin(lease)
        freed = time.monotonic()
        thread.join(10)
        delays.append(got[0] - freed)
        after = c.server.stats.requests
        # the holder's check-in, the waiter's one check-out and its check-in, nothing else
        assert after.get("checkout", 0) - before.get("checkout", 0) == 1
        assert after.get("checkin", 0) - before.get("checkin", 0) == 2
    assert sorted(delays)[2] < 0.02, delays


def _timed_checkout(client: PoolClient, answered: list[float]) -> None:
    lease = client.checkout(1, timeout=10)
    answered.append(time.monotonic())
    client.checkin(lease)


_HOLD_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config_backends import SimSettings
from vmpool.leases import Policy
from vmpool.state import JsonStateDir

directory = JsonStateDir(Path(sys.argv[1]))
client = PoolClient(
    directory.store(sys.argv[2]), SimBackend(SimSettings(), directory.path),
    Policy(checkin="reuse"), pre_ping=False, worker="gw9",
)
lease = client.checkout(1, test="t::killed", timeout=10)
print(lease.names[0], flush=True)
time.sleep(600)
"""


def test_a_worker_killed_mid_lease_is_reclaimed_when_its_connection_closes(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no liveness sweep meanwhile: only the closed connection can tell the server
    monkeypatch.setattr("vmpool.controller._RECLAIM_EVERY", 3600.0)
    c = start(size=1)
    assert c.server is not None
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_UNTIL_KILLED, str(c.directory.path), c.pool_id],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert c.snapshot().machine(name).state is MachineState.LEASED
        proc.kill()
        killed = time.monotonic()
        proc.wait(10)
        while c.snapshot().stats.reclaimed == 0:
            assert time.monotonic() - killed < 1.0, c.snapshot().machine(name)
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(10)
    assert c.server.stats.reclaimed_on_close == 1
    # the failure policy applies (the test died in it): replaced, not handed on as it was
    assert c.snapshot().find(name) is None or c.snapshot().machine(name).holder is None


def test_status_shows_a_lease_made_a_moment_ago(
    start: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file lags the live record by up to a write-back interval; status asks the server."""
    c = start(size=1)
    assert isinstance(c.store, WriteBackStore)
    c.store.write_interval = 30.0  # the file would be 30 s behind
    time.sleep(0.05)  # let the write-back of warm-up land first
    client = worker_client(c)
    lease = client.checkout(1, test="t::now", timeout=5)
    made = time.monotonic()
    assert cli.main(["status", "--json", "--state-dir", str(c.directory.path)]) == 0
    asked = time.monotonic() - made
    doc = json.loads(capsys.readouterr().out)
    (machine,) = [m for p in doc["pools"] if p["id"] == c.pool_id for m in p["machines"]]
    assert machine["state"] == "leased" and machine["test"] == "t::now", (asked, machine)
    client.checkin(lease)


def test_lease_flows_run_through_an_in_process_transport(start: Start) -> None:
    c = start(size=1)
    assert c.server is not None
    client = PoolClient(c.store, c.backend, policy_for(c.profile, c.backend), pre_ping=False,
                        transport=LocalTransport(c.server))
    lease = client.checkout(1, timeout=5)
    with pytest.raises(CheckoutTimeout, match="size 1, 1 leased"):
        client.checkout(1, timeout=0.1)  # the server times the wait out
    assert client.checkin(lease) == {lease.names[0]: "reuse"}
    assert c.server.stats.requests["checkout"] == 2 and not c.snapshot().queue


def test_a_lease_keeps_its_connection_after_the_client_object_is_dropped(start: Start) -> None:
    """The connection is the lease's lifeline: it lives as long as the lease does."""
    c = start(size=1)
    assert c.server is not None
    lease = worker_client(c).checkout(1, timeout=5)  # the client object is garbage at once
    gc.collect()
    time.sleep(0.2)  # a closed connection would have been reclaimed within milliseconds
    assert c.snapshot().machine(lease.names[0]).state is MachineState.LEASED
    assert c.server.stats.reclaimed_on_close == 0
    del lease
    gc.collect()
    wait_until(lambda: c.server is not None and c.server.stats.reclaimed_on_close == 1, 5,
               "the reclaim once the lease is dropped too")


# -- review of the rebuilt lease layer (issue 16) ------------------------------------------
def test_a_waiting_checkout_and_its_cancel_in_one_batch_are_answered_in_order(
    start: Start,
) -> None:
    """An interrupted client's check-out and the Cancel that follows it can reach the server
    together: the check-out is answered first, so replies stay paired with requests."""
    c = start(size=1)
    assert c.server is not None
    holder = worker_client(c)
    lease = holder.checkout(1, timeout=5)  # nothing free: the raw check-out would wait
    step = _request("waits").model_copy(update={"wait": 30.0})
    cancel = ops.Cancel(request="waits", holder=step.request.holder, now=2.0)
    raw = _Raw(c.server.path)
    try:
        first, second = raw.call(step.model_dump_json().encode() + b"\n",
                                 cancel.model_dump_json().encode() + b"\n")
        assert "problem" in first["ok"] and "granted" in first["ok"], (first, second)
        assert first["ok"]["problem"] is not None
        assert "problem" not in second["ok"], (first, second)
        assert not c.server._waiting and not c.snapshot().queue
    finally:
        raw.close()
    holder.checkin(lease)


def test_an_interrupt_after_the_grant_gives_the_machines_back(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt during the pre-ping (pytest-timeout's signal, a ^C) after the grant came:
    nobody will check that lease in, so the check-out gives it back before it raises."""
    c = start(size=1)
    client = PoolClient(c.directory.store(c.pool_id), c.backend,
                        policy_for(c.profile, c.backend), pre_ping=True)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(c.backend, "exec", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.checkout(1, timeout=5)
    monkeypatch.undo()
    (machine,) = c.snapshot().machines
    assert machine.state is MachineState.READY and machine.holder is None, machine
    client.checkin(client.checkout(1, timeout=5))


def test_a_forked_child_does_not_keep_its_parents_connection_open(start: Start) -> None:
    """The connection is the parent's lifeline: a child forked meanwhile (multiprocessing, a
    test's helper) must not hold it open, or the parent's death goes unseen while it lives."""
    c = start(size=1)
    assert c.server is not None
    client = worker_client(c)
    client.checkout(1, timeout=5)
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: lives until told, touches nothing
        os.close(release_w)
        os.read(release_r, 1)
        os._exit(0)
    os.close(release_r)
    try:
        client.close()  # as if the parent had died
        closed = time.monotonic()
        while c.server.stats.reclaimed_on_close == 0:
            assert time.monotonic() - closed < 1.0, "the child keeps the connection open"
            time.sleep(0.005)
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


def _error_after(c: Controller, waiter: PoolClient, event: Callable[[], None]) -> tuple[
    Exception, float
]:
    """The error a check-out waiting in line gets from ``event``, and how long after it."""
    errors: list[tuple[Exception, float]] = []

    def wait() -> None:
        try:
            waiter.checkout(1, timeout=60)
        except VmPoolError as exc:
            errors.append((exc, time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    deadline = time.monotonic() + 10
    assert c.server is not None
    while not c.server._waiting:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    event()
    happened = time.monotonic()
    thread.join(10)
    (error, when), = errors
    return error, when - happened


@pytest.mark.parametrize("local", [False, True], ids=["socket", "in-process"])
def test_waiting_checkouts_hear_at_once_that_the_server_stopped(
    start: Start, local: bool
) -> None:
    c = start(size=1)
    assert c.server is not None
    holder = worker_client(c)
    holder.checkout(1, timeout=5)
    waiter = worker_client(c)
    if local:
        waiter.transport = LocalTransport(c.server)
    error, after = _error_after(c, waiter, c.server.stop)
    assert after < 1.0 and "stopped" in str(error), error
    holder.close()


def test_waiting_checkouts_hear_at_once_that_the_pool_is_closing(start: Start) -> None:
    c = start(size=1)
    holder = worker_client(c)
    holder.checkout(1, timeout=5)
    error, after = _error_after(c, worker_client(c), c.begin_closing)
    assert isinstance(error, PoolUnavailable) and after < 0.5, error
    assert not c.snapshot().queue


def test_interrupts_at_any_moment_of_a_checkout_never_leak_or_double_grant(
    start: Start,
) -> None:
    """A SIGALRM (setitimer) raises KeyboardInterrupt at a random moment inside the library
    while check-outs race another client's grants and check-ins. Afterwards every machine is
    free (none leased to nobody) and no machine was ever held by both clients at once."""
    c = start(size=2)
    assert c.server is not None
    main, other = worker_client(c), worker_client(c)
    assert isinstance(main.transport, SocketTransport)
    main.transport._conn.timeout = 2.0  # a lost reply shows as a 2 s wait, not 40 s
    held: dict[str, str] = {}
    guard = threading.Lock()
    problems: list[str] = []

    def take(who: str, names: list[str]) -> None:
        with guard:
            for n in names:
                if n in held:
                    problems.append(f"{n} granted to {who} while {held[n]} holds it")
                held[n] = who

    def give(names: list[str]) -> None:
        with guard:
            for n in names:
                held.pop(n, None)

    stop = threading.Event()

    def churn() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            try:
                lease = other.checkout(rng.choice((1, 2)), timeout=2)
            except CheckoutTimeout:
                continue
            take("other", lease.names)
            time.sleep(rng.random() * 0.003)
            give(lease.names)
            other.checkin(lease)

    armed = [False]
    fired = [0]
    slow: list[float] = []

    def alarm(signum: int, frame: Any) -> None:
        # only inside the library: an interrupt in this test's own code would lose a lease
        # the test holds, which is the test's bug, not the library's
        f, inside = frame, False
        while f is not None and f.f_code.co_filename != __file__:
            inside = inside or "/vmpool/" in f.f_code.co_filename
            f = f.f_back
        if armed[0] and inside:
            armed[0] = False
            fired[0] += 1
            raise KeyboardInterrupt

    thread = threading.Thread(target=churn)
    old = signal.signal(signal.SIGALRM, alarm)
    thread.start()
    rng = random.Random(2)
    try:
        for _ in range(300):
            armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, rng.random() * 0.0015 + 0.0001)
            begun = time.monotonic()
            try:
                lease = main.checkout(1, timeout=2)
            except (KeyboardInterrupt, CheckoutTimeout):
                # never the wait for a reply that was read and lost, so never came
                slow.append(time.monotonic() - begun)
                continue
            finally:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            take("main", lease.names)
            give(lease.names)
            main.checkin(lease)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        stop.set()
        thread.join(20)
    assert not problems, problems
    assert max(slow, default=0.0) < 1.5, sorted(slow)[-3:]
    assert fired[0] > 20, fired  # the interrupts did land inside check-outs
    pool = c.snapshot()
    assert not pool.queue, pool.queue
    assert [m.state for m in pool.machines] == [MachineState.READY] * 2, pool.machines


def test_one_of_two_clients_in_a_process_closing_leaves_the_others_lease(start: Start) -> None:
    """EOF reclaim is per process: while the process speaks through another connection, what
    it holds is still its own."""
    c = start(size=2)
    assert c.server is not None
    first, second = worker_client(c), worker_client(c)
    first.checkout(1, timeout=5)
    kept = second.checkout(1, timeout=5)
    first.close()
    deadline = time.monotonic() + 0.3  # the close is seen within this (the EOF test: < 1 s)
    while time.monotonic() < deadline:
        assert c.snapshot().machine(kept.names[0]).state is MachineState.LEASED
        time.sleep(0.01)
    assert c.server.stats.reclaimed_on_close == 0
    assert second.checkin(kept) == {kept.names[0]: "reuse"}


def test_a_request_handed_over_as_the_server_stops_is_answered(start: Start) -> None:
    """Between the serving thread's end and stop() returning, submit() still answers."""
    c = start(size=1)
    server = c.server
    assert server is not None and server._thread is not None
    server._stopping = True
    server._wake()
    server._thread.join(10)  # the thread is gone; stop() has not yet returned
    future = server.submit(ops.Status().model_dump_json().encode())
    assert isinstance(future.result(timeout=2), _wire.Failure)
    server.stop()
