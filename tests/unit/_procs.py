"""Helpers for tests that need real processes (a name of its own: every test dir has a conftest)."""

from __future__ import annotations

from vmpool.ownership import ProcessRef, boot_id, hostname, proc_stat


def process_ref(pid: int) -> ProcessRef:
    """``pid`` as vmpool identifies it (running, or a zombie not yet waited for)."""
    stat = proc_stat(pid)
    assert stat is not None, f"no process {pid}"
    return ProcessRef(host=hostname(), pid=pid, boot_id=boot_id(), start_ticks=stat[1])
