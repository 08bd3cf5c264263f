"""Destroying a shared pool by hand (`vmpool down`, `vmpool gc`): who is attached, the claim.

A pool's sessions hold its user lock shared (vmpool.pgstore.election) for as long as they use
it; the server drops it when a session's connection ends (its process exited or was killed).
To destroy a pool, `down` and `gc` take that lock exclusively on a connection of their own
(``pg_try_advisory_lock``: granted only while no session holds it), mark the record closing
in one transaction, destroy the machines (vmpool.teardown.destroy) and remove the record,
then let the lock go. A session attaching meanwhile waits for the lock in its join and then
finds the record gone (it creates a new one) or still closing (machines that could not be
deleted: it refuses, vmpool.pgstore.shared); a session attached first keeps the lock from
being granted, and its pool is spared. ``force`` claims a pool whose sessions are attached:
they lose it, and a session attaching meanwhile finds it closing and refuses.

A session stopped (SIGSTOP) or on a host cut off keeps its connection, hence the lock, until
the server notices; when every attached session's heartbeat (vmpool.pgstore.lifeline) is
older than the lease, as its leases are then judged dead, `down` and `gc` end those
connections (``pg_terminate_backend``) and claim the pool. A session that has not beaten yet
(just attaching) counts as alive.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from vmpool.backends.base import Backend
from vmpool.errors import PoolGone, StateError, StoreError, VmPoolError
from vmpool.ownership import current_process
from vmpool.pgstore.election import CONTROLLER, user_key
from vmpool.pgstore.store import PgStore, connect, pool_ids, redacted
from vmpool.state import Pool
from vmpool.teardown import Leftovers, destroy

# the sessions holding a pool's user lock (a bigint key: classid its high half, objid its low
# one), each named by the lifeline token in its election connection's application_name
_ATTACHED = """
SELECT h.host, h.pid, h.beat >= extract(epoch from clock_timestamp()) - %s, l.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN vmpool_holders h ON h.token = substr(a.application_name, %s)
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = ((hashtext(%s)::bigint >> 32) & 4294967295)::oid
  AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid
