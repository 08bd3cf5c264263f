"""Reaping: only what a provably dead session left behind is destroyed."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmpool.backends.base import MachineSpec
from vmpool.backends.sim import SimBackend
from vmpool.ownership import ProcessRef, current_process, owner_labels
from vmpool.reaper import LITTER_AGE, ReapReport, reap, sweep_litter
from vmpool.session import SessionFile, SessionRecord
from vmpool.state import Holder, JsonStateDir, Machine, MachineState, Pool


@pytest.fixture
def sim(make_sim: Callable[..., SimBackend]) -> SimBackend:
    return make_sim()


def machine_of(sim: SimBackend, pool_id: str, owner: ProcessRef | None, serial: int) -> str:
    name = f"{pool_id}-{serial}"
    labels = owner_labels(pool_id, pool_id.split("-")[1], owner, "h1") if owner else {}
    sim.create(MachineSpec(name=name, labels=labels, index=serial, network=None))
    sim.start(name)
    return name


def session(
    state_dir: JsonStateDir,
    sim: SimBackend,
    pool_id: str,
    owner: ProcessRef | None,
    machines: int = 2,
    *,
    keep: bool = False,
    labels_owner: ProcessRef | None = None,
) -> list[str]:
    """A pool file (owned by ``owner``) and its machines on the sim backend."""
    names = [machine_of(sim, pool_id, labels_owner or owner, i) for i in range(machines)]
    network = f"{pool_id}-net"
    sim.create_network(
        network,
        owner_labels(pool_id, "s", labels_owner or owner, "h1") if (labels_owner or owner) else {},
    )
    state_dir.store(pool_id).create(
        Pool(
            id=pool_id,
            backend="sim",
            size=machines,
            session=pool_id.split("-")[1],
            name_prefix=pool_id.split("-")[0],
            config_hash="h1",
            owner=owner,
            keep=keep,
            network=network,
            created_at=1.0,
            machines=[
                Machine(name=n, slot=i, state=MachineState.READY, config_hash="h1", created_at=1.0)
                for i, n in enumerate(names)
            ],
        )
    )
    return names


def on_backend(sim: SimBackend) -> set[str]:
    return {m.name for m in sim.list("")}


def test_dead_sessions_machines_network_and_pool_file_are_removed(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef
) -> None:
    names = session(state_dir, sim, "vmpool-dead01", dead_process)
    report = reap(state_dir, sim, "vmpool")
    assert sorted(report.machines_deleted) == names
    assert report.pools_removed == ["vmpool-dead01"]
    assert report.networks_deleted == ["vmpool-dead01-net"]
    assert on_backend(sim) == set()
    assert sim.list_networks("") == []
    assert state_dir.pool_ids() == []
    assert report.errors == []


def test_machines_labelled_with_a_dead_owner_are_removed_without_a_pool_file(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef
) -> None:
    orphan = machine_of(sim, "vmpool-gone01", dead_process, 0)
    report = reap(state_dir, sim, "vmpool")
    assert report.machines_deleted == [orphan]
    assert on_backend(sim) == set()


def test_live_sessions_machines_are_spared_though_they_share_the_prefix(
    state_dir: JsonStateDir,
    sim: SimBackend,
    dead_process: ProcessRef,
    live_process: ProcessRef,
) -> None:
    dead = session(state_dir, sim, "vmpool-dead01", dead_process)
    live = session(state_dir, sim, "vmpool-live01", live_process)
    report = reap(state_dir, sim, "vmpool")
    assert sorted(report.machines_deleted) == dead
    assert sorted(report.spared) == live
    assert on_backend(sim) == set(live)
    assert state_dir.pool_ids() == ["vmpool-live01"]
    assert [n.name for n in sim.list_networks("")] == ["vmpool-live01-net"]


def test_live_owners_machines_are_spared_without_a_pool_file(
    state_dir: JsonStateDir, sim: SimBackend, live_process: ProcessRef
) -> None:
    name = machine_of(sim, "vmpool-live02", live_process, 0)
    report = reap(state_dir, sim, "vmpool")
    assert report.spared == [name]
    assert on_backend(sim) == {name}


def test_pool_with_a_live_lease_holder_is_spared_though_its_owner_died(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef, live_process: ProcessRef
) -> None:
    names = session(state_dir, sim, "vmpool-busy01", dead_process)
    with state_dir.store("vmpool-busy01").transaction() as pool:
        pool.machines[0].state = MachineState.LEASED
        pool.machines[0].holder = Holder(**live_process.model_dump())
    report = reap(state_dir, sim, "vmpool")
    assert sorted(report.spared) == names
    assert on_backend(sim) == set(names)


def test_kept_pool_is_spared(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef
) -> None:
    names = session(state_dir, sim, "vmpool-kept01", None, keep=True, labels_owner=dead_process)
    report = reap(state_dir, sim, "vmpool")
    assert report.machines_deleted == []
    assert sorted(report.spared) == names
    assert on_backend(sim) == set(names)
    assert state_dir.pool_ids() == ["vmpool-kept01"]
    assert [n.name for n in sim.list_networks("")] == ["vmpool-kept01-net"]


def test_machine_without_owner_labels_is_left_alone_and_reported_unknown(
    state_dir: JsonStateDir, sim: SimBackend
) -> None:
    name = machine_of(sim, "vmpool-anon01", None, 0)
    report = reap(state_dir, sim, "vmpool")
    assert report.unknown == [name]
    assert report.machines_deleted == []
    assert on_backend(sim) == {name}


def test_other_prefixes_are_not_touched(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef
) -> None:
    names = session(state_dir, sim, "other-dead01", dead_process)
    report = reap(state_dir, sim, "vmpool")
    assert report.machines_deleted == [] and report.pools_removed == []
    assert on_backend(sim) == set(names)
    assert state_dir.pool_ids() == ["other-dead01"]


def test_dry_run_reports_but_deletes_nothing(
    state_dir: JsonStateDir, sim: SimBackend, dead_process: ProcessRef
) -> None:
    names = session(state_dir, sim, "vmpool-dead01", dead_process)
    orphan = machine_of(sim, "vmpool-gone01", dead_process, 0)
    report = reap(state_dir, sim, "vmpool", dry_run=True)
    assert sorted(report.machines_deleted) == sorted([*names, orphan])
    assert report.pools_removed == ["vmpool-dead01"]
    assert on_backend(sim) == {*names, orphan}
    assert state_dir.pool_ids() == ["vmpool-dead01"]
    assert [n.name for n in sim.list_networks("")] == ["vmpool-dead01-net"]


def test_unreadable_pool_file_is_reported_and_its_machines_judged_by_labels(
    state_dir: JsonStateDir, sim: SimBackend, live_process: ProcessRef, dead_process: ProcessRef
) -> None:
    live = session(state_dir, sim, "vmpool-live01", live_process)
    (state_dir.path / "vmpool-live01.json").write_text("{not json")
    report = reap(state_dir, sim, "vmpool")
    assert len(report.errors) == 1 and "corrupt state file" in report.errors[0]
    assert sorted(report.spared) == live
    assert state_dir.pool_ids() == ["vmpool-live01"]


def test_gc_sweeps_litter_of_dead_sessions_but_not_of_live_ones(
    tmp_path: Path, dead_process: ProcessRef
) -> None:
    d = JsonStateDir(tmp_path / "state")
    stale = time.time() - LITTER_AGE - 5
    for name in ("gone-pool.lock", "gone-pool.waits", ".gone-pool.x.tmp"):
        (d.path / name).write_text("")
        os.utime(d.path / name, (stale, stale))
    (d.path / "fresh-pool.lock").write_text("")  # young: a creator may hold it right now
    dead_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead_server.bind(str(d.path / "gone-pool.sock"))  # its controller was killed: nobody answers
    dead_server.close()
    live_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live_server.bind(str(d.path / "live-pool.sock"))
    live_server.listen(1)
    SessionFile(d.path, "deadsn").write(SessionRecord(session="deadsn", owner=dead_process))
    SessionFile(d.path, "livesn").write(SessionRecord(session="livesn", owner=current_process()))

    dry = ReapReport()
    sweep_litter(d, dry, dry_run=True)
    assert (d.path / "gone-pool.lock").exists()
    report = ReapReport()
    sweep_litter(d, report, dry_run=False)
    assert sorted(report.files_removed) == sorted(dry.files_removed)
    left = sorted(p.name for p in d.path.iterdir())
    live_server.close()
    assert left == ["fresh-pool.lock", "live-pool.sock", "livesn.session"]
