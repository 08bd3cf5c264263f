"""A prepared podman backend (the pool's controller: ``prepare()`` starts the API service)
runs a pool's whole life through the service, leaves nothing after ``close()``, and falls back
to the CLI when the service goes away."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.backends.test_podman import _spy
from tests.backends.test_podman_live import container_id, podman
from vmpool.backends.base import MachineSpec, probe_until
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman.api_reset import holder_name
from vmpool.config_backends import PodmanSettings
from vmpool.errors import BackendError

pytestmark = pytest.mark.podman

LABELS = {"vmpool.session": "preparedtest", "vmpool.pool": "p"}


@pytest.fixture(scope="module")
def image() -> str:
    return build_image(PodmanSettings())


@pytest.fixture
def prepared(image: str, tmp_path: Path) -> Iterator[PodmanBackend]:
    backend = PodmanBackend(PodmanSettings(image=image), tmp_path)
    backend.check()
    backend.prepare(networked=True)
    yield backend
    backend.close()


def _conmons() -> dict[int, str]:
    return {p.pid: " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "conmon"}


def test_a_prepared_backend_runs_a_pool_without_a_podman_process_and_leaves_nothing(
    prepared: PodmanBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = uuid.uuid4().hex[:8]
    net, names = f"vmpooltest-{run_id}-net", [f"vmpooltest-{run_id}-{i}" for i in range(2)]
    conmons_before = set(_conmons())
    calls = _spy(monkeypatch)
    prepared.create_network(net, LABELS)
    for name in names:
        prepared.create(MachineSpec(name, LABELS, network=net))
        prepared.start(name)
        prepared.wait_ready(name, timeout=30)
        prepared.snapshot(name)
    serve = "mkdir -p /www && echo hello > /www/f && httpd -p 8080 -h /www"
    assert prepared.exec(names[0], ["sh", "-c", serve], timeout=10).ok
    url = f"http://{prepared.address(names[0])}:8080/f"

    def fetch() -> None:  # busybox-static's `wget -T` segfaults: `timeout` bounds it
        got = prepared.exec(names[1], ["timeout", "10", "wget", "-q", "-O", "-", url], timeout=15)
        if got.stdout != "hello\n":
            raise BackendError(f"wget exited {got.returncode}: {got.stderr}")

    probe_until(fetch, timeout=20, what="httpd on the other machine")  # one network
    assert prepared.exec(names[0], ["sh", "-c", "echo hi > /tmp/x"], timeout=10).ok
    prepared.reset(names[0])  # live
    assert prepared.exec(names[0], ["test", "-e", "/tmp/x"], timeout=10).returncode == 1
    listed = prepared.list(f"vmpooltest-{run_id}-")
    assert [(m.name, m.running, m.labels.get("vmpool.session")) for m in listed] == [
        (n, True, "preparedtest") for n in names
    ]
    assert [n.name for n in prepared.list_networks(f"vmpooltest-{run_id}-")] == [net]
    assert [c for c in calls if c[0] == "podman"] == []
    ids = [container_id(n) for n in names]
    calls.clear()

    assert prepared.delete_many(names) == {}
    prepared.delete_network(net)
    assert prepared.list(f"vmpooltest-{run_id}-") == []
    assert prepared.list_networks(f"vmpooltest-{run_id}-") == []
    assert [c for c in calls if c[0] == "podman"] == []
    record = podman_api.read_record(tmp_path / podman_api.SERVICE_DIR)
    assert record is not None and record.alive()  # kept until close(): the reap uses it
    prepared.close()

    assert not record.alive()
    assert not (tmp_path / podman_api.SERVICE_DIR / podman_api.SOCKET_NAME).exists()
    left = podman("ps", "-a", "--format", "{{.Names}}").check().stdout.split()
    assert not [n for n in left if run_id in n]
    assert podman("network", "exists", net).returncode == 1
    new = {pid: cmd for pid, cmd in _conmons().items() if pid not in conmons_before}
    assert not [cmd for cmd in new.values() if any(i in cmd for i in ids)]


def test_a_full_reset_s_holder_goes_with_its_machine_through_the_api(
    prepared: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = uuid.uuid4().hex[:8]
    net, name = f"vmpooltest-{run_id}-net", f"vmpooltest-{run_id}-m"
    prepared.create_network(net, LABELS)
    prepared.create(MachineSpec(name, LABELS, network=net))
    prepared.start(name)
    prepared.wait_ready(name, timeout=30)
    prepared.snapshot(name)
    prepared._live = None  # a full reset: the holder takes the address over
    prepared._removal._live = None
    address = prepared.address(name)
    prepared.reset(name)
    assert prepared.address(name) == address
    volumes = podman("inspect", "--format", "{{range .Mounts}}{{if .Name}}{{.Name}} {{end}}"
                     "{{end}}", name, holder_name(name)).check().stdout.split()
    calls = _spy(monkeypatch)
    assert prepared.delete_many([name]) == {}
    prepared.delete_network(net)
    assert [c for c in calls if c[0] == "podman"] == []
    assert podman("container", "exists", holder_name(name)).returncode == 1
    assert podman("network", "exists", net).returncode == 1
    assert not [v for v in volumes if podman("volume", "exists", v).returncode == 0]


def test_when_the_service_goes_away_the_cli_does_the_work(
    prepared: PodmanBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"vmpooltest-{uuid.uuid4().hex[:8]}-m"
    prepared.create(MachineSpec(name, LABELS))
    prepared.start(name)
    prepared.wait_ready(name, timeout=30)
    assert podman_api.stop_recorded(tmp_path)  # as another session's teardown might
    with caplog.at_level(logging.WARNING):
        assert [m.name for m in prepared.list(name)] == [name]
        assert prepared.delete_many([name]) == {}
    assert "does not answer" in caplog.text
    assert prepared.list(name) == []
    assert podman("container", "exists", name).returncode == 1


def test_an_unprepared_backend_uses_the_cli_and_starts_no_service(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PodmanBackend(PodmanSettings(image=image), tmp_path)
    name = f"vmpooltest-{uuid.uuid4().hex[:8]}-m"
    calls = _spy(monkeypatch)
    try:
        backend.create(MachineSpec(name, LABELS))
        backend.start(name)
    finally:
        backend.delete_many([name])
    assert [c[1] for c in calls if c[0] == "podman"][-3:] == ["create", "start", "rm"]
    assert podman_api.read_record(tmp_path / podman_api.SERVICE_DIR) is None
