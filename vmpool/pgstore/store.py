"""A pool's record on PostgreSQL: a StateStore (vmpool.state) that many hosts can share.

Tables: ``vmpool_pools`` (a row per pool: its pool-level fields as jsonb), ``vmpool_machines``
(a row per machine: key columns for operators and indexes, the whole Machine as jsonb) and
``vmpool_requests`` (a row per waiting check-out, ``seq`` keeping the line's order). A
transaction locks the pool's row ``FOR UPDATE`` first, which serialises the pool's operations
across hosts as the file lock does on one; it loads the Pool, lets the caller change it (the
same vmpool.ops / vmpool.leases code as the JSON store), then writes back only the rows that
changed and NOTIFYs the pool's channel when machines or the line changed (vmpool.pgstore
.transport wakes its waiting check-outs on it).

Safety: a server or session with ``synchronous_commit`` off is refused (StoreUnsafe): with it
off a database crash loses acknowledged grants and check-ins. A lost connection before the
pool is loaded is retried on a new one until ``connect_timeout``; one lost later (the outcome
of the commit unknown) raises StoreLost, and the caller re-runs its operation, which is
idempotent by request id (vmpool.ops).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vmpool.errors import PoolGone, StateError, StoreError, StoreUnsafe
from vmpool.ownership import check_pool_id
from vmpool.pgstore import lifeline
from vmpool.state import Pool

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS vmpool_meta (key text PRIMARY KEY, value integer NOT NULL);
CREATE TABLE IF NOT EXISTS vmpool_pools (id text PRIMARY KEY, record jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS vmpool_machines (
    pool text NOT NULL REFERENCES vmpool_pools (id) ON DELETE CASCADE,
    name text NOT NULL, seq bigserial NOT NULL, state text NOT NULL,
    holder_host text, holder_pid integer, holder_request text,
    generation bigint NOT NULL DEFAULT 0, record jsonb NOT NULL,
    PRIMARY KEY (pool, name));
CREATE TABLE IF NOT EXISTS vmpool_requests (
    pool text NOT NULL REFERENCES vmpool_pools (id) ON DELETE CASCADE,
    id text NOT NULL, seq bigint NOT NULL, record jsonb NOT NULL, PRIMARY KEY (pool, id));
CREATE TABLE IF NOT EXISTS vmpool_holders (
    token text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL,
    beat double precision NOT NULL);
"""
#: the tables of the first, standalone store (schema 1): never released, dropped on migration
_OLD_TABLES = "DROP TABLE IF EXISTS vmpool_leader, vmpool_requests, vmpool_machines"
#: the record as one statement sees it (one snapshot): the pool row with its machines and line
_LOAD = """
SELECT (p.record || jsonb_build_object(
    'machines', (SELECT coalesce(jsonb_agg(m.record ORDER BY m.seq), '[]')
                 FROM vmpool_machines m WHERE m.pool = p.id),
    'queue', (SELECT coalesce(jsonb_agg(r.record ORDER BY r.seq), '[]')
              FROM vmpool_requests r WHERE r.pool = p.id)))::text,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(r.id, r.seq)), '[]')
     FROM vmpool_requests r WHERE r.pool = p.id)::text
FROM vmpool_pools p WHERE p.id = %s
"""
_LIST_FIELDS = frozenset({"machines", "queue"})


