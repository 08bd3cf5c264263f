"""The PostgreSQL lease store at the operation level, on a throwaway server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from vmpool.errors import CheckoutTimeout, StoreUnsafe
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore, holder_id, redacted

HOLDER = Path(__file__).with_name("holder.py")
ROOT = Path(__file__).parents[2]


@pytest.fixture
def pool(pg: throwaway.Throwaway) -> str:
    return "pool-" + uuid.uuid4().hex[:8]


def _store(pg: throwaway.Throwaway, pool: str, who: str = "t", **kw: float) -> PgStore:
    store = PgStore(pg.dsn, pool, holder_id("s", who, host="test"), **kw)
    store.migrate()
    return store


@pytest.fixture
def store(pg: throwaway.Throwaway, pool: str) -> Iterator[PgStore]:
    s = _store(pg, pool)
    yield s
    s.close()


def _spawn(pg: throwaway.Throwaway, pool: str, name: str, mode: str, markers: Path,
           seconds: float, lease: float = 30) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEASE": str(lease)}
    return subprocess.Popen(
        [sys.executable, str(HOLDER), pg.dsn, pool, name, mode, str(markers), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait(probe: object, timeout: float) -> float:
    """Seconds until ``probe()`` is true; fails the test at ``timeout``."""
    start = time.monotonic()
    while not probe():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, f"not true within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_checkin_with_outcome_sets_state(store: PgStore) -> None:
    store.add_machines("p", ["a", "b", "c"])
    a, b, c = store.checkout("p", 3, timeout=5)
    assert store.checkin(a, "ok") and store.checkin(b, "dirty") and store.checkin(c, "failed")
    states = {n: s for n, (s, _, _) in store.machines().items()}
    assert states == {"a": "ready", "b": "resetting", "c": "broken"}
    assert store.reset_done("b", b.generation)
    assert store.machines()["b"][0] == "ready"


def test_retried_request_id_finds_its_grant(store: PgStore) -> None:
    store.add_machines("p", ["a", "b"])
    first = store.checkout("p", 1, timeout=5, request_id="r1")
    again = store.checkout("p", 1, timeout=5, request_id="r1")
    assert first == again
    assert [s for s, _, _ in store.machines().values()].count("leased") == 1


def test_cancel_returns_granted_machines(store: PgStore) -> None:
    store.add_machines("p", ["a"])
    store.checkout("p", 1, timeout=5, request_id="r")
    assert store.cancel("r") == ["a"]
    assert store.machines()["a"][0] == "ready"


def test_stale_generation_changes_nothing(store: PgStore, pg: throwaway.Throwaway,
                                          pool: str) -> None:
    store.add_machines("p", ["a"])
    old = store.checkout("p", 1, timeout=5)[0]
    with psycopg.connect(pg.dsn, autocommit=True) as c:  # the lease expires
        c.execute("UPDATE vmpool_machines SET expires = 0 WHERE pool = %s", (pool,))
    assert store.reclaim() == ["a"]
    assert store.reset_done("a", old.generation)
    other = _store(pg, pool, "other")
    new = other.checkout("p", 1, timeout=5)[0]
    assert new.generation == old.generation + 1
    assert not store.checkin(old) and not store.mark_unhealthy(old, "late")
    assert store.machines()["a"] == ("leased", new.generation, other.holder)
    other.close()


def test_three_machine_request_keeps_its_place_among_one_machine_requests(
    pg: throwaway.Throwaway, pool: str
) -> None:
    admin = _store(pg, pool, "admin")
    admin.add_machines("p", ["a", "b", "c"])
    held = admin.checkout("p", 1, timeout=5)[0]
    got: list[str] = []
    big = _store(pg, pool, "big")
    t = threading.Thread(
        target=lambda: got.extend(g.name for g in big.checkout("p", 3, timeout=10))
    )
    t.start()
    _wait(lambda: admin._retrying("count", lambda c: c.execute(
        "SELECT count(*) FROM vmpool_requests WHERE pool=%s AND state='waiting'", (pool,)
    ).fetchone())[0] == 1, 5)
    small = _store(pg, pool, "small", poll=0.005)
    # two machines are free, but a 1-machine request arriving later must wait behind the 3
    with pytest.raises(CheckoutTimeout, match="became free"):
        small.checkout("p", 1, timeout=0.3)
    admin.checkin(held)
    t.join(10)
    assert sorted(got) == ["a", "b", "c"]
    for s in (admin, big, small):
        s.close()


def test_synchronous_commit_off_is_refused(pg: throwaway.Throwaway, pool: str) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("ALTER ROLE postgres SET synchronous_commit = off")
    try:
        with pytest.raises(StoreUnsafe, match=r"host=.*synchronous_commit is 'off'") as info:
            _store(pg, pool)
        assert "password" not in str(info.value)
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("ALTER ROLE postgres RESET synchronous_commit")


def test_redacted_dsn_hides_password() -> None:
    assert "hunter2" not in redacted("postgresql://u:hunter2@localhost/db")
    assert "localhost" in redacted("postgresql://u:hunter2@localhost/db")


def test_sigkilled_holder_is_reclaimed_within_a_second(
    pg: throwaway.Throwaway, pool: str, tmp_path: Path
) -> None:
    store = _store(pg, pool)
    store.add_machines("p", ["a"])
    proc = _spawn(pg, pool, "victim", "hold", tmp_path, 0)
    assert proc.stdout is not None
    name = proc.stdout.readline().split()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    took = _wait(lambda: store.reclaim() == [name], 5)
    assert took < 1.0
    store.close()


def test_stopped_holder_past_its_lease_is_fenced(
    pg: throwaway.Throwaway, pool: str, tmp_path: Path
) -> None:
    store = _store(pg, pool)
    store.add_machines("p", ["a"])
    proc = _spawn(pg, pool, "sleeper", "hold", tmp_path, 0, lease=0.3)
    assert proc.stdout is not None and proc.stdin is not None
    name, gen = proc.stdout.readline().split()
    proc.send_signal(signal.SIGSTOP)
    _wait(lambda: store.reclaim() == [name], 5)  # its connection lives; the lease expired
    assert store.reset_done(name, int(gen))
    new = store.checkout("p", 1, timeout=5)[0]
    proc.send_signal(signal.SIGCONT)
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "fenced"
    proc.wait(10)
    assert store.machines()[name] == ("leased", new.generation, store.holder)
    store.close()


def _cycle_run(pg: throwaway.Throwaway, pool: str, markers: Path, procs: int, seconds: float,
               crash: bool = False) -> list[list[int]]:
    store = _store(pg, pool)
    store.add_machines("p", [f"m{i}" for i in range(4)])
    store.close()
    workers = [_spawn(pg, pool, f"w{i}", "cycle", markers, seconds) for i in range(procs)]
    if crash:
        time.sleep(seconds / 3)  # mid-run, whatever the holders are doing at that moment
        pg.restart_crash()
    results = []
    for w in workers:
        out, err = w.communicate(timeout=seconds + 60)
        assert w.returncode == 0, err
        for line in err.splitlines():  # every error a client saw names the store and cause
            assert "postgresql" in line or "host=" in line, line
        results.append([int(x) for x in out.split()])
    return results


def test_no_double_grant_under_eight_processes(
    pg: throwaway.Throwaway, pool: str, tmp_path: Path
) -> None:
    results = _cycle_run(pg, pool, tmp_path, 8, 3)
    assert all(r[0] > 0 for r in results) and sum(r[2] for r in results) == 0
    assert sum(r[1] for r in results) == 0


def test_crash_restart_mid_run_loses_no_machine_and_grants_none_twice(
    pg: throwaway.Throwaway, pool: str, tmp_path: Path
) -> None:
    results = _cycle_run(pg, pool, tmp_path, 4, 4, crash=True)
    assert sum(r[1] for r in results) == 0
    store = _store(pg, pool)
    _wait(lambda: (store.reclaim() or True) and all(
        s == "ready" or s == "resetting" for s, _, _ in store.machines().values()), 10)
    assert len(store.machines()) == 4
    store.close()
