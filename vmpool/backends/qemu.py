"""The QEMU backend: one daemonized qemu-system process per machine, QMP plus the guest agent.

Each machine is a run directory ``<state_dir>/qemu/<name>`` (labels, a qcow2 overlay of the
image's base disk, pidfile, console log, sockets). QMP (``qemu.qmp``) does ``savevm``/``loadvm``
and ``quit``; commands run through qemu-ga over a virtio-serial chardev socket. Machines of one
pool share a network through a hub process on a unix socket in a 0700 directory of ours
(``-netdev stream``; ``qemu_net``): another local user can neither read nor send their frames.

With ``warmup = "clone"`` a machine does not boot: it restores (``-incoming``) a running state
saved once per host from a template guest of the same configuration, then the guest agent gives
it its own hostname, MAC, address and clock. Whatever goes wrong with cloning, the machine boots.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import platformdirs
import portalocker
import psutil
from qemu.qmp import QMPClient, QMPError

from vmpool import _proc
from vmpool._files import (
    DIR_MODE,
    UMASK,
    atomic_write,
    private_dir,
    private_opener,
    tighten,
    tighten_tree,
)
from vmpool.backends import qemu_net
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
from vmpool.backends.qemu_image import MANIFEST_FILE, ImagePaths, build_image, find_image, image_dir
from vmpool.config import QemuSettings
from vmpool.errors import BackendError, ExecTimeout, ReadyTimeout, VmPoolError

__all__ = ["QemuBackend", "build_image", "find_image"]

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]
T = TypeVar("T")

INSTALL_HINT = "apt-get install qemu-system-x86"
IMG_INSTALL_HINT = "apt-get install qemu-utils"
SNAPSHOT_TAG = "vmpool-ready"
NETWORKS_DIR = "networks"

_LAUNCH_TIMEOUT = 60.0
_IMG_TIMEOUT = 60.0
_QMP_TIMEOUT = 10.0
_SNAPSHOT_TIMEOUT = 120.0
_RESYNC_TIMEOUT = 15.0
#: a kept guest-agent connection that does not answer a guest-sync this fast is replaced
_CACHED_SYNC_TIMEOUT = 2.0
_STOP_TIMEOUT = 5.0
_PROBE_STEP_TIMEOUT = 5.0
_KILL_GRACE = 1.0
_FIRST_HOST = 10

#: Bump when the template guest or its saved state changes meaning, so old states are unused.
_TEMPLATE_VERSION = 1
_TEMPLATES_DIR = "qemu-templates"
_TEMPLATE_NAME = "vmpool-template"
#: The template's NIC (the clone sets its own MAC in the guest; the device's is migrated).
_TEMPLATE_MAC = "52:54:00:ff:ff:fe"
#: A template boots like any machine: generous, the host may be busy with other boots.
_TEMPLATE_BOOT_TIMEOUT = 180.0
_SAVE_TIMEOUT = 60.0
#: Waiting for another process's template: its boot plus its save, and some.
_TEMPLATE_LOCK_TIMEOUT = _TEMPLATE_BOOT_TIMEOUT + 2 * _SAVE_TIMEOUT
#: From a clone's launch until its state is restored and personalized; past it, it boots.
_CLONE_TIMEOUT = 60.0
#: Discarding a bad template only waits briefly: whoever holds the lock is replacing it.
_DISCARD_LOCK_TIMEOUT = 2.0
#: A local file: no reason to throttle the save (QEMU's default is 128 MiB/s).
_SAVE_BANDWIDTH = 8 << 30
#: The vmdesc JSON QEMU appends to a complete stream is ~100 KiB; read this much of the tail.
_TRAILER_WINDOW = 4 << 20
_STREAM_MAGIC = b"QEVM\x00\x00\x00\x03"

_LABELS = "labels.json"
_RECORD = "machine.json"
_OVERLAY = "overlay.qcow2"
_PIDFILE = "qemu.pid"
_CONSOLE = "console.log"
_QMP_SOCK = "qmp.sock"
_QGA_SOCK = "qga.sock"


@dataclass(frozen=True)
class _Record:
    """What create() decided about a machine; start() and friends read it back."""

    name: str
    index: int
    sock_dir: str
    kernel: str
    initrd: str
    network: str | None = None
    ip: str | None = None
    prefix: int | None = None
    mac: str | None = None
    #: the network hub's socket (-netdev stream connects to it)
    hub: str | None = None
    accel: str | None = None
    #: the template state this machine was restored from (None: it booted)
    template: str | None = None
    #: identity of that state file ("inode:mtime_ns:size"), to discard exactly it if it fails
    template_stamp: str | None = None
    #: the clone still needs its restore checked and its identity set (done by wait_ready)
    clone_pending: bool = False
    #: time.monotonic() at launch (system-wide on Linux): bounds the clone's restore
    launched_at: float | None = None


@dataclass(frozen=True)
class _Network:
    name: str
    labels: dict[str, str]
    subnet: str
    prefix: int
    #: the directory of the hub's socket: 0700, ours (the network's own, or a short fallback)
    sock_dir: str
    #: names the hub serving this record (on its command line): it exits once it differs
    token: str
    #: the hub's pid, once it runs
    hub_pid: int | None = None

    @property
    def hub_sock(self) -> Path:
        return Path(self.sock_dir) / qemu_net.HUB_SOCK

    def host(self, index: int) -> str:
        host = _FIRST_HOST + index
        if host > 254:
            raise BackendError(
                f"network {self.name}: slot {index} does not fit in /{self.prefix} "
                f"(at most {255 - _FIRST_HOST} machines)"
            )
        return self.subnet.rsplit(".", 1)[0] + f".{host}"


class _Died(Exception):  # private control flow: never escapes this module
    """The qemu process is gone; stop probing."""


class _Failed(Exception):  # private control flow: never escapes this module
    """A probe saw a definite failure; stop probing."""


@dataclass(frozen=True)
class _Template:
    """A validated template state file."""

    path: Path
    stamp: str


class QemuBackend(BackendBase):
    """Machines are qemu-system-x86_64 processes booting the vmpool guest image."""

    name = "qemu"
    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(
        self, settings: QemuSettings, state_dir: Path, *, template_dir: Path | None = None
    ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "qemu"
        #: where clone templates are saved; per host by default, so every session shares them
        self.template_dir = (
            Path(template_dir)
            if template_dir is not None
            else Path(platformdirs.user_cache_dir("vmpool")) / _TEMPLATES_DIR
        )
        self._accel: Accel | None = None
        self._accel_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: guest-agent connections kept open between one process's commands to a machine, until
        #: release() (check-in), reset, delete or a new wait: qemu-ga pauses 100 ms after every
        #: disconnect (its virtio-serial EOF handling), which made each command cost ~115 ms
        self._agents: dict[str, _Agent] = {}
        #: template keys whose build failed in this process: their machines boot, no retry
        self._template_failed: set[str] = set()
        #: one (re)start of a network's hub at a time (warm-up threads start machines at once)
        self._hub_lock = threading.Lock()

    # --- checks and image -------------------------------------------------------------

    def check(self) -> None:
        """Raise BackendUnavailable when qemu, qemu-img or the guest image is missing."""
        _proc.run(
            [self.settings.binary, "--version"], timeout=30, install_hint=INSTALL_HINT
        ).check("qemu --version")
        _proc.run(["qemu-img", "--version"], timeout=30, install_hint=IMG_INSTALL_HINT).check(
            "qemu-img --version"
        )
        find_image(self.settings)

    # --- lifecycle ----------------------------------------------------------------------

    def create(self, spec: MachineSpec) -> None:
        """Write the run directory (labels first), allocate the address, make the overlay."""
        name = validate_name(spec.name)
        if name == NETWORKS_DIR:
            raise BackendError(f"machine name {name!r} is reserved by the qemu backend")
        image = find_image(self.settings)
        run_dir = self._run_dir(name)
        private_dir(self.root)
        try:
            run_dir.mkdir(mode=DIR_MODE)
        except FileExistsError as exc:
            raise BackendError(f"qemu machine {name} already exists ({run_dir})") from exc
        try:
            _write_json(run_dir / _LABELS, dict(spec.labels))
            net: _Network | None = None
            if spec.network is not None:
                net = self._read_network(spec.network)
                if net is None:
                    raise BackendError(
                        f"network {spec.network} does not exist (create_network() first)"
                    )
            sock_dir = qemu_net.make_socket_dir(run_dir, _QMP_SOCK)
            record = _Record(
                name=name,
                index=spec.index,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                network=net.name if net else None,
                ip=net.host(spec.index) if net else None,
                prefix=net.prefix if net else None,
                mac=_mac(net.name, spec.index) if net else None,
                hub=str(net.hub_sock) if net else None,
            )
            _make_overlay(image, run_dir / _OVERLAY)
            _write_json(run_dir / _RECORD, asdict(record))
        except BaseException:
            self._remove_files(run_dir)
            raise
        log.debug("created qemu machine %s in %s", name, run_dir)

    def start(self, name: str) -> None:
        """Launch qemu daemonized; returns once its sockets exist (the guest is still booting).

        With ``warmup = "clone"`` it first makes sure the template state exists (the first
        machine of a configuration builds it), then launches qemu restoring it.
        """
        run_dir = self._existing(name)
        if self._process(run_dir) is not None:
            log.debug("qemu machine %s already running", name)
            return
        record = self._record(run_dir)
        accel = self.resolve_accel()
        record = replace(
            record, accel=accel, template=None, template_stamp=None, clone_pending=False
        )
        if self.settings.warmup == "clone":
            template = self._template_for(record, accel)
            if template is not None:
                clone = replace(
                    record,
                    template=str(template.path),
                    template_stamp=template.stamp,
                    clone_pending=True,
                    launched_at=time.monotonic(),
                )
                _write_json(run_dir / _RECORD, asdict(clone))
                try:
                    self._launch(run_dir, clone, accel, incoming=template.path)
                    return
                except BackendError as exc:
                    log.warning("qemu machine %s: clone did not start (%s); booting it", name, exc)
                    self._kill_run(run_dir)
        record = replace(record, launched_at=time.monotonic())
        _write_json(run_dir / _RECORD, asdict(record))
        self._launch(run_dir, record, accel)

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe the guest agent (guest-sync, then `true`) until it answers.

        A clone is first checked to have restored and given its own identity; a clone that
        cannot be is booted instead, within the same wait.
        """
        run_dir = self._existing(name)
        deadline = time.monotonic() + timeout
        record = self._record(run_dir)
        self.release(name)  # the probe opens its own connection; qemu-ga takes one at a time
        if record.clone_pending:
            with self._exclusive(name, deadline):
                record = self._finish_clone(run_dir, self._record(run_dir), deadline)
        remaining = max(deadline - time.monotonic(), 0.01)
        self._wait_agent(run_dir, record, remaining, what=f"qemu machine {name}")

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` through qemu-ga's guest-exec; ExecTimeout (and a kill) after ``timeout``."""
        if not argv:
            raise ValueError("exec needs a command")
        run_dir = self._existing(name)
        record = self._record(run_dir)
        deadline = time.monotonic() + timeout
        with self._exclusive(name, deadline):
            agent = self._agents.pop(name, None)
            try:
                if agent is not None:
                    try:  # still the same guest and still answering? (a sync is ~1 ms)
                        agent.sync(min(deadline, time.monotonic() + _CACHED_SYNC_TIMEOUT))
                    except (OSError, BackendError):
                        agent.close()
                        agent = None
                if agent is None:
                    agent = _Agent.connect(_qga_sock(record), deadline)
                    agent.sync(deadline)
                result = _guest_exec(agent, name, list(argv), timeout, deadline)
            except OSError as exc:
                if agent is not None:
                    agent.close()
                raise BackendError(
                    f"qemu machine {name}: guest agent unreachable: {exc}"
                    f"{self._died_hint(run_dir)}"
                ) from exc
            except BaseException:
                if agent is not None:
                    agent.close()
                raise
            self._agents[name] = agent
            return result

    def release(self, name: str) -> None:
        """Let go of the guest-agent connection this process keeps to ``name`` (at check-in,
        and before anything here opens its own), so that another one can connect."""
        agent = self._agents.pop(name, None)
        if agent is not None:
            agent.close()

    def snapshot(self, name: str) -> None:
        """``savevm`` the running machine under the tag reset() loads."""
        run_dir = self._existing(name)
        with self._exclusive(name, time.monotonic() + _SNAPSHOT_TIMEOUT):
            self._hmp(run_dir, f"savevm {SNAPSHOT_TAG}", _SNAPSHOT_TIMEOUT)

    def reset(self, name: str) -> None:
        """``loadvm`` the ready snapshot, then resynchronise the guest agent."""
        run_dir = self._existing(name)
        record = self._record(run_dir)
        with self._exclusive(name, time.monotonic() + _SNAPSHOT_TIMEOUT):
            self.release(name)
            # one QMP session: loadvm, then whether the guest runs (loadvm resumes only a guest
            # that ran before, and leaves it stopped when it fails)
            output, status = self._qmp_all(
                record,
                [
                    ("human-monitor-command", {"command-line": f"loadvm {SNAPSHOT_TAG}"}),
                    ("query-status", None),
                ],
                _SNAPSHOT_TIMEOUT,
            )
            running = isinstance(status, dict) and status.get("status") == "running"
            failure = output.strip() if isinstance(output, str) else ""
            if failure:
                # a missing snapshot changed nothing: let the machine run on as it was
                if "does not exist" in failure and not running:
                    self._qmp(record, "cont", None, _QMP_TIMEOUT)
                raise BackendError(
                    f"qemu machine {name}: `loadvm {SNAPSHOT_TAG}` failed: {failure}"
                )
            if not running:
                self._qmp(record, "cont", None, _QMP_TIMEOUT)
            self._wait_agent(
                run_dir, record, _RESYNC_TIMEOUT, what=f"qemu machine {name} after reset",
                run_true=False,
            )

    def template_path(self, networked: bool) -> Path:
        """Where the clone template for this configuration (with or without a NIC) is saved."""
        key = self._template_key(find_image(self.settings), self.resolve_accel(), networked)
        return self.template_dir / f"{key}.state"

    def delete(self, name: str) -> None:
        """Quit (or kill) qemu and remove the run directory; a missing machine is success."""
        validate_name(name)
        self.release(name)
        run_dir = self._run_dir(name)
        if not run_dir.exists():
            self._remove_files(run_dir)
            return
        proc = self._process(run_dir)
        if proc is not None:
            self._stop(run_dir, proc)
        self._remove_files(run_dir)
        log.debug("deleted qemu machine %s", name)

    def list(self, prefix: str) -> list[MachineInfo]:
        """Run directories whose name starts with ``prefix``, labels from labels.json."""
        out: list[MachineInfo] = []
        if not self.root.is_dir():
            return out
        for run_dir in sorted(self.root.iterdir()):
            name = run_dir.name
            if name == NETWORKS_DIR or not name.startswith(prefix) or not run_dir.is_dir():
                continue
            try:
                validate_name(name)
            except ValueError:
                continue  # probe dirs, build leftovers
            labels = _read_labels(run_dir / _LABELS)
            out.append(MachineInfo(name, labels, self._process(run_dir) is not None))
        return out

    def address(self, name: str) -> str | None:
        """The machine's address on its pool network, or None without one."""
        return self._record(self._existing(name)).ip

    # --- networks -----------------------------------------------------------------------

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Start the network's hub and record it with a /24 for ``name`` (from its hash).

        The hub's socket is in a 0700 directory of ours; it runs until delete_network(), or
        until this process has exited and no guest is connected to it.
        """
        validate_name(name)
        digest = hashlib.sha256(name.encode()).digest()
        private_dir(self.root)
        folder = qemu_net.private_dir(self._networks_dir(), repair=True)
        net_dir = qemu_net.private_dir(folder / name, repair=True)
        net = _Network(
            name=name,
            labels=dict(labels),
            subnet=f"10.{digest[5]}.{digest[6]}.0",
            prefix=24,
            sock_dir=str(qemu_net.make_socket_dir(net_dir, qemu_net.HUB_SOCK)),
            token="",
        )
        try:
            with self._hub_lock:
                self._start_hub(net)
        except BaseException:
            self.delete_network(name)
            raise

    def delete_network(self, name: str) -> None:
        """Stop the network's hub, remove its record and sockets; a missing network is success."""
        validate_name(name)
        path = self._network_path(name)
        data = _read_json_quiet(path)
        # the record first: a hub that cannot be signalled sees it gone and exits by itself
        path.unlink(missing_ok=True)
        proc = qemu_net.find_hub(data.get("hub_pid"), data.get("token"))
        if proc is not None:
            _kill(proc)
        net_dir = self._networks_dir() / name
        recorded = data.get("sock_dir")
        sock_dirs = {qemu_net.socket_dir(net_dir, qemu_net.HUB_SOCK)}  # also without a record
        if isinstance(recorded, str):
            sock_dirs.add(Path(recorded))
        shutil.rmtree(net_dir, ignore_errors=True)
        for sock_dir in sock_dirs - {net_dir}:
            if qemu_net.is_private_dir(sock_dir.parent):
                shutil.rmtree(sock_dir, ignore_errors=True)

    def _start_hub(self, net: _Network) -> _Network:
        """Record ``net`` under a new token and start its hub (a previous one sees the new
        token and exits); returns the record with the hub's pid. Call with _hub_lock held."""
        net = replace(net, token=secrets.token_hex(12), hub_pid=None)
        path = self._network_path(net.name)
        _write_json(path, asdict(net))
        pid = qemu_net.start_hub(
            net.hub_sock, path, net.token, self._networks_dir() / net.name / qemu_net.HUB_LOG
        )
        net = replace(net, hub_pid=pid)
        _write_json(path, asdict(net))
        log.debug("network %s: hub pid %d on %s", net.name, pid, net.hub_sock)
        return net

    @contextlib.contextmanager
    def _hub_held(self, record: _Record) -> Iterator[None]:
        """Around a guest's launch: its network's hub runs (started if gone: it exits once its
        creator is gone and no guest is connected) and a connection of ours holds it until
        qemu has connected, which it does before -daemonize returns. (A qemu that finds no
        hub to connect to starts all the same, silently offline.)"""
        if record.network is None or record.hub is None:
            yield
            return
        with self._hub_lock:
            net = self._read_network(record.network)
            if net is None:
                raise BackendError(
                    f"network {record.network} does not exist (create_network() first)"
                )
            held = None
            if qemu_net.find_hub(net.hub_pid, net.token) is not None:
                held = _connect_quiet(net.hub_sock)
            if held is None:
                log.info("network %s: its hub is not running; starting one", net.name)
                net = self._start_hub(net)
                held = _connect_quiet(net.hub_sock)
                if held is None:
                    raise BackendError(f"network {net.name}: its new hub does not accept")
        with held:
            yield

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        """Network records whose name starts with ``prefix`` (a recorded network is usable)."""
        out: list[MachineInfo] = []
        folder = self._networks_dir()
        if not folder.is_dir():
            return out
        for path in sorted(folder.glob("*.json")):
            name = path.stem
            if not name.startswith(prefix):
                continue
            labels = _read_json(path).get("labels")
            if isinstance(labels, dict):
                out.append(MachineInfo(name, {str(k): str(v) for k, v in labels.items()}, True))
        return out

    def ssh(self, name: str) -> SshAccess | None:
        """None: the busybox guest has no sshd (the Debian guest will forward one)."""
        return None

    # --- acceleration -------------------------------------------------------------------

    def resolve_accel(self) -> Accel:
        """The accelerator machines use: as configured, or for ``auto`` a cached KVM verdict.

        ``auto`` boots the image once per host under KVM with a deadline
        (``kvm_probe_timeout``); KVM counts only if the guest agent answers in time.
        """
        with self._accel_lock:
            if self._accel is None:
                self._accel = self._decide_accel()
            return self._accel

    def _decide_accel(self) -> Accel:
        if self.settings.accel != "auto":
            return self.settings.accel
        if not _kvm_device_usable():
            log.info("qemu: /dev/kvm missing or not accessible, using tcg")
            return "tcg"
        image = find_image(self.settings)
        key = self._accel_key(image)
        # the verdict belongs to the host, not to one state directory: every new state dir
        # (each CI job, each pytester run) would otherwise pay a full probe deadline again
        cache_dir = Path(platformdirs.user_cache_dir("vmpool"))
        cache = cache_dir / "accel.json"
        lock = cache_dir / ".accel.lock"
        private_dir(cache_dir)
        private_dir(self.root)
        wait = self.settings.kvm_probe_timeout * 2 + _LAUNCH_TIMEOUT
        try:
            with portalocker.Lock(str(lock), mode="a", timeout=wait, opener=private_opener):
                verdicts = _read_json(cache)
                cached = verdicts.get(key)
                if isinstance(cached, dict) and cached.get("accel") in ("kvm", "tcg"):
                    return cast(Accel, cached["accel"])
                self._remove_stale_probes()
                accel, reason = self._probe_kvm(image)
                verdicts[key] = {
                    "accel": accel,
                    "reason": reason,
                    "binary": self.settings.binary,
                    "host_kernel": os.uname().release,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                _write_json(cache, verdicts)
                return accel
        except portalocker.exceptions.LockException as exc:
            raise BackendError(f"timed out waiting for another KVM probe ({lock})") from exc

    def _accel_key(self, image: ImagePaths) -> str:
        binary = shutil.which(self.settings.binary) or self.settings.binary
        parts: list[str] = [os.path.realpath(binary), os.uname().release]
        try:
            st = Path(binary).stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append("?")
        # the guest kernel by content: every freshly built image copies the same kernel
        # with a new mtime, and must not cost another probe
        try:
            parts.append(hashlib.sha256(image.kernel.read_bytes()).hexdigest())
        except OSError:
            parts.append("?")
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def _remove_stale_probes(self) -> None:
        """Probe guests left by an interrupted run (we hold the probe lock, so none is live)."""
        for run_dir in self.root.glob(".kvm-probe-*"):
            proc = self._process(run_dir)
            if proc is not None:
                _kill(proc)
            self._remove_files(run_dir)

    def _probe_kvm(self, image: ImagePaths) -> tuple[Accel, str]:
        timeout = self.settings.kvm_probe_timeout
        run_dir = Path(tempfile.mkdtemp(prefix=".kvm-probe-", dir=self.root))
        started = time.monotonic()
        log.info("qemu: probing KVM by booting the image (deadline %gs)", timeout)
        try:
            sock_dir = qemu_net.make_socket_dir(run_dir, _QMP_SOCK)
            record = _Record(
                name="kvm-probe",
                index=0,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                accel="kvm",
            )
            _make_overlay(image, run_dir / _OVERLAY)
            try:
                self._launch(run_dir, record, "kvm")
                self._wait_agent(run_dir, record, timeout, what="KVM probe guest")
            except VmPoolError as exc:
                reason = f"KVM guest did not answer: {exc}"
                log.warning("qemu: %s; using tcg", reason)
                return "tcg", reason
            reason = f"KVM guest answered in {time.monotonic() - started:.1f}s"
            log.info("qemu: %s; using kvm", reason)
            return "kvm", reason
        finally:
            proc = self._process(run_dir)
            if proc is not None:
                _kill(proc)
            self._remove_files(run_dir)

    # --- internals ----------------------------------------------------------------------

    def _run_dir(self, name: str) -> Path:
        return self.root / name

    def _networks_dir(self) -> Path:
        return self.root / NETWORKS_DIR

    def _network_path(self, name: str) -> Path:
        return self._networks_dir() / f"{name}.json"

    def _read_network(self, name: str) -> _Network | None:
        data = _read_json(self._network_path(name))
        if not data:
            return None
        try:
            return _Network(**data)
        except TypeError as exc:
            raise BackendError(f"network record {name} is unreadable: {exc}") from exc

    def _existing(self, name: str) -> Path:
        validate_name(name)
        run_dir = self._run_dir(name)
        if not (run_dir / _RECORD).is_file():
            raise BackendError(f"qemu machine {name} does not exist (no {run_dir / _RECORD})")
        return run_dir

    def _record(self, run_dir: Path) -> _Record:
        data = _read_json(run_dir / _RECORD)
        try:
            return _Record(**data)
        except TypeError as exc:
            raise BackendError(f"{run_dir / _RECORD} is unreadable: {exc}") from exc

    @contextlib.contextmanager
    def _exclusive(self, name: str, deadline: float) -> Iterator[None]:
        """One agent/monitor conversation per machine at a time within this process."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise ExecTimeout(f"qemu machine {name} stayed busy with another command")
        try:
            yield
        finally:
            lock.release()

    def _cmdline(self, record: _Record | None) -> str:
        """The kernel command line; ``None`` is the template's (no address: clones get theirs)."""
        hostname = record.name if record is not None else _TEMPLATE_NAME
        cmdline = ["console=ttyS0", "quiet", "panic=1", f"vmpool.hostname={hostname}"]
        if record is not None and record.ip is not None:
            cmdline.append(f"vmpool.ip={record.ip}/{record.prefix}")
        if self.settings.append:
            cmdline.append(self.settings.append)
        return " ".join(cmdline)

    def _argv(
        self,
        run_dir: Path,
        record: _Record,
        accel: Accel,
        *,
        template: bool = False,
        incoming: Path | None = None,
    ) -> builtins.list[str]:
        """qemu's command line. A template and its clones differ only in host-side parts
        (paths, sockets, netdev, MAC property): the devices must match for the restore."""
        s = self.settings
        cloned = template or incoming is not None
        argv = [
            s.binary,
            "-daemonize",
            "-nodefaults",
            "-no-reboot",
            "-display", "none",
            "-name", f"guest={record.name},process={record.name}",
            "-M", s.machine,
            "-accel", accel,
            "-m", str(s.memory),
            "-smp", str(s.cpus),
            "-serial", f"file:{run_dir / _CONSOLE}",
            "-kernel", record.kernel,
            "-initrd", record.initrd,
            "-append", self._cmdline(None if cloned else record),
            "-drive", f"file={run_dir / _OVERLAY},if=virtio,format=qcow2",
            "-device", "virtio-serial",
            "-chardev", f"socket,path={_qga_sock(record)},server=on,wait=off,id=qga0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{_qmp_sock(record)},server=on,wait=off",
            "-pidfile", str(run_dir / _PIDFILE),
        ]
        if record.mac is not None:
            if record.hub is not None:
                # a unix socket in a 0700 directory: only we can connect, unlike an inet
                # socket (a multicast group on 127.0.0.1 is open to every local user)
                netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={record.hub}"
            else:
                # the template's NIC only has to exist: a hub port with nothing else on it
                netdev = "hubport,id=n0,hubid=0"
            argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={record.mac}"]
        if incoming is not None:
            # QEMU runs an exec: URI through /bin/sh; the path is ours, quote it anyway
            argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
        return argv

    def _launch(
        self,
        run_dir: Path,
        record: _Record,
        accel: Accel,
        *,
        template: bool = False,
        incoming: Path | None = None,
    ) -> None:
        for stale in (run_dir / _PIDFILE, _qmp_sock(record), _qga_sock(record)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = self._argv(run_dir, record, accel, template=template, incoming=incoming)
        with self._hub_held(record):
            result = _proc.run(argv, timeout=_LAUNCH_TIMEOUT, install_hint=INSTALL_HINT)
        if result.returncode != 0:
            raise BackendError(
                f"qemu for {record.name} failed to start (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}{self._died_hint(run_dir)}"
            )
        tighten_tree(run_dir)  # qemu's -daemonize sets umask 027 (pidfile, console.log: 0640)
        log.debug("started qemu for %s (%s) in %.2fs", record.name, accel, result.duration)

    def _kill_run(self, run_dir: Path) -> None:
        proc = self._process(run_dir)
        if proc is not None:
            _kill(proc)

    # --- clones -------------------------------------------------------------------------

    def _template_key(self, image: ImagePaths, accel: Accel, networked: bool) -> str:
        """What a saved state depends on: the guest image, the machine and the qemu binary."""
        s = self.settings
        manifest_files = _read_json_quiet(image_dir(s) / MANIFEST_FILE).get("files")
        parts: list[str] = [
            f"v{_TEMPLATE_VERSION}",
            json.dumps(manifest_files, sort_keys=True),
            f"memory={s.memory}",
            f"cpus={s.cpus}",
            f"machine={s.machine}",
            f"accel={accel}",
            f"append={s.append}",
            f"networked={networked}",
            *(f"{path}:{ident}" for path, ident in self._template_files(image).items()),
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]

    def _template_files(self, image: ImagePaths) -> dict[str, str]:
        """The files a template depends on, each with its "size:mtime_ns" ("?" if missing)."""
        binary = shutil.which(self.settings.binary) or self.settings.binary
        return {
            os.path.realpath(path): _file_identity(Path(path))
            for path in (binary, image.kernel, image.initrd, image.disk)
        }

    def _prune_templates(self, keep: Path) -> None:
        """Remove templates whose input files are gone or changed: no key can reach them again.

        (Each rebuilt image, and each test session's temporary one, would otherwise leave
        ~90 MiB behind.)
        """
        for info_path in self.template_dir.glob("*.json"):
            state = info_path.with_suffix(".state")
            if state == keep:
                continue
            files = _read_json_quiet(info_path).get("files")
            if not isinstance(files, dict):
                continue  # not ours, or from a build without the record: leave it
            if all(_file_identity(Path(p)) == ident for p, ident in files.items()):
                continue
            log.info("qemu: removing the clone template %s (its inputs changed)", state)
            state.unlink(missing_ok=True)
            info_path.unlink(missing_ok=True)

    def prepare(self, *, networked: bool) -> None:
        """The slow one-off work, done before any machine is asked for: the KVM verdict and,
        with clone warm-up, the template (the plugin calls this while tests are collected)."""
        accel = self.resolve_accel()
        if self.settings.warmup == "clone":
            self._template(networked, accel, "the pool")

    def _template_for(self, record: _Record, accel: Accel) -> _Template | None:
        """The valid template state for ``record``'s configuration, built if missing.

        None (and a warning) when it cannot be had: the caller boots the machine instead.
        """
        return self._template(record.mac is not None, accel, f"qemu machine {record.name}")

    def _template(self, networked: bool, accel: Accel, who: str) -> _Template | None:
        try:
            image = find_image(self.settings)
            key = self._template_key(image, accel, networked)
        except VmPoolError as exc:
            log.warning("%s: no clone template (%s); booting instead", who, exc)
            return None
        with self._locks_guard:
            if key in self._template_failed:
                return None
        path = self.template_dir / f"{key}.state"
        found = _valid_template(path)
        if found is not None:
            return found
        lock = self.template_dir / f".{key}.lock"
        try:
            private_dir(self.template_dir)
            # one builder per host: other processes (xdist workers, sessions) wait for it
            with portalocker.Lock(
                str(lock), mode="a", timeout=_TEMPLATE_LOCK_TIMEOUT, opener=private_opener
            ):
                found = _valid_template(path)
                if found is not None:
                    return found
                self._build_template(image, accel, networked, key, path)
                found = _valid_template(path)
                if found is None:
                    raise BackendError(f"{path} is missing or incomplete after the build")
                return found
        except (VmPoolError, OSError, portalocker.exceptions.LockException) as exc:
            log.warning(
                "qemu: could not build the clone template %s (%s: %s); booting machines instead",
                path, type(exc).__name__, exc,
            )
            with self._locks_guard:
                self._template_failed.add(key)
            return None

    def _build_template(
        self, image: ImagePaths, accel: Accel, networked: bool, key: str, path: Path
    ) -> None:
        """Boot a template guest, save its running state to ``path`` (atomically), quit it.

        Called with the template's lock held, so leftovers of this key are an interrupted
        build's: they are removed first.
        """
        for stale in [*self.template_dir.glob(f".build-{key}-*"),
                      *self.template_dir.glob(f".{key}.state.*.tmp")]:
            if stale.is_dir():
                self._kill_run(stale)
                self._remove_files(stale)
            else:
                stale.unlink(missing_ok=True)
        started = time.monotonic()
        run_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.template_dir))
        tmp = self.template_dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        log.info("qemu: building the clone template %s", path)
        try:
            sock_dir = qemu_net.make_socket_dir(run_dir, _QMP_SOCK)
            record = _Record(
                name=_TEMPLATE_NAME,
                index=0,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                mac=_TEMPLATE_MAC if networked else None,
                accel=accel,
            )
            _write_json(run_dir / _RECORD, asdict(record))  # _stop() and cleanup read it
            _make_overlay(image, run_dir / _OVERLAY)
            self._launch(run_dir, record, accel, template=True)
            self._wait_agent(run_dir, record, _TEMPLATE_BOOT_TIMEOUT, what="qemu clone template")
            booted = time.monotonic()
            self._save_state(run_dir, record, tmp)
            _write_json(
                path.with_suffix(".json"),
                {
                    "settings": self.settings.model_dump(mode="json"),
                    "accel": accel,
                    "networked": networked,
                    "files": self._template_files(image),
                    "size": tmp.stat().st_size,
                    "boot_seconds": round(booted - started, 2),
                    "save_seconds": round(time.monotonic() - booted, 2),
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            tighten(tmp)  # written by qemu under its own umask 027
            os.replace(tmp, path)
            self._prune_templates(keep=path)
            log.info(
                "qemu: clone template saved in %.1fs (boot %.1fs): %s",
                time.monotonic() - started, booted - started, path,
            )
        finally:
            proc = self._process(run_dir)
            if proc is not None:
                self._stop(run_dir, proc)
            self._remove_files(run_dir)
            tmp.unlink(missing_ok=True)

    def _save_state(self, run_dir: Path, record: _Record, dest: Path) -> None:
        """``migrate`` the running guest to ``dest``; returns once the file is complete."""
        # On completion QEMU closes the pipe and at once SIGTERMs the process it started, which
        # could cut cat short. `; :` stops shells that exec a lone last command (bash, newer
        # dash) from making cat that process: the shell takes the signal, cat finishes writing.
        uri = f"exec:cat > {shlex.quote(str(dest))}; :"
        self._qmp_all(
            record,
            [
                ("migrate-set-parameters", {"max-bandwidth": _SAVE_BANDWIDTH}),
                ("migrate", {"uri": uri}),
            ],
            _QMP_TIMEOUT,
        )

        def migrated() -> None:
            if self._process(run_dir) is None:
                raise _Died
            info = self._qmp(record, "query-migrate", None, _QMP_TIMEOUT)
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled", None):
                detail = info.get("error-desc", "") if isinstance(info, dict) else ""
                raise _Failed(f"migration {status}: {detail}")
            raise BackendError(f"migration {status}")

        def written() -> None:
            if _valid_template(dest) is None:
                raise BackendError(f"{dest} is not complete yet")

        what = "saving the clone template"
        try:
            probe_until(migrated, timeout=_SAVE_TIMEOUT, what=what, first_interval=0.02,
                        max_interval=0.2)
            probe_until(written, timeout=_SAVE_TIMEOUT, what=what, first_interval=0.01,
                        max_interval=0.2)
        except _Died:
            raise BackendError(f"{what}: qemu exited{self._died_hint(run_dir)}") from None
        except _Failed as exc:
            raise BackendError(f"{what}: {exc}") from None

    def _finish_clone(self, run_dir: Path, record: _Record, deadline: float) -> _Record:
        """Check the restore, give the clone its identity; boot it instead if that fails.

        Returns the record to probe with. Raises ReadyTimeout when ``deadline`` (one slice of
        the caller's wait) passes first while the clone still has time of its own.
        """
        if not record.clone_pending:
            return record
        launched = record.launched_at if record.launched_at is not None else time.monotonic()
        clone_deadline = launched + _CLONE_TIMEOUT
        phase = "restore"
        try:
            timeout = min(deadline, clone_deadline) - time.monotonic()
            if timeout <= 0:
                raise ReadyTimeout(f"qemu machine {record.name} is still restoring")
            self._await_restore(run_dir, record, timeout)
            phase = "identity"
            self._personalize(run_dir, record, min(deadline, clone_deadline))
        except ReadyTimeout as exc:
            if time.monotonic() < clone_deadline:
                raise  # the caller's slice ended; the clone has time left
            failure = f"{phase}: not done {_CLONE_TIMEOUT:g}s after launch: {exc}"
        except _Died:
            failure = f"{phase}: qemu exited{self._died_hint(run_dir)}"
        except (_Failed, VmPoolError, OSError) as exc:
            failure = f"{phase}: {exc}"
        else:
            done = replace(record, clone_pending=False)
            _write_json(run_dir / _RECORD, asdict(done))
            return done
        if not (run_dir / _RECORD).is_file():
            raise BackendError(f"qemu machine {record.name} was deleted while it restored")
        log.warning("qemu machine %s: clone failed (%s); booting it instead", record.name, failure)
        if phase == "restore" and "qemu exited" in failure and record.template is not None:
            # a state qemu cannot load is of no use to the next machine either
            self._discard_template(Path(record.template), record.template_stamp)
        self._kill_run(run_dir)
        accel = cast(Accel, record.accel or self.resolve_accel())
        booted = replace(
            record, template=None, template_stamp=None, clone_pending=False,
            launched_at=time.monotonic(),
        )
        _write_json(run_dir / _RECORD, asdict(booted))
        self._launch(run_dir, booted, accel)
        return booted

    def _await_restore(self, run_dir: Path, record: _Record, timeout: float) -> None:
        """Until the clone runs: a state saved running resumes by itself, a paused one not."""

        def probe() -> None:
            if self._process(run_dir) is None:
                raise _Died
            status = self._qmp(record, "query-status", None, _QMP_TIMEOUT)
            state = status.get("status") if isinstance(status, dict) else None
            if state == "running":
                return
            if state == "inmigrate":
                raise BackendError("still restoring")
            if state == "paused":
                self._qmp(record, "cont", None, _QMP_TIMEOUT)
                raise BackendError("was paused, resumed it")
            raise _Failed(f"after restore the guest is {state}")

        probe_until(probe, timeout=timeout, what=f"qemu machine {record.name} restore",
                    first_interval=0.02, max_interval=0.25)

    def _personalize(self, run_dir: Path, record: _Record, deadline: float) -> None:
        """Give a clone its hostname, clock, MAC and address (it has the template's)."""
        script = _identity_script(record)
        sock = _qga_sock(record)
        what = f"qemu machine {record.name} identity"

        def probe() -> None:
            if self._process(run_dir) is None:
                raise _Died
            now = time.monotonic()
            step = min(now + _PROBE_STEP_TIMEOUT, max(deadline, now + 0.2))
            with _Agent.open(sock, step) as agent:
                agent.sync(step)
                # the clock is set as late as possible: the template's is stale
                argv = ["sh", "-c", script, "identity", str(round(time.time()))]
                result = _guest_exec(agent, what, argv, _PROBE_STEP_TIMEOUT, step)
            if not result.ok:
                raise _Failed(f"setting it failed (exit {result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-500:]}")
            seen = result.stdout.split()
            expected = [record.name, *([record.mac, f"{record.ip}/{record.prefix}"]
                                       if record.ip is not None else [])]
            if seen != expected:
                raise _Failed(f"the guest reports {seen}, expected {expected}")

        timeout = max(deadline - time.monotonic(), 0.01)
        probe_until(probe, timeout=timeout, what=what, first_interval=0.05, max_interval=0.5)

    def _discard_template(self, path: Path, stamp: str | None) -> None:
        """Remove the template state at ``path`` if it is still the file with ``stamp``."""
        lock = self.template_dir / f".{path.stem}.lock"
        try:
            with portalocker.Lock(
                str(lock), mode="a", timeout=_DISCARD_LOCK_TIMEOUT, opener=private_opener
            ):
                if stamp is not None and _stamp(path) == stamp:
                    path.unlink(missing_ok=True)
                    log.warning("qemu: removed the clone template %s (qemu could not load it)",
                                path)
        except (OSError, portalocker.exceptions.LockException) as exc:
            log.warning("qemu: could not remove the clone template %s: %s", path, exc)

    def _wait_agent(
        self, run_dir: Path, record: _Record, timeout: float, *, what: str, run_true: bool = True
    ) -> None:
        sock = _qga_sock(record)
        overall = time.monotonic() + timeout

        def probe() -> None:
            if self._process(run_dir) is None:
                raise _Died
            now = time.monotonic()
            # one probe waits for the agent up to a few seconds, never much past the deadline
            deadline = min(now + _PROBE_STEP_TIMEOUT, max(overall, now + 0.2))
            with _Agent.open(sock, deadline) as agent:
                agent.sync(deadline)
                if run_true:
                    result = _guest_exec(agent, what, ["true"], _PROBE_STEP_TIMEOUT, deadline)
                    if not result.ok:
                        raise BackendError(f"`true` exited {result.returncode}: {result.stderr}")

        try:
            probe_until(probe, timeout=timeout, what=what, first_interval=0.05, max_interval=0.5)
        except _Died:
            raise BackendError(f"{what}: qemu exited{self._died_hint(run_dir)}") from None
        except ReadyTimeout as exc:
            raise ReadyTimeout(f"{exc}{self._died_hint(run_dir)}") from None

    def _hmp(self, run_dir: Path, command: str, timeout: float) -> str:
        """Run a human-monitor command through QMP; any output from savevm/loadvm is an error."""
        record = self._record(run_dir)
        reply = self._qmp(
            record, "human-monitor-command", {"command-line": command}, timeout
        )
        output = reply if isinstance(reply, str) else ""
        if output.strip():
            raise BackendError(f"qemu machine {record.name}: `{command}` failed: {output.strip()}")
        return output

    def _qmp(
        self, record: _Record, command: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> object:
        return self._qmp_all(record, [(command, arguments)], timeout)[0]

    def _qmp_all(
        self,
        record: _Record,
        commands: Sequence[tuple[str, Mapping[str, object] | None]],
        timeout: float,
    ) -> builtins.list[object]:
        """Run QMP commands in order over one connection, all within ``timeout``."""
        sock = _qmp_sock(record)
        what = ", ".join(command for command, _ in commands)

        async def go() -> builtins.list[object]:
            client = QMPClient(f"vmpool-{record.name}")
            await client.connect(str(sock))
            try:
                return [await client.execute(command, args) for command, args in commands]
            finally:
                # disconnect() re-raises whatever ended the connection (EOF after `quit`)
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await client.disconnect()

        try:
            return _run_async(asyncio.wait_for(go(), timeout))
        except TimeoutError as exc:
            raise BackendError(
                f"qemu machine {record.name}: QMP {what} timed out after {timeout:g}s"
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise BackendError(
                f"qemu machine {record.name}: QMP {what} failed: {exc or type(exc).__name__}"
            ) from exc

    def _process(self, run_dir: Path) -> psutil.Process | None:
        """The live qemu process of ``run_dir``: its pidfile's pid, checked by command line."""
        try:
            pid = int((run_dir / _PIDFILE).read_text().strip())
        except (OSError, ValueError):
            return None
        found = qemu_net.running(pid)
        if found is None:
            return None
        proc, cmdline = found
        pidfile = str(run_dir / _PIDFILE)
        ours = "-pidfile" in cmdline and pidfile in cmdline and "-name" in cmdline
        return proc if ours else None

    def _stop(self, run_dir: Path, proc: psutil.Process) -> None:
        try:
            self._qmp(self._record(run_dir), "quit", None, _QMP_TIMEOUT)
        except BackendError as exc:
            log.debug("QMP quit failed (%s); signalling pid %s", exc, proc.pid)
        if _wait_gone(proc, _STOP_TIMEOUT):
            return
        _kill(proc)

    def _remove_files(self, run_dir: Path) -> None:
        recorded = _read_json_quiet(run_dir / _RECORD).get("sock_dir")
        sock_dir = (
            Path(recorded) if isinstance(recorded, str)
            else qemu_net.socket_dir(run_dir, _QMP_SOCK)
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        # a fallback directory only through a parent that is still ours (never a symlink)
        if sock_dir != run_dir and qemu_net.is_private_dir(sock_dir.parent):
            shutil.rmtree(sock_dir, ignore_errors=True)

    def _died_hint(self, run_dir: Path) -> str:
        if self._process(run_dir) is not None:
            return ""
        tail = _tail(run_dir / _CONSOLE)
        if not tail:
            return " (qemu is not running)"
        return f" (qemu is not running; console tail:\n{tail})"


# --- the guest agent ----------------------------------------------------------------------


class _Agent:
    """One connection to qemu-ga's chardev socket: JSON lines, synced before use."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, path: Path, deadline: float) -> _Agent:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path, deadline: float) -> Iterator[_Agent]:
        agent = cls.connect(path, deadline)
        try:
            yield agent
        finally:
            agent.close()

    def close(self) -> None:
        self._sock.close()

    def send(self, command: str, arguments: Mapping[str, object] | None = None) -> None:
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def sync(self, deadline: float) -> None:
        """Flush the agent's parser (0xFF) and discard stale lines until our guest-sync id."""
        ident = random.randrange(1, 2**31)
        self._sock.sendall(b"\xff")
        self.send("guest-sync", {"id": ident})
        while True:
            reply = self._read(deadline, "guest-sync")
            if reply.get("return") == ident:
                return

    def call(
        self, command: str, arguments: Mapping[str, object] | None, deadline: float
    ) -> Any:
        """Send one command and return its ``return`` (BackendError for an agent error)."""
        self.send(command, arguments)
        reply = self._read(deadline, command)
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise _AgentError(f"guest agent {command}: {desc}")
        return reply.get("return")

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                text = line.strip(b"\xff \r\t")
                if not text:
                    continue
                try:
                    reply = json.loads(text)
                except ValueError:
                    log.debug("discarding non-JSON agent line %r", text[:200])
                    continue
                if isinstance(reply, dict):
                    return reply
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _AgentTimeout(f"guest agent did not answer {what} in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise _AgentTimeout(f"guest agent did not answer {what} in time") from None
            if not chunk:
                raise BackendError(f"guest agent connection closed during {what}")
            self._buf += chunk


class _AgentError(BackendError):
    """qemu-ga answered with an error."""


class _AgentTimeout(ExecTimeout):
    """qemu-ga did not answer before the deadline."""


def _guest_exec(
    agent: _Agent, name: str, argv: list[str], timeout: float, deadline: float
) -> ExecResult:
    try:
        started = agent.call(
            "guest-exec",
            {"path": argv[0], "arg": argv[1:], "capture-output": True},
            deadline,
        )
    except _AgentError as exc:
        # qemu-ga could not spawn it (e.g. no such file): report like a shell would
        return ExecResult(127, "", f"{exc}\n")
    pid = int(started["pid"])
    interval = 0.005
    while True:
        # the agent answers a status query at once, so give it a moment past our own deadline
        status = agent.call(
            "guest-exec-status", {"pid": pid}, max(deadline, time.monotonic() + _KILL_GRACE)
        )
        if status.get("exited"):
            return _exec_result(status)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _kill_guest_process(agent, pid)
            raise ExecTimeout(
                f"{argv!r} in qemu machine {name} did not finish within {timeout:g}s"
            )
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.1)


def _exec_result(status: Mapping[str, Any]) -> ExecResult:
    if "exitcode" in status:
        code = int(status["exitcode"])
    elif "signal" in status:
        code = 128 + int(status["signal"])  # the shell's convention, like container backends
    else:
        code = -1
    return ExecResult(
        code,
        _decode(status.get("out-data")),
        _decode(status.get("err-data")),
    )


def _decode(data: object) -> str:
    if not isinstance(data, str):
        return ""
    return base64.b64decode(data).decode(errors="replace")


def _kill_guest_process(agent: _Agent, pid: int) -> None:
    """Best effort: SIGKILL a timed-out guest process and its children, collect its status."""
    script = f"for c in $(pgrep -P {pid} 2>/dev/null); do kill -9 $c; done; kill -9 {pid}"
    deadline = time.monotonic() + _KILL_GRACE
    try:
        killer = agent.call(
            "guest-exec", {"path": "sh", "arg": ["-c", script], "capture-output": True}, deadline
        )
        for reap in (pid, int(killer["pid"])):
            interval = 0.01
            while time.monotonic() < deadline:
                if agent.call("guest-exec-status", {"pid": reap}, deadline).get("exited"):
                    break
                time.sleep(interval)
                interval = min(interval * 2, 0.1)
    except (VmPoolError, OSError, KeyError, ValueError) as exc:
        log.debug("could not kill guest pid %s: %s", pid, exc)


# --- helpers ------------------------------------------------------------------------------


def _connect_quiet(path: Path) -> socket.socket | None:
    """A connection to the unix socket ``path``, or None if nothing accepts there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _qmp_sock(record: _Record) -> Path:
    return Path(record.sock_dir) / _QMP_SOCK


def _qga_sock(record: _Record) -> Path:
    return Path(record.sock_dir) / _QGA_SOCK


def _identity_script(record: _Record) -> str:
    """sh -c script (``$1``: the host's epoch seconds) setting a clone's identity; it prints
    the hostname, then with a network the MAC and address, for the caller to compare."""
    q = shlex.quote
    lines = [
        "set -e",
        f"hostname {q(record.name)}",
        'date -s "@$1" >/dev/null',
        # mix host randomness in: clones start with the template's pool (reseeds soon after)
        f"echo {secrets.token_hex(32)} > /dev/urandom",
    ]
    if record.ip is not None and record.mac is not None:
        lines += [
            "ip link set eth0 down",
            f"ip link set eth0 address {q(record.mac)}",
            "ip addr flush dev eth0",
            f"ip addr add {q(f'{record.ip}/{record.prefix}')} dev eth0",
            "ip link set eth0 up",
        ]
    lines.append("hostname")
    if record.ip is not None:
        lines += [
            "cat /sys/class/net/eth0/address",
            "ip -o -4 addr show dev eth0 | awk '{print $4}'",
        ]
    return "\n".join(lines) + "\n"


def _file_identity(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "?"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stamp(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _valid_template(path: Path) -> _Template | None:
    """``path`` as a template if it is a complete QEMU migration stream, else None.

    Complete means: the stream magic at the start, and at the end the description QEMU writes
    last (QEMU_VM_EOF, then QEMU_VM_VMDESCRIPTION, a 4-byte length and that much JSON).
    A truncated or half-written file fails this; a corrupt middle is caught by the restore.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size <= len(_STREAM_MAGIC) or fh.read(len(_STREAM_MAGIC)) != _STREAM_MAGIC:
                return None
            start = max(size - _TRAILER_WINDOW, 0)
            fh.seek(start)
            tail = fh.read()
            st = os.fstat(fh.fileno())
    except OSError:
        return None
    at = tail.rfind(b'{"page_size"')
    if at < 6 or tail[at - 6 : at - 4] != b"\x00\x06":
        return None
    length = int.from_bytes(tail[at - 4 : at], "big")
    if start + at + length != size or not tail.endswith(b"}"):
        return None
    return _Template(path, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")


def _mac(network: str, index: int) -> str:
    digest = hashlib.sha256(network.encode()).digest()
    return f"52:54:00:{digest[0]:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def _make_overlay(image: ImagePaths, overlay: Path) -> None:
    _proc.run(
        [
            "qemu-img", "create", "-q", "-f", "qcow2",
            "-b", str(image.disk.resolve()), "-F", image.disk_format, str(overlay),
        ],
        timeout=_IMG_TIMEOUT,
        install_hint=IMG_INSTALL_HINT,
        umask=UMASK,
    ).check("create overlay")


def _kvm_device_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    def probe() -> None:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                raise BackendError(f"pid {proc.pid} still running")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return

    try:
        probe_until(probe, timeout=timeout, what=f"exit of pid {proc.pid}", first_interval=0.02,
                    max_interval=0.2)
    except ReadyTimeout:
        return False
    return True


def _kill(proc: psutil.Process) -> None:
    """SIGTERM, then SIGKILL: only ever called on a process _process() identified as ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return
        if _wait_gone(proc, _STOP_TIMEOUT):
            return
    log.warning("qemu pid %s survived SIGKILL", proc.pid)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, or in a helper thread when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", fsync=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"{path} does not hold a JSON object")
    return data


def _read_json_quiet(path: Path) -> dict[str, Any]:
    try:
        return _read_json(path)
    except BackendError:
        return {}


def _read_labels(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])

