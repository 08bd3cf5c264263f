"""A wall-clock step in the middle of a run (NTP, a VM resumed, an admin's `date -s`) makes no
live process look dead: no lease is reclaimed, no machine is used by two tests at once, and
`vmpool gc` run meanwhile spares the live session. The step is simulated by _clockstep, which
shifts the boot time psutil computes process start times from, as a real step does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import _clockstep
from ._harness import ChaosRun, child_env, kill_group

#: a real session across a clock step: outside the fast loop (`pytest -m "not slow"`), in .ci/run
pytestmark = pytest.mark.slow

_TESTS = 24

#: a test that holds its lease until the test has run `vmpool gc`: the session is live meanwhile
_HOLDER = """
import time
from pathlib import Path


def test_holds_a_lease_across_the_step_and_gc(held):
    deadline = time.monotonic() + 120
    while not Path({done!r}).exists():
        assert time.monotonic() < deadline, "gc never ran"
        time.sleep(0.05)
    assert held.exec(["true"]).returncode == 0
"""


def _started(progress: Path) -> int:
    return len(list(progress.iterdir()))


def _wait_started(progress: Path, count: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while _started(progress) < count:
        assert proc.poll() is None, "the session ended before the clock step"
        assert time.monotonic() < deadline, f"fewer than {count} tests started within 120s"
        time.sleep(0.05)


def test_a_clock_step_mid_run_reclaims_no_live_lease_and_gc_spares_the_session(
    tmp_path: Path,
) -> None:
    run = ChaosRun(tmp_path, workers=4, tests=_TESTS)
    # failure_policy=reset: a machine reclaimed from a live test goes straight to another one
    suite = run.write_suite(
        "clock-step", "sim", size=4, policy="reset", failure="reset", sleep=(0.2, 0.5)
    )
    shutil.copy(Path(_clockstep.__file__), suite / "_clockstep.py")
    with open(suite / "conftest.py", "a") as fh:
        fh.write("\nimport _clockstep\n\n_clockstep.install()\n")
    step = tmp_path / "step-seconds"
    gc_done = tmp_path / "gc-done"
    (suite / "test_holder.py").write_text(_HOLDER.format(done=str(gc_done)))
    env = {**child_env(), _clockstep.ENV: str(step)}

    started = time.monotonic()
    proc, log = run.launch(suite, workers=4, env=env)
    try:
        _wait_started(suite / "progress", 4, proc)
        step.write_text("1.0")  # the clock jumps one second ahead, for every process of the run
        _wait_started(suite / "progress", 8, proc)
        before = sorted(p.name for p in run.state.glob("*.json")) + sorted(
            p.name for p in run.state.glob("*.session")
        )
        gc = subprocess.run(
            [sys.executable, "-c", _clockstep.CLI, "gc", "--config", str(run.pool_toml("sim")),
             "--state-dir", str(run.state), "--backend", "sim"],
            cwd=suite, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        after = sorted(p.name for p in run.state.glob("*.json")) + sorted(
            p.name for p in run.state.glob("*.session")
        )
        gc_done.touch()
        outcome = run.finish(proc, log, started, timeout=240.0)
    finally:
        gc_done.touch()
        if proc.poll() is None:  # a check above failed: do not leave the session running
            kill_group(proc.pid)
            proc.wait()
        run.cleanup()
    text = log.read_text(errors="replace")
    assert gc.returncode == 0, gc.stderr
    assert "deleted" not in gc.stdout, f"gc reaped part of the live session:\n{gc.stdout}"
    assert any(n.endswith(".session") for n in before), before
    assert after == before, "gc removed records of the live session"
    assert not list(run.collisions.iterdir()), [p.read_text() for p in run.collisions.iterdir()]
    assert not outcome.unexpected, f"{outcome.unexpected}\n{outcome.output_tail}"
    assert outcome.passed == _TESTS + 1, outcome.output_tail
    assert outcome.failed == 1, outcome.output_tail  # test_fails_on_purpose
    reclaimed = re.findall(r"reclaimed (\d+)", text)
    assert reclaimed == ["0"], f"live leases reclaimed: {reclaimed}\n{outcome.output_tail}"
