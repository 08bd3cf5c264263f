"""The pool's lease record on PostgreSQL: one row per machine, a FIFO of waiting requests.

Every operation mirrors today's lease operations (check-out, check-in, reset done, mark
unhealthy, return unused, cancel, reclaim) and is one transaction, so several hosts can share
one pool. Grants are decided under a per-pool advisory transaction lock, strictly in arrival
order (``requests.seq``): a request at the head that cannot be served yet blocks the ones behind
it, so a 3-machine request is never starved by 1-machine ones (skip-locked claims are not first
come first served). Each grant bumps the machine's ``generation``; every later operation on a
machine names the generation it holds and changes nothing if it is stale (fencing). Times come
from the database's clock, never the host's.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from vmpool.errors import CheckoutTimeout, StoreError, StoreUnsafe

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
Outcome = Literal["ok", "dirty", "failed"]
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vmpool_meta (key text PRIMARY KEY, value integer NOT NULL);
CREATE TABLE IF NOT EXISTS vmpool_machines (
    pool text NOT NULL, name text NOT NULL, profile text NOT NULL,
    state text NOT NULL CHECK (state IN ('ready', 'leased', 'resetting', 'broken')),
    generation bigint NOT NULL DEFAULT 0,
    holder text, holder_pid integer, expires double precision, error text,
    PRIMARY KEY (pool, name));
CREATE TABLE IF NOT EXISTS vmpool_requests (
    id text PRIMARY KEY, seq bigserial NOT NULL, pool text NOT NULL, profile text NOT NULL,
    count integer NOT NULL CHECK (count > 0), holder text NOT NULL, holder_pid integer NOT NULL,
    state text NOT NULL CHECK (state IN ('waiting', 'granted', 'cancelled')),
    granted jsonb);
CREATE INDEX IF NOT EXISTS vmpool_requests_waiting ON vmpool_requests (pool, seq)
    WHERE state = 'waiting';
CREATE TABLE IF NOT EXISTS vmpool_leader (
    pool text PRIMARY KEY, holder text NOT NULL, holder_pid integer NOT NULL);
"""
_NOW = "extract(epoch from clock_timestamp())"


