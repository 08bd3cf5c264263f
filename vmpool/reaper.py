"""Reaping: destroy machines and networks whose owning session is provably dead.

A machine is spared when its pool's record says the owner is alive or the pool is kept, or
when its own owner labels name a live process; a machine without owner information is left
alone and reported. Never a prefix-only cleanup.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path

from vmpool._wire import answers
from vmpool.backends.base import LABEL_POOL, Backend, MachineInfo
from vmpool.errors import StateError, VmPoolError
from vmpool.ownership import is_alive, owner_from_labels
from vmpool.session import SessionFile
from vmpool.state import JsonStateDir, MachineState, Pool

log = logging.getLogger(__name__)


#: files this old with nothing to go with them are litter (a live creator holds them for ms)
LITTER_AGE = 600.0


@dataclass
class ReapReport:
    pools_removed: list[str] = field(default_factory=list)
    machines_deleted: list[str] = field(default_factory=list)
    networks_deleted: list[str] = field(default_factory=list)
    spared: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing was done, spared, left alone or went wrong."""
        return not any(astuple(self))


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
    directory: JsonStateDir, backend: Backend, prefix: str, *, dry_run: bool = False,
    shared: Callable[[], list[str]] | None = None,
) -> ReapReport:
    """Destroy what dead sessions of ``prefix`` left on ``backend``; spare everything else.

    ``shared``: the pools of a shared store (vmpool.pgstore): their machines outlive the
    session that made them while other sessions use the pool; the pool's last session
    destroys them."""
    report = ReapReport()
    protected: set[str] = set()
    if shared is not None:
        try:
            protected.update(shared())
        except VmPoolError as exc:  # the store unreachable: no machine of it can be judged
            report.errors.append(str(exc))
            return report
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
            _delete_network(backend, pool.network, report)
        if ok:
            store.remove()
            report.pools_removed.append(pool.id)

    errors = len(report.errors)
    listed = _listed(report, backend, prefix + "-", networks=False)
    if len(report.errors) == errors:
        # what a backend keeps beside machines removed outside vmpool (podman: recipes, agent
        # directories); only when the listing worked, or every machine would look removed
        report.files_removed += backend.forget_missing(
            prefix + "-", {i.name for i in listed}, older_than=LITTER_AGE, dry_run=dry_run
        )
    for info in listed:
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

    for info in _listed(report, backend, prefix + "-", networks=True):
        if info.name in report.networks_deleted:
            continue
        if _verdict(info.labels, protected) != "dead":
            continue
        if dry_run:
            report.networks_deleted.append(info.name)
        else:
            _delete_network(backend, info.name, report)
    sweep_litter(directory, report, dry_run=dry_run)
    return report


def sweep_litter(
    directory: JsonStateDir, report: ReapReport, *, dry_run: bool, now: float | None = None
) -> None:
    """Remove what killed sessions leave in the state directory: lock and wait-sample files of
    pools that no longer exist, session files of dead controllers, lease-server sockets nobody
    answers on, and stray temp files."""
    now = time.time() if now is None else now
    path = directory.path
    if not path.is_dir():
        return
    pools = set(directory.pool_ids())

    def old(p: Path) -> bool:
        try:
            return now - p.stat().st_mtime > LITTER_AGE
        except FileNotFoundError:
            return False

    doomed: list[Path] = []
    for p in path.iterdir():
        name = p.name
        if name.endswith(".tmp") and name.startswith("."):
            if old(p):
                doomed.append(p)
        elif name.endswith((".lock", ".waits")) and not name.endswith(".session.lock"):
            stem = name.rsplit(".", 1)[0]
            if stem not in pools and old(p):
                doomed.append(p)
        elif name.endswith(".sock"):
            # a lease server's socket outlives a killed controller; a live one answers
            if not answers(p):
                doomed.append(p)
        elif name.endswith(".session"):
            session = SessionFile(path, name[: -len(".session")])
            try:
                owner = session.read().owner
            except StateError:
                owner = None
            if (owner is not None and not is_alive(owner)) or (owner is None and old(p)):
                doomed.extend([p, session.lock_path])
    for p in doomed:
        if not p.exists():
            continue
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        report.files_removed.append(p.name)


def _verdict(labels: dict[str, str] | object, protected: set[str]) -> str:
    if not isinstance(labels, dict):
        return "unknown"
    if labels.get(LABEL_POOL) in protected:
        return "spare"
    owner = owner_from_labels(labels)
    if owner is None:
        return "unknown"
    return "spare" if is_alive(owner) else "dead"


def _listed(
    report: ReapReport, backend: Backend, prefix: str, *, networks: bool
) -> list[MachineInfo]:
    """What the backend's answering parts list (Backend.list_answering: each podman host of a
    fleet); a part that does not answer, or a failure, is reported (nothing of it is deleted)."""
    what = f"{backend.name} {'networks' if networks else 'machines'}"
    try:
        found, unanswered = backend.list_answering(prefix, networks=networks)
    except VmPoolError as exc:
        report.errors.append(f"listing {what}: {exc}")
        return []
    report.errors.extend(f"listing {what}: {problem}" for problem in unanswered)
    return found


def _delete_network(backend: Backend, name: str, report: ReapReport) -> None:
    try:
        backend.delete_network(name)
    except VmPoolError as exc:
        report.errors.append(f"network {name}: {exc}")
        return
    report.networks_deleted.append(name)


def _delete(backend: Backend, name: str, report: ReapReport) -> bool:
    try:
        backend.delete(name)
    except VmPoolError as exc:
        report.errors.append(f"{name}: {exc}")
        return False
    report.machines_deleted.append(name)
    log.info("reaped %s", name)
    return True
