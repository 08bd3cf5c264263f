"""Which accelerator machines use: as configured, or for ``auto`` a per-host KVM verdict.

``/dev/kvm`` opening is not enough (on some hosts a guest kernel hangs under KVM), so ``auto``
boots the image once per host under KVM with a deadline (``kvm_probe_timeout``); KVM counts
only if the guest agent answers in time. The verdict is cached in the user's cache directory,
keyed by the qemu binary, the host kernel and the guest kernel's content.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import cast

import platformdirs

from vmpool._files import private_dir
from vmpool._lock import file_lock
from vmpool.backends.qemu import agent, process, sockets
from vmpool.backends.qemu.image import ImagePaths, find_image
from vmpool.backends.qemu.records import (
    OVERLAY,
    QMP_SOCK,
    Accel,
    Record,
    read_json,
    write_json,
)
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, LockTimeout, VmPoolError

log = logging.getLogger(__name__)

_LAUNCH_TIMEOUT = 60.0


class AccelResolver:
    """Decides the accelerator once per process (and for ``auto`` once per host)."""

    def __init__(self, settings: QemuSettings, root: Path, launcher: process.Launcher) -> None:
        self.settings = settings
        self.root = root
        self.launcher = launcher
        self._accel: Accel | None = None
        self._lock = threading.Lock()

    def resolve(self) -> Accel:
        with self._lock:
            if self._accel is None:
                self._accel = self._decide()
            return self._accel

    def _decide(self) -> Accel:
        if self.settings.accel != "auto":
            return self.settings.accel
        if not kvm_device_usable():
            log.info("qemu: /dev/kvm missing or not accessible, using tcg")
            return "tcg"
        image = find_image(self.settings)
        key = self._key(image)
        # the verdict belongs to the host, not to one state directory: every new state dir
        # (each CI job, each pytester run) would otherwise pay a full probe deadline again
        cache_dir = Path(platformdirs.user_cache_dir("vmpool"))
        cache = cache_dir / "accel.json"
        lock = cache_dir / ".accel.lock"
        private_dir(cache_dir)
        private_dir(self.root)
        wait = self.settings.kvm_probe_timeout * 2 + _LAUNCH_TIMEOUT
        try:
            with file_lock(lock, timeout=wait, holder="another KVM probe"):
                verdicts = read_json(cache)
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
                write_json(cache, verdicts)
                return accel
        except LockTimeout as exc:
            raise BackendError(f"timed out waiting for another KVM probe ({lock})") from exc

    def _key(self, image: ImagePaths) -> str:
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
            process.kill_run(run_dir)
            process.remove_files(run_dir)

    def _probe_kvm(self, image: ImagePaths) -> tuple[Accel, str]:
        timeout = self.settings.kvm_probe_timeout
        run_dir = Path(tempfile.mkdtemp(prefix=".kvm-probe-", dir=self.root))
        started = time.monotonic()
        log.info("qemu: probing KVM by booting the image (deadline %gs)", timeout)
        try:
            sock_dir = sockets.make_socket_dir(run_dir, QMP_SOCK)
            record = Record(
                name="kvm-probe",
                index=0,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                accel="kvm",
            )
            process.make_overlay(image, run_dir / OVERLAY)
            try:
                self.launcher.launch(run_dir, record, "kvm")
                agent.wait_agent(run_dir, record, timeout, what="KVM probe guest")
            except VmPoolError as exc:
                reason = f"KVM guest did not answer: {exc}"
                log.warning("qemu: %s; using tcg", reason)
                return "tcg", reason
            reason = f"KVM guest answered in {time.monotonic() - started:.1f}s"
            log.info("qemu: %s; using kvm", reason)
            return "kvm", reason
        finally:
            process.kill_run(run_dir)
            process.remove_files(run_dir)


def kvm_device_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
