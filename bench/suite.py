"""Whole-suite benchmark: one test suite, run as real `pytest -n W` subprocesses, several ways.

    python -m bench.suite --backend sim            # latencies modelled on podman (see _common)
    python -m bench.suite --backend podman
    python -m bench.suite --backend qemu --tests 8 [--qemu-warmup boot]
    python -m bench.suite --ways b,reuse,d --json out.json

Ways (each test runs `echo hello` in its machine):
  a        per-test fixture: create, sleep 5, start, sleep 5, test, delete (the anti-pattern)
  b        per-test fixture: create, start, wait_ready (a real probe), test, delete
  reuse    vmpool's pool_vm, checkin_policy = "reuse"      (pool size = workers)
  reset    vmpool's pool_vm, checkin_policy = "reset"
  replace  vmpool's pool_vm, checkin_policy = "replace"
  d        the same tests with no machine at all (baseline; the command runs on the host)

Every run is a real `python -m pytest -n W` subprocess timed wall-clock, launch to exit, with
vmpool's plugin loaded in all of them. With --repeat N the ways run interleaved N times and the
best (shortest) run counts: load from elsewhere only ever adds time. A way's machine overhead is
its wall time minus (d)'s. On qemu, (a) also probes readiness after its sleeps (--a-guard), as a
TCG boot can outlast them. Then, unless --no-ttft, the time-to-first-test runs: a suite slow to
collect, without machines and with the pool, to show whether warm-up overlaps collection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    SIM_MODELS,
    PytestRun,
    host_facts,
    load_backend,
    markdown_table,
    pool_tables,
    run_pytest,
    sweep,
    time_warmup,
    unique_prefix,
    write_pool_toml,
)

WAYS = ("a", "b", "reuse", "reset", "replace", "d")
LABELS = {
    "a": "(a) per-test create+sleep 5+start+sleep 5",
    "b": "(b) per-test create+start+probe",
    "reuse": "(c) vmpool pool_vm, reuse",
    "reset": "(c) vmpool pool_vm, reset",
    "replace": "(c) vmpool pool_vm, replace",
    "d": "(d) no machine (baseline)",
}
POOL_WAYS = ("reuse", "reset", "replace")

# -- the generated suite ---------------------------------------------------------------------

_TIMING = """
import json
import os
import time
from pathlib import Path

import pytest

_TIMES = Path({times!r})


def _record(kind, nodeid=""):
    row = {{"k": kind, "t": time.time(), "id": nodeid,
           "w": os.environ.get("PYTEST_XDIST_WORKER", "main")}}
    with open(_TIMES / f"{{os.getpid()}}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\\n")


def pytest_configure(config):
    _record("configure-worker" if hasattr(config, "workerinput") else "configure")


