"""Test-only hook: step the wall clock as this process sees it, by the seconds a file names.

A wall-clock step moves the boot time the kernel reports in ``/proc/stat`` (``btime`` is the
clock minus the uptime), and psutil's ``create_time()`` is that boot time plus the start in
ticks: after a step, every process looks as if it had started later or earlier. This hook
makes psutil's boot time read ``STEP`` seconds later once the file ``$VMPOOL_TEST_CLOCK_STEP``
holds ``STEP``, in the process that calls :func:`install` (the suite's conftest in the
controller and every xdist worker, and the ``vmpool gc`` wrapper below), so that a test can
step the clock of a whole run at a moment it chooses without root and without touching the
host's clock. Nothing in vmpool knows about it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VMPOOL_TEST_CLOCK_STEP"

#: ``python -c`` code that runs ``vmpool`` (the CLI) with the hook installed
CLI = (
    "import _clockstep, runpy; _clockstep.install(); "
    "runpy.run_module('vmpool.cli', run_name='__main__')"
)


def install() -> None:
    flag = os.environ.get(ENV)
    if not flag:
        return
    import psutil._pslinux as linux

    real = linux.boot_time
    path = Path(flag)

    def stepped() -> float:
        try:
            step = float(path.read_text())
        except (OSError, ValueError):
            step = 0.0
        return float(real()) + step

    linux.boot_time = stepped
