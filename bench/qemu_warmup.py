"""QEMU warm-up: machines booted cold versus restored from a saved template state.

    python -m bench.qemu_warmup                          # 1, 2, 4 machines, 2 rounds, networked
    python -m bench.qemu_warmup --sizes 1 4 8 --rounds 3 --json out.json

Each row warms N machines at once the way the controller does (one thread per machine:
create, start, wait_ready, snapshot; machines on one pool network) and times from the first
create until the last snapshot. Modes: ``boot`` boots each kernel; ``clone`` restores a template
already saved on this host; ``clone+build`` starts with no template, so the first machine builds
it (boot + save) and the others wait for it: what a host's very first session pays. Templates go
to a temporary directory, not the user cache. Rounds interleave the modes, so a busy host slows
them alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmpool.backends.base import MachineSpec
from vmpool.backends.qemu import QemuBackend
from vmpool.backends.qemu.image import build_image
from vmpool.config_backends import QemuSettings
from vmpool.errors import VmPoolError

_READY_TIMEOUT = 300.0
MODES = ("boot", "clone", "clone+build")


def warm(backend: QemuBackend, size: int, network: bool) -> dict[str, Any]:
    """Warm ``size`` machines in parallel; seconds until all are ready, and per machine."""
    run = uuid.uuid4().hex[:6]
    net = f"bench-{run}-net" if network else None
    names = [f"bench-{run}-{i}" for i in range(size)]
    if net is not None:
        backend.create_network(net, {})
    t0 = time.monotonic()

    def one(index: int) -> float:
        name = names[index]
        backend.create(MachineSpec(name, {"bench": run}, index=index, network=net))
        backend.start(name)
        backend.wait_ready(name, _READY_TIMEOUT)
        backend.snapshot(name)
        return time.monotonic() - t0

    try:
        with ThreadPoolExecutor(max_workers=size) as pool:
            each = list(pool.map(one, range(size)))
        total = time.monotonic() - t0
        cloned = sum(
            1
            for name in names
            if json.loads((backend.root / name / "machine.json").read_text()).get("template")
        )
    finally:
        with ThreadPoolExecutor(max_workers=size) as pool:
            list(pool.map(backend.delete, names))
        if net is not None:
            backend.delete_network(net)
    return {"all_ready": round(total, 2), "each": [round(t, 2) for t in each], "cloned": cloned}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    parser.add_argument("--no-network", action="store_true", help="machines without a network")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(relativeCreated)8.0f %(threadName)s %(message)s",
    )
    build_image(QemuSettings())
    root = Path(tempfile.mkdtemp(prefix="vmpool-bench-qemu-"))
    results: dict[str, dict[int, list[dict[str, Any]]]] = {m: {} for m in args.modes}
    try:
        backends = {}
        for mode in args.modes:
            settings = QemuSettings(accel=args.accel, warmup="boot" if mode == "boot" else "clone")
            backends[mode] = QemuBackend(
                settings, root / f"state-{mode}", template_dir=root / f"templates-{mode}"
            )
        accel = backends[args.modes[0]].resolve_accel()
        print(
            f"qemu warm-up, accel={accel}, cpus={os.cpu_count()}, "
            f"load={os.getloadavg()[0]:.1f}, network={not args.no_network}"
        )
        for rnd in range(args.rounds):
            for size in args.sizes:
                for mode in args.modes:
                    backend = backends[mode]
                    if mode == "clone+build":
                        shutil.rmtree(backend.template_dir, ignore_errors=True)
                    elif mode == "clone" and not backend.template_dir.exists():
                        warm(backend, 1, not args.no_network)  # untimed: saves the template
                    row = warm(backend, size, not args.no_network)
                    results[mode].setdefault(size, []).append(row)
                    print(
                        f"  round {rnd + 1} {mode:>11} x{size}: {row['all_ready']:6.2f}s "
                        f"(each {row['each']}, cloned {row['cloned']}/{size})",
                        flush=True,
                    )
    except VmPoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    header = ["machines", *[f"{m} (s)" for m in args.modes]]
    if "boot" in args.modes and "clone" in args.modes:
        header.append("boot / clone")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes:
        medians = {
            m: statistics.median(r["all_ready"] for r in results[m][size]) for m in args.modes
        }
        cells = [str(size)]
        for m in args.modes:
            runs = ", ".join(f"{r['all_ready']:.1f}" for r in results[m][size])
            cells.append(f"{medians[m]:.2f} [{runs}]")
        if "boot / clone" in header:
            cells.append(f"{medians['boot'] / medians['clone']:.1f}x")
        print("| " + " | ".join(cells) + " |")
    print("\nmedian of the rounds, each round in brackets; time until all N are ready")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
