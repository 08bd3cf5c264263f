"""A throwaway PostgreSQL for the store's tests (one per session), and the pools on it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpool.backends.sim import SimBackend
from vmpool.config import PoolSettings, Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore, migrate
from vmpool.state import JsonStateDir, JsonStore, Machine, MachineState, Pool


@pytest.fixture(scope="session")
def pg() -> Iterator[throwaway.Throwaway]:
    """A running cluster (``pg.dsn``), stopped and removed at the end of the session."""
    server = throwaway.start()
    try:
        migrate(server.dsn)
        yield server
    finally:
        server.remove()


def new_pool(pool_id: str, machines: int = 3) -> Pool:
    """A pool record with ``machines`` ready machines ``m0``…, an owner-less (kept) pool."""
    now = time.time()
    return Pool(
        id=pool_id, backend="sim", size=machines, session="s", name_prefix="vmpool",
        config_hash="h1", created_at=now, next_serial=machines,
        machines=[
            Machine(name=f"m{i}", slot=i, state=MachineState.READY, config_hash="h1",
                    created_at=now, ready_at=now)
            for i in range(machines)
        ],
    )


def pool_id() -> str:
    return "p" + uuid.uuid4().hex[:10]


@pytest.fixture
def pg_store(pg: throwaway.Throwaway) -> Iterator[PgStore]:
    """A 3-machine pool on the throwaway server."""
    store = PgStore(pg.dsn, pool_id(), lease=30.0)
    store.create(new_pool(store.pool_id))
    yield store
    store.remove()
    store.close()


@pytest.fixture(params=["json", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> JsonStore | PgStore:
    """The same 3-machine pool in each store: the JSON file, then PostgreSQL."""
    if request.param == "postgresql":
        store: JsonStore | PgStore = request.getfixturevalue("pg_store")
        return store
    json_store = JsonStateDir(tmp_path / "state").store(pool_id())
    json_store.create(new_pool(json_store.pool_id))
    return json_store


# -- sessions of a shared pool (vmpool.pgstore.shared), each a Controller ----------------------
Start = Callable[[str], Controller]


def shared_profile(dsn: str, prefix: str) -> Profile:
    """A 2-machine sim pool shared on ``dsn`` (lease 2 s)."""
    return Profile(name="default", pool=PoolSettings(
        size=2, backend="sim", name_prefix=prefix, checkin_policy="reuse", pre_ping=False,
        network=False, store=dsn, store_lease=2.0,
    ), sim=SimSettings())


@pytest.fixture
def store_dsn(pg: throwaway.Throwaway) -> str:
    """The DSN the sessions of ``start`` share (a module may override it)."""
    return pg.dsn


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:6]


@pytest.fixture
def directory(tmp_path: Path) -> JsonStateDir:
    return JsonStateDir(tmp_path / "state")


@pytest.fixture
def start(store_dsn: str, directory: JsonStateDir, prefix: str) -> Iterator[Start]:
    """``start(session)``: that session's started controller of the shared pool."""
    made: list[Controller] = []

    def make(session: str) -> Controller:
        profile = shared_profile(store_dsn, prefix)
        c = Controller(directory=directory, backend=SimBackend(profile.sim, directory.path),
                       profile=profile, size=2, session=session, store=store_dsn)
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        if c.shared is not None and c.shared.election._thread is not None \
                and not c._stop.is_set():
            c.stop()
