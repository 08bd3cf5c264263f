"""Waiting in tests: probe an observable event until it happens or a deadline passes.

Never ``sleep(N)`` and hope: a fixed sleep is too short on a loaded host and too long on an
idle one. A sleep that *is* the behaviour under test (a holder that holds, "nothing happens
for a while") stays, with a comment saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition",
    *, interval: float = 0.01,
) -> T:
    """Call ``predicate`` until it returns something true, and return that; AssertionError
    naming ``what`` once ``timeout`` seconds have passed without it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)
