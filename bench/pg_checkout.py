"""Check-out + check-in latency on the PostgreSQL store beside the JSON store, in one run.

``python3 -m bench.pg_checkout [--iterations N]``: 1 and 8 processes back to back on 8
machines, each cycle one check-out and one check-in; prints p50/p99 in ms per store.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import uuid
from typing import Any

from bench.checkout_latency import _summary
from bench.checkout_latency import run as json_run
from vmpool.pgstore import throwaway
from vmpool.pgstore.store import PgStore, holder_id


def _pg_worker(dsn: str, pool: str, name: str, iterations: int, out: Any) -> None:
    store = PgStore(dsn, pool, holder_id("bench", name), poll=0.002)
    seconds = []
    for _ in range(iterations):
        t = time.perf_counter()
        store.checkin(store.checkout("p", 1, timeout=60)[0])
        seconds.append(time.perf_counter() - t)
    store.close()
    out.put(seconds)


def pg_run(dsn: str, procs: int, iterations: int) -> dict[str, float]:
    pool = "bench-" + uuid.uuid4().hex[:6]
    admin = PgStore(dsn, pool, holder_id("bench", "admin"))
    admin.migrate()
    admin.add_machines("p", [f"m{i}" for i in range(8)])
    admin.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ps = [ctx.Process(target=_pg_worker, args=(dsn, pool, f"w{i}", iterations, out))
          for i in range(procs)]
    for p in ps:
        p.start()
    seconds = [s for _ in ps for s in out.get(timeout=600)]
    for p in ps:
        p.join(60)
    return _summary(seconds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    server = throwaway.start()
    try:
        print(f"{'store':<12}{'procs':>6}{'p50 ms':>10}{'p99 ms':>10}")
        for procs in (1, 8):
            pg = pg_run(server.dsn, procs, args.iterations)
            js = json_run(procs, 8, args.iterations, 0.0, None)["ms"]["checkout+checkin"]
            for label, r in (("postgresql", pg), ("json", js)):
                print(f"{label:<12}{procs:>6}{r['p50']:>10.2f}{r['p99']:>10.2f}", flush=True)
    finally:
        server.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
