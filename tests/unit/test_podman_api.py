"""The podman API client and service lifecycle without podman: error text, timeouts, the CLI
fallback, and gc never signalling a pid that is not the recorded service."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman.live_reset import start_time
from vmpool.errors import BackendError


def _serve(path: Path, reply: bytes | None) -> Iterator[threading.Event]:
    """A one-shot unix-socket HTTP server: sends ``reply`` (None: never answers)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    done = threading.Event()

    def loop() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        if reply is not None:
            conn.sendall(reply)
        done.wait(10)
        conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield done
    done.set()
    srv.close()


@pytest.fixture()
def short_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.path.realpath(tmp_path_factory.mktemp("pa")))


def test_error_status_names_endpoint_and_podmans_message(short_dir: Path) -> None:
    body = json.dumps({"cause": "x", "message": "container state improper", "response": 500})
    reply = (f"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    sock = short_dir / "s.sock"
    for _ in _serve(sock, reply):
        api = podman_api.PodmanApi(sock, timeout=5)
        with pytest.raises(podman_api.ApiError) as info:
            api.delete("m1")
    assert info.value.status == 500
    endpoint = "DELETE /v4.0.0/libpod/containers/m1?force=true&timeout=0&volumes=true"
    assert endpoint in str(info.value)
    assert "container state improper" in str(info.value)


def test_a_silent_service_times_out_as_backend_error(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    for _ in _serve(sock, None):
        api = podman_api.PodmanApi(sock, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(BackendError, match=re.escape("GET /v4.0.0/libpod/containers/m1/json")):
            api.inspect("m1")
        assert time.monotonic() - started < 3


def test_no_socket_is_a_backend_error_naming_the_socket(short_dir: Path) -> None:
    api = podman_api.PodmanApi(short_dir / "missing.sock", timeout=1)
    with pytest.raises(BackendError, match=re.escape("missing.sock")):
        api.start("m1")
    assert api.ping() is False


def test_service_that_exits_keeps_the_cli_path(short_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmpool.backends.podman.api"):
        assert podman_api.start_api(short_dir, tool="false", timeout=5) is None
    assert "keeping the podman CLI path" in caplog.text and "exited 1" in caplog.text
    assert podman_api.read_record(short_dir / podman_api.SERVICE_DIR) is None


def test_socket_path_too_long_keeps_the_cli_path(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    deep = tmp_path / ("d" * 100)
    with caplog.at_level(logging.WARNING, logger="vmpool.backends.podman.api"):
        assert podman_api.start_api(deep, tool="false") is None
    assert "longer than a unix socket allows" in caplog.text


def test_gc_does_not_signal_a_reused_pid(short_dir: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        real = start_time(other.pid)
        assert real is not None
        service_dir = short_dir / podman_api.SERVICE_DIR
        service_dir.mkdir(mode=0o700)
        record = {"pid": other.pid, "start": real + 1, "socket": "x"}
        (service_dir / podman_api.RECORD_NAME).write_text(json.dumps(record))
        assert podman_api.stop_recorded(short_dir) is False
        assert other.poll() is None
        assert not (service_dir / podman_api.RECORD_NAME).exists()
    finally:
        other.kill()
        other.wait()


def test_gc_stops_the_recorded_process(short_dir: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        service_dir = short_dir / podman_api.SERVICE_DIR
        service_dir.mkdir(mode=0o700)
        record = {"pid": other.pid, "start": start_time(other.pid), "socket": "x"}
        (service_dir / podman_api.RECORD_NAME).write_text(json.dumps(record))
        threading.Thread(target=other.wait, daemon=True).start()  # reap, as its parent would
        assert podman_api.stop_recorded(short_dir, timeout=5) is True
        other.wait(timeout=5)
        assert other.returncode == -15
    finally:
        if other.poll() is None:
            other.kill()
