"""Which way one backend object talks to podman: the pool's API service
(vmpool.backends.podman.api) or the command line.

A backend object that was prepared (``prepare()``: the pool's controller, while tests are
collected) starts the service in the background and keeps it until ``close()``; while it
answers, that object creates, starts, inspects, lists and removes through it (a request costs
milliseconds, a ``podman`` process 0.03-0.3 s of CPU). Full resets start the service on first
use in any object (vmpool.backends.podman.api_reset).

The CLI stays the way where the service cannot run or is not worth starting: docker (no
service); `api.start_api` failed (no podman, a socket path longer than ``AF_UNIX`` allows, no
answer to ``/_ping``: it logs why); an object nobody prepared (a one-off command such as
``vmpool gc``, a bare backend in a per-test fixture: starting a service would cost more than
the few calls it makes); a request the service did not answer (the service is dropped, and the
rest of this object's work goes through the CLI, or starts it again for a reset); and an error
podman's API answered (the CLI then does the same work, and its own errors are the ones shown).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmpool.backends.podman import api
from vmpool.errors import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ApiChannel:
    """The pool's API service as one backend object uses it (podman only)."""

    def __init__(self, state_dir: Path, *, tool: str = "podman", timeout: float = 30.0) -> None:
        self._state_dir = Path(state_dir)
        self._tool = tool
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client: api.PodmanApi | None = None
        self._service: api.ApiService | None = None
        #: set while a background start runs; waiters wait on it
        self._started = threading.Event()
        self._started.set()
        #: set once the service could not start: this object keeps the CLI
        self._unavailable = False
        #: prepare() asked for the service: this object keeps it until close()
        self.held = False

    def begin(self) -> None:
        """Start the service in the background; this object keeps it until ``close()``."""
        with self._lock:
            self.held = True
            if self._client is not None or self._unavailable or not self._started.is_set():
                return
            self._started.clear()
        threading.Thread(target=self._start, name="vmpool-podman-api", daemon=True).start()

    def _start(self) -> None:
        try:
            started = api.start_api(self._state_dir, tool=self._tool, timeout=self.timeout)
        except Exception:  # never leave waiters waiting
            log.exception("starting the podman API service failed")
            started = None
        with self._lock:
            if started is None:
                self._unavailable = True
            else:
                self._service, self._client = started
            self._started.set()

    def client(self, *, start: bool = False) -> api.PodmanApi | None:
        """The client while this object holds a service (waiting for a start under way);
        with ``start``, the service is started now if there is none. None: use the CLI."""
        if not self._started.wait(self.timeout):
            return None
        with self._lock:
            if self._client is not None or not start or self._unavailable:
                return self._client
            started = api.start_api(self._state_dir, tool=self._tool, timeout=self.timeout)
            if started is None:
                self._unavailable = True
                return None
            self._service, self._client = started
            return self._client

    def call(self, what: str, request: Callable[[api.PodmanApi], T]) -> T | None:
        """``request`` through the service when this object holds one; None when it does not,
        or when the request failed (logged; a service that did not answer is dropped): the
        caller then does ``what`` on the CLI."""
        client = self.client()
        if client is None:
            return None
        try:
            return request(client)
        except api.ApiError as exc:
            log.info("%s through the podman API failed (the CLI instead): %s", what, exc)
        except BackendError as exc:
            log.warning("%s: the podman API service does not answer (the CLI from now on): %s",
                        what, exc)
            self.lost(client)
        return None

    def lost(self, client: api.PodmanApi) -> None:
        """``client``'s service stopped answering: stop using it (a reset starts it again)."""
        with self._lock:
            if self._client is client:
                self._client = None

    def close(self) -> None:
        """Stop the service this object started, and any the state directory records."""
        self._started.wait(self.timeout)
        with self._lock:
            if self._service is not None:
                self._service.stop()
            self._service = self._client = None
            self.held = False
        stop_service(self._state_dir)


def stop_service(state_dir: Path) -> bool:
    """Stop the API service recorded under ``state_dir`` (teardown, reap); True if one ran.
    A later full reset starts it again."""
    try:
        return api.stop_recorded(Path(state_dir))
    except (OSError, BackendError) as exc:
        log.warning("could not stop the podman API service: %s", exc)
        return False
