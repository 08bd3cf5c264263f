"""A machine on a podman host by URL (``[podman] hosts``) against one on this machine's podman.

    python -m bench.podman_hosts                # 3 machines per way, 10 execs, 5 resets each
    python -m bench.podman_hosts --machines 5

Ways: ``local`` (this machine's podman, as a pool uses it: exec agent, live reset), ``unix`` and
``tcp`` (a podman service started here with storage of its own, on a unix socket or a 127.0.0.1
port, as tests/backends/test_podman_hosts.py starts them; machines with ``--network none``). For
each machine: create + start + ready, ``exec true``, reset after a snapshot, delete; medians
(min-max) of wall time. Needs podman and the busybox image (`vmpool image build --backend
podman`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.backends.test_podman_hosts import Service  # the test's podman "hosts"
from vmpool import _proc
from vmpool.backends.base import LABEL_POOL, Backend, MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.backends.podman.fleet import FleetBackend
from vmpool.config_backends import PodmanHost, PodmanSettings

_NO_NET = ["--network", "none"]


def _timed(call: Callable[[], object]) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def _measure(backend: Backend, machines: int, execs: int, resets: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"up": [], "exec": [], "reset": [], "delete": []}
    for _ in range(machines):
        _one(backend, f"vmhb-{uuid.uuid4().hex[:6]}-0", execs, resets, out)
    return out


def _one(backend: Backend, name: str, execs: int, resets: int,
         out: dict[str, list[float]]) -> None:
    def up() -> None:
        backend.create(MachineSpec(name, {LABEL_POOL: "vmhb-p"}))
        backend.start(name)
        backend.wait_ready(name, 60)

    try:
        out["up"].append(_timed(up))
        backend.snapshot(name)
        out["exec"] += [_timed(lambda: backend.exec(name, ["true"], 30)) for _ in range(execs)]
        for _ in range(resets):
            backend.exec(name, ["touch", "/tmp/dirty"], 30)
            out["reset"].append(_timed(lambda: backend.reset(name)))
    finally:
        out["delete"].append(_timed(lambda: backend.delete(name)))


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=3)
    parser.add_argument("--execs", type=int, default=10)
    parser.add_argument("--resets", type=int, default=5)
    args = parser.parse_args()
    image = build_image(PodmanSettings())
    base = Path(tempfile.mkdtemp(prefix="vmhb-", dir="/tmp"))
    tar = base / "image.tar"
    _proc.run(["podman", "save", "-q", "-o", str(tar), image], timeout=120).check("save")
    services = [Service(base, 1, tar), Service(base, 2, tar, tcp=True)]
    rows = []
    try:
        # this machine's podman as a pool uses it: its default network (with --network none
        # the live reset cannot run: no resolv.conf)
        local = PodmanBackend(PodmanSettings(), base / "local")
        try:
            rows.append(("local", _measure(local, args.machines, args.execs, args.resets)))
        finally:
            local.close()  # the API service a full reset may have started
        for service in services:
            service.start()
            service.load_image()
            fleet = FleetBackend(PodmanSettings(hosts=[PodmanHost(url=service.url)],
                                                extra_args=_NO_NET), base / f"s{service.index}")
            fleet.check()
            kind = service.url.split(":")[0]
            rows.append((kind, _measure(fleet, args.machines, args.execs, args.resets)))
    finally:
        for service in services:
            service.destroy()
        shutil.rmtree(base, ignore_errors=True)
    print("seconds, median (min-max)")
    print(f"{'way':<6} {'create+start+ready':<22} {'exec true':<22} {'reset':<22} delete")
    for kind, m in rows:
        print(f"{kind:<6} {_cell(m['up']):<22} {_cell(m['exec']):<22} {_cell(m['reset']):<22} "
              f"{_cell(m['delete'])}")


if __name__ == "__main__":
    main()
