"""A machine belongs to one test at a time, under xdist and without it, one or many per test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Harness

#: each test holds an O_EXCL marker named after its machine while it runs: a machine handed
#: to two tests at once makes the second os.open raise FileExistsError
EXCLUSIVE_SUITE = """
import os
import time

import pytest

LOCKS = {locks!r}
USED = {used!r}


@pytest.mark.parametrize("i", range({n}))
def test_machine_is_mine_alone(pool_vm, i):
    marker = os.path.join(LOCKS, pool_vm.name)
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        assert pool_vm.exec("true").ok
        open(os.path.join(USED, f"{{i}}-{{pool_vm.name}}"), "w").close()
        time.sleep(0.05)  # holds the machine a while: a second holder would find the marker
    finally:
        os.close(fd)
        os.unlink(marker)
"""


def _exclusive_suite(harness: Harness, n: int) -> None:
    harness.pytester.makepyfile(
        test_suite=EXCLUSIVE_SUITE.format(
            locks=str(harness.shared_dir("locks")), used=str(harness.shared_dir("used")), n=n
        )
    )


def _machines_used(harness: Harness) -> set[str]:
    """Names of the machines the suite's tests ran on (files are ``<i>-<machine name>``)."""
    return {f.name.split("-", 1)[1] for f in (harness.path / "used").iterdir()}


def test_no_machine_is_shared_and_nothing_is_left(harness: Harness) -> None:
    _exclusive_suite(harness, 20)
    result = harness.run("-n", "4", "--vm-pool-size", "2")
    result.assert_outcomes(passed=20)
    # four workers contended for two machines, and both served
    assert len(_machines_used(harness)) == 2
    assert harness.creates() == 2
    harness.assert_nothing_left()


@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "2"]], ids=["no-xdist", "n2"])
def test_suite_passes_with_and_without_xdist(harness: Harness, mode: list[str]) -> None:
    _exclusive_suite(harness, 20)
    result = harness.run(*mode, "--vm-pool-size", "2")
    result.assert_outcomes(passed=20)
    assert harness.creates() == 2
    harness.assert_nothing_left()


MULTI_SUITE = """
import os
import time

import pytest

LOCKS = {locks!r}


@pytest.mark.parametrize(
    "count", [pytest.param(n, marks=pytest.mark.vm(count=n)) for n in [1, 2, 3] * 8]
)
def test_machines_are_mine_alone(pool_vms, count):
    names = [vm.name for vm in pool_vms]
    assert len(set(names)) == count
    fds = []
    try:
        for name in names:
            fds.append((os.open(os.path.join(LOCKS, name), os.O_CREAT | os.O_EXCL), name))
        for vm in pool_vms:
            assert vm.exec("true").ok
        time.sleep(0.05)  # holds them a while: a second holder would find a marker
    finally:
        for fd, name in fds:
            os.close(fd)
            os.unlink(os.path.join(LOCKS, name))
"""


@pytest.mark.slow
def test_multi_machine_checkouts_share_nothing_and_do_not_deadlock(harness: Harness) -> None:
    harness.pytester.makepyfile(test_multi=MULTI_SUITE.format(locks=str(harness.shared_dir("l"))))
    result = harness.run(
        "-n", "4", "--vm-pool-size", "4", "--vm-checkout-timeout", "60", timeout=90
    )
    result.assert_outcomes(passed=24)
    # a deadlock would show as check-outs waiting out the 60 s timeout
    assert result.duration < 30, f"took {result.duration:.0f}s"
    harness.assert_nothing_left()


#: The three-machine test waits (in a fixture set up before pool_vms) until three one-machine
#: tests hold machines, so it asks while a steady stream keeps at most one machine free. Every
#: test logs when it starts asking ("ask", just before its pool fixture) and when it got its
#: machines ("got"). Without fairness the one free machine goes to whichever small request
#: comes next and the big one waits for the stream to end (past its check-out timeout).
STARVATION_SUITE = """
import os
import time

import pytest

RUNNING = {running!r}
LOG = {log!r}


def log(event, who):
    with open(LOG, "a") as fh:
        fh.write(f"{{time.time():.6f}} {{event}} {{who}}\\n")


@pytest.fixture
def stream_holds_three_machines():
    deadline = time.monotonic() + 60
    while len(os.listdir(RUNNING)) < 3:
        if time.monotonic() > deadline:
            pytest.fail("the one-machine tests never held three machines at once")
        time.sleep(0.005)


@pytest.fixture
def asking(request):
    log("ask", request.node.name)


@pytest.mark.vm(count=3)
def test_three_machines(stream_holds_three_machines, asking, pool_vms):
    log("got", "test_three_machines")
    assert len({{vm.name for vm in pool_vms}}) == 3


@pytest.mark.parametrize("i", range({n}))
def test_one_machine(asking, pool_vm, request, i):
    log("got", request.node.name)
    path = os.path.join(RUNNING, f"{{i}}-{{pool_vm.name}}")
    open(path, "w").close()
    try:
        time.sleep(0.8 + 0.2 * (i % 3))  # the stream: each small test holds its machine
    finally:
        os.unlink(path)
"""
#: a request logged this long after the big one surely joined the line after it
_LATER = 0.5


@pytest.mark.slow
def test_large_request_is_served_under_a_stream_of_small_ones(harness: Harness) -> None:
    log = harness.path / "events.log"
    harness.pytester.makepyfile(
        test_stream=STARVATION_SUITE.format(
            running=str(harness.shared_dir("running")), log=str(log), n=18
        )
    )
    # three workers run ~6 s of one-machine tests; the 3-machine test may wait 4 s at most
    result = harness.run("-n", "4", "--vm-pool-size", "4", "--vm-checkout-timeout", "4")
    result.assert_outcomes(passed=19)
    events: dict[tuple[str, str], float] = {}
    for line in log.read_text().splitlines():
        at, event, who = line.split()
        events[event, who] = float(at)
    big_ask, big_got = events["ask", "test_three_machines"], events["got", "test_three_machines"]
    # first come, first served: a small request that came after the big one waited for it
    overtaking = [
        who
        for (event, who), at in events.items()
        if event == "ask"
        and who != "test_three_machines"
        and at > big_ask + _LATER
        and events["got", who] < big_got
    ]
    assert overtaking == [], f"served before the earlier 3-machine request: {overtaking}"
    harness.assert_nothing_left()
