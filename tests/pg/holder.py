"""A holder process for the store's fault tests: ``holder.py DSN POOL MODE MARKERS SECONDS``.

MODE ``hold``: check out one machine, print ``name generation``, wait for stdin to close, then
check in and print ``applied`` or ``fenced`` (the lease was no longer ours: nothing changed).
MODE ``cycle``: check out one machine, create an O_EXCL marker named after it (a second holder
of the same machine fails to), remove it, check in; repeat for SECONDS, then print
``cycles doubles errors`` (each error also on stderr). ``LEASE`` in the environment: seconds
the holder lives without a heartbeat; ``VMPOOL_HOST_ID``: the "host" it runs on.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from vmpool import leases, ops
from vmpool.errors import StateError
from vmpool.ownership import current_process
from vmpool.pgstore import lifeline
from vmpool.pgstore.store import PgStore
from vmpool.pgstore.transport import StoreTransport
from vmpool.state import Holder, Request

POLICY = leases.Policy(checkin="reuse", failure="reuse")


def checkout(t: StoreTransport, n: int) -> tuple[str, Holder]:
    request = f"{os.getpid()}-{n}"
    h = Holder(**current_process().model_dump(), request=request, since=time.time())
    reply = t.run(ops.CheckoutStep(request=Request(id=request, holder=h, since=h.since),
                                   wait=30.0, now=h.since))
    if reply.granted is None:
        raise StateError(f"no grant: {reply.problem or reply.timeout}")
    return reply.granted[0], h


def checkin(t: StoreTransport, name: str, h: Holder) -> bool:
    reply = t.run(ops.CheckinStep(names=[name], holder=h, policy=POLICY, now=time.time()))
    return bool(reply.actions)


def main() -> int:
    dsn, pool, mode, markers, seconds = sys.argv[1:6]
    store = PgStore(dsn, pool, lease=float(os.environ.get("LEASE", "30")))
    t = StoreTransport(store, POLICY)
    if mode == "hold":
        name, h = checkout(t, 0)
        lifeline.wait_registered(dsn)
        m = store.read()
        generation = m.machine(name).generation if m else -1
        print(name, generation, flush=True)
        sys.stdin.read()
        print("applied" if checkin(t, name, h) else "fenced", flush=True)
        return 0
    end = time.monotonic() + float(seconds)
    cycles = doubles = errors = 0
    while time.monotonic() < end:
        try:
            name, h = checkout(t, cycles)
        except StateError as exc:
            errors += 1
            print("holder error:", exc, file=sys.stderr, flush=True)
            continue
        marker = Path(markers) / name
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            doubles += 1
        else:
            os.close(fd)
            marker.unlink()
        try:
            checkin(t, name, h)
        except StateError as exc:
            errors += 1
            print("holder error:", exc, file=sys.stderr, flush=True)
        cycles += 1
    print(cycles, doubles, errors, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
