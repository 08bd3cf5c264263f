"""Chaos rounds: real `pytest -n W` sessions on one state directory, with workers (and sometimes
the controller) SIGKILLed at random moments, then reaping, gc and the checks.

What is checked, over all rounds:
- machines leaked: none of this run's machines, networks or warm images left after the final gc;
- double leases: each test holds an O_EXCL marker named after its machine while it runs; finding
  a marker whose writer is still alive means two tests held one machine at once;
- unreadable state: every ``*.json`` (and ``*.session``) in the state directory parses, sampled
  continuously while sessions run and checked again at the end.

Every run uses its own ``name_prefix`` so nothing outside it is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmpool.errors import StateError
from vmpool.state import JsonStateDir

#: fast but non-zero latencies, so kills land in the middle of backend calls
SIM_LATENCIES = {
    "create_latency": 0.05,
    "start_latency": 0.05,
    "ready_latency": 0.1,
    "exec_latency": 0.01,
    "reset_latency": 0.1,
    "delete_latency": 0.05,
}
_ALPHABET = string.ascii_lowercase + string.digits
#: an xdist worker (execnet popen gateway) as it appears in its command line
_WORKER_MARK = "exec(eval(sys.stdin.readline()))"
_IMAGE = "localhost/vmpool-busybox:latest"
_WARM_REPO = "localhost/vmpool-warm"


def unique_prefix(stem: str = "chaos") -> str:
    return stem + "".join(secrets.choice(_ALPHABET) for _ in range(6))


def podman_usable() -> str | None:
    """None when podman and vmpool's busybox image are there, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    res = subprocess.run(
        ["podman", "image", "exists", _IMAGE], capture_output=True, timeout=60, check=False
    )
    if res.returncode != 0:
        return f"no {_IMAGE}: run `vmpool image build --backend podman`"
    return None


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMPOOL_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# -- the suite each session runs -----------------------------------------------------------

_CONFTEST = '''
import os
import time
from pathlib import Path

import pytest

MARKERS = Path({markers!r})
COLLISIONS = Path({collisions!r})
STALE = Path({stale!r})
PROGRESS = Path({progress!r})


def _stat(pid):
    """(state, start in clock ticks since boot) of ``pid`` from /proc/PID/stat, or None.

    The start in ticks never changes, whatever the wall clock does; the comm field before it
    is in parentheses and may hold spaces and parentheses itself: split after the last ')'."""
    try:
        with open(f"/proc/{{pid}}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def _alive(owner):
    """Is the test that wrote ``owner`` ("pid start_ticks") still running?"""
    try:
        pid, started = owner.split()
        pid, started = int(pid), int(started)
    except ValueError:
        return True  # empty or partial: a claimer is writing it right now
    stat = _stat(pid)
    # a SIGKILLed worker stays a zombie until xdist reaps it: it is dead
    return stat is not None and stat[1] == started and stat[0] not in ("Z", "X")


def claim(name):
    """Hold the marker of machine ``name`` for this test; None if a live test holds it."""
    path = MARKERS / name
    me = f"{{os.getpid()}} {{_stat(os.getpid())[1]}}"
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            try:
                owner = path.read_text()
            except FileNotFoundError:
                continue
            if _alive(owner):
                stamp = f"{{name}}.{{os.getpid()}}.{{time.time_ns()}}"
                (COLLISIONS / stamp).write_text(f"held by {{owner!r}}, wanted by {{me!r}}")
                return None
            # left by a test whose worker was killed: not a double lease
            (STALE / f"{{name}}.{{time.time_ns()}}").write_text(owner)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return path
    return None


@pytest.fixture
def held(pool_vm):
    (PROGRESS / f"{{os.getpid()}}-{{time.time_ns()}}").touch()
    path = claim(pool_vm.name)
    assert path is not None, f"double lease of {{pool_vm.name}}"
    yield pool_vm
    os.unlink(path)
'''

_TESTS = """
import random
import time

import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_lease(held, i):
    assert held.exec(["echo", f"t{{i}}"]).stdout.strip() == f"t{{i}}"
    time.sleep(random.uniform({sleep_min}, {sleep_max}))
    if i % 5 == 3:
        held.mark_dirty()
    assert held.exec(["sh", "-c", "echo again"]).returncode == 0
"""