ORDER BY h.host, h.pid
"""
log = logging.getLogger(__name__)
_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(%s))"


@dataclass(frozen=True)
class Session:
    """A session attached to a pool, as the store sees it."""

    host: str | None
    pid: int | None
    #: its heartbeat is within the lease (None: it has not beaten yet, it is just attaching)
    beating: bool | None
    backend: int  #: the server's pid of its election connection

    def __str__(self) -> str:
        who = f"{self.host} (pid {self.pid})" if self.host else "an unknown host"
        return f"{who}, heartbeat stale" if self.beating is False else who


class PoolInUse(VmPoolError):
    """Sessions are attached to the shared pool (and no --force)."""

    def __init__(self, pool_id: str, dsn: str, sessions: list[Session]) -> None:
        self.pool_id = pool_id
        self.sessions = sessions
        on = ", ".join(str(s) for s in sessions) or "a session just leaving"
        super().__init__(
            f"pool {pool_id} in {redacted(dsn)} is in use by {len(sessions) or 1} attached "
            f"session(s) on {on}; skipped (use --force to destroy it anyway)"
        )


@dataclass
class Outcome:
    """What `down`/`gc` did to one shared pool."""

    pool_id: str
    dsn: str
    destroyed: bool = False
    machines: int = 0  #: machines its record had
    spared: PoolInUse | None = None
    leftovers: Leftovers = field(default_factory=Leftovers)
    error: StateError | None = None  #: its record could not be claimed (e.g. unreadable)

    @property
    def failed(self) -> bool:
        return bool(self.error or self.leftovers.machines or self.leftovers.network)

    def line(self, dry_run: bool = False) -> str:
        where = f"shared pool {self.pool_id} in {redacted(self.dsn)}"
        if self.spared is not None:
            return f"spared {where}: {', '.join(map(str, self.spared.sessions))} attached"
        if self.error is not None:
            return f"{where}: left alone: {self.error}"
        if dry_run:
            return f"would destroy {where} (no session attached)"
        if self.failed:
            left = [*self.leftovers.machines, *filter(None, [self.leftovers.network])]
            return (f"{where}: could not delete {', '.join(left)}; its record stays, marked "
                    "closing (run vmpool gc again)")
        if not self.destroyed:
            return f"{where}: gone meanwhile"
        return f"{where} destroyed ({self.machines} machine(s) in its record)"


def attached(conn: psycopg.Connection[Any], pool_id: str, lease: float) -> list[Session]:
    key = user_key(pool_id)
    rows = conn.execute(_ATTACHED, (lease, len(CONTROLLER) + 1, key, key)).fetchall()
    return [Session(r[0], r[1], None if r[2] is None else bool(r[2]), r[3]) for r in rows]


@contextlib.contextmanager
def claimed(
    dsn: str, pool_id: str, *, force: bool = False, lease: float = 30.0, timeout: float = 20.0,
) -> Iterator[tuple[PgStore, Pool | None]]:
    """Hold ``pool_id`` for destruction: its user lock taken (unless ``force``), its record
    marked closing and owned by this process; yields the store and that record (None: no
    record, or with ``force`` an unreadable one). PoolInUse when sessions are attached and
    not ``force``."""
    store = PgStore(dsn, pool_id, lease=lease, connect_timeout=timeout)
    try:
        with connect(dsn, timeout, application_name="vmpool-down") as conn:
            locked, sessions = False, []
            # once more after a session let go between the two looks, or after the
            # connections of sessions gone silent were ended
            for _ in range(3):
                row = conn.execute(_TRY_LOCK, (user_key(pool_id),)).fetchone()
                locked = bool(row is not None and row[0])
                if locked:
                    break
                sessions = attached(conn, pool_id, lease)
                if sessions and all(s.beating is False for s in sessions):
                    _end_silent(conn, pool_id, sessions)
                elif sessions:
                    break
            if not locked and not force:
                raise PoolInUse(pool_id, dsn, sessions)
            try:
                with store.transaction() as pool:
                    pool.closing = True
                    pool.keep = False
                    pool.owner = current_process()
                    final: Pool | None = pool.model_copy(deep=True)
            except PoolGone:
                final = None
            except StoreError:
                raise
            except StateError as exc:  # an unreadable record: only --force destroys it
                if not force:
                    raise
                log.warning("vmpool: %s; --force: destroying by labels", exc)
                final = None
            yield store, final
        # the connection's end let the lock go: sessions waiting to attach go on
    finally:
        store.close()


def _end_silent(conn: psycopg.Connection[Any], pool_id: str, sessions: list[Session]) -> None:
    """Every attached session's heartbeat is stale (stopped, or its host cut off): only its
    connection still holds the lock, as its leases are already judged dead. End it."""
    for s in sessions:
        log.warning("vmpool: pool %s: ending the connection of the session on %s", pool_id, s)
    conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM unnest(%s::int[]) AS pid",
                 ([s.backend for s in sessions],))


def in_use(dsn: str, pool_id: str, lease: float = 30.0, timeout: float = 20.0) -> list[Session]:
    """The sessions attached to ``pool_id`` (empty: none; nothing is claimed)."""
    with connect(dsn, timeout, application_name="vmpool-gc") as conn:
        row = conn.execute(_TRY_LOCK, (user_key(pool_id),)).fetchone()
        return [] if row is not None and row[0] else attached(conn, pool_id, lease)


def down(
    dsn: str, pool_id: str, backend_for: Callable[[Pool | None], Backend], *,
    force: bool = False, lease: float = 30.0,
) -> Outcome:
    """Destroy shared pool ``pool_id``: its machines through its backend (``backend_for``
    its record, None when there is none to read), then its record. PoolInUse while sessions
    are attached (a heartbeat within ``lease``), unless ``force``; with ``force`` a pool
    without a readable record is destroyed by its machines' labels."""
    outcome = Outcome(pool_id, dsn)
    with claimed(dsn, pool_id, force=force, lease=lease) as (store, final):
        if final is None and not force:
            return outcome
        outcome.machines = len(final.machines) if final else 0
        outcome.leftovers = destroy(backend_for(final), store, pool_id, final)
        outcome.destroyed = not outcome.failed
    return outcome


def gc(dsn: str, backend_for: Callable[[Pool | None], Backend], *, dry_run: bool = False,
       lease: float = 30.0) -> list[Outcome]:
    """Destroy every shared pool of ``dsn`` that no live session is attached to (a heartbeat
    within ``lease``); spare the others."""
    outcomes = []
    for pool_id in pool_ids(dsn):
        if dry_run:
            sessions = in_use(dsn, pool_id, lease)
            outcome = Outcome(pool_id, dsn)
            if any(s.beating is not False for s in sessions):
                outcome.spared = PoolInUse(pool_id, dsn, sessions)
            outcomes.append(outcome)
            continue
        try:
            outcomes.append(down(dsn, pool_id, backend_for, lease=lease))
        except PoolInUse as exc:
            outcomes.append(Outcome(pool_id, dsn, spared=exc))
        except StoreError:
            raise  # the store itself: no other pool can be judged either
        except StateError as exc:  # this record only (unreadable): the others still
            outcomes.append(Outcome(pool_id, dsn, error=exc))
    return outcomes