def redacted(dsn: str) -> str:
    """The DSN as a message may show it: every part but the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    parts.pop("password", None)
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


def channel(pool_id: str) -> sql.Identifier:
    """The LISTEN/NOTIFY channel of a pool."""
    return sql.Identifier(f"vmpool:{pool_id}")


class StoreLost(StoreError):
    """The connection broke after the transaction began: whether it committed is unknown."""


class _Image:
    """What a transaction loaded, to write back only what changed."""

    def __init__(self, pool: Pool, seqs: dict[str, int]) -> None:
        self.head = _head(pool)
        # a Machine's fields are immutable values (its holder and actor are frozen models), so
        # a shallow copy is a snapshot: comparing it finds the machines changed without
        # dumping all of them (64 dumps cost ~0.5 ms under the pool's lock, per transaction)
        self.machines = {m.name: dict(m) for m in pool.machines}
        self.queue = {r.id: r.model_dump_json() for r in pool.queue}
        self.seqs = seqs


def _head(pool: Pool) -> str:
    return pool.model_dump_json(exclude=set(_LIST_FIELDS))


class PgStore:
    """One pool's record on PostgreSQL (implements vmpool.state.StateStore).

    One connection per store; a transaction at a time on it (threads of one process take
    turns). ``lease``: seconds a holder process of this store lives without a heartbeat
    (vmpool.pgstore.lifeline); its process starts beating on the first connection.
    """

    def __init__(
        self, dsn: str, pool_id: str, *, lease: float = 30.0, connect_timeout: float = 20.0
    ) -> None:
        try:
            check_pool_id(pool_id)
        except ValueError as exc:
            raise StateError(f"lease store {redacted(dsn)}: {exc}") from None
        self.dsn = dsn
        self.pool_id = pool_id
        self.lease = lease
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"PgStore({redacted(self.dsn)!r}, {self.pool_id!r})"

    # -- connections ---------------------------------------------------------------------------
    def error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{what} on {redacted(self.dsn)}: {type(exc).__name__}: {exc}")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():  # a forked child must not share its parent's socket
            self._conn, self._pid = None, os.getpid()
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = connect(self.dsn, self.connect_timeout)
        lifeline.ensure(self.dsn, self.lease)
        return self._conn

    def drop_connection(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None

    def close(self) -> None:
        self.drop_connection()

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """This store's connection for one transaction; StoreLost if it breaks meanwhile."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.drop_connection()
                raise StoreLost(
                    f"{what} on {redacted(self.dsn)}: the connection broke "
                    f"({type(exc).__name__}: {exc}); whether it committed is unknown"
                ) from exc
            except psycopg.Error as exc:
                raise self.error(what, exc) from exc

    # -- StateStore ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Pool]:
        # pipelined: BEGIN, the lock and the load go in one round trip, the writes and COMMIT
        # in another (the load runs after the lock is granted: it sees every commit before)
        with self._session(f"a transaction of pool {self.pool_id}") as conn, \
                conn.pipeline(), conn.transaction():
            lock = conn.execute(
                "SELECT 1 FROM vmpool_pools WHERE id = %s FOR UPDATE", (self.pool_id,)
            )
            load = conn.execute(_LOAD, (self.pool_id,))
            locked = lock.fetchone()
            loaded = self._parse(load.fetchone()) if locked else None
            if loaded is None:
                raise PoolGone(f"pool {self.pool_id} does not exist in {redacted(self.dsn)}")
            pool, image = loaded
            yield pool
            if self._write_back(conn, pool, image):
                conn.execute(sql.SQL("NOTIFY {}").format(channel(self.pool_id)))

    def read(self) -> Pool | None:
        try:
            return self._read()
        except StoreLost:  # a read changes nothing: once more, on a new connection
            return self._read()

    def _read(self) -> Pool | None:
        with self._session(f"reading pool {self.pool_id}") as conn, conn.transaction():
            loaded = self._load(conn)
        return None if loaded is None else loaded[0]

    def read_current(self) -> Pool | None:
        # every commit is durable and visible at once: no owner keeps the record in memory
        return self.read()

    def create(self, pool: Pool) -> None:
        pool.durable = True
        with self._session(f"creating pool {self.pool_id}") as conn, conn.transaction():
            done = conn.execute(
                "INSERT INTO vmpool_pools (id, record) VALUES (%s, %s::jsonb) "
                "ON CONFLICT DO NOTHING", (self.pool_id, _head(pool)),
            ).rowcount
            if not done:
                raise StateError(f"pool {self.pool_id} already exists in {redacted(self.dsn)}")
            empty = Pool.model_validate_json(pool.model_dump_json())
            empty.machines, empty.queue = [], []
            self._write_back(conn, pool, _Image(empty, {}))

    def remove(self) -> None:
        with self._session(f"removing pool {self.pool_id}") as conn, conn.transaction():
            conn.execute("DELETE FROM vmpool_pools WHERE id = %s", (self.pool_id,))

    def liveness(self) -> lifeline.Liveness:
        """Who is alive, as this database sees its holders (vmpool.pgstore.lifeline)."""
        with self._session("reading holders' heartbeats") as conn:
            return lifeline.Liveness.read(conn, self.lease)

    # -- loading and writing back --------------------------------------------------------------
    def _load(self, conn: psycopg.Connection[Any]) -> tuple[Pool, _Image] | None:
        return self._parse(conn.execute(_LOAD, (self.pool_id,)).fetchone())

    def _parse(self, row: tuple[Any, ...] | None) -> tuple[Pool, _Image] | None:
        if row is None:
            return None
        try:
            pool = Pool.model_validate_json(row[0])
        except ValueError as exc:
            raise StateError(
                f"pool {self.pool_id} in {redacted(self.dsn)}: unreadable record ({exc}); "
                f"remove it with: vmpool down --pool {self.pool_id} --force"
            ) from exc
        seqs = {str(rid): int(seq) for rid, seq in json.loads(row[1])}
        return pool, _Image(pool, seqs)

    def _write_back(self, conn: psycopg.Connection[Any], pool: Pool, image: _Image) -> bool:
        """Write the rows that changed; True when machines or the line did (a NOTIFY is due)."""
        head = _head(pool)
        if head != image.head:
            conn.execute("UPDATE vmpool_pools SET record = %s::jsonb WHERE id = %s",
                         (head, self.pool_id))
        changed = False
        names = set()
        for m in pool.machines:
            names.add(m.name)
            if image.machines.get(m.name) == dict(m):
                continue
            dumped = m.model_dump_json()
            changed = True
            h = m.holder
            keys = (m.state.value, h.host if h else None, h.pid if h else None,
                    h.request if h else None, m.generation, dumped)
            if m.name in image.machines:
                conn.execute(
                    "UPDATE vmpool_machines SET state = %s, holder_host = %s, holder_pid = %s, "
                    "holder_request = %s, generation = %s, record = %s::jsonb "
                    "WHERE pool = %s AND name = %s", (*keys, self.pool_id, m.name),
                )
            else:
                conn.execute(
                    "INSERT INTO vmpool_machines (state, holder_host, holder_pid, "
                    "holder_request, generation, record, pool, name) "
                    "VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s)", (*keys, self.pool_id, m.name),
                )
        gone = [n for n in image.machines if n not in names]
        if gone:
            changed = True
            conn.execute("DELETE FROM vmpool_machines WHERE pool = %s AND name = ANY(%s)",
                         (self.pool_id, gone))
        return self._write_queue(conn, pool, image) or changed

    def _write_queue(self, conn: psycopg.Connection[Any], pool: Pool, image: _Image) -> bool:
        """The line's rows: a request keeps its ``seq``; one put in front of the requests
        already there gets a lower one (vmpool.leases.enqueue ``front``), any other a higher."""
        ids = {r.id for r in pool.queue}
        changed = False
        gone = [rid for rid in image.queue if rid not in ids]
        if gone:
            changed = True
            conn.execute("DELETE FROM vmpool_requests WHERE pool = %s AND id = ANY(%s)",
                         (self.pool_id, gone))
        known = [i for i, r in enumerate(pool.queue) if r.id in image.seqs]
        first = known[0] if known else len(pool.queue)
        low = min(image.seqs.values(), default=0)
        high = max(image.seqs.values(), default=0)
        for i, r in enumerate(pool.queue):
            dumped = r.model_dump_json()
            if r.id in image.seqs:
                if image.queue.get(r.id) != dumped:
                    changed = True
                    conn.execute(
                        "UPDATE vmpool_requests SET record = %s::jsonb WHERE pool = %s AND id = %s",
                        (dumped, self.pool_id, r.id),
                    )
                continue
            if i < first:
                seq = low - (first - i)
            else:
                high += 1
                seq = high
            changed = True
            conn.execute(
                "INSERT INTO vmpool_requests (pool, id, seq, record) "
                "VALUES (%s, %s, %s, %s::jsonb)",
                (self.pool_id, r.id, seq, dumped),
            )
        return changed


