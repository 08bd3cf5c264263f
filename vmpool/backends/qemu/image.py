"""The QEMU guest image: a host kernel plus a busybox initramfs running qemu-ga, built offline.

Everything comes from the host's installed Debian packages (linux-image, busybox-static,
qemu-guest-agent, qemu-utils); nothing is downloaded. The image lives in one directory:
``vmlinuz``, ``initrd.img`` (gzip'd cpio newc), ``base.qcow2`` (empty; machines boot a qcow2
overlay of it so ``savevm`` has a drive to write to) and ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from vmpool import _proc
from vmpool._files import private_dir, tighten_tree
from vmpool._lock import file_lock
from vmpool.backends.qemu.cpio import Cpio
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

#: Bump when the image layout or /init changes, so existing images are rebuilt.
BUILD_VERSION = 1

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
DISK_FILE = "base.qcow2"
MANIFEST_FILE = "manifest.json"

#: Virtio modules in load order (dependencies first); the disk's virtio_blk last.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
BUSYBOX = Path("/usr/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
DISK_SIZE = "64M"
BUILD_HINT = "run `vmpool image build --backend qemu`"

_TOOL_TIMEOUT = 60.0
_LOCK_TIMEOUT = 600.0
#: who holds an image directory's lock while this process waits for it
BUILD_HOLDER = "another `vmpool image build`"


@dataclass(frozen=True)
class ImagePaths:
    """The files a machine boots from."""

    kernel: Path
    initrd: Path
    disk: Path
    #: format of ``disk`` as qemu-img's ``-F`` wants it
    disk_format: str = "qcow2"


def default_image_dir() -> Path:
    """Where built images go unless ``QemuSettings.image_dir`` says otherwise."""
    return Path(platformdirs.user_cache_dir("vmpool")) / "images" / "qemu"


def image_dir(settings: QemuSettings) -> Path:
    return settings.image_dir if settings.image_dir is not None else default_image_dir()


def find_image(settings: QemuSettings) -> ImagePaths:
    """The kernel, initrd and base disk to boot (settings override the built image's files).

    Raises BackendUnavailable naming the build command when a file is missing.
    """
    root = image_dir(settings)
    if root.is_dir():
        tighten_tree(root)  # an image an older vmpool built with 0755/0644
    paths = ImagePaths(
        kernel=settings.kernel or root / KERNEL_FILE,
        initrd=settings.initrd or root / INITRD_FILE,
        disk=settings.disk or root / DISK_FILE,
        disk_format=_disk_format(settings.disk) if settings.disk is not None else "qcow2",
    )
    missing = [str(p) for p in (paths.kernel, paths.initrd, paths.disk) if not p.is_file()]
    if missing:
        raise BackendUnavailable(
            f"qemu guest image incomplete, missing {', '.join(missing)}: {BUILD_HINT}"
        )
    return paths


def image_current(settings: QemuSettings) -> bool | None:
    """Whether the built image matches its inputs now; None when they cannot be read."""
    try:
        inputs = _collect_inputs()
        hashes = _input_hashes(inputs)
    except (BackendError, OSError):
        return None
    return _is_current(image_dir(settings), inputs.kernel_version, hashes)


def _input_hashes(inputs: _Inputs) -> dict[str, str]:
    hashes = {str(p): _sha256(p) for p in inputs.all_files()}
    hashes["<init>"] = hashlib.sha256(inputs.init_script.encode()).hexdigest()
    return hashes


def build_image(
    settings: QemuSettings,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build the guest image into its directory and return that directory.

    An image whose manifest matches the current inputs is kept unless ``force``. The image is
    assembled in a temporary directory and renamed into place, so readers never see half of it.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    target = image_dir(settings)
    private_dir(target.parent)
    lock_path = target.parent / f".{target.name}.lock"
    with file_lock(lock_path, timeout=_LOCK_TIMEOUT, holder=BUILD_HOLDER, error=BackendError):
        return _build_locked(target, force=force, say=say)


def _build_locked(target: Path, *, force: bool, say: Callable[[str], None]) -> Path:
    inputs = _collect_inputs()
    input_hashes = _input_hashes(inputs)
    if not force and _is_current(target, inputs.kernel_version, input_hashes):
        tighten_tree(target)  # built by an older vmpool with 0755/0644
        say(f"qemu image up to date in {target}")
        return target

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))  # 0700
    try:
        say(f"copying kernel {inputs.kernel}")
        shutil.copyfile(inputs.kernel, tmp / KERNEL_FILE)
        say("packing initramfs (busybox, virtio modules, qemu-ga)")
        _write_initramfs(inputs, tmp / INITRD_FILE)
        say(f"creating empty base disk {DISK_FILE} ({DISK_SIZE})")
        _proc.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / DISK_FILE), DISK_SIZE],
            timeout=_TOOL_TIMEOUT,
            install_hint="apt-get install qemu-utils",
        ).check("create base disk")
        manifest = {
            "build_version": BUILD_VERSION,
            "kernel_version": inputs.kernel_version,
            "inputs": input_hashes,
            "files": {
                name: _sha256(tmp / name) for name in (KERNEL_FILE, INITRD_FILE, DISK_FILE)
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tighten_tree(tmp)  # copies and tools made their files with the umask's modes
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"qemu image built in {target} ({time.monotonic() - started:.1f}s)")
    return target


def _is_current(target: Path, kernel_version: str, input_hashes: dict[str, str]) -> bool:
    try:
        manifest = json.loads((target / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    files = manifest.get("files", {})
    return (
        manifest.get("build_version") == BUILD_VERSION
        and manifest.get("kernel_version") == kernel_version
        and manifest.get("inputs") == input_hashes
        and isinstance(files, dict)
        and all((target / name).is_file() for name in (KERNEL_FILE, INITRD_FILE, DISK_FILE))
    )


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``: a rename, with any old image moved aside first."""
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}-old-{os.getpid()}-{time.monotonic_ns()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    kernel: Path
    kernel_version: str
    #: (module name, path of its .ko / .ko.xz / .ko.zst / .ko.gz), load order
    modules: tuple[tuple[str, Path], ...]
    busybox: Path
    applets: tuple[str, ...]
    agent: Path
    #: (path inside the guest, host file) for the agent's libraries and the dynamic loader
    libraries: tuple[tuple[str, Path], ...]
    init_script: str

    def all_files(self) -> list[Path]:
        return [
            self.kernel,
            *(p for _, p in self.modules),
            self.busybox,
            self.agent,
            *(p for _, p in self.libraries),
        ]


def _collect_inputs() -> _Inputs:
    kernel, version = _pick_kernel()
    modules = _find_modules(version)
    if not BUSYBOX.is_file():
        raise BackendUnavailable(f"{BUSYBOX} not found: apt-get install busybox-static")
    if not QEMU_GA.is_file():
        raise BackendUnavailable(f"{QEMU_GA} not found: apt-get install qemu-guest-agent")
    applets = _busybox_applets()
    libraries = _shared_libraries(QEMU_GA)
    return _Inputs(
        kernel=kernel,
        kernel_version=version,
        modules=modules,
        busybox=BUSYBOX,
        applets=applets,
        agent=QEMU_GA,
        libraries=libraries,
        init_script=_init_script([name for name, _ in modules]),
    )


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def _pick_kernel() -> tuple[Path, str]:
    """The running kernel when its image and modules are installed, else the newest one."""
    candidates: dict[str, Path] = {}
    for path in Path("/boot").glob("vmlinuz-*"):
        version = path.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version).is_dir():
            candidates[version] = path
    if not candidates:
        raise BackendUnavailable(
            "no /boot/vmlinuz-* with matching /lib/modules/<version>: apt-get install "
            "linux-image-amd64"
        )
    running = os.uname().release
    version = running if running in candidates else max(candidates, key=_version_key)
    kernel = candidates[version]
    if not os.access(kernel, os.R_OK):
        raise BackendUnavailable(f"{kernel} is not readable by this user (try sudo once)")
    return kernel, version


