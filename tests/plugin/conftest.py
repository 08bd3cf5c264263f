"""The harness for the plugin's acceptance tests: run pytest in a subprocess on the sim backend.

Every run gets ``--vm-backend sim --vm-state-dir <tmp>/state`` so what the backend holds
afterwards (``<state>/sim/machines``, the ``creates`` counter) and the pool files can be
inspected; ``Harness`` reads them and parses the end-of-run summary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: keep subprocess runs quick: no cache writes, and skip plugins we do not exercise
#: (hypothesis' alone costs seconds per xdist worker on a loaded machine)
QUICK = ("-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest")
#: a run taking longer than this is a hang (every run here should end in well under a minute)
RUN_TIMEOUT = 120.0

_SUMMARY = re.compile(
    r"^(?P<label>\S+) on (?P<backend>\w+)(?P<adopted> \(adopted\))?: "
    r"machines created (?P<created>\d+), reset (?P<reset>\d+), replaced (?P<replaced>\d+), "
    r"broken (?P<broken>\d+), reclaimed (?P<reclaimed>\d+); check-outs (?P<checkouts>\d+)$"
)
_COUNTS = ("created", "reset", "replaced", "broken", "reclaimed", "checkouts")


@dataclass(frozen=True)
class PoolSummary:
    """One pool's line of the end-of-run summary."""

    backend: str
    adopted: bool
    created: int
    reset: int
    replaced: int
    broken: int
    reclaimed: int
    checkouts: int


class Harness:
    """Runs pytest (or the CLI) against one state directory and reports what the sim holds."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.path = pytester.path
        self.state_dir = pytester.path / "state"
        self.sim_root = self.state_dir / "sim"

    def run(self, *args: str, timeout: float = RUN_TIMEOUT) -> pytest.RunResult:
        """``pytest`` on the sim backend with our state dir, plus ``args``."""
        return self.pytester.runpytest_subprocess(
            *QUICK,
            "--vm-backend",
            "sim",
            "--vm-state-dir",
            str(self.state_dir),
            *args,
            timeout=timeout,
        )

    def popen(
        self, *args: str, python: tuple[str, ...] = ("-m", "pytest")
    ) -> subprocess.Popen[str]:
        """``pytest`` as in run(), but started in the background (output in ``stdout``);
        ``python`` replaces how the interpreter is told to run pytest."""
        return subprocess.Popen(
            [
                sys.executable,
                *python,
                *QUICK,
                "--vm-backend",
                "sim",
                "--vm-state-dir",
                str(self.state_dir),
                *args,
            ],
            cwd=self.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def cli(self, *args: str) -> pytest.RunResult:
        """``vmpool ARGS --state-dir <state>`` (ARGS start with the subcommand)."""
        return self.pytester.run(
            sys.executable,
            "-m",
            "vmpool.cli",
            *args,
            "--state-dir",
            str(self.state_dir),
            timeout=RUN_TIMEOUT,
        )

    def shared_dir(self, name: str) -> Path:
        """A directory the tests of one run share (markers, logs)."""
        d = self.path / name
        d.mkdir(exist_ok=True)
        return d

    # -- what the backend and the state directory hold ------------------------------------------
    def creates(self, root: Path | None = None) -> int:
        """How many machines the sim backend was asked to create (0 if it never was)."""
        counter = (root or self.sim_root) / "creates"
        return int(counter.read_text() or 0) if counter.exists() else 0

    def machines(self, root: Path | None = None) -> list[str]:
        """Everything under the sim's machines dir (half-deleted machines count as left over)."""
        d = (root or self.sim_root) / "machines"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def pool_files(self) -> list[str]:
        """Pool records and session records left in the state dir (lock files may stay)."""
        if not self.state_dir.is_dir():
            return []
        return sorted(p.name for p in self.state_dir.iterdir() if p.suffix in (".json", ".session"))

    def assert_nothing_left(self) -> None:
        assert self.machines() == [], "sim machines left behind"
        assert self.pool_files() == [], "pool files left behind"

    # -- output ---------------------------------------------------------------------------------
    @staticmethod
    def summaries(result: pytest.RunResult) -> dict[str, PoolSummary]:
        """The end-of-run summary lines, by label (the pool id, or the profile name)."""
        out = {}
        for line in result.outlines:
            m = _SUMMARY.match(line.strip())
            if m:
                out[m["label"]] = PoolSummary(
                    backend=m["backend"],
                    adopted=bool(m["adopted"]),
                    **{k: int(m[k]) for k in _COUNTS},
                )
        return out

    @staticmethod
    def output(result: pytest.RunResult) -> str:
        return result.stdout.str() + "\n" + result.stderr.str()


@pytest.fixture
def harness(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    # the runs must see only what a test gives them, not the developer's VMPOOL_* settings
    for name in list(os.environ):
        if name.startswith("VMPOOL_"):
            monkeypatch.delenv(name)
    yield Harness(pytester)
