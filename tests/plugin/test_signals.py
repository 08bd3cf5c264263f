"""SIGTERM and SIGHUP to the pytest controller tear the pool down, as Ctrl-C does, within
teardown_timeout, and the run exits with 128 + the signal's number."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from vmpool.backends import make_backend
from vmpool.config import load

if TYPE_CHECKING:
    from conftest import Harness

#: the inner runs' teardown_timeout, and the bound on how long they take after the signal
#: (measured on 2 cores: 5-7 s at load 10, up to 18 s at load 15)
TEARDOWN_TIMEOUT = 30.0
#: the real user's cache (the built QEMU image), read before pytester moves HOME
CACHE_HOME = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())

SLEEPERS = """
import os
import time

import pytest


@pytest.mark.parametrize("i", range(4))
def test_sleeps_until_stopped(pool_vm, i):
    assert pool_vm.exec("true").ok
    open(os.path.join({marks!r}, f"{{os.getpid()}}-{{i}}"), "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
"""


def _wait_for(
    probe: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str]
) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() >= deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout:g}s:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


def _stop_running_session(
    harness: Harness, backend: str, signum: int, mode: list[str], prefix: str
) -> tuple[subprocess.Popen[str], str, float]:
    """Run the sleepers, send ``signum`` to the controller once the tests hold their machines;
    returns the process (ended), its output and how long it took to end after the signal."""
    marks = harness.shared_dir("marks")
    harness.pytester.makepyfile(test_sleepers=SLEEPERS.format(marks=str(marks)))
    (harness.path / "pool.toml").write_text(
        f'[pool]\nname_prefix = "{prefix}"\nteardown_timeout = {TEARDOWN_TIMEOUT}\n'
    )
    running = 2 if "-n" in mode else 1
    proc = harness.popen(*mode, "--vm-pool-size", "2", "--vm-backend", backend)
    try:
        _wait_for(
            lambda: len(list(marks.iterdir())) >= running, 120, "tests holding machines", proc
        )
        proc.send_signal(signum)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=TEARDOWN_TIMEOUT + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, output, took


def _assert_session_gone(harness: Harness, backend: str, prefix: str, output: str) -> None:
    state = harness.state_dir
    left = sorted(p.name for p in state.iterdir() if p.suffix in (".json", ".session", ".sock"))
    assert left == [], f"records or sockets left: {left}\n{output[-3000:]}"
    b = make_backend(backend, load(None, environ={}).default, state)
    assert b.list(prefix + "-") == [], output[-3000:]
    assert b.list_networks(prefix + "-") == [], output[-3000:]
    guests = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(state) in part for part in (p.info["cmdline"] or []))
    ]
    assert guests == [], guests


SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGHUP, id="SIGHUP")]


def _check_stop(harness: Harness, backend: str, signum: int, mode: list[str]) -> None:
    prefix = "vmsig" + secrets.token_hex(3)
    proc, output, took = _stop_running_session(harness, backend, signum, mode, prefix)
    print(f"{backend} {' '.join(mode)}: ended {took:.1f}s after {signal.Signals(signum).name}")
    assert proc.returncode == 128 + signum, output[-3000:]
    assert f"received {signal.Signals(signum).name}" in output
    assert took < TEARDOWN_TIMEOUT, f"took {took:.1f}s after the signal\n{output[-3000:]}"
    _assert_session_gone(harness, backend, prefix, output)


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("mode", [["-n", "2"], ["-p", "no:xdist"]], ids=["xdist", "single"])
def test_stop_signal_tears_the_sim_pool_down(
    harness: Harness, signum: int, mode: list[str]
) -> None:
    _check_stop(harness, "sim", signum, mode)


@pytest.mark.slow
@pytest.mark.podman
@pytest.mark.xdist_group("signals-podman")
@pytest.mark.parametrize("signum", SIGNALS)
def test_stop_signal_tears_the_podman_pool_down(harness: Harness, signum: int) -> None:
    _check_stop(harness, "podman", signum, ["-n", "2"])


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.xdist_group("signals-qemu")
@pytest.mark.parametrize("signum", SIGNALS)
def test_stop_signal_tears_the_qemu_pool_down(
    harness: Harness, signum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", CACHE_HOME)
    _check_stop(harness, "qemu", signum, ["-n", "2"])


def test_ignored_stop_signal_stays_ignored(harness: Harness) -> None:
    """A SIGHUP the user ignores (nohup) is not turned into a teardown."""
    harness.pytester.makepyfile(
        test_hup="""
import os
import signal
import time


def test_ignores_a_hangup(pool_vm):
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.2)  # nothing happening meanwhile is the point: a teardown would end the run
    assert pool_vm.exec("true").ok
"""
    )
    proc = harness.popen(
        "-p",
        "no:xdist",
        python=(
            "-c",
            "import signal, sys, pytest; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "sys.exit(pytest.main(sys.argv[1:]))",
        ),
    )
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "1 passed" in output
    harness.assert_nothing_left()
