"""Three pytest sessions (three "hosts") share one pool on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.chaos._harness import child_env, podman_usable
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import pool_ids

QUICK = ("-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest")
TESTS = r'''
import os, time
import pytest

@pytest.mark.parametrize("i", range(8))
def test_machine_is_mine_alone(pool_vm, i):
    # O_EXCL: fails if a test of any session holds this machine now
    marker = os.path.join(os.environ["MARKS"], pool_vm.name)
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        assert pool_vm.exec(["true"]).returncode == 0
        start = time.time()
        time.sleep(0.2)  # hold it a moment: the other sessions run meanwhile
        with open(os.path.join(os.environ["MARKS"], "..", "held.log"), "a") as log:
            log.write(f"{os.environ['VMPOOL_HOST_ID']} {pool_vm.name} {start} {time.time()}\n")
    finally:
        os.unlink(marker)
'''


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sim", pytest.param("podman", marks=pytest.mark.podman)])
def test_three_sessions_share_one_pool_without_sharing_a_machine(
    pg: throwaway.Throwaway, tmp_path: Path, backend: str
) -> None:
    if backend == "podman" and (why := podman_usable()):
        pytest.skip(why)
    (tmp_path / "test_shared.py").write_text(TESTS)
    marks = tmp_path / "marks"
    marks.mkdir()
    state = tmp_path / "state"
    runs = []
    for i in range(3):
        env = {**child_env(), "VMPOOL_STORE": pg.dsn, "VMPOOL_HOST_ID": f"ci-host-{i}",
               "MARKS": str(marks), "PYTHONPATH": str(Path(__file__).parents[2])}
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", *QUICK, "-q", "--vm-backend", backend,
             "--vm-state-dir", str(state), "--vm-pool-size", "2", "test_shared.py"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
        time.sleep(0.3)  # the behaviour under test: sessions that join a running pool
    for r in runs:
        out, _ = r.communicate(timeout=240)
        assert r.returncode == 0, out
        assert "8 passed" in out, out
    held = [line.split() for line in (tmp_path / "held.log").read_text().splitlines()]
    assert len(held) == 24 and {h[0] for h in held} == {f"ci-host-{i}" for i in range(3)}
    assert {h[1] for h in held} == {"vmpool-shared-0", "vmpool-shared-1"}, held  # one pool
    # sessions of different hosts held machines at the same time (the pool was shared)
    assert any(a[0] != b[0] and float(a[2]) < float(b[3]) and float(b[2]) < float(a[3])
               for a in held for b in held), held
    # the last session to leave destroyed the pool: nothing lost, nothing left behind
    assert pool_ids(pg.dsn) == []
    assert list(marks.iterdir()) == []
    if backend == "sim":
        machines = state / "sim" / "machines"
        left = list(machines.glob("*")) if machines.is_dir() else []
    else:
        left = _podman_names("vmpool-shared")
    assert left == [], left


def _podman_names(prefix: str) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [n for n in out.split() if n.startswith(prefix)]
