"""The QEMU backend: one daemonized qemu-system process per machine, QMP plus the guest agent.

QemuBackend is the lifecycle; it composes the package's parts: ``records`` (the run directory),
``process`` (qemu's command line and process), ``qmp`` (savevm/loadvm, status, quit), ``agent``
(commands through qemu-ga), ``network`` (pool networks and their hubs), ``accel`` (KVM or TCG),
``template`` and ``clone`` (``warmup = "clone"``: machines restore a saved running state instead
of booting, then get their own identity; whatever goes wrong with cloning, the machine boots).
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import platformdirs

from vmpool import _proc
from vmpool._files import DIR_MODE, private_dir
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
from vmpool.backends.qemu import agent, debian_guest, process, qmp, sockets
from vmpool.backends.qemu.accel import AccelResolver
from vmpool.backends.qemu.clone import Clones
from vmpool.backends.qemu.image import ImagePaths, find_image
from vmpool.backends.qemu.network import Networks, mac
from vmpool.backends.qemu.records import (
    LABELS,
    NETWORKS_DIR,
    OVERLAY,
    QMP_SOCK,
    RECORD,
    Accel,
    Record,
    load_record,
    read_labels,
    save_record,
    write_json,
)
from vmpool.backends.qemu.template import TEMPLATES_DIR, Templates
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, ReadyTimeout
from vmpool.ssh import pool_key

log = logging.getLogger(__name__)

SNAPSHOT_TAG = "vmpool-ready"

_SNAPSHOT_TIMEOUT = 120.0
_RESYNC_TIMEOUT = 15.0
#: setting a Debian guest's identity (ssh-keygen, an sshd restart): seconds on a busy host
_IDENTITY_TIMEOUT = 120.0


class QemuBackend(BackendBase):
    """Machines are qemu-system-x86_64 processes booting the vmpool guest image."""

    name = "qemu"
    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(
        self,
        settings: QemuSettings,
        state_dir: Path,
        *,
        template_dir: Path | None = None,
        packages: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        #: packages the Debian image was built with (``[image] packages``)
        self.packages = tuple(packages)
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "qemu"
        #: where clone templates are saved; per host by default, so every session shares them
        self.template_dir = (
            Path(template_dir)
            if template_dir is not None
            else Path(platformdirs.user_cache_dir("vmpool")) / TEMPLATES_DIR
        )
        self.networks = Networks(self.root)
        self.launcher = process.Launcher(settings, self.networks)
        self.accel = AccelResolver(settings, self.root, self.launcher)
        self.templates = Templates(settings, self.template_dir, self.launcher)
        self.clones = Clones(self.launcher, self.templates, self.resolve_accel)
        self.sessions = agent.Sessions()

    # --- checks -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise BackendUnavailable when qemu, qemu-img or the guest image is missing."""
        _proc.run(
            [self.settings.binary, "--version"], timeout=30, install_hint=process.INSTALL_HINT
        ).check("qemu --version")
        _proc.run(
            ["qemu-img", "--version"], timeout=30, install_hint=process.IMG_INSTALL_HINT
        ).check("qemu-img --version")
        self._image()

    # --- lifecycle ----------------------------------------------------------------------

    def create(self, spec: MachineSpec) -> None:
        """Write the run directory (labels first), allocate the address, make the overlay."""
        name = validate_name(spec.name)
        if name == NETWORKS_DIR:
            raise BackendError(f"machine name {name!r} is reserved by the qemu backend")
        image = self._image()
        debian = self.settings.distro == "debian"
        if debian:
            pool_key(self.state_dir)  # made once per pool, installed at the first readiness
        run_dir = self._run_dir(name)
        private_dir(self.root)
        try:
            run_dir.mkdir(mode=DIR_MODE)
        except FileExistsError as exc:
            raise BackendError(f"qemu machine {name} already exists ({run_dir})") from exc
        try:
            write_json(run_dir / LABELS, dict(spec.labels))
            net = None
            if spec.network is not None:
                net = self.networks.read(spec.network)
                if net is None:
                    raise BackendError(
                        f"network {spec.network} does not exist (create_network() first)"
                    )
            sock_dir = sockets.make_socket_dir(run_dir, QMP_SOCK)
            record = Record(
                name=name,
                index=spec.index,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                network=net.name if net else None,
                ip=net.host(spec.index) if net else None,
                prefix=net.prefix if net else None,
                mac=mac(net.name, spec.index) if net else None,
                hub=str(net.hub_sock) if net else None,
                distro=self.settings.distro,
            )
            process.make_overlay(image, run_dir / OVERLAY)
            save_record(run_dir, record)
        except BaseException:
            process.remove_files(run_dir)
            raise
        log.debug("created qemu machine %s in %s", name, run_dir)

    def start(self, name: str) -> None:
        """Launch qemu daemonized; returns once its sockets exist (the guest is still booting).

        With ``warmup = "clone"`` it first makes sure the template state exists (the first
        machine of a configuration builds it), then launches qemu restoring it.
        """
        run_dir = self._existing(name)
        if process.find(run_dir) is not None:
            log.debug("qemu machine %s already running", name)
            return
        record = load_record(run_dir)
        accel = self.resolve_accel()
        record = replace(
            record, accel=accel, template=None, template_stamp=None, clone_pending=False
        )
        if record.distro == "debian":
            # a new boot: identity and key again, on a port free now
            record = replace(record, ssh_port=debian_guest.free_port(), prepared=False)
        elif self.settings.warmup == "clone":
            template = self.templates.get(
                record.mac is not None, accel, f"qemu machine {record.name}"
            )
            if template is not None:
                clone = replace(
                    record,
                    template=str(template.path),
                    template_stamp=template.stamp,
                    clone_pending=True,
                    launched_at=time.monotonic(),
                )
                save_record(run_dir, clone)
                try:
                    self.launcher.launch(run_dir, clone, accel, incoming=template.path)
                    return
                except BackendError as exc:
                    log.warning("qemu machine %s: clone did not start (%s); booting it", name, exc)
                    process.kill_run(run_dir)
        record = replace(record, launched_at=time.monotonic())
        save_record(run_dir, record)
        self.launcher.launch(run_dir, record, accel)

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe the guest agent (guest-sync, then `true`) until it answers.

        A clone is first checked to have restored and given its own identity; a clone that
        cannot be is booted instead, within the same wait.
        """
        run_dir = self._existing(name)
        deadline = time.monotonic() + timeout
        record = load_record(run_dir)
        self.release(name)  # the probe opens its own connection; qemu-ga takes one at a time
        if record.clone_pending:
            with self.sessions.exclusive(name, deadline):
                record = self.clones.finish(run_dir, load_record(run_dir), deadline)
        remaining = max(deadline - time.monotonic(), 0.01)
        agent.wait_agent(run_dir, record, remaining, what=f"qemu machine {name}")
        if record.distro == "debian":
            self._wait_debian(run_dir, record, deadline)

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` through qemu-ga's guest-exec; ExecTimeout (and a kill) after ``timeout``."""
        if not argv:
            raise ValueError("exec needs a command")
        run_dir = self._existing(name)
        return self.sessions.exec(run_dir, load_record(run_dir), argv, timeout)

    def release(self, name: str) -> None:
        """Let go of the guest-agent connection this process keeps to ``name`` (at check-in,
        and before anything here opens its own), so that another one can connect."""
        self.sessions.release(name)

    def snapshot(self, name: str) -> None:
        """``savevm`` the running machine under the tag reset() loads."""
        run_dir = self._existing(name)
        with self.sessions.exclusive(name, time.monotonic() + _SNAPSHOT_TIMEOUT):
            qmp.hmp(load_record(run_dir), f"savevm {SNAPSHOT_TAG}", _SNAPSHOT_TIMEOUT)

    def reset(self, name: str) -> None:
        """``loadvm`` the ready snapshot, then resynchronise the guest agent."""
        run_dir = self._existing(name)
        record = load_record(run_dir)
        with self.sessions.exclusive(name, time.monotonic() + _SNAPSHOT_TIMEOUT):
            self.release(name)
            # one QMP session: loadvm, then whether the guest runs (loadvm resumes only a guest
            # that ran before, and leaves it stopped when it fails)
            output, status = qmp.qmp_all(
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
                    qmp.qmp(record, "cont", None)
                raise BackendError(
                    f"qemu machine {name}: `loadvm {SNAPSHOT_TAG}` failed: {failure}"
                )
            if not running:
                qmp.qmp(record, "cont", None)
            agent.wait_agent(
                run_dir, record, _RESYNC_TIMEOUT, what=f"qemu machine {name} after reset",
                run_true=False, set_clock=record.distro == "debian",
            )

    def delete(self, name: str) -> None:
        """Quit (or kill) qemu and remove the run directory; a missing machine is success."""
        validate_name(name)
        self.release(name)
        run_dir = self._run_dir(name)
        if run_dir.exists():
            process.stop_run(run_dir)
        process.remove_files(run_dir)
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
            labels = read_labels(run_dir / LABELS)
            out.append(MachineInfo(name, labels, process.find(run_dir) is not None))
        return out

    def address(self, name: str) -> str | None:
        """The machine's address on its pool network, or None without one."""
        return load_record(self._existing(name)).ip

    def ssh(self, name: str) -> SshAccess | None:
        """A Debian guest's sshd, forwarded from 127.0.0.1; None for the busybox guest."""
        record = load_record(self._existing(name))
        if record.distro != "debian" or record.ssh_port is None:
            return None
        return SshAccess("127.0.0.1", record.ssh_port, "root", pool_key(self.state_dir))

    # --- networks -----------------------------------------------------------------------

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Start the network's hub and record it (see Networks.create)."""
        self.networks.create(name, labels)

    def delete_network(self, name: str) -> None:
        """Stop the network's hub, remove its record and sockets; a missing network is success."""
        self.networks.delete(name)

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        """Network records whose name starts with ``prefix`` (a recorded network is usable)."""
        return self.networks.list(prefix)

    # --- acceleration and clone templates -----------------------------------------------

    def resolve_accel(self) -> Accel:
        """The accelerator machines use: as configured, or for ``auto`` a cached KVM verdict."""
        return self.accel.resolve()

    def prepare(self, *, networked: bool) -> None:
        """The slow one-off work, done before any machine is asked for: the KVM verdict and,
        with clone warm-up, the template (the plugin calls this while tests are collected)."""
        accel = self.resolve_accel()
        if self.settings.warmup == "clone" and self.settings.distro == "busybox":
            self.templates.get(networked, accel, "the pool")

    def template_path(self, networked: bool) -> Path:
        """Where the clone template for this configuration (with or without a NIC) is saved."""
        return self.templates.path(networked, self.resolve_accel())

    # --- internals ----------------------------------------------------------------------

    def _image(self) -> ImagePaths:
        if self.settings.distro == "debian":
            return debian_guest.image_paths(self.settings, self.packages)
        return find_image(self.settings)

    def _wait_debian(self, run_dir: Path, record: Record, deadline: float) -> None:
        """Ready = systemd in one of ``ready_states``, the machine's own identity and the
        pool's key set (once per boot), and sshd answering on the forwarded port.

        Resumable: the controller calls wait_ready in short slices; a slice that ends first
        raises ReadyTimeout and the next one continues (the identity is recorded once set).
        """
        name = record.name
        ready = self.settings.ready_states

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.01)

        def systemd_up() -> None:
            if process.find(run_dir) is None:
                raise process.QemuExited
            result = self.exec(name, ["systemctl", "is-system-running"], remaining())
            state = result.stdout.strip()
            if state not in ready:
                raise BackendError(f"systemd is {state!r}, not {' or '.join(ready)}")

        def ssh_up() -> None:
            if process.find(run_dir) is None:
                raise process.QemuExited
            assert record.ssh_port is not None
            debian_guest.probe_ssh(record.ssh_port, deadline)

        try:
            probe_until(systemd_up, timeout=remaining(), what=f"qemu machine {name} systemd",
                        first_interval=0.1, max_interval=0.5)
            if not record.prepared:
                public = pool_key(self.state_dir).with_suffix(".pub").read_text()
                # a one-off step of its own length: the controller waits in slices of 2 s
                result = self.exec(name, debian_guest.identity_argv(record, public),
                                   _IDENTITY_TIMEOUT)
                if not result.ok:
                    raise BackendError(
                        f"qemu machine {name}: setting its identity failed (exit "
                        f"{result.returncode}): {(result.stderr or result.stdout)[-500:]}"
                    )
                debian_guest.check_identity(record, result.stdout)
                record = replace(record, prepared=True)
                save_record(run_dir, record)
            probe_until(ssh_up, timeout=remaining(), what=f"qemu machine {name} ssh",
                        first_interval=0.1, max_interval=0.5)
        except process.QemuExited:
            raise BackendError(f"qemu machine {name}: qemu exited"
                               f"{process.died_hint(run_dir)}") from None
        except ReadyTimeout as exc:
            raise ReadyTimeout(f"{exc}{process.died_hint(run_dir)}") from None
        finally:
            # qemu-ga serves one connection at a time: the process warming the machine is
            # not the one that checks it out, pings and resets it
            self.release(name)

    def _run_dir(self, name: str) -> Path:
        return self.root / name

    def _existing(self, name: str) -> Path:
        validate_name(name)
        run_dir = self._run_dir(name)
        if not (run_dir / RECORD).is_file():
            raise BackendError(f"qemu machine {name} does not exist (no {run_dir / RECORD})")
        return run_dir
