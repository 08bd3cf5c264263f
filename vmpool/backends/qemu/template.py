"""Clone templates: one running guest's state saved per configuration and host.

The first machine of a configuration (or prepare()) boots a template guest and saves its running
state with QMP ``migrate`` to ``exec:cat > FILE``; clones start from it with ``-incoming``. One
builder per host at a time (a lock file beside the state); a state whose inputs changed is
pruned, and one that qemu could not load is discarded so the next machine rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmpool._files import private_dir, tighten
from vmpool._lock import file_lock
from vmpool.backends.base import probe_until
from vmpool.backends.qemu import agent, process, qmp, sockets
from vmpool.backends.qemu.image import MANIFEST_FILE, ImagePaths, find_image, image_dir
from vmpool.backends.qemu.records import (
    OVERLAY,
    QMP_SOCK,
    Accel,
    Record,
    file_identity,
    read_json_quiet,
    save_record,
    write_json,
)
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, LockTimeout, VmPoolError

log = logging.getLogger(__name__)

#: Bump when the template guest or its saved state changes meaning, so old states are unused.
_TEMPLATE_VERSION = 1
TEMPLATES_DIR = "qemu-templates"
#: The template's NIC (the clone sets its own MAC in the guest; the device's is migrated).
_TEMPLATE_MAC = "52:54:00:ff:ff:fe"
#: A template boots like any machine: generous, the host may be busy with other boots.
_TEMPLATE_BOOT_TIMEOUT = 180.0
_SAVE_TIMEOUT = 60.0
#: Waiting for another process's template: its boot plus its save, and some.
_TEMPLATE_LOCK_TIMEOUT = _TEMPLATE_BOOT_TIMEOUT + 2 * _SAVE_TIMEOUT
#: Discarding a bad template only waits briefly: whoever holds the lock is replacing it.
_DISCARD_LOCK_TIMEOUT = 2.0
#: A local file: no reason to throttle the save (QEMU's default is 128 MiB/s).
_SAVE_BANDWIDTH = 8 << 30
#: The vmdesc JSON QEMU appends to a complete stream is ~100 KiB; read this much of the tail.
_TRAILER_WINDOW = 4 << 20
_STREAM_MAGIC = b"QEVM\x00\x00\x00\x03"


@dataclass(frozen=True)
class Template:
    """A validated template state file."""

    path: Path
    stamp: str


class Templates:
    """The template states under ``directory`` for machines of ``settings``."""

    def __init__(
        self, settings: QemuSettings, directory: Path, launcher: process.Launcher
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.launcher = launcher
        #: template keys whose build failed in this process: their machines boot, no retry
        self._failed: set[str] = set()
        self._guard = threading.Lock()

    def path(self, networked: bool, accel: Accel) -> Path:
        """Where the template for this configuration (with or without a NIC) is saved."""
        key = self._key(find_image(self.settings), accel, networked)
        return self.directory / f"{key}.state"

    def get(self, networked: bool, accel: Accel, who: str) -> Template | None:
        """The valid template state for the configuration, built if missing.

        None (and a warning) when it cannot be had: the caller boots the machine instead.
        """
        try:
            image = find_image(self.settings)
            key = self._key(image, accel, networked)
        except VmPoolError as exc:
            log.warning("%s: no clone template (%s); booting instead", who, exc)
            return None
        with self._guard:
            if key in self._failed:
                return None
        path = self.directory / f"{key}.state"
        found = valid_template(path)
        if found is not None:
            return found
        lock = self.directory / f".{key}.lock"
        try:
            private_dir(self.directory)
            # one builder per host: other processes (xdist workers, sessions) wait for it
            with file_lock(lock, timeout=_TEMPLATE_LOCK_TIMEOUT, holder="another template build"):
                found = valid_template(path)
                if found is not None:
                    return found
                self._build(image, accel, networked, key, path)
                found = valid_template(path)
                if found is None:
                    raise BackendError(f"{path} is missing or incomplete after the build")
                return found
        except (VmPoolError, OSError) as exc:  # LockTimeout included
            log.warning(
                "qemu: could not build the clone template %s (%s: %s); booting machines instead",
                path, type(exc).__name__, exc,
            )
            with self._guard:
                self._failed.add(key)
            return None

    def discard(self, path: Path, stamp: str | None) -> None:
        """Remove the template state at ``path`` if it is still the file with ``stamp``."""
        lock = self.directory / f".{path.stem}.lock"
        try:
            with file_lock(lock, timeout=_DISCARD_LOCK_TIMEOUT, holder="a template build"):
                if stamp is not None and _stamp(path) == stamp:
                    path.unlink(missing_ok=True)
                    log.warning("qemu: removed the clone template %s (qemu could not load it)",
                                path)
        except (OSError, LockTimeout) as exc:
            log.warning("qemu: could not remove the clone template %s: %s", path, exc)

    def prune(self, keep: Path) -> None:
        """Remove templates whose input files are gone or changed: no key can reach them again.

        (Each rebuilt image, and each test session's temporary one, would otherwise leave
        ~90 MiB behind.)
        """
        for info_path in self.directory.glob("*.json"):
            state = info_path.with_suffix(".state")
            if state == keep:
                continue
            files = read_json_quiet(info_path).get("files")
            if not isinstance(files, dict):
                continue  # not ours, or from a build without the record: leave it
            if all(file_identity(Path(p)) == ident for p, ident in files.items()):
                continue
            log.info("qemu: removing the clone template %s (its inputs changed)", state)
            state.unlink(missing_ok=True)
            info_path.unlink(missing_ok=True)

    def _key(self, image: ImagePaths, accel: Accel, networked: bool) -> str:
        """What a saved state depends on: the guest image, the machine and the qemu binary."""
        s = self.settings
        manifest_files = read_json_quiet(image_dir(s) / MANIFEST_FILE).get("files")
        parts: list[str] = [
            f"v{_TEMPLATE_VERSION}",
            json.dumps(manifest_files, sort_keys=True),
            f"memory={s.memory}",
            f"cpus={s.cpus}",
            f"machine={s.machine}",
            f"accel={accel}",
            f"append={s.append}",
            f"networked={networked}",
            *(f"{path}:{ident}" for path, ident in self._files(image).items()),
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]

    def _files(self, image: ImagePaths) -> dict[str, str]:
        """The files a template depends on, each with its "size:mtime_ns" ("?" if missing)."""
        binary = shutil.which(self.settings.binary) or self.settings.binary
        return {
            os.path.realpath(path): file_identity(Path(path))
            for path in (binary, image.kernel, image.initrd, image.disk)
        }

    def _build(
        self, image: ImagePaths, accel: Accel, networked: bool, key: str, path: Path
    ) -> None:
        """Boot a template guest, save its running state to ``path`` (atomically), quit it.

        Called with the template's lock held, so leftovers of this key are an interrupted
        build's: they are removed first.
        """
        for stale in [*self.directory.glob(f".build-{key}-*"),
                      *self.directory.glob(f".{key}.state.*.tmp")]:
            if stale.is_dir():
                process.kill_run(stale)
                process.remove_files(stale)
            else:
                stale.unlink(missing_ok=True)
        started = time.monotonic()
        run_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.directory))
        tmp = self.directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        log.info("qemu: building the clone template %s", path)
        try:
            sock_dir = sockets.make_socket_dir(run_dir, QMP_SOCK)
            record = Record(
                name=process.TEMPLATE_NAME,
                index=0,
                sock_dir=str(sock_dir),
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                mac=_TEMPLATE_MAC if networked else None,
                accel=accel,
            )
            save_record(run_dir, record)  # stopping and cleanup read it
            process.make_overlay(image, run_dir / OVERLAY)
            self.launcher.launch(run_dir, record, accel, template=True)
            agent.wait_agent(run_dir, record, _TEMPLATE_BOOT_TIMEOUT, what="qemu clone template")
            booted = time.monotonic()
            _save_state(run_dir, record, tmp)
            write_json(
                path.with_suffix(".json"),
                {
                    "settings": self.settings.model_dump(mode="json"),
                    "accel": accel,
                    "networked": networked,
                    "files": self._files(image),
                    "size": tmp.stat().st_size,
                    "boot_seconds": round(booted - started, 2),
                    "save_seconds": round(time.monotonic() - booted, 2),
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            tighten(tmp)  # written by qemu under its own umask 027
            os.replace(tmp, path)
            self.prune(keep=path)
            log.info(
                "qemu: clone template saved in %.1fs (boot %.1fs): %s",
                time.monotonic() - started, booted - started, path,
            )
        finally:
            process.stop_run(run_dir)
            process.remove_files(run_dir)
            tmp.unlink(missing_ok=True)


def _save_state(run_dir: Path, record: Record, dest: Path) -> None:
    """``migrate`` the running guest to ``dest``; returns once the file is complete."""
    # On completion QEMU closes the pipe and at once SIGTERMs the process it started, which
    # could cut cat short. `; :` stops shells that exec a lone last command (bash, newer
    # dash) from making cat that process: the shell takes the signal, cat finishes writing.
    uri = f"exec:cat > {shlex.quote(str(dest))}; :"
    qmp.qmp_all(
        record,
        [
            ("migrate-set-parameters", {"max-bandwidth": _SAVE_BANDWIDTH}),
            ("migrate", {"uri": uri}),
        ],
        qmp.QMP_TIMEOUT,
    )

    def migrated() -> None:
        if process.find(run_dir) is None:
            raise process.QemuExited
        info = qmp.qmp(record, "query-migrate", None)
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled", None):
            detail = info.get("error-desc", "") if isinstance(info, dict) else ""
            raise process.ProbeFailed(f"migration {status}: {detail}")
        raise BackendError(f"migration {status}")

    def written() -> None:
        if valid_template(dest) is None:
            raise BackendError(f"{dest} is not complete yet")

    what = "saving the clone template"
    try:
        probe_until(migrated, timeout=_SAVE_TIMEOUT, what=what, first_interval=0.02,
                    max_interval=0.2)
        probe_until(written, timeout=_SAVE_TIMEOUT, what=what, first_interval=0.01,
                    max_interval=0.2)
    except process.QemuExited:
        raise BackendError(f"{what}: qemu exited{process.died_hint(run_dir)}") from None
    except process.ProbeFailed as exc:
        raise BackendError(f"{what}: {exc}") from None


def _stamp(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def valid_template(path: Path) -> Template | None:
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
    return Template(path, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