def _find_modules(version: str) -> tuple[tuple[str, Path], ...]:
    root = Path("/lib/modules") / version
    builtin = set()
    with contextlib.suppress(OSError):
        for line in (root / "modules.builtin").read_text().splitlines():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    found: dict[str, Path] = {}
    for path in (root / "kernel").rglob("*.ko*"):
        base = path.name.split(".ko")[0].replace("-", "_")
        if base in MODULES and base not in found:
            found[base] = path
    out: list[tuple[str, Path]] = []
    for name in MODULES:
        if name in found:
            out.append((name, found[name]))
        elif name not in builtin:
            raise BackendUnavailable(
                f"kernel module {name} not found under {root}: apt-get install "
                f"linux-image-{version}"
            )
    return tuple(out)


def _busybox_applets() -> tuple[str, ...]:
    result = _proc.run(
        [str(BUSYBOX), "--list-full"], timeout=_TOOL_TIMEOUT, install_hint="busybox-static"
    ).check("list busybox applets")
    return tuple(sorted({line.strip().lstrip("/") for line in result.stdout.splitlines() if line}))


_LDD_ARROW = re.compile(r"=>\s+(/\S+)\s+\(0x")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x")


def _shared_libraries(binary: Path) -> tuple[tuple[str, Path], ...]:
    """What ``ldd`` says ``binary`` loads, as (guest path, host file) pairs."""
    result = _proc.run(["ldd", str(binary)], timeout=_TOOL_TIMEOUT).check(f"ldd {binary}")
    libs: dict[str, Path] = {}
    for line in result.stdout.splitlines():
        match = _LDD_ARROW.search(line) or _LDD_PLAIN.search(line)
        if match:
            guest = match.group(1)
            libs[guest.lstrip("/")] = Path(guest).resolve()
    if not libs:
        raise BackendError(f"ldd {binary} listed no libraries: {result.stdout.strip()}")
    return tuple(sorted(libs.items()))


