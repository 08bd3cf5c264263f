"""Podman (or docker) containers as machines, and the busybox image they run by default.

One module drives either CLI (``[podman] tool``). The OCI runtime and the ``--ulimit`` values a
container needs are detected once per tool binary (its path, size and modification time, so an
upgrade invalidates the verdict), by running a throwaway container, and cached
in ``<state_dir>/<tool>/runtime.json``. On podman, reset is first tried in place, without a new
container (vmpool.backends.podman_live: the processes running at ready time keep running, the
address stays). Otherwise, and on docker, reset is "commit when ready, recreate from the
commit": each machine's recipe (options and command) is kept in
``<state_dir>/<tool>/<name>.json`` so any process sharing the state directory can recreate it
exactly. A commit holds the filesystem, not processes (a daemon started before it is not running
after such a reset), and a recreated container may get a new address on its network (its name,
which is also its hostname, stays).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmpool import _proc
from vmpool._files import atomic_write, private_dir
from vmpool.backends import debian_image, podman_isolation
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
from vmpool.backends.exec_agent import EXEC_ENV, ExecAgent, kill_script
from vmpool.backends.exec_agent import MOUNT_POINT as _AGENT_MOUNT
from vmpool.backends.podman_live import LiveReset
from vmpool.config import ImageSettings, PodmanSettings
from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout, VmPoolError
from vmpool.ssh import pool_key

log = logging.getLogger(__name__)

#: The image `build_image` makes and ``[podman] image`` defaults to.
DEFAULT_IMAGE = "localhost/vmpool-busybox:latest"
#: Debian images are ``<DEBIAN_REPO>:12`` (``12-<hash>`` with ``[image] packages``).
DEBIAN_REPO = "localhost/vmpool-debian"
#: systemd as PID 1: the command, and podman's option that sets up /run, /tmp and cgroups for it
INIT = "/sbin/init"
_SYSTEMD_OPTION = "--systemd=always"
#: image commands that mean "this image boots systemd" (``[podman] systemd = "auto"``)
_SYSTEMD_COMMANDS = frozenset({INIT, "/lib/systemd/systemd", "/usr/lib/systemd/systemd"})
#: sshd's port in a systemd machine, published on the host's 127.0.0.1 only
SSH_PORT = 22
_SSH_PUBLISH = f"127.0.0.1::{SSH_PORT}"
#: Warm (snapshot) images are ``<WARM_REPO>/<machine name>:ready``.
WARM_REPO = "localhost/vmpool-warm"
#: The default image's label holding its recipe (see `image_current`).
RECIPE_LABEL = "vmpool.recipe"
#: Bump when the default image's contents change in a way its root's bytes do not show.
_IMAGE_VERSION = 1
#: Limits runc needs spelled out where the host's hard limits cannot be inherited.
FALLBACK_ULIMITS: Mapping[str, str] = {"nofile": "1024:1024", "nproc": "1024:1024"}

_INSTALL_HINTS = {
    "podman": "apt-get install podman runc",
    "docker": "install Docker Engine: https://docs.docker.com/engine/install/",
}
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_RUNC_PATHS = ("/usr/bin/runc", "/usr/sbin/runc", "/usr/local/bin/runc", "/usr/local/sbin/runc")
#: Applets the image must have even if ``busybox --list`` cannot be read.
_ESSENTIAL_APPLETS = (
    "sh", "ash", "ls", "cat", "echo", "true", "false", "sleep", "timeout", "mkdir", "rm", "cp",
    "mv", "ln", "touch", "test", "[", "grep", "sed", "awk", "ps", "kill", "env", "id", "hostname",
    "ip", "ifconfig", "ping", "nc", "httpd", "wget", "tar", "gzip", "head", "tail", "wc", "sort",
)
_PREFIX_RE = re.compile(r"^[a-z0-9-]*$")
_CACHE_FILE = "runtime.json"
#: ``diff`` lines of a container that wrote nothing: the mount points' directories (the tool's
#: own, and the exec agent's)
_MOUNT_POINT_DIRS = frozenset({"C /etc", "C /run", f"A {_AGENT_MOUNT}"})
#: after `exec -d` of the agent failed in a container, use `exec` this long before retrying
_AGENT_RETRY = 30.0
#: how long a just-started agent may take to open its request FIFO
_AGENT_START = 2.0
#: check() passes are remembered this long: the plugin's preparation and the controller's start
#: both ask, moments apart, and each ask costs a process
_CHECK_TTL = 60.0
# aliases: inside PodmanBackend the name `list` is the protocol's method, not the builtin
_MachineInfos = list[MachineInfo]
_Argv = list[str]


@dataclass(frozen=True)
class RunOptions:
    """The runtime verdict: ``--runtime`` (None: the tool's default) and ``--ulimit`` values."""

    runtime: str | None
    ulimits: tuple[tuple[str, str], ...] = ()

    def argv(self) -> list[str]:
        args = ["--runtime", self.runtime] if self.runtime else []
        for key, value in self.ulimits:
            args += ["--ulimit", f"{key}={value}"]
        return args

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "ulimits": dict(self.ulimits)}

    @classmethod
    def from_json(cls, data: Any) -> RunOptions:
        if not isinstance(data, dict):
            raise ValueError("runtime verdict must be an object")
        runtime = data.get("runtime")
        ulimits = data.get("ulimits") or {}
        if runtime is not None and not isinstance(runtime, str):
            raise ValueError("runtime must be a string or null")
        if not isinstance(ulimits, dict):
            raise ValueError("ulimits must be an object")
        return cls(runtime, _ulimit_items(ulimits))


class _ContainerExited(Exception):
    """Internal: ends probe_until early (it retries every VmPoolError); never leaves the module."""


