"""The `vmpool` command as a user runs it: a subprocess, its exit code and its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmpool.backends.sim import SimBackend
from vmpool.config_backends import SimSettings


def vmpool(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `vmpool ARGS` in ``cwd`` (no pool.toml there) with no VMPOOL_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMPOOL_")}
    return subprocess.run(
        [sys.executable, "-m", "vmpool.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(cwd: Path, state: Path) -> list[dict[str, Any]]:
    done = vmpool(cwd, "status", "--json", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    pools: list[dict[str, Any]] = json.loads(done.stdout)["pools"]
    return pools


def sim_machines(state: Path) -> list[str]:
    return sorted(i.name for i in SimBackend(SimSettings(), state).list("vmpool-"))


def test_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = vmpool(tmp_path, "up", "--backend", "sim", "--size", "3", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr
    assert "3 machine(s) ready on sim, kept" in up.stdout

    (pool,) = status(tmp_path, state)
    assert (pool["backend"], pool["size"], pool["kept"]) == ("sim", 3, True)
    machines = pool["machines"]
    assert [m["state"] for m in machines] == ["ready"] * 3
    assert all(m["holder"] is None and m["uses"] == 0 for m in machines)
    names = sorted(m["name"] for m in machines)
    assert len(set(names)) == 3 and all(n.startswith(pool["id"] + "-") for n in names)
    assert sim_machines(state) == names

    text = vmpool(tmp_path, "status", "--state-dir", str(state))
    assert text.returncode == 0
    assert f"pool {pool['id']} [default] on sim: size 3, kept" in text.stdout
    assert all(name in text.stdout for name in names)

    down = vmpool(tmp_path, "down", "--backend", "sim", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert f"pool {pool['id']} destroyed" in down.stdout
    assert status(tmp_path, state) == []
    assert sim_machines(state) == []


_SESSION = """
import sys, time
from pathlib import Path
from vmpool.backends.sim import SimBackend
from vmpool.config import PoolSettings, Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller
from vmpool.state import JsonStateDir

