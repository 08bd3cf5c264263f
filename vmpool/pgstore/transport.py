"""Lease operations as PostgreSQL transactions, run by the client itself (no lease server).

``StoreTransport`` is FileTransport's counterpart for a pool on PostgreSQL: every operation is
one transaction of the shared record (vmpool.pgstore.store), so workers of any host apply them
directly. A check-out that must wait does not sleep between looks: it LISTENs on the pool's
channel, which every transaction that changes machines or the line NOTIFYs, and looks again
when woken (and every ``look_every`` seconds anyway, in case a notification was lost with a
connection). While it waits it also reclaims what dead holders hold, as the lease server's
closed connections do for a socket client (vmpool.pgstore.lifeline says who is dead).

A connection lost mid-operation is retried once on a new connection (the store reconnects
within its timeout): check-outs and check-ins are idempotent by request id (vmpool.ops), so a
retry after a lost reply finds the first attempt's outcome instead of doubling it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from vmpool import leases, ops
from vmpool.pgstore.store import PgStore, StoreLost, channel, connect
from vmpool.state import Operation

log = logging.getLogger(__name__)

R = TypeVar("R")

#: a waiting check-out looks again this often even without a notification
LOOK_EVERY = 0.5
#: and reclaims dead holders' leases this often (no lease server does it on PostgreSQL)
_RECLAIM_EVERY = 0.5


class StoreTransport:
    """Runs lease operations as transactions of a PgStore."""

    def __init__(
        self, store: PgStore, policy: leases.Policy | None = None, *,
        look_every: float = LOOK_EVERY,
    ) -> None:
        self.pool_id = store.pool_id
        self.store = store
        self.policy = policy
        self.look_every = look_every
        self._listener: psycopg.Connection[Any] | None = None
        #: looks made by waiting check-outs (a test counts them: woken, not polling)
        self.looks = 0

    def run(self, op: Operation[R]) -> R:
        reply = self._apply(op)
        if ops.must_wait(op, reply):
            return self._wait(op)  # type: ignore[return-value]  # R is its CheckoutReply
        return reply

    def _apply(self, op: Operation[R], *, reclaim: bool = False) -> R:
        for attempt in (1, 2):
            try:
                alive = self.store.liveness() if reclaim and self.policy else None
                with self.store.transaction() as pool:
                    if alive is not None and self.policy is not None:
                        leases.reclaim(pool, self.policy, alive, time.time())
                    return op.apply(pool)
            except StoreLost as exc:
                if attempt == 2:
                    raise
                log.info("%s; running it again on a new connection", exc)
        raise AssertionError("unreachable")

    def _wait(self, op: ops.CheckoutStep) -> ops.CheckoutReply:
        """Look again when woken, until served, refused or out of time (it is in the line)."""
        started = time.monotonic()
        deadline = started + op.wait
        last_reclaim = started
        self._listen()
        woken = True  # a change may have come between the first look and LISTEN
        while True:
            now = time.monotonic()
            if now >= deadline:
                return self._apply(_Expire(op, now - started))
            if not woken:
                woken = self._sleep(min(self.look_every, deadline - now))
            reclaim = time.monotonic() - last_reclaim >= _RECLAIM_EVERY
            if reclaim:
                last_reclaim = time.monotonic()
            self.looks += 1
            reply = self._apply(op.look(op.now + (time.monotonic() - started)), reclaim=reclaim)
            if reply.final:
                return reply
            woken = False

    def _listen(self) -> None:
        if self._listener is not None and not self._listener.closed:
            return
        conn = connect(self.store.dsn, self.store.connect_timeout)
        conn.execute(sql.SQL("LISTEN {}").format(channel(self.pool_id)))
        self._listener = conn

    def _sleep(self, seconds: float) -> bool:
        """Wait for the pool's notification up to ``seconds``; True when one came."""
        assert self._listener is not None
        try:
            woken = any(True for _ in self._listener.notifies(timeout=seconds, stop_after=1))
            if woken:
                # the rest that queued up meanwhile: one look serves them all
                for _ in self._listener.notifies(timeout=0.0005):
                    pass
            return woken
        except psycopg.Error:
            # the server went away: a new listener, and a look (a change may have been missed)
            self._close_listener()
            with contextlib.suppress(Exception):
                self._listen()
            return True

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._close_listener()
        self.store.close()


def reclaim(store: PgStore, policy: leases.Policy) -> list[str]:
    """Take back what dead holders hold, under ``policy`` (vmpool.pgstore.lifeline says who
    is dead); the machines reclaimed."""
    alive = store.liveness()
    with store.transaction() as pool:
        return leases.reclaim(pool, policy, alive, time.time())


class _Expire:
    """A waiting check-out's wait ran out: it leaves the line (ops.CheckoutStep.expire)."""

    def __init__(self, op: ops.CheckoutStep, waited: float) -> None:
        self.op = op
        self.waited = waited

    def apply(self, pool: Any) -> ops.CheckoutReply:
        return self.op.expire(pool, self.waited, self.op.now + self.waited)

    def parse_reply(self, data: bytes) -> ops.CheckoutReply:
        return self.op.parse_reply(data)

    def model_dump_json(self) -> str:
        return self.op.model_dump_json()