_FAILING_TEST = """

def test_fails_on_purpose(held):
    held.exec(["true"])
    assert False, "exercises the failure policy"
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# -- records --------------------------------------------------------------------------------


@dataclass
class SessionOutcome:
    returncode: int | None
    duration: float
    passed: int = 0
    failed: int = 0
    crashed: int = 0
    unexpected: list[str] = field(default_factory=list)
    hung: bool = False
    output_tail: str = ""
    expected: int = 0
    xdist_aborted: bool = False
    #: (start, end) in time.monotonic() seconds
    span: tuple[float, float] = (0.0, 0.0)


@dataclass
class RoundRecord:
    number: int
    backend: str
    policy: str
    size: int
    workers_killed: int
    controller_killed: bool
    outcome: SessionOutcome
    left_after: int


@dataclass
class Totals:
    rounds: int = 0
    sessions: int = 0
    workers_killed: int = 0
    controllers_killed: int = 0
    tests_passed: int = 0
    tests_failed: int = 0
    crashed_tests: int = 0
    double_leases: int = 0
    stale_markers: int = 0
    unreadable_state_files: int = 0
    state_reads: int = 0
    machines_leaked: int = 0
    hung_sessions: int = 0
    unexpected_failures: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    gc_errors: list[str] = field(default_factory=list)
    litter: dict[str, int] = field(default_factory=dict)
    backend_files_mid_write: int = 0
    stragglers: int = 0
    xdist_aborts: int = 0
    mid_write_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"chaos totals: {self.rounds} rounds, {self.sessions} sessions, "
            f"{self.workers_killed} workers and {self.controllers_killed} controllers SIGKILLed; "
            f"tests {self.tests_passed} passed, {self.tests_failed} failed "
            f"({self.crashed_tests} on killed workers, {len(self.unexpected_failures)} "
            f"unexpected), {self.hung_sessions} hung sessions, {self.xdist_aborts} aborted by "
            f"xdist (worker killed while bootstrapping); "
            f"machines leaked {self.machines_leaked}, double leases {self.double_leases} "
            f"(stale markers of killed tests taken over: {self.stale_markers}), "
            f"unreadable state files {self.unreadable_state_files} "
            f"(of {self.state_reads} reads; backend files caught mid-write "
            f"{self.backend_files_mid_write}); stragglers killed {self.stragglers}; "
            f"state-dir litter {self.litter}"
        )


# -- one chaos run ---------------------------------------------------------------------------


class ChaosRun:
    """A state directory, a prefix and a marker directory shared by every session of the run."""

    def __init__(
        self,
        base: Path,
        *,
        workers: int = 4,
        tests: int = 16,
        seed: int | None = None,
        log: Any = None,
    ) -> None:
        self.base = Path(base)
        self.prefix = unique_prefix()
        self.state = self.base / "state"
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.markers = self.base / "markers"
        self.collisions = self.base / "collisions"
        self.stale = self.base / "stale"
        for d in (self.markers, self.collisions, self.stale):
            d.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.tests = tests
        self.rng = random.Random(seed)
        self.totals = Totals()
        self.rounds: list[RoundRecord] = []
        self.backends_used: set[str] = set()
        self._log = log or (lambda msg: print(msg, flush=True))
        self._sessions = 0

    # -- writing suites ----------------------------------------------------------------------
    def config_tables(
        self, backend: str, *, size: int | None, policy: str, failure: str = "replace"
    ) -> dict[str, dict[str, Any]]:
        return {
            "pool": {
                "backend": backend,
                "name_prefix": self.prefix,
                "state_dir": str(self.state),
                **({"size": size} if size else {}),
                "checkin_policy": policy,
                "failure_policy": failure,
                "checkout_timeout": 90.0,
                "ready_timeout": 60.0,
                "teardown_timeout": 20.0,
                "backoff": 0.1,
                "backoff_max": 1.0,
            },
            "sim": SIM_LATENCIES,
        }

    def write_suite(
        self,
        name: str,
        backend: str,
        *,
        size: int | None,
        policy: str,
        failure: str = "replace",
        tests: int | None = None,
        sleep: tuple[float, float] = (0.05, 0.4),
        fail_on_purpose: bool = True,
    ) -> Path:
        suite = self.base / name
        if suite.exists():
            shutil.rmtree(suite)
        (suite / "progress").mkdir(parents=True)
        (suite / "pytest.ini").write_text(
            "[pytest]\naddopts = -p no:cacheprovider -p no:benchmark -p no:hypothesispytest -rfE\n"
        )
        tables = self.config_tables(backend, size=size, policy=policy, failure=failure)
        lines = []
        for table, keys in tables.items():
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        (suite / "pool.toml").write_text("\n".join(lines) + "\n")
        (suite / "conftest.py").write_text(
            _CONFTEST.format(
                markers=str(self.markers),
                collisions=str(self.collisions),
                stale=str(self.stale),
                progress=str(suite / "progress"),
            )
        )
        body = _TESTS.format(tests=tests or self.tests, sleep_min=sleep[0], sleep_max=sleep[1])
        (suite / "test_chaos_suite.py").write_text(
            body + (_FAILING_TEST if fail_on_purpose else "")
        )
        self.backends_used.add(backend)
        return suite

    def pool_toml(self, backend: str) -> Path:
        path = self.base / f"gc-{backend}.toml"
        tables = self.config_tables(backend, size=None, policy="reset")
        lines = []
        for table, keys in tables.items():
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- running sessions --------------------------------------------------------------------
    def launch(
        self, suite: Path, workers: int | None = None, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        self._sessions += 1
        log = suite / f"session-{self._sessions}.log"
        fh = open(log, "wb")  # noqa: SIM115 - handed to the child, closed in finish()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-n", str(workers or self.workers), "."],
            cwd=suite,
            env=env or child_env(),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        return proc, log

    def finish(
        self, proc: subprocess.Popen[bytes], log: Path, started: float, timeout: float
    ) -> SessionOutcome:
        hung = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            kill_group(proc.pid)
            proc.wait()
        duration = time.monotonic() - started
        text = log.read_text(errors="replace")
        return parse_outcome(text, proc.returncode, duration, hung)

    def run_round(self, backend: str, *, kill_workers: int, kill_controller: bool) -> RoundRecord:
        number = len(self.rounds) + 1
        policy = self.rng.choice(["reuse", "reset", "replace"])
        failure = self.rng.choice(["replace", "reset"])
        size = self.rng.choice([2, 3, self.workers])
        tests = self.tests if backend == "sim" else max(self.tests * 3 // 4, 4)
        suite = self.write_suite(
            f"round-{number:03d}", backend, size=size, policy=policy, failure=failure, tests=tests
        )
        started = time.monotonic()
        proc, log = self.launch(suite)
        killer = _Killer(
            proc, self.rng, suite / "progress", tests + 1, kill_workers, kill_controller
        )
        with self.sample_state():
            killer.start()
            outcome = self.finish(proc, log, started, timeout=240.0)
            killer.stop()
            if killer.controller_killed:
                # orphaned workers notice their controller is gone; make sure, then wait
                time.sleep(1.0)
                kill_group(proc.pid)
        record = RoundRecord(
            number=number,
            backend=backend,
            policy=f"{policy}/{failure}",
            size=size,
            workers_killed=killer.killed,
            controller_killed=killer.controller_killed,
            outcome=outcome,
            left_after=len(self.machines(backend)),
        )
        self.rounds.append(record)
        t = self.totals
        t.rounds += 1
        t.sessions += 1
        t.workers_killed += killer.killed
        t.controllers_killed += int(killer.controller_killed)
        self._count(outcome, tolerate_crash=bool(killer.killed or killer.controller_killed))
        self._log(
            f"round {number} [{backend}, {policy}/{failure}, size {size}]: "
            f"{killer.killed} worker(s) killed{', controller killed' if killer.controller_killed else ''}; "  # noqa: E501
            f"rc={outcome.returncode} passed={outcome.passed} failed={outcome.failed} "
            f"crashed={outcome.crashed} in {outcome.duration:.1f}s; "
            f"{record.left_after} machine(s) left until the next session reaps"
        )
        return record

    def _count(self, outcome: SessionOutcome, *, tolerate_crash: bool) -> None:
        t = self.totals
        t.tests_passed += outcome.passed
        t.tests_failed += outcome.failed
        t.crashed_tests += outcome.crashed
        t.hung_sessions += int(outcome.hung)
        t.xdist_aborts += int(outcome.xdist_aborted)
        t.unexpected_failures += outcome.unexpected
        if outcome.crashed and not tolerate_crash:
            t.unexpected_failures.append(f"{outcome.crashed} crash(es) with nothing killed")

    def run_concurrent(
        self, backend: str, sessions: int, *, stagger: float = 1.0, tests: int | None = None
    ) -> list[SessionOutcome]:
        """``sessions`` pytest sessions at once on the same state dir, prefix and backend,
        started ``stagger`` seconds apart at most; each outcome's ``expected`` is its test count."""
        counts = [max((tests or self.tests) + self.rng.randint(-3, 3), 2) for _ in range(sessions)]
        suites = [
            self.write_suite(
                f"concurrent-{self._sessions + 1}-{k}",
                backend,
                size=self.rng.choice([2, 3]),
                policy=self.rng.choice(["reuse", "reset", "replace"]),
                tests=counts[k],
                fail_on_purpose=False,
            )
            for k in range(sessions)
        ]
        running = []
        with self.sample_state():
            for suite in suites:
                running.append((*self.launch(suite, workers=2), time.monotonic()))
                time.sleep(self.rng.uniform(0.0, stagger))
            outcomes = [self.finish(p, log, t0, timeout=240.0) for p, log, t0 in running]
        for o, expected, (_p, _log, t0) in zip(outcomes, counts, running, strict=True):
            o.expected = expected
            o.span = (t0, t0 + o.duration)
            self.totals.sessions += 1
            self._count(o, tolerate_crash=False)
        return outcomes

    # -- checks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sample_state(self, interval: float = 0.02) -> Iterator[None]:
        """Parse every state file over and over while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.check_state_files()
                stop.wait(interval)

        thread = threading.Thread(target=loop, name="chaos-state-sampler", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def check_state_files(self, *, final: bool = False) -> list[str]:
        """Parse vmpool's own state files (pool records, session records) and every other
        ``*.json`` below the state directory; returns the unreadable ones.

        While sessions run, a backend's own files (below ``sim/``, ``podman/``) may be caught
        half-written by a non-atomic write: those are counted apart, as
        ``backend_files_mid_write``; at the end (``final``) they must parse like the rest.
        """
        bad: list[str] = []
        directory = JsonStateDir(self.state)
        for path in _walk(self.state):
            own = path.parent == self.state
            wanted = path.suffix == ".json" or (own and path.suffix == ".session")
            if path.name.startswith(".") or not wanted:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # removed between listing and reading: fine
            self.totals.state_reads += 1
            try:
                json.loads(data)
                if own and path.suffix == ".json":
                    directory.store(path.stem)._parse(data)
            except (ValueError, StateError) as exc:
                problem = f"{path.relative_to(self.state)}: {exc}"[:300]
                if own or final:
                    bad.append(problem)
                else:
                    self.totals.backend_files_mid_write += 1
                    if problem not in self.totals.mid_write_examples[:5]:
                        self.totals.mid_write_examples.append(problem)
        if bad:
            self.totals.unreadable_state_files += len(bad)
            self.totals.unreadable += bad
        return bad

    def machines(self, backend: str) -> list[str]:
        """Everything of this run's prefix still on ``backend``."""
        if backend == "sim":
            root = self.state / "sim"
            found = [
                f"sim machine {d.name}"
                for d in sorted((root / "machines").glob(f"{self.prefix}-*"))
            ]
            found += [
                f"sim network {n.stem}"
                for n in sorted((root / "networks").glob(f"{self.prefix}-*"))
            ]
            return found
        if backend == "podman":
            return podman_leftovers(self.prefix)
        return []

    def stragglers(self) -> list[psutil.Process]:
        """Processes of this run still alive: pytest sessions and workers (by working directory
        or command line) and backend commands naming our machines (by command line)."""
        base, me = str(self.base), os.getpid()
        out = []
        for p in psutil.process_iter(["pid", "name", "cmdline", "cwd"]):
            with contextlib.suppress(psutil.Error):
                name = p.info["name"] or ""
                if p.info["pid"] == me or not (name.startswith("python") or name == "podman"):
                    continue  # never conmon or a container's own processes
                cmd = " ".join(p.info["cmdline"] or [])
                if (p.info["cwd"] or "").startswith(base) or base in cmd or self.prefix in cmd:
                    out.append(p)
        return out

    def wait_for_quiet(self, timeout: float = 60.0) -> list[psutil.Process]:
        """Wait until no process of this run is left; returns those still running."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.stragglers()
            if not busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.2)

    def final_gc(self) -> None:
        """After the last round: let stragglers finish, `vmpool gc`, then count what is left."""
        busy = self.wait_for_quiet()
        if busy:
            self._log(f"still running after 60s: {[(p.pid, p.info['cmdline']) for p in busy]}")
            self.totals.stragglers = len(busy)
            for p in busy:
                if p.info["name"] != "podman":  # killing podman mid-operation harms its store
                    with contextlib.suppress(psutil.Error):
                        p.kill()
        for backend in sorted(self.backends_used):
            res = subprocess.run(
                [
                    sys.executable, "-m", "vmpool.cli", "gc",
                    "--config", str(self.pool_toml(backend)),
                    "--state-dir", str(self.state),
                    "--backend", backend,
                ],
                capture_output=True, text=True, timeout=300, env=child_env(), check=False,
            )  # fmt: skip
            if res.returncode != 0:
                self.totals.gc_errors.append(f"{backend}: rc={res.returncode}: {res.stderr[-500:]}")
            left = self.machines(backend)
            self.totals.leaked += left
            self.totals.machines_leaked += len(left)
        self.check_state_files(final=True)
        self.totals.double_leases = len(list(self.collisions.iterdir()))
        self.totals.stale_markers = len(list(self.stale.iterdir()))
        self.totals.litter = state_litter(self.state)

    def report(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "state_dir": str(self.state),
            "totals": asdict(self.totals),
            "rounds": [asdict(r) for r in self.rounds],
        }

    def cleanup(self) -> None:
        """Belt and braces: remove anything of this prefix whatever the checks said."""
        if "podman" in self.backends_used:
            podman_remove(self.prefix)


# -- helpers --------------------------------------------------------------------------------


class _Killer(threading.Thread):
    """SIGKILLs ``count`` random xdist workers (and maybe the controller) at random moments.

    Moments are drawn in test progress, not seconds, so they spread over a session however
    loaded the host is: "when k tests have started" for k in 0..tests (0: during start-up and
    collection), plus for the controller "a moment after the last test started" (teardown).
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        rng: random.Random,
        progress: Path,
        tests: int,
        count: int,
        controller: bool,
    ) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.proc = proc
        self.progress = progress
        self.plan: list[tuple[int, float, str]] = [
            (rng.randint(0, tests - 1), rng.uniform(0.0, 1.0), "worker") for _ in range(count)
        ]
        if controller:
            # after the planned worker kills, so that those happen too
            after = max((k for k, _d, _w in self.plan), default=0)
            self.plan.append((rng.randint(after, tests), rng.uniform(1.0, 2.5), "controller"))
        self.plan.sort()
        self.rng = rng
        self.killed = 0
        self.controller_killed = False
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _tests_started(self) -> int:
        try:
            return len(os.listdir(self.progress))
        except FileNotFoundError:
            return 0

    def run(self) -> None:
        for after, delay, kind in self.plan:
            while self._tests_started() < after:
                if self._halt.wait(0.02) or self.proc.poll() is not None:
                    return
            if self._halt.wait(delay) or self.proc.poll() is not None:
                return
            if kind == "controller":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.controller_killed = True
                return
            # workers may still be starting: try for a moment
            for _ in range(100):
                victims = workers_of(self.proc.pid)
                if victims:
                    with contextlib.suppress(psutil.Error):
                        self.rng.choice(victims).send_signal(signal.SIGKILL)
                        self.killed += 1
                    break
                if self._halt.wait(0.05) or self.proc.poll() is not None:
                    return