def redacted(dsn: str) -> str:
    """The DSN as a message may show it: every part but the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    parts.pop("password", None)
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


def holder_id(session: str, worker: str = "master", host: str | None = None) -> str:
    """A holder's global id: host id + session + worker (also the connection's
    ``application_name``, so an operator sees who holds what in ``pg_stat_activity``)."""
    host = host or os.environ.get("VMPOOL_HOST_ID") or socket.gethostname()
    return f"{host}/{session}/{worker}"


@dataclass(frozen=True)
class Grant:
    """A machine held by a lease: its name and the generation that fences every later call."""

    name: str
    generation: int


class PgStore:
    """One holder's connection to a pool's record. Not shared between threads or processes."""

    def __init__(
        self,
        dsn: str,
        pool: str,
        holder: str,
        *,
        lease_seconds: float = 30.0,
        retry_for: float = 20.0,
        poll: float = 0.02,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.retry_for = retry_for
        self.poll = poll
        self._conn: psycopg.Connection[Any] | None = None

    # -- connection ------------------------------------------------------------------------
    def _error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{what} on {redacted(self.dsn)}: {type(exc).__name__}: {exc}")

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, application_name=self.holder[-63:], connect_timeout=5
            )
        except psycopg.OperationalError:
            raise  # the server may be restarting: _retrying reconnects until its deadline
        except psycopg.Error as exc:
            raise self._error("cannot connect to the lease store", exc) from exc
        setting = conn.execute("SHOW synchronous_commit").fetchone()
        if setting is None or setting[0] != "on":
            conn.close()
            value = setting[0] if setting else "?"
            raise StoreUnsafe(
                f"lease store {redacted(self.dsn)}: synchronous_commit is {value!r}; vmpool "
                "needs 'on' (with it off a database crash loses acknowledged check-outs and "
                "check-ins: double grants, stuck machines). Set synchronous_commit = on in "
                "postgresql.conf or ALTER ROLE/DATABASE … SET synchronous_commit = on"
            )
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _retrying(self, what: str, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``op`` in one transaction; on a lost connection reconnect and run it again until
        ``retry_for`` has passed. Only idempotent operations go through here."""
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                conn = self.connection()
                with conn.transaction():
                    return op(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.close()
                if time.monotonic() >= deadline:
                    raise self._error(f"{what} failed for {self.retry_for:.0f}s", exc) from exc
                log.info("%s: %s; retrying", what, exc)
                time.sleep(min(0.1, self.poll * 5))  # a back-off between reconnects
            except psycopg.Error as exc:
                raise self._error(what, exc) from exc

    # -- schema and machines ---------------------------------------------------------------
    def migrate(self) -> None:
        """Create the tables, or refuse a schema newer than this vmpool knows."""

        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('vmpool-schema'))")
            conn.execute(_SCHEMA)
            row = conn.execute("SELECT value FROM vmpool_meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO vmpool_meta VALUES ('schema', %s)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"lease store {redacted(self.dsn)}: schema version {row[0]} is newer "
                    f"than this vmpool's {SCHEMA_VERSION}; upgrade vmpool"
                )

        self._retrying("creating the schema", op)

    def add_machines(self, profile: str, names: list[str]) -> None:
        """Record ready machines (the controller calls this after warm-up)."""

        def op(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO vmpool_machines (pool, name, profile, state) "
                    "VALUES (%s, %s, %s, 'ready') ON CONFLICT DO NOTHING",
                    [(self.pool, n, profile) for n in names],
                )
            self._serve(conn)

        self._retrying("adding machines", op)

    def machines(self) -> dict[str, tuple[str, int, str | None]]:
        """name -> (state, generation, holder)."""
        rows = self._retrying(
            "reading machines",
            lambda c: c.execute(
                "SELECT name, state, generation, holder FROM vmpool_machines WHERE pool = %s",
                (self.pool,),
            ).fetchall(),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # -- check-out -------------------------------------------------------------------------
    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        """Grant waiting requests strictly in arrival order; stop at the first that cannot be
        served (so it keeps its place). Runs inside the caller's transaction."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('vmpool-pool:' || %s))", (self.pool,))
        waiting = conn.execute(
            "SELECT id, profile, count, holder, holder_pid FROM vmpool_requests "
            "WHERE pool = %s AND state = 'waiting' ORDER BY seq",
            (self.pool,),
        ).fetchall()
        for req_id, profile, count, holder, pid in waiting:
            rows = conn.execute(
                "SELECT name FROM vmpool_machines WHERE pool = %s AND profile = %s "
                "AND state = 'ready' ORDER BY name LIMIT %s",
                (self.pool, profile, count),
            ).fetchall()
            if len(rows) < count:
                return
            granted = conn.execute(
                "UPDATE vmpool_machines SET state = 'leased', generation = generation + 1, "
                f"holder = %s, holder_pid = %s, expires = {_NOW} + %s, error = NULL "
                "WHERE pool = %s AND name = ANY(%s) RETURNING name, generation",
                (holder, pid, self.lease_seconds, self.pool, [r[0] for r in rows]),
            ).fetchall()
            conn.execute(
                "UPDATE vmpool_requests SET state = 'granted', granted = %s WHERE id = %s",
                (Jsonb([[n, g] for n, g in granted]), req_id),
            )
            conn.execute("SELECT pg_notify('vmpool_' || md5(%s), %s)", (self.pool, req_id))

    def checkout(
        self, profile: str, count: int, *, timeout: float, request_id: str | None = None
    ) -> list[Grant]:
        """Lease ``count`` machines of ``profile`` at once, in arrival order; a retried
        request id finds its earlier grant instead of taking more machines."""
        request_id = request_id or uuid.uuid4().hex
        deadline = time.monotonic() + timeout

        def enqueue(conn: psycopg.Connection[Any]) -> Any:
            conn.execute(
                "INSERT INTO vmpool_requests (id, pool, profile, count, holder, holder_pid, "
                "state) VALUES (%s, %s, %s, %s, %s, pg_backend_pid(), 'waiting') "
                "ON CONFLICT (id) DO NOTHING",
                (request_id, self.pool, profile, count, self.holder),
            )
            # a retry on a new connection: the request belongs to this backend now
            conn.execute(
                "UPDATE vmpool_requests SET holder_pid = pg_backend_pid() WHERE id = %s "
                "AND state = 'waiting'",
                (request_id,),
            )
            self._serve(conn)
            return conn.execute(
                "SELECT state, granted FROM vmpool_requests WHERE id = %s", (request_id,)
            ).fetchone()

        while True:
            row = self._retrying("check-out", enqueue)
            if row is not None and row[0] == "granted":
                return [Grant(n, g) for n, g in row[1]]
            if row is None or row[0] == "cancelled":
                raise StoreError(
                    f"check-out {request_id} on {redacted(self.dsn)} was cancelled "
                    "(its holder was reclaimed as gone)"
                )
            if time.monotonic() >= deadline:
                self.cancel(request_id)
                raise CheckoutTimeout(
                    f"no {count} machine(s) of profile {profile!r} in pool {self.pool!r} "
                    f"became free within {timeout}s (store {redacted(self.dsn)})"
                )
            time.sleep(self.poll)  # grants are made by other holders' transactions

    # -- operations on held machines (all fenced by generation) ----------------------------
    def _fenced(self, what: str, sql: str, params: tuple[Any, ...]) -> bool:
        def op(conn: psycopg.Connection[Any]) -> bool:
            changed = conn.execute(sql, params).rowcount
            self._serve(conn)
            return changed == 1

        return self._retrying(what, op)

    def checkin(self, grant: Grant, outcome: Outcome = "ok") -> bool:
        """Give a machine back: ready when clean, to reset when dirty, broken when failed.
        False when the lease was no longer this holder's (reclaimed: nothing changed)."""
        state = {"ok": "ready", "dirty": "resetting", "failed": "broken"}[outcome]
        return self._fenced(
            "check-in",
            "UPDATE vmpool_machines SET state = %s, holder = NULL, holder_pid = NULL, "
            "expires = NULL WHERE pool = %s AND name = %s AND generation = %s "
            "AND state = 'leased' AND holder = %s",
            (state, self.pool, grant.name, grant.generation, self.holder),
        )

    def return_unused(self, grant: Grant) -> bool:
        """A granted machine the holder never used goes straight back to ready."""
        return self.checkin(grant, "ok")

    def reset_done(self, name: str, generation: int) -> bool:
        """The controller finished resetting a machine: ready again (fenced)."""
        return self._fenced(
            "reset done",
            "UPDATE vmpool_machines SET state = 'ready' WHERE pool = %s AND name = %s "
            "AND generation = %s AND state = 'resetting'",
            (self.pool, name, generation),
        )

    def mark_unhealthy(self, grant: Grant, error: str) -> bool:
        """The holder found its machine broken: it leaves the lease as broken (fenced)."""
        return self._fenced(
            "mark unhealthy",
            "UPDATE vmpool_machines SET state = 'broken', error = %s, holder = NULL, "
            "holder_pid = NULL, expires = NULL WHERE pool = %s AND name = %s "
            "AND generation = %s AND state = 'leased' AND holder = %s",
            (error, self.pool, grant.name, grant.generation, self.holder),
        )

    def heartbeat(self) -> int:
        """Extend this holder's leases; returns how many it still holds."""
        return self._retrying(
            "heartbeat",
            lambda c: c.execute(
                f"UPDATE vmpool_machines SET expires = {_NOW} + %s, holder_pid = "
                "pg_backend_pid() WHERE pool = %s AND holder = %s AND state = 'leased'",
                (self.lease_seconds, self.pool, self.holder),
            ).rowcount,
        )

    def cancel(self, request_id: str) -> list[str]:
        """Withdraw a request; machines already granted to it go back to ready."""

        def op(conn: psycopg.Connection[Any]) -> list[str]:
            row = conn.execute(
                "UPDATE vmpool_requests SET state = 'cancelled' WHERE id = %s "
                "RETURNING (SELECT granted FROM vmpool_requests WHERE id = %s)",
                (request_id, request_id),
            ).fetchone()
            names: list[str] = []
            for name, gen in (row[0] if row and row[0] else []):
                if conn.execute(
                    "UPDATE vmpool_machines SET state = 'ready', holder = NULL, "
                    "holder_pid = NULL, expires = NULL WHERE pool = %s AND name = %s "
                    "AND generation = %s AND state = 'leased'",
                    (self.pool, name, gen),
                ).rowcount:
                    names.append(name)
            self._serve(conn)
            return names

        return self._retrying("cancel", op)

    def reclaim(self) -> list[str]:
        """Take back leases whose holder's connection is gone or whose lease expired (they go
        to reset: a dead holder may have dirtied them), and drop dead holders' requests."""

        def op(conn: psycopg.Connection[Any]) -> list[str]:
            alive = "(SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)"
            conn.execute(
                "UPDATE vmpool_requests SET state = 'cancelled' WHERE pool = %s AND "
                f"state = 'waiting' AND holder_pid NOT IN {alive}",
                (self.pool,),
            )
            rows = conn.execute(
                "UPDATE vmpool_machines SET state = 'resetting', holder = NULL, "
                "holder_pid = NULL, expires = NULL WHERE pool = %s AND state = 'leased' AND "
                f"(holder_pid NOT IN {alive} OR expires < {_NOW}) RETURNING name",
                (self.pool,),
            ).fetchall()
            self._serve(conn)
            return [r[0] for r in rows]

        return self._retrying("reclaim", op)

    # -- controller election ---------------------------------------------------------------
    def try_lead(self) -> bool:
        """Become the pool's controller if no live session is: a session-level advisory lock,
        released by the server when this connection dies, so another session can take over."""
        key = f"vmpool-controller:{self.pool}"
        got = self._retrying(
            "controller election",
            lambda c: c.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone(),
        )
        return bool(got and got[0])


@contextmanager
def opened(dsn: str, pool: str, holder: str, **kw: Any) -> Iterator[PgStore]:
    store = PgStore(dsn, pool, holder, **kw)
    try:
        yield store
    finally:
        store.close()