@dataclass
class _Record:
    """How to recreate a machine, and the images it owns."""

    name: str
    image: str
    options: list[str]
    command: list[str]
    network: str | None = None
    warm_image: str | None = None
    warm_image_id: str | None = None
    #: earlier warm images, removed once no container uses them
    stale_images: list[str] = field(default_factory=list)
    #: address on ``network`` when snapshotted; reset asks for it again so it stays stable
    ip: str | None = None


class PodmanBackend(BackendBase):
    """Containers as machines, driven through the ``podman`` (or ``docker``) command line."""

    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(
        self, settings: PodmanSettings, state_dir: Path, image: ImageSettings | None = None
    ) -> None:
        self.settings = settings
        self.name: str = settings.tool
        #: the image machines are made from
        self.image = machine_image(settings, image)
        self._tool = settings.tool
        self._state_dir = Path(state_dir)
        self._dir = Path(state_dir) / settings.tool
        #: image -> whether it boots systemd (``[podman] systemd = "auto"``)
        self._systemd_images: dict[str, bool] = {}
        self._options: RunOptions | None = None
        self._options_lock = threading.Lock()
        self._checked_at: float | None = None
        #: machine -> when starting its exec agent last failed (monotonic)
        self._agent_failed: dict[str, float] = {}
        self._agent_path_warned = False
        self._nap = threading.Event()  # never set: a sleep that tests' patched time.sleep spares
        #: in-place resets (vmpool.backends.podman_live); podman only
        self._live = LiveReset(self._dir / "live", self._write_json) if self._tool == "podman" \
            else None

    # -- the protocol --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise BackendUnavailable when the tool, the image or a working runtime is missing.

        A pass is remembered for ``_CHECK_TTL`` seconds by this object; a failure never is.
        """
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < _CHECK_TTL:
            return
        image = self.image
        if not _image_exists(self.settings, image, what="check"):
            raise BackendUnavailable(_missing_image_message(self._tool, image))
        self.run_options()
        self._checked_at = now

    def create(self, spec: MachineSpec) -> None:
        name = validate_name(spec.name)
        if spec.network is not None:
            validate_name(spec.network)
        systemd = self._boots_systemd()
        options = self._container_options(name, spec.labels, spec.network, systemd=systemd)
        command = [INIT] if systemd else list(self.settings.command)
        self._rebuild_agent_dir(name)
        self._run("create", *options, self.image, *command).check(f"create {name}")
        self._write_record(_Record(name, self.image, options, command, network=spec.network))

    def start(self, name: str) -> None:
        self._run("start", validate_name(name)).check(f"start {name}")
        self._agent_failed.pop(name, None)  # an agent start that failed while it was stopped

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe with `true` until the container answers; a systemd one is ready once
        `systemctl is-system-running` says one of ``[podman] ready_states``."""
        validate_name(name)
        deadline = time.monotonic() + timeout
        record = self._load_record(name)
        systemd = record is not None and _SYSTEMD_OPTION in record.options

        def probe() -> None:
            # each probe gets the time left (at least a moment), so a hung exec cannot overrun
            left = max(deadline - time.monotonic(), 0.5)
            try:
                # exec() starts the exec agent first, so a ready machine has one listening
                result = self.exec(name, ["true"], timeout=min(left, self.settings.command_timeout))
            except BackendError:
                self._raise_if_exited(name)
                raise
            if not result.ok:
                raise BackendError(
                    f"probe `true` exited {result.returncode}: {result.stderr.strip()[-500:]}"
                )
            if systemd:
                self._probe_systemd(name, max(deadline - time.monotonic(), 0.5))

        try:
            probe_until(probe, timeout=timeout, what=f"{self._tool} container {name}")
        except _ContainerExited as exc:
            raise BackendError(str(exc)) from None

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` in the container; ExecTimeout after ``timeout`` seconds.

        The command's own exit status is returned; a failure of the tool itself (no such
        container, container not running) raises BackendError.
        """
        validate_name(name)
        if not argv:
            raise ValueError("exec needs a command")
        agent = self._agent(name)
        if agent is not None and self._agent_ready(name, agent):
            answer = agent.run(argv, timeout)
            if answer is not None:
                return answer
        token = uuid.uuid4().hex
        try:
            result = self._run("exec", "--env", f"{EXEC_ENV}={token}", name, *argv,
                               timeout=timeout)
        except ExecTimeout:
            # killing the client leaves the command running in the container; end it too
            self._kill_exec(name, token)
            raise
        if self._is_tool_error(name, result):
            raise BackendError(
                f"{self._tool} exec in {name} failed: {result.stderr.strip()[-2000:]}"
            )
        return ExecResult(result.returncode, result.stdout, result.stderr)

    def snapshot(self, name: str) -> None:
        """Commit the (ready) container to its warm image, which reset() recreates it from.

        A container that has written nothing since it was made from its image needs no commit:
        reset() recreates it from that image itself (a commit would be an identical copy).
        """
        validate_name(name)
        record = self._load_record(name) or self._record_from_inspect(name)
        if record.warm_image is None and self._unchanged(name):
            record.warm_image, record.warm_image_id = record.image, None
            record.ip = self.address(name) if record.network else None
            self._write_record(record)
            log.debug("snapshot %s: unchanged since %s, no commit", name, record.image)
            self._snapshot_live(name)
            return
        warm = warm_image_name(name)
        if record.warm_image != warm:
            # written ahead of the commit: delete() removes warm images only of machines whose
            # record names one, so a commit cut short must not leave an image nobody knows of
            record.warm_image = warm
            self._write_record(record)
        commit = ["commit", "-q", name, warm] if self._tool == "podman" else ["commit", name, warm]
        result = self._run(*commit).check(f"snapshot {name}")
        image_id = _last_line(result.stdout)
        if record.warm_image_id and record.warm_image_id != image_id:
            # the container may still run from the old image; it is removed after the next reset
            record.stale_images.append(record.warm_image_id)
        record.warm_image, record.warm_image_id = warm, image_id
        record.ip = self.address(name) if record.network else None
        self._write_record(record)
        log.debug("snapshot %s -> %s (%s) in %.3fs", name, warm, image_id, result.duration)
        self._snapshot_live(name)

    def _snapshot_live(self, name: str) -> None:
        """Record the ready state a live reset returns to (nothing when one is impossible)."""
        if self._live is None:
            return
        info = self._inspect(name)
        if info is not None:
            agent = self._agent(name)
            own = {m.split(":")[1] for m in agent.mounts()} if agent is not None else set()
            self._live.snapshot(name, info, own, self._address_in(name, info))

    def _probe_systemd(self, name: str, timeout: float) -> None:
        """Raise BackendError unless systemd in ``name`` is in one of the ready states."""
        ready = self.settings.ready_states
        result = self.exec(
            name, ["systemctl", "is-system-running"],
            timeout=min(timeout, self.settings.command_timeout),
        )
        state = result.stdout.strip()
        if state in ready:
            return
        detail = ""
        if state == "degraded":
            failed = self.exec(name, ["systemctl", "--failed", "--no-legend", "--plain"],
                               timeout=min(timeout, self.settings.command_timeout))
            detail = f"; failed units: {' '.join(failed.stdout.split()[:20])}"
        raise BackendError(
            f"systemd is {state or result.stderr.strip()[-200:]!r}, not {' or '.join(ready)}"
            f"{detail}"
        )

    def _boots_systemd(self) -> bool:
        """Whether machines run systemd as PID 1 (``[podman] systemd``; auto: when the image's
        command is systemd's, as the debian image's is)."""
        setting = self.settings.systemd
        if setting is False:
            return False
        if self._tool != "podman":
            if setting is True:
                raise BackendUnavailable(
                    "[podman] systemd = true needs tool = \"podman\" (docker has no --systemd)"
                )
            return False
        if setting is True:
            return True
        known = self._systemd_images.get(self.image)
        if known is None:
            result = self._run("image", "inspect", "--format", "{{json .Config.Cmd}}", self.image)
            try:
                cmd = json.loads(result.stdout) if result.returncode == 0 else None
            except ValueError:
                cmd = None
            known = isinstance(cmd, list) and bool(cmd) and cmd[0] in _SYSTEMD_COMMANDS
            self._systemd_images[self.image] = known
        return known

    def ssh(self, name: str) -> SshAccess | None:
        """sshd of a systemd machine, published on 127.0.0.1; None for other machines."""
        record = self._load_record(validate_name(name))
        if record is None or _SSH_PUBLISH not in record.options:
            return None
        info = self._inspect(name)
        if info is None:
            raise BackendError(f"ssh {name}: no container named {name!r}")
        ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
        for binding in ports.get(f"{SSH_PORT}/tcp") or []:
            if binding.get("HostIp") == "127.0.0.1" and binding.get("HostPort"):
                port = int(binding["HostPort"])
                return SshAccess("127.0.0.1", port, "root", pool_key(self._state_dir))
        raise BackendError(f"ssh {name}: port {SSH_PORT} is not published on 127.0.0.1: {ports}")

    def _unchanged(self, name: str) -> bool:
        """True when the container's filesystem differs from its image only by the directories
        holding the mount points the tool manages (/etc/hosts, /etc/hostname, /run/...)."""
        result = self._run("diff", name)
        if result.returncode != 0:
            return False
        changes = {line.strip() for line in result.stdout.splitlines() if line.strip()}
        return changes <= _MOUNT_POINT_DIRS

    def reset(self, name: str) -> None:
        """Reset in place (vmpool.backends.podman_live) where possible, else replace the
        container by a fresh one from its warm image (same name and options)."""
        validate_name(name)
        if self._live is not None and self._live.reset(name):
            if self._agent_intact(name):
                record = self._load_record(name)
                if record is not None:  # warm images an earlier snapshot left, now unused
                    self._drop_stale_images(record)
                return
            # the live reset keeps the ready-time agent; one whose FIFO a test replaced no
            # longer serves, and only a new container rebuilds its directory (finding 4)
            log.info("reset %s: the exec agent no longer listens; a full reset instead", name)
        record = self._load_record(name)
        if record is None and _image_exists(self.settings, warm_image_name(name), what="reset"):
            # the record is lost but the warm image is there: rebuild the recipe from the tool
            record = self._record_from_inspect(name)
            record.warm_image = warm_image_name(name)
        if record is None or not record.warm_image:
            raise BackendError(f"reset {name}: no snapshot recorded; snapshot() it first")
        self._remove_container(name)
        # the last user may have tampered with the agent's files: the new container gets new
        # ones (and its agent in wait_ready)
        self._rebuild_agent_dir(name)
        run = ["run", "-d", *self._with_agent_mounts(name, record.options)]
        result = None
        if record.ip:
            result = self._run(*run, "--ip", record.ip, record.warm_image, *record.command)
            if result.returncode != 0:
                # the address was taken meanwhile (or the network has no fixed subnet)
                log.info("reset %s: cannot keep address %s: %s", name, record.ip,
                         result.stderr.strip()[-300:])
                self._remove_container(name)
        if result is None or result.returncode != 0:
            self._run(*run, record.warm_image, *record.command).check(f"reset {name}")
        self._drop_stale_images(record)
        self.wait_ready(name, self.settings.command_timeout)
        self._snapshot_live(name)  # the new container's ready state, for the next reset

    def delete(self, name: str) -> None:
        validate_name(name)
        self._remove_container(name)
        record = self._load_record(name)
        if _may_have_warm_image(record):
            self._remove_image(warm_image_name(name), missing_ok=True)
        if record is not None:
            self._drop_stale_images(record, keep_current=False)
        self._forget(name)

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """``delete()`` each of ``names`` with one ``rm`` and one ``image rm`` for them all.

        Returns ``{name: error}`` for the machines that could not be removed (empty: all gone).
        A tool process costs about as much as the removal itself, so a pool's teardown makes
        two, not two per machine.
        """
        names = sorted({validate_name(n) for n in names})
        if not names:
            return {}
        errors: dict[str, str] = {}
        # --ignore: podman 4.3's `rm -f` given several names, one of them missing, exits 0 and
        # removes none of them; -v: with the anonymous volumes the image declares
        args = ["rm", "-f", "-v", "-t", "0", "--ignore"] if self._tool == "podman" \
            else ["rm", "-f", "-v"]
        result = self._run(*args, *names)
        if result.returncode != 0:
            # which one failed (or was merely missing: docker says so)? ask one by one
            for name in names:
                try:
                    self._remove_container(name)
                except BackendError as exc:
                    errors[name] = str(exc)
        gone = [n for n in names if n not in errors]
        records = {n: self._load_record(n) for n in gone}
        images = [warm_image_name(n) for n in gone if _may_have_warm_image(records[n])]
        images += [i for r in records.values() if r is not None for i in r.stale_images]
        if images:
            rm = ["image", "rm", "--ignore"] if self._tool == "podman" else ["image", "rm"]
            if self._run(*rm, *images).returncode != 0:
                for image in images:  # as delete(): best effort, an image left is not a machine
                    self._remove_image(image, missing_ok=True)
        for name in gone:
            self._forget(name)
        return errors

    def list(self, prefix: str) -> _MachineInfos:
        _validate_prefix(prefix)
        if self._tool == "podman":
            args = ["ps", "-a", "--format", "json"]
            if prefix:
                args[2:2] = ["--filter", f"name=^{prefix}"]
        else:
            args = ["ps", "-a", "--no-trunc", "--format", "{{json .}}"]
            if prefix:
                args[2:2] = ["--filter", f"name={prefix}"]
        rows = _json_rows(self._run(*args).check("list containers").stdout)
        machines: dict[str, MachineInfo] = {}
        for row in rows:
            names = row.get("Names") or row.get("Name") or []
            if isinstance(names, str):
                names = names.split(",")
            labels = _labels(row.get("Labels"))
            running = str(row.get("State", "")).lower() == "running"
            for raw in names:
                cname = str(raw).lstrip("/")
                if cname.startswith(prefix):
                    machines[cname] = MachineInfo(cname, labels, running)
        return sorted(machines.values(), key=lambda m: m.name)

    def address(self, name: str) -> str | None:
        if self._live is not None:
            known, ip = self._live.address(validate_name(name))
            if known:  # still the container recorded ready: it kept its address
                return ip
        info = self._inspect(validate_name(name))
        if info is None:
            raise BackendError(f"address {name}: no container named {name!r}")
        return self._address_in(name, info)

    def _address_in(self, name: str, info: Mapping[str, Any]) -> str | None:
        settings = info.get("NetworkSettings") or {}
        networks: Mapping[str, Any] = settings.get("Networks") or {}
        record = self._load_record(name)
        preferred = [record.network] if record is not None and record.network else []
        for net in [*preferred, *networks]:
            ip = (networks.get(net) or {}).get("IPAddress")
            if ip:
                return str(ip)
        ip = settings.get("IPAddress")
        return str(ip) if ip else None

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        validate_name(name)
        args = ["network", "create"]
        if self._tool == "podman":
            # podman bridges forward to each other by default (docker's are isolated already);
            # netavark's isolation can lapse (vmpool.backends.podman_isolation), vmpool's cannot
            args += ["--opt", "isolate=true"]
        for key, value in sorted(labels.items()):
            args += ["--label", f"{key}={value}"]
        result = self._run(*args, name)
        if result.returncode != 0:
            if "already exists" not in result.stderr:
                result.check(f"create network {name}")
            log.debug("network %s already exists", name)
        bridge = self._bridge(name)
        if bridge is not None:
            podman_isolation.isolate(bridge)

    def _bridge(self, name: str) -> str | None:
        """The host bridge of pool network ``name`` where vmpool isolates it (rootful podman),
        else None."""
        if self._tool != "podman" or not podman_isolation.applies():
            return None
        result = self._run("network", "inspect", "--format", "{{.NetworkInterface}}", name)
        if result.returncode != 0:
            return None
        return result.stdout.strip() or None

    def delete_network(self, name: str) -> None:
        validate_name(name)
        bridge = self._bridge(name)
        if bridge is not None:
            podman_isolation.release(bridge)
        result = self._run("network", "rm", name)
        if result.returncode != 0 and not _is_missing(result.stderr):
            result.check(f"delete network {name}")

    def list_networks(self, prefix: str) -> _MachineInfos:
        _validate_prefix(prefix)
        fmt = "json" if self._tool == "podman" else "{{json .}}"
        rows = _json_rows(self._run("network", "ls", "--format", fmt).check("list networks").stdout)
        found = []
        for row in rows:
            net = str(row.get("name") or row.get("Name") or "")
            if net and net.startswith(prefix):
                found.append(MachineInfo(net, _labels(row.get("labels", row.get("Labels")))))
        return sorted(found, key=lambda m: m.name)

    # -- runtime detection ---------------------------------------------------------------------
    def run_options(self) -> RunOptions:
        """The ``--runtime``/``--ulimit`` verdict: from settings, the cache, or a probe."""
        with self._options_lock:
            if self._options is None:
                self._options = self._detect_options()
            return self._options

    def _detect_options(self) -> RunOptions:
        s = self.settings
        if s.runtime is not None and s.ulimits is not None:
            return RunOptions(s.runtime, _ulimit_items(s.ulimits))
        # the binary's identity costs a stat(), `--version` a process on every session start
        binary = _binary_identity(self._tool)
        if binary is None:  # not on PATH: let the tool's own error say what to install
            binary = _last_line(self._run("--version").check("version").stdout)
        key = json.dumps(
            {"tool": self._tool, "binary": binary, "runtime": s.runtime, "ulimits": s.ulimits},
            sort_keys=True,
        )
        cache = self._read_cache()
        if key in cache:
            try:
                options = RunOptions.from_json(cache[key])
            except ValueError as exc:
                log.warning("ignoring bad runtime cache entry in %s: %s", self._dir, exc)
            else:
                log.debug("runtime verdict from cache: %s", options)
                return options
        options = self._probe_options()
        cache[key] = options.to_json()
        self._write_json(self._dir / _CACHE_FILE, cache)
        log.info("%s (%s): using %s", self._tool, binary, options.argv() or "the defaults")
        return options

    def _probe_options(self) -> RunOptions:
        """Run ``IMAGE true`` with candidate options until one works; BackendUnavailable if none."""
        s = self.settings
        if not _image_exists(s, self.image, what="runtime probe"):
            # else `run` would try a registry and fail with a misleading pull error
            raise BackendUnavailable(_missing_image_message(self._tool, self.image))
        runtimes: list[str | None] = [s.runtime] if s.runtime is not None else [None]
        if s.runtime is None and _have_runc():
            runtimes.append("runc")
        limit_sets = [_ulimit_items(s.ulimits)] if s.ulimits is not None else [
            (), _ulimit_items(FALLBACK_ULIMITS)
        ]
        failures: list[str] = []
        for runtime in runtimes:
            for ulimits in limit_sets:
                candidate = RunOptions(runtime, ulimits)
                result = self._run(
                    "run", "--rm", "--network", "none", *candidate.argv(), self.image, "true"
                )
                if result.returncode == 0:
                    return candidate
                error = result.stderr.strip()[-500:]
                failures.append(f"{' '.join(candidate.argv()) or 'defaults'}: {error}")
                # without limits a failure that is not about rlimits will not be cured by them
                if not ulimits and "rlimit" not in error.lower():
                    break
        raise BackendUnavailable(
            f"{self._tool} cannot run a container here (install runc, or set [podman] runtime "
            "and ulimits); tried:\n  " + "\n  ".join(failures)
        )

    def _read_cache(self) -> dict[str, Any]:
        try:
            data = json.loads((self._dir / _CACHE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable runtime cache: %s", exc)
            return {}
        return data if isinstance(data, dict) else {}

    # -- helpers -------------------------------------------------------------------------------
    def _run(
        self, *args: str, timeout: float | None = None, input: bytes | None = None
    ) -> _proc.ProcResult:
        return _proc.run(
            [self._tool, *args],
            timeout=self.settings.command_timeout if timeout is None else timeout,
            input=input,
            install_hint=_INSTALL_HINTS[self._tool],
        )

    def _container_options(
        self, name: str, labels: Mapping[str, str], network: str | None, *, systemd: bool = False
    ) -> _Argv:
        s = self.settings
        options = ["--name", name, "--hostname", name]
        for key, value in sorted(labels.items()):
            options += ["--label", f"{key}={value}"]
        if network:
            options += ["--network", network]
        options += self.run_options().argv()
        if self._tool == "podman" and not systemd and not any(
            a == "--init" or a.startswith("--systemd") for a in s.extra_args
        ):
            options.append("--init")  # an init as PID 1 reaps orphans; a live reset needs one
        if s.memory:
            options += ["--memory", s.memory]
        if s.cpus:
            options += ["--cpus", f"{s.cpus:g}"]
        options = self._with_agent_mounts(name, options)
        if systemd:
            # sshd for deploy tools: the pool's key is root's only way in (no passwords)
            public = pool_key(self._state_dir).with_suffix(".pub")
            if ":" in str(public):
                raise BackendError(f"the state directory {self._state_dir} has a ':', which "
                                   "--volume cannot say; choose another [pool] state_dir")
            options += [_SYSTEMD_OPTION, "--publish", _SSH_PUBLISH,
                        "--volume", f"{public}:/root/.ssh/authorized_keys:ro"]
        return options + list(s.extra_args)

    # -- the exec agent (vmpool.backends.exec_agent) ---------------------------------------------
    def _agent(self, name: str) -> ExecAgent | None:
        if not self.settings.exec_agent:
            return None
        directory = self._dir / "exec" / name
        if ":" in str(directory):  # --volume SRC:DST cannot say it
            if not self._agent_path_warned:
                log.warning("no exec agent: its directory %s has a ':' (commands use `%s exec`)",
                            directory, self._tool)
                self._agent_path_warned = True
            return None
        return ExecAgent(directory)

    def _agent_intact(self, name: str) -> bool:
        """After a live reset: nothing of the last test is left in the agent's ``io`` (it is a
        mount, outside what the live reset reverts), and the ready-time agent still reads the
        request FIFO (only ready-time processes are left, so no test's process is that reader)."""
        agent = self._agent(name)
        if agent is None:
            return True
        agent.scrub()
        return agent.listening()

    def _rebuild_agent_dir(self, name: str) -> None:
        """Make the agent's directory as new (its script, an empty FIFO directory), before a
        container is made from the machine's recipe (create, reset): nothing a test left there
        reaches the next one."""
        agent = self._agent(name)
        if agent is not None:
            private_dir(agent.dir.parent)  # <tool>/exec/ and <tool>/ too: 0700 whatever the umask
            agent.rebuild()
        self._agent_failed.pop(name, None)

    def _with_agent_mounts(self, name: str, options: Sequence[str]) -> _Argv:
        """``options`` with the agent's ``--volume`` options as this version makes them (a
        recipe written by an older one mounted the whole directory writable)."""
        kept: _Argv = []
        args = iter(options)
        for arg in args:
            if arg == "--volume":
                value = next(args, "")
                if value.partition(":")[2].startswith(_AGENT_MOUNT):
                    continue
                kept += [arg, value]
            else:
                kept.append(arg)
        agent = self._agent(name)
        for mount in agent.mounts() if agent is not None else ():
            kept += ["--volume", mount]
        return kept

    def _agent_ready(self, name: str, agent: ExecAgent) -> bool:
        """Whether ``agent`` listens, starting it (one ``exec -d``) if it should and does not.

        A container made without one (no agent directory) never gets one; after a failed start,
        commands go through ``exec`` for ``_AGENT_RETRY`` seconds before the next try. A request
        FIFO the container replaced is put back first.
        """
        if agent.listening():
            return True
        if not agent.installed():  # the container was made without one
            return False
        failed = self._agent_failed.get(name)
        if failed is not None and time.monotonic() - failed < _AGENT_RETRY:
            return False
        with agent.starting(self.settings.command_timeout) as mine:
            if not mine:
                return agent.listening()  # another process kept the lock; it may have started one
            if agent.listening():  # another process (or thread) started it meanwhile
                return True
            try:
                agent.repair()  # a test may have replaced the FIFO: the agent needs a real one
            except OSError as exc:
                log.info("no exec agent in %s (commands use `%s exec`) for now: %s", name,
                         self._tool, exc)
                self._agent_failed[name] = time.monotonic()
                return False
            result = self._run("exec", "-d", name, "sh", agent.script)
            if result.returncode == 0:
                deadline = time.monotonic() + _AGENT_START
                while time.monotonic() < deadline:
                    if agent.listening():
                        self._agent_failed.pop(name, None)
                        return True
                    self._nap.wait(0.005)
        if result.returncode == 0:
            # it started and never listened (a user who cannot use /.vmpool, no FIFO support):
            # it will not work in this container; a new container (create, start, reset) tries
            log.info("no exec agent in %s (commands use `%s exec`): it did not start listening",
                     name, self._tool)
            self._agent_failed[name] = math.inf
        else:
            log.info("no exec agent in %s (commands use `%s exec`) for now: %s", name,
                     self._tool, result.stderr.strip()[-300:])
            self._agent_failed[name] = time.monotonic()
        return False

    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> _Argv:
        """Remove the recipes and agent directories of machines named ``prefix…`` that are not
        in ``existing`` (removed outside vmpool), once untouched for ``older_than`` seconds (a
        machine being created has them a moment before it exists). Returns what went."""
        _validate_prefix(prefix)
        now = time.time()
        gone: _Argv = []
        leftovers = [(p.name[: -len(".json")], p) for p in self._dir.glob(f"{prefix}*.json")]
        leftovers += [(p.name, p) for p in (self._dir / "exec").glob(f"{prefix}*")]
        leftovers += [(p.name, p) for p in (self._dir / "live").glob(f"{prefix}*")]
        for name, path in leftovers:
            try:
                old = now - path.stat().st_mtime > older_than
            except FileNotFoundError:
                continue
            if name in existing or not old:
                continue
            if not dry_run:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            gone.append(str(path.relative_to(self._dir.parent)))
        return gone

    def _forget(self, name: str) -> None:
        """Drop what this backend keeps of a removed machine: its record and agent directory."""
        with contextlib.suppress(FileNotFoundError):
            self._record_path(name).unlink()
        shutil.rmtree(self._dir / "exec" / name, ignore_errors=True)
        if self._live is not None:
            self._live.forget(name)
        self._agent_failed.pop(name, None)

    def _is_tool_error(self, name: str, result: _proc.ProcResult) -> bool:
        """Did the tool fail (no such container, not running) rather than the command in it?"""
        lines = result.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        if self._tool == "podman":
            # podman 4.3 exits 125 or 255 on its own errors; a command may exit so too, so ask
            if result.returncode not in (125, 255) or not last.startswith("Error: "):
                return False
        elif result.returncode == 0 or not (
            last.startswith("Error response from daemon:") or last.startswith("Error: No such")
        ):
            return False
        info = self._inspect(name)
        return info is None or not ((info.get("State") or {}).get("Running"))

    def _kill_exec(self, name: str, token: str) -> None:
        """Best effort: SIGKILL the processes of a timed-out exec (found by its env token)."""
        try:
            result = self._run("exec", name, "sh", "-c", kill_script(token), timeout=10)
        except VmPoolError as exc:
            log.warning("could not stop timed-out command in %s: %s", name, exc)
            return
        if result.returncode != 0:
            log.warning("could not stop timed-out command in %s: %s", name, result.stderr.strip())

    def _raise_if_exited(self, name: str) -> None:
        """Stop waiting for a container that has already exited (it will never answer)."""
        info = self._inspect(name)
        state = (info or {}).get("State") or {}
        if info is None or str(state.get("Status", "")).lower() not in ("exited", "stopped"):
            return
        logs = self._run("logs", "--tail", "20", name)
        raise _ContainerExited(
            f"{self._tool} container {name} exited with code {state.get('ExitCode')} before it "
            f"was ready; last output:\n{(logs.stdout + logs.stderr).strip()[-2000:]}"
        )

    def _remove_container(self, name: str) -> None:
        # podman's rm -f first waits the stop timeout (10 s) for `sleep` as pid 1 to ignore TERM;
        # -v: the anonymous volumes the image declares go too (one would leak per reset)
        args = ["rm", "-f", "-v", "-t", "0", name] if self._tool == "podman" \
            else ["rm", "-f", "-v", name]
        result = self._run(*args)
        if result.returncode != 0 and not _is_missing(result.stderr):
            result.check(f"remove {name}")

    def _remove_image(self, image: str, *, missing_ok: bool) -> bool:
        """Remove ``image`` unless a container uses it; True when it is gone."""
        result = self._run("image", "rm", image)
        if result.returncode == 0 or (missing_ok and _is_missing(result.stderr)):
            return True
        log.debug("could not remove image %s: %s", image, result.stderr.strip())
        return False

    def _drop_stale_images(self, record: _Record, *, keep_current: bool = True) -> None:
        if not record.stale_images:
            return
        record.stale_images = [
            image for image in record.stale_images
            if not self._remove_image(image, missing_ok=True)
        ]
        if keep_current:
            self._write_record(record)

    def _inspect(self, name: str) -> dict[str, Any] | None:
        result = self._run("container", "inspect", name)
        if result.returncode != 0:
            if _is_missing(result.stderr):
                return None
            result.check(f"inspect {name}")
        rows = _json_rows(result.stdout)
        return rows[0] if rows else None

    def _record_from_inspect(self, name: str) -> _Record:
        """A record for a container made without one (e.g. by an older vmpool)."""
        info = self._inspect(name)
        if info is None:
            raise BackendError(f"no container named {name!r}")
        config = info.get("Config") or {}
        networks = list((info.get("NetworkSettings") or {}).get("Networks") or {})
        network = networks[0] if len(networks) == 1 else None
        labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
        image = str(info.get("ImageName") or config.get("Image") or self.image)
        command = [str(c) for c in (config.get("Cmd") or self.settings.command)]
        options = self._container_options(name, labels, network, systemd=command == [INIT])
        return _Record(name, image, options, command, network=network)

    def _record_path(self, name: str) -> Path:
        return self._dir / f"{name}.json"

    def _load_record(self, name: str) -> _Record | None:
        try:
            data = json.loads(self._record_path(name).read_text(encoding="utf-8"))
            return _Record(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable record for %s: %s", name, exc)
            return None

    def _write_record(self, record: _Record) -> None:
        self._write_json(self._record_path(record.name), asdict(record))

    def _write_json(self, path: Path, data: Any) -> None:
        """Write via a temporary file and rename, so readers never see half a file."""
        private_dir(path.parent)
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True), fsync=False)


# -- the image ----------------------------------------------------------------------------------
def machine_image(settings: PodmanSettings, image: ImageSettings | None = None) -> str:
    """The image machines run: ``[podman] image``, else the built one of ``[podman] distro``."""
    if settings.image:
        return settings.image
    if settings.distro == "debian":
        return debian_image_name((image or ImageSettings()).packages)
    return DEFAULT_IMAGE


def debian_image_name(packages: Sequence[str] = ()) -> str:
    """The Debian image made with ``packages`` added."""
    return f"{DEBIAN_REPO}:{debian_image.Recipe(tuple(packages)).tag()}"


def build_image(
    settings: PodmanSettings,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    distro: str | None = None,
    image_settings: ImageSettings | None = None,
) -> str:
    """Make the image of ``distro`` (default ``[podman] distro``) with ``<tool> import``; return
    its name. busybox: ``DEFAULT_IMAGE``, a busybox-static rootfs; debian: Debian 12 with
    systemd (`vmpool.backends.debian_image`) and ``image_settings.packages``.

    An existing image is kept while its recipe label matches (see `image_current`), unless
    ``force``.
    """

    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    if (distro or settings.distro) == "debian":
        return _build_debian(settings, (image_settings or ImageSettings()).packages, force, say)
    image = DEFAULT_IMAGE
    busybox = _find_busybox()
    tarball = _default_rootfs(busybox)
    recipe = _recipe(tarball)
    if not force and _image_exists(settings, image, what="build"):
        if _image_label(settings, image, RECIPE_LABEL) == recipe:
            say(f"{image} is up to date (force to rebuild)")
            return image
        say(f"{image} is out of date (its recipe or {busybox} changed): rebuilding")
    say(f"importing {image} ({len(tarball) // 1024} KiB) with {settings.tool}")
    _proc.run(
        [
            settings.tool, "import",
            "--change", "ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin",
            "--change", 'CMD ["sleep", "infinity"]',
            "--change", f"LABEL {RECIPE_LABEL}={recipe}",
            "-", image,
        ],
        input=tarball,
        timeout=settings.command_timeout,
        install_hint=_INSTALL_HINTS[settings.tool],
    ).check(f"import {image}")
    say(f"built {image}")
    return image


def _build_debian(
    settings: PodmanSettings, packages: Sequence[str], force: bool, say: Callable[[str], None]
) -> str:
    recipe = debian_image.Recipe(tuple(packages))
    name, digest = debian_image_name(packages), recipe.digest()
    if not force and _image_exists(settings, name, what="build"):
        if _image_label(settings, name, RECIPE_LABEL) == digest:
            say(f"{name} is up to date (force to rebuild)")
            return name
        say(f"{name} is out of date (its recipe changed): rebuilding")
    with tempfile.TemporaryDirectory(prefix="vmpool-debian-") as tmp:
        tar = Path(tmp) / "root.tar"
        debian_image.build_root(recipe, tar, progress=say)
        say(f"importing {name} ({tar.stat().st_size // 2**20} MiB) with {settings.tool}")
        _proc.run(
            [
                settings.tool, "import",
                "--change", f'CMD ["{INIT}"]',
                "--change", f"LABEL {RECIPE_LABEL}={digest}",
                str(tar), name,
            ],
            timeout=max(settings.command_timeout, 600.0),
            install_hint=_INSTALL_HINTS[settings.tool],
        ).check(f"import {name}")
    say(f"built {name}")
    return name


def image_current(settings: PodmanSettings, image: ImageSettings | None = None) -> bool:
    """Whether the built image of ``[podman] distro`` matches what `build_image` would make."""
    if settings.distro == "debian":
        packages = (image or ImageSettings()).packages
        digest = debian_image.Recipe(tuple(packages)).digest()
        return _image_label(settings, debian_image_name(packages), RECIPE_LABEL) == digest
    try:
        recipe = _recipe(_default_rootfs(_find_busybox()))
    except BackendUnavailable:
        return False
    return _image_label(settings, DEFAULT_IMAGE, RECIPE_LABEL) == recipe


def _default_rootfs(busybox: Path) -> bytes:
    data = busybox.read_bytes()
    if not _is_static_elf(data):
        raise BackendUnavailable(
            f"{busybox} is dynamically linked; the image needs a static one "
            "(apt-get install busybox-static)"
        )
    return _rootfs_tar(data, _applets(busybox))


def _recipe(tarball: bytes) -> str:
    """The image's recipe: its root's bytes (the tar is reproducible) and the build's version."""
    return hashlib.sha256(f"{_IMAGE_VERSION}\0".encode() + tarball).hexdigest()[:16]


def _image_label(settings: PodmanSettings, image: str, label: str) -> str | None:
    result = _proc.run(
        [settings.tool, "image", "inspect", "--format",
         f'{{{{index .Config.Labels "{label}"}}}}', image],
        timeout=settings.command_timeout,
        install_hint=_INSTALL_HINTS[settings.tool],
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and value not in ("", "<no value>") else None


def warm_image_name(name: str) -> str:
    """The image a machine's snapshot is committed to."""
    return f"{WARM_REPO}/{validate_name(name)}:ready"


def _image_exists(settings: PodmanSettings, image: str, *, what: str) -> bool:
    if settings.tool == "podman":
        argv = ["podman", "image", "exists", image]
    else:
        argv = ["docker", "image", "inspect", "--format", "{{.Id}}", image]
    result = _proc.run(
        argv, timeout=settings.command_timeout, install_hint=_INSTALL_HINTS[settings.tool]
    )
    if result.returncode == 0:
        return True
    if result.returncode == 1 and (settings.tool == "podman" or _is_missing(result.stderr)):
        return False
    raise BackendUnavailable(
        f"{settings.tool} does not work ({what}): {' '.join(argv)} exited "
        f"{result.returncode}: {result.stderr.strip()[-1000:]}"
    )


def _missing_image_message(tool: str, image: str) -> str:
    build = f"`vmpool image build --backend {tool}`"
    if image == DEFAULT_IMAGE:
        return f"{tool} image {image} not found: run {build} to build it"
    if image.startswith(f"{DEBIAN_REPO}:"):
        return (f"{tool} image {image} not found: run `vmpool image build --backend {tool} "
                "--distro debian` to build it")
    return (
        f"{tool} image {image} not found: build or pull it, or unset [podman] image and run "
        f"{build} for the default busybox image"
    )


