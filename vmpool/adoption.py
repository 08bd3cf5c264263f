"""Adoption: a new session takes over a kept, idle pool of the same prefix, profile and
backend (left by `vmpool up` or a `--vmpool-keep` run) instead of warming a new one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmpool.errors import PoolGone, StateError
from vmpool.ownership import ProcessRef, is_alive
from vmpool.state import JsonStateDir, JsonStore, MachineState, Pool, Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adopter:
    """The session looking for a pool to adopt, and what that pool must match."""

    backend: str
    profile: str
    name_prefix: str
    me: ProcessRef
    size: int
    config_hash: str
    clock: Callable[[], float]

    def can_adopt(self, pool: Pool) -> bool:
        return (
            pool.keep
            and not pool.closing  # `vmpool down` has it
            and (pool.owner is None or not is_alive(pool.owner))
            and pool.backend == self.backend
            and pool.profile == self.profile
            and pool.name_prefix == self.name_prefix
        )


def adopt(directory: JsonStateDir, adopter: Adopter) -> tuple[JsonStore, Pool] | None:
    """Make ``adopter`` the owner of the first adoptable pool in ``directory``; returns its
    store and a copy of its record as taken over, or None when there is none."""
    for candidate in directory.pool_ids():
        store = directory.store(candidate)
        try:
            seen = store.read()
        except StateError as exc:
            log.warning("skipping unreadable pool file: %s", exc)
            continue
        if seen is None or not adopter.can_adopt(seen):
            continue
        try:
            adopted = _take_over(store, adopter)
        except PoolGone:  # `vmpool down` removed it since it was read: not adoptable
            continue
        if adopted is None:
            continue
        log.info("adopted kept pool %s", candidate)
        return store, adopted
    return None


def _take_over(store: JsonStore, adopter: Adopter) -> Pool | None:
    """Make ``adopter`` the owner of ``store``'s pool if it is still adoptable."""
    with store.transaction() as pool:
        if not adopter.can_adopt(pool):
            return None
        pool.owner = adopter.me
        pool.keep = False
        pool.closing = False
        pool.size = adopter.size
        pool.queue = []
        pool.config_hash = adopter.config_hash  # stale machines are replaced by plan()
        # the stats are this session's (the end-of-run summary), not the pool's history
        usable = any(
            m.state is MachineState.READY and m.config_hash == adopter.config_hash
            for m in pool.machines
        )
        pool.stats = Stats(first_ready_at=adopter.clock() if usable else None)
        return pool.model_copy(deep=True)
