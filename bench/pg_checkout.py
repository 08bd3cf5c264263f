"""Check-out + check-in latency on the PostgreSQL store beside the JSON store, in one run.

``python3 -m bench.pg_checkout [--iterations N]``: 1 and 8 processes back to back on 8
machines, each cycle one check-out and one check-in through PoolClient (the JSON store through
its controller's lease server, PostgreSQL through StoreTransport: each operation a transaction
the client runs itself); prints p50/p99 in ms per store and the PostgreSQL/JSON ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.checkout_latency import _gang, _profile, _summary
from bench.checkout_latency import run as json_run
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.controller import policy_for
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore, migrate
from vmpool.state import Machine, MachineState, Pool


def _pg_worker(index: int, dsn: str, pool_id: str, iterations: int, start: Any, finish: Any,
               results: Any) -> None:
    profile = _profile(0)
    with tempfile.TemporaryDirectory() as tmp:
        backend = SimBackend(profile.sim, Path(tmp))
        client = PoolClient(PgStore(dsn, pool_id), backend, policy_for(profile, backend),
                            worker=f"bench{index}", pre_ping=False)
        for _ in range(20):  # imports, connections, first-call costs
            client.checkin(client.checkout(1, timeout=60))
        start.wait(timeout=600)
        seconds = []
        for _ in range(iterations):
            t = time.perf_counter()
            client.checkin(client.checkout(1, timeout=60))
            seconds.append(time.perf_counter() - t)
        client.close()
        results.put(seconds)
        finish.wait(timeout=600)


def pg_run(dsn: str, procs: int, machines: int, iterations: int) -> dict[str, float]:
    pool_id = "bench" + uuid.uuid4().hex[:6]
    store = PgStore(dsn, pool_id)
    now = time.time()
    store.create(Pool(
        id=pool_id, backend="sim", size=machines, session="bench", name_prefix="vmpool",
        config_hash=_profile(machines).config_hash("sim"), created_at=now,
        machines=[Machine(name=f"{pool_id}-{i}", slot=i, state=MachineState.READY,
                          config_hash=_profile(machines).config_hash("sim"), created_at=now)
                  for i in range(machines)],
    ))
    try:
        got, _ = _gang(_pg_worker, [(i, dsn, pool_id, iterations) for i in range(procs)])
    finally:
        store.remove()
        store.close()
    return _summary([s for seconds in got for s in seconds])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=300, help="cycles per process")
    parser.add_argument("--machines", type=int, default=8)
    args = parser.parse_args()
    server = throwaway.start()
    rows = []
    try:
        migrate(server.dsn)
        for procs in (1, 8):
            pg = pg_run(server.dsn, procs, args.machines, args.iterations)
            js = json_run(procs, args.machines, args.iterations, 0.0, None)["ms"][
                "checkout+checkin"]
            rows.append((procs, pg, js))
    finally:
        server.remove()
    print(f"check-out + check-in, {args.machines} machines, {args.iterations} cycles/process")
    print(f"{'procs':>5} {'pg p50':>8} {'pg p99':>8} {'json p50':>9} {'json p99':>9} "
          f"{'p50 x':>6} {'p99 x':>6}")
    for procs, pg, js in rows:
        print(f"{procs:>5} {pg['p50']:>8.2f} {pg['p99']:>8.2f} {js['p50']:>9.2f} "
              f"{js['p99']:>9.2f} {pg['p50'] / js['p50']:>6.1f} {pg['p99'] / js['p99']:>6.1f}")
    print("(ms; x = PostgreSQL / JSON)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
