"""A pool that fails says why, at once and in the terminal: an unusable sim root, a full state
disk, machines that teardown could not delete."""

from __future__ import annotations

import shlex
import subprocess
import sys
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


FILLS_THE_DISK = """
import os
import time

import pytest


def test_fills_the_state_disk(pool_vm):
    assert pool_vm.exec("true").ok
    fd = os.open({filler!r}, os.O_WRONLY | os.O_CREAT, 0o600)
    size = 1 << 20
    while size:  # to the last byte: a record's write must find no room
        try:
            os.write(fd, b"x" * size)
        except OSError:
            size //= 2
    os.close(fd)


@pytest.mark.parametrize("i", range(6))
def test_after(pool_vm, i):
    assert pool_vm.exec("true").ok
    time.sleep(0.3)  # the record is written back a little later: let it try
"""


def test_full_state_disk_ends_the_run_with_the_reason_and_gc_leaves_nothing(
    harness: Harness,
) -> None:
    # a 2 MiB tmpfs holds the state directory and the sim's machines (its root is inside it)
    disk = harness.path / "disk"
    disk.mkdir()
    _run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(disk)])
    try:
        harness.state_dir = disk / "state"
        harness.sim_root = harness.state_dir / "sim"
        filler = disk / "filler"
        harness.pytester.makepyfile(test_full=FILLS_THE_DISK.format(filler=str(filler)))
        (harness.path / "pool.toml").write_text("[pool]\ncheckout_timeout = 60\n")
        result = harness.run("-n", "2", "--vm-pool-size", "2", timeout=90)
        output = harness.output(result)
        assert "No space left on device" in output, output[-3000:]
        assert "could not lock" not in output
        assert result.duration < 60, f"took {result.duration:.0f}s"  # the check-out timeout

        filler.unlink()  # space is back
        gc = harness.cli("gc", "--backend", "sim")
        assert gc.ret == 0, gc.stdout.str() + gc.stderr.str()
        harness.assert_nothing_left()
        assert [p.name for p in harness.state_dir.iterdir() if p.suffix == ".tmp"] == []
    finally:
        _run(["umount", "-l", str(disk)])


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, timeout=30, capture_output=True)


def test_what_teardown_left_is_listed_with_the_gc_command_that_removes_it(
    harness: Harness,
) -> None:
    (harness.path / "pool.toml").write_text("[sim]\nfail_delete = true\n")
    harness.pytester.makepyfile(test_two=TWO_TESTS)
    result = harness.run("-n", "2", "--vm-pool-size", "2")
    result.assert_outcomes(passed=2)
    left = sorted(harness.machines())
    assert len(left) == 2
    out = result.stdout.str()
    (line,) = [ln for ln in result.outlines if "teardown left" in ln]
    assert f"2 machine(s) {', '.join(left)}" in line and "network " in line and "on sim" in line
    (gc_line,) = [ln for ln in result.outlines if "remove them with: vmpool gc" in ln]
    argv = shlex.split(gc_line.split("remove them with: ", 1)[1])
    assert argv[:2] == ["vmpool", "gc"], out[-2000:]

    (harness.path / "pool.toml").write_text("")  # the tool works again
    gc = harness.pytester.run(sys.executable, "-m", "vmpool.cli", *argv[1:], timeout=120)
    assert gc.ret == 0, gc.stdout.str() + gc.stderr.str()
    harness.assert_nothing_left()
    assert not list((harness.sim_root / "networks").glob("*.json"))