def workers_of(pid: int) -> list[psutil.Process]:
    """The xdist workers of the pytest process ``pid`` (its execnet children)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if _WORKER_MARK in " ".join(child.cmdline()):
                out.append(child)
    return out


def _walk(root: Path) -> Iterator[Path]:
    """Files below ``root``; directories vanishing meanwhile are skipped (os.walk ignores)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            yield Path(folder) / name


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def parse_outcome(text: str, returncode: int | None, duration: float, hung: bool) -> SessionOutcome:
    lines = text.rstrip().splitlines()
    tail = lines[-1] if lines else ""
    out = SessionOutcome(returncode, duration, hung=hung, output_tail="\n".join(lines[-25:]))
    import re

    for key in ("passed", "failed"):
        m = re.search(rf"(\d+) {key}", tail)
        if m:
            setattr(out, key, int(m.group(1)))
    internal = [line for line in lines if line.startswith("INTERNALERROR>")]
    if internal:
        if any(
            "gateway_bootstrap" in line
            or ("connection already closed" in line and "<Gateway" in line)
            for line in internal
        ):
            # a worker killed while execnet was still bootstrapping it (or before xdist had
            # sent it its first message): xdist gives up the session (its limitation); vmpool
            # still has to clean up after it
            out.xdist_aborted = True
        else:
            out.unexpected.append("INTERNALERROR: " + internal[-1][:300])
    for line in lines:
        if not line.startswith(("FAILED ", "ERROR ")):
            continue
        if "crashed" in line or "node down" in line:
            out.crashed += 1
        elif "test_fails_on_purpose" in line and line.startswith("FAILED "):
            continue
        else:
            out.unexpected.append(line[:300])
    return out


