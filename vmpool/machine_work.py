"""The controller's slow work on one machine, outside the record's lock: make it (create,
start, wait until ready, snapshot), reset it, delete it, and record each outcome in a
transaction of its own. Runs in the controller's worker threads (vmpool.controller)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vmpool import doctor, leases, upkeep
from vmpool.backends.base import Backend, MachineSpec
from vmpool.client import reset_machine
from vmpool.config import PoolSettings
from vmpool.errors import ReadyTimeout, StateError, VmPoolError
from vmpool.ownership import ProcessRef, owner_labels
from vmpool.state import JsonStore, MachineState, Pool
from vmpool.transport import FileTransport

if TYPE_CHECKING:  # psycopg is an optional dependency
    from vmpool.pgstore.shared import Shared
    from vmpool.pgstore.store import PgStore

log = logging.getLogger(__name__)

#: wait_ready is called in slices this long so a teardown can interrupt warm-up
_READY_SLICE = 2.0


class _Cancelled(Exception):
    """Teardown began while this machine was warming."""


class Owner(Protocol):
    """What the work needs of its controller (read when used: adoption changes the store)."""

    pool_id: str
    session: str
    me: ProcessRef
    config_hash: str
    backend: Backend
    policy: leases.Policy
    settings: PoolSettings
    store: JsonStore | PgStore
    clock: Callable[[], float]
    rng: random.Random
    shared: Shared | None
    cancelling: threading.Event

    def report(self, pool: Pool, message: str) -> None: ...


class MachineWork:
    def __init__(self, owner: Owner) -> None:
        self._c = owner

    def create(self, name: str, slot: int, network: str | None) -> None:
        spec = MachineSpec(
            name=name,
            labels=owner_labels(self._c.pool_id, self._c.session, self._c.me, self._c.config_hash),
            index=slot,
            network=network,
        )
        try:
            if self._c.cancelling.is_set():
                raise _Cancelled
            self._c.backend.create(spec)
            self._set_state(name, MachineState.STARTING)
            self._c.backend.start(name)
            self._wait_ready(name)
            if self._c.policy.needs_snapshot:  # a replace-only pool never restores one
                self._c.backend.snapshot(name)
            address = self._c.backend.address(name)
        except _Cancelled:
            self.discard(name)
            return
        except Exception as exc:  # any failure of a backend call counts against the slot
            self.discard(name, keep_record=True)
            self._record_failure(name, exc)
            return
        with self._c.store.transaction() as pool:
            upkeep.record_ready(pool, name, address, self._c.clock())
            snap = pool.model_copy(deep=True)
        self._c.report(snap, f"{name} ready")

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + self._c.settings.ready_timeout
        while True:
            if self._c.cancelling.is_set():
                raise _Cancelled
            remaining = deadline - time.monotonic()
            try:
                self._c.backend.wait_ready(name, min(_READY_SLICE, max(remaining, 0.01)))
                return
            except ReadyTimeout:
                if time.monotonic() >= deadline:
                    raise

    def _record_failure(self, name: str, exc: BaseException) -> None:
        with self._c.store.transaction() as pool:
            failure = pool.failures.get(next((m.slot for m in pool.machines if m.name == name), -1))
            attempt = (failure.attempts if failure else 0) + 1
            delay = upkeep.backoff_delay(
                attempt, self._c.settings.backoff, self._c.settings.backoff_max, self._c.rng
            )
            broken = upkeep.record_create_failure(
                pool,
                name,
                f"{type(exc).__name__}: {doctor.explain(str(exc))}",
                retries=self._c.settings.retries,
                delay=delay,
                now=self._c.clock(),
            )
            snap = pool.model_copy(deep=True)
        if broken:
            log.warning("machine %s is broken after %d attempts: %s", name, attempt, exc)
        else:
            log.warning(
                "creating %s failed (attempt %d), retrying in %.1fs: %s", name, attempt, delay, exc
            )
        self._c.report(snap, f"{name} failed: {exc}")

    def discard(self, name: str, *, keep_record: bool = False) -> None:
        try:
            self._c.backend.delete(name)
        except VmPoolError as exc:
            log.warning("could not delete %s: %s", name, exc)
        if not keep_record:
            with contextlib.suppress(StateError), self._c.store.transaction() as pool:
                upkeep.record_deleted(pool, name, replaced=False)

    def reset(self, name: str) -> None:
        transport = (
            FileTransport(self._c.store) if isinstance(self._c.store, JsonStore)
            else self._c.shared.transport() if self._c.shared is not None else None
        )
        assert transport is not None
        reset_machine(transport, self._c.backend, name, self._c.clock, self._c.me)

    def delete(self, name: str, *, replaced: bool) -> None:
        try:
            self._c.backend.delete(name)
        except VmPoolError as exc:
            log.warning("could not delete %s (will retry at teardown): %s", name, exc)
            return
        with self._c.store.transaction() as pool:
            upkeep.record_deleted(pool, name, replaced=replaced)

    def _set_state(self, name: str, state: MachineState) -> None:
        with self._c.store.transaction() as pool:
            m = pool.find(name)
            if m is not None:
                m.state = state
