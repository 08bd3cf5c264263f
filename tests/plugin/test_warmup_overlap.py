"""Warm-up starts at the first pool test collected, overlapping the rest of collection."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Harness

#: collected second: its import waits (bounded) for the sim's first create, and each worker
#: appends whether it came while that worker was still collecting
SLOW_MODULE = """
import time
from pathlib import Path

CREATES = Path({creates!r})
deadline = time.monotonic() + 10
while not CREATES.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
with open({verdict!r}, "a") as fh:
    fh.write("during collection\\n" if CREATES.exists() else "not yet\\n")


def test_plain():
    pass
"""


def test_warm_up_begins_while_later_modules_are_still_being_collected(harness: Harness) -> None:
    verdict = harness.path / "verdict"
    harness.pytester.makepyfile(
        test_a_pool="""
        def test_uses_a_machine(pool_vm):
            assert pool_vm.exec("true").returncode == 0
        """,
        test_b_slow=SLOW_MODULE.format(
            creates=str(harness.sim_root / "creates"), verdict=str(verdict)
        ),
    )
    result = harness.run("-n", "2")
    result.assert_outcomes(passed=2)
    assert verdict.read_text().splitlines() == ["during collection"] * 2
    harness.assert_nothing_left()


def test_with_a_keyword_filter_demand_waits_for_the_final_selection(harness: Harness) -> None:
    harness.pytester.makepyfile(
        test_mixed="""
        def test_uses_a_machine(pool_vm):
            pass

        def test_plain():
            pass
        """
    )
    result = harness.run("-n", "2", "-k", "plain")
    result.assert_outcomes(passed=1)
    assert harness.creates() == 0, "a machine was warmed for a deselected test"
    harness.assert_nothing_left()