directory = JsonStateDir(Path(sys.argv[1]))
profile = Profile(name="default", pool=PoolSettings(size=2, backend="sim"), sim=SimSettings())
controller = Controller(
    directory=directory, backend=SimBackend(profile.sim, directory.path), profile=profile,
    size=2, session=sys.argv[2],
)
controller.start()
controller.wait_until_ready(2, 60)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_gc_reaps_a_killed_session_and_spares_kept_and_live_ones(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sessions = {}
    for session in ("dead01", "live01"):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SESSION, str(state), session],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        sessions[session] = proc
    try:
        # kept after the sessions started (a session adopts a kept pool it finds)
        kept = vmpool(tmp_path, "up", "--backend", "sim", "--size", "1", "--state-dir", str(state))
        assert kept.returncode == 0, kept.stderr
        sessions["dead01"].send_signal(signal.SIGKILL)
        sessions["dead01"].wait(30)
        doomed = [n for n in sim_machines(state) if "-dead01-" in n]
        assert len(doomed) == 2, sim_machines(state)

        dry = vmpool(tmp_path, "gc", "--dry-run", "--backend", "sim", "--state-dir", str(state))
        assert dry.returncode == 0, dry.stderr
        assert all(f"would delete machine {n}" in dry.stdout for n in doomed)
        assert "would delete pool record vmpool-dead01" in dry.stdout
        assert set(doomed) <= set(sim_machines(state)), "a dry run deleted something"

        gc = vmpool(tmp_path, "gc", "--backend", "sim", "--state-dir", str(state))
        assert gc.returncode == 0, gc.stderr
        assert all(f"deleted machine {n}" in gc.stdout for n in doomed)
        left = sim_machines(state)
        assert not set(doomed) & set(left)
        assert sum("-live01-" in n for n in left) == 2, "a live session lost a machine"
        assert len(left) == 3  # and the kept pool's one
        assert sorted(p["session"] for p in status(tmp_path, state)) == sorted(
            [kept_session(tmp_path, state), "live01"]
        )
    finally:
        for proc in sessions.values():
            proc.kill()
            proc.wait(30)
    vmpool(tmp_path, "gc", "--backend", "sim", "--state-dir", str(state))
    down = vmpool(tmp_path, "down", "--backend", "sim", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    again = vmpool(tmp_path, "gc", "--backend", "sim", "--state-dir", str(state))
    assert again.returncode == 0
    assert again.stdout.startswith("nothing to reap in ")
    assert sim_machines(state) == []


def kept_session(cwd: Path, state: Path) -> str:
    (session,) = [p["session"] for p in status(cwd, state) if p["kept"]]
    return session


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # stdout is a pipe, block-buffered unless PYTHONUNBUFFERED is set (it is on some hosts)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VMPOOL_") and k != "PYTHONUNBUFFERED"
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmpool.cli", "status", "--watch", "--state-dir", str(state)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        seen = ""
        assert proc.stdout is not None
        while seen.count("no pools in") < 2 and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert seen.count("no pools in") >= 2, seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("up", "--backend", "sim", "--size", "0"), 2, "--size: must be >= 1, got 0"),
        (("up", "--backend", "nope"), 2, "invalid choice: 'nope'"),
        (("frobnicate",), 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_and_name_the_argument(
    tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    done = vmpool(tmp_path, *args, "--state-dir", str(tmp_path / "state"))
    assert done.returncode == code
    assert message in done.stderr
    assert not (tmp_path / "state").exists() or sim_machines(tmp_path / "state") == []


@pytest.mark.parametrize("backend", ["sim", "podman"])
@pytest.mark.parametrize("pool", ["../outside/victim", "/etc/passwd", "vmpool-abc/../x", "."])
def test_down_with_a_path_for_pool_id_is_a_usage_error_and_deletes_nothing(
    tmp_path: Path, backend: str, pool: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / "victim.json", outside / "victim.lock", tmp_path / "x.json"]
    for v in victims:
        v.write_text("precious")
    down = vmpool(
        tmp_path, "down", "--backend", backend, "--state-dir", str(state), "--pool", pool, "--force"
    )
    assert down.returncode == 2, down.stderr
    assert f"argument --pool: invalid pool id {pool!r}" in down.stderr
    assert "Traceback" not in down.stderr
    assert all(v.read_text() == "precious" for v in victims)
    assert Path("/etc/passwd").exists()


def test_a_store_refuses_a_pool_id_that_is_a_path(tmp_path: Path) -> None:
    # the library too, for callers other than the CLI
    from vmpool.errors import StateError
    from vmpool.state import JsonStateDir

    with pytest.raises(StateError, match=r"invalid pool id '\.\./victim'"):
        JsonStateDir(tmp_path / "state").store("../victim")


def test_down_force_with_a_corrupt_record_deletes_the_pools_network(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = vmpool(tmp_path, "up", "--backend", "sim", "--size", "1", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr
    (record,) = state.glob("vmpool-*.json")
    sim = SimBackend(SimSettings(), state)
    assert [n.name for n in sim.list_networks("vmpool-")] == [f"{record.stem}-net"]
    record.write_text("{not json")
    down = vmpool(
        tmp_path, "down", "--backend", "sim", "--state-dir", str(state),
        "--pool", record.stem, "--force",
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert sim_machines(state) == []
    assert sim.list_networks("vmpool-") == []
    assert not record.exists()


def test_image_build_with_an_invalid_package_name_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "pool.toml").write_text('[image]\npackages = ["no spaces"]\n')
    done = vmpool(tmp_path, "image", "build", "--backend", "podman", "--distro", "debian")
    assert done.returncode == 2, done.stderr
    assert "image.packages" in done.stderr and "'no spaces'" in done.stderr