def connect(dsn: str, timeout: float, **options: Any) -> psycopg.Connection[Any]:
    """A new autocommit connection, checked safe (StoreUnsafe otherwise). A server that does
    not answer (restarting) is tried again until ``timeout``; then StoreError."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5, **options)
            break
        except psycopg.OperationalError as exc:
            if time.monotonic() + delay >= deadline:
                raise StoreError(
                    f"cannot connect to the lease store {redacted(dsn)} within {timeout:g}s: "
                    f"{exc}".rstrip()
                ) from exc
            time.sleep(delay)  # the server may be restarting: a back-off between tries
            delay = min(delay * 2, 0.5)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the lease store {redacted(dsn)}: {exc}") from exc
    try:
        _check_safe(conn, dsn)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_safe(conn: psycopg.Connection[Any], dsn: str) -> None:
    """Refuse a server whose commits may be lost on a crash; set the setting per session too
    (a role or database default of ``off`` is refused rather than overridden, so that other
    clients of that database are not left unsafe unnoticed)."""
    setting = conn.execute("SHOW synchronous_commit").fetchone()
    value = setting[0] if setting else "?"
    if value != "on":
        raise StoreUnsafe(
            f"lease store {redacted(dsn)}: synchronous_commit is {value!r}; vmpool needs 'on' "
            "(with it off a database crash loses acknowledged check-outs and check-ins: double "
            "grants, stuck machines). Set synchronous_commit = on in postgresql.conf, or run "
            "ALTER ROLE <user> RESET synchronous_commit / ALTER DATABASE <db> RESET "
            "synchronous_commit"
        )
    conn.execute("SET synchronous_commit = on")


def migrate(dsn: str, timeout: float = 20.0) -> None:
    """Create the tables, or refuse a schema newer than this vmpool knows."""
    with connect(dsn, timeout) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('vmpool-schema'))")
        conn.execute("CREATE TABLE IF NOT EXISTS vmpool_meta "
                     "(key text PRIMARY KEY, value integer NOT NULL)")
        row = conn.execute("SELECT value FROM vmpool_meta WHERE key = 'schema'").fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise StoreError(
                f"lease store {redacted(dsn)}: schema version {row[0]} is newer than this "
                f"vmpool's {SCHEMA_VERSION}; upgrade vmpool"
            )
        if row is not None and row[0] < SCHEMA_VERSION:
            conn.execute(_OLD_TABLES)
        conn.execute(_SCHEMA)
        conn.execute(
            "INSERT INTO vmpool_meta VALUES ('schema', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (SCHEMA_VERSION,),
        )


def pool_ids(dsn: str, timeout: float = 20.0) -> list[str]:
    """Every pool in the store."""
    with connect(dsn, timeout) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM vmpool_pools ORDER BY id")]
