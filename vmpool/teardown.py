"""Destroying a pool at the end of its session: delete its machines (in one batch where the
backend can), confirm with the backend that they are gone, remove the network and the record.

What cannot be deleted stays in the record (its owner dead once the session exits) so that
`vmpool gc` can finish the job.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from vmpool.backends.base import Backend
from vmpool.errors import StateError, VmPoolError
from vmpool.ownership import pool_machines, pool_network
from vmpool.state import Pool, StateStore

log = logging.getLogger(__name__)

#: teardown deletes what the backend still lists of the pool up to this many more times
_TEARDOWN_ROUNDS = 3


@dataclass
class Leftovers:
    """What a teardown could not delete (kept in the record for `vmpool gc`)."""

    machines: list[str] = field(default_factory=list)
    network: str | None = None


def destroy(
    backend: Backend, store: StateStore, pool_id: str, final: Pool | None
) -> Leftovers:
    """Delete every machine of ``pool_id`` (those in ``final``, its last record, and those the
    backend lists with its label), then its network and record; returns what is left."""
    names = {m.name for m in final.machines} if final else set()
    failed = set(delete_all(backend, names | (_listed(backend, pool_id) or set())))
    # confirm with the backend: a machine it still lists whose deletion reported no error
    # (reported done and not done, or appeared after the listing) is deleted again; one
    # whose deletion failed is not retried (a hanging tool would make each retry as long).
    # What is still there at the end stays in the record for `vmpool gc`.
    for attempt in range(_TEARDOWN_ROUNDS + 1):
        left = _listed(backend, pool_id)
        if left is None:  # cannot tell: trust what the deletions said
            break
        unexplained = left - failed
        if not unexplained or attempt == _TEARDOWN_ROUNDS:
            for name in sorted(unexplained):
                log.error("teardown: %s is still there after %d deletions", name, attempt + 1)
            failed = left
            break
        log.warning("teardown: deleting %s again: still there", sorted(unexplained))
        failed |= set(delete_all(backend, unexplained))
    leftovers = Leftovers(machines=sorted(failed))
    # without a readable record, the network is found by the name it was made with
    network = final.network if final else pool_network(backend, pool_id)
    if network:
        try:
            backend.delete_network(network)
        except VmPoolError as exc:
            log.error("teardown: could not delete network %s: %s", network, exc)
            leftovers.network = network
    if failed:
        # keep the record (owner dead after we exit) so `vmpool gc` can finish the job
        with contextlib.suppress(StateError), store.transaction() as pool:
            pool.machines = [m for m in pool.machines if m.name in failed]
    else:
        store.remove()
    return leftovers


def delete_all(backend: Backend, names: set[str]) -> list[str]:
    """Delete ``names`` in one batch (one tool process for them all where the backend can:
    podman, docker); returns those that failed."""
    if not names:
        return []
    try:
        errors = backend.delete_many(sorted(names))
    except VmPoolError as exc:
        errors = dict.fromkeys(names, str(exc))
    for name, error in sorted(errors.items()):
        log.error("teardown: could not delete %s: %s", name, error)
    return sorted(errors)


def _listed(backend: Backend, pool_id: str) -> set[str] | None:
    """The pool's machines as the backend lists them (by the pool label); None when the
    backend cannot list them."""
    try:
        return pool_machines(backend, pool_id)
    except VmPoolError as exc:
        log.warning("teardown: could not list machines: %s", exc)
        return None
