"""Chaos, briefly: sessions whose xdist workers (and sometimes controller) are SIGKILLed at
random moments leak no machine, never lease one machine to two tests, and keep every state file
readable. `python -m tests.chaos.run --rounds N --backend sim|podman|both` runs it for longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import ChaosRun, podman_usable, run_chaos

#: minutes of real sessions: outside the fast loop (`pytest -m "not slow"`), in .ci/run
pytestmark = pytest.mark.slow


def _assert_clean(run: ChaosRun) -> None:
    t = run.totals
    print(t.summary())
    assert t.workers_killed + t.controllers_killed >= 1, "nothing was killed: nothing was tested"
    assert t.machines_leaked == 0, f"leaked after the final gc: {t.leaked}"
    assert t.double_leases == 0, f"{t.double_leases} machine(s) leased to two tests at once"
    assert t.unreadable_state_files == 0, f"unreadable state files: {t.unreadable}"
    assert t.hung_sessions == 0, "a session did not finish within its timeout"
    assert not t.unexpected_failures, f"failures not caused by a kill: {t.unexpected_failures}"
    assert not t.gc_errors, f"vmpool gc failed: {t.gc_errors}"


def _assert_next_session_reaps(run: ChaosRun) -> None:
    # the last round of each backend kills nothing and reaps at its start: it ends with nothing
    clean = [r for r in run.rounds if not r.workers_killed and not r.controller_killed]
    assert clean, "no clean round ran"
    for r in clean:
        assert r.left_after == 0, f"round {r.number} ({r.backend}) left {r.left_after} machine(s)"


def test_killed_sessions_on_sim_leak_nothing_and_never_double_lease(tmp_path: Path) -> None:
    # 3 chaos rounds (the 2nd also kills the controller), a clean round, then vmpool gc
    run = run_chaos(tmp_path, rounds=3, backends=["sim"], tests=12, seed=None, controller_every=2)
    _assert_clean(run)
    _assert_next_session_reaps(run)


@pytest.mark.podman
def test_killed_sessions_on_podman_leak_nothing_and_never_double_lease(tmp_path: Path) -> None:
    why = podman_usable()
    if why:
        pytest.skip(why)
    # 1 chaos round (workers and the controller killed), a clean round, then vmpool gc
    run = run_chaos(tmp_path, rounds=1, backends=["podman"], tests=8, seed=None, controller_every=1)
    _assert_clean(run)
    _assert_next_session_reaps(run)
