"""Helpers for tests that need real processes (a name of its own: every test dir has a conftest)."""

from __future__ import annotations

import psutil

from vmpool.ownership import ProcessRef, hostname


def process_ref(pid: int) -> ProcessRef:
    return ProcessRef(host=hostname(), pid=pid, pid_start=psutil.Process(pid).create_time())
