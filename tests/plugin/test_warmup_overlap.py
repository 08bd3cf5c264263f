"""Warm-up preparation starts at the first pool test collected, overlapping the rest of
collection; machines are made only once collection is final (a usage error found later in the
same collection must come before any machine), unless ``warm_during_collection`` trades that rule
for an earlier first test."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Harness

#: collected second: its import waits (bounded) for the controller to hear the early demand,
#: and each worker appends what it saw while it was still collecting
SLOW_MODULE = """
import json
import time
from pathlib import Path

STATE = Path({state!r})
CREATES = Path({creates!r})

def early_seen():
    for f in STATE.glob("*.session"):
        try:
            if "default" in json.loads(f.read_text()).get("early", {{}}):
                return True
        except ValueError:
            pass
    return False

deadline = time.monotonic() + 10
while not early_seen() and time.monotonic() < deadline:
    time.sleep(0.01)
with open({verdict!r}, "a") as fh:
    seen = "prepared" if early_seen() else "not yet"
    made = "machine" if CREATES.exists() else "no machine"
    fh.write(f"{{seen}}, {{made}}\\n")


def test_plain():
    pass
"""


@pytest.mark.slow
def test_preparation_begins_while_later_modules_are_still_being_collected(
    harness: Harness,
) -> None:
    verdict = harness.path / "verdict"
    harness.pytester.makepyfile(
        test_a_pool="""
        def test_uses_a_machine(pool_vm):
            assert pool_vm.exec("true").returncode == 0
        """,
        test_b_slow=SLOW_MODULE.format(
            state=str(harness.state_dir),
            creates=str(harness.sim_root / "creates"),
            verdict=str(verdict),
        ),
    )
    result = harness.run("-n", "2")
    result.assert_outcomes(passed=2)
    lines = verdict.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("prepared") for line in lines), lines
    # the worker that finished collecting first wrote its line before any final demand existed;
    # (the other may see a machine: the first finisher's demand is final for all)
    assert "prepared, no machine" in lines, lines
    harness.assert_nothing_left()


@pytest.mark.slow
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


#: collected second: waits (bounded) for the first machine to be made, and records whether it was
#: while this module was still being collected
WAITS_FOR_A_MACHINE = """
import time
from pathlib import Path

import pytest

CREATES = Path({creates!r})
deadline = time.monotonic() + 20
while not CREATES.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
with open({verdict!r}, "a") as fh:
    fh.write("machine\\n" if CREATES.exists() else "no machine\\n")

{tests}
"""


#: under xdist these sessions take 12-13 s here: outside the fast loop
_SLOW_XDIST = pytest.param(["-n", "2"], id="xdist", marks=pytest.mark.slow)


def _early_warm_suite(harness: Harness, tests: str) -> Path:
    verdict = harness.path / "verdict"
    (harness.path / "pool.toml").write_text("[pool]\nwarm_during_collection = true\n")
    harness.pytester.makepyfile(
        test_a_pool="""
        def test_uses_a_machine(pool_vm):
            assert pool_vm.exec("true").returncode == 0
        """,
        test_b_slow=WAITS_FOR_A_MACHINE.format(
            creates=str(harness.sim_root / "creates"), verdict=str(verdict), tests=tests
        ),
    )
    return verdict


@pytest.mark.parametrize("mode", [_SLOW_XDIST, pytest.param(["-p", "no:xdist"], id="single")])
def test_warm_during_collection_makes_machines_while_later_modules_are_collected(
    harness: Harness, mode: list[str]
) -> None:
    verdict = _early_warm_suite(harness, "def test_plain():\n    pass\n")
    result = harness.run(*mode)
    result.assert_outcomes(passed=2)
    assert "machine" in verdict.read_text().splitlines(), verdict.read_text()
    harness.assert_nothing_left()


@pytest.mark.parametrize("mode", [_SLOW_XDIST, pytest.param(["-p", "no:xdist"], id="single")])
def test_a_usage_error_after_machines_were_made_early_still_leaves_nothing(
    harness: Harness, mode: list[str]
) -> None:
    verdict = _early_warm_suite(
        harness, "@pytest.mark.vm(count=5)\ndef test_too_many(pool_vms):\n    pass\n"
    )
    result = harness.run(*mode, "--vm-pool-size", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, harness.output(result)
    assert "test_b_slow.py::test_too_many" in harness.output(result)
    assert "machine" in verdict.read_text().splitlines()  # made during collection ...
    assert harness.creates() > 0
    harness.assert_nothing_left()  # ... and destroyed before pytest exited
