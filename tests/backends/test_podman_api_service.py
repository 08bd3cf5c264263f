"""podman's REST API service for the pool against the real tool: private socket, readiness,
the Docker-compatible endpoints, and nothing left running after stop."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmpool.backends import podman_api
from vmpool.backends.podman_live import start_time

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
