"""Live reset of a podman container: back to its ready state in milliseconds, same container.

At ready time (`LiveReset.snapshot`) it records, in ``<state_dir>/podman/live/<name>/``, the
container's identity (id, PID 1's pid and start time), the processes in its cgroup, a manifest
of its overlay upper directory (and of /dev) and a copy of the upper directory's files. A reset
(`LiveReset.reset`) freezes the cgroup, SIGKILLs every process that was not there at ready
time, and reverts every upper-directory entry that is new, changed (inode or ctime) or gone, to
its ready-time state as the overlay showed it (from the copy, or the image's layers), writing
through the container's own root (``/proc/PID1/root``), one path component at a time, never
following a symlink and never crossing a mount (vmpool.backends.podman.overlay_tree does that work).
It empties /dev/shm and /dev/mqueue, rewrites the files podman bind-mounts (hostname, hosts,
resolv.conf, .containerenv) and removes SysV IPC objects (``ipcrm --all`` in the container's
IPC namespace).

Not restored: the memory (and open files, cwd ...) of processes already running at ready time,
hard-link relations between restored files, anonymous volumes and other mounts (they make the
container ineligible). Whenever a condition does not hold, `reset` says why (INFO) and returns
False: the caller does a full reset.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpool import _proc
from vmpool.backends.podman.overlay_tree import (
    BIND_FILES,
    Entry,
    Layers,
    Manifest,
    Merged,
    Unsupported,
    copy_upper,
    join,
    open_dir,
    parent_and_name,
    read_bind,
    remove_at,
    same_but_times,
    scan,
    write_bind,
)
from vmpool.errors import VmPoolError

log = logging.getLogger(__name__)

#: tmpfs mounts emptied on every reset
EMPTIED = ("dev/shm", "dev/mqueue")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CAP_SYS_ADMIN, _CAP_NET_ADMIN = 21, 12
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux's id; the clock of file times
#: cgroup v1's freezer hierarchy, and the v2 (unified) root
FREEZER_V1 = Path("/sys/fs/cgroup/freezer")
CGROUP_V2 = Path("/sys/fs/cgroup")


# -- processes and cgroups --------------------------------------------------------------------
def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command's name (state first), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    fields = _stat(pid)
    return None if fields is None or fields[0] in (b"Z", b"X") else int(fields[19])


class Cgroup:
    """The container's freezer: cgroup v1's freezer controller, or v2's ``cgroup.freeze``."""

    def __init__(self, pid: int) -> None:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        entries = {c: p for _, cs, p in (ln.split(":", 2) for ln in lines) for c in cs.split(",")}
        v1 = FREEZER_V1 / entries.get("freezer", "//").lstrip("/")
        v2 = CGROUP_V2 / entries.get("", "//").lstrip("/")
        if "freezer" in entries and (v1 / "freezer.state").exists():
            self.path, self.v2 = v1, False
        elif "" in entries and (v2 / "cgroup.freeze").exists():
            self.path, self.v2 = v2, True
        else:
            raise Unsupported(f"no freezer cgroup for pid {pid}")

    def pids(self) -> set[int]:
        return {int(p) for p in (self.path / "cgroup.procs").read_text().split()}

    def frozen(self) -> bool:
        if self.v2:
            return "frozen 1" in (self.path / "cgroup.events").read_text()
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def freeze(self, on: bool, timeout: float = 5.0) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if on else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if on else "THAWED")
        deadline = time.monotonic() + timeout
        while on and not self.frozen():
            if time.monotonic() > deadline:
                raise Unsupported(f"{self.path} did not freeze within {timeout:g}s")
            time.sleep(0.0005)  # the poll interval of a deadline loop (no event to wait on)


