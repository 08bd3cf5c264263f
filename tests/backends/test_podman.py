"""The podman backend against the real tool: containers, exec, snapshot/reset, networks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmpool import _proc, reaper
from vmpool.backends.base import Backend, MachineSpec, probe_until
from vmpool.backends.podman import (
    DEFAULT_IMAGE,
    PodmanBackend,
    RunOptions,
    build_image,
    image_current,
    warm_image_name,
)
from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman import commands as podman_commands
from vmpool.backends.podman import image as podman_image
from vmpool.config_backends import PodmanSettings
from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout
from vmpool.state import JsonStateDir

pytestmark = pytest.mark.podman

SESSION_LABELS = {"vmpool.session": "podmantest", "vmpool.pool": "default"}


def unique(kind: str = "m") -> str:
    return f"vmpooltest-{uuid.uuid4().hex[:8]}-{kind}"


def podman(*args: str) -> _proc.ProcResult:
    return _proc.run(["podman", *args], timeout=60)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record the argv of every tool process the backend runs from now on."""
    calls: list[tuple[str, ...]] = []
    real_run = _proc.run

    def spy(argv: Sequence[str], **kwargs: Any) -> _proc.ProcResult:
        calls.append(tuple(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(_proc, "run", spy)
    return calls


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    return build_image(PodmanSettings())


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # shared, so the runtime verdict is probed once per test session
    path = tmp_path_factory.mktemp("podman-state")
    yield path
    podman_api.stop_recorded(path)  # what full resets started (teardown's delete_many would)


@pytest.fixture
def backend(image: str, state_dir: Path) -> PodmanBackend:
    return PodmanBackend(PodmanSettings(image=image), state_dir)


@pytest.fixture
def make_machine(backend: PodmanBackend) -> Iterator[Callable[..., str]]:
    """Create, start and wait for machines; delete them all afterwards."""
    made: list[str] = []

    def make(network: str | None = None, labels: dict[str, str] | None = None) -> str:
        name = unique(str(len(made)))
        made.append(name)
        backend.create(MachineSpec(name, labels or SESSION_LABELS, network=network))
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        return name

    yield make
    for name in made:
        backend.delete(name)


@pytest.fixture
def machine(make_machine: Callable[..., str]) -> str:
    return make_machine()


@pytest.fixture
def network(backend: PodmanBackend) -> Iterator[str]:
    name = unique("net")
    backend.create_network(name, SESSION_LABELS)
    yield name
    backend.delete_network(name)


# -- checks and detection ---------------------------------------------------------------------
def test_backend_satisfies_the_protocol(backend: PodmanBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "podman"
    assert backend.capabilities.reset and backend.capabilities.labels
    assert backend.capabilities.network


def test_check_passes_with_tool_and_image(backend: PodmanBackend) -> None:
    backend.check()


def test_build_image_keeps_an_existing_image(image: str) -> None:
    messages: list[str] = []
    assert build_image(PodmanSettings(), progress=messages.append) == DEFAULT_IMAGE
    assert any("is up to date" in m for m in messages)
    assert image_current(PodmanSettings())


def test_build_image_rebuilds_an_image_whose_recipe_changed(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podman_image, "_IMAGE_VERSION", -1)
    assert not image_current(PodmanSettings())
    messages: list[str] = []
    try:
        build_image(PodmanSettings(), progress=messages.append)
        assert any("out of date" in m for m in messages)
        assert image_current(PodmanSettings())
    finally:
        monkeypatch.undo()
        build_image(PodmanSettings())
    assert image_current(PodmanSettings())


def test_missing_tool_is_backend_unavailable_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = PodmanBackend(PodmanSettings(), tmp_path)
    with pytest.raises(BackendUnavailable, match=r"podman: command not found \(apt-get install"):
        backend.check()


def test_missing_image_is_backend_unavailable_naming_image_and_build_command(
    image: str, tmp_path: Path
) -> None:
    missing = f"localhost/{unique('img')}:latest"
    backend = PodmanBackend(PodmanSettings(image=missing), tmp_path)
    with pytest.raises(BackendUnavailable) as excinfo:
        backend.check()
    assert missing in str(excinfo.value)
    assert "vmpool image build --backend podman" in str(excinfo.value)


def test_create_with_a_missing_image_is_backend_unavailable(image: str, tmp_path: Path) -> None:
    missing = f"localhost/{unique('img')}:latest"
    backend = PodmanBackend(PodmanSettings(image=missing), tmp_path)
    with pytest.raises(BackendUnavailable, match="vmpool image build"):
        backend.create(MachineSpec(unique(), SESSION_LABELS))


def test_runtime_verdict_is_cached_for_the_next_process(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = PodmanBackend(PodmanSettings(image=image), tmp_path).run_options()
    assert (tmp_path / "podman" / "runtime.json").is_file()
    calls = _spy(monkeypatch)
    second = PodmanBackend(PodmanSettings(image=image), tmp_path).run_options()
    assert second == first
    assert not [c for c in calls if c[1:2] == ("run",)], calls


def test_settings_override_runtime_detection(tmp_path: Path) -> None:
    settings = PodmanSettings(runtime="runc", ulimits={"nofile": "512:512"})
    options = PodmanBackend(settings, tmp_path).run_options()
    assert options == RunOptions("runc", (("nofile", "512:512"),))
    assert options.argv() == ["--runtime", "runc", "--ulimit", "nofile=512:512"]


def test_invalid_names_are_rejected(backend: PodmanBackend) -> None:
    with pytest.raises(ValueError, match="invalid machine name"):
        backend.create(MachineSpec("Bad_Name", {}))
    with pytest.raises(ValueError, match="invalid machine name"):
        backend.delete("../etc")


# -- machines ---------------------------------------------------------------------------------
def test_created_machine_starts_and_becomes_ready(backend: PodmanBackend, machine: str) -> None:
    [info] = backend.list(machine)
    assert info.running
    assert backend.exec(machine, ["hostname"], timeout=10).stdout.strip() == machine


def test_exec_returns_stdout_stderr_and_returncode(backend: PodmanBackend, machine: str) -> None:
    result = backend.exec(machine, ["sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert result.ok


def test_exec_nonzero_exit_is_a_result_not_an_error(backend: PodmanBackend, machine: str) -> None:
    result = backend.exec(machine, ["sh", "-c", "echo failing >&2; exit 3"], timeout=10)
    assert result.returncode == 3
    assert result.stderr == "failing\n"
    assert not result.ok


def test_exec_timeout_raises_exec_timeout(backend: PodmanBackend, machine: str) -> None:
    with pytest.raises(ExecTimeout):
        backend.exec(machine, ["sleep", "31"], timeout=1)
    processes = backend.exec(machine, ["ps", "-o", "args"], timeout=10)
    assert processes.ok
    assert "sleep 31" not in processes.stdout  # the command was stopped, not left running


def test_exec_in_a_missing_machine_raises_backend_error(backend: PodmanBackend) -> None:
    with pytest.raises(BackendError, match="exec in"):
        backend.exec(unique(), ["true"], timeout=10)


def test_wait_ready_fails_fast_when_the_container_exits(image: str, state_dir: Path) -> None:
    settings = PodmanSettings(image=image, command=["sh", "-c", "echo boom; exit 3"])
    backend = PodmanBackend(settings, state_dir)
    name = unique()
    try:
        backend.create(MachineSpec(name, SESSION_LABELS))
        backend.start(name)
        with pytest.raises(BackendError, match=r"exited with code 3[\s\S]*boom"):
            backend.wait_ready(name, timeout=60)
    finally:
        backend.delete(name)


def test_reset_returns_to_the_snapshot(backend: PodmanBackend, machine: str) -> None:
    backend.exec(machine, ["sh", "-c", "echo kept > /root/ready"], timeout=10)
    backend.snapshot(machine)
    assert backend.exec(machine, ["sh", "-c", "echo dirty > /tmp/x"], timeout=10).ok

    backend.reset(machine)

    assert backend.exec(machine, ["test", "-e", "/tmp/x"], timeout=10).returncode == 1
    assert backend.exec(machine, ["cat", "/root/ready"], timeout=10).stdout == "kept\n"
    [info] = backend.list(machine)
    assert info.running and info.labels["vmpool.session"] == "podmantest"
    assert backend.exec(machine, ["echo", "alive"], timeout=10).stdout == "alive\n"


def test_reset_twice_with_a_new_snapshot_leaves_one_warm_image(
    backend: PodmanBackend, machine: str
) -> None:
    backend.exec(machine, ["touch", "/root/first"], timeout=10)  # changed: a commit is made
    backend.snapshot(machine)
    backend.reset(machine)
    first = podman("image", "inspect", "--format", "{{.Id}}", warm_image_name(machine))
    backend.exec(machine, ["touch", "/root/second"], timeout=10)
    backend.snapshot(machine)
    backend.reset(machine)
    assert backend.exec(machine, ["test", "-e", "/root/second"], timeout=10).ok
    # the first warm image was in use until the second reset, and removed by it
    assert podman("image", "exists", first.check().stdout.strip()).returncode == 1


def test_reset_works_from_the_warm_image_when_the_record_is_lost(
    backend: PodmanBackend, machine: str, state_dir: Path
) -> None:
    backend.exec(machine, ["touch", "/root/ready"], timeout=10)  # changed: a commit is made
    backend.snapshot(machine)
    (state_dir / "podman" / f"{machine}.json").unlink()
    backend.exec(machine, ["touch", "/tmp/x"], timeout=10)
    backend.reset(machine)
    assert backend.exec(machine, ["test", "-e", "/tmp/x"], timeout=10).returncode == 1
    [info] = backend.list(machine)
    assert info.labels["vmpool.session"] == "podmantest"


def test_snapshot_of_an_unchanged_container_commits_nothing_and_reset_restores_it(
    backend: PodmanBackend, machine: str
) -> None:
    backend.snapshot(machine)
    assert podman("image", "exists", warm_image_name(machine)).returncode == 1
    backend.exec(machine, ["sh", "-c", "echo dirty > /tmp/x"], timeout=10)
    backend.reset(machine)
    assert backend.exec(machine, ["test", "-e", "/tmp/x"], timeout=10).returncode == 1
    assert backend.exec(machine, ["hostname"], timeout=10).stdout.strip() == machine
    [info] = backend.list(machine)
    assert info.running and info.labels["vmpool.session"] == "podmantest"


def test_reset_without_snapshot_is_an_error(backend: PodmanBackend, machine: str) -> None:
    with pytest.raises(BackendError, match="no snapshot"):
        backend.reset(machine)


def test_delete_is_idempotent_and_removes_the_warm_image(
    backend: PodmanBackend, make_machine: Callable[..., str]
) -> None:
    name = make_machine()
    backend.snapshot(name)
    backend.delete(name)
    backend.delete(name)
    assert backend.list(name) == []
    assert podman("image", "exists", warm_image_name(name)).returncode == 1


def test_delete_of_a_never_created_machine_succeeds(backend: PodmanBackend) -> None:
    backend.delete(unique())


def test_list_finds_machines_by_prefix_with_labels(
    backend: PodmanBackend, make_machine: Callable[..., str]
) -> None:
    labels = {**SESSION_LABELS, "vmpool.pid": "1234"}
    name = make_machine(labels=labels)
    prefix = name.rsplit("-", 1)[0]
    found = backend.list(prefix)
    assert [m.name for m in found] == [name]
    assert dict(found[0].labels) == labels
    assert found[0].running
    assert backend.list(prefix + "x") == []


# -- networks ---------------------------------------------------------------------------------
def test_machines_on_one_network_reach_each_other(
    backend: PodmanBackend, network: str, make_machine: Callable[..., str]
) -> None:
    # `network` before `make_machine`: fixtures tear down in reverse, machines first
    server = make_machine(network=network)
    client = make_machine(network=network)
    serve = "mkdir -p /www && echo hello-from-a > /www/f && httpd -p 8080 -h /www"
    assert backend.exec(server, ["sh", "-c", serve], timeout=10).ok
    address = backend.address(server)
    assert address is not None
    fetched: list[str] = []

    def fetch() -> None:
        url = f"http://{address}:8080/f"
        # busybox-static's `wget -T` segfaults; bound it with `timeout` instead
        result = backend.exec(client, ["timeout", "10", "wget", "-q", "-O", "-", url], timeout=15)
        if not result.ok:
            raise BackendError(f"wget exited {result.returncode}: {result.stderr}")
        fetched.append(result.stdout)

    probe_until(fetch, timeout=20, what="httpd on the server")
    assert fetched[-1] == "hello-from-a\n"


def _route_only_to(pid: str, subnet: str, gateway: str) -> None:
    """Leave the container of ``pid`` one route: to ``subnet`` via its own gateway.

    With no default route left, nothing it sends can leave this host (the network rule); the
    only way to ``subnet`` is the host's forwarding between the two bridges.
    """
    netns = f"--net=/proc/{pid}/ns/net"
    for argv in (["ip", "route", "del", "default"],
                 ["ip", "route", "add", subnet, "via", gateway]):
        subprocess.run(["nsenter", netns, *argv], check=True, timeout=10, capture_output=True)


def test_a_pool_network_is_unreachable_from_another_pools_machines(
    backend: PodmanBackend, make_machine: Callable[..., str]
) -> None:
    nets = [unique("neta"), unique("netb")]
    machines: list[str] = []
    for net in nets:
        backend.create_network(net, SESSION_LABELS)
    try:
        machines += [make_machine(network=net) for net in nets]
        client, server = machines
        assert backend.exec(
            server, ["sh", "-c", "mkdir -p /www && echo secret > /www/f && httpd -p 8080 -h /www"],
            timeout=10,
        ).ok
        address = backend.address(server)
        local = backend.exec(server, ["timeout", "5", "wget", "-q", "-O", "-",
                                      "http://127.0.0.1:8080/f"], timeout=10)
        assert local.stdout == "secret\n"  # the server does serve
        info = json.loads(podman("inspect", client).check("inspect").stdout)[0]
        gateway = next(iter(info["NetworkSettings"]["Networks"].values()))["Gateway"]
        subnet = json.loads(podman("network", "inspect", nets[1]).check("inspect").stdout)[0][
            "subnets"][0]["subnet"]
        _route_only_to(str(info["State"]["Pid"]), subnet, gateway)
        result = backend.exec(client, ["timeout", "5", "wget", "-q", "-O", "-",
                                       f"http://{address}:8080/f"], timeout=15)
        assert not result.ok and "secret" not in result.stdout
        rules = subprocess.run(["iptables", "-w", "10", "-S", "VMPOOL_ISOLATION"], check=True,
                               capture_output=True, text=True, timeout=30).stdout
        bridge = json.loads(podman("network", "inspect", nets[1]).check("inspect").stdout)[0][
            "network_interface"]
        assert f"-i {bridge} -o podman+ -j DROP" in rules
    finally:
        for name in machines:  # before their networks; make_machine's own delete then no-ops
            backend.delete(name)
        for net in nets:
            backend.delete_network(net)
    # the rules go with the networks
    rules = subprocess.run(["iptables", "-w", "10", "-S", "VMPOOL_ISOLATION"], check=True,
                           capture_output=True, text=True, timeout=30).stdout
    assert f"-i {bridge} " not in rules


def test_reset_keeps_the_address_on_the_network(
    backend: PodmanBackend, network: str, make_machine: Callable[..., str]
) -> None:
    name = make_machine(network=network)
    before = backend.address(name)
    backend.snapshot(name)
    make_machine(network=network)  # a neighbour, so a fresh lease would differ
    backend.reset(name)
    assert backend.address(name) == before


def test_reset_falls_back_to_a_new_address_when_the_old_one_is_unusable(
    backend: PodmanBackend, network: str, make_machine: Callable[..., str], state_dir: Path
) -> None:
    name = make_machine(network=network)
    backend.snapshot(name)
    record_path = state_dir / "podman" / f"{name}.json"
    record = json.loads(record_path.read_text())
    record["ip"] = "192.0.2.7"  # TEST-NET-1: outside the network's subnet
    record_path.write_text(json.dumps(record))
    backend.reset(name)
    assert backend.address(name) not in (None, "192.0.2.7")
    assert backend.exec(name, ["true"], timeout=10).ok


def test_networks_are_listed_with_labels_and_deleted_idempotently(
    backend: PodmanBackend,
) -> None:
    name = unique("net")
    backend.create_network(name, SESSION_LABELS)
    try:
        backend.create_network(name, SESSION_LABELS)  # an existing network is success
        [info] = backend.list_networks(name)
        assert info.name == name
        assert dict(info.labels) == SESSION_LABELS
    finally:
        backend.delete_network(name)
    backend.delete_network(name)
    assert backend.list_networks(name) == []
    assert podman("network", "exists", name).returncode == 1


# -- teardown in two tool calls, and the remembered check -----------------------------------
def test_delete_many_removes_machines_and_warm_images_in_two_calls(
    backend: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [unique(str(i)) for i in range(3)]
    try:
        for name in names:
            backend.create(MachineSpec(name, SESSION_LABELS))
            backend.start(name)
            backend.wait_ready(name, timeout=30)
            backend.exec(name, ["touch", "/root/changed"], timeout=10)  # a warm image is committed
            backend.snapshot(name)
        missing = unique("never")  # podman 4.3's `rm -f a b missing` alone removes nothing
        calls = _spy(monkeypatch)
        assert backend.delete_many([*names, missing]) == {}
        assert [c[1:3] for c in calls] == [("rm", "-f"), ("image", "rm")], calls
        for name in names:
            assert backend.list(name) == []
            warm = warm_image_name(name)
            assert _proc.run(["podman", "image", "exists", warm], timeout=30).returncode == 1
    finally:
        monkeypatch.undo()
        for name in names:
            backend.delete(name)


def test_delete_many_of_nothing_runs_nothing(
    backend: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch)
    assert backend.delete_many([]) == {}
    assert calls == []


def test_delete_of_a_never_snapshotted_machine_skips_the_image_removal(
    backend: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique()
    backend.create(MachineSpec(name, SESSION_LABELS))
    backend.start(name)
    calls = _spy(monkeypatch)
    backend.delete(name)
    assert [c[1] for c in calls] == ["rm"]
    assert backend.list(name) == []


def test_a_passing_check_is_remembered(
    backend: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.check()
    calls = _spy(monkeypatch)
    backend.check()
    assert calls == []


def test_a_failing_check_is_not_remembered(tmp_path: Path) -> None:
    backend = PodmanBackend(PodmanSettings(image=f"localhost/{unique('img')}:latest"), tmp_path)
    for _ in range(2):
        with pytest.raises(Exception, match="not found"):
            backend.check()


@contextlib.contextmanager
def ready_machine(backend: PodmanBackend) -> Iterator[str]:
    """A created, started and ready machine of ``backend`` (its own settings), deleted after."""
    name = unique()
    try:
        backend.create(MachineSpec(name, SESSION_LABELS))
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        yield name
    finally:
        backend.delete(name)


# -- the exec agent ---------------------------------------------------------------------------
def _agent_pid(machine: str) -> str:
    """The pid of the exec agent in ``machine``, found with a plain `podman exec`."""
    out = podman("exec", machine, "ps", "-o", "pid,args").check("ps").stdout
    # its own command line (PID 1's, which starts it, names the script too)
    pids = [line.split()[0] for line in out.splitlines()
            if line.split()[1:] == ["sh", "/.vmpool/agent.sh"]]
    assert pids, out
    return min(pids, key=int)  # the agent itself; higher pids are its per-command subshells


def test_commands_go_through_the_exec_agent_not_a_tool_process(
    backend: PodmanBackend, machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch)
    results = [backend.exec(machine, ["sh", "-c", f"echo {i}; exit {i}"], timeout=10)
               for i in range(5)]
    assert [(r.returncode, r.stdout) for r in results] == [(i, f"{i}\n") for i in range(5)]
    assert calls == []


def test_a_command_s_output_files_are_private_while_it_runs(
    backend: PodmanBackend, machine: str
) -> None:
    io_dir = backend._dir / "exec" / machine / "io"
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (backend.exec(machine, ["sleep", "2"], timeout=20), done.set())
    )
    worker.start()
    try:
        outputs: list[Path] = []
        deadline = time.monotonic() + 10
        while not outputs and not done.is_set() and time.monotonic() < deadline:
            outputs = [*io_dir.glob("*.out"), *io_dir.glob("*.err")]
        assert outputs, "no output file seen while the command ran"
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in outputs if p.exists()}
        assert set(modes.values()) <= {"0o600"}, modes
        # and the command itself keeps the umask podman exec gives it
        assert backend.exec(machine, ["sh", "-c", "umask"], timeout=10).stdout.strip() in (
            "0022", "022")
    finally:
        worker.join()


def test_the_agent_passes_argv_verbatim(backend: PodmanBackend, machine: str) -> None:
    argv = ["printf", "%s|", "it's", "two  words", "new\nline", "$HOME", "*", '"q"', ""]
    result = backend.exec(machine, argv, timeout=10)
    assert result.stdout == "it's|two  words|new\nline|$HOME|*|\"q\"||"


def test_the_agent_runs_commands_as_podman_exec_does(
    backend: PodmanBackend, machine: str
) -> None:
    probe = ["sh", "-c", 'id; pwd; echo "$PATH $HOME"; hostname; cat /proc/self/cgroup']
    via_agent = backend.exec(machine, probe, timeout=10)
    via_podman = podman("exec", machine, *probe)
    assert via_agent.ok and via_podman.returncode == 0
    assert via_agent.stdout == via_podman.stdout


def test_a_command_that_is_not_found_exits_127(backend: PodmanBackend, machine: str) -> None:
    result = backend.exec(machine, ["no-such-command-here"], timeout=10)
    assert result.returncode == 127
    assert "no-such-command-here" in result.stderr


def test_a_timed_out_command_is_killed_with_its_children_through_the_agent(
    backend: PodmanBackend, machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch)
    with pytest.raises(ExecTimeout):
        backend.exec(machine, ["sh", "-c", "sleep 41 & sleep 42"], timeout=1)
    assert calls == []

    def gone() -> None:
        out = backend.exec(machine, ["ps", "-o", "args"], timeout=10).stdout
        if "sleep 41" in out or "sleep 42" in out:
            raise BackendError(f"still running:\n{out}")

    probe_until(gone, timeout=5, what="the timed-out command to be killed")


def test_a_daemon_started_by_a_command_does_not_keep_the_agent_s_fifo(
    backend: PodmanBackend, machine: str
) -> None:
    backend.exec(machine, ["sh", "-c", "sleep 300 >/dev/null 2>&1 &"], timeout=10)
    podman("exec", machine, "kill", "-9", _agent_pid(machine)).check("kill agent")
    # with the agent dead nobody may read requests: the daemon must not hold the FIFO open
    result = backend.exec(machine, ["echo", "still answered"], timeout=10)
    assert result.stdout == "still answered\n"


def test_a_killed_agent_is_started_again_by_the_next_command(
    backend: PodmanBackend, machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    podman("exec", machine, "kill", "-9", _agent_pid(machine)).check("kill agent")
    calls = _spy(monkeypatch)
    assert backend.exec(machine, ["echo", "one"], timeout=10).stdout == "one\n"
    assert [c[1:3] for c in calls] == [("exec", "-d")]  # the restart, then the agent ran it
    assert backend.exec(machine, ["echo", "two"], timeout=10).stdout == "two\n"
    assert len(calls) == 1


def test_the_agent_is_back_after_a_reset(
    backend: PodmanBackend, machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.exec(machine, ["touch", "/root/before"], timeout=10)
    backend.snapshot(machine)
    backend.reset(machine)
    calls = _spy(monkeypatch)
    assert backend.exec(machine, ["ls", "/root"], timeout=10).stdout == "before\n"
    assert calls == []


def test_without_the_agent_every_command_is_a_podman_exec(
    image: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = PodmanBackend(PodmanSettings(image=image, exec_agent=False), state_dir)
    with ready_machine(backend) as name:
        calls = _spy(monkeypatch)
        assert backend.exec(name, ["ls", "/"], timeout=10).ok
        assert [c[1] for c in calls] == ["exec"]
        assert ".vmpool" not in backend.exec(name, ["ls", "-a", "/"], timeout=10).stdout


def test_delete_removes_the_agent_directory(backend: PodmanBackend, state_dir: Path) -> None:
    name = unique()
    backend.create(MachineSpec(name, SESSION_LABELS))
    backend.start(name)
    backend.wait_ready(name, timeout=30)
    assert (state_dir / "podman" / "exec" / name / "io" / "in").exists()
    backend.delete(name)
    assert not (state_dir / "podman" / "exec" / name).exists()


def test_an_exec_before_start_does_not_keep_the_agent_away_after_it(
    backend: PodmanBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique()
    try:
        backend.create(MachineSpec(name, SESSION_LABELS))
        with pytest.raises(BackendError):
            backend.exec(name, ["true"], timeout=10)  # not running: no agent, and no exec
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        calls = _spy(monkeypatch)
        assert backend.exec(name, ["echo", "up"], timeout=10).stdout == "up\n"
        assert calls == []
    finally:
        monkeypatch.undo()
        backend.delete(name)


def test_a_container_stopped_mid_command_is_a_backend_error_at_once(
    backend: PodmanBackend, machine: str
) -> None:
    stopper = threading.Timer(0.5, lambda: podman("stop", "-t", "0", machine))
    stopper.start()
    started = time.monotonic()
    try:
        with pytest.raises(BackendError, match="stopped while the command ran"):
            backend.exec(machine, ["sleep", "20"], timeout=15)
        assert time.monotonic() - started < 5
    finally:
        stopper.join()


def test_a_state_directory_with_a_colon_runs_commands_without_the_agent(
    image: str, tmp_path: Path
) -> None:
    backend = PodmanBackend(PodmanSettings(image=image), tmp_path / "a:b")
    with ready_machine(backend) as name:
        assert backend.exec(name, ["echo", "fine"], timeout=10).stdout == "fine\n"
        assert not (tmp_path / "a:b" / "podman" / "exec").exists()


def test_commands_racing_to_restart_a_killed_agent_start_only_one(
    backend: PodmanBackend, machine: str
) -> None:
    podman("exec", machine, "kill", "-9", _agent_pid(machine)).check("kill agent")
    others = [PodmanBackend(backend.settings, backend._dir.parent) for _ in range(3)]
    results: list[str] = []

    def run(b: PodmanBackend, i: int) -> None:
        results.append(b.exec(machine, ["echo", str(i)], timeout=20).stdout)

    threads = [threading.Thread(target=run, args=(b, i)) for i, b in enumerate([backend, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [f"{i}\n" for i in range(4)]
    out = podman("exec", machine, "ps", "-o", "pid,ppid,args").check("ps").stdout
    agents = [line.split() for line in out.splitlines() if line.endswith("sh /.vmpool/agent.sh")]
    parents = {pid for pid, _ppid, *_ in agents}
    # the agent itself, not its per-command subshells (forks of it, whose parent is an agent)
    assert len([a for a in agents if a[1] not in parents]) == 1, out


def test_a_container_whose_user_cannot_run_the_agent_uses_podman_exec_without_retrying(
    image: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = PodmanSettings(image=image, extra_args=["--user", "1234:1234"])
    backend = PodmanBackend(settings, state_dir)
    with ready_machine(backend) as name:
        assert backend.exec(name, ["id", "-u"], timeout=10).stdout == "1234\n"

        class AnHourLater:  # the exec path's clock, moved past any retry delay
            def __getattr__(self, attr: str) -> Any:
                return getattr(time, attr)

            @staticmethod
            def monotonic() -> float:
                return time.monotonic() + 3600

        monkeypatch.setattr(podman_commands, "time", AnHourLater())
        calls = _spy(monkeypatch)
        assert backend.exec(name, ["id", "-u"], timeout=10).stdout == "1234\n"
        assert [c[1] for c in calls] == ["exec"], calls  # not `exec -d` again: it cannot work


def test_gc_removes_what_a_container_removed_outside_vmpool_left_in_the_state_dir(
    backend: PodmanBackend, state_dir: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    prefix = f"vmpooltest-{run}"
    names = [f"{prefix}-gone", f"{prefix}-kept", f"{prefix}-young"]
    try:
        for name in names:
            backend.create(MachineSpec(name, {}))  # no owner labels: reaping leaves them be
            backend.start(name)
            backend.wait_ready(name, timeout=30)
        for name in (names[0], names[2]):
            podman("rm", "-f", "-t", "0", name).check("rm outside vmpool")
        old = time.time() - reaper.LITTER_AGE - 60
        for name in names[:2]:  # the young one's files were just touched: it may be mid-create
            podman_dir = state_dir / "podman"
            for path in (podman_dir / f"{name}.json", podman_dir / "exec" / name):
                os.utime(path, (old, old))
        report = reaper.reap(JsonStateDir(state_dir), backend, prefix)
        assert sorted(report.files_removed) == [
            f"podman/exec/{names[0]}", f"podman/{names[0]}.json"
        ], report
        for name in names[1:]:
            assert (state_dir / "podman" / f"{name}.json").exists()
            assert (state_dir / "podman" / "exec" / name).exists()
        assert backend.exec(names[1], ["true"], timeout=10).ok  # the kept machine is untouched
    finally:
        for name in names:
            backend.delete(name)


def test_teardown_with_a_corrupt_record_still_deletes_the_pools_network(
    image: str, tmp_path: Path
) -> None:
    from vmpool.config import PoolSettings, Profile
    from vmpool.controller import Controller

    prefix = f"vmpooltest{uuid.uuid4().hex[:6]}"
    directory = JsonStateDir(tmp_path / "state")
    profile = Profile(
        name="default",
        pool=PoolSettings(name_prefix=prefix, backoff=0.0),
        podman=PodmanSettings(image=image),
    )
    backend = PodmanBackend(profile.podman, directory.path)
    controller = Controller(
        directory=directory, backend=backend, profile=profile, size=1, session="corrupt"
    )
    controller.start()
    try:
        controller.wait_until_ready(1, 60)
        assert [n.name for n in backend.list_networks(prefix)] == [f"{controller.pool_id}-net"]
        # under the pool's lock, so that its owner (who keeps it in memory) reads it again
        with directory.store(controller.pool_id)._locked():
            controller.store.path.write_bytes(b"{not json")
        controller.stop()
        assert backend.list(prefix) == []
        assert backend.list_networks(prefix) == []
    finally:
        for info in backend.list(prefix):
            backend.delete(info.name)
        for info in backend.list_networks(prefix):
            backend.delete_network(info.name)


# -- a hostile test against the agent's directory (issue 15, findings 3 and 4) ------------------
def _in_machine(machine: str, script: str) -> None:
    """Run ``script`` in ``machine`` as test code would (a plain `podman exec`; failures of its
    individual steps, e.g. on a read-only mount, are the point, not an error)."""
    podman("exec", machine, "sh", "-c", script).check("tamper")


def _kill_agent(machine: str) -> None:
    podman("exec", machine, "kill", "-9", _agent_pid(machine)).check("kill agent")


@pytest.mark.parametrize("planted", ["start.lock", "in", "agent.sh"])
def test_a_symlink_planted_in_the_agent_directory_creates_nothing_on_the_host(
    backend: PodmanBackend, machine: str, tmp_path: Path, planted: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    # a name the host opens there, in every directory of /.vmpool the machine can write,
    # becomes a symlink to a host path; then the agent dies, so the host must start it again
    _in_machine(machine, f"""
        for d in $(find /.vmpool -type d); do
          rm -rf "$d/{planted}" 2>/dev/null; ln -s "{victim}/{planted}" "$d/{planted}" 2>/dev/null
        done; true""")
    _kill_agent(machine)
    assert backend.exec(machine, ["echo", "one"], timeout=10).stdout == "one\n"
    assert backend.exec(machine, ["echo", "two"], timeout=10).stdout == "two\n"
    backend.snapshot(machine)
    backend.reset(machine)
    assert backend.exec(machine, ["echo", "three"], timeout=10).stdout == "three\n"
    assert list(victim.iterdir()) == []


def test_an_agent_script_rewritten_by_a_test_does_not_log_the_next_test_s_commands(
    backend: PodmanBackend, machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.snapshot(machine)  # ready: what check-in resets it to
    # the test: every agent script it can reach now also copies each command to spy.log
    _in_machine(machine, """
        for f in $(find /.vmpool -name agent.sh); do
          d=$(dirname "$f")
          sed -i 's|sh "$d/$id.sh"|cat "$d/$id.sh" >>"$d/spy.log"; sh "$d/$id.sh"|' "$f"
        done 2>/dev/null; true""")
    _kill_agent(machine)  # so the tampered script is what starts next
    backend.reset(machine)  # check-in
    secret = f"secret-{uuid.uuid4().hex}"
    calls = _spy(monkeypatch)
    assert backend.exec(machine, ["echo", secret], timeout=10).stdout == f"{secret}\n"
    assert calls == []  # through the agent, as usual
    host_dir = backend._dir / "exec" / machine
    logged = [p for p in host_dir.rglob("*") if p.is_file() and secret in p.read_text()]
    assert logged == []
    seen = podman("exec", machine, "find", "/.vmpool", "-type", "f", "-exec", "grep", "-l",
                  secret, "{}", "+")
    assert seen.stdout == "", seen.stdout


@pytest.mark.parametrize("replacement", ["plain file", "directory", "symlink"])
def test_an_input_fifo_a_test_replaced_is_repaired_not_waited_on(
    backend: PodmanBackend, machine: str, replacement: str
) -> None:
    make = {"plain file": ': > "$f"', "directory": 'mkdir "$f"', "symlink": 'ln -s /x "$f"'}
    backend.snapshot(machine)
    _in_machine(machine, f"""
        for f in $(find /.vmpool -name in); do rm -f "$f"; {make[replacement]}; done""")
    started = time.monotonic()
    # the same test's next command: runs (the agent restarted), no timeout, no error
    assert backend.exec(machine, ["echo", "next exec"], timeout=5).stdout == "next exec\n"
    assert time.monotonic() - started < 4
    _in_machine(machine, f"""
        for f in $(find /.vmpool -name in); do rm -f "$f"; {make[replacement]}; done""")
    backend.reset(machine)  # check-in; the next test's first command runs through the agent
    assert backend.exec(machine, ["echo", "next test"], timeout=5).stdout == "next test\n"
    ps = podman("exec", machine, "ps", "-o", "args").stdout.splitlines()
    assert "sh /.vmpool/agent.sh" in [line.strip() for line in ps]
