"""The ``pool_vm`` / ``pool_vms`` fixtures: check out before the test, check in after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmpool.client import VM

__all__ = ["VM", "pool_vm", "pool_vms"]


def _lease(request: pytest.FixtureRequest) -> Iterator[tuple[VM, ...]]:
    from conftest_plugin.plugin import PLUGIN_NAME, call_failed_key, mark_args

    session = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    if session is None or session.worker is None:
        raise RuntimeError("vmpool plugin is not active in this process")
    count, fresh, profile = mark_args(request.node)
    client, lease = session.worker.checkout(profile, count, fresh, request.node.nodeid)
    try:
        yield tuple(lease.vms)
    finally:
        failed = request.node.stash.get(call_failed_key, False)
        # no wait for the pool's answer unless a reset may fall to this worker: the lease
        # server applies the check-in before this worker's next check-out
        client.checkin(lease, failed=failed)


@pytest.fixture
def pool_vms(request: pytest.FixtureRequest) -> Iterator[tuple[VM, ...]]:
    """``@pytest.mark.vm(count=N)`` machines, checked out together (all or none)."""
    yield from _lease(request)


@pytest.fixture
def pool_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    """One exclusive machine from the pool; reused, reset or replaced after the test."""
    for vms in _lease(request):
        yield vms[0]
