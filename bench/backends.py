"""Per-backend benchmark: warm-up of 1 and N machines, and reset versus replace.

    python -m bench.backends                       # sim (podman-like model), podman, qemu
    python -m bench.backends --backends podman -N 4 --json out.json

Warm-up is timed through vmpool's Controller (the code pytest sessions use): from start() until
1 (resp. N) machines are ready. Reset is the backend's snapshot restore; replace is what the
controller does instead: delete the machine, then create, start, probe until ready, snapshot.
Each reset is preceded (untimed) by a write in the machine, and checked to be gone afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    SIM_MODELS,
    host_facts,
    load_backend,
    markdown_table,
    pool_tables,
    sweep,
    time_warmup,
    unique_prefix,
    write_pool_toml,
)
from vmpool.backends.base import Backend, MachineSpec
from vmpool.errors import BackendUnavailable, VmPoolError

_READY_TIMEOUT = 300.0
_DIRT = "vmpool-bench-dirty"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def warm(config: Path, state: Path, size: int) -> dict[str, float]:
    """Seconds from Controller.start() until ``size`` machines are ready, and teardown."""
    timed = time_warmup(config, state, size, _READY_TIMEOUT)
    return {"ready": timed["all"], "teardown": timed["teardown"]}


def _bring_up(backend: Backend, name: str) -> None:
    backend.create(MachineSpec(name, {"bench": name}))
    backend.start(name)
    backend.wait_ready(name, _READY_TIMEOUT)
    if backend.capabilities.reset:
        backend.snapshot(name)


def reset_vs_replace(backend: Backend, prefix: str, resets: int, replaces: int) -> dict[str, Any]:
    name = f"{prefix}-rr-0"
    out: dict[str, Any] = {"resets": [], "replaces": [], "reset_restores": None}
    _bring_up(backend, name)
    try:
        if backend.capabilities.reset:
            restored = True
            for _ in range(resets):
                backend.exec(name, ["touch", _DIRT], 60.0)
                out["resets"].append(round(_timed(lambda: backend.reset(name)), 4))
                left = backend.exec(name, ["test", "-e", _DIRT], 60.0)
                restored = restored and left.returncode != 0
            out["reset_restores"] = restored
        for i in range(replaces):
            new = f"{prefix}-rr-{i + 1}"
            old = name

            def replace(old: str = old, new: str = new) -> None:
                backend.delete(old)
                _bring_up(backend, new)

            out["replaces"].append(round(_timed(replace), 3))
            name = new
    finally:
        with contextlib.suppress(VmPoolError):
            backend.delete(name)
    return out


#: the calls whose medians make a sim latency model (bench._common.SIM_MODELS)
CALLS = ("create", "start", "wait_ready", "exec", "reset", "delete")


def call_latencies(backend: Backend, prefix: str, rounds: int) -> dict[str, float]:
    """Median seconds of each backend call over ``rounds`` machines, made one after another.

    Each round: create, start, wait_ready, snapshot (untimed), 5 execs, a write (untimed),
    reset, delete. These medians are what the sim model of a backend is made of.
    """
    times: dict[str, list[float]] = {c: [] for c in CALLS}
    for i in range(rounds):
        name = f"{prefix}-call-{i}"
        try:
            _call_round(backend, name, times)
        finally:
            with contextlib.suppress(VmPoolError):
                backend.delete(name)
    return {c: round(statistics.median(v), 3) for c, v in times.items() if v}


def _call_round(backend: Backend, name: str, times: dict[str, list[float]]) -> None:
    def timed(call: str, fn: Callable[[], object]) -> None:
        times[call].append(_timed(fn))

    timed("create", lambda: backend.create(MachineSpec(name, {})))
    timed("start", lambda: backend.start(name))
    timed("wait_ready", lambda: backend.wait_ready(name, _READY_TIMEOUT))
    for _ in range(5):
        timed("exec", lambda: backend.exec(name, ["echo", "x"], 60.0))
    if backend.capabilities.reset:
        backend.snapshot(name)
        backend.exec(name, ["touch", _DIRT], 60.0)
        timed("reset", lambda: backend.reset(name))
    timed("delete", lambda: backend.delete(name))


def measure(
    backend_name: str, root: Path, n: int, resets: int, replaces: int, args: argparse.Namespace
) -> dict[str, Any]:
    state = root / f"state-{backend_name}"
    state.mkdir(mode=0o700)
    prefix = unique_prefix("benchb")
    config = write_pool_toml(
        root / f"pool-{backend_name}.toml",
        pool_tables(
            backend=backend_name,
            prefix=prefix,
            state_dir=state,
            sim_model=args.sim_model,
            qemu_accel=args.qemu_accel,
            qemu_warmup=args.qemu_warmup,
            warmup_parallelism=max(n, 1),
        ),
    )
    _cfg, backend = load_backend(config, state)
    try:
        backend.check()  # primes runtime/accel caches outside the timings
    except BackendUnavailable as exc:
        return {"skipped": str(exc)}
    row: dict[str, Any] = {}
    try:
        print(f"  {backend_name}: warming 1 ...", end="", flush=True)
        row["warm_1"] = warm(config, state, 1)
        print(f" {row['warm_1']['ready']:.2f}s; warming {n} ...", end="", flush=True)
        row[f"warm_{n}"] = warm(config, state, n)
        print(f" {row[f'warm_{n}']['ready']:.2f}s; reset vs replace ...", end="", flush=True)
        rr = reset_vs_replace(backend, prefix, resets, replaces)
        row.update(rr)
        print(" calls ...", end="", flush=True)
        row["calls"] = call_latencies(backend, prefix, args.calls)
        row["reset_median"] = statistics.median(rr["resets"]) if rr["resets"] else None
        row["replace_median"] = statistics.median(rr["replaces"]) if rr["replaces"] else None
        if row["reset_median"] and row["replace_median"]:
            row["ratio"] = round(row["replace_median"] / row["reset_median"], 1)
        print(" done", flush=True)
    finally:
        leaked = sweep(backend, prefix)
        if leaked:
            print(f"  swept {len(leaked)} leftover(s): {leaked}", file=sys.stderr)
    return row


def _s(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}s"


def table(rows: dict[str, dict[str, Any]], n: int) -> str:
    out = []
    for name, r in rows.items():
        if "skipped" in r:
            out.append([name, f"skipped: {r['skipped'][:80]}", "", "", "", ""])
            continue
        out.append(
            [
                name,
                _s(r["warm_1"]["ready"]),
                _s(r[f"warm_{n}"]["ready"]),
                _s(r["reset_median"], 3) + f" (n={len(r['resets'])})"
                if r["resets"]
                else "no reset (replaced)",
                _s(r["replace_median"]) + f" (n={len(r['replaces'])})",
                f"{r['ratio']:.1f}x" if r.get("ratio") else "n/a",
            ]
        )
    return markdown_table(
        [
            "backend",
            "warm 1",
            f"warm {n}",
            "reset (median)",
            "replace (median)",
            "replace / reset",
        ],
        out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__)
    p.add_argument("--backends", default="sim,podman,qemu", help="comma-separated")
    p.add_argument("-N", type=int, default=4, help="machines for the warm-N column (default 4)")
    p.add_argument("--resets", type=int, default=5, help="timed resets (median shown)")
    p.add_argument("--replaces", type=int, default=3, help="timed replacements (median shown)")
    p.add_argument(
        "--calls", type=int, default=5, help="machines for the per-call medians (default 5)"
    )
    p.add_argument("--sim-model", default="podman", choices=sorted(SIM_MODELS))
    p.add_argument("--qemu-accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument(
        "--qemu-warmup",
        choices=["clone", "boot"],
        help="[qemu] warmup: clone a saved running state, or boot every machine "
        "(default: the backend's own default)",
    )
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    root = Path(tempfile.mkdtemp(prefix="vmpool-bench-backends-"))
    print(
        f"# vmpool backend benchmark (sim model {args.sim_model!r}: "
        f"{SIM_MODELS[args.sim_model]}; qemu accel {args.qemu_accel})",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            try:
                rows[name] = measure(name, root, args.N, args.resets, args.replaces, args)
            except VmPoolError as exc:
                rows[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                print(f"  {name}: failed: {exc}", file=sys.stderr)
        print()
        print(table(rows, args.N))
        print()
        print("Per-call medians in seconds (what a sim latency model is made of):\n")
        print(
            markdown_table(
                ["backend", *CALLS],
                [
                    [name, *(f"{r['calls'].get(c, float('nan')):.3f}" for c in CALLS)]
                    for name, r in rows.items()
                    if "calls" in r
                ],
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            doc = {
                "command": ["python", "-m", "bench.backends", *(argv or sys.argv[1:])],
                "sim_model": {args.sim_model: SIM_MODELS[args.sim_model]},
                "qemu_accel": args.qemu_accel,
                "N": args.N,
                "host": host_facts(),
                "backends": rows,
            }
            args.json.write_text(json.dumps(doc, indent=2))
            print(f"\nmeasurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
