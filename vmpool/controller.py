"""The pool controller: warm-up, replenishment, reclaim, teardown. The only bulk backend driver.

One Controller per pool (profile) per session, in the xdist controller process or the single
pytest process. A background thread keeps the pool at size; slow backend calls run in a bounded
thread pool, each recording its outcome in its own state transaction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmpool import adoption, leases, teardown, upkeep
from vmpool.backends.base import Backend
from vmpool.config import Profile
from vmpool.errors import (
    PoolUnavailable,
    ReadyTimeout,
    StateError,
    StoreError,
    VmPoolError,
    describe,
)
from vmpool.machine_work import MachineWork
from vmpool.ownership import (
    ProcessRef,
    current_process,
    is_alive,
    machine_name,
    network_name,
    owner_labels,
    pool_id,
)
from vmpool.server import LeaseServer
from vmpool.state import JsonStateDir, JsonStore, MachineState, Pool
from vmpool.writeback import WriteBackStore

if TYPE_CHECKING:  # psycopg is an optional dependency: imported only for such pools
    from vmpool.pgstore.shared import Shared
    from vmpool.pgstore.store import PgStore

log = logging.getLogger(__name__)

_TICK = 0.05
#: what a machine in one of these states waits for is the maintainer's next tick
_IN_FLIGHT = frozenset({
    MachineState.CREATING, MachineState.STARTING, MachineState.RESETTING, MachineState.REPLACING,
})
_IDLE_TICK = 0.25
_RECLAIM_EVERY = 0.5


@dataclass(frozen=True)
class Progress:
    """A warm-up progress event for the plugin and CLI to display."""

    pool: str
    profile: str
    backend: str
    size: int
    ready: int
    warming: int
    broken: int
    message: str = ""


def policy_for(profile: Profile, backend: Backend) -> leases.Policy:
    p = profile.pool
    return leases.Policy(
        checkin=p.checkin_policy,
        failure=p.failure_policy,
        max_uses=p.max_uses,
        max_age=p.max_age,
        can_reset=backend.capabilities.reset,
    )


class Controller:
    """Owns one pool for one session: creates or adopts it, keeps it warm, tears it down."""

    def __init__(
        self,
        *,
        directory: JsonStateDir,
        backend: Backend,
        profile: Profile,
        size: int,
        session: str,
        keep: bool = False,
        progress: Callable[[Progress], None] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        serve: bool = True,
        store: str | None = None,
    ) -> None:
        self.directory = directory
        self.backend = backend
        self.profile = profile
        self.settings = profile.pool
        self.size = size
        self.session = session
        self.keep = keep
        self.progress = progress
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = policy_for(profile, backend)
        self.config_hash = profile.config_hash(backend.name)
        self.me: ProcessRef = current_process()
        self.pool_id = pool_id(self.settings.name_prefix, session, profile.name)
        self.store: JsonStore | PgStore = directory.store(self.pool_id)
        #: a pool on PostgreSQL, shared by the sessions of many hosts (vmpool.pgstore.shared)
        self.shared: Shared | None = None
        if store is not None:
            from vmpool.pgstore.shared import Shared

            self.pool_id = pool_id(self.settings.name_prefix, "shared", profile.name)
            self.shared = Shared(store, self.pool_id, self.settings.store_lease)
            self.store = self.shared.store
        self.adopted_from: str | None = None
        self._stop = threading.Event()
        self.cancelling = threading.Event()
        self._wake = threading.Event()
        self._inflight = 0  # creates and resets under way
        self._deleting = 0  # deletions of replaced or retired machines under way
        self._inflight_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.warmup_parallelism, thread_name_prefix="vmpool-warm"
        )
        # a budget of their own: a replacement's successor never waits for its deletion
        self._delete_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.warmup_parallelism, thread_name_prefix="vmpool-delete"
        )
        self._thread: threading.Thread | None = None
        self._last_reclaim = 0.0
        self._work = MachineWork(self)
        #: a look for idle machines out of reach (Backend.unreachable) is under way
        self._looking = threading.Event()
        #: the maintainer's last error, while it lasts (also on the record: Pool.error)
        self.error: Exception | None = None
        #: serve check-outs/check-ins over a socket (vmpool.server); off, clients use the file
        self.serve = serve
        self.server: LeaseServer | None = None
        #: what teardown could not delete (kept in the record for `vmpool gc`)
        self.left_machines: list[str] = []
        self.left_network: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Create (or adopt) the pool record and begin warming in the background."""
        self.backend.check()
        if self.shared is not None:
            self.shared.attach(self._new_record, self._take_over)
            self._start_thread()
            return
        adopted = self._adopt()
        if adopted is None:
            network = None
            if self.settings.network and self.backend.capabilities.network:
                network = network_name(self.pool_id)
                self.backend.create_network(
                    network, owner_labels(self.pool_id, self.session, self.me, self.config_hash)
                )
            self.store.create(self._new_record(network))
        if self.serve:
            self.store = WriteBackStore(self.directory, self.pool_id)
            server = LeaseServer(self.store, self.policy, clock=self.clock, on_work=self._wake.set)
            if server.start():
                self.server = server
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"vmpool-{self.pool_id}", daemon=True
        )
        self._thread.start()

    def _new_record(self, network: str | None = None) -> Pool:
        return Pool(
            id=self.pool_id,
            profile=self.profile.name,
            backend=self.backend.name,
            size=self.size,
            session=self.session,
            name_prefix=self.settings.name_prefix,
            config_hash=self.config_hash,
            owner=self.me,
            network=network,
            created_at=self.clock(),
        )

    def _take_over(self) -> None:
        """This session was elected the shared pool's controller: it owns the pool now."""
        with self.store.transaction() as pool:
            pool.owner = self.me
        self._last_reclaim = 0.0
        self._wake.set()

    def _adopt(self) -> Pool | None:
        """Take over a kept, idle pool of the same prefix, profile and backend."""
        adopter = adoption.Adopter(
            backend=self.backend.name,
            profile=self.profile.name,
            name_prefix=self.settings.name_prefix,
            me=self.me,
            size=self.size,
            config_hash=self.config_hash,
            clock=self.clock,
        )
        found = adoption.adopt(self.directory, adopter)
        if found is None:
            return None
        self.store, adopted = found
        self.pool_id = self.adopted_from = self.store.pool_id
        self.session = adopted.session
        return adopted

    def _alive(self, ref: ProcessRef) -> bool:
        """Whether a holder lives: one connected to the lease server does (its connection
        closing is what reclaims it); only the others are looked up in the process table."""
        server = self.server
        if server is not None and any(ref.same_process(h) for h in server.connected):
            return True
        return is_alive(ref)

    def wait_until_ready(self, count: int, timeout: float) -> Pool:
        """Block until ``count`` machines are ready (for `vmpool up` and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            pool = self.snapshot()
            ready = sum(1 for m in pool.machines if m.state is MachineState.READY)
            if ready >= count:
                return pool
            if leases.all_broken(pool):
                raise PoolUnavailable(leases.no_machine_problem(pool))
            if time.monotonic() >= deadline:
                raise ReadyTimeout(f"pool {pool.id}: {ready}/{count} ready after {timeout:g}s")
            self._wake.wait(0.05)

    def snapshot(self) -> Pool:
        pool = self.store.read()
        if pool is None:
            raise StateError(f"pool {self.pool_id} no longer exists")
        return pool

    # -- the maintainer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self._tick()
            except Exception as exc:  # an OSError too: the thread must not end, nor hide it
                self._record_error(exc)
                busy = False
            else:
                if self.error is not None:
                    self._clear_error()
            self._wake.wait(_TICK if busy else _IDLE_TICK)
            self._wake.clear()

    def _record_error(self, exc: Exception) -> None:
        """Keep the maintainer's error, and put it on the pool: waiting check-outs fail with it
        at once (vmpool.leases.unavailable) instead of waiting out their timeout."""
        text = describe(exc)
        if self.error is None or describe(self.error) != text:
            log.error(
                "vmpool maintainer of %s: %s",
                self.pool_id,
                text,
                exc_info=None if isinstance(exc, VmPoolError) else exc,
            )
        self.error = exc
        if self.shared is not None and isinstance(exc, StoreError):
            return  # the shared store itself (restarting): the other sessions' pool is fine
        with contextlib.suppress(Exception), self.store.transaction() as pool:
            pool.error = text

    def _clear_error(self) -> None:
        with contextlib.suppress(Exception), self.store.transaction() as pool:
            pool.error = None
            self.error = None

    def _tick(self) -> bool:
        if self.shared is not None and not self.shared.leading:
            return False  # another session's controller keeps the pool
        with self._inflight_lock:
            capacity = self.settings.warmup_parallelism - self._inflight
            delete_capacity = self.settings.warmup_parallelism - self._deleting
        alive: leases.Alive = self._alive
        if self.shared is not None and self.clock() - self._last_reclaim >= _RECLAIM_EVERY:
            alive = self.shared.store.liveness()  # holders of every host, as the store sees them
        with self.store.transaction() as pool:
            now = self.clock()
            if now - self._last_reclaim >= _RECLAIM_EVERY:
                reclaimed = leases.reclaim(pool, self.policy, alive, now)
                if reclaimed:
                    log.warning("reclaimed machines of dead processes: %s", reclaimed)
                self._last_reclaim = now
                idle = upkeep.idle_ready(pool)
                if idle and not self._looking.is_set() and not pool.closing:
                    # on the deletion budget's threads: a host that hangs never stalls a tick
                    self._looking.set()
                    self._delete_executor.submit(self._replace_unreachable, idle)
            leases.serve_queue(pool, now)
            work = upkeep.plan(
                pool,
                self.policy,
                self.me,
                now,
                capacity=max(capacity, 0),
                name_for=lambda serial: machine_name(self.pool_id, serial),
                delete_capacity=max(delete_capacity, 0),
            )
            network = pool.network
            slots = {m.name: m.slot for m in pool.machines} if work else {}
            # a leased machine is no work of ours: its check-in reaches us through the server
            # (on_work), and a tick is a transaction that holds the record from the server
            busy = bool(pool.queue) or any(m.state in _IN_FLIGHT for m in pool.machines)
        for item in work:
            with self._inflight_lock:
                if item.deletes:
                    self._deleting += 1
                else:
                    self._inflight += 1
            executor = self._delete_executor if item.deletes else self._executor
            executor.submit(self._do, item, slots.get(item.name, 0), network)
        return busy or bool(work)

    def _do(self, item: upkeep.Work, slot: int, network: str | None) -> None:
        try:
            if item.kind == "create":
                self._work.create(item.name, slot, network)
            elif item.kind == "reset":
                self._work.reset(item.name)
            else:
                self._work.delete(item.name, replaced=item.kind == "replace")
        except Exception:
            log.exception("vmpool: %s of %s failed unexpectedly", item.kind, item.name)
        finally:
            with self._inflight_lock:
                if item.deletes:
                    self._deleting -= 1
                else:
                    self._inflight -= 1
            self._wake.set()

    def _replace_unreachable(self, idle: list[str]) -> None:
        """Replace the idle machines the backend can no longer reach (a podman host gone)."""
        try:
            lost = self.backend.unreachable(idle)
            if lost:
                with self.store.transaction() as pool:
                    gone = upkeep.mark_unreachable(pool, lost)
                if gone:
                    log.warning("replacing machines out of reach: %s",
                                "; ".join(f"{n}: {lost[n]}" for n in gone))
                    self._wake.set()
        except Exception:
            log.exception("vmpool: looking for machines out of reach failed")
        finally:
            self._looking.clear()

    def report(self, pool: Pool, message: str) -> None:
        if self.progress is None:
            return
        c = leases.counts(pool)
        warming = c["creating"] + c["starting"]
        try:
            self.progress(
                Progress(
                    pool=pool.id,
                    profile=pool.profile,
                    backend=pool.backend,
                    size=pool.size,
                    ready=c["ready"] + c["leased"] + c["resetting"],
                    warming=warming,
                    broken=c["broken"],
                    message=message,
                )
            )
        except Exception:
            log.exception("progress callback failed")

    # -- teardown ------------------------------------------------------------------------------
    def begin_closing(self) -> None:
        """Teardown is coming (a stop signal): a pool to be destroyed serves no more check-outs,
        takes its machines back without resetting them and stops warming; a kept one goes on
        until stop()."""
        if self.keep or self.shared is not None:
            return  # a shared pool goes on serving the other sessions
        self.cancelling.set()
        with contextlib.suppress(StateError), self.store.transaction() as pool:
            pool.closing = True

    def stop(self, *, keep: bool | None = None, lease_timeout: float | None = None) -> Pool | None:
        """Wait (bounded) for leases, stop warming, then destroy the pool or keep it idle.

        Returns the pool's last record (for the end-of-run summary).
        """
        if self.shared is not None:
            return self._leave()
        keep = self.keep if keep is None else keep
        wait = self.settings.teardown_timeout if lease_timeout is None else lease_timeout
        deadline = time.monotonic() + wait
        while True:
            try:
                with self.store.transaction() as pool:
                    leases.reclaim(pool, self.policy, is_alive, self.clock())
                    busy = [
                        m.name
                        for m in pool.machines
                        if m.state is MachineState.LEASED
                        or (m.state is MachineState.RESETTING and m.actor != self.me)
                    ]
            except StateError:
                break
            if not busy:
                break
            if time.monotonic() >= deadline:
                log.warning("teardown: machines still leased after %.0fs: %s", wait, busy)
                break
            self._wake.wait(0.05)

        if not keep:
            # only a pool about to be destroyed interrupts the machines warming (they would be
            # made just to be deleted); a kept one lets them finish (within ready_timeout) so
            # the next session adopts it whole
            self.cancelling.set()
            with contextlib.suppress(StateError), self.store.transaction() as pool:
                pool.closing = True
        final = self._halt(cancel=not keep)
        try:
            if keep:
                self._keep()
            else:
                self._destroy(final)
        finally:
            if self.server is not None:
                self.server.stop()
            if isinstance(self.store, WriteBackStore):
                self.store.close()
        return final

    def _halt(self, *, cancel: bool) -> Pool | None:
        """Stop the maintainer and wait for the work under way; the record as it is then."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        # a kept pool lets planned work run, queued or not (``cancel`` false): a reset
        # cancelled before it began would leave its machine resetting, and _keep would delete it
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        # deletions not begun are left to teardown (_destroy), which deletes the whole record
        self._delete_executor.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(StateError):
            return self.store.read()
        return None

    def _leave(self) -> Pool | None:
        """Leave a shared pool: its last session destroys it; otherwise it goes on, and
        another session's controller takes over if this one led it."""
        assert self.shared is not None
        final = self._halt(cancel=True)
        try:
            if self.shared.leave():
                self._destroy(final)
        finally:
            self.shared.close()
        return final

    def _keep(self) -> None:
        doomed: list[str] = []
        with self.store.transaction() as pool:
            for m in pool.machines:
                if m.state is not MachineState.READY:
                    doomed.append(m.name)
            pool.keep = True
            pool.owner = None
            pool.closing = False
            pool.queue = []
            for m in pool.machines:
                m.actor = None
        for name in doomed:
            self._work.discard(name)

    def _destroy(self, final: Pool | None) -> None:
        left = teardown.destroy(self.backend, self.store, self.pool_id, final)
        self.left_machines, self.left_network = left.machines, left.network
