"""Check-out/check-in latency of the lease protocol under contention on one state store.

    python bench/checkout_latency.py                      # 8 processes, 64 machines
    python bench/checkout_latency.py --procs 8 --machines 64 --iterations 2000 --json out.json
    python bench/checkout_latency.py --no-server          # every operation a file transaction
    python bench/checkout_latency.py --wait-checkin       # every check-in waits for its answer
    python -m bench.checkout_latency --hold-ms 1 --baseline ../old --rounds 3
                                       # this code and a worktree of other code, interleaved

A zero-latency sim pool of ``--machines`` machines is warmed by a real Controller (which keeps
running, as in a session, with its lease server), with ``checkin_policy = "reuse"`` and pre-ping
off so no backend work is timed: what is measured is vmpool's own protocol (the round trip to the
lease server, the decision, the write-back; or, with ``--no-server``, lock, read, decide, atomic
write). Then ``--procs`` processes each run ``--iterations`` check-out + check-in cycles of one
machine at once, all contending for the same pool. The target is p99(check-out + check-in) <= 2 ms.
``--hold-ms`` keeps each machine about that long (0.5-1.5x, so processes do not march in
lock-step) between check-out and check-in, like a test's run time; 0, the default, is the worst
case: every process hammers the store back to back.

Check-ins are made as the ``pool_vm`` fixture makes them: answered by the lease server (a
check-in the pool refuses reaches the test). ``--wait-checkin`` is kept for old command lines
and changes nothing: every check-in waits for its answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import random
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:
    from bench._common import StealWatch, host_facts, markdown_table
except ImportError:  # run as `python bench/checkout_latency.py`
    from _common import StealWatch, host_facts, markdown_table  # type: ignore[no-redef]

from vmpool import _proc
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config import PoolSettings, Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller, policy_for
from vmpool.state import JsonStateDir

TARGET_MS = 2.0
_WARMUP_CYCLES = 20


def _worker(
    index: int,
    state: str,
    pool_id: str,
    iterations: int,
    hold: float,
    wait_checkin: bool,
    start: Any,
    finish: Any,
    results: Any,
) -> None:
    """Run check-out + check-in cycles (started and finished by _gang); send back
    (checkout, checkin) seconds per cycle and the CPU they took."""
    directory = JsonStateDir(Path(state))
    profile = _profile(0)
    backend = SimBackend(profile.sim, directory.path)
    client = PoolClient(
        directory.store(pool_id),
        backend,
        policy_for(profile, backend),
        worker=f"bench{index}",
        pre_ping=False,
    )
    for _ in range(_WARMUP_CYCLES):  # imports, page cache, first-call costs
        client.checkin(client.checkout(1, timeout=60))
    start.wait(timeout=600)
    cpu0 = time.process_time()
    clock = time.perf_counter
    rng = random.Random(index)
    samples = []
    for _ in range(iterations):
        t0 = clock()
        lease = client.checkout(1, timeout=60)
        t1 = clock()
        if hold:
            time.sleep(rng.uniform(0.5, 1.5) * hold)
        t2 = clock()
        client.checkin(lease)
        t3 = clock()
        samples.append((t1 - t0, t3 - t2))
    results.put((index, samples, time.process_time() - cpu0))
    finish.wait(timeout=600)


def _profile(size: int) -> Profile:
    return Profile(
        name="default",
        pool=PoolSettings(
            size=size or None,
            backend="sim",
            checkin_policy="reuse",
            pre_ping=False,
            network=False,
            warmup_parallelism=16,
        ),
        sim=SimSettings(),
    )


def _gang(target: Any, args: list[tuple[Any, ...]]) -> tuple[list[Any], float]:
    """Run ``target(*a, start, finish, results)`` in one spawned process per ``a``; return what
    each put in ``results`` and the seconds from the start line to the last of them.

    ``start`` is a barrier every process reaches after its warm-up (spawning one and importing
    vmpool takes a second of CPU here), ``finish`` an event set once every process has sent its
    samples: no process's start-up or exit overlaps another's timed cycles. Spawn, not fork: a
    forked child would inherit this process's threads' open lock files.
    """
    ctx = multiprocessing.get_context("spawn")
    start, finish, results = ctx.Barrier(len(args) + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, finish, results)) for a in args]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=600)
        t0 = time.perf_counter()
        got = [results.get(timeout=600) for _ in procs]
        return got, time.perf_counter() - t0
    finally:
        finish.set()
        for p in procs:
            p.join(60)


def _echo(sock: Any) -> None:
    """The far end of the floor measurement: send back whatever arrives."""
    while data := sock.recv(64):
        sock.sendall(data)


def floor(iterations: int, hold: float) -> dict[str, float]:
    """Round trips of one byte between two processes over a Unix socket pair, ``hold`` seconds
    apart: what any design that asks another process pays, twice per cycle (out and in), on this
    host (idle CPUs of a VM are slow to wake)."""
    ctx = multiprocessing.get_context("spawn")
    here, there = socket.socketpair()
    echo = ctx.Process(target=_echo, args=(there,))
    echo.start()
    there.close()
    rng = random.Random(0)
    rtts = []
    try:
        for i in range(iterations + _WARMUP_CYCLES):
            if hold:
                time.sleep(rng.uniform(0.5, 1.5) * hold)
            t0 = time.perf_counter()
            here.sendall(b"x")
            here.recv(64)
            if i >= _WARMUP_CYCLES:
                rtts.append(time.perf_counter() - t0)
    finally:
        here.close()
        echo.join(10)
    return _summary(rtts)


def _minimal_server(listener: socket.socket, machines: int) -> None:
    """The least a lease server can do: read JSON lines from every client, lease the first
    free slot to a check-out and answer, take a check-in back without answering."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    free = list(range(machines))
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            conn = key.fileobj  # type: ignore[assignment]
            data = conn.recv(65536)
            if not data:
                sel.unregister(conn)
                conn.close()
                del buffers[conn]
                if not buffers:
                    return
                continue
            *lines, buffers[conn] = (buffers[conn] + data).split(b"\n")
            for line in lines:
                op = json.loads(line.lstrip(b"!"))
                if op["kind"] == "checkin":
                    free.append(op["slot"])
                else:
                    conn.sendall(json.dumps({"granted": free.pop(0)}).encode() + b"\n")


