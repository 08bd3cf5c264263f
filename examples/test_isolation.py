"""Writes must not leak into the next test: each test checks the machine is clean, then dirties it.

Run with the default policy (reset after every test) and fewer machines than tests: every
machine is reused, so a reset that did not discard the writes fails the next test.
"""

import pytest

from vmpool.client import VM


@pytest.mark.parametrize("n", range(6))
def test_no_leftovers_from_earlier_tests(pool_vm: VM, n: int) -> None:
    leftovers = pool_vm.exec("ls /tmp/leak-* /opt/leak-* 2>/dev/null").stdout.split()
    assert leftovers == [], f"{pool_vm.name} still holds files of an earlier test: {leftovers}"
    pool_vm.exec(f"echo {n} > /tmp/leak-{n} && mkdir -p /opt && touch /opt/leak-{n}", check=True)


@pytest.mark.vm(fresh=True)
def test_fresh_machine_was_never_used(pool_vm: VM) -> None:
    assert pool_vm.exec("ls /tmp/leak-* 2>/dev/null").stdout == ""
