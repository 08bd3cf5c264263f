"""Podman (or docker) containers as machines.

What outsiders use is exported here; the modules each own one part: ``backend`` (the
lifecycle), ``tool`` (the command line), ``runtime`` (OCI runtime and ulimits), ``options``
(a container's options), ``records`` (recipes), ``commands`` and ``exec_agent`` (exec),
``networks`` and ``isolation``, ``image`` (busybox, Debian and warm images), ``live_reset`` and
``overlay_tree`` (the in-place reset), ``api`` (podman's REST API service and client).
"""

from vmpool.backends.podman.backend import PodmanBackend
from vmpool.backends.podman.image import (
    DEBIAN_REPO,
    DEFAULT_IMAGE,
    build_image,
    debian_image_name,
    image_current,
    machine_image,
    missing_image_message,
    warm_image_name,
)
from vmpool.backends.podman.runtime import RunOptions

__all__ = [
    "DEBIAN_REPO",
    "DEFAULT_IMAGE",
    "PodmanBackend",
    "RunOptions",
    "build_image",
    "debian_image_name",
    "image_current",
    "machine_image",
    "missing_image_message",
    "warm_image_name",
]
