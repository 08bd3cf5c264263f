"""The end-of-run summary reports what the backend really did."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Harness

PASSING = """
import time

import pytest


@pytest.mark.parametrize("i", range(8))
def test_passes(pool_vm, i):
    assert pool_vm.exec("true").ok
    time.sleep(0.05)  # holds the machine a while, so both machines serve the tests
"""


def test_summary_counts_match_the_backend(harness: Harness) -> None:
    harness.pytester.makepyfile(test_passing=PASSING)
    result = harness.run("-n", "2", "--vm-pool-size", "2")
    result.assert_outcomes(passed=8)
    (summary,) = harness.summaries(result).values()
    assert summary.created == harness.creates() == 2
    # the default check-in policy resets a machine after every passing test
    assert (summary.reset, summary.replaced, summary.checkouts) == (8, 0, 8)


#: in order, on one machine: each failing test's machine is replaced before the next test runs
PASS_AND_FAIL = """
def test_1_fails(pool_vm):
    assert pool_vm.exec("false").ok


def test_2_passes(pool_vm):
    assert pool_vm.exec("true").ok


def test_3_fails(pool_vm):
    assert pool_vm.exec("false").ok


def test_4_passes(pool_vm):
    assert pool_vm.exec("true").ok


def test_5_passes(pool_vm):
    assert pool_vm.exec("true").ok
"""


def test_failed_tests_machines_are_replaced_and_counted(harness: Harness) -> None:
    harness.pytester.makepyfile(test_mixed=PASS_AND_FAIL)
    result = harness.run("-p", "no:xdist", "--vm-pool-size", "1")
    result.assert_outcomes(passed=3, failed=2)
    (summary,) = harness.summaries(result).values()
    assert summary.created == harness.creates() == 3  # the first machine and two replacements
    assert (summary.reset, summary.replaced, summary.checkouts) == (3, 2, 5)
    harness.assert_nothing_left()


def test_quiet_run_gives_the_short_summary(harness: Harness) -> None:
    harness.pytester.makepyfile(test_passing=PASSING)
    result = harness.run("-p", "no:xdist", "--vm-pool-size", "1", "-q")
    result.assert_outcomes(passed=8)
    output = result.stdout.str()
    assert "machines created" not in output and "check-out wait" not in output
    short = re.findall(
        r"^vmpool \S+: (\d+) created, (\d+) reset, (\d+) replaced, (\d+) broken$",
        output,
        re.MULTILINE,
    )
    assert short == [(str(harness.creates()), "8", "0", "0")]
