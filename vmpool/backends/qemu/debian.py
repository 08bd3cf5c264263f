"""The Debian 12 QEMU guest image: the Debian root plus a kernel, the guest agent and a tuned boot.

It reuses the Debian root's recipe (debian_image) with three packages added (linux-image-amd64,
qemu-guest-agent, initramfs-tools) and a second customize hook that makes the tree bootable under
QEMU: an fstab for /dev/vda, a static 10.0.2.15 (DHCP under user-mode networking makes early ssh
probes hang), a small ``MODULES=list`` initramfs with the virtio modules (the host's initrd lacks
virtio_console), the agent started before sysinit, a volatile journal and a module blacklist for
what udev loads uselessly under TCG. The tree becomes a disk with ``mkfs.ext4 -d`` (no loop
mount) and ``qemu-img convert -O qcow2``. The image directory holds ``vmlinuz``, ``initrd.img``,
``disk.qcow2`` and ``manifest.json``; the manifest's recipe digest decides whether to rebuild.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vmpool import _proc
from vmpool._files import private_dir, tighten_tree
from vmpool._lock import file_lock
from vmpool.backends import debian_image
from vmpool.backends.qemu.image import BUILD_HOLDER, MODULES, _replace_dir, image_dir
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

#: Bump when the image directory's layout changes (the recipe's digest covers the tree).
BUILD_VERSION = 1
QEMU_PACKAGES = ("linux-image-amd64", "qemu-guest-agent", "initramfs-tools")
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
DISK_FILE = "disk.qcow2"
MANIFEST_FILE = "manifest.json"
DISK_SIZE = "2G"
#: the address the guest gives itself (QEMU user-mode networking's default guest address)
GUEST_ADDRESS = "10.0.2.15"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 quiet mitigations=off net.ifnames=0"
#: modules udev would load under TCG for nothing (seconds of boot)
BLACKLIST = ("floppy", "parport_pc", "parport", "kvm_amd", "kvm_intel", "bochs", "drm", "pcspkr")
#: MODULES=list adds nothing by itself: the root filesystem's module must be named too
INITRD_MODULES = (*MODULES, "ext4")
BUILD_HINT = "run `vmpool image build --backend qemu --distro debian`"

_TOOL_TIMEOUT = 300.0
_LOCK_TIMEOUT = 1200.0

#: runs after debian_image.CUSTOMIZE, with the root directory as $1
QEMU_CUSTOMIZE = """\
set -e
r="$1"
echo '/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1' > "$r/etc/fstab"
mkdir -p "$r/etc/systemd/network" "$r/etc/systemd/system/multi-user.target.wants"
cat > "$r/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0
[Network]
Address={address}/24
Gateway=10.0.2.2
DNS=10.0.2.3
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
ln -sf /lib/systemd/system/systemd-networkd.service \\
  "$r/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /dev/null "$r/etc/systemd/system/systemd-networkd-wait-online.service"
echo 'nameserver 10.0.2.3' > "$r/etc/resolv.conf"
mkdir -p "$r/etc/systemd/system/qemu-guest-agent.service.d" "$r/etc/systemd/journald.conf.d"
cat > "$r/etc/systemd/system/qemu-guest-agent.service.d/vmpool.conf" <<'EOF'
[Unit]
DefaultDependencies=no
Before=sysinit.target
EOF
printf '[Journal]\\nStorage=volatile\\n' > "$r/etc/systemd/journald.conf.d/vmpool.conf"
for m in {blacklist}; do echo "blacklist $m"; done > "$r/etc/modprobe.d/vmpool.conf"
for m in {modules}; do echo "$m"; done >> "$r/etc/initramfs-tools/modules"
printf 'MODULES=list\\nCOMPRESS=gzip\\n' > "$r/etc/initramfs-tools/conf.d/vmpool"
chroot "$r" update-initramfs -u -k all
"""


@dataclass(frozen=True)
class QemuRecipe(debian_image.Recipe):
    """The Debian root's recipe plus what a QEMU guest boots with."""

    @property
    def all_packages(self) -> tuple[str, ...]:
        return (*debian_image.BASE_PACKAGES, *QEMU_PACKAGES, *self._extra())

    def _extra(self) -> list[str]:
        known = set(debian_image.BASE_PACKAGES) | set(QEMU_PACKAGES)
        return sorted(set(self.packages) - known)

    @property
    def hook(self) -> str:
        qemu = QEMU_CUSTOMIZE.format(
            address=GUEST_ADDRESS, blacklist=" ".join(BLACKLIST), modules=" ".join(INITRD_MODULES)
        )
        return super().hook + qemu

    def tag(self) -> str:
        if not self._extra():
            return debian_image.RELEASE
        return f"{debian_image.RELEASE}-{self.digest()[:8]}"


