"""vmpool.session: the controller and its workers talk over the session channel, nothing polls."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool.errors import PoolUnavailable, StateError
from vmpool.ownership import current_process
from vmpool.session import SessionClient, SessionFile, SessionServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SessionServer]:
    tmp_path.chmod(0o700)
    s = SessionServer(tmp_path, "sess01", current_process(), lambda: demands.append(1))
    s.start()
    yield s
    s.stop()


demands: list[int] = []


def test_a_waiting_worker_hears_of_its_pool_the_moment_it_is_published(
    server: SessionServer, tmp_path: Path
) -> None:
    client = SessionClient(tmp_path, "sess01")
    got: list[tuple[str, float]] = []
    thread = threading.Thread(
        target=lambda: got.append((client.wait_pool("default", 10), time.monotonic()))
    )
    thread.start()
    time.sleep(0.1)  # the worker is waiting
    with server.update() as rec:
        rec.pools["default"] = "vmpool-abc"
    published = time.monotonic()
    thread.join(10)
    (pool_id, answered), = got
    assert pool_id == "vmpool-abc" and answered - published < 0.05
    assert SessionFile(tmp_path, "sess01").read().pools == {"default": "vmpool-abc"}


def test_a_profile_that_failed_is_an_error_for_the_worker(
    server: SessionServer, tmp_path: Path
) -> None:
    with server.update() as rec:
        rec.errors["big"] = "podman is not installed"
    with pytest.raises(PoolUnavailable, match="no pool for profile 'big': podman is not"):
        SessionClient(tmp_path, "sess01").wait_pool("big", 5)


def test_a_pool_never_made_times_out_with_the_profile_and_session(
    server: SessionServer, tmp_path: Path
) -> None:
    with pytest.raises(PoolUnavailable, match=r"'default' pool within 0.2s \(session sess01\)"):
        SessionClient(tmp_path, "sess01").wait_pool("default", 0.2)


def test_demand_and_workers_reach_the_controller_and_its_record(
    server: SessionServer, tmp_path: Path
) -> None:
    demands.clear()
    client = SessionClient(tmp_path, "sess01")
    client.register("gw3", current_process())
    client.report({"default": 2}, [], final=False)
    client.report({"default": 1, "pg": 3}, [], final=True)
    client.report({}, ["count=99 is more than the pool holds"], final=True)
    rec = server.read()
    assert rec.early == {"default": 2} and rec.demand == {"default": 1, "pg": 3}
    assert rec.usage_errors == ["count=99 is more than the pool holds"]
    assert rec.workers["gw3"].pid == os.getpid()
    assert len(demands) == 3  # each report woke the controller
    on_disk = SessionFile(tmp_path, "sess01")
    assert on_disk.read() == rec
    assert stat.S_IMODE(on_disk.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600


def test_without_a_controller_a_worker_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=r"session nosuch: .*the controller is gone"):
        SessionClient(tmp_path, "nosuch").report({"default": 1}, [], final=True)


def test_a_worker_waiting_when_the_controller_stops_hears_so_at_once(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    server = SessionServer(tmp_path, "sess02", current_process(), lambda: None)
    server.start()
    client = SessionClient(tmp_path, "sess02")
    errors: list[tuple[Exception, float]] = []

    def wait() -> None:
        try:
            client.wait_pool("default", 60)
        except (PoolUnavailable, StateError) as exc:
            errors.append((exc, time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    deadline = time.monotonic() + 10
    while not server._conns:  # the worker is connected (and waiting)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)
    server.stop()
    stopped = time.monotonic()
    thread.join(10)
    (error, when), = errors
    assert when - stopped < 1.0
    # not "did not create the pool within 60s": it did not wait 60 s
    assert "within 60s" not in str(error) and "stop" in str(error), error
