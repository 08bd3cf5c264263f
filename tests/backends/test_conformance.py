"""One conformance suite every backend must pass, run for sim, podman and qemu (real tools).

Each backend boots one machine per module (QEMU boots cost seconds) and the behaviours are
checked on it; delete and reset use their own machine where they would disturb the others.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool.backends import make_backend
from vmpool.backends.base import Backend, MachineSpec
from vmpool.config import load
from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout

BACKENDS = [
    pytest.param("sim", marks=pytest.mark.xdist_group("conf-sim")),
    pytest.param("podman", marks=[pytest.mark.podman, pytest.mark.xdist_group("conf-podman")]),
    pytest.param("qemu", marks=[pytest.mark.qemu, pytest.mark.xdist_group("conf-qemu")]),
]


def _build_image(name: str) -> None:
    profile = load(None, environ={}).default
    if name == "podman":
        from vmpool.backends.podman import build_image as build_podman

        build_podman(profile.podman)
    elif name == "qemu":
        from vmpool.backends.qemu.image import build_image as build_qemu

        build_qemu(profile.qemu)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    name = request.param
    _build_image(name)
    state = tmp_path_factory.mktemp(f"conf-{name}")
    profile = load(None, environ={}).default
    b = make_backend(name, profile, state)
    b.check()
    return b


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"vmconf{secrets.token_hex(3)}"


def _labels(owner: str) -> dict[str, str]:
    return {"vmpool.pool": owner, "vmpool.session": owner}


@pytest.fixture(scope="module")
def machine(backend: Backend, prefix: str) -> Iterator[str]:
    name = f"{prefix}-0"
    backend.create(MachineSpec(name=name, labels=_labels(prefix), index=0))
    try:
        backend.start(name)
        backend.wait_ready(name, timeout=120)
        backend.snapshot(name)
        yield name
    finally:
        backend.delete(name)


def test_ready_machine_answers_exec(backend: Backend, machine: str) -> None:
    result = backend.exec(machine, ["echo", "ready"], timeout=30)
    assert (result.returncode, result.stdout) == (0, "ready\n")


def test_exec_returns_stdout_stderr_and_returncode(backend: Backend, machine: str) -> None:
    result = backend.exec(machine, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_exec_of_a_failing_command_is_not_an_error(backend: Backend, machine: str) -> None:
    result = backend.exec(machine, ["false"], timeout=30)
    assert result.returncode != 0 and not result.ok


def test_exec_timeout_raises_and_machine_survives(backend: Backend, machine: str) -> None:
    with pytest.raises(ExecTimeout):
        backend.exec(machine, ["sleep", "30"], timeout=1.5)
    assert backend.exec(machine, ["true"], timeout=30).returncode == 0


def test_list_finds_owned_machine_with_its_labels(
    backend: Backend, machine: str, prefix: str
) -> None:
    found = {m.name: m for m in backend.list(prefix)}
    assert machine in found
    assert found[machine].labels.get("vmpool.pool") == prefix
    assert all(name.startswith(prefix) for name in found)
    assert backend.list(prefix + "-nomatch") == []


def test_reset_discards_changes(backend: Backend, machine: str) -> None:
    # a relative path: the working directory of a command is inside the machine everywhere
    # (sim's machines are directories on the host, so /tmp would be the host's)
    assert backend.capabilities.reset, "sim, podman and qemu all restore snapshots"
    backend.exec(machine, ["sh", "-c", "echo dirty > conformance-mark"], timeout=30)
    assert backend.exec(machine, ["cat", "conformance-mark"], timeout=30).returncode == 0
    backend.reset(machine)
    backend.wait_ready(machine, timeout=60)
    assert backend.exec(machine, ["cat", "conformance-mark"], timeout=30).returncode != 0


def test_delete_is_idempotent(backend: Backend, prefix: str) -> None:
    name = f"{prefix}-9"
    backend.delete(f"{prefix}-never-created")
    backend.create(MachineSpec(name=name, labels=_labels(prefix), index=9))
    backend.start(name)
    backend.delete(name)
    backend.delete(name)
    assert name not in {m.name for m in backend.list(prefix)}


def test_exec_in_a_missing_machine_is_a_backend_error(backend: Backend, prefix: str) -> None:
    with pytest.raises(BackendError):
        backend.exec(f"{prefix}-missing", ["true"], timeout=10)


@pytest.mark.parametrize(
    "name,settings,message",
    [
        (
            "podman",
            {"podman": {"tool": "podman", "image": "localhost/vmpool-no-such:1"}},
            "vmpool-no-such",
        ),
        ("qemu", {"qemu": {"binary": "qemu-system-nonexistent"}}, "qemu-system-nonexistent"),
        ("qemu", {"qemu": {"kernel": "/nonexistent/vmlinuz"}}, "/nonexistent/vmlinuz"),
    ],
)
def test_missing_tool_or_image_is_a_clear_error(
    tmp_path: Path, name: str, settings: dict[str, dict[str, str]], message: str
) -> None:
    toml = "\n".join(
        f"[{table}]\n" + "\n".join(f'{k} = "{v}"' for k, v in values.items())
        for table, values in settings.items()
    )
    (tmp_path / "pool.toml").write_text(toml)
    profile = load(tmp_path / "pool.toml", environ={}).default
    with pytest.raises(BackendUnavailable, match=message.replace(".", r"\.")):
        make_backend(name, profile, tmp_path / "state").check()
