"""Two and three pytest sessions at once on one host, with one state directory, one backend and
one name prefix, each reaping at its start and end: no session loses a machine to another."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import ChaosRun, podman_usable

#: minutes of real sessions: outside the fast loop (`pytest -m "not slow"`), in .ci/run
pytestmark = pytest.mark.slow


def _sessions_at_once(run: ChaosRun, backend: str, sessions: int, repeats: int) -> None:
    for rep in range(repeats):
        outcomes = run.run_concurrent(backend, sessions, stagger=1.5, tests=10)
        last_start = max(o.span[0] for o in outcomes)
        first_end = min(o.span[1] for o in outcomes)
        assert last_start < first_end, "the sessions did not run at the same time"
        for k, o in enumerate(outcomes):
            where = f"repeat {rep + 1}, session {k + 1} of {sessions}"
            assert not o.hung, f"{where}: hung\n{o.output_tail}"
            assert o.returncode == 0, f"{where}: exit {o.returncode}\n{o.output_tail}"
            assert o.passed == o.expected, f"{where}: {o.passed}/{o.expected}\n{o.output_tail}"
        left = run.machines(backend)
        assert left == [], f"repeat {rep + 1}: sessions ended but left {left}"
    run.final_gc()
    t = run.totals
    print(t.summary())
    assert t.double_leases == 0, f"{t.double_leases} machine(s) leased to two tests at once"
    assert t.unreadable_state_files == 0, f"unreadable state files: {t.unreadable}"
    assert t.machines_leaked == 0, f"left after gc: {t.leaked}"
    assert not t.gc_errors, f"vmpool gc failed: {t.gc_errors}"


def test_two_sim_sessions_at_once_never_take_each_others_machines(tmp_path: Path) -> None:
    run = ChaosRun(tmp_path)
    try:
        _sessions_at_once(run, "sim", sessions=2, repeats=2)
    finally:
        run.cleanup()


def test_three_sim_sessions_at_once_never_take_each_others_machines(tmp_path: Path) -> None:
    run = ChaosRun(tmp_path)
    try:
        _sessions_at_once(run, "sim", sessions=3, repeats=1)
    finally:
        run.cleanup()


@pytest.mark.podman
def test_two_podman_sessions_at_once_never_take_each_others_machines(tmp_path: Path) -> None:
    why = podman_usable()
    if why:
        pytest.skip(why)
    run = ChaosRun(tmp_path)
    try:
        _sessions_at_once(run, "podman", sessions=2, repeats=1)
    finally:
        run.cleanup()
