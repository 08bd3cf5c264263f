"""Backends: one module per real tool, plus ``sim``, all behind the ``Backend`` protocol.

``make_backend`` builds one from a profile; ``auto`` picks the first usable real tool.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vmpool.backends.base import Backend
from vmpool.config import Profile
from vmpool.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

#: the order ``auto`` tries real tools in
AUTO_ORDER = ("orbstack", "podman", "docker", "qemu")
NAMES = ("sim", *AUTO_ORDER)


def make_backend(name: str, profile: Profile, state_dir: Path) -> Backend:
    """The backend ``name`` configured from ``profile`` (``auto`` resolves to a real tool)."""
    if name == "auto":
        return auto_backend(profile, state_dir)
    if name == "sim":
        from vmpool.backends.sim import SimBackend

        return SimBackend(profile.sim, state_dir)
    if name in ("podman", "docker"):
        from vmpool.backends.podman import PodmanBackend

        settings = profile.podman
        if settings.tool != name:
            settings = settings.model_copy(update={"tool": name})
        if settings.hosts:
            if name != "podman":
                raise ConfigError('[podman] hosts needs backend "podman" (docker has no --url); '
                                  f"got backend {name!r}")
            from vmpool.backends.podman.fleet import FleetBackend

            return FleetBackend(settings, state_dir, profile.image)
        return PodmanBackend(settings, state_dir, profile.image)
    if name == "qemu":
        from vmpool.backends.qemu import QemuBackend

        return QemuBackend(profile.qemu, state_dir, packages=profile.image.packages)
    if name == "orbstack":
        from vmpool.backends.orbstack import OrbstackBackend

        return OrbstackBackend(profile.orbstack, state_dir)
    raise ConfigError(f"unknown backend {name!r}; choose one of: auto, {', '.join(NAMES)}")


_TOOLS = {"orbstack": "orbctl", "podman": "podman", "docker": "docker", "qemu": None}


def auto_backend(profile: Profile, state_dir: Path) -> Backend:
    """The first of orbstack, podman, docker, qemu whose tool (and image) is usable."""
    reasons = []
    for name in AUTO_ORDER:
        tool = _TOOLS[name] or profile.qemu.binary
        if shutil.which(tool) is None:
            reasons.append(f"{name}: {tool} not found")
            continue
        backend = make_backend(name, profile, state_dir)
        try:
            backend.check()
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        log.info("auto backend: %s", name)
        return backend
    raise BackendUnavailable(
        "no usable backend found (" + "; ".join(reasons) + "). Install one: OrbStack (macOS), "
        "`apt-get install podman runc` then `vmpool image build --backend podman`, or "
        "`apt-get install qemu-system-x86 qemu-utils busybox-static qemu-guest-agent "
        "linux-image-amd64` then `vmpool image build --backend qemu`"
    )
