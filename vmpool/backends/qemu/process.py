"""qemu-system processes: the command line, launching daemonized, finding, stopping, killing.

A machine's process is found through its run directory's pidfile and checked by its command
line (``-pidfile`` with that path, ``-name``), so a reused pid is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from vmpool import _proc
from vmpool._files import UMASK, tighten_tree
from vmpool.backends.base import probe_until
from vmpool.backends.qemu import debian_guest, qmp, sockets
from vmpool.backends.qemu.records import (
    CONSOLE,
    OVERLAY,
    PIDFILE,
    QMP_SOCK,
    RECORD,
    Accel,
    Record,
    load_record,
    read_json_quiet,
    tail,
)
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, ReadyTimeout

if TYPE_CHECKING:
    from vmpool.backends.qemu.image import ImagePaths
    from vmpool.backends.qemu.network import Networks

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install qemu-system-x86"
IMG_INSTALL_HINT = "apt-get install qemu-utils"
#: the hostname a template guest boots with (its clones get their own)
TEMPLATE_NAME = "vmpool-template"

_LAUNCH_TIMEOUT = 60.0
_IMG_TIMEOUT = 60.0
_STOP_TIMEOUT = 5.0


class QemuExited(Exception):  # private control flow of this package: never escapes it
    """The qemu process is gone; stop probing."""


class ProbeFailed(Exception):  # private control flow of this package: never escapes it
    """A probe saw a definite failure; stop probing."""


class Launcher:
    """Builds qemu's command line from the settings and launches it (-daemonize)."""

    def __init__(self, settings: QemuSettings, networks: Networks) -> None:
        self.settings = settings
        self.networks = networks

    def cmdline(self, record: Record | None) -> str:
        """The kernel command line; ``None`` is the template's (no address: clones get theirs)."""
        if record is not None and record.distro == "debian":
            return debian_guest.kernel_cmdline(self.settings)
        hostname = record.name if record is not None else TEMPLATE_NAME
        cmdline = ["console=ttyS0", "quiet", "panic=1", f"vmpool.hostname={hostname}"]
        if record is not None and record.ip is not None:
            cmdline.append(f"vmpool.ip={record.ip}/{record.prefix}")
        if self.settings.append:
            cmdline.append(self.settings.append)
        return " ".join(cmdline)

    def argv(
        self,
        run_dir: Path,
        record: Record,
        accel: Accel,
        *,
        template: bool = False,
        incoming: Path | None = None,
    ) -> list[str]:
        """qemu's command line. A template and its clones differ only in host-side parts
        (paths, sockets, netdev, MAC property): the devices must match for the restore."""
        s = self.settings
        cloned = template or incoming is not None
        debian = record.distro == "debian"
        argv = [
            s.binary,
            "-daemonize",
            "-nodefaults",
            "-no-reboot",
            "-display", "none",
            "-name", f"guest={record.name},process={record.name}",
            "-M", s.machine,
            "-accel", accel,
            "-m", str(debian_guest.memory(s) if debian else s.memory),
            "-smp", str(s.cpus),
            "-serial", f"file:{run_dir / CONSOLE}",
            "-kernel", record.kernel,
            "-initrd", record.initrd,
            "-append", self.cmdline(None if cloned else record),
            "-drive", f"file={run_dir / OVERLAY},if=virtio,format=qcow2",
            "-device", "virtio-serial",
            "-chardev", f"socket,path={record.qga_sock},server=on,wait=off,id=qga0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{record.qmp_sock},server=on,wait=off",
            "-pidfile", str(run_dir / PIDFILE),
        ]
        if debian:
            argv += debian_guest.nic_argv(record)
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

    def launch(
        self,
        run_dir: Path,
        record: Record,
        accel: Accel,
        *,
        template: bool = False,
        incoming: Path | None = None,
    ) -> None:
        """Start qemu for ``record``; returns once its sockets exist (the guest still boots)."""
        for stale in (run_dir / PIDFILE, record.qmp_sock, record.qga_sock):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = self.argv(run_dir, record, accel, template=template, incoming=incoming)
        with self.networks.held(record):
            result = _proc.run(argv, timeout=_LAUNCH_TIMEOUT, install_hint=INSTALL_HINT)
        if result.returncode != 0:
            raise BackendError(
                f"qemu for {record.name} failed to start (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}{died_hint(run_dir)}"
            )
        tighten_tree(run_dir)  # qemu's -daemonize sets umask 027 (pidfile, console.log: 0640)
        log.debug("started qemu for %s (%s) in %.2fs", record.name, accel, result.duration)


def find(run_dir: Path) -> psutil.Process | None:
    """The live qemu process of ``run_dir``: its pidfile's pid, checked by command line."""
    try:
        pid = int((run_dir / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    found = running(pid)
    if found is None:
        return None
    proc, cmdline = found
    pidfile = str(run_dir / PIDFILE)
    ours = "-pidfile" in cmdline and pidfile in cmdline and "-name" in cmdline
    return proc if ours else None


def running(pid: int) -> tuple[psutil.Process, list[str]] | None:
    """The process ``pid`` and its command line (to tell whether it is ours), unless it is
    gone, a zombie or not ours to read."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc, proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def stop(run_dir: Path, proc: psutil.Process) -> None:
    """QMP ``quit``, then signals if qemu does not exit in time."""
    try:
        qmp.qmp(load_record(run_dir), "quit", None)
    except BackendError as exc:
        log.debug("QMP quit failed (%s); signalling pid %s", exc, proc.pid)
    if wait_gone(proc, _STOP_TIMEOUT):
        return
    kill(proc)


def stop_run(run_dir: Path) -> None:
    """stop() the qemu of ``run_dir`` if it runs."""
    proc = find(run_dir)
    if proc is not None:
        stop(run_dir, proc)


def kill_run(run_dir: Path) -> None:
    """kill() the qemu of ``run_dir`` if it runs."""
    proc = find(run_dir)
    if proc is not None:
        kill(proc)


def kill(proc: psutil.Process) -> None:
    """SIGTERM, then SIGKILL: only ever called on a process identified as ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return
        if wait_gone(proc, _STOP_TIMEOUT):
            return
    log.warning("qemu pid %s survived SIGKILL", proc.pid)


def wait_gone(proc: psutil.Process, timeout: float) -> bool:
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


def remove_files(run_dir: Path) -> None:
    """Remove the run directory and a fallback socket directory of its own."""
    recorded = read_json_quiet(run_dir / RECORD).get("sock_dir")
    sock_dir = (
        Path(recorded) if isinstance(recorded, str)
        else sockets.socket_dir(run_dir, QMP_SOCK)
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    # a fallback directory only through a parent that is still ours (never a symlink)
    if sock_dir != run_dir and sockets.is_private_dir(sock_dir.parent):
        shutil.rmtree(sock_dir, ignore_errors=True)


def died_hint(run_dir: Path) -> str:
    """For error messages: empty while qemu runs, else that it is gone and the console's tail."""
    if find(run_dir) is not None:
        return ""
    text = tail(run_dir / CONSOLE)
    if not text:
        return " (qemu is not running)"
    return f" (qemu is not running; console tail:\n{text})"


def make_overlay(image: ImagePaths, overlay: Path) -> None:
    """A qcow2 overlay backed by the image's disk."""
    _proc.run(
        [
            "qemu-img", "create", "-q", "-f", "qcow2",
            "-b", str(image.disk.resolve()), "-F", image.disk_format, str(overlay),
        ],
        timeout=_IMG_TIMEOUT,
        install_hint=IMG_INSTALL_HINT,
        umask=UMASK,
    ).check("create overlay")
