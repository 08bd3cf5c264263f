"""Reaping: destroy machines and networks whose owning session is provably dead.

A machine is spared when its pool's record says the owner is alive or the pool is kept, or
when its own owner labels name a live process; a machine without owner information is left
alone and reported. Never a prefix-only cleanup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vmpool.backends.base import LABEL_POOL, Backend
from vmpool.errors import StateError, VmPoolError
from vmpool.ownership import is_alive, owner_from_labels
from vmpool.state import JsonStateDir, MachineState, Pool

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    pools_removed: list[str] = field(default_factory=list)
    machines_deleted: list[str] = field(default_factory=list)
    networks_deleted: list[str] = field(default_factory=list)
    spared: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def pool_is_live(pool: Pool) -> bool:
    """Kept pools, pools whose controller runs, and pools with a live lease holder are live."""
    if pool.keep:
        return True
    if pool.owner is not None and is_alive(pool.owner):
        return True
    return any(
        m.state is MachineState.LEASED and m.holder is not None and is_alive(m.holder)
        for m in pool.machines
    )


def reap(
    directory: JsonStateDir, backend: Backend, prefix: str, *, dry_run: bool = False
) -> ReapReport:
    """Destroy what dead sessions of ``prefix`` left on ``backend``; spare everything else."""
    report = ReapReport()
    protected: set[str] = set()
    for pid in directory.pool_ids():
        store = directory.store(pid)
        try:
            pool = store.read()
        except StateError as exc:
            # unreadable: we cannot prove its owner dead from the file, so its machines are
            # judged by their own labels below, never by the file
            report.errors.append(str(exc))
            continue
        if pool is None or pool.name_prefix != prefix or pool.backend != backend.name:
            if pool is not None:
                protected.add(pool.id)
            continue
        if pool_is_live(pool):
            protected.add(pool.id)
            continue
        doomed = [m.name for m in pool.machines]
        if dry_run:
            report.machines_deleted.extend(doomed)
            report.pools_removed.append(pool.id)
            continue
        ok = True
        for name in doomed:
            ok = _delete(backend, name, report) and ok
        if pool.network:
            try:
                backend.delete_network(pool.network)
                report.networks_deleted.append(pool.network)
            except VmPoolError as exc:
                report.errors.append(f"network {pool.network}: {exc}")
        if ok:
            store.remove()
            report.pools_removed.append(pool.id)

    try:
        machines = backend.list(prefix + "-")
    except VmPoolError as exc:
        report.errors.append(f"listing {backend.name} machines: {exc}")
        machines = []
    for info in machines:
        if info.name in report.machines_deleted:
            continue
        verdict = _verdict(info.labels, protected)
        if verdict == "spare":
            report.spared.append(info.name)
        elif verdict == "unknown":
            report.unknown.append(info.name)
        elif dry_run:
            report.machines_deleted.append(info.name)
        else:
            _delete(backend, info.name, report)

    try:
        networks = backend.list_networks(prefix + "-")
    except VmPoolError as exc:
        report.errors.append(f"listing {backend.name} networks: {exc}")
        networks = []
    for info in networks:
        if info.name in report.networks_deleted:
            continue
        if _verdict(info.labels, protected) != "dead":
            continue
        if dry_run:
            report.networks_deleted.append(info.name)
            continue
        try:
            backend.delete_network(info.name)
            report.networks_deleted.append(info.name)
        except VmPoolError as exc:
            report.errors.append(f"network {info.name}: {exc}")
    return report


def _verdict(labels: dict[str, str] | object, protected: set[str]) -> str:
    if not isinstance(labels, dict):
        return "unknown"
    if labels.get(LABEL_POOL) in protected:
        return "spare"
    owner = owner_from_labels(labels)
    if owner is None:
        return "unknown"
    return "spare" if is_alive(owner) else "dead"


def _delete(backend: Backend, name: str, report: ReapReport) -> bool:
    try:
        backend.delete(name)
    except VmPoolError as exc:
        report.errors.append(f"{name}: {exc}")
        return False
    report.machines_deleted.append(name)
    log.info("reaped %s", name)
    return True
