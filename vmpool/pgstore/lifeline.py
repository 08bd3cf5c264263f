"""A process's lifeline to the lease store: a connection named after it, and a heartbeat.

psutil can only say whether a process of *this* host lives. On PostgreSQL every process that
uses a pool's store keeps one extra connection whose ``application_name`` is its token
(``token``) and beats on it: it writes ``vmpool_holders.beat`` (the database's clock) every
``lease / 3`` seconds. Any process then judges a holder dead (``Liveness``) when
- its lifeline connection is gone from ``pg_stat_activity`` (it exited or was killed: its
  socket closed) after it beat on this run of the server; one that last beat before the
  server (re)started is given ``GRACE`` seconds of the server's uptime to reconnect (every
  lifeline watches its socket, so it does so at once), or
- its last beat is older than ``lease`` (a process stopped with SIGSTOP keeps its connection
  but beats no more), or
- it ran on this host and psutil says it is gone (vmpool.ownership.is_alive).
A process that never spoke to the store (no row) is judged by psutil alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import threading
import time
from typing import Any

import psycopg

from vmpool.ownership import ProcessRef, current_process, is_alive

log = logging.getLogger(__name__)

#: seconds after a server (re)start during which a missing lifeline proves nothing
GRACE = 2.0
_NOW = "extract(epoch from clock_timestamp())"
#: seconds after its last beat a holder's row is deleted
_FORGET_AFTER = 7 * 86400.0


def token(ref: ProcessRef) -> str:
    """A process's name in the store (fits ``application_name``'s 63 bytes)."""
    key = f"{ref.host}|{ref.pid}|{ref.start_ticks}|{ref.boot_id}".encode()
    return "vmpool-" + hashlib.sha256(key).hexdigest()[:24]


class Liveness:
    """Who is alive as the store sees it now (one query); call it with a ProcessRef."""

    def __init__(self, holders: dict[str, tuple[bool, bool, bool]], uptime: float) -> None:
        #: token -> (beat within the lease, lifeline connected, beat since the server started)
        self.holders = holders
        self.uptime = uptime

    @classmethod
    def read(cls, conn: psycopg.Connection[Any], lease: float) -> Liveness:
        with conn.transaction():
            rows = conn.execute(
                f"SELECT h.token, h.beat >= {_NOW} - %s, EXISTS (SELECT 1 FROM pg_stat_activity "
                "a WHERE a.application_name = h.token), "
                "h.beat >= extract(epoch from pg_postmaster_start_time()) "
                "FROM vmpool_holders h", (lease,),
            ).fetchall()
            up = conn.execute(
                "SELECT extract(epoch from clock_timestamp() - pg_postmaster_start_time())"
            ).fetchone()
        return cls({r[0]: (bool(r[1]), bool(r[2]), bool(r[3])) for r in rows},
                   float(up[0]) if up else 0.0)

    def __call__(self, ref: ProcessRef) -> bool:
        if not is_alive(ref):
            return False
        seen = self.holders.get(token(ref))
        if seen is None:
            return True
        fresh, connected, since_start = seen
        return fresh and (connected or (not since_start and self.uptime < GRACE))


class _Beat:
    """This process's lifeline to one store: a daemon thread that reconnects at once when
    its connection breaks and beats every ``lease / 3`` seconds."""

    def __init__(self, dsn: str, lease: float) -> None:
        self.dsn = dsn
        self.lease = lease
        self.me = current_process()
        self.token = token(self.me)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vmpool-lifeline", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from vmpool.pgstore.store import connect  # the store imports this module

        conn: psycopg.Connection[Any] | None = None
        delay = 0.02
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn, 3600.0, application_name=self.token)
                    delay = 0.02
                    # rows of processes gone long ago (a dead holder's row is needed only
                    # while its leases may still be in a record)
                    conn.execute(f"DELETE FROM vmpool_holders WHERE beat < {_NOW} - %s",
                                 (_FORGET_AFTER,))
                conn.execute(
                    "INSERT INTO vmpool_holders (token, host, pid, beat) "
                    f"VALUES (%s, %s, %s, {_NOW}) ON CONFLICT (token) DO UPDATE "
                    "SET beat = excluded.beat", (self.token, self.me.host, self.me.pid),
                )
                # wake early when the socket says something: the server went away
                readable, _, _ = select.select([conn.fileno()], [], [], self.lease / 3)
                if readable:
                    conn.execute("SELECT 1")
            except Exception as exc:  # any failure: a new connection, soon
                log.debug("vmpool lifeline to the lease store: %s", exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self._stop.wait(delay)
                delay = min(delay * 2, 0.2)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()


_beats: dict[str, _Beat] = {}
_beats_pid = os.getpid()
_beats_lock = threading.Lock()


def ensure(dsn: str, lease: float) -> None:
    """Start this process's lifeline to ``dsn`` unless it runs already."""
    global _beats_pid
    with _beats_lock:
        if _beats_pid != os.getpid():  # a forked child: its parent's threads are not its own
            _beats.clear()
            _beats_pid = os.getpid()
        beat = _beats.get(dsn)
        if beat is None or not beat.thread.is_alive():
            _beats[dsn] = _Beat(dsn, lease)


def wait_registered(dsn: str, timeout: float = 10.0) -> None:
    """Block until this process's first beat is written (tests, and a holder about to lease)."""
    with _beats_lock:
        beat = _beats.get(dsn)
    if beat is None:
        return
    from vmpool.pgstore.store import connect

    deadline = time.monotonic() + timeout
    with connect(dsn, timeout) as conn:
        while conn.execute("SELECT 1 FROM vmpool_holders h JOIN pg_stat_activity a ON "
                           "a.application_name = h.token WHERE h.token = %s",
                           (beat.token,)).fetchone() is None:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)  # the poll interval of a deadline loop: no event announces a beat
