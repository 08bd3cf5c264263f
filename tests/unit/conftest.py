"""Fixtures shared by the unit tests: a state directory, a sim backend, real dead/live processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _procs import process_ref

from vmpool.backends.sim import SimBackend
from vmpool.config import PoolSettings, Profile
from vmpool.config_backends import SimSettings
from vmpool.ownership import ProcessRef
from vmpool.state import JsonStateDir


@pytest.fixture
def state_dir(tmp_path: Path) -> JsonStateDir:
    return JsonStateDir(tmp_path / "state")


@pytest.fixture
def make_profile() -> Callable[..., Profile]:
    """``make_profile(size=..., sim={...})``: pool keys as keywords, sim settings as a dict."""

    def make(*, name: str = "default", sim: dict[str, Any] | None = None, **pool: Any) -> Profile:
        return Profile(name=name, pool=PoolSettings(**pool), sim=SimSettings(**(sim or {})))

    return make


@pytest.fixture
def make_sim(state_dir: JsonStateDir) -> Callable[..., SimBackend]:
    def make(**settings: Any) -> SimBackend:
        return SimBackend(SimSettings(**settings), state_dir.path)

    return make


@pytest.fixture
def dead_process() -> ProcessRef:
    """A process that really ran on this host and has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = process_ref(proc.pid)  # still running or a zombie until wait(): create time is readable
    proc.wait()
    return ref


@pytest.fixture
def live_process() -> Iterator[ProcessRef]:
    """A process that runs for the duration of the test."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield process_ref(proc.pid)
    finally:
        proc.kill()
        proc.wait()