def podman_leftovers(prefix: str) -> list[str]:
    found = []
    for kind, argv in (
        ("container", ["podman", "ps", "-a", "--filter", f"name=^{prefix}", "--format",
                       "{{.Names}}"]),
        ("image", ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]),
        ("network", ["podman", "network", "ls", "--format", "{{.Name}}"]),
    ):  # fmt: skip
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        for line in res.stdout.split():
            name = line.strip()
            if kind == "image" and not name.startswith(f"{_WARM_REPO}/{prefix}-"):
                continue
            if kind == "network" and not name.startswith(f"{prefix}-"):
                continue
            found.append(f"podman {kind} {name}")
    return found


def podman_remove(prefix: str) -> None:
    for item in podman_leftovers(prefix):
        _tool, kind, name = item.split(" ", 2)
        argv = {
            "container": ["podman", "rm", "-f", name],
            "image": ["podman", "rmi", "-f", name],
            "network": ["podman", "network", "rm", "-f", name],
        }[kind]
        subprocess.run(argv, capture_output=True, timeout=120, check=False)


def state_litter(state: Path) -> dict[str, int]:
    """Files left in the state directory once every pool is gone, by kind."""
    out: dict[str, int] = {}
    for f in state.iterdir():
        if f.is_dir():
            continue
        kind = f.name.rsplit(".", 1)[-1] if "." in f.name else f.name
        out[kind] = out.get(kind, 0) + 1
    return out


def run_chaos(
    base: Path,
    *,
    rounds: int,
    backends: Sequence[str],
    workers: int = 4,
    tests: int = 16,
    seed: int | None = None,
    controller_every: int = 3,
    log: Any = None,
) -> ChaosRun:
    """``rounds`` rounds cycling through ``backends``; every ``controller_every``-th round
    (and at random otherwise, 1 in 5) the controller is killed too. Ends with gc and checks."""
    run = ChaosRun(base, workers=workers, tests=tests, seed=seed, log=log)
    try:
        for i in range(rounds):
            backend = backends[i % len(backends)]
            kill_controller = (i % controller_every == controller_every - 1) or (
                run.rng.random() < 0.2
            )
            run.run_round(
                backend, kill_workers=run.rng.choice([1, 1, 2]), kill_controller=kill_controller
            )
        # one clean session per backend: its start-reap must take what the kills left
        for backend in sorted(set(backends)):
            run.run_round(backend, kill_workers=0, kill_controller=False)
        run.final_gc()
    finally:
        run.cleanup()
    return run
