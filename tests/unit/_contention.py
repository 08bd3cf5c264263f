"""Background check-out/check-in loops for test_stateful, and the claim markers they share.

A claim marker is a file ``<claims>/<machine>`` created with O_EXCL by whoever holds the
machine, naming the holder. Finding a marker of a *live* holder means two holders were given
the same machine: that is recorded as a violation. Run as a script, this module is one
contending worker process (killed at random by the test).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmpool import leases
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config_backends import SimSettings
from vmpool.errors import CheckoutTimeout, PoolUnavailable, StateError
from vmpool.ownership import ProcessRef, is_alive
from vmpool.state import JsonStateDir

#: holders that run on no real host: threads and state-machine actors of the test process
FAKE_HOST = "fake"


def holder_id(ref: ProcessRef) -> str:
    return f"{ref.host} {ref.pid} {ref.boot_id} {ref.start_ticks}"


def _ref_of(text: str) -> ProcessRef | None:
    try:
        host, pid, boot, start = text.split()
        return ProcessRef(host=host, pid=int(pid), boot_id=boot, start_ticks=int(start))
    except ValueError:
        return None  # a marker being written right now


def claim(claims: Path, names: list[str], me: ProcessRef, violations: Path, state: Path) -> None:
    """Mark ``names`` as held by ``me``; a live holder's marker already there is a violation
    (recorded with the machine's record in the ``state`` file, for the post-mortem).

    Markers of fake holders are removed when the test declares them dead, so a fake holder's
    marker is always live; a real holder's marker is stale once its process is gone.
    """
    for name in names:
        path = claims / name
        for _ in range(50):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                try:
                    other = _ref_of(path.read_text())
                except FileNotFoundError:
                    continue
                if other is None:
                    time.sleep(0.001)
                    continue
                if other.host == FAKE_HOST or is_alive(other):
                    record(
                        violations,
                        f"{name} leased to {holder_id(me)} while {holder_id(other)} holds it; "
                        f"record: {_record_of(state, name)}",
                    )
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # a dead process's marker
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(holder_id(me))
            break


def _record_of(state: Path, name: str) -> str:
    try:
        pool = json.loads(state.read_text())
        return json.dumps([m for m in pool["machines"] if m["name"] == name])
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable ({exc})"


def release(claims: Path, names: list[str], me: ProcessRef) -> None:
    for name in names:
        path = claims / name
        try:
            if path.read_text() == holder_id(me):
                path.unlink()
        except FileNotFoundError:
            pass


def record(violations: Path, line: str) -> None:
    with open(violations, "a") as fh:
        fh.write(line + "\n")


def churn(
    client: PoolClient,
    me: ProcessRef,
    claims: Path,
    violations: Path,
    state: Path,
    rng: random.Random,
    stop: Callable[[], bool],
) -> None:
    """Check out 1-2 machines, hold them a moment, check them in; until ``stop()``."""
    while not stop():
        try:
            lease = client.checkout(rng.choice([1, 1, 2]), fresh=rng.random() < 0.2, timeout=2.0)
        except CheckoutTimeout:
            continue
        except (PoolUnavailable, StateError):
            return  # the pool is shutting down
        claim(claims, lease.names, me, violations, state)
        time.sleep(rng.uniform(0, 0.003))
        if rng.random() < 0.2:
            lease.vms[0].mark_dirty()
        release(claims, lease.names, me)
        try:
            client.checkin(lease, failed=rng.random() < 0.15)
        except StateError:
            return
        time.sleep(rng.uniform(0.002, 0.01))


def fake_client(
    directory: JsonStateDir,
    pool_id: str,
    backend: SimBackend,
    policy: leases.Policy,
    me: ProcessRef,
) -> PoolClient:
    """A client that leases as ``me`` (a fake holder) instead of as this process."""
    client = PoolClient(directory.store(pool_id), backend, policy, pre_ping=False)
    client._me = me
    return client


def start_thread(
    directory: JsonStateDir,
    pool_id: str,
    backend: SimBackend,
    policy: leases.Policy,
    me: ProcessRef,
    claims: Path,
    violations: Path,
    stop: threading.Event,
    seed: int,
) -> threading.Thread:
    client = fake_client(directory, pool_id, backend, policy, me)
    thread = threading.Thread(
        target=churn,
        args=(
            client,
            me,
            claims,
            violations,
            directory.store(pool_id).path,
            random.Random(seed),
            stop.is_set,
        ),
        name=f"churn-{me.pid}",
        daemon=True,
    )
    thread.start()
    return thread


def main(argv: list[str]) -> None:
    state, pool_id, sim_root, claims, violations, stop_file, seed = argv
    directory = JsonStateDir(Path(state))
    backend = SimBackend(SimSettings(root=Path(sim_root)), Path(state))
    client = PoolClient(
        directory.store(pool_id), backend, leases.Policy(max_uses=5), pre_ping=False
    )
    churn(
        client,
        client._me,
        Path(claims),
        Path(violations),
        directory.store(pool_id).path,
        random.Random(int(seed)),
        Path(stop_file).exists,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