def _find_busybox() -> Path:
    for candidate in (*_BUSYBOX_CANDIDATES, shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise BackendUnavailable("busybox: not found (apt-get install busybox-static)")


def _applets(busybox: Path) -> list[str]:
    names = set(_ESSENTIAL_APPLETS)
    try:
        result = _proc.run([str(busybox), "--list"], timeout=10)
    except VmPoolError as exc:
        log.debug("busybox --list failed: %s", exc)
    else:
        if result.returncode == 0:
            names.update(result.stdout.split())
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def _rootfs_tar(busybox: bytes, applets: Iterable[str]) -> bytes:
    """A tar of a minimal root: /bin/busybox, its applets as symlinks, /etc basics, /tmp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add_dir(path: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(path: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for path in ("bin", "dev", "etc", "proc", "root", "run", "sys", "var", "www"):
            add_dir(path)
        add_dir("tmp", 0o1777)
        add_dir("var/tmp", 0o1777)
        add_file("bin/busybox", busybox, 0o755)
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        add_file(
            "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        )
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("etc/hosts", b"127.0.0.1 localhost\n")
    return buf.getvalue()


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF":
        return False
    is64, little = data[4] == 2, data[5] == 1
    end = "<" if little else ">"
    if is64:
        phoff, = struct.unpack_from(end + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(end + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(end + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


# -- small parsers --------------------------------------------------------------------------------
def _may_have_warm_image(record: _Record | None) -> bool:
    """False only when the machine's record shows it was never snapshotted (no image to remove);
    without a record, removing is the safe guess."""
    return record is None or (record.warm_image is not None and record.warm_image != record.image)


def _binary_identity(tool: str) -> str | None:
    """``tool``'s resolved path, size and mtime (changed by an upgrade), or None if not found."""
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _have_runc() -> bool:
    return shutil.which("runc") is not None or any(Path(p).exists() for p in _RUNC_PATHS)


def _ulimit_items(ulimits: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in ulimits.items()))