def _init_script(modules: Iterable[str]) -> str:
    module_list = " ".join(modules)
    return f"""#!/bin/sh
# vmpool guest init (image build {BUILD_VERSION}): modules, network, then qemu-ga forever.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /run /var/run
for m in {module_list}; do
  insmod /lib/modules/vmpool/$m.ko || echo "vmpool-init: insmod $m failed"
done
addr=""
name=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmpool.ip=*) addr="${{arg#vmpool.ip=}}" ;;
    vmpool.hostname=*) name="${{arg#vmpool.hostname=}}" ;;
  esac
done
[ -n "$name" ] && hostname "$name"
ip link set lo up
if [ -n "$addr" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ip addr add "$addr" dev eth0
  ip link set eth0 up
fi
echo "vmpool-init: up"
while true; do
  port=""
  for f in /sys/class/virtio-ports/*/name; do
    [ -r "$f" ] || continue
    if [ "$(cat "$f")" = "{AGENT_PORT_NAME}" ]; then
      d="${{f%/name}}"
      port="/dev/${{d##*/}}"
    fi
  done
  if [ -n "$port" ] && [ -e "$port" ]; then
    qemu-ga -m virtio-serial -p "$port"
    echo "vmpool-init: qemu-ga exited $?, restarting"
  fi
  sleep 0.5
done
"""


# --- the initramfs -----------------------------------------------------------------------


def _module_bytes(path: Path) -> bytes:
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        with tempfile.TemporaryDirectory(prefix="vmpool-ko-") as tmp:
            out = Path(tmp) / path.name.removesuffix(".zst")
            _proc.run(
                ["zstd", "-q", "-d", "-f", "-o", str(out), str(path)],
                timeout=_TOOL_TIMEOUT,
                install_hint="apt-get install zstd",
            ).check(f"decompress {path}")
            return out.read_bytes()
    raise BackendError(f"unsupported kernel module compression: {path}")


def _write_initramfs(inputs: _Inputs, dest: Path) -> None:
    cpio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib/modules/vmpool", "proc", "sys", "dev",
              "tmp", "run", "var/run", "etc", "root"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, mode=0o666)
    cpio.file("bin/busybox", inputs.busybox.read_bytes(), mode=0o755)
    for applet in inputs.applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    for name, path in inputs.modules:
        cpio.file(f"lib/modules/vmpool/{name}.ko", _module_bytes(path))
    cpio.file("usr/sbin/qemu-ga", inputs.agent.read_bytes(), mode=0o755)
    for guest_path, host_file in inputs.libraries:
        cpio.file(guest_path, host_file.read_bytes(), mode=0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n")
    cpio.file("init", inputs.init_script.encode(), mode=0o755)
    dest.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _disk_format(path: Path) -> str:
    """qcow2 when the file starts with qcow2's magic, else raw."""
    try:
        with path.open("rb") as fh:
            return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "raw"  # find_image reports the missing file