def debian_image_dir(settings: QemuSettings, packages: Iterable[str] = ()) -> Path:
    """Where the Debian image for ``packages`` lives: beside the busybox image's directory."""
    base = image_dir(settings)
    return base.parent / f"{base.name}-debian-{QemuRecipe(tuple(packages)).tag()}"


def build_image(
    settings: QemuSettings,
    *,
    packages: Iterable[str] = (),
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build the Debian guest image (unless its manifest matches the recipe) and return its dir."""
    say = progress or (lambda msg: log.info("%s", msg))
    recipe = QemuRecipe(tuple(packages))
    target = debian_image_dir(settings, packages)
    private_dir(target.parent)
    lock_path = target.parent / f".{target.name}.lock"
    with file_lock(lock_path, timeout=_LOCK_TIMEOUT, holder=BUILD_HOLDER, error=BackendError):
        if not force and image_current(target, recipe):
            say(f"qemu debian image up to date in {target}")
            return target
        _build(recipe, target, say)
    return target


def image_current(target: Path, recipe: QemuRecipe) -> bool:
    """Whether ``target`` holds a complete image built from ``recipe``."""
    try:
        manifest = json.loads((target / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("build_version") == BUILD_VERSION
        and manifest.get("recipe") == recipe.digest()
        and all((target / n).is_file() for n in (KERNEL_FILE, INITRD_FILE, DISK_FILE))
    )


def _build(recipe: QemuRecipe, target: Path, say: Callable[[str], None]) -> None:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))  # 0700
    try:
        tree = tmp / "root"
        debian_image.build_root(recipe, tree, progress=say)
        say(f"making {DISK_FILE} ({DISK_SIZE}) from the tree")
        make_disk(tree, tmp)
        shutil.rmtree(tree)
        manifest = {
            "build_version": BUILD_VERSION,
            "recipe": recipe.digest(),
            "packages": list(recipe.all_packages),
            "cmdline": KERNEL_CMDLINE,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tighten_tree(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"qemu debian image built in {target} ({time.monotonic() - started:.1f}s)")


def make_disk(tree: Path, out: Path) -> None:
    """Copy the tree's kernel and initramfs to ``out`` and make ``out/disk.qcow2`` of the tree."""
    for pattern, name in (("vmlinuz-*", KERNEL_FILE), ("initrd.img-*", INITRD_FILE)):
        found = sorted((tree / "boot").glob(pattern))
        if not found:
            raise BackendError(f"the Debian tree has no {tree / 'boot' / pattern}")
        shutil.copyfile(found[-1], out / name)
    raw = out / "disk.raw"
    hint = "apt-get install e2fsprogs qemu-utils"
    try:
        _proc.run(
            ["mkfs.ext4", "-q", "-F", "-L", "vmpool-root", "-d", str(tree), str(raw), DISK_SIZE],
            timeout=_TOOL_TIMEOUT,
            install_hint=hint,
        ).check("mkfs.ext4 -d")
        _proc.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
             str(out / DISK_FILE)],
            timeout=_TOOL_TIMEOUT,
            install_hint=hint,
        ).check("qemu-img convert")
    finally:
        raw.unlink(missing_ok=True)


def find_image(settings: QemuSettings, packages: Iterable[str] = ()) -> Path:
    """The built Debian image's directory; BackendUnavailable naming the build command if absent."""
    target = debian_image_dir(settings, packages)
    if not image_current(target, QemuRecipe(tuple(packages))):
        raise BackendUnavailable(f"no current qemu debian image in {target}: {BUILD_HINT}")
    return target
