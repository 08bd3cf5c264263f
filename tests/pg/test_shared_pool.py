"""One pool on PostgreSQL shared by several sessions: one controller elected, the others
attached; a leader that leaves or dies is replaced; the last session destroys the pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._waiting import wait_until
from tests.pg.conftest import Start
from vmpool.client import PoolClient
from vmpool.controller import Controller, policy_for
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore
from vmpool.state import JsonStateDir, MachineState

LEADER = Path(__file__).with_name("leader.py")
ROOT = Path(__file__).parents[2]
def _client(c: Controller, directory: JsonStateDir) -> PoolClient:
    assert isinstance(c.store, PgStore)
    store = PgStore(c.store.dsn, c.pool_id, lease=2.0)
    return PoolClient(store, c.backend, policy_for(c.profile, c.backend), pre_ping=False)


def _listed(c: Controller) -> set[str]:
    return {i.name for i in c.backend.list(c.pool_id + "-")}


def _leading(*cs: Controller) -> list[bool]:
    return [c.shared is not None and c.shared.leading for c in cs]


def test_sessions_share_one_pool_under_one_elected_controller(
    start: Start, directory: JsonStateDir
) -> None:
    a = start("sa")
    b = start("sb")
    assert a.pool_id == b.pool_id
    assert _leading(a, b) == [True, False]
    a.wait_until_ready(2, 30)
    client = _client(b, directory)  # a worker of session b
    lease = client.checkout(2, timeout=10)
    assert len(lease.names) == 2
    client.checkin(lease)
    client.close()


def test_a_leaving_leader_is_replaced_and_the_last_session_destroys_the_pool(
    start: Start, directory: JsonStateDir
) -> None:
    a = start("sa")
    b = start("sb")
    a.wait_until_ready(2, 30)
    assert a.stop() is not None
    wait_until(lambda: _leading(b) == [True], 3, "b taking over")
    pool = b.snapshot()
    assert pool.owner is not None and pool.owner.same_process(b.me)
    machines = {m.name for m in pool.machines}
    assert len(machines) == 2 and machines <= _listed(b)  # a spared them
    client = _client(b, directory)
    client.checkin(client.checkout(1, timeout=10))
    client.close()
    b.stop()
    assert b.store.read() is None
    assert not machines & _listed(b)


def test_a_killed_leaders_pool_is_taken_over_and_keeps_serving(
    pg: throwaway.Throwaway, start: Start, directory: JsonStateDir, prefix: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMPOOL_HOST_ID": "host-a"}
    leader = subprocess.Popen(
        [sys.executable, str(LEADER), pg.dsn, str(directory.path), prefix, "sa"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "leading"
        b = start("sb")
        assert _leading(b) == [False]
        client = _client(b, directory)
        held = client.checkout(1, timeout=10)
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
        wait_until(lambda: _leading(b) == [True], 3, "b taking over")
        # the pool keeps serving: a machine the dead controller never replaced is replaced
        client.checkin(held, failed=True)  # failure policy: replace (b's job now)
        wait_until(lambda: sum(m.state is MachineState.READY for m in b.snapshot().machines)
                   == 2, 30, "the replacement")
        lease = client.checkout(2, timeout=10)
        client.checkin(lease)
        client.close()
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)


def test_status_shows_the_shared_pool_and_its_holders(
    start: Start, directory: JsonStateDir, pg: throwaway.Throwaway
) -> None:
    from vmpool.status import status_doc

    a = start("sa")
    a.wait_until_ready(2, 30)
    client = _client(a, directory)
    lease = client.checkout(1, test="t::x", timeout=10)
    doc = status_doc(directory, pg.dsn)
    (pool,) = [p for p in doc["pools"] if p["id"] == a.pool_id]
    assert pool["shared"] and pool["owner_alive"]
    (held,) = [m for m in pool["machines"] if m["state"] == "leased"]
    assert held["name"] == lease.names[0] and held["test"] == "t::x"
    client.checkin(lease)
    client.close()


@pytest.mark.slow
def test_after_a_server_crash_one_session_leads_again_and_the_pool_serves(
    pg: throwaway.Throwaway, start: Start, directory: JsonStateDir
) -> None:
    a = start("sa")
    b = start("sb")
    a.wait_until_ready(2, 30)
    pg.restart_crash()
    wait_until(lambda: sum(_leading(a, b)) == 1, 30, "one leader again")
    client = _client(b, directory)
    lease = client.checkout(2, timeout=20)
    client.checkin(lease)
    client.close()
    assert sum(_leading(a, b)) == 1 and b.snapshot().error is None
