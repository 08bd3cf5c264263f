"""Whatever way a session ends, it leaves no machine leased, alive or recorded behind."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Harness

WORKER_DIES = """
import os
import time

import pytest


def test_kills_its_own_worker(pool_vm):
    assert pool_vm.exec("true").ok
    os._exit(1)


@pytest.mark.parametrize("i", range(6))
def test_others(pool_vm, i):
    assert pool_vm.exec("true").ok
    time.sleep(0.05)  # holds the machine a while, as a real test does
"""


@pytest.mark.slow
def test_dead_worker_lease_is_reclaimed_and_session_cleans_up(harness: Harness) -> None:
    harness.pytester.makepyfile(test_dies=WORKER_DIES)
    result = harness.run("-n", "2", "--vm-pool-size", "2")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*test_kills_its_own_worker*"])
    (summary,) = harness.summaries(result).values()
    assert summary.reclaimed == 1  # the controller took the dead worker's machine back
    harness.assert_nothing_left()


INTERRUPTED = """
import time

import pytest


def test_before(pool_vm):
    assert pool_vm.exec("true").ok


def test_interrupts(pool_vm):
    assert pool_vm.exec("true").ok
    {interrupt}


def test_never_runs(pool_vm):
    raise AssertionError("the session should have stopped")
"""


@pytest.mark.parametrize(
    ("interrupt", "mode"),
    [
        ('pytest.exit("stopping the session")', "-p no:xdist"),
        ("raise KeyboardInterrupt", "-p no:xdist"),
        pytest.param(
            'pytest.exit("stopping the session")', "-n 2", marks=pytest.mark.slow,
            id="pytest.exit-xdist",
        ),
    ],
    ids=["pytest.exit", "KeyboardInterrupt", "pytest.exit-xdist"],
)
def test_interrupted_session_leaves_no_machine(harness: Harness, interrupt: str, mode: str) -> None:
    harness.pytester.makepyfile(test_interrupt=INTERRUPTED.format(interrupt=interrupt))
    result = harness.run(*mode.split(), "--vm-pool-size", "1")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    if "no:xdist" in mode:  # (xdist reports the interrupted worker as crashed, and goes on)
        outcomes = result.parseoutcomes()
        assert outcomes.get("passed") == 1 and "failed" not in outcomes
    # the interrupted test's machine is checked in before the pool stops: no wait for a
    # lease that can never end (teardown_timeout is 60 s), no error checking into a gone pool
    assert result.duration < 30, f"took {result.duration:.0f}s"
    assert "INTERNALERROR" not in harness.output(result)
    assert "teardown error" not in harness.output(result)
    harness.assert_nothing_left()
