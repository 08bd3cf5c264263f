"""``--vm-pool-keep``: the next session adopts the kept machines, unless the config changed."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Harness

SUITE = """
import os

import pytest


@pytest.mark.parametrize("i", range(4))
def test_uses_a_machine(pool_vm, i):
    assert pool_vm.exec("true").ok
    open(os.path.join({used!r}, pool_vm.name), "w").close()
"""


def _status(harness: Harness) -> list[dict[str, Any]]:
    result = harness.cli("status", "--json")
    assert result.ret == 0, result.stderr.str()
    pools: list[dict[str, Any]] = json.loads(result.stdout.str())["pools"]
    return pools


def _ran_on(harness: Harness) -> set[str]:
    """The machines the last run's tests used (and forget them for the next run)."""
    used = harness.path / "used"
    names = {p.name for p in used.iterdir()}
    shutil.rmtree(used)
    used.mkdir()
    return names


@pytest.mark.slow
def test_kept_pool_is_adopted_and_replaced_when_config_changes(harness: Harness) -> None:
    harness.pytester.makepyfile(test_suite=SUITE.format(used=str(harness.shared_dir("used"))))
    args = ("-p", "no:xdist", "--vm-pool-size", "2", "--vm-pool-keep")

    harness.run(*args).assert_outcomes(passed=4)
    _ran_on(harness)
    assert harness.creates() == 2
    (kept,) = _status(harness)
    assert kept["kept"] and not kept["owner_alive"]
    names = sorted(m["name"] for m in kept["machines"])
    assert [m["state"] for m in kept["machines"]] == ["ready", "ready"]
    assert harness.machines() == names  # the backend still holds them

    second = harness.run(*args)
    second.assert_outcomes(passed=4)
    assert harness.creates() == 2, "the kept machines should have been adopted"
    assert _ran_on(harness) <= set(names)
    summary = harness.summaries(second)[kept["id"]]
    assert summary.adopted and summary.created == 0
    (again,) = _status(harness)
    assert again["id"] == kept["id"] and again["kept"]
    assert sorted(m["name"] for m in again["machines"]) == names

    # machines made with other backend settings are stale: every one is replaced, and no
    # test runs on one meanwhile
    (harness.path / "pool.toml").write_text("[sim]\nexec_latency = 0.001\n")
    harness.run(*args).assert_outcomes(passed=4)
    assert not _ran_on(harness) & set(names)
    assert harness.creates() == 4
    (changed,) = _status(harness)
    assert changed["kept"]
    assert not {m["name"] for m in changed["machines"]} & set(names)
    assert len(harness.machines()) == 2

    down = harness.cli("down")
    assert down.ret == 0, down.stderr.str()
    assert _status(harness) == []
    harness.assert_nothing_left()
