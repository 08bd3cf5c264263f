"""Under xdist the pools' teardown begins once every worker has finished normally (while xdist
waits for the worker processes to exit), and sessionfinish waits for it; a crashed worker or a
stop signal leaves the teardown to sessionfinish."""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest

from conftest_plugin.plugin import VmPoolSession
from conftest_plugin.roles import ControllerRole


class FakeController:
    """What the plugin's teardown asks of its controller role."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.release = threading.Event()
        self.errors: dict[str, str] = {}

    def usage_errors(self) -> list[str]:
        return []

    def drain_progress(self) -> list[Any]:
        return []

    def stop(self, lease_budget: Any = None) -> list[Any]:
        self.stopped.set()
        assert self.release.wait(10)
        return []


class FakeSignals:
    def __init__(self, received: int | None = None) -> None:
        self.received = received
        self.teardown_began = False
        self.exit_status = None

    def teardown_begins(self) -> None:
        self.teardown_began = True

    def remaining(self, budget: float) -> float:
        return budget

    def restore(self) -> None:
        pass


def _plugin(pytestconfig: pytest.Config, signals: FakeSignals) -> tuple[VmPoolSession,
                                                                       FakeController]:
    controller = FakeController()
    plugin = VmPoolSession(pytestconfig, cast(Any, None), cast(Any, None),
                           cast(ControllerRole, controller), None, cast(Any, signals))
    return plugin, controller


class _Node:
    def __init__(self) -> None:
        self.workerinput: dict[str, Any] = {}


@pytest.fixture
def settings() -> Any:
    class Settings:
        def to_workerinput(self) -> dict[str, Any]:
            return {}

    return Settings()


def test_teardown_begins_when_the_last_worker_finishes_and_sessionfinish_waits_for_it(
    pytestconfig: pytest.Config, settings: Any
) -> None:
    signals = FakeSignals()
    plugin, controller = _plugin(pytestconfig, signals)
    plugin.settings = settings
    nodes = [_Node(), _Node()]
    for node in nodes:
        plugin.pytest_configure_node(node)
    plugin.pytest_testnodedown(nodes[0], None)
    assert plugin._teardown is None  # a worker still runs tests
    plugin.pytest_testnodedown(nodes[1], None)
    assert controller.stopped.wait(10)
    assert signals.teardown_began
    finished = threading.Event()
    waiter = threading.Thread(target=lambda: (plugin.pytest_sessionfinish(
        cast(pytest.Session, _Session()), 0), finished.set()))
    waiter.start()
    assert not finished.wait(0.2)  # sessionfinish waits for the teardown under way
    controller.release.set()
    waiter.join(10)
    assert finished.is_set()


@pytest.mark.parametrize("crash, signal", [(True, None), (False, 15)])
def test_a_crashed_worker_or_a_stop_signal_leaves_the_teardown_to_sessionfinish(
    pytestconfig: pytest.Config, settings: Any, crash: bool, signal: int | None
) -> None:
    plugin, controller = _plugin(pytestconfig, FakeSignals(signal))
    plugin.settings = settings
    nodes = [_Node(), _Node()]
    for node in nodes:
        plugin.pytest_configure_node(node)
    plugin.pytest_testnodedown(nodes[0], "worker crashed" if crash else None)
    plugin.pytest_testnodedown(nodes[1], None)
    assert plugin._teardown is None and not controller.stopped.is_set()
    controller.release.set()
    plugin.pytest_sessionfinish(cast(pytest.Session, _Session()), 0)
    assert controller.stopped.is_set()


class _Session:
    exitstatus = 0
