"""The PostgreSQL store under faults: killed, stopped and crashed processes and servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests._waiting import wait_until
from tests.pg.conftest import new_pool, pool_id
from vmpool import leases, ops
from vmpool.errors import StoreUnsafe
from vmpool.ownership import current_process
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore, connect, redacted
from vmpool.pgstore.transport import StoreTransport, reclaim
from vmpool.state import Holder, MachineState, Request

HOLDER = Path(__file__).with_name("holder.py")
ROOT = Path(__file__).parents[2]
POLICY = leases.Policy(checkin="reuse", failure="reuse")


def _pool(pg: throwaway.Throwaway, machines: int, lease: float = 30.0) -> PgStore:
    store = PgStore(pg.dsn, pool_id(), lease=lease)
    store.create(new_pool(store.pool_id, machines))
    return store


def _spawn(pg: throwaway.Throwaway, store: PgStore, mode: str, markers: Path, seconds: float,
           *, lease: float = 30.0, host: str = "host-b") -> subprocess.Popen[str]:
    # another "host": psutil cannot tell this process's liveness, its lifeline must
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEASE": str(lease), "VMPOOL_HOST_ID": host}
    return subprocess.Popen(
        [sys.executable, str(HOLDER), pg.dsn, store.pool_id, mode, str(markers), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )


def _states(store: PgStore) -> dict[str, MachineState]:
    pool = store.read()
    assert pool is not None
    return {m.name: m.state for m in pool.machines}


def test_a_sigkilled_holder_on_another_host_is_reclaimed_within_a_second(
    pg: throwaway.Throwaway, tmp_path: Path
) -> None:
    store = _pool(pg, 1)
    proc = _spawn(pg, store, "hold", tmp_path, 0)
    assert proc.stdout is not None
    name = proc.stdout.readline().split()[0]
    assert reclaim(store, POLICY) == []  # alive: its lifeline is connected and beating
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(10)
    wait_until(lambda: reclaim(store, POLICY) == [name], 5, "the reclaim")
    assert time.monotonic() - killed < 1.0
    assert _states(store)[name] is MachineState.RESETTING  # a test died in it: reset
    store.remove()


def test_a_holder_stopped_past_its_lease_is_fenced_off_when_it_resumes(
    pg: throwaway.Throwaway, tmp_path: Path
) -> None:
    store = _pool(pg, 1, lease=0.6)
    proc = _spawn(pg, store, "hold", tmp_path, 0, lease=0.6)
    assert proc.stdout is not None and proc.stdin is not None
    name, generation = proc.stdout.readline().split()
    proc.send_signal(signal.SIGSTOP)
    try:
        # its connection lives on; its heartbeat stops and its lease expires
        wait_until(lambda: reclaim(store, POLICY) == [name], 10, "the expired lease")
        t = StoreTransport(store, POLICY)
        t.run(ops.ResetDone(name=name, ok=True, now=time.time()))
        me = Holder(**current_process().model_dump(), request="new", since=time.time())
        reply = t.run(ops.CheckoutStep(request=Request(id="new", holder=me, since=me.since),
                                       now=me.since))
        assert reply.granted == [name]
    finally:
        proc.send_signal(signal.SIGCONT)
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "fenced"
    proc.wait(10)
    pool = store.read()
    assert pool is not None
    m = pool.machine(name)
    assert m.state is MachineState.LEASED and m.holder is not None
    assert m.holder.request == "new" and m.generation == int(generation) + 1
    store.remove()


def _cycle(pg: throwaway.Throwaway, store: PgStore, markers: Path, procs: int,
           seconds: float, *, crash: bool = False) -> list[list[int]]:
    workers = [_spawn(pg, store, "cycle", markers, seconds, host=f"host-{i}")
               for i in range(procs)]
    if crash:
        time.sleep(seconds / 3)  # the behaviour under test: a crash mid-run, whatever comes
        pg.restart_crash()
    results = []
    for w in workers:
        out, err = w.communicate(timeout=seconds + 60)
        assert w.returncode == 0, err
        for line in err.splitlines():  # every error a client saw names the store and cause
            if line.startswith("holder error:"):  # (not psycopg's own log lines)
                assert "host=" in line, line
        results.append([int(x) for x in out.split()])
    return results


def test_no_machine_is_leased_twice_by_eight_processes(
    pg: throwaway.Throwaway, tmp_path: Path
) -> None:
    store = _pool(pg, 3)
    results = _cycle(pg, store, tmp_path, 8, 3)
    assert all(r[0] > 0 for r in results), results
    assert sum(r[1] for r in results) == 0 and sum(r[2] for r in results) == 0
    assert set(_states(store).values()) == {MachineState.READY}
    store.remove()


@pytest.mark.slow
def test_a_server_crash_mid_run_leases_nothing_twice_and_loses_no_machine(
    pg: throwaway.Throwaway, tmp_path: Path
) -> None:
    store = _pool(pg, 3)
    results = _cycle(pg, store, tmp_path, 4, 6, crash=True)
    assert sum(r[1] for r in results) == 0, results  # no double lease
    assert all(r[0] > 0 for r in results), results
    # nothing lost: every machine back to ready, and no live holder taken for dead
    pool = store.read()
    assert pool is not None
    assert {m.state for m in pool.machines} == {MachineState.READY}
    assert pool.stats.reclaimed == 0 and pool.queue == []
    assert pool.stats.checkouts == sum(r[0] for r in results)
    store.remove()


def test_a_server_with_synchronous_commit_off_is_refused(pg: throwaway.Throwaway) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("ALTER ROLE postgres SET synchronous_commit = off")
    try:
        with pytest.raises(StoreUnsafe, match=r"host=.*synchronous_commit is 'off'.*RESET"):
            connect(pg.dsn + "&password=hunter2", 5)
        with pytest.raises(StoreUnsafe) as info:
            PgStore(pg.dsn + "&password=hunter2", "p1").read()
        assert "hunter2" not in str(info.value)
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("ALTER ROLE postgres RESET synchronous_commit")


def test_redacted_dsn_hides_the_password() -> None:
    shown = redacted("postgresql://u:hunter2@localhost/db")
    assert "hunter2" not in shown and "localhost" in shown
