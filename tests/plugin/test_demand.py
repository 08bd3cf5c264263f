"""Machines are made for what the collected tests ask for: the profiles they use, and no more."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Harness


def test_run_without_pool_fixtures_creates_no_machine(harness: Harness) -> None:
    harness.pytester.makepyfile(
        test_plain="""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_plain(i):
            pass
        """
    )
    result = harness.run("-n", "2")
    result.assert_outcomes(passed=4)
    assert not (harness.sim_root / "creates").exists()
    assert "machines created" not in result.stdout.str()
    harness.assert_nothing_left()


#: each profile's sim keeps its machines under its own root, so where a test's commands run
#: (``pwd -P``) tells which profile made its machine
PROFILES = """
[pool]
size = 2

[profiles.big]
size = 1
[profiles.big.sim]
root = "{big}"
exec_latency = 0.001

[profiles.unused]
size = 1
[profiles.unused.sim]
root = "{unused}"
"""

PROFILE_SUITE = """
import os

import pytest

DEFAULT_ROOT = {default!r}
BIG_ROOT = {big!r}


def machine_dir(vm):
    return vm.exec("pwd -P", check=True).stdout.strip()


@pytest.mark.vm(profile="big")
@pytest.mark.parametrize("i", range(3))
def test_big(pool_vm, i):
    assert "-big-" in pool_vm.name
    assert machine_dir(pool_vm) == os.path.join(BIG_ROOT, "machines", pool_vm.name, "fs")


@pytest.mark.parametrize("i", range(3))
def test_default(pool_vm, i):
    assert "-big-" not in pool_vm.name
    assert machine_dir(pool_vm) == os.path.join(DEFAULT_ROOT, "machines", pool_vm.name, "fs")
"""


def test_each_test_runs_on_its_profile_and_only_used_profiles_are_warmed(
    harness: Harness,
) -> None:
    big, unused = harness.path / "big-sim", harness.path / "unused-sim"
    (harness.path / "pool.toml").write_text(PROFILES.format(big=big, unused=unused))
    harness.pytester.makepyfile(
        test_profiles=PROFILE_SUITE.format(
            default=str(harness.sim_root.resolve()), big=str(big.resolve())
        )
    )
    result = harness.run("-n", "2")
    result.assert_outcomes(passed=6)
    assert (harness.creates(), harness.creates(big)) == (2, 1)
    assert not unused.exists(), "the unused profile was warmed"
    summaries = harness.summaries(result)
    assert summaries.pop("big").created == 1
    (default,) = summaries.values()  # the default profile is labelled by its pool id
    assert default.created == 2
    assert harness.machines(big) == []
    harness.assert_nothing_left()
