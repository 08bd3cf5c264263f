"""The simulated backend: a test double and benchmark baseline, never a feature demo.

A machine is a directory under ``root`` (so every process sees the same machines); its
"filesystem" is ``fs/``, where exec runs commands on the host (cwd and $HOME). Latencies and
faults are configurable; the k-th create is counted across processes under a lock.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmpool import _proc
from vmpool._files import DIR_MODE, FILE_MODE, atomic_write, private_dir
from vmpool._lock import file_lock
from vmpool.backends.base import (
    BackendBase,
    Capabilities,
    ExecResult,
    MachineInfo,
    MachineSpec,
    SshAccess,
    probe_until,
    validate_name,
)
from vmpool.config_backends import SimSettings
from vmpool.errors import BackendError


class SimBackend(BackendBase):
    name = "sim"
    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(self, settings: SimSettings, state_dir: Path) -> None:
        self.settings = settings
        self.root = Path(settings.root) if settings.root else Path(state_dir) / "sim"
        private_dir(self.root)

    # -- helpers -----------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / "machines" / validate_name(name)

    def _meta(self, name: str) -> dict[str, object]:
        try:
            data = json.loads((self._dir(name) / "machine.json").read_text())
        except FileNotFoundError:
            raise BackendError(f"sim: no machine named {name!r}") from None
        assert isinstance(data, dict)
        return data

    def _write_meta(self, name: str, meta: Mapping[str, object]) -> None:
        atomic_write(self._dir(name) / "machine.json", json.dumps(meta), fsync=False)

    @staticmethod
    def _pause(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _next_create(self) -> int:
        counter = self.root / "creates"
        with file_lock(self.root / "creates.lock", timeout=30):
            n = int(counter.read_text() or 0) + 1 if counter.exists() else 1
            atomic_write(counter, str(n), fsync=False)
        return n

    # -- Backend -------------------------------------------------------------------------------
    def check(self) -> None:
        return None

    def create(self, spec: MachineSpec) -> None:
        n = self._next_create()
        self._pause(self.settings.create_latency)
        if self.settings.fail_every_create or n in self.settings.fail_create:
            raise BackendError(f"sim: injected failure of create #{n} ({spec.name})")
        d = self._dir(spec.name)
        if d.exists():
            raise BackendError(f"sim: machine {spec.name!r} already exists")
        private_dir(d.parent)
        os.mkdir(d, DIR_MODE)
        os.mkdir(d / "fs", DIR_MODE)
        self._write_meta(
            spec.name,
            {
                "labels": dict(spec.labels),
                "running": False,
                "network": spec.network,
                "index": spec.index,
                "created": time.time(),
            },
        )

    def start(self, name: str) -> None:
        meta = self._meta(name)
        self._pause(self.settings.start_latency)
        meta["running"] = True
        meta["started"] = time.time()
        self._write_meta(name, meta)

    def _probe(self, name: str) -> None:
        meta = self._meta(name)
        if self.settings.hang_on_start:
            raise BackendError(f"sim: {name} hangs on start (injected)")
        if not meta.get("running") or (self._dir(name) / "dead").exists():
            raise BackendError(f"sim: {name} is not running")
        started = meta.get("started")
        assert isinstance(started, float | int)
        if time.time() - started < self.settings.ready_latency:
            raise BackendError(f"sim: {name} still booting")

    def wait_ready(self, name: str, timeout: float) -> None:
        probe_until(lambda: self._probe(name), timeout=timeout, what=f"sim machine {name}")

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        self._probe(name)
        self._pause(self.settings.exec_latency)
        fs = self._dir(name) / "fs"
        res = _proc.run(  # ExecTimeout propagates, as the protocol says
            argv,
            timeout=timeout,
            env={"HOME": str(fs), "VMPOOL_MACHINE": name, "PWD": str(fs)},
            cwd=fs,
        )
        return ExecResult(res.returncode, res.stdout, res.stderr)

    def snapshot(self, name: str) -> None:
        d = self._dir(name)
        snap = d / "snapshot"
        if snap.exists():
            shutil.rmtree(snap)
        shutil.copytree(d / "fs", snap, symlinks=True)

    def reset(self, name: str) -> None:
        self._probe(name)
        self._pause(self.settings.reset_latency)
        d = self._dir(name)
        shutil.rmtree(d / "fs")
        snap = d / "snapshot"
        if snap.exists():
            shutil.copytree(snap, d / "fs", symlinks=True)
        else:
            os.mkdir(d / "fs", DIR_MODE)

    def delete(self, name: str) -> None:
        d = self._dir(name)
        if not d.exists():
            return
        self._pause(self.settings.delete_latency)
        if self.settings.fail_delete:
            raise BackendError(f"sim: injected failure of delete ({name})")
        # rename first so a concurrent list() never sees a half-deleted machine
        tomb = d.with_name(f".{d.name}.{os.getpid()}.deleting")
        try:
            os.rename(d, tomb)
        except FileNotFoundError:
            return
        shutil.rmtree(tomb, ignore_errors=True)

    def list(self, prefix: str) -> builtins.list[MachineInfo]:
        out = []
        base = self.root / "machines"
        if not base.is_dir():
            return []
        for d in sorted(base.iterdir()):
            if d.name.startswith(".") or not d.name.startswith(prefix):
                continue
            with contextlib.suppress(BackendError, ValueError):
                meta = self._meta(d.name)
                labels = meta.get("labels") or {}
                assert isinstance(labels, dict)
                out.append(MachineInfo(d.name, labels, bool(meta.get("running"))))
        return out

    def address(self, name: str) -> str | None:
        meta = self._meta(name)
        net = meta.get("network")
        if not net:
            return None
        octet = int(hashlib.sha256(str(net).encode()).hexdigest(), 16) % 250
        index = meta.get("index", 0)
        assert isinstance(index, int)
        return f"10.99.{octet}.{10 + index}"

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        d = private_dir(self.root / "networks")
        # a concurrent list_networks never sees a half-written record
        atomic_write(d / f"{validate_name(name)}.json", json.dumps({"labels": dict(labels)}))

    def delete_network(self, name: str) -> None:
        if self.settings.fail_delete:
            raise BackendError(f"sim: injected failure of delete ({name})")
        with contextlib.suppress(FileNotFoundError):
            (self.root / "networks" / f"{validate_name(name)}.json").unlink()

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        d = self.root / "networks"
        if not d.is_dir():
            return []
        out = []
        for f in sorted(d.glob(f"{prefix}*.json")):
            with contextlib.suppress(ValueError, OSError):
                out.append(MachineInfo(f.stem, json.loads(f.read_text()).get("labels", {}), True))
        return out

    def ssh(self, name: str) -> SshAccess | None:
        """None: sim machines are directories; there is nothing to log in to."""
        return None

    # -- fault injection for tests ---------------------------------------------------------------
    def kill(self, name: str) -> None:
        """Make the machine stop answering (a VM that died while leased)."""
        os.close(os.open(self._dir(name) / "dead", os.O_WRONLY | os.O_CREAT, FILE_MODE))
