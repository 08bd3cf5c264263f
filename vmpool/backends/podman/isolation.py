"""Keep one pool's podman bridge from forwarding to another's: a chain of vmpool's own.

netavark's ``isolate`` option would do it, but netavark 1.4 (Debian 12) removes its
``FORWARD -j NETAVARK_ISOLATION_1`` jump whenever any isolated network's last container stops,
while other isolated networks are live. vmpool's chain is never touched by netavark: for each
pool bridge it lets frames between the bridge's own ports pass and drops what would be forwarded
between it and any other podman bridge. Traffic to the host and beyond is left as netavark set it.
Rootful only (rootless podman networks live in a namespace of their own).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from vmpool import _proc
from vmpool.errors import BackendError

log = logging.getLogger(__name__)

CHAIN = "VMPOOL_ISOLATION"
_TIMEOUT = 30.0
#: netavark names bridges podman0, podman1, …; anything else is not ours to write rules for
_BRIDGE = re.compile(r"^podman[0-9]{1,5}$")


def applies() -> bool:
    """Whether this process can and should manage the chain (root, iptables on PATH)."""
    return os.geteuid() == 0 and shutil.which("iptables") is not None


def _rules(bridge: str) -> list[list[str]]:
    return [
        ["-i", bridge, "-o", bridge, "-j", "RETURN"],
        ["-i", bridge, "-o", "podman+", "-j", "DROP"],
        ["-i", "podman+", "-o", bridge, "-j", "DROP"],
    ]


def _iptables(*args: str) -> _proc.ProcResult:
    return _proc.run(["iptables", "-w", "10", *args], timeout=_TIMEOUT,
                     install_hint="apt-get install iptables")


def isolate(bridge: str) -> None:
    """Drop forwarding between ``bridge`` and every other podman bridge (idempotent)."""
    if not _BRIDGE.match(bridge):
        raise BackendError(f"podman network bridge {bridge!r}: not a netavark bridge name")
    if _iptables("-n", "-L", CHAIN).returncode != 0:
        created = _iptables("-N", CHAIN)
        if created.returncode != 0 and "exists" not in created.stderr:
            created.check(f"create iptables chain {CHAIN}")
    if _iptables("-C", "FORWARD", "-j", CHAIN).returncode != 0:
        _iptables("-I", "FORWARD", "1", "-j", CHAIN).check(f"jump to {CHAIN}")
    for rule in _rules(bridge):
        if _iptables("-C", CHAIN, *rule).returncode != 0:
            _iptables("-A", CHAIN, *rule).check(f"isolate {bridge}")


def release(bridge: str) -> None:
    """Remove ``bridge``'s rules (missing ones are fine); the chain stays for other pools."""
    if not _BRIDGE.match(bridge):
        return
    for rule in _rules(bridge):
        while _iptables("-C", CHAIN, *rule).returncode == 0:
            _iptables("-D", CHAIN, *rule).check(f"release {bridge}")
