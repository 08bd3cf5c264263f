"""What the benchmarks share: the sim latency model, pool.toml, pytest runs, cleanup, tables."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import string
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpool import config as vmconfig
from vmpool.backends import make_backend
from vmpool.backends.base import Backend
from vmpool.controller import Controller
from vmpool.errors import VmPoolError
from vmpool.ownership import new_session_id
from vmpool.state import JsonStateDir

#: Latency models for ``--backend sim``, in seconds per backend call.
SIM_MODELS: dict[str, dict[str, float]] = {
    # Medians of vmpool's podman backend calls on the development machine (podman 4.3 + runc,
    # busybox image, 2 cores, 2026-11-25), from `python3 -m bench.backends --backends podman`:
    # create 0.041, start 0.145, wait_ready (start the exec agent, probe through it) 0.093,
    # exec (through the agent) 0.001, reset (rm -> run -> wait_ready) 0.567, delete 0.300. The
    # sim's snapshot is a local copy (podman commits only a container that changed).
    "podman": {
        "create_latency": 0.04,
        "start_latency": 0.15,
        "ready_latency": 0.09,
        "exec_latency": 0.002,
        "reset_latency": 0.57,
        "delete_latency": 0.30,
    },
    # The same backend earlier that day, before the exec agent: every exec a `podman exec`
    # (create 0.12, start 0.25, wait_ready 0.28, exec 0.27, reset incl. commit 0.98, delete
    # 0.50). Kept so the figures measured with it can be reproduced.
    "podman-exec": {
        "create_latency": 0.12,
        "start_latency": 0.25,
        "ready_latency": 0.28,
        "exec_latency": 0.27,
        "reset_latency": 0.98,
        "delete_latency": 0.50,
    },
    # Every call instant: what is left is vmpool's own protocol and pytest-xdist overhead.
    "zero": {},
}

#: Machine name prefixes (``[pool] name_prefix``) are ``[a-z][a-z0-9]{0,15}``.
_ALPHABET = string.ascii_lowercase + string.digits


def unique_prefix(stem: str) -> str:
    """``stem`` plus 6 random characters: a name_prefix no other run uses."""
    return stem + "".join(secrets.choice(_ALPHABET) for _ in range(6))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_pool_toml(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``{table: {key: value}}`` as a pool.toml (and validate it with vmpool itself)."""
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    vmconfig.load(path, environ={})
    return path


def pool_tables(
    *,
    backend: str,
    prefix: str,
    state_dir: Path,
    size: int | None = None,
    checkin_policy: str = "reset",
    sim_model: str = "podman",
    pre_ping: bool = True,
    qemu_accel: str = "tcg",
    qemu_warmup: str | None = None,
    **pool: Any,
) -> dict[str, dict[str, Any]]:
    """The pool.toml tables the benchmarks and chaos runs use."""
    return {
        "pool": {
            "backend": backend,
            "name_prefix": prefix,
            "state_dir": str(state_dir),
            "size": size,
            "checkin_policy": checkin_policy,
            "pre_ping": pre_ping,
            # the per-test ways make no networks either: compare like with like (the suite's
            # --pool-network passes network=True for the pool ways, the configuration default)
            "network": False,
            "checkout_timeout": 900.0,
            "ready_timeout": 300.0,
            **pool,
        },
        "sim": dict(SIM_MODELS[sim_model]),
        # [qemu] warmup ("clone" or "boot") is written only when asked for
        "qemu": {"accel": qemu_accel, "warmup": qemu_warmup},
    }


def time_warmup(config: Path, state: Path, size: int, timeout: float) -> dict[str, float]:
    """Warm a pool in this process (a Controller alone, no pytest) and tear it down: seconds
    from start() until the first and until all ``size`` machines were ready, and teardown."""
    cfg, backend = load_backend(config, state)
    controller = Controller(
        directory=JsonStateDir(state),
        backend=backend,
        profile=cfg.default,
        size=size,
        session=new_session_id(),
    )
    t0 = time.monotonic()
    controller.start()
    try:
        controller.wait_until_ready(1, timeout)
        first = time.monotonic() - t0
        controller.wait_until_ready(size, timeout)
        every = time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        controller.stop(keep=False, lease_timeout=0)
        teardown = time.monotonic() - t1
    return {"first": round(first, 3), "all": round(every, 3), "teardown": round(teardown, 3)}


def load_backend(config_path: Path, state_dir: Path) -> tuple[vmconfig.Config, Backend]:
    cfg = vmconfig.load(config_path, environ={})
    return cfg, make_backend(cfg.default.pool.backend, cfg.default, state_dir)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without pytest's and vmpool's own variables (the child's config wins)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "VMPOOL_")) and k not in ("PYTHONBREAKPOINT",)
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


@dataclass
class PytestRun:
    """One ``pytest`` subprocess: how long it took, what it said."""

    argv: list[str]
    started: float  # time.time() just before the process was launched
    wall: float
    returncode: int
    output: str
    passed: int
    failed: int
    errors: int


_COUNT_RE = {
    key: re.compile(rf"(\d+) {word}")
    for key, word in (("passed", "passed"), ("failed", "failed"), ("errors", r"errors?\b"))
}


def _count(text: str, key: str) -> int:
    found = _COUNT_RE[key].findall(text.splitlines()[-1] if text.strip() else "")
    return int(found[-1]) if found else 0


def run_pytest(
    cwd: Path, args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> PytestRun:
    """Run ``python -m pytest ARGS`` in ``cwd``, timed wall-clock from launch to exit."""
    argv = [sys.executable, "-m", "pytest", *args]
    started = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        out += f"\n[bench] killed after {timeout:g}s\n".encode()
    wall = time.monotonic() - t0
    text = out.decode(errors="replace")
    tail = text.rstrip().splitlines()[-1] if text.strip() else ""
    return PytestRun(
        argv=argv,
        started=started,
        wall=wall,
        returncode=proc.returncode,
        output=text,
        passed=_count(tail, "passed"),
        failed=_count(tail, "failed"),
        errors=_count(tail, "errors"),
    )


def sweep(backend: Backend, prefix: str) -> list[str]:
    """Delete every machine and network whose name starts with ``prefix`` (ours alone)."""
    gone = []
    with contextlib.suppress(VmPoolError):
        for info in backend.list(prefix):
            with contextlib.suppress(VmPoolError):
                backend.delete(info.name)
                gone.append(info.name)
    with contextlib.suppress(VmPoolError):
        for info in backend.list_networks(prefix):
            with contextlib.suppress(VmPoolError):
                backend.delete_network(info.name)
                gone.append(info.name)
    return gone


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [list(map(str, headers)), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    out = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def host_facts() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


class StealWatch:
    """The share of this machine's CPU time its hypervisor gave to other guests while the
    watch ran (``steal`` in /proc/stat): a latency figure read on a virtual machine means
    little without it (the same code's p99 doubled here when another guest took 20-50%)."""

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def percent(self) -> float | None:
        end = _cpu_ticks()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return 100.0 * (end[0] - self._start[0]) / (end[1] - self._start[1])
