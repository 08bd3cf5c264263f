"""How a client's lease operations reach its pool's record: chosen once, when the client is built.

- ``SocketTransport``: the controller's lease server (vmpool.server) over its unix socket, the
  usual case while a session runs. The server is the record's only writer; a waiting check-out
  is answered when it is served, and the connection is the client's lifeline (closing it gives
  up what the client holds).
- ``FileTransport``: no live controller (a kept pool, the CLI, a library user): each operation
  is a transaction of the pool file. Nobody else could tell a waiting check-out that it was
  served, so it looks again, backing off from 2 to 100 ms, until served or out of time.
- ``LocalTransport``: a lease server in this very process, without a socket (tests drive lease
  flows through it; the server's logic is the same).
- ``StoreTransport`` (vmpool.pgstore.transport): a pool on PostgreSQL. Each operation is a
  transaction of the shared record, run by the client itself on any host; a waiting check-out
  is woken by the pool's NOTIFY.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Protocol, TypeVar

from vmpool import _wire, leases, ops
from vmpool.errors import StateError
from vmpool.server import LeaseServer
from vmpool.state import LOCK_TIMEOUT, JsonStore, Operation, Pool

if TYPE_CHECKING:
    from vmpool.pgstore.store import PgStore

R = TypeVar("R")

_FIRST_LOOK = 0.002
_MAX_LOOK = 0.1
#: a file-transport waiter reclaims the leases of dead processes this often (no controller
#: does it for a pool without one)
_RECLAIM_EVERY = 1.0


class Transport(Protocol):
    """Carries lease operations to one pool's record and brings back their replies."""

    pool_id: str

    def run(self, op: Operation[R]) -> R:
        """Apply ``op`` to the record; a CheckoutStep with ``wait`` returns once final.
        Raises StateError when the record cannot be reached or refused the operation."""
        ...

    def close(self) -> None: ...


def connect(store: JsonStore | PgStore, policy: leases.Policy | None = None) -> Transport:
    """A pool on PostgreSQL: its transactions, run here. Otherwise the pool's lease server if
    one answers now, else its file (``policy``: what a waiting check-out reclaims dead
    holders' machines under, with no lease server to do it)."""
    if not isinstance(store, JsonStore):
        from vmpool.pgstore.transport import StoreTransport  # psycopg: only for such pools

        return StoreTransport(store, policy)
    if _wire.answers(store.socket_path):
        return SocketTransport(store)
    return FileTransport(store, policy)


def read_current(store: JsonStore | PgStore) -> Pool | None:
    """The record as of now: asked of the pool's live lease server (the file lags it by up to
    a write-back interval), else read from the file; a PostgreSQL record is always current."""
    if not isinstance(store, JsonStore):
        return store.read_current()
    if os.path.lexists(store.socket_path):
        transport = SocketTransport(store)
        try:
            return transport.run(ops.Status()).pool
        except StateError:  # no server there (a stale socket), or it just stopped
            pass
        finally:
            transport.close()
    return store.read()


def _parse(pool_id: str, op: Operation[R], data: bytes | _wire.Failure) -> R:
    if isinstance(data, _wire.Failure):
        raise StateError(f"pool {pool_id}: {data.message}")
    try:
        return op.parse_reply(data)
    except ValueError as exc:  # pydantic's ValidationError included
        raise StateError(
            f"pool {pool_id}: unreadable reply from its server: {data[:200]!r}"
        ) from exc


def _wait_of(op: object) -> float:
    return op.wait if isinstance(op, ops.CheckoutStep) else 0.0


class SocketTransport:
    def __init__(self, store: JsonStore) -> None:
        self.pool_id = store.pool_id
        self._conn = _wire.Connection(store.socket_path, timeout=LOCK_TIMEOUT + 10)

    def run(self, op: Operation[R]) -> R:
        try:
            data = self._conn.call(op.model_dump_json().encode() + b"\n", wait=_wait_of(op))
        except _wire.ServerGone as exc:
            raise StateError(f"pool {self.pool_id}: {exc}; the controller is gone") from exc
        return _parse(self.pool_id, op, data)

    def close(self) -> None:
        self._conn.close()


class LocalTransport:
    def __init__(self, server: LeaseServer) -> None:
        self.pool_id = server.store.pool_id
        self._server = server

    def run(self, op: Operation[R]) -> R:
        future = self._server.submit(op.model_dump_json().encode())
        data = future.result(timeout=LOCK_TIMEOUT + 10 + _wait_of(op))
        return _parse(self.pool_id, op, data)

    def close(self) -> None:
        pass


class FileTransport:
    def __init__(self, store: JsonStore, policy: leases.Policy | None = None) -> None:
        self.pool_id = store.pool_id
        self.store = store
        self.policy = policy

    def run(self, op: Operation[R]) -> R:
        with self.store.transaction() as pool:
            reply = op.apply(pool)
        if ops.must_wait(op, reply):
            return self._wait(op)  # type: ignore[return-value]  # R is its CheckoutReply
        return reply

    def _wait(self, op: ops.CheckoutStep) -> ops.CheckoutReply:
        """Look again until served, refused or out of time (the request is in the line)."""
        started = time.monotonic()
        deadline = started + op.wait
        interval = _FIRST_LOOK
        last_reclaim = started
        while True:
            now = time.monotonic()
            if now >= deadline:
                with self.store.transaction() as pool:
                    return op.expire(pool, now - started, op.now + (now - started))
            time.sleep(min(interval, deadline - now))
            interval = min(interval * 2, _MAX_LOOK)
            reclaim: leases.Policy | None = None
            if time.monotonic() - last_reclaim >= _RECLAIM_EVERY:
                reclaim, last_reclaim = self.policy, time.monotonic()
            with self.store.transaction() as pool:
                reply = op.look(op.now + (time.monotonic() - started), reclaim=reclaim).apply(
                    pool
                )
            if reply.final:
                return reply

    def close(self) -> None:
        pass
