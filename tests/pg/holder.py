"""A holder process for the store's tests: ``holder.py DSN POOL NAME MODE MARKERS SECONDS``.

MODE ``cycle``: check out one machine, create an O_EXCL marker named after it (a second holder
of the same machine fails to), remove it, check in; repeat for SECONDS and print the count and
any errors. MODE ``hold``: check out one machine, print ``name generation``, wait for stdin to
close, then check in and print whether it applied.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from vmpool.errors import StoreError
from vmpool.pgstore.store import PgStore


def main() -> int:
    dsn, pool, name, mode, markers, seconds = sys.argv[1:7]
    store = PgStore(dsn, pool, name, lease_seconds=float(os.environ.get("LEASE", "30")))
    if mode == "hold":
        grant = store.checkout("p", 1, timeout=30)[0]
        print(grant.name, grant.generation, flush=True)
        sys.stdin.read()
        print("applied" if store.checkin(grant) else "fenced", flush=True)
        return 0
    end = time.monotonic() + float(seconds)
    cycles = doubles = errors = 0
    while time.monotonic() < end:
        try:
            grant = store.checkout("p", 1, timeout=30)[0]
        except StoreError as exc:
            errors += 1
            print("error", exc, file=sys.stderr, flush=True)
            continue
        marker = Path(markers) / grant.name
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            doubles += 1
        else:
            os.close(fd)
            marker.unlink()
        try:
            store.checkin(grant)
        except StoreError as exc:
            errors += 1
            print("error", exc, file=sys.stderr, flush=True)
        cycles += 1
    print(cycles, doubles, errors, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
