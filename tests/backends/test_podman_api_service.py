"""podman's REST API service for the pool against the real tool: private socket, readiness,
the Docker-compatible endpoints, and nothing left running after stop."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmpool import _proc
from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman.live_reset import start_time

pytestmark = pytest.mark.podman


@pytest.fixture()
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.path.realpath(tmp_path_factory.mktemp("pa")))


def test_service_serves_a_private_socket_and_stops(state_dir: Path) -> None:
    service = podman_api.ApiService(state_dir)
    api = service.start(timeout=30)
    try:
        assert stat.S_IMODE(os.stat(service.dir).st_mode) == 0o700
        record = podman_api.read_record(service.dir)
        assert record is not None and record.alive()
        info = api.request("GET", f"{podman_api.LIBPOD}/info").body
        assert info["version"]["Version"]
        assert api.inspect("vmpool-no-such-container-xyz") is None
        # the Docker-compatible API through the same service
        assert api.request("GET", f"{podman_api.COMPAT}/version").body["ApiVersion"] == "1.41"
    finally:
        service.stop()
    assert start_time(record.pid) != record.start
    assert not service.socket_path.exists()
    assert podman_api.read_record(service.dir) is None
    assert not api.ping()


def test_gc_stops_a_service_another_process_started(state_dir: Path) -> None:
    service = podman_api.ApiService(state_dir)
    service.start(timeout=30)
    record = podman_api.read_record(service.dir)
    assert record is not None
    try:
        assert podman_api.stop_recorded(state_dir) is True
        assert start_time(record.pid) != record.start
    finally:
        service.stop()


def _spec(name: str) -> dict[str, object]:
    return {
        "name": name, "image": "localhost/vmpool-busybox:latest",
        "command": ["sleep", "1000"], "oci_runtime": "runc",
        "r_limits": [{"type": "nofile", "hard": 1024, "soft": 1024},
                     {"type": "nproc", "hard": 1024, "soft": 1024}],
        "labels": {"vmpool.test": "podman_api"},
    }


def test_recreate_gives_a_fresh_container_and_leaves_nothing(state_dir: Path) -> None:
    service = podman_api.ApiService(state_dir)
    api = service.start(timeout=30)
    name = f"vmpool-api-{os.getpid()}"
    try:
        api.create(_spec(name))
        api.start(name)
        first = api.inspect(name)
        assert first is not None
        old_pid = first["State"]["Pid"]
        _proc.run(["podman", "exec", name, "touch", "/tmp/mark"], timeout=30).check()
        info = podman_api.recreate(api, name, _spec(name), timeout=30)
        gone = _proc.run(["podman", "exec", name, "test", "-e", "/tmp/mark"], timeout=30)
        assert gone.returncode == 1
        assert info["State"]["Running"] and info["Id"] != first["Id"]
        assert start_time(old_pid) is None
    finally:
        api.delete(name)
        service.stop()
    assert api.ping() is False