def _minimal_client(
    path: str, iterations: int, hold: float, start: Any, finish: Any, results: Any
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    rng = random.Random(path)
    ask = b'{"kind":"checkout","holder":{"host":"h","pid":1,"worker":"w","test":null}}\n'

    def cycle() -> None:
        sock.sendall(ask)
        slot = json.loads(sock.recv(4096))["granted"]
        if hold:
            time.sleep(rng.uniform(0.5, 1.5) * hold)
        sock.sendall(b"!" + json.dumps({"kind": "checkin", "slot": slot}).encode() + b"\n")

    for _ in range(_WARMUP_CYCLES):
        cycle()
    start.wait(timeout=600)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        cycle()
        times.append(time.perf_counter() - t0)
    results.put(times)
    finish.wait(timeout=600)
    sock.close()


def minimal_floor(procs: int, machines: int, iterations: int, hold: float) -> dict[str, float]:
    """The same processes and cycles against the least a lease server can do (a thread that
    parses each line, leases a slot and answers; nothing validated, recorded or written): what
    any design with one server process reaches on this host. The gap to vmpool's figures is
    vmpool's own work. Machines held ``hold`` seconds are included in the cycle here."""
    tmp = Path(tempfile.mkdtemp(prefix="vmpool-floor-"))
    path = str(tmp / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    server = threading.Thread(target=_minimal_server, args=(listener, machines), daemon=True)
    server.start()
    try:
        got, _ = _gang(_minimal_client, [(path, iterations, hold)] * procs)
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
    times = [t for mine in got for t in mine]
    return _summary(times)


class _Collections:
    """Counts the cyclic collector's runs, by generation, in this process (the controller's,
    with its lease server) while in use: each stops the server's thread mid-batch."""

    def __init__(self) -> None:
        self.counts = {0: 0, 1: 0, 2: 0}

    def _seen(self, phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            self.counts[info["generation"]] += 1

    def __enter__(self) -> _Collections:
        gc.callbacks.append(self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._seen)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50": _percentile(ms, 50),
        "p90": _percentile(ms, 90),
        "p99": _percentile(ms, 99),
        "max": ms[-1],
        "mean": sum(ms) / len(ms),
    }


def run(
    procs: int,
    machines: int,
    iterations: int,
    hold_ms: float,
    state_root: Path | None,
    serve: bool = True,
    wait_checkin: bool = False,
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="vmpool-bench-", dir=state_root))
    directory = JsonStateDir(tmp / "state")
    profile = _profile(machines)
    backend = SimBackend(profile.sim, directory.path)
    controller = Controller(
        directory=directory,
        backend=backend,
        profile=profile,
        size=machines,
        session="bench",
        serve=serve,
    )
    try:
        controller.start()
        started = time.monotonic()
        controller.wait_until_ready(machines, 120)
        warmup = time.monotonic() - started
        state_bytes = (directory.path / f"{controller.pool_id}.json").stat().st_size

        collections = _Collections()
        steal = StealWatch()
        with collections:
            got, wall = _gang(
                _worker,
                [
                    (
                        i,
                        str(directory.path),
                        controller.pool_id,
                        iterations,
                        hold_ms / 1000,
                        wait_checkin,
                    )
                    for i in range(procs)
                ],
            )
        steal_pct = steal.percent()
        samples: list[tuple[float, float]] = [s for _, mine, _ in got for s in mine]
        cpu = sum(used for _, _, used in got)
        stats = controller.snapshot().stats
        served = controller.server.stats if controller.server is not None else None
    finally:
        controller.stop(lease_timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)

    checkout = _summary([s[0] for s in samples])
    checkin = _summary([s[1] for s in samples])
    cycle = _summary([s[0] + s[1] for s in samples])
    return {
        "procs": procs,
        "machines": machines,
        "iterations_per_proc": iterations,
        "hold_ms": hold_ms,
        "wait_checkin": wait_checkin,
        "cycles": len(samples),
        "wall_s": wall,
        "cycles_per_s": len(samples) / wall,
        "ms": {"checkout": checkout, "checkin": checkin, "checkout+checkin": cycle},
        "target_ms": TARGET_MS,
        "meets_target": cycle["p99"] <= TARGET_MS,
        "warmup_s": warmup,
        "state_file_bytes": state_bytes,
        "pool_checkouts": stats.checkouts,
        "server": None if served is None else dataclasses.asdict(served),
        "steal_pct": steal_pct,
        "server_process_gc": collections.counts,
        "floor_round_trip_ms": floor(iterations, hold_ms / 1000),
        "client_cpu_per_cycle_ms": cpu / len(samples) * 1000,
        "floor_minimal_server_ms": minimal_floor(procs, machines, iterations, hold_ms / 1000),
        "host": host_facts(),
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [op, *(f"{result['ms'][op][k]:.3f}" for k in ("p50", "p90", "p99", "max", "mean"))]
        for op in ("checkout", "checkin", "checkout+checkin")
    ]
    table = markdown_table(["ms", "p50", "p90", "p99", "max", "mean"], rows)
    verdict = "yes" if result["meets_target"] else "NO"
    return (
        f"{result['procs']} processes x {result['iterations_per_proc']} cycles "
        f"(machine held {result['hold_ms']:g} ms) on a "
        f"{result['machines']}-machine zero-latency sim pool "
        f"(state file {result['state_file_bytes']} bytes, {result['host']['cpus']} CPUs); "
        + "check-ins answered by the pool, as the pool_vm fixture makes them"
        + f"\n\n{table}\n\n"
        f"throughput: {result['cycles_per_s']:.0f} check-out+check-in cycles/s "
        f"({result['cycles']} cycles in {result['wall_s']:.2f} s)\n"
        + (
            f"lease server: {result['server']['ops']} operations in "
            f"{result['server']['batches']} commits (largest {result['server']['largest_batch']}), "
            f"{result['server']['cpu_s'] / max(result['server']['ops'], 1) * 1e6:.0f} us of its "
            "thread's CPU per operation\n"
            if result["server"]
            else "no lease server: every operation is a file transaction\n"
        )
        + "floor: a bare one-byte round trip between two processes, same spacing: "
        f"p50 {result['floor_round_trip_ms']['p50']:.3f} ms, "
        f"p99 {result['floor_round_trip_ms']['p99']:.3f} ms (a cycle makes two)\n"
        + f"floor: the same {result['procs']} processes and cycles against a minimal server "
        "(parse, lease a slot, answer; nothing validated, recorded or written): "
        f"p50 {result['floor_minimal_server_ms']['p50']:.3f} ms, "
        f"p99 {result['floor_minimal_server_ms']['p99']:.3f} ms\n"
        f"client CPU per cycle: {result['client_cpu_per_cycle_ms'] * 1000:.0f} us\n"
        + "garbage collections in the lease server's process (gen 0/1/2): "
        + "/".join(str(result["server_process_gc"][g]) for g in (0, 1, 2))
        + "\n"
        + (
            f"CPU time the hypervisor gave to other guests meanwhile (steal): "
            f"{result['steal_pct']:.1f}%\n"
            if result["steal_pct"] is not None
            else ""
        )
        + f"p99(checkout+checkin) <= {result['target_ms']:g} ms: {verdict} "
        f"({result['ms']['checkout+checkin']['p99']:.3f} ms)"
    )


_RUN_TIMEOUT = 900.0


def _run_in(checkout: Path, passed: list[str]) -> dict[str, Any]:
    """One run of the benchmark of the code in ``checkout``, in a process of its own."""
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-cmp-") as tmp:
        out = Path(tmp) / "result.json"
        done = _proc.run(
            [sys.executable, "-m", "bench.checkout_latency", *passed, "--json", str(out)],
            timeout=_RUN_TIMEOUT,
            cwd=checkout,
            env={"PYTHONPATH": str(checkout)},
        )
        if done.returncode != 0 or not out.exists():
            raise SystemExit(
                f"the benchmark in {checkout} failed (exit {done.returncode}):\n"
                f"{done.stderr.strip()[-2000:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def compare(baseline: Path, passed: list[str], rounds: int) -> str:
    """This code and ``baseline`` run in turns (the host's speed drifts by the minute: only
    runs side by side compare), as a table with the ratio of their median p99."""
    here = Path(__file__).resolve().parent.parent
    rows: list[list[str]] = []
    p99: dict[str, list[float]] = {"this": [], "baseline": []}
    for _ in range(rounds):
        for label, checkout in (("this", here), ("baseline", baseline.resolve())):
            r = _run_in(checkout, passed)
            cycle = r["ms"]["checkout+checkin"]
            p99[label].append(cycle["p99"])
            server = r.get("server") or {}
            steal = r.get("steal_pct")
            rows.append([
                label,
                f"{cycle['p50']:.2f}",
                f"{cycle['p99']:.2f}",
                f"{cycle['max']:.1f}",
                f"{r['floor_minimal_server_ms']['p99']:.2f}",
                f"{server['cpu_s'] / max(server['ops'], 1) * 1e6:.0f}" if server else "-",
                f"{r['client_cpu_per_cycle_ms'] * 1000:.0f}",
                "-" if steal is None else f"{steal:.1f}",
            ])
    table = markdown_table(
        ["code", "p50 ms", "p99 ms", "max ms", "floor p99 ms", "server us/op",
         "client us/cycle", "steal %"],
        rows,
    )
    mine, theirs = statistics.median(p99["this"]), statistics.median(p99["baseline"])
    return (
        f"{table}\n\nthis code: {here}; baseline: {baseline}\n"
        f"median p99: this {mine:.2f} ms, baseline {theirs:.2f} ms "
        f"(this / baseline = {mine / theirs:.2f}); "
        f"p99 <= {TARGET_MS:g} ms: {'yes' if mine <= TARGET_MS else 'NO'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=8, help="contending processes (8)")
    parser.add_argument("--machines", type=int, default=64, help="pool size (64)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="check-out+check-in cycles per process (2000)",
    )
    parser.add_argument(
        "--hold-ms", type=float, default=0.0, help="time a machine is held per cycle (0)"
    )
    parser.add_argument(
        "--no-server",
        action="store_true",
        help="no lease server: every operation is a file transaction (the fallback path)",
    )
    parser.add_argument(
        "--wait-checkin",
        action="store_true",
        help="no effect, kept for old command lines: every check-in waits for its answer",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of other code (a git worktree): run it and this code in turns, each "
        "in its own process, and print both side by side with their ratio",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="with --baseline: turns of each (3)"
    )
    parser.add_argument(
        "--state-root", type=Path, help="where the temporary state directory goes (system temp)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.machines <= 256:
        parser.error("--machines must be 1..256 (the pool size limit)")
    if args.baseline is not None:
        if not (args.baseline / "bench" / "checkout_latency.py").is_file():
            parser.error(f"--baseline {args.baseline}: no bench/checkout_latency.py there")
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        passed = [
            "--procs", str(args.procs), "--machines", str(args.machines),
            "--iterations", str(args.iterations), "--hold-ms", str(args.hold_ms),
        ] + (["--no-server"] if args.no_server else [])
        print(compare(args.baseline, passed, args.rounds))
        return 0
    result = run(
        args.procs,
        args.machines,
        args.iterations,
        args.hold_ms,
        args.state_root,
        serve=not args.no_server,
        wait_checkin=args.wait_checkin,
    )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
