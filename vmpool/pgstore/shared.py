"""A session's hold on a pool shared on PostgreSQL: the store, the transport, the election.

The controller of every session that uses a pool on PostgreSQL attaches to it: the first one
creates the record, later ones (on any host) find it; one of them, elected through the database
(vmpool.pgstore.election), keeps the pool (warm-up, replacement, reclaim), the others only
serve their workers' tests from it. The last session to leave destroys it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmpool.errors import StateError
from vmpool.pgstore.election import Election
from vmpool.pgstore.store import PgStore, migrate, redacted
from vmpool.pgstore.transport import StoreTransport
from vmpool.state import Pool

log = logging.getLogger(__name__)


class Shared:
    def __init__(self, dsn: str, pool_id: str, lease: float) -> None:
        self.dsn = dsn
        self.store = PgStore(dsn, pool_id, lease=lease)
        self.election = Election(dsn, pool_id)
        self._transport: StoreTransport | None = None

    @property
    def leading(self) -> bool:
        return self.election.leading

    def attach(self, new_record: Callable[[], Pool], on_elected: Callable[[], None]) -> None:
        """Join the pool's users (creating its record if none exists) and its election;
        ``on_elected`` runs now if this session leads, and whenever it takes over later."""
        migrate(self.dsn, self.store.connect_timeout)
        leading = self.election.join()
        record = new_record()
        existing = self.store.read()
        if existing is None:
            try:
                self.store.create(record)
            except StateError:  # another session made it meanwhile
                existing = self.store.read()
        if existing is not None and existing.closing:
            # `vmpool down`/`gc` marked it (vmpool.pgstore.closing): its machines are going
            self.election.close()
            raise StateError(
                f"pool {self.store.pool_id} in {redacted(self.dsn)} is being destroyed (marked "
                "closing by `vmpool down` or `vmpool gc`): start again once it is gone; if it "
                "stays, finish it with: vmpool gc"
            )
        if existing is not None and (existing.backend, existing.config_hash) != (
            record.backend, record.config_hash
        ):
            self.election.close()
            raise StateError(
                f"pool {self.store.pool_id} in {redacted(self.dsn)} holds {existing.backend} "
                f"machines of config {existing.config_hash}, not {record.backend} machines of "
                f"config {record.config_hash}: the sessions sharing it must configure it "
                "alike (or set another [pool] name_prefix)"
            )
        if leading:
            on_elected()
        self.election.stand(on_elected)

    def transport(self) -> StoreTransport:
        """The controller's own transport (its resets' outcomes)."""
        if self._transport is None:
            self._transport = StoreTransport(self.store)
        return self._transport

    def leave(self) -> bool:
        """Stop standing; True when this was the pool's last session (it destroys it)."""
        return self.election.leave()

    def close(self) -> None:
        self.election.close()
        self.store.close()
