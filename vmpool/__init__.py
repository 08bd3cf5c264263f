"""vmpool: a pre-warmed pool of real machines (QEMU, podman, OrbStack) for pytest and xdist."""

from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmpool.ssh import ansible_inventory

__all__ = ["ansible_inventory"]

try:
    __version__ = metadata.version("vmpool")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0.0.0"


def __getattr__(name: str) -> object:
    # imported on first use: `import vmpool` (every pytest run with the plugin) stays cheap
    if name == "ansible_inventory":
        from vmpool.ssh import ansible_inventory

        return ansible_inventory
    raise AttributeError(f"module 'vmpool' has no attribute {name!r}")
