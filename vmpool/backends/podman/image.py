"""The images machines run: the busybox one `build_image` makes, the Debian one, warm images.

The busybox image is a busybox-static root imported with ``<tool> import`` (no registry); its
recipe label (`RECIPE_LABEL`) says whether it is current (`image_current`). The Debian image's
root comes from vmpool.backends.debian_image. A machine's snapshot is committed to its warm
image, `warm_image_name`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vmpool import _proc
from vmpool.backends import debian_image
from vmpool.backends.base import validate_name
from vmpool.backends.podman.tool import Tool
from vmpool.config_backends import ImageSettings, PodmanSettings
from vmpool.errors import BackendUnavailable, VmPoolError

log = logging.getLogger(__name__)

#: The image `build_image` makes and ``[podman] image`` defaults to.
DEFAULT_IMAGE = "localhost/vmpool-busybox:latest"
#: Debian images are ``<DEBIAN_REPO>:12`` (``12-<hash>`` with ``[image] packages``).
DEBIAN_REPO = "localhost/vmpool-debian"
#: systemd as PID 1: the command
INIT = "/sbin/init"
#: Warm (snapshot) images are ``<WARM_REPO>/<machine name>:ready``.
WARM_REPO = "localhost/vmpool-warm"
#: The default image's label holding its recipe (see `image_current`).
RECIPE_LABEL = "vmpool.recipe"
#: Bump when the default image's contents change in a way its root's bytes do not show.
_IMAGE_VERSION = 1
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
#: Applets the image must have even if ``busybox --list`` cannot be read.
_ESSENTIAL_APPLETS = (
    "sh", "ash", "ls", "cat", "echo", "true", "false", "sleep", "timeout", "mkdir", "rm", "cp",
    "mv", "ln", "touch", "test", "[", "grep", "sed", "awk", "ps", "kill", "env", "id", "hostname",
    "ip", "ifconfig", "ping", "nc", "httpd", "wget", "tar", "gzip", "head", "tail", "wc", "sort",
)


def machine_image(settings: PodmanSettings, image: ImageSettings | None = None) -> str:
    """The image machines run: ``[podman] image``, else the built one of ``[podman] distro``."""
    if settings.image:
        return settings.image
    if settings.distro == "debian":
        return debian_image_name((image or ImageSettings()).packages)
    return DEFAULT_IMAGE


def debian_image_name(packages: Sequence[str] = ()) -> str:
    """The Debian image made with ``packages`` added."""
    return f"{DEBIAN_REPO}:{debian_image.Recipe(tuple(packages)).tag()}"


def build_image(
    settings: PodmanSettings,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    distro: str | None = None,
    image_settings: ImageSettings | None = None,
) -> str:
    """Make the image of ``distro`` (default ``[podman] distro``) with ``<tool> import``; return
    its name. busybox: ``DEFAULT_IMAGE``, a busybox-static rootfs; debian: Debian 12 with
    systemd (`vmpool.backends.debian_image`) and ``image_settings.packages``.

    An existing image is kept while its recipe label matches (see `image_current`), unless
    ``force``.
    """

    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    if (distro or settings.distro) == "debian":
        return _build_debian(settings, (image_settings or ImageSettings()).packages, force, say)
    tool = Tool(settings)
    image = DEFAULT_IMAGE
    busybox = _find_busybox()
    tarball = _default_rootfs(busybox)
    recipe = _recipe(tarball)
    if not force and tool.image_exists(image, what="build"):
        if tool.image_label(image, RECIPE_LABEL) == recipe:
            say(f"{image} is up to date (force to rebuild)")
            return image
        say(f"{image} is out of date (its recipe or {busybox} changed): rebuilding")
    say(f"importing {image} ({len(tarball) // 1024} KiB) with {settings.tool}")
    tool.run(
        "import",
        "--change", "ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin",
        "--change", 'CMD ["sleep", "infinity"]',
        "--change", f"LABEL {RECIPE_LABEL}={recipe}",
        "-", image,
        input=tarball,
    ).check(f"import {image}")
    say(f"built {image}")
    return image


def _build_debian(
    settings: PodmanSettings, packages: Sequence[str], force: bool, say: Callable[[str], None]
) -> str:
    tool = Tool(settings)
    recipe = debian_image.Recipe(tuple(packages))
    name, digest = debian_image_name(packages), recipe.digest()
    if not force and tool.image_exists(name, what="build"):
        if tool.image_label(name, RECIPE_LABEL) == digest:
            say(f"{name} is up to date (force to rebuild)")
            return name
        say(f"{name} is out of date (its recipe changed): rebuilding")
    with tempfile.TemporaryDirectory(prefix="vmpool-debian-") as tmp:
        tar = Path(tmp) / "root.tar"
        debian_image.build_root(recipe, tar, progress=say)
        say(f"importing {name} ({tar.stat().st_size // 2**20} MiB) with {settings.tool}")
        tool.run(
            "import",
            "--change", f'CMD ["{INIT}"]',
            "--change", f"LABEL {RECIPE_LABEL}={digest}",
            str(tar), name,
            timeout=max(settings.command_timeout, 600.0),
        ).check(f"import {name}")
    say(f"built {name}")
    return name


def image_current(settings: PodmanSettings, image: ImageSettings | None = None) -> bool:
    """Whether the built image of ``[podman] distro`` matches what `build_image` would make."""
    if settings.distro == "debian":
        packages = (image or ImageSettings()).packages
        digest = debian_image.Recipe(tuple(packages)).digest()
        return Tool(settings).image_label(debian_image_name(packages), RECIPE_LABEL) == digest
    try:
        recipe = _recipe(_default_rootfs(_find_busybox()))
    except BackendUnavailable:
        return False
    return Tool(settings).image_label(DEFAULT_IMAGE, RECIPE_LABEL) == recipe


def _default_rootfs(busybox: Path) -> bytes:
    data = busybox.read_bytes()
    if not _is_static_elf(data):
        raise BackendUnavailable(
            f"{busybox} is dynamically linked; the image needs a static one "
            "(apt-get install busybox-static)"
        )
    return _rootfs_tar(data, _applets(busybox))


def _recipe(tarball: bytes) -> str:
    """The image's recipe: its root's bytes (the tar is reproducible) and the build's version."""
    return hashlib.sha256(f"{_IMAGE_VERSION}\0".encode() + tarball).hexdigest()[:16]


