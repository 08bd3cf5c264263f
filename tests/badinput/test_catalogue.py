"""The bad-input catalogue: every case gets a clear error that names what is wrong, and loses
nothing (no machine leaked, no state file changed or half-written).

README's troubleshooting section lists these cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool import config as vmconfig
from vmpool import config_backends as vmconfig_backends
from vmpool.backends import make_backend
from vmpool.backends.base import validate_name
from vmpool.backends.sim import SimBackend
from vmpool.client import VM, PoolClient
from vmpool.controller import Controller, policy_for
from vmpool.errors import (
    BackendUnavailable,
    CheckoutTimeout,
    CommandFailed,
    ConfigError,
    PoolUnavailable,
    StateError,
)
from vmpool.state import JsonStateDir

# -- configuration files ---------------------------------------------------------------------
CONFIG_CASES = [
    ("malformed-toml", "[pool\nsize = 2\n", ["pool.toml", "invalid TOML"]),
    ("size-wrong-type", '[pool]\nsize = "four"\n', ["pool.size", "must be an integer"]),
    ("size-zero", "[pool]\nsize = 0\n", ["pool.toml: pool.size: must be >= 1, got 0"]),
    ("size-negative", "[pool]\nsize = -3\n", ["pool.size", "must be >= 1", "-3"]),
    ("size-too-large", "[pool]\nsize = 100000\n", ["pool.size", "must be <= 256"]),
    ("misspelt-key", "[pool]\nszie = 2\n", ["pool.szie", "unknown key", "did you mean 'size'"]),
    ("misspelt-table", "[poool]\nsize = 2\n", ["poool", "unknown key", "did you mean 'pool'"]),
    ("unknown-backend", '[pool]\nbackend = "vbox"\n', ["pool.backend", "must be one of", "vbox"]),
    ("bad-policy", '[pool]\ncheckin_policy = "recycle"\n', ["pool.checkin_policy", "recycle"]),
    ("bad-failure-policy", "[pool]\nfailure_policy = 1\n", ["pool.failure_policy"]),
    ("negative-timeout", "[pool]\ncheckout_timeout = -1\n", ["pool.checkout_timeout", "> 0"]),
    ("bad-prefix", '[pool]\nname_prefix = "My_Pool"\n', ["pool.name_prefix", "must match"]),
    ("zero-parallelism", "[pool]\nwarmup_parallelism = 0\n", ["pool.warmup_parallelism"]),
    ("bool-as-string", '[pool]\npre_ping = "sometimes"\n', ["pool.pre_ping", "true or false"]),
    ("qemu-memory-tiny", "[qemu]\nmemory = 16\n", ["qemu.memory", "must be >= 64"]),
    ("qemu-bad-accel", '[qemu]\naccel = "hvf"\n', ["qemu.accel", "hvf"]),
    ("podman-bad-tool", '[podman]\ntool = "lxc"\n', ["podman.tool", "lxc"]),
    ("podman-misspelt", '[podman]\nimgae = "x"\n', ["podman.imgae", "did you mean 'image'"]),
    ("sim-negative-latency", "[sim]\ncreate_latency = -1\n", ["sim.create_latency", ">= 0"]),
    ("profile-bad-name", "[profiles.Big]\nsize = 1\n", ["profiles", "Big"]),
    ("profile-bad-value", "[profiles.big]\nsize = 0\n", ["profiles.big.size", "must be >= 1"]),
    ("profile-misspelt", "[profiles.big]\nszie = 1\n", ["profiles.big.szie", "unknown key"]),
    ("pool-not-a-table", "pool = 3\n", ["pool", "must be a table"]),
]


@pytest.mark.parametrize("text,expected", [pytest.param(t, e, id=i) for i, t, e in CONFIG_CASES])
def test_bad_config_file_names_file_key_and_reason(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        vmconfig.load(path, environ={})
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message
    assert path.read_text() == text  # the file is never rewritten
    assert list(tmp_path.iterdir()) == [path]  # nothing else was made


def test_bad_tool_vmpool_table_in_pyproject_names_pyproject(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.vmpool.pool]\nsize = 0\n")
    with pytest.raises(ConfigError, match=r"pyproject\.toml: pool\.size: must be >= 1"):
        vmconfig.load(path, environ={})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        vmconfig.load(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"VMPOOL_SIZE": "abc"}, "VMPOOL_SIZE: must be an integer, got 'abc'"),
        ({"VMPOOL_SIZE": "0"}, "VMPOOL_SIZE: must be >= 1"),
        ({"VMPOOL_BACKEND": "nope"}, "VMPOOL_BACKEND: must be one of"),
        ({"VMPOOL_CHECKOUT_TIMEOUT": "soon"}, "VMPOOL_CHECKOUT_TIMEOUT: must be a number"),
    ],
)
def test_bad_environment_variable_is_named(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        vmconfig.load(None, environ=env)


def test_bad_option_is_named_by_its_flag() -> None:
    with pytest.raises(ConfigError, match="--vm-pool-size: must be >= 1, got 0"):
        vmconfig.load(
            None, environ={}, overrides={"size": 0}, override_names={"size": "--vm-pool-size"}
        )


def test_cli_config_check_exits_2_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text("[pool]\nsize = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "pool.size: must be >= 1, got 0" in proc.stderr


# -- state directory and state files -----------------------------------------------------------
def test_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StateError, match="is a symlink"):
        JsonStateDir(tmp_path / "link")
    assert list((tmp_path / "real").iterdir()) == []


def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(StateError, match="owned by uid 65534"):
        JsonStateDir(other)


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        JsonStateDir(tmp_path / "f")


def test_uncreatable_state_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match=r"cannot (create|use)"):
        JsonStateDir(tmp_path / "f" / "state")


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"{not json", "corrupt state file"),
        (b'{"schema_version": 1, "id": 3}', "corrupt state file"),
        (b'{"schema_version": 99, "id": "p"}', "newer vmpool (schema 99"),
        (b"", "corrupt state file"),
    ],
    ids=["not-json", "wrong-fields", "future-version", "empty"],
)
def test_unreadable_state_file_names_file_and_recovery_and_is_kept(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    d = JsonStateDir(tmp_path / "state")
    path = d.path / "vmpool-abc123.json"
    path.write_bytes(content)
    store = d.store("vmpool-abc123")
    for action in (store.read, lambda: store.transaction().__enter__()):
        with pytest.raises(StateError) as info:
            action()
        assert str(path) in str(info.value) and expected in str(info.value)
        assert "vmpool down" in str(info.value) and "--force" in str(info.value)
    assert path.read_bytes() == content


def test_cli_status_on_corrupt_state_exits_3_with_recovery(tmp_path: Path) -> None:
    d = JsonStateDir(tmp_path / "state")
    (d.path / "vmpool-abc123.json").write_text("{oops")
    proc = subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "status", "--state-dir", str(d.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "corrupt state file" in proc.stderr and "--force" in proc.stderr


# -- backends ------------------------------------------------------------------------------------
def _profile(tmp_path: Path, text: str) -> vmconfig.Profile:
    (tmp_path / "pool.toml").write_text(text)
    return vmconfig.load(tmp_path / "pool.toml", environ={}).default


def test_missing_tool_names_it_and_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match=r"podman: command not found \(apt-get install"):
        make_backend("podman", _profile(tmp_path, ""), tmp_path / "s").check()


def test_auto_with_no_tool_lists_why_each_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable) as info:
        make_backend("auto", _profile(tmp_path, ""), tmp_path / "s")
    for name in ("orbstack", "podman", "docker", "qemu", "Install one"):
        assert name in str(info.value)


def test_missing_qemu_image_says_how_to_build_it(tmp_path: Path) -> None:
    profile = _profile(tmp_path, f'[qemu]\nimage_dir = "{tmp_path / "empty"}"\n')
    with pytest.raises(BackendUnavailable, match="vmpool image build --backend qemu"):
        make_backend("qemu", profile, tmp_path / "s").check()


@pytest.mark.parametrize("name", ["Upper", "with_underscore", "-dash", "x" * 64, "a b", "a/b"])
def test_invalid_machine_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid machine name"):
        validate_name(name)


# -- pools -------------------------------------------------------------------------------------
@pytest.fixture
def pool_parts(tmp_path: Path) -> Iterator[tuple[JsonStateDir, vmconfig.Profile]]:
    yield JsonStateDir(tmp_path / "state"), vmconfig.load(None, environ={}).default


def _controller(
    d: JsonStateDir, profile: vmconfig.Profile, size: int, **sim: object
) -> tuple[Controller, SimBackend]:
    profile = profile.model_copy(
        update={
            "sim": vmconfig_backends.SimSettings(**sim),  # type: ignore[arg-type]
            "pool": profile.pool.model_copy(update={"retries": 1, "backoff": 0.01}),
        }
    )
    backend = SimBackend(profile.sim, d.path)
    return Controller(
        directory=d, backend=backend, profile=profile, size=size, session="bad001"
    ), backend


def test_backend_that_fails_every_create_is_a_clear_error_and_leaks_nothing(
    pool_parts: tuple[JsonStateDir, vmconfig.Profile],
) -> None:
    d, profile = pool_parts
    c, backend = _controller(d, profile, 2, fail_every_create=True)
    c.start()
    try:
        with pytest.raises(PoolUnavailable, match=r"no machine could be made.*injected failure"):
            c.wait_until_ready(1, timeout=30)
        client = PoolClient(c.store, backend, policy_for(profile, backend))
        with pytest.raises(PoolUnavailable, match="injected failure"):
            client.checkout(timeout=5)
        record = c.snapshot()
        assert [m.state.value for m in record.machines] == ["broken", "broken"]
    finally:
        c.stop(lease_timeout=0)
    assert backend.list("") == []
    assert d.pool_ids() == []


def test_checkout_timeout_names_the_pool_and_its_holders_and_leaves_the_line(
    pool_parts: tuple[JsonStateDir, vmconfig.Profile],
) -> None:
    d, profile = pool_parts
    c, backend = _controller(d, profile, 1)
    c.start()
    try:
        c.wait_until_ready(1, timeout=30)
        client = PoolClient(c.store, backend, policy_for(profile, backend), worker="gw7")
        held = client.checkout(test="tests/test_a.py::test_slow")
        with pytest.raises(CheckoutTimeout) as info:
            client.checkout(timeout=0.3)
        message = str(info.value)
        for part in ("size 1", "1 leased", "0 broken", "gw7", "tests/test_a.py::test_slow"):
            assert part in message, message
        assert c.snapshot().queue == []  # the timed-out request left the line
        client.checkin(held)
    finally:
        c.stop(lease_timeout=5)
    assert backend.list("") == []


def test_request_larger_than_the_pool_is_refused_at_once(
    pool_parts: tuple[JsonStateDir, vmconfig.Profile],
) -> None:
    d, profile = pool_parts
    c, backend = _controller(d, profile, 2)
    c.start()
    try:
        client = PoolClient(c.store, backend, policy_for(profile, backend))
        with pytest.raises(PoolUnavailable, match=r"asked for 3 machines but pool .* has only 2"):
            client.checkout(3, timeout=30)
        assert c.snapshot().queue == []
    finally:
        c.stop(lease_timeout=0)


def test_failing_command_with_check_shows_command_and_output(
    pool_parts: tuple[JsonStateDir, vmconfig.Profile],
) -> None:
    d, profile = pool_parts
    c, backend = _controller(d, profile, 1)
    c.start()
    try:
        c.wait_until_ready(1, timeout=30)
        client = PoolClient(c.store, backend, policy_for(profile, backend))
        lease = client.checkout()
        vm: VM = lease.vms[0]
        with pytest.raises(CommandFailed) as info:
            vm.exec("echo partial; echo broken >&2; exit 4", check=True)
        text = str(info.value)
        assert "exited 4" in text and "partial" in text and "broken" in text and "sh" in text
        client.checkin(lease, failed=True)
    finally:
        c.stop(lease_timeout=5)


def test_cli_down_spares_a_live_pool_without_force(
    pool_parts: tuple[JsonStateDir, vmconfig.Profile],
) -> None:
    d, profile = pool_parts
    c, backend = _controller(d, profile, 1)
    c.start()
    try:
        c.wait_until_ready(1, timeout=30)
        on_file = d.store(c.pool_id)

        def machines_on_file() -> object:
            pool = on_file.read_current()  # under the lock: the controller has written back
            assert pool is not None
            return pool.model_dump(mode="json")["machines"]

        before = machines_on_file()
        proc = subprocess.run(
            [sys.executable, "-m", "vmpool.cli", "down", "--state-dir", str(d.path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "live session" in proc.stderr and "--force" in proc.stderr
        assert len(backend.list("")) == 1
        assert machines_on_file() == before
    finally:
        c.stop(lease_timeout=0)
