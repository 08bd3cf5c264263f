"""Per-reset cost on podman: live reset, API and CLI recreate, and a plain container per test.

    python -m bench.podman_reset                    # 10 interleaved rounds
    python -m bench.podman_reset --rounds 30 --json out.json

Each round runs, one after another (so load from elsewhere hits them alike):
  live   vmpool's reset of a machine the live reset serves (vmpool.backends.podman.live_reset)
  api    vmpool's full reset (the live reset off): through podman's REST API service
         (vmpool.backends.podman.api_reset): host-side kill, delete, create, start, agent start
  cli    vmpool's full reset with the API off too: `rm -f -v`, `run -d` from the snapshot, probe
  plain  what a per-test fixture does: `podman run -d`, an exec probe, `podman rm -f -v`
Before each reset (untimed) the machine gets dirty: a file written, a process left running; the
reset is checked to have undone both.

Wall time is the call's. CPU is that of every process in a cpuacct cgroup made for this run
(this process and all it starts: the podman CLI, nsenter ...) plus the container's own cgroup
(runc's init, the probe); the API service is this process's child, started inside that cgroup,
so its CPU is counted. Not counted: conmon and what it runs (podman puts every conmon in one
shared cgroup), which only the recreating ways (api, cli, plain) use: their CPU is under-counted.
Needs root (cgroup v1 cpuacct, as on this host) and podman.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench._common import markdown_table
from vmpool import _proc
from vmpool.backends.base import MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.config_backends import PodmanSettings

_CPUACCT = Path("/sys/fs/cgroup/cpuacct")
_DIRT = "touch /tmp/vmpool-bench-dirt; sleep 1000 >/dev/null 2>&1 &"
WAYS = ("live", "api", "cli", "plain")


@contextlib.contextmanager
def own_cgroup() -> Iterator[Path]:
    """A cpuacct cgroup holding this process (and so everything it starts) while inside."""
    path = _CPUACCT / f"vmpool-bench-{os.getpid()}"
    path.mkdir()
    try:
        (path / "cgroup.procs").write_text(str(os.getpid()))
        yield path
    finally:
        # this process, and what it started that still runs (the API service until teardown)
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (_CPUACCT / "cgroup.procs").write_text(pid)
        path.rmdir()


def _usage(cgroup: Path) -> int:
    try:
        return int((cgroup / "cpuacct.usage").read_text())
    except FileNotFoundError:
        return 0


def _container_cgroup(name: str) -> Path:
    cid = _proc.run(["podman", "inspect", "-f", "{{.Id}}", name], timeout=60).check().stdout
    return _CPUACCT / "libpod_parent" / f"libpod-{cid.strip()}"


def timed(cgroup: Path, fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of ``fn()``, and the CPU seconds of ``cgroup`` (this process and its
    children) meanwhile."""
    cpu0, t0 = _usage(cgroup), time.monotonic()
    fn()
    return time.monotonic() - t0, (_usage(cgroup) - cpu0) / 1e9


class Plain:
    """A container per test, as a plain fixture makes one."""

    def __init__(self, image: str, options: list[str]) -> None:
        self.image, self.options = image, options
        self.cpu_in_box = 0

    def __call__(self) -> None:
        name = f"vmpoolbench-{uuid.uuid4().hex[:8]}-plain"
        _proc.run(["podman", "run", "-d", "--name", name, *self.options, self.image,
                   "sleep", "infinity"], timeout=60).check("run")
        try:
            _proc.run(["podman", "exec", name, "true"], timeout=60).check("probe")
            self.cpu_in_box = _usage(_container_cgroup(name))
        finally:
            _proc.run(["podman", "rm", "-f", "-v", "-t", "0", name], timeout=60).check("rm")


def run(rounds: int, root: Path) -> dict[str, list[tuple[float, float]]]:
    image = build_image(PodmanSettings())
    backends = {way: PodmanBackend(PodmanSettings(image=image), root / way)
                for way in WAYS if way != "plain"}
    backends["api"]._live = None  # the fallback: a full reset, through the API
    backends["cli"]._live = backends["cli"]._api = None  # the full reset on the CLI
    live = backends["live"]
    names = {way: f"vmpoolbench-{uuid.uuid4().hex[:8]}-{way}" for way in backends}
    plain = Plain(image, live.run_options().argv())
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    try:
        for way, name in names.items():
            b = backends[way]
            b.create(MachineSpec(name, {"bench": "podman_reset"}))
            b.start(name)
            b.wait_ready(name, 60)
            b.snapshot(name)
        with own_cgroup() as cgroup:
            for _ in range(rounds):
                for way, name in names.items():
                    b = backends[way]
                    assert b.exec(name, ["sh", "-c", _DIRT], 60).ok
                    box = _container_cgroup(name)
                    box0 = _usage(box)
                    wall, cpu = timed(cgroup, functools.partial(b.reset, name))
                    # live: the same container's CPU meanwhile; cli: all of the new one's
                    new = _container_cgroup(name)
                    cpu += (_usage(new) - (box0 if new == box else 0)) / 1e9
                    results[way].append((wall, cpu))
                    left = b.exec(name, ["sh", "-c", "test -e /tmp/vmpool-bench-dirt || "
                                         "ps -o args | grep -q '^[s]leep 1000'"], 60)
                    if left.returncode == 0:
                        raise SystemExit(f"{way} reset left the dirt behind")
                wall, cpu = timed(cgroup, plain)
                results["plain"].append((wall, cpu + plain.cpu_in_box / 1e9))
    finally:
        for way, name in names.items():
            backends[way].delete_many([name])  # and the API service, where one was started
    return results


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    plain_wall = statistics.median(w for w, _ in results["plain"])
    plain_cpu = statistics.median(c for _, c in results["plain"])
    rows = []
    for way in WAYS:
        walls = [w for w, _ in results[way]]
        cpus = [c for _, c in results[way]]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        rows.append([
            way, f"{wall * 1000:.1f}", f"{min(walls) * 1000:.1f}-{max(walls) * 1000:.1f}",
            f"{cpu * 1000:.1f}", f"{plain_wall / wall:.1f}x", f"{plain_cpu / cpu:.1f}x",
        ])
    return markdown_table(
        ["way", "wall ms (median)", "wall ms (range)", "CPU ms (median)",
         "plain / way (wall)", "plain / way (CPU)"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not _CPUACCT.is_dir():
        print("needs root and cgroup v1's cpuacct at /sys/fs/cgroup/cpuacct", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        os.chmod(tmp, 0o700)
        results = run(args.rounds, Path(tmp))
    print(f"# podman reset, {args.rounds} interleaved rounds, {os.cpu_count()} cores\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

