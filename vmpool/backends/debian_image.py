"""The Debian 12 root every Debian machine starts from, made by mmdebstrap from Debian's packages.

One recipe (suite, package list, masked units, the customize hook, a version) makes one tar of
a root with systemd, python3, openssh-server, sudo, iproute2 and ca-certificates; backends turn
it into their image (podman: ``import``; QEMU later: a disk). The recipe's hash is kept with the
image so it is rebuilt only when the recipe changes.

Choices, and why: ``--variant=minbase`` plus the merged-usr hook (without it apt pulls in
usrmerge and perl: 81 s instead of 30-38 s); /etc/machine-id empty (systemd makes one per
machine at boot: podman passes the container's id); no ssh host keys in the image (each machine
makes its own ed25519 key when sshd first starts, so no two machines share one); timers that
would run apt or scrub disks in a test are masked; no password logins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmpool import _proc

log = logging.getLogger(__name__)

SUITE = "bookworm"
#: Debian's major version, the tag of the image made from the plain recipe
RELEASE = "12"
#: what every Debian machine has (QEMU adds its guest agent and a kernel)
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "openssh-server", "sudo", "iproute2",
    "ca-certificates",
)
#: units that only cost time or do surprising work in a test machine
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "getty.target", "console-getty.service",
    "systemd-timesyncd.service",
)
#: bump when the root changes in a way the rest of the recipe does not show
RECIPE_VERSION = 1
_MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
#: this machine's own apt sources (mmdebstrap reads a deb822 file given as the mirror)
_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
_INSTALL_HINT = "apt-get install mmdebstrap"

#: runs on the host after the packages are in, with the root directory as $1
CUSTOMIZE = """\
set -e
r="$1"
: > "$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id" "$r/etc/ssh/ssh_host_"* "$r/etc/resolv.conf"
echo debian > "$r/etc/hostname"
for unit in {masked}; do ln -sf /dev/null "$r/etc/systemd/system/$unit"; done
mkdir -p "$r/etc/systemd/system/ssh.service.d" "$r/etc/ssh/sshd_config.d"
cat > "$r/etc/systemd/system/ssh.service.d/vmpool.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || \\
  ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
cat > "$r/etc/ssh/sshd_config.d/vmpool.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
EOF
mkdir -p -m 0700 "$r/root/.ssh"
"""


@dataclass(frozen=True)
class Recipe:
    """What a Debian root is made of; equal recipes make equal roots."""

    packages: tuple[str, ...] = ()

    @property
    def all_packages(self) -> tuple[str, ...]:
        extra = sorted(set(self.packages) - set(BASE_PACKAGES))
        return (*BASE_PACKAGES, *extra)

    @property
    def hook(self) -> str:
        return CUSTOMIZE.format(masked=" ".join(MASKED_UNITS))

    def digest(self) -> str:
        """16 hex digits naming this recipe (stored in the image's label)."""
        payload = {
            "suite": SUITE,
            "packages": self.all_packages,
            "hook": self.hook,
            "version": RECIPE_VERSION,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def tag(self) -> str:
        """``12`` for the plain recipe; ``12-<digest>`` with extra packages, so profiles with
        different packages have images of their own."""
        if not set(self.packages) - set(BASE_PACKAGES):
            return RELEASE
        return f"{RELEASE}-{self.digest()[:8]}"


def build_root(
    recipe: Recipe,
    out: Path,
    *,
    timeout: float = 900.0,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write the root of ``recipe`` as the tar ``out`` (needs root and mmdebstrap)."""
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--quiet",
        f"--include={','.join(recipe.all_packages)}",
        f"--customize-hook={recipe.hook}",
    ]
    if _MERGED_USR_HOOKS.is_dir():
        argv.insert(2, f"--hook-dir={_MERGED_USR_HOOKS}")
    argv += [SUITE, str(out)]
    mirror = next((p for p in _SOURCES if p.is_file()), None)
    if mirror is not None:
        argv.append(str(mirror))
    if progress is not None:
        progress(f"building a Debian {SUITE} root ({len(recipe.all_packages)} packages) with "
                 f"mmdebstrap from {mirror or 'deb.debian.org'}")
    result = _proc.run(argv, timeout=timeout, install_hint=_INSTALL_HINT)
    log.info("mmdebstrap took %.1fs", result.duration)
    result.check("mmdebstrap")