def pytest_collection_finish(session):
    _record("collected")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _record("setup", item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    _record("call", item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    _record("teardown", item.nodeid)


def pytest_runtest_logfinish(nodeid):
    _record("finish", nodeid)
"""

_PER_TEST = """
import time
import uuid

from vmpool import config as _vmconfig
from vmpool.backends import make_backend
from vmpool.backends.base import MachineSpec

_CFG = _vmconfig.load(Path({config!r}), environ={{}})
BACKEND = make_backend(_CFG.default.pool.backend, _CFG.default, Path({state!r}))
SLEEP = {sleep!r}
GUARD = {guard!r}


class Handle:
    def __init__(self, name):
        self.name = name

    def exec(self, argv):
        return BACKEND.exec(self.name, argv, 120.0)


@pytest.fixture
def vm():
    name = f"{prefix}-{{uuid.uuid4().hex[:12]}}"
    BACKEND.create(MachineSpec(name, {{"bench": "{prefix}"}}))
    try:
        if SLEEP:
            time.sleep(SLEEP)  # "give it time to be created"
        BACKEND.start(name)
        if SLEEP:
            time.sleep(SLEEP)  # "give it time to boot"
        if not SLEEP or GUARD:
            BACKEND.wait_ready(name, 300.0)
        yield Handle(name)
    finally:
        BACKEND.delete(name)
"""

_POOL = """

@pytest.fixture
def vm(pool_vm):
    return pool_vm
"""

_HOST = """
import subprocess

from vmpool.backends.base import ExecResult


class HostHandle:
    def exec(self, argv):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return ExecResult(res.returncode, res.stdout, res.stderr)


@pytest.fixture
def vm():
    return HostHandle()
"""

_TEST = """

def test_{n:03d}(vm):
    result = vm.exec(["echo", "hello"])
    assert result.returncode == 0 and result.stdout.strip() == "hello"
"""


def write_suite(
    root: Path,
    way: str,
    *,
    tests: int,
    modules: int,
    collect_delay: float,
    config: Path,
    state: Path,
    prefix: str,
    sleep: float,
    guard: bool,
) -> Path:
    """A fresh directory holding pytest.ini, conftest.py, pool.toml and the test modules."""
    suite = root / f"suite-{way}{'-slow' if collect_delay else ''}"
    if suite.exists():
        shutil.rmtree(suite)
    (suite / "times").mkdir(parents=True)
    (suite / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider -p no:benchmark -p no:hypothesispytest\n"
    )
    conftest = _TIMING.format(times=str(suite / "times"))
    # every way runs with vmpool's plugin loaded (as it is wherever vmpool is installed) and
    # a pool.toml pointing it at our state directory; only the pool ways lease machines
    shutil.copy(
        config.with_name(f"pool-{way if way in POOL_WAYS else 'b'}.toml"), suite / "pool.toml"
    )
    if way in POOL_WAYS:
        conftest += _POOL
    elif way == "d":
        conftest += _HOST
    else:
        conftest += _PER_TEST.format(
            config=str(config),
            state=str(state),
            prefix=f"{prefix}-{way}",
            sleep=sleep if way == "a" else 0.0,
            guard=guard,
        )
    (suite / "conftest.py").write_text(conftest)
    per = -(-tests // modules)
    delay = collect_delay / modules
    for m in range(modules):
        numbers = range(m * per, min((m + 1) * per, tests))
        if not numbers:
            break
        head = f"import time\n\ntime.sleep({delay!r})  # slow to import\n" if delay else ""
        body = "".join(_TEST.format(n=n) for n in numbers)
        (suite / f"test_m{m:02d}.py").write_text(head + body)
    return suite


def read_times(suite: Path) -> list[dict[str, Any]]:
    rows = []
    for f in (suite / "times").glob("*.jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["t"])


# -- running ---------------------------------------------------------------------------------


def run_way(
    way: str, suite: Path, workers: int, timeout: float, pool_size: int | None = None
) -> tuple[PytestRun, list[dict[str, Any]]]:
    args = ["-n", str(workers), "-o", "console_output_style=classic", "."]
    if pool_size and way in ("reuse", "reset", "replace"):
        args[2:2] = ["--vm-pool-size", str(pool_size)]
    run = run_pytest(suite, args, timeout=timeout)
    return run, read_times(suite)


def summarise(run: PytestRun, times: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [r for r in times if r["k"] == "call"]
    at = {
        kind: {r["id"]: r["t"] for r in times if r["k"] == kind}
        for kind in ("setup", "call", "teardown", "finish")
    }
    setups = at["setup"]
    collected = [r["t"] for r in times if r["k"] == "collected"]
    configured = [r["t"] for r in times if r["k"] == "configure"]
    waits = [
        {"at": round(setups[r["id"]] - run.started, 3), "wait": round(r["t"] - setups[r["id"]], 4)}
        for r in calls
        if r["id"] in setups
    ]

    def median_phase(begin: str, end: str) -> float | None:
        spans = [at[end][i] - t for i, t in at[begin].items() if i in at[end]]
        return round(statistics.median(spans), 4) if spans else None

    phases = {
        "setup": median_phase("setup", "call"),
        "call": median_phase("call", "teardown"),
        "teardown": median_phase("teardown", "finish"),
    }
    first_ready = None
    for line in run.output.splitlines():
        if "first machine ready after " in line and configured:
            text = line.rsplit("first machine ready after ", 1)[1].rstrip("s ")
            try:
                first_ready = configured[0] + float(text) - run.started
            except ValueError:
                first_ready = None
    return {
        "wall": round(run.wall, 3),
        "returncode": run.returncode,
        "passed": run.passed,
        "failed": run.failed,
        "errors": run.errors,
        "first_collection_done": round(min(collected) - run.started, 3) if collected else None,
        "last_collection_done": round(max(collected) - run.started, 3) if collected else None,
        "first_test_call": round(calls[0]["t"] - run.started, 3) if calls else None,
        "first_machine_ready": round(first_ready, 3) if first_ready is not None else None,
        "median_phase_seconds": phases,
        "last_test_finished": round(max(at["finish"].values()) - run.started, 3)
        if at["finish"]
        else None,
        "setup_waits": waits,
    }


def warmup_time(config: Path, state: Path, size: int, timeout: float) -> dict[str, float]:
    """Warm a pool in this process (the controller alone, no pytest): first and all ready."""
    timed = time_warmup(config, state, size, timeout)
    return {"first": timed["first"], "all": timed["all"]}


def _fmt(x: float | None, unit: str = "s") -> str:
    return "n/a" if x is None else f"{x:.1f}{unit}"


def _ratio(base: float | None, value: float | None) -> str:
    if base is None or value is None:
        return "n/a"
    if value <= 0:
        return "n/a (overhead within noise)"
    return f"{base / value:.1f}x"


def results_table(ways: dict[str, dict[str, Any]]) -> str:
    overhead = {w: r.get("overhead") for w, r in ways.items()}
    rows = []
    for way, r in ways.items():
        note = (
            ""
            if r["failed"] == r["errors"] == 0 and r["returncode"] == 0
            else (f" ({r['passed']} passed, {r['failed']} failed, {r['errors']} errors)")
        )
        phases = r.get("median_phase_seconds") or {}
        handling = (
            None
            if phases.get("setup") is None or phases.get("teardown") is None
            else phases["setup"] + phases["teardown"]
        )
        rows.append(
            [
                LABELS[way] + note,
                _fmt(r["wall"]),
                "-" if handling is None else f"{handling:.3f}s",
                "-" if way == "d" else _fmt(r.get("overhead")),
                "-" if way in ("a", "d") else _ratio(overhead.get("a"), r.get("overhead")),
                "-" if way in ("b", "d") else _ratio(overhead.get("b"), r.get("overhead")),
            ]
        )
    return markdown_table(
        [
            "way",
            "wall time",
            "per-test setup+teardown (median)",
            "machine overhead",
            "overhead ratio vs (a)",
            "overhead ratio vs (b)",
        ],
        rows,
    )


def plot(path: Path, ways: dict[str, dict[str, Any]], title: str) -> str:
    """Check-out (fixture setup) wait of every test over the run; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for way, r in ways.items():
        pts = r.get("setup_waits") or []
        if way == "d" or not pts:
            continue
        ax.plot([p["at"] for p in pts], [p["wait"] for p in pts], "o", ms=3, label=LABELS[way])
    ax.set_xlabel("seconds since pytest started")
    ax.set_ylabel("test setup wait (s): machine check-out or creation")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot written to {path}"


# -- main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", default="sim", choices=["sim", "podman", "docker", "qemu"])
    p.add_argument("--tests", type=int, default=32, help="tests in the suite (default 32)")
    p.add_argument("-n", "--workers", type=int, default=4, help="xdist workers (default 4)")
    p.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="vmpool's pool size for the pool ways (default: -n; more gives spare machines)",
    )
    p.add_argument(
        "--ways",
        default=",".join(WAYS),
        help=f"comma-separated subset of {','.join(WAYS)} (d is always run)",
    )
    p.add_argument("--sleep", type=float, default=5.0, help="each of (a)'s two sleeps")
    p.add_argument(
        "--a-guard",
        choices=["auto", "on", "off"],
        default="auto",
        help="(a) probes readiness after its sleeps so a slow boot cannot fail the test "
        "(auto: on for qemu, whose TCG boot can outlast the sleeps)",
    )
    p.add_argument(
        "--sim-model", default="podman", choices=sorted(SIM_MODELS), help="sim latencies"
    )
    p.add_argument("--no-pre-ping", action="store_true", help="(c) with [pool] pre_ping = false")
    p.add_argument(
        "--pool-network",
        action="store_true",
        help="(c) with [pool] network = true, the configuration default: each pool makes its own "
        "private network (by default the pool ways run without one, as (a) and (b) make none)",
    )
    p.add_argument(
        "--warm-during-collection",
        action="store_true",
        help="(c) with [pool] warm_during_collection = true: machines are made from the first "
        "pool test collected, not once collection is final",
    )
    p.add_argument("--qemu-accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument(
        "--qemu-warmup",
        choices=["clone", "boot"],
        help="[qemu] warmup: clone a saved running state, or boot every machine "
        "(default: the backend's own default)",
    )
    p.add_argument(
        "--per-test-qemu-warmup",
        choices=["clone", "boot"],
        help="[qemu] warmup for (a) and (b) only: `boot` is the per-test pattern as users write "
        "it (a cold boot per test), while the pool ways keep --qemu-warmup (default: the same)",
    )
    p.add_argument("--modules", type=int, default=8, help="test modules the suite is split into")
    p.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-test runs")
    p.add_argument(
        "--collect-delay",
        type=float,
        default=4.0,
        help="time-to-first-test suite: seconds of import time, spread over the modules",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each way, interleaved; the best (shortest) is shown, all are in --json",
    )
    p.add_argument("--a-repeat", type=int, default=1, help="runs of way (a) (default 1)")
    p.add_argument(
        "--warm-repeat", type=int, default=3, help="in-process warm-ups for time-to-first-test"
    )
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--plot", type=Path, help="PNG of setup waits over the run (needs matplotlib)")
    p.add_argument("--keep-dir", action="store_true", help="keep the generated suites")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        print(f"unknown way(s) {unknown}; choose from {','.join(WAYS)}", file=sys.stderr)
        return 2
    if "d" not in ways:
        ways.append("d")
    ways = [w for w in WAYS if w in ways]
    guard = args.a_guard == "on" or (args.a_guard == "auto" and args.backend == "qemu")
    root = Path(tempfile.mkdtemp(prefix="vmpool-bench-"))
    state = root / "state"
    state.mkdir(mode=0o700)
    prefix = unique_prefix("bench")
    tables: dict[str, Any] = {}
    for way in (*POOL_WAYS, "b"):
        tables[way] = pool_tables(
            backend=args.backend,
            prefix=prefix,
            state_dir=state,
            size=args.workers,
            checkin_policy=way if way in POOL_WAYS else "reset",
            sim_model=args.sim_model,
            pre_ping=not args.no_pre_ping,
            qemu_accel=args.qemu_accel,
            qemu_warmup=args.qemu_warmup
            if way in POOL_WAYS
            else (args.per_test_qemu_warmup or args.qemu_warmup),
            network=args.pool_network and way in POOL_WAYS,
            warm_during_collection=args.warm_during_collection and way in POOL_WAYS,
        )
        write_pool_toml(root / f"pool-{way}.toml", tables[way])
    config = root / "pool-b.toml"
    _cfg, backend = load_backend(config, state)
    backend.check()  # primes the runtime/accel caches in the shared state dir, outside timing
    model = SIM_MODELS[args.sim_model] if args.backend == "sim" else None
    print(
        f"# vmpool suite benchmark: backend {args.backend}"
        + (f" (sim model {args.sim_model!r}: {model})" if model is not None else "")
        + f", {args.tests} tests, -n {args.workers}, pool size {args.pool_size or args.workers}"
        + ("" if not args.no_pre_ping else ", pre_ping off")
        + (", pool network on" if args.pool_network else "")
        + (f", qemu warmup {args.qemu_warmup}" if args.qemu_warmup else "")
        + (
            f", per-test ways' qemu warmup {args.per_test_qemu_warmup}"
            if args.per_test_qemu_warmup
            else ""
        ),
        flush=True,
    )
    timeout = 900.0 + args.tests * 60.0
    results: dict[str, dict[str, Any]] = {}
    doc: dict[str, Any] = {
        "command": ["python", "-m", "bench.suite", *(argv if argv is not None else sys.argv[1:])],
        "backend": args.backend,
        "sim_model": {args.sim_model: model} if model is not None else None,
        "tests": args.tests,
        "workers": args.workers,
        "pool_size": args.pool_size or args.workers,
        "pre_ping": not args.no_pre_ping,
        "pool_network": args.pool_network,
        "qemu_warmup": args.qemu_warmup,
        "per_test_qemu_warmup": args.per_test_qemu_warmup,
        "a_sleep": args.sleep,
        "a_guard": guard,
        "repeat": args.repeat,
        "a_repeat": args.a_repeat,
        "statistic": "best (minimum) wall time of the repeats; overhead = best(way) - best(d)",
        "host": host_facts(),
        "ways": results,
    }
    try:
        runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
        for rep in range(args.repeat):
            # interleaved, so a burst of load from elsewhere hits every way alike
            for way in ways:
                if way == "a" and rep >= args.a_repeat:
                    continue  # (a) is long and its overhead dwarfs the noise
                suite = write_suite(
                    root,
                    way,
                    tests=args.tests,
                    modules=args.modules,
                    collect_delay=0.0,
                    config=config,
                    state=state,
                    prefix=prefix,
                    sleep=args.sleep,
                    guard=guard,
                )
                label = LABELS[way] + (f" [run {rep + 1}]" if args.repeat > 1 else "")
                print(f"  running {label} ...", end="", flush=True)
                run, times = run_way(way, suite, args.workers, timeout, args.pool_size)
                runs[way].append(summarise(run, times))
                print(f" {run.wall:.1f}s ({run.passed} passed)", flush=True)
                if run.returncode != 0:
                    print(textwrap.indent(run.output[-3000:], "    | "), file=sys.stderr)
                leaked = sweep(backend, prefix)
                if leaked:
                    print(f"    swept {len(leaked)} leftover machine(s): {leaked}", file=sys.stderr)
        for way, summaries in runs.items():
            walls = [r["wall"] for r in summaries]
            # the best run: load from elsewhere on the host only ever adds time
            best = min(summaries, key=lambda r: r["wall"])
            results[way] = {
                **best,
                "wall": round(min(walls), 3),
                "wall_median": round(statistics.median(walls), 3),
                "walls": walls,
            }
            for key in ("passed", "failed", "errors"):
                results[way][key] = (
                    min(r[key] for r in summaries)
                    if key == "passed"
                    else max(r[key] for r in summaries)
                )
            results[way]["returncode"] = max(r["returncode"] for r in summaries)
        base = results["d"]["wall"]
        for r in results.values():
            r["overhead"] = round(r["wall"] - base, 3)
        for way, r in results.items():
            for ref in ("a", "b"):
                if ref in results and way != "d":
                    o = r["overhead"]
                    r[f"ratio_vs_{ref}"] = round(results[ref]["overhead"] / o, 2) if o > 0 else None
        runs_note = f"best of {args.repeat} run(s)" + (
            f", (a) best of {min(args.a_repeat, args.repeat)}" if "a" in results else ""
        )
        print(f"\n## {args.backend}: wall time = {runs_note}; machine overhead = wall - (d)\n")
        print(results_table(results))

        if not args.no_ttft:
            doc["time_to_first_test"] = ttft(args, root, config, state, prefix, guard, timeout)
            sweep(backend, prefix)
        if args.plot:
            print("\n" + plot(args.plot, results, f"{args.backend}: test setup waits"))
    finally:
        leaked = sweep(backend, prefix)
        if leaked:
            print(f"swept {len(leaked)} leftover machine(s): {leaked}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2))
            print(f"\nmeasurements written to {args.json}")
        if args.keep_dir:
            print(f"suites kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def ttft(
    args: argparse.Namespace,
    root: Path,
    config: Path,
    state: Path,
    prefix: str,
    guard: bool,
    timeout: float,
) -> dict[str, Any]:
    """First test's start with a slow-to-collect suite: baseline, pool, and warm-up alone."""
    out: dict[str, Any] = {"collect_delay": args.collect_delay}
    for way in ("d", "reuse"):
        suite = write_suite(
            root,
            way,
            tests=args.tests,
            modules=args.modules,
            collect_delay=args.collect_delay,
            config=config,
            state=state,
            prefix=prefix,
            sleep=args.sleep,
            guard=guard,
        )
        run, times = run_way(way, suite, args.workers, timeout, args.pool_size)
        out[way] = {k: v for k, v in summarise(run, times).items() if k != "setup_waits"}
    warm = [
        warmup_time(config.with_name("pool-reuse.toml"), state, args.workers, timeout)
        for _ in range(args.warm_repeat)
    ]
    out["warmup_alone"] = {
        "first": statistics.median(w["first"] for w in warm),
        "all": statistics.median(w["all"] for w in warm),
    }
    d, c, w = out["d"], out["reuse"], out["warmup_alone"]
    serial = None if d["first_test_call"] is None else d["first_test_call"] + w["first"]
    out["serial_estimate"] = serial
    lead = None
    if c["first_machine_ready"] is not None and c["first_collection_done"] is not None:
        lead = round(c["first_collection_done"] - c["first_machine_ready"], 3)
    out["machine_ready_before_collection_done"] = lead
    rows = [
        [
            "(d) no machine",
            _fmt(d["first_collection_done"]),
            _fmt(d["last_collection_done"]),
            "-",
            _fmt(d["first_test_call"]),
        ],
        [
            "(c) vmpool pool_vm",
            _fmt(c["first_collection_done"]),
            _fmt(c["last_collection_done"]),
            _fmt(c["first_machine_ready"]),
            _fmt(c["first_test_call"]),
        ],
    ]
    print(
        f"\n## time to first test: {args.tests} tests in {args.modules} modules taking "
        f"{args.collect_delay:g}s to import, -n {args.workers} (seconds since pytest started)\n"
    )
    print(
        markdown_table(
            [
                "run",
                "first worker collected",
                "last worker collected",
                "first machine ready",
                "first test started",
            ],
            rows,
        )
    )
    overlap = (
        "n/a" if lead is None else f"{lead:.1f}s before" if lead >= 0 else f"{-lead:.1f}s after"
    )
    print(
        f"\nwarm-up alone (controller in-process, median of {args.warm_repeat}): first machine "
        f"{w['first']:.2f}s, all {args.workers} {w['all']:.2f}s. In the pool run the first "
        f"machine was ready {overlap} the first worker finished collecting. Without overlap the "
        f"first test would start at about (d) + first machine = {_fmt(serial)}; measured "
        f"{_fmt(c['first_test_call'])}."
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
