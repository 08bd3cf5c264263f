"""`vmpool gc` and `vmpool down` for pools on a shared store: a pool whose sessions all died
is destroyed, one with an attached session is spared (down: refused unless --force), and a
session attaching while they run never loses its machines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests._waiting import wait_until
from tests.pg.conftest import Start
from vmpool.backends.base import Backend
from vmpool.backends.sim import SimBackend
from vmpool.cli import main
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller
from vmpool.errors import StateError
from vmpool.pgstore import closing, throwaway
from vmpool.pgstore.election import Election
from vmpool.pgstore.store import PgStore, migrate, pool_ids, redacted
from vmpool.state import JsonStateDir, MachineState, Pool
from vmpool.teardown import Leftovers

LEADER = Path(__file__).with_name("leader.py")
ROOT = Path(__file__).parents[2]
SECRET = "s3cret-pw"


@pytest.fixture
def store_dsn(pg: throwaway.Throwaway) -> Iterator[str]:
    """A database of its own on the throwaway server (gc sees only this test's pools), its
    DSN carrying a password (ignored by the server's trust auth) that no message may show."""
    name = "gc" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = pg.dsn.replace("postgresql:///postgres?", f"postgresql:///{name}?") + \
        f"&password={SECRET}"
    migrate(url)
    yield url
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def dsn(store_dsn: str) -> str:
    return store_dsn


def _backend(directory: JsonStateDir) -> SimBackend:
    return SimBackend(SimSettings(), directory.path)


def _listed(directory: JsonStateDir, pool_id: str) -> set[str]:
    return {i.name for i in _backend(directory).list(pool_id + "-")}


@pytest.fixture
def config(tmp_path: Path, dsn: str, prefix: str, directory: JsonStateDir) -> Path:
    # the sessions beat every 0.67 s (their lease 2 s); gc judges them by 5 s: a loaded host
    # delaying a live session's beat never makes gc end it
    path = tmp_path / "pool.toml"
    path.write_text(
        f'[pool]\nbackend = "sim"\nname_prefix = "{prefix}"\nnetwork = false\n'
        f'state_dir = "{directory.path}"\nstore = "{dsn}"\nstore_lease = 5.0\n'
    )
    return path


def _die(c: Controller) -> None:
    """As a SIGKILL would leave it: the controller's threads stop, its connections close,
    nothing is destroyed."""
    assert c.shared is not None
    c._halt(cancel=True)
    c.shared.close()


def _machines(dsn: str, pool_id: str) -> set[str]:
    pool = PgStore(dsn, pool_id).read()
    return set() if pool is None else {m.name for m in pool.machines}


@contextlib.contextmanager
def _leader(dsn: str, directory: JsonStateDir, prefix: str
            ) -> Iterator[tuple[subprocess.Popen[str], str, set[str]]]:
    """A session in a process of its own (host-a), leading the shared pool with 2 machines
    ready: the process, the pool's id and its machines; killed at the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMPOOL_HOST_ID": "host-a"}
    leader = subprocess.Popen(
        [sys.executable, str(LEADER), dsn, str(directory.path), prefix, "sa"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "leading"
        (pool_id,) = pool_ids(dsn)
        machines = _machines(dsn, pool_id)
        assert len(machines) == 2 and machines <= _listed(directory, pool_id)
        yield leader, pool_id, machines
    finally:
        leader.kill()
        leader.wait(10)


def _gc_destroys(config: Path, dsn: str, directory: JsonStateDir, pool_id: str,
                 machines: set[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gc", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"shared pool {pool_id} in {redacted(dsn)} destroyed" in out
    assert SECRET not in out
    assert pool_ids(dsn) == []
    assert not machines & _listed(directory, pool_id)


def test_gc_destroys_a_shared_pool_whose_sessions_were_all_killed(
    dsn: str, config: Path, directory: JsonStateDir, prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with _leader(dsn, directory, prefix) as (leader, pool_id, machines):
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
    wait_until(lambda: not closing.in_use(dsn, pool_id), 5, "the killed session's lock freed")
    _gc_destroys(config, dsn, directory, pool_id, machines, capsys)


def test_gc_ends_a_stopped_sessions_hold_and_destroys_its_pool(
    dsn: str, config: Path, directory: JsonStateDir, prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with _leader(dsn, directory, prefix) as (leader, pool_id, machines):
        leader.send_signal(signal.SIGSTOP)  # it keeps its connections, it beats no more
        wait_until(lambda: [s.beating for s in closing.in_use(dsn, pool_id, 5.0)] == [False],
                   20, "the stopped session's heartbeat going stale")
        _gc_destroys(config, dsn, directory, pool_id, machines, capsys)


def test_gc_dry_run_names_what_it_would_destroy_and_removes_nothing(
    dsn: str, config: Path, directory: JsonStateDir, start: Start,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    assert main(["gc", "--dry-run", "--config", str(config)]) == 0
    assert f"spared shared pool {a.pool_id}" in capsys.readouterr().out
    _die(a)
    assert main(["gc", "--dry-run", "--config", str(config)]) == 0
    assert f"would destroy shared pool {a.pool_id} in {redacted(dsn)}" in \
        capsys.readouterr().out
    assert _machines(dsn, a.pool_id) == machines <= _listed(directory, a.pool_id)


def test_gc_spares_a_shared_pool_with_a_live_session(
    dsn: str, config: Path, directory: JsonStateDir, start: Start,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    assert main(["gc", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"spared shared pool {a.pool_id} in {redacted(dsn)}: {a.me.host} (pid {a.me.pid})" \
        in out
    assert SECRET not in out
    assert _machines(dsn, a.pool_id) == machines <= _listed(directory, a.pool_id)
    assert not a.snapshot().closing


def test_down_refuses_a_shared_pool_in_use_and_force_destroys_it(
    dsn: str, config: Path, directory: JsonStateDir, start: Start,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    assert main(["down", "--pool", a.pool_id, "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"pool {a.pool_id} in {redacted(dsn)} is in use by 1 attached session(s) on " \
        f"{a.me.host} (pid {a.me.pid})" in err and "--force" in err
    assert SECRET not in err
    assert _machines(dsn, a.pool_id) == machines <= _listed(directory, a.pool_id)

    assert main(["down", "--pool", a.pool_id, "--force", "--config", str(config)]) == 0
    assert f"shared pool {a.pool_id} in {redacted(dsn)} destroyed" in capsys.readouterr().out
    assert pool_ids(dsn) == []
    assert not machines & _listed(directory, a.pool_id)


def test_down_destroys_a_shared_pool_no_session_uses(
    dsn: str, config: Path, directory: JsonStateDir, start: Start,
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    _die(a)
    assert main(["down", "--pool", a.pool_id, "--config", str(config)]) == 0
    assert pool_ids(dsn) == []
    assert not machines & _listed(directory, a.pool_id)


def test_a_session_attaching_to_a_pool_marked_closing_refuses(
    dsn: str, start: Start,
) -> None:
    a = start("sa")
    a.wait_until_ready(2, 30)
    with closing.claimed(dsn, a.pool_id, force=True) as (_store, final):
        assert final is not None and final.closing
        with pytest.raises(StateError, match=f"pool {a.pool_id} in .* is being destroyed"):
            start("sb")


def test_gc_reports_an_unreadable_shared_record_and_destroys_the_other_dead_pools(
    dsn: str, config: Path, directory: JsonStateDir, start: Start,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    _die(a)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO vmpool_pools VALUES ('zz-broken', '{\"id\": 3}'::jsonb)")
    assert main(["gc", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"shared pool {a.pool_id} in {redacted(dsn)} destroyed" in out
    assert f"shared pool zz-broken in {redacted(dsn)}: left alone: pool zz-broken in " \
        f"{redacted(dsn)}: unreadable record" in out
    assert "vmpool down --pool zz-broken --force" in out
    assert pool_ids(dsn) == ["zz-broken"]
    assert not machines & _listed(directory, a.pool_id)
    assert main(["down", "--pool", "zz-broken", "--config", str(config)]) == 3
    assert "unreadable record" in capsys.readouterr().err
    assert main(["down", "--pool", "zz-broken", "--force", "--config", str(config)]) == 0
    assert pool_ids(dsn) == []


def test_machines_gc_could_not_delete_keep_the_pool_closing_until_a_later_gc(
    dsn: str, directory: JsonStateDir, start: Start,
) -> None:
    a = start("sa")
    machines = {m.name for m in a.wait_until_ready(2, 30).machines}
    _die(a)
    failing = SimBackend(SimSettings(fail_delete=True), directory.path)
    (outcome,) = closing.gc(dsn, lambda pool: failing)
    assert outcome.failed and sorted(machines) == outcome.leftovers.machines
    assert f"could not delete {', '.join(sorted(machines))}; its record stays" in \
        outcome.line()
    record = PgStore(dsn, a.pool_id).read()
    assert record is not None and record.closing
    with pytest.raises(StateError, match="is being destroyed"):
        start("sb")
    (outcome,) = closing.gc(dsn, lambda pool: _backend(directory))
    assert outcome.destroyed and pool_ids(dsn) == []
    assert not machines & _listed(directory, a.pool_id)
    start("sc").wait_until_ready(2, 30)  # a fresh pool


@pytest.mark.parametrize("how", ["gc", "down"])
def test_a_session_attaching_while_gc_or_down_runs_never_loses_machines(
    how: str, dsn: str, directory: JsonStateDir, start: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds of three kinds: a free race (the destroyer usually first: the attacher waits
    for the lock, then makes a new pool), the destroyer let go only once the attacher holds
    the lock (spared), and the attacher let go only once the destroyer has claimed it."""
    joined, claimed = threading.Event(), threading.Event()
    real_join, real_destroy = Election._join, closing.destroy

    def join(self: Election) -> None:
        real_join(self)
        joined.set()

    def destroy_claimed(*args: Any) -> Leftovers:
        claimed.set()
        return real_destroy(*args)

    monkeypatch.setattr(Election, "_join", join)
    monkeypatch.setattr(closing, "destroy", destroy_claimed)

    def backend_for(pool: Pool | None) -> Backend:
        return _backend(directory)

    def destroy(pool_id: str, after_join: bool, won: list[str]) -> None:
        if after_join:
            joined.wait(30)
        try:
            if how == "gc":
                (outcome,) = closing.gc(dsn, backend_for)
                won.append("attacher" if outcome.spared else "destroyer")
            else:
                closing.down(dsn, pool_id, backend_for)
                won.append("destroyer")
        except closing.PoolInUse:
            won.append("attacher")
        except BaseException as exc:
            won.append(repr(exc))
        finally:
            claimed.set()  # nothing more to wait for

    winners = []
    for round_ in range(9):
        kind = round_ % 3
        dead = start(f"d{round_}")
        dead.wait_until_ready(2, 30)
        _die(dead)  # its record and machines left behind, no session attached
        joined.clear()
        claimed.clear()
        won: list[str] = []
        racer = threading.Thread(target=destroy, args=(dead.pool_id, kind == 1, won))
        racer.start()
        if kind == 2:
            claimed.wait(30)
        attacher = start(f"a{round_}")
        racer.join(30)
        assert not racer.is_alive() and won in (["attacher"], ["destroyer"])
        winners += won
        pool = attacher.wait_until_ready(2, 30)
        ready = {m.name for m in pool.machines if m.state is MachineState.READY}
        assert len(ready) >= 2 and not pool.closing
        assert ready <= _listed(directory, attacher.pool_id), f"round {round_}: deleted"
        attacher.stop()
        assert pool_ids(dsn) == []
    assert winners[1::3] == ["attacher"] * 3 and winners[2::3] == ["destroyer"] * 3
