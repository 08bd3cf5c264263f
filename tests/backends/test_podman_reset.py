"""Each podman reset mechanism (live, the API's full reset, the CLI's) against a hostile test on
a pool network, and what the full reset through the API leaves behind: nothing."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.backends.test_podman_live import (
    ADVERSARY,
    container_id,
    pid1,
    podman,
    ready_state,
    run,
)
from vmpool import _proc
from vmpool.backends.base import MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman.api_reset import HOLDER_LABEL, holder_name
from vmpool.config_backends import PodmanSettings

pytestmark = pytest.mark.podman

SESSION = "resettest"


@pytest.fixture(scope="module")
def image() -> str:
    return build_image(PodmanSettings())


def _disable(backend: PodmanBackend, mechanism: str) -> None:
    """Leave ``mechanism`` as the one a reset uses: live (the default), api (no live reset),
    cli (neither)."""
    if mechanism in ("api", "cli"):
        backend._live = None
    if mechanism == "cli":
        backend._api = None


@pytest.fixture
def pool(image: str, tmp_path: Path) -> Iterator[Callable[[str], tuple[PodmanBackend, str]]]:
    """A ready, snapshotted machine on a pool network of its own; all of it deleted after."""
    made: list[tuple[PodmanBackend, str, str]] = []

    def make(mechanism: str) -> tuple[PodmanBackend, str]:
        backend = PodmanBackend(PodmanSettings(image=image), tmp_path)
        run_id = uuid.uuid4().hex[:8]
        net, name = f"vmpooltest-{run_id}-net", f"vmpooltest-{run_id}-m"
        backend.create_network(net, {"vmpool.session": SESSION})
        made.append((backend, name, net))
        backend.create(MachineSpec(name, {"vmpool.session": SESSION}, network=net))
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        backend.snapshot(name)
        _disable(backend, mechanism)
        return backend, name

    yield make
    for backend, name, net in made:
        assert backend.delete_many([name]) == {}
        backend.delete_network(net)


def _hostile(backend: PodmanBackend, name: str, host: Path) -> None:
    run(backend, name, ADVERSARY.format(host=host))
    for kind in ("-M", "-Q", "-S"):
        args = [kind, "4096"] if kind == "-M" else [kind, "1"] if kind == "-S" else [kind]
        _proc.run(["nsenter", "-t", pid1(name), "--ipc", "ipcmk", *args], timeout=30).check()


@pytest.mark.parametrize("mechanism", ["live", "api", "cli"])
def test_each_reset_mechanism_undoes_a_hostile_test_and_keeps_the_address(
    pool: Callable[[str], tuple[PodmanBackend, str]], mechanism: str, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "canary").write_text("host file\n")
    backend, name = pool(mechanism)
    ready, address, cid = ready_state(backend, name), backend.address(name), container_id(name)
    assert address is not None
    for _ in range(2):  # the second reset starts from what the first one made
        _hostile(backend, name, host)
        assert ready_state(backend, name) != ready  # the test did leave traces
        backend.reset(name)
        assert ready_state(backend, name) == ready
        assert backend.address(name) == address
        assert (container_id(name) == cid) == (mechanism == "live")
        assert [p.name for p in host.iterdir()] == ["canary"]
        assert (host / "canary").read_text() == "host file\n"


def test_a_full_reset_goes_through_the_api_without_a_podman_process(
    pool: Callable[[str], tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, name = pool("api")
    calls: list[Sequence[str]] = []
    real = _proc.run

    def spy(argv: Sequence[str], **kwargs: Any) -> _proc.ProcResult:
        calls.append(argv)
        return real(argv, **kwargs)

    run(backend, name, "touch /tmp/x")
    backend.reset(name)  # the first: the holder takes the address over
    monkeypatch.setattr(_proc, "run", spy)
    backend.reset(name)
    # no `rm`, `run`, inspect or exec on the CLI: the machine's command starts its exec agent
    assert [c for c in calls if c[0] == "podman"] == [], calls
    assert backend.exec(name, ["test", "-e", "/tmp/x"], timeout=10).returncode == 1
    holder = podman("inspect", "--format", "{{index .Config.Labels \"" + HOLDER_LABEL + "\"}}",
                    holder_name(name)).check().stdout.strip()
    assert holder == name
    assert holder_name(name) not in [m.name for m in backend.list("vmpooltest-")]


def test_a_failing_api_falls_back_to_the_cli_and_the_machine_is_clean(
    pool: Callable[[str], tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, name = pool("api")
    ready, address = ready_state(backend, name), backend.address(name)

    def broken(*_: Any, **__: Any) -> dict[str, Any]:
        raise podman_api.ApiError("POST /containers/create", 500, "injected")

    monkeypatch.setattr(podman_api, "run", broken)
    run(backend, name, "echo x > /tmp/x; rm /etc/group; sleep 1001 &")
    with caplog.at_level(logging.WARNING):
        backend.reset(name)
    assert "the CLI instead" in caplog.text
    assert ready_state(backend, name) == ready
    assert backend.address(name) == address


def _conmons() -> dict[int, str]:
    found = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "conmon":
            found[proc.pid] = " ".join(proc.info["cmdline"] or [])
    return found


def test_teardown_leaves_no_container_holder_volume_network_conmon_or_api_service(
    image: str, tmp_path: Path
) -> None:
    backend = PodmanBackend(PodmanSettings(image=image), tmp_path)
    backend._live = None  # every reset a full one, through the API
    run_id = uuid.uuid4().hex[:8]
    net = f"vmpooltest-{run_id}-net"
    names = [f"vmpooltest-{run_id}-{i}" for i in range(2)]
    conmons_before = set(_conmons())
    backend.create_network(net, {"vmpool.session": SESSION})
    for name in names:
        backend.create(MachineSpec(name, {"vmpool.session": SESSION}, network=net))
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        backend.snapshot(name)
        backend.reset(name)
        backend.reset(name)
    record = podman_api.read_record(tmp_path / podman_api.SERVICE_DIR)
    assert record is not None and record.alive()
    ids = [container_id(n) for n in [*names, *(holder_name(n) for n in names)]]
    fmt = "{{range .Mounts}}{{if .Name}}{{.Name}} {{end}}{{end}}"
    volumes = podman("inspect", "--format", fmt, *ids).check().stdout.split()

    assert backend.delete_many(names) == {}
    backend.delete_network(net)

    left = podman("ps", "-a", "--format", "{{.Names}}").check().stdout.split()
    assert not [n for n in left if run_id in n]
    assert podman("network", "exists", net).returncode == 1
    assert not [v for v in volumes if podman("volume", "exists", v).returncode == 0]
    assert not record.alive()
    assert not (tmp_path / podman_api.SERVICE_DIR / podman_api.SOCKET_NAME).exists()
    new_conmons = {pid: cmd for pid, cmd in _conmons().items() if pid not in conmons_before}
    assert not [cmd for cmd in new_conmons.values() if any(i in cmd for i in ids)]
