"""`vmpool status`: every pool's record as of now (a live pool's lease server is asked; a
shared store's pools too), as a document for --json and as a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmpool import transport
from vmpool.ownership import is_alive
from vmpool.state import JsonStateDir


def stores(directory: JsonStateDir, shared: str | None) -> list[Any]:
    """Every pool's store: the state directory's files, and a shared store's pools."""
    stores: list[Any] = [directory.store(pool_id) for pool_id in directory.pool_ids()]
    if shared is not None:
        from vmpool.pgstore.store import PgStore, pool_ids

        stores += [PgStore(shared, pool_id) for pool_id in pool_ids(shared)]
    return stores


def status_doc(directory: JsonStateDir, shared: str | None = None) -> dict[str, Any]:
    from vmpool.backends.podman.fleet import machine_hosts

    hosts = machine_hosts(directory.path)  # [podman] hosts: where each machine lives
    pools = []
    for store in stores(directory, shared):
        pool = transport.read_current(store)  # a live pool's server: current
        if pool is None:
            continue
        now = time.time()
        pools.append(
            {
                "id": pool.id,
                "profile": pool.profile,
                "backend": pool.backend,
                "size": pool.size,
                "session": pool.session,
                "kept": pool.keep,
                "owner_alive": bool(pool.owner and is_alive(pool.owner)),
                "shared": pool.durable,
                "network": pool.network,
                "stats": pool.stats.model_dump(),
                "machines": [
                    {
                        "name": m.name,
                        "state": m.state.value,
                        "holder": (
                            None
                            if m.holder is None
                            else {
                                "worker": m.holder.worker,
                                "pid": m.holder.pid,
                                "host": m.holder.host,
                                "test": m.holder.test,
                                "since": m.holder.since,
                            }
                        ),
                        "test": m.holder.test if m.holder else None,
                        "uses": m.uses,
                        "age": round(now - m.created_at, 3),
                        "address": m.address,
                        "host": hosts.get(m.name),
                        "error": m.error,
                    }
                    for m in sorted(pool.machines, key=lambda m: m.slot)
                ],
            }
        )
    return {"pools": pools}


def print_status(doc: dict[str, Any], path: Path) -> None:
    if not doc["pools"]:
        print(f"no pools in {path}")
        return
    for p in doc["pools"]:
        owner = "kept" if p["kept"] else ("live" if p["owner_alive"] else "orphaned")
        print(f"pool {p['id']} [{p['profile']}] on {p['backend']}: size {p['size']}, {owner}")
        # a HOST column only for pools spread over [podman] hosts
        spread = any(m["host"] for m in p["machines"])
        host_head = f" {'HOST':<30}" if spread else ""
        print(f"  {'MACHINE':<28} {'STATE':<10} {'HOLDER':<10} {'USES':>4} {'AGE':>7}"
              f"{host_head}  TEST")
        for m in p["machines"]:
            holder = m["holder"]["worker"] if m["holder"] else "-"
            host = f" {m['host'] or '-':<30}" if spread else ""
            print(
                f"  {m['name']:<28} {m['state']:<10} {holder:<10} {m['uses']:>4} "
                f"{m['age']:>6.0f}s{host}  {m['test'] or ''}"
            )
