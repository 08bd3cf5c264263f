"""Telling whether a process is alive: by boot id, pid and start in clock ticks, compared
exactly; never by a wall-clock start time, which a clock step moves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from _procs import process_ref

from vmpool.backends.base import LABEL_BOOT_ID, LABEL_PID_START
from vmpool.ownership import (
    ProcessRef,
    boot_id,
    current_process,
    hostname,
    is_alive,
    owner_from_labels,
    owner_labels,
    proc_stat,
)
from vmpool.state import JsonStateDir, Machine, MachineState, Pool


def test_a_live_process_stays_alive_when_the_clock_steps(
    live_process: ProcessRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a wall-clock step moves the boot time /proc/stat reports, and with it psutil's
    # create_time() of every process; the process itself is the same one
    real = psutil._pslinux.boot_time  # type: ignore[attr-defined]
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + 1.0)
    assert is_alive(live_process)
    me = current_process()
    assert me == current_process()
    assert is_alive(me)


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    # /proc/PID/stat's second field is "(comm)", and comm is whatever the program is named
    odd = tmp_path / ") R 1 2 (x"
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "60"])
    try:
        stat = proc_stat(proc.pid)
        assert stat is not None
        state, ticks = stat
        assert state in ("R", "S", "D")
        since_boot = psutil.Process(proc.pid).create_time() - psutil.boot_time()
        assert abs(ticks - since_boot * os.sysconf("SC_CLK_TCK")) < 1.5
        assert psutil.Process(proc.pid).name() == odd.name  # the name really is that
        assert is_alive(process_ref(proc.pid))
    finally:
        proc.kill()
        proc.wait()


def test_a_process_of_an_earlier_boot_is_dead(live_process: ProcessRef) -> None:
    assert not is_alive(live_process.model_copy(update={"boot_id": "not-" + boot_id()}))


def test_a_reused_pid_is_dead_even_one_tick_apart(live_process: ProcessRef) -> None:
    assert live_process.start_ticks is not None
    assert not is_alive(
        live_process.model_copy(update={"start_ticks": live_process.start_ticks + 1})
    )


def test_labels_carry_the_identity_and_read_back_exactly() -> None:
    me = current_process()
    labels = owner_labels("vmpool-abc123", "abc123", me, "0" * 12)
    assert labels[LABEL_BOOT_ID] == boot_id()
    assert owner_from_labels(labels) == me


def test_labels_of_an_older_vmpool_are_judged_by_pid(live_process: ProcessRef) -> None:
    labels = owner_labels("vmpool-abc123", "abc123", live_process, "0" * 12)
    del labels[LABEL_BOOT_ID]
    labels[LABEL_PID_START] = "1733000000.25"  # what vmpool before schema 2 wrote
    legacy = owner_from_labels(labels)
    assert legacy == ProcessRef(host=hostname(), pid=live_process.pid)
    assert is_alive(legacy)


def test_a_schema_1_record_is_read_and_written_back_as_2(
    state_dir: JsonStateDir, live_process: ProcessRef, dead_process: ProcessRef
) -> None:
    store = state_dir.store("vmpool-abc123")
    pool = Pool(
        id="vmpool-abc123", backend="sim", size=1, session="abc123", name_prefix="vmpool",
        config_hash="0" * 12, created_at=1.0,
        machines=[Machine(name="vmpool-abc123-0", slot=0, state=MachineState.LEASED,
                          config_hash="0" * 12, created_at=1.0)],
    )  # fmt: skip
    raw = json.loads(pool.model_dump_json())
    raw["schema_version"] = 1
    raw["owner"] = {"host": hostname(), "pid": live_process.pid, "pid_start": 1733000000.25}
    raw["machines"][0]["holder"] = {
        "host": hostname(), "pid": dead_process.pid, "pid_start": 1733000000.5, "worker": "gw0",
    }  # fmt: skip
    store.path.write_text(json.dumps(raw))
    read = store.read()
    assert read is not None and read.owner is not None
    holder = read.machines[0].holder
    assert holder is not None
    assert (read.owner.boot_id, read.owner.start_ticks) == (None, None)
    assert is_alive(read.owner)
    assert not is_alive(holder)
    with store.transaction():
        pass
    assert json.loads(store.path.read_text())["schema_version"] == 2
