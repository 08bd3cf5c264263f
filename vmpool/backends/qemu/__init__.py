"""The QEMU backend as a package of small modules (see backend.py for how they fit)."""

from vmpool.backends.qemu.backend import QemuBackend
from vmpool.backends.qemu.image import build_image, find_image

__all__ = ["QemuBackend", "build_image", "find_image"]
