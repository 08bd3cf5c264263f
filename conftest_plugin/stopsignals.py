"""SIGTERM and SIGHUP end a session the way Ctrl-C does: the pool is torn down, then pytest exits
with 128 + the signal's number. CI runners, ``timeout`` and systemd stop jobs with SIGTERM, and
the default action (die at once) left machines, networks, records and sockets behind.

Only the controller process (the xdist controller or the single pytest process) installs the
handlers, and only over the default action: a signal the user ignores (``nohup``) or handles
already is left alone. The workers get a SIGINT, as from a terminal's Ctrl-C, so their tests
unwind and check their machines in at once instead of after xdist's grace period of up to 15 s
(or a SIGTERM where SIGINT is ignored, as in a background job of a non-interactive shell: they
die, and the controller reclaims their machines as those of dead processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from vmpool.errors import StateError
from vmpool.ownership import is_alive
from vmpool.session import SessionServer

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal arrived while tests ran: pytest unwinds as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"vmpool: received {signal.Signals(signum).name}; tearing the pool down, then "
            f"exiting with status {128 + signum}"
        )


class StopSignals:
    """The controller's handlers for STOP_SIGNALS, and the plugin that tells workers to stop."""

    def __init__(self, session: SessionServer, on_stop: Callable[[], None]) -> None:
        """``on_stop`` runs once a signal stopped the tests, before the workers are told."""
        self.session = session
        self.on_stop = on_stop
        #: the first stop signal received, and when (time.monotonic())
        self.received: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, _Handler] = {}
        self._interrupt = True  # False once teardown began: it must not be interrupted

    # -- handlers ------------------------------------------------------------------------------
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only (pytest.main from a thread)
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_DFL:
                continue
            signal.signal(signum, self._handle)
            self._previous[signum] = previous

    def restore(self) -> None:
        """Put the previous handlers back (the pool is gone: dying at once is fine again)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # a repeat: the teardown it asks for is under way
        self.received = signum
        self.received_at = time.monotonic()
        if self._interrupt:
            raise SignalInterrupt(signum)
        log.warning("vmpool: received %s during teardown", signal.Signals(signum).name)

    def teardown_begins(self) -> None:
        """From now on a stop signal is only recorded: the teardown it asks for is running."""
        self._interrupt = False

    @property
    def exit_status(self) -> int | None:
        """128 + the signal's number (the shell's status for it), or None without a signal."""
        return None if self.received is None else 128 + self.received

    def remaining(self, budget: float) -> float:
        """What is left of ``budget`` seconds counted from the signal (all of it without one)."""
        if self.received is None:
            return budget
        return max(budget - (time.monotonic() - self.received_at), 0.0)

    # -- hooks ---------------------------------------------------------------------------------
    # tryfirst: before xdist's sessionfinish, which waits up to 15 s for workers to come down
    # by themselves before it kills them
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.received is not None:
            try:
                self.on_stop()
            finally:
                self._interrupt_workers()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.restore()

    def _interrupt_workers(self) -> None:
        try:
            workers = self.session.read().workers
        except StateError as exc:
            log.warning("vmpool: cannot tell the workers to stop: %s", exc)
            return
        # the workers inherit this process's ignored signals
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop = signal.SIGTERM if ignored else signal.SIGINT
        for ref in workers.values():
            if ref.pid != os.getpid() and is_alive(ref):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(ref.pid, stop)
