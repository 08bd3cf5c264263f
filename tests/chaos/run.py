"""Long chaos runs: `python -m tests.chaos.run --rounds 20 --backend sim` (or podman, or both).

Prints one line per round, then the totals; exits 1 when a machine leaked, a machine was leased
twice, a state file was unreadable, a session hung or a test failed for another reason than its
worker being killed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ._harness import podman_usable, run_chaos


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
    p.add_argument("--rounds", type=int, default=10, help="chaos rounds (default 10)")
    p.add_argument(
        "--backend",
        default="sim",
        choices=["sim", "podman", "both"],
        help="sim, podman, or both (alternating rounds)",
    )
    p.add_argument("-n", "--workers", type=int, default=4, help="xdist workers per session")
    p.add_argument("--tests", type=int, default=16, help="tests per session (podman: 3/4)")
    p.add_argument("--seed", type=int, help="random seed (default: random)")
    p.add_argument(
        "--controller-every",
        type=int,
        default=3,
        help="kill the controller in every k-th round (and in 1 of 5 others at random)",
    )
    p.add_argument("--json", type=Path, help="write totals and every round here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    backends = ["sim", "podman"] if args.backend == "both" else [args.backend]
    if "podman" in backends:
        why = podman_usable()
        if why:
            print(f"podman: {why}", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="vmpool-chaos-"))
    try:
        run = run_chaos(
            base,
            rounds=args.rounds,
            backends=backends,
            workers=args.workers,
            tests=args.tests,
            seed=args.seed,
            controller_every=args.controller_every,
        )
        t = run.totals
        print()
        print(t.summary())
        for item in t.leaked + t.unreadable + t.unexpected_failures + t.gc_errors:
            print(f"  {item}")
        if args.json:
            args.json.write_text(json.dumps(run.report(), indent=2))
        bad = (
            t.machines_leaked
            or t.double_leases
            or t.unreadable_state_files
            or t.hung_sessions
            or t.unexpected_failures
        )
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