def _wait_gone(pids: dict[int, int | None], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(start_time(p) == t for p, t in pids.items()):
        if time.monotonic() > deadline:
            raise Unsupported(f"processes {sorted(pids)} survived SIGKILL for {timeout:g}s")
        time.sleep(0.0005)  # the poll interval of a deadline loop (no event to wait on)


def _wait_clock_past(ns: int, timeout: float = 1.0) -> None:
    """Until file times (the coarse clock) are past ``ns``: a later change then has a ctime
    different from any recorded one."""
    deadline = time.monotonic() + timeout
    while time.clock_gettime_ns(_COARSE) <= ns:
        if time.monotonic() > deadline:
            raise Unsupported("the coarse clock did not advance")
        time.sleep(0.0005)  # the poll interval of a deadline loop (no event to wait on)


# -- the baseline and the reset ------------------------------------------------------------------
@dataclass
class Baseline:
    id: str
    pid: int
    start: int
    pids: dict[int, int]
    upper: str
    lowers: list[str]
    ready: Manifest
    clean: Manifest
    dev: Manifest
    xattrs: dict[str, dict[str, str]]
    binds: dict[str, list[Any]]
    address: str | None

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("ready", "clean", "dev"):
            data[key] = {rel: list(e) for rel, e in getattr(self, key).items()}
        data["pids"] = {str(p): t for p, t in self.pids.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Baseline:
        for key in ("ready", "clean", "dev"):
            data[key] = {rel: Entry(*e) for rel, e in data[key].items()}
        data["pids"] = {int(p): t for p, t in data["pids"].items()}
        return cls(**data)


class LiveReset:
    """Records ready states and resets containers to them in place (see the module doc)."""

    def __init__(self, directory: Path, write_json: Callable[[Path, Any], None]) -> None:
        self.dir = directory
        self._write_json = write_json

    def _machine_dir(self, name: str) -> Path:
        return self.dir / name

    def forget(self, name: str) -> None:
        shutil.rmtree(self._machine_dir(name), ignore_errors=True)

    def _load(self, name: str) -> Baseline | None:
        try:
            data = json.loads((self._machine_dir(name) / "baseline.json").read_text())
            return Baseline.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.info("live reset of %s: unreadable baseline (%s)", name, exc)
            return None

    def snapshot(self, name: str, info: dict[str, Any], own_mounts: set[str],
                 address: str | None) -> bool:
        """Record ``name``'s ready state (``info``: its ``podman inspect``); False (logged at
        INFO, nothing kept) when a live reset will not be possible for it."""
        self.forget(name)
        try:
            baseline = self._record(name, info, own_mounts, address)
        except (Unsupported, OSError, ValueError, KeyError) as exc:
            log.info("no live reset for %s (full resets instead): %s", name, exc)
            self.forget(name)
            return False
        self._write_json(self._machine_dir(name) / "baseline.json", baseline.to_json())
        return True

    def _record(
        self, name: str, info: dict[str, Any], own_mounts: set[str], address: str | None
    ) -> Baseline:
        if os.geteuid() != 0:
            raise Unsupported("not root")
        driver = info.get("GraphDriver") or {}
        data = driver.get("Data") or {}
        if driver.get("Name") != "overlay" or not data.get("UpperDir"):
            raise Unsupported(f"storage driver {driver.get('Name')!r}, not overlay")
        host = info.get("HostConfig") or {}
        if not host.get("Init"):
            raise Unsupported("not started with an init as PID 1 (--init)")
        mounts = {str(m.get("Destination")) for m in info.get("Mounts") or []}
        if mounts - own_mounts or (info.get("Config") or {}).get("Volumes"):
            raise Unsupported(f"volumes or mounts {sorted(mounts - own_mounts)}")
        pid = int((info.get("State") or {}).get("Pid") or 0)
        started = start_time(pid) if pid > 0 else None
        if started is None:
            raise Unsupported("not running")
        caps = int(_status(pid)["CapEff"], 16)
        if caps & (1 << _CAP_SYS_ADMIN | 1 << _CAP_NET_ADMIN):
            raise Unsupported("PID 1 has CAP_SYS_ADMIN or CAP_NET_ADMIN (mounts, network)")
        options = _root_mount_options(pid)
        if any(o in options for o in ("redirect_dir=on", "metacopy=on")):
            raise Unsupported(f"overlay options {options}")
        cgroup = Cgroup(pid)
        cid = str(info.get("Id"))
        if cid not in str(cgroup.path):
            raise Unsupported(f"cgroup {cgroup.path} is not the container {cid}'s")
        upper = str(data["UpperDir"])
        lowers = [p for p in str(data.get("LowerDir") or "").split(":") if p]
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._machine_dir(name).mkdir(mode=0o700)
        blobs = self._machine_dir(name) / "ready"
        blobs.mkdir(mode=0o700)
        cgroup.freeze(True)
        try:
            # a zombie (an exec agent's finished subshell) is no ready-time process
            pids = {p: t for p in cgroup.pids() if (t := start_time(p)) is not None}
            if pids.get(pid) != started:
                raise Unsupported("PID 1 exited while recording")
            up = os.open(upper, _DIR)
            root = os.open(f"/proc/{pid}/root", _DIR & ~os.O_NOFOLLOW)
            try:
                ready = scan(up)
                xattrs = copy_upper(up, ready, blobs)
                dev = self._dev_manifest(root)
                binds = {rel: read_bind(root, rel) for rel in BIND_FILES}
            finally:
                os.close(up)
                os.close(root)
            _wait_clock_past(max(e.ctime for e in ready.values()))
        finally:
            cgroup.freeze(False)
        return Baseline(cid, pid, started, pids, upper, lowers, ready, ready, dev, xattrs, binds,
                        address)

    @staticmethod
    def _dev_manifest(root: int) -> Manifest:
        dev = open_dir("dev", root, dev=None)
        try:
            for rel in EMPTIED:
                fd = open_dir(rel, root, dev=None)
                try:
                    if os.listdir(fd):
                        raise Unsupported(f"/{rel} is not empty at ready time")
                finally:
                    os.close(fd)
            return scan(dev, dev=os.fstat(dev).st_dev)
        finally:
            os.close(dev)

    def address(self, name: str) -> tuple[bool, str | None]:
        """(True, address) when ``name`` is still the container recorded ready (it kept it)."""
        baseline = self._load(name)
        if baseline is None or start_time(baseline.pid) != baseline.start:
            return False, None
        return True, baseline.address

    def kill(self, name: str) -> bool:
        """SIGKILL every process of ``name``'s container from the host, if it is still the one
        recorded ready (best effort: a removal then need not wait for them to stop); True
        when it was."""
        baseline = self._load(name)
        if baseline is None or start_time(baseline.pid) != baseline.start:
            return False
        try:
            pids = Cgroup(baseline.pid).pids()
        except (OSError, Unsupported):
            return False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return True

    def reset(self, name: str) -> bool:
        """Reset ``name`` in place; False (and why, at INFO) when a full reset is needed."""
        baseline = self._load(name)
        if baseline is None:
            log.info("live reset of %s: no baseline; full reset", name)
            return False
        started = time.monotonic()
        try:
            self._reset(name, baseline)
        except (Unsupported, OSError, ValueError, VmPoolError) as exc:
            log.info("live reset of %s failed (full reset instead): %s", name, exc)
            self.forget(name)
            return False
        log.debug("live reset of %s in %.1f ms", name, (time.monotonic() - started) * 1000)
        return True

    def _reset(self, name: str, b: Baseline) -> None:
        if start_time(b.pid) != b.start:
            raise Unsupported("PID 1 is not the ready-time one (the container restarted)")
        cgroup = Cgroup(b.pid)
        if b.id not in str(cgroup.path):
            raise Unsupported("another container")
        if cgroup.frozen():
            raise Unsupported("the container is paused")
        cgroup.freeze(True)
        try:
            for _ in range(5):
                extra = {p: start_time(p) for p in cgroup.pids() - set(b.pids)}
                if not extra:
                    break
                for pid in extra:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                cgroup.freeze(False)
                _wait_gone(extra)
                cgroup.freeze(True)
            else:
                raise Unsupported("new processes keep appearing")
            for pid, start in b.pids.items():
                if start_time(pid) != start:
                    raise Unsupported(f"ready-time process {pid} is gone")
            self._revert(name, b)
        finally:
            cgroup.freeze(False)
        # a test may have stopped a ready-time process (SIGSTOP, ptrace): not a ready state
        stopped = [p for p in b.pids if (_stat(p) or [b"?"])[0] in (b"T", b"t")]
        if stopped:
            raise Unsupported(f"ready-time processes {stopped} are stopped")

    def _revert(self, name: str, b: Baseline) -> None:
        up = os.open(b.upper, _DIR)
        root = os.open(f"/proc/{b.pid}/root", _DIR & ~os.O_NOFOLLOW)
        lowers = [os.open(p, _DIR) for p in b.lowers]
        try:
            merged = Merged(root)
            layers = Layers(b.ready, self._machine_dir(name) / "ready", lowers)
            current = scan(up)
            changed = sorted(p for p in set(current) | set(b.clean)
                             if current.get(p) != b.clean.get(p))
            restored: list[str] = []
            fix: list[tuple[str, Entry, dict[str, bytes]]] = []
            for rel in changed:
                if any(rel.startswith(r + "/") for r in restored):
                    continue
                target = layers.resolve(rel)
                now = merged.lstat(rel) if rel != "." else os.fstat(root)
                if target is None:
                    if now is not None:
                        merged.remove(rel)
                    continue
                layer, entry = target
                xattrs = layers.xattrs(layer, rel, b.xattrs)
                cur = current.get(rel)
                old = b.clean.get(rel)
                newly_opaque = cur is not None and cur.opaque and not (old and old.opaque)
                if entry.kind == "d" and now is not None and stat.S_ISDIR(now.st_mode) \
                        and not newly_opaque:
                    fix.append((rel, entry, xattrs))  # its children are entries of their own
                    continue
                if rel == ".":
                    raise Unsupported("the root directory was replaced")
                if now is not None:
                    merged.remove(rel)
                self._restore_tree(merged, layers, rel, b)
                restored.append(rel)
            for rel, entry, xattrs in reversed(fix):  # children first: their times stay
                merged.set_meta(rel, entry, xattrs)
            self._revert_dev(root, b)
            for rel, (content, mode, uid, gid) in b.binds.items():
                write_bind(root, rel, base64.b64decode(content), mode, uid, gid)
            # SysV IPC objects; this also gives the coarse clock time to pass the changes' ctimes
            _proc.run(["nsenter", "-t", str(b.pid), "--ipc", "ipcrm", "--all"],
                      timeout=10).check(f"ipcrm in {name}")
            clean = scan(up)
            _wait_clock_past(max(e.ctime for e in clean.values()))
        finally:
            for fd in (up, root, *lowers):
                os.close(fd)
        if clean != b.clean:
            b.clean = clean
            self._write_json(self._machine_dir(name) / "baseline.json", b.to_json())

    def _restore_tree(self, merged: Merged, layers: Layers, rel: str, b: Baseline) -> None:
        resolved = layers.resolve(rel)
        if resolved is None:
            return
        layer, entry = resolved
        xattrs = layers.xattrs(layer, rel, b.xattrs)
        merged.create(rel, layer, entry, layers, xattrs)
        if entry.kind == "d":
            for child in layers.children(rel):
                self._restore_tree(merged, layers, join(rel, child), b)
            merged.set_meta(rel, entry, xattrs)

    @staticmethod
    def _revert_dev(root: int, b: Baseline) -> None:
        dev = open_dir("dev", root, dev=None)
        try:
            devno = os.fstat(dev).st_dev
            if b.dev["."].ino != os.fstat(dev).st_ino:
                raise Unsupported("/dev is not the ready-time one")
            new = set(scan(dev, dev=devno)) - set(b.dev)
            for rel in sorted(new):
                if parent_and_name(rel)[0] not in new:
                    with Merged(dev).parent(rel) as (fd, name):
                        remove_at(fd, name, devno)
            for rel in EMPTIED:
                fd = open_dir(rel, root, dev=None)
                try:
                    for child in os.listdir(fd):
                        remove_at(fd, child, os.fstat(fd).st_dev)
                finally:
                    os.close(fd)
            after = scan(dev, dev=devno)
            for rel, entry in b.dev.items():
                if after.get(rel) != entry and not same_but_times(after.get(rel), entry):
                    raise Unsupported(f"/dev/{rel} changed")
        finally:
            os.close(dev)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _root_mount_options(pid: int) -> str:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[-1]
    raise Unsupported("no root mount")