def warm_image_name(name: str) -> str:
    """The image a machine's snapshot is committed to."""
    return f"{WARM_REPO}/{validate_name(name)}:ready"


def missing_image_message(tool: str, image: str) -> str:
    build = f"`vmpool image build --backend {tool}`"
    if image == DEFAULT_IMAGE:
        return f"{tool} image {image} not found: run {build} to build it"
    if image.startswith(f"{DEBIAN_REPO}:"):
        return (f"{tool} image {image} not found: run `vmpool image build --backend {tool} "
                "--distro debian` to build it")
    return (
        f"{tool} image {image} not found: build or pull it, or unset [podman] image and run "
        f"{build} for the default busybox image"
    )


def _find_busybox() -> Path:
    for candidate in (*_BUSYBOX_CANDIDATES, shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise BackendUnavailable("busybox: not found (apt-get install busybox-static)")


def _applets(busybox: Path) -> list[str]:
    names = set(_ESSENTIAL_APPLETS)
    try:
        result = _proc.run([str(busybox), "--list"], timeout=10)
    except VmPoolError as exc:
        log.debug("busybox --list failed: %s", exc)
    else:
        if result.returncode == 0:
            names.update(result.stdout.split())
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def _rootfs_tar(busybox: bytes, applets: Iterable[str]) -> bytes:
    """A tar of a minimal root: /bin/busybox, its applets as symlinks, /etc basics, /tmp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add_dir(path: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(path: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for path in ("bin", "dev", "etc", "proc", "root", "run", "sys", "var", "www"):
            add_dir(path)
        add_dir("tmp", 0o1777)
        add_dir("var/tmp", 0o1777)
        add_file("bin/busybox", busybox, 0o755)
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        add_file(
            "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        )
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("etc/hosts", b"127.0.0.1 localhost\n")
    return buf.getvalue()


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF":
        return False
    is64, little = data[4] == 2, data[5] == 1
    end = "<" if little else ">"
    if is64:
        phoff, = struct.unpack_from(end + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(end + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(end + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


