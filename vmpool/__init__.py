"""vmpool: a pre-warmed pool of real machines (QEMU, podman, OrbStack) for pytest and xdist."""

from importlib import metadata

try:
    __version__ = metadata.version("vmpool")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0.0.0"
