"""A pool that fails says why, at once and in the terminal: an unusable sim root, a full state
disk, machines that teardown could not delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Harness

TWO_TESTS = """
def test_one(pool_vm):
    assert pool_vm.exec("true").ok


def test_two(pool_vm):
    assert pool_vm.exec("true").ok
"""


def test_unusable_sim_root_fails_the_tests_at_once_with_the_os_error(harness: Harness) -> None:
    (harness.path / "afile").write_text("")
    # the check-out timeout is the default (300 s): a test that waits for the pool shows
    (harness.path / "pool.toml").write_text(f'[sim]\nroot = "{harness.path / "afile" / "sim"}"\n')
    harness.pytester.makepyfile(test_two=TWO_TESTS)
    result = harness.run("-n", "2")
    result.assert_outcomes(errors=2)
    assert "NotADirectoryError: [Errno 20] Not a directory" in result.stdout.str()
    assert result.duration < 60, f"took {result.duration:.0f}s"