def _validate_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"invalid name prefix {prefix!r}: use lowercase letters, digits and '-'")


def _is_missing(stderr: str) -> bool:
    text = stderr.lower()
    return any(
        marker in text
        for marker in ("no such container", "no such image", "no such network", "not known",
                       "not found", "no such object")
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _json_rows(text: str) -> list[dict[str, Any]]:
    """A JSON array (podman ``--format json``) or one object per line (docker ``{{json .}}``)."""
    text = text.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise BackendError(f"unexpected output (not JSON): {text[:200]!r}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise BackendError(f"unexpected output (not a JSON list): {text[:200]!r}")
    return [row for row in data if isinstance(row, dict)]


def _labels(raw: Any) -> dict[str, str]:
    """Labels as a dict (podman) or ``k=v,k=v`` (docker's table output).

    The image's recipe label, which every container of the image inherits, is not an owner
    label of the machine and is left out.
    """
    if isinstance(raw, dict):
        pairs: Iterable[tuple[str, str]] = ((str(k), str(v)) for k, v in raw.items())
    elif isinstance(raw, str) and raw:
        pairs = ((k, v) for k, _, v in (item.partition("=") for item in raw.split(",")))
    else:
        return {}
    return {k: v for k, v in pairs if k and k != RECIPE_LABEL}
