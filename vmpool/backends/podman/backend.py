"""Podman (or docker) containers as machines: the backend's lifecycle, built from small parts.

One class drives either tool (``[podman] tool``) through its collaborators: `Tool` (the command
line), `ApiChannel` (podman's API service, which a prepared object uses instead of the command
line: vmpool.backends.podman.channel), `RuntimeDetector` (the OCI runtime and ``--ulimit``
values), `Commands` (exec, through the exec agent), `RecordStore` (each machine's recipe),
`Networks`, `Removal` (vmpool.backends.podman.removal) and `LiveReset`
(vmpool.backends.podman.live_reset). On podman, reset is first tried in place,
without a new container (the processes running at ready time keep running, the address stays).
Otherwise, and on docker, reset is "commit when ready, recreate from the commit": each
machine's recipe (options and command) is kept in ``<state_dir>/<tool>/<name>.json`` so any
process sharing the state directory can recreate it exactly. A commit holds the filesystem, not
processes (a daemon started before it is not running after such a reset), and a recreated
container may get a new address on its network (its name, which is also its hostname, stays).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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
from vmpool.backends.podman import inventory
from vmpool.backends.podman.api import PodmanApi
from vmpool.backends.podman.api_reset import NET_FILES, ApiReset, api_spec, holder_name
from vmpool.backends.podman.channel import ApiChannel, stop_service
from vmpool.backends.podman.cli_reset import cli_reset
from vmpool.backends.podman.commands import Commands
from vmpool.backends.podman.exec_agent import MOUNT_POINT as AGENT_MOUNT
from vmpool.backends.podman.image import (
    INIT,
    machine_image,
    missing_image_message,
    warm_image_name,
)
from vmpool.backends.podman.live_reset import LiveReset
from vmpool.backends.podman.networks import Networks
from vmpool.backends.podman.options import (
    AGENT_ARGV0,
    SSH_PORT,
    SSH_PUBLISH,
    SYSTEMD_OPTION,
    ContainerOptions,
)
from vmpool.backends.podman.records import MachineRecord, RecordStore, write_json
from vmpool.backends.podman.remote_api import remote_channel
from vmpool.backends.podman.removal import Removal
from vmpool.backends.podman.runtime import RunOptions, RuntimeDetector
from vmpool.backends.podman.tool import Tool, last_line
from vmpool.config_backends import ImageSettings, PodmanSettings
from vmpool.errors import BackendError, BackendUnavailable
from vmpool.ssh import pool_key

log = logging.getLogger(__name__)

#: ``diff`` lines of a container that wrote nothing: the mount points' directories (the tool's
#: own, and the exec agent's)
_MOUNT_POINT_DIRS = frozenset({"C /etc", "C /run", f"A {AGENT_MOUNT}"})
#: check() passes are remembered this long: the plugin's preparation and the controller's start
#: both ask, moments apart, and each ask costs a process
_CHECK_TTL = 60.0
# aliases: inside PodmanBackend the name `list` is the protocol's method, not the builtin
_MachineInfos = list[MachineInfo]
_Argv = list[str]
T = TypeVar("T")



class _ContainerExited(Exception):
    """Internal: ends probe_until early (it retries every VmPoolError); never leaves the module."""


class PodmanBackend(BackendBase):
    """Containers as machines, driven through the ``podman`` (or ``docker``) command line."""

    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(
        self, settings: PodmanSettings, state_dir: Path, image: ImageSettings | None = None,
        *, url: str | None = None,
    ) -> None:
        """``url``: a podman service (vmpool.backends.podman.fleet), where every command goes
        through the host's REST API (vmpool.backends.podman.remote_api) or ``podman --url``;
        nothing host-side applies there (no live reset, no cgroup kill, no API service of this
        machine): the full reset is on the CLI."""
        self.settings = settings
        self.name: str = settings.tool
        #: the image machines are made from
        self.image = machine_image(settings, image)
        self._tool = Tool(settings, url=url)
        local_podman = self._tool.is_podman and not self._tool.remote
        self._state_dir = Path(state_dir)
        self._dir = Path(state_dir) / settings.tool
        self._records = RecordStore(self._dir)
        self._runtime = RuntimeDetector(self._tool, self.image, self._dir, write_json)
        self._commands = Commands(self._tool, self._dir / "exec", self._agent_autostarts)
        #: the pool's API service, which a prepared object uses (vmpool.backends.podman.channel)
        self._channel: ApiChannel | None = None
        if local_podman:
            self._channel = ApiChannel(self._state_dir, timeout=settings.command_timeout)
        elif url is not None and self._tool.is_podman:  # the host's own service, if reachable
            self._channel = remote_channel(url, timeout=settings.command_timeout)
        self._networks = Networks(self._tool, self._channel)
        self._options = ContainerOptions(self._tool, self._runtime, self._commands, self.image,
                                         self._state_dir)
        self._checked_at: float | None = None
        #: in-place resets (vmpool.backends.podman.live_reset); podman only
        self._live = LiveReset(self._dir / "live", write_json) if local_podman else None
        #: full resets through podman's API service; podman only
        self._api = ApiReset(self._channel) if self._channel is not None and local_podman \
            else None
        self._removal = Removal(self._tool, self._records, self._channel, self._live,
                                self._forget)

    # -- the protocol --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise BackendUnavailable when the tool, the image or a working runtime is missing.

        A pass is remembered for ``_CHECK_TTL`` seconds by this object; a failure never is.
        """
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < _CHECK_TTL:
            return
        image = self.image
        if not self._tool.image_exists(image, what="check"):
            raise BackendUnavailable(missing_image_message(self._tool.name, image))
        self.run_options()
        self._checked_at = now

    def prepare(self, *, networked: bool) -> None:
        """Start the pool's API service in the background (podman), which this object then
        uses until close(), and learn the image's configuration once."""
        if self._channel is not None:
            self._channel.begin()
        self._options.boots_systemd()

    def close(self) -> None:
        """Stop the API service prepare() started (and any the state directory records)."""
        if self._channel is not None:
            self._channel.close()

    def create(self, spec: MachineSpec) -> None:
        name = validate_name(spec.name)
        if spec.network is not None:
            validate_name(spec.network)
        systemd = self._options.boots_systemd()
        options = self._options.build(name, spec.labels, spec.network, systemd=systemd)
        command = self._options.command(name, systemd=systemd)
        self._commands.rebuild_dir(name)
        record = MachineRecord(name, self.image, options, command, network=spec.network)
        api = self._channel is not None and self._channel.client() is not None
        recipe = api_spec(record, self.image, netns_of=None) if api else None
        if recipe is None or self._api_call(f"create {name}", lambda c: c.create(recipe)) is None:
            self._tool.run("create", *options, self.image, *command).check(f"create {name}")
        self._records.write(record)

    def start(self, name: str) -> None:
        validate_name(name)
        if self._api_call(f"start {name}", lambda c: c.start(name)) is None:
            self._tool.run("start", name).check(f"start {name}")
        self._commands.started(name)  # an agent start that failed while it was stopped

    def _api_call(self, what: str, request: Callable[[PodmanApi], T]) -> T | None:
        """``request`` through the API service while this object holds one, else None."""
        return self._channel.call(what, request) if self._channel is not None else None

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe with `true` until the container answers; a systemd one is ready once
        `systemctl is-system-running` says one of ``[podman] ready_states``."""
        validate_name(name)
        deadline = time.monotonic() + timeout
        record = self._records.load(name)
        systemd = record is not None and SYSTEMD_OPTION in record.options

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
            probe_until(probe, timeout=timeout, what=f"{self._tool.name} container {name}")
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
        return self._commands.exec(name, argv, timeout)

    def snapshot(self, name: str) -> None:
        """Commit the (ready) container to its warm image, which reset() recreates it from.

        A container that has written nothing since it was made from its image needs no commit:
        reset() recreates it from that image itself (a commit would be an identical copy).
        """
        validate_name(name)
        record = self._records.load(name) or self._record_from_inspect(name)
        if record.warm_image is None and self._unchanged(name):
            record.warm_image, record.warm_image_id = record.image, None
            record.ip, record.net_files = self._network_identity(name, record)
            self._records.write(record)
            log.debug("snapshot %s: unchanged since %s, no commit", name, record.image)
            self._snapshot_live(name)
            return
        warm = warm_image_name(name)
        if record.warm_image != warm:
            # written ahead of the commit: delete() removes warm images only of machines whose
            # record names one, so a commit cut short must not leave an image nobody knows of
            record.warm_image = warm
            self._records.write(record)
        commit = ["commit", "-q", name, warm] if self._tool.is_podman else ["commit", name, warm]
        result = self._tool.run(*commit).check(f"snapshot {name}")
        image_id = last_line(result.stdout)
        if record.warm_image_id and record.warm_image_id != image_id:
            # the container may still run from the old image; it is removed after the next reset
            record.stale_images.append(record.warm_image_id)
        record.warm_image, record.warm_image_id = warm, image_id
        record.ip, record.net_files = self._network_identity(name, record)
        self._records.write(record)
        log.debug("snapshot %s -> %s (%s) in %.3fs", name, warm, image_id, result.duration)
        self._snapshot_live(name)

    def _network_identity(self, name: str, record: MachineRecord
                          ) -> tuple[str | None, dict[str, str]]:
        """The address, /etc/hosts and resolv.conf a full reset gives back (networked only)."""
        if not record.network:
            return None, {}
        info = self._inspect(name) or {}
        files = {}
        for key in NET_FILES:
            try:
                files[key] = Path(str(info[key])).read_text(encoding="utf-8")
            except (KeyError, OSError):  # docker's live in the daemon's directory
                continue
        return self._address_in(name, info), files

    def _snapshot_live(self, name: str) -> None:
        """Record the ready state a live reset returns to (nothing when one is impossible)."""
        if self._live is None:
            return
        info = self._inspect(name)
        if info is not None:
            agent = self._commands.agent(name)
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

    def ssh(self, name: str) -> SshAccess | None:
        """sshd of a systemd machine, published on 127.0.0.1; None for other machines."""
        record = self._records.load(validate_name(name))
        if record is None or SSH_PUBLISH not in record.options:
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
        lines = self._api_call(f"diff {name}", lambda c: c.changes(name))
        if lines is None:
            result = self._tool.run("diff", name)
            if result.returncode != 0:
                return False
            lines = result.stdout.splitlines()
        return {line.strip() for line in lines if line.strip()} <= _MOUNT_POINT_DIRS

    def reset(self, name: str) -> None:
        """Reset in place (vmpool.backends.podman.live_reset) where possible, else replace the
        container by a fresh one from its warm image (same name and options)."""
        validate_name(name)
        if self._live is not None and self._live.reset(name):
            if self._commands.intact(name):
                record = self._records.load(name)
                if record is not None:  # warm images an earlier snapshot left, now unused
                    self._drop_stale_images(record)
                return
            # the live reset keeps the ready-time agent; one whose FIFO a test replaced no
            # longer serves, and only a new container rebuilds its directory (finding 4)
            log.info("reset %s: the exec agent no longer listens; a full reset instead", name)
        record = self._records.load(name)
        if record is None and self._tool.image_exists(warm_image_name(name), what="reset"):
            # the record is lost but the warm image is there: rebuild the recipe from the tool
            record = self._record_from_inspect(name)
            record.warm_image = warm_image_name(name)
        if record is None or not record.warm_image:
            raise BackendError(f"reset {name}: no snapshot recorded; snapshot() it first")
        if not self._api_reset_done(record):
            cli_reset(self._tool, self._commands, record, self._holder_of(record))
        self._drop_stale_images(record)
        self.wait_ready(name, self.settings.command_timeout)
        self._snapshot_live(name)  # the new container's ready state, for the next reset

    def _api_reset_done(self, record: MachineRecord) -> bool:
        """The full reset through the API service (vmpool.backends.podman.api_reset); False
        where the CLI path must do it, or when the API failed part-way (logged)."""
        if self._api is None or record.warm_image is None:
            return False
        # the last user may have tampered with the agent's files: the new container gets new
        # ones (and its agent in wait_ready)
        options = self._commands.with_mounts(record.name, record.options)
        recipe = replace(record, options=options)
        try:
            return self._api.reset(
                recipe, record.warm_image,
                before_create=lambda: self._commands.rebuild_dir(record.name),
            )
        except BackendError as exc:
            log.warning("reset %s through the podman API failed (the CLI instead): %s",
                        record.name, exc)
            return False

    def _holder_of(self, record: MachineRecord) -> str | None:
        return self._removal.holder_of(record, self._inspect)

    def delete(self, name: str) -> None:
        self._removal.delete(validate_name(name))

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """``delete()`` each of ``names`` (vmpool.backends.podman.removal): in two tool
        processes, or through the API service while this object holds one.

        Returns ``{name: error}`` for the machines that could not be removed (empty: all gone).
        """
        names = list(names)
        if not names:
            return {}
        errors = self._removal.delete_many(names)
        self._stop_unheld_service()
        return errors

    def _stop_unheld_service(self) -> None:
        """After a removal by an object that holds no service (prepare() was not called), the
        API service a reset started goes too (a later reset starts it again); a holder stops
        its own at close()."""
        if self._channel is not None and not self._channel.held:
            self._channel.close()

    def list(self, prefix: str) -> _MachineInfos:
        return inventory.machines(self._tool, prefix, self._channel)

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        self._networks.create(name, labels)

    def delete_network(self, name: str) -> None:
        self._networks.delete(name)

    def list_networks(self, prefix: str) -> _MachineInfos:
        return self._networks.list(prefix)

    def run_options(self) -> RunOptions:
        """The ``--runtime``/``--ulimit`` verdict (vmpool.backends.podman.runtime)."""
        return self._runtime.options()

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
        record = self._records.load(name)
        preferred = [record.network] if record is not None and record.network else []
        for net in [*preferred, *networks]:
            ip = (networks.get(net) or {}).get("IPAddress")
            if ip:
                return str(ip)
        ip = settings.get("IPAddress")
        if not ip and not networks and record is not None and record.network:
            holder = self._holder_of(record)  # the machine shares its holder's namespace
            held = self._inspect(holder) if holder is not None else None
            if held is not None:
                return self._address_in(holder_name(name), held)
        return str(ip) if ip else None


    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> _Argv:
        """Remove the recipes and agent directories of machines named ``prefix…`` that are not
        in ``existing`` (removed outside vmpool), once untouched for ``older_than`` seconds (a
        machine being created has them a moment before it exists). Returns what went."""
        gone = inventory.sweep(self._dir, prefix, existing, older_than=older_than,
                               dry_run=dry_run)
        if not existing and not dry_run and self._channel is not None and not self._channel.held:
            stop_service(self._state_dir)  # no machine left that a reset would need it for
        return gone

    def _forget(self, name: str) -> None:
        """Drop what this backend keeps of a removed machine: its record and agent directory."""
        self._records.forget(name)
        self._commands.forget(name)
        if self._live is not None:
            self._live.forget(name)

    def _raise_if_exited(self, name: str) -> None:
        """Stop waiting for a container that has already exited (it will never answer)."""
        info = self._inspect(name)
        state = (info or {}).get("State") or {}
        if info is None or str(state.get("Status", "")).lower() not in ("exited", "stopped"):
            return
        logs = self._tool.run("logs", "--tail", "20", name)
        raise _ContainerExited(
            f"{self._tool.name} container {name} exited with code {state.get('ExitCode')} "
            f"before it was ready; last output:\n{(logs.stdout + logs.stderr).strip()[-2000:]}"
        )

    def _drop_stale_images(self, record: MachineRecord) -> None:
        self._removal.drop_stale_images(record)

    def _agent_autostarts(self, name: str) -> bool:
        """Whether the machine's command starts the exec agent itself (see ContainerOptions)."""
        record = self._records.load(name)
        return record is not None and record.command[3:4] == [AGENT_ARGV0]

    def _inspect(self, name: str) -> dict[str, Any] | None:
        info = self._api_call(f"inspect {name}", lambda c: c.inspect(name))
        return info if info is not None else self._tool.inspect(name)

    def _record_from_inspect(self, name: str) -> MachineRecord:
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
        options = self._options.build(name, labels, network, systemd=command == [INIT])
        return MachineRecord(name, image, options, command, network=network)

