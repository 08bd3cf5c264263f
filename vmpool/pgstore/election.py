"""One controller per shared pool, elected through the database; sessions counted as users.

Every session's controller of a pool on PostgreSQL holds a dedicated connection with two
session-level advisory locks on it: a *shared* "user" lock for as long as it uses the pool, and,
when it wins the election, the *exclusive* "leader" lock (``pg_try_advisory_lock``). The server
releases both when that connection ends, whatever ended it (the process killed, its host gone,
the server restarted), so no lock outlives its holder and nothing needs an expiry. A session
that is not the leader tries again every ``retry`` seconds and takes over once the leader's
connection is gone. The last user to leave (``leave`` takes the user lock exclusively, which
only succeeds when no other session holds it shared) destroys the pool.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from vmpool.ownership import current_process
from vmpool.pgstore.lifeline import token
from vmpool.pgstore.store import connect

log = logging.getLogger(__name__)

RETRY = 0.5
_LEADER = "SELECT pg_try_advisory_lock(hashtext(%s))"
#: a session's election connection is named this + its lifeline token (vmpool.pgstore.closing
#: names the hosts of a pool's attached sessions by it)
CONTROLLER = "vmpool-controller:"


def user_key(pool_id: str) -> str:
    """The advisory lock's key that a pool's sessions hold shared while they use it."""
    return f"vmpool-users:{pool_id}"


class Election:
    """This session's place in a pool's election (start(), leading, leave())."""

    def __init__(
        self, dsn: str, pool_id: str, *, retry: float = RETRY,
        on_elected: Callable[[], None] | None = None, connect_timeout: float = 20.0,
    ) -> None:
        self.dsn = dsn
        self.pool_id = pool_id
        self.retry = retry
        self.on_elected = on_elected
        self.connect_timeout = connect_timeout
        self._leader_key = f"vmpool-leader:{pool_id}"
        self._user_key = user_key(pool_id)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._leading = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def join(self) -> bool:
        """Join as a user (waiting while the last user destroys the pool) and stand once;
        whether this session leads now."""
        self._join()
        return self.leading

    def stand(self, on_elected: Callable[[], None]) -> None:
        """Keep standing in the background; ``on_elected`` runs whenever this session wins."""
        self.on_elected = on_elected
        self._thread = threading.Thread(target=self._run, name="vmpool-election", daemon=True)
        self._thread.start()

    def wait_leading(self, timeout: float) -> bool:
        return self._leading.wait(timeout)

    def _join(self) -> None:
        with self._lock:
            conn = connect(self.dsn, self.connect_timeout,
                           application_name=CONTROLLER + token(current_process()))
            conn.execute("SELECT pg_advisory_lock_shared(hashtext(%s))", (self._user_key,))
            self._conn = conn
            row = conn.execute(_LEADER, (self._leader_key,)).fetchone()
        if row is not None and row[0]:
            self._leading.set()

    def _elected(self) -> None:
        log.info("vmpool: this session now controls shared pool %s", self.pool_id)
        self._leading.set()
        if self.on_elected is not None:
            try:
                self.on_elected()
            except Exception:
                log.exception("vmpool: taking over pool %s", self.pool_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    conn = self._conn
                if conn is None or conn.closed:
                    self._leading.clear()
                    self._join()
                    if self.leading:
                        self._elected()
                    continue
                if not self.leading:
                    with self._lock:
                        row = conn.execute(_LEADER, (self._leader_key,)).fetchone()
                    if row is not None and row[0]:
                        self._elected()
                # a leader watches its connection: the server gone means its locks are too
                readable, _, _ = select.select([conn.fileno()] if conn else [], [], [],
                                               self.retry)
                if readable and conn is not None:
                    with self._lock:
                        conn.execute("SELECT 1")
            except Exception as exc:  # the server restarting, usually: stand again soon
                if self._stop.is_set():
                    return
                if self.leading:
                    log.warning("vmpool: lost the control of pool %s: %s", self.pool_id, exc)
                self._leading.clear()
                self._drop()
                self._stop.wait(self.retry)

    def _drop(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None

    def leave(self) -> bool:
        """Stop standing and give up the leadership; True when no other session uses the pool
        (this one was the last: it may destroy the pool, and no one else can join meanwhile
        until it closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry + 5)
        last = False
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock_shared(hashtext(%s))",
                                 (self._user_key,))
                    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                       (self._user_key,)).fetchone()
                    last = bool(row and row[0])
        self._leading.clear()
        return last

    def close(self) -> None:
        """Let go of everything (the connection's end releases its locks)."""
        self._stop.set()
        self._leading.clear()
        self._drop()
