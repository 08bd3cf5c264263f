"""`vmpool doctor`: is each backend usable here, and if not, the exact fix.

Every check is one line (ok / missing / broken) with the command that mends it. The same
knowledge explains a backend tool's terse failure (``netavark: No such file or directory``)
by naming the tool that is missing (:func:`explain`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from vmpool import _proc
from vmpool.config import Profile
from vmpool.errors import VmPoolError

Status = Literal["ok", "missing", "broken"]

#: where podman 4 looks for its helpers (containers.conf ``helper_binaries_dir``)
PODMAN_HELPER_DIRS = ("/usr/local/libexec/podman", "/usr/local/lib/podman",
                      "/usr/libexec/podman", "/usr/lib/podman")
#: and for conmon, beside PATH (containers.conf ``conmon_path``)
CONMON_PATHS = ("/usr/libexec/podman/conmon", "/usr/local/libexec/podman/conmon",
                "/usr/local/lib/podman/conmon", "/usr/bin/conmon", "/usr/sbin/conmon",
                "/usr/local/bin/conmon", "/usr/local/sbin/conmon")
RUNC_PATHS = ("/usr/bin/runc", "/usr/sbin/runc", "/usr/local/bin/runc", "/usr/local/sbin/runc")
#: sun_path holds 108 bytes with its NUL
MAX_SOCKET_PATH = 107
_TIMEOUT = 30.0


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    backend: str
    name: str
    status: Status
    detail: str
    fix: str = ""
    #: a failed optional check is reported but does not make the backend unusable
    required: bool = True

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        label = f"{self.backend}/{self.name}"
        text = f"{self.status:<8} {label:<26} {self.detail}"
        if not self.ok and not self.required:
            text += " (optional)"
        if self.fix and not self.ok:
            text += f"\n         fix: {self.fix}"
        return text

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def usable(checks: Iterable[Check], backend: str) -> bool:
    """Whether every required check of ``backend`` (and of the state directory) passed."""
    return all(
        c.ok for c in checks if c.required and c.backend in (backend, "state")
    )


# -- tools ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """An executable a backend runs, where it may live and the package that brings it."""

    name: str
    package: str
    why: str
    extra_paths: tuple[str, ...] = ()
    #: found on PATH only (a helper that a tool itself looks up there, as netavark's iptables)
    path_only: bool = False

    def find(self) -> str | None:
        found = shutil.which(self.name)
        if found is not None or self.path_only:
            return found
        return next((p for p in self.extra_paths if os.access(p, os.X_OK)), None)

    def fix(self) -> str:
        return f"apt-get install {self.package}"


PODMAN_TOOLS = (
    Tool("podman", "podman", "the container engine"),
    Tool("runc", "runc", "the OCI runtime (crun fails on hybrid cgroups)", RUNC_PATHS),
    Tool("conmon", "conmon", "podman's container monitor", CONMON_PATHS),
    Tool("netavark", "netavark", "podman's network backend",
         tuple(f"{d}/netavark" for d in PODMAN_HELPER_DIRS)),
    Tool("aardvark-dns", "aardvark-dns", "name resolution on pool networks",
         tuple(f"{d}/aardvark-dns" for d in PODMAN_HELPER_DIRS)),
    Tool("iptables", "iptables", "netavark sets up pool networks with it", path_only=True),
)
QEMU_TOOLS = (
    Tool("qemu-system-x86_64", "qemu-system-x86", "the machine emulator"),
    Tool("qemu-img", "qemu-utils", "qcow2 overlays of the base disk"),
)
#: what `vmpool image build --backend qemu` packs into the guest
QEMU_IMAGE_TOOLS = (
    Tool("busybox", "busybox-static", "the guest's shell and tools", ("/usr/bin/busybox",)),
    Tool("qemu-ga", "qemu-guest-agent", "the guest agent", ("/usr/sbin/qemu-ga",)),
)


def _tool_checks(backend: str, tools: Iterable[Tool], *, binary: str | None = None) -> list[Check]:
    out = []
    for tool in tools:
        if binary is not None and tool.name == "qemu-system-x86_64":
            tool = Tool(binary, tool.package, tool.why)
        where = tool.find()
        if where is None:
            scope = "on PATH" if tool.path_only else "on PATH or in podman's helper dirs"
            out.append(Check(backend, tool.name, "missing",
                             f"not found {scope} ({tool.why})", tool.fix()))
        else:
            out.append(Check(backend, tool.name, "ok", where))
    return out


# -- explaining a tool's failure ------------------------------------------------------------
_NETAVARK_ENOENT = re.compile(r"netavark.*No such file or directory", re.IGNORECASE)
_CONMON = re.compile(r"conmon", re.IGNORECASE)
_RUNTIME = re.compile(r"(runc|crun).*(not found|no such file)", re.IGNORECASE)


def missing_tools(text: str) -> list[Tool]:
    """The tools a backend tool's error ``text`` points at that are indeed not installed."""
    if _NETAVARK_ENOENT.search(text):
        wanted: tuple[str, ...] = ("netavark", "iptables")
    elif _RUNTIME.search(text):
        wanted = ("runc",)
    elif _CONMON.search(text):
        wanted = ("conmon",)
    else:
        return []
    return [t for t in PODMAN_TOOLS if t.name in wanted and t.find() is None]


def install_line(tools: Iterable[Tool]) -> str:
    return "apt-get install " + " ".join(t.package for t in tools)


def explain(text: str) -> str:
    """``text`` (a backend tool's error) with the missing tool named, when that is knowable."""
    missing = missing_tools(text)
    if not missing:
        return text
    names = ", ".join(t.name for t in missing)
    return f"{text} [cause: {names} not found: {install_line(missing)}]"


# -- host features ----------------------------------------------------------------------------
def cgroup_mode(mounts: str | None = None) -> str:
    """``unified`` (cgroup v2), ``hybrid`` (v1 with a v2 mount beside) or ``legacy``."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    points = {}
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            points[fields[1]] = fields[2]
    if points.get("/sys/fs/cgroup") == "cgroup2":
        return "unified"
    if points.get("/sys/fs/cgroup/unified") == "cgroup2":
        return "hybrid"
    return "legacy" if "/sys/fs/cgroup" in points else "unknown"


def _state_checks(state_dir: Path) -> list[Check]:
    try:
        st = os.lstat(state_dir)
    except FileNotFoundError:
        return [Check("state", "directory", "ok", f"{state_dir} (created on first use, mode 0700)")]
    except OSError as exc:
        return [Check("state", "directory", "broken", f"{state_dir}: {exc.strerror}",
                      "point --vm-state-dir / VMPOOL_STATE_DIR at a directory of your own")]
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        return [Check("state", "directory", "broken", f"{state_dir} is {kind}",
                      "point --vm-state-dir / VMPOOL_STATE_DIR at a real directory of your own")]
    if st.st_uid != uid:
        return [Check("state", "directory", "broken",
                      f"{state_dir} is owned by uid {st.st_uid}, not you (uid {uid})",
                      "use a directory of your own (--vm-state-dir / VMPOOL_STATE_DIR)")]
    mode = stat.S_IMODE(st.st_mode)
    out = []
    if mode & 0o077:
        out.append(Check("state", "directory", "broken",
                         f"{state_dir} is mode {mode:04o}: other users can reach the pool",
                         f"chmod 700 {state_dir}"))
    else:
        out.append(Check("state", "directory", "ok", f"{state_dir} (uid {uid}, mode {mode:04o})"))
    longest = state_dir / ("x" * 40 + ".sock")
    n = len(os.fsencode(str(longest)))
    out.append(Check("state", "socket-path", "ok" if n <= MAX_SOCKET_PATH else "broken",
                     f"longest socket path {n} bytes (limit {MAX_SOCKET_PATH})"
                     + ("" if n <= MAX_SOCKET_PATH else ": sockets fall back to a short path"),
                     "use a shorter --vm-state-dir", required=False))
    return out


# -- podman ---------------------------------------------------------------------------------
def _podman_checks(profile: Profile, state_dir: Path, *, live: bool) -> list[Check]:
    out = _tool_checks("podman", PODMAN_TOOLS)
    mode = cgroup_mode()
    have_runc = any(c.name == "runc" and c.ok for c in out)
    if mode == "hybrid" and not have_runc:
        out.append(Check("podman", "cgroups", "broken",
                         "hybrid cgroups: crun cannot run containers here", "apt-get install runc"))
    else:
        note = " (crun cannot run here; runc is used)" if mode == "hybrid" else ""
        out.append(Check("podman", "cgroups", "ok", f"{mode} cgroup hierarchy{note}"))
    if not any(c.name == "podman" and c.ok for c in out):
        return out
    info = _proc.run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"],
                     timeout=_TIMEOUT)
    driver = info.stdout.strip()
    if info.returncode != 0:
        out.append(Check("podman", "storage", "broken",
                         f"podman info failed: {info.stderr.strip()[-300:]}",
                         "see `podman info`"))
        return out
    out.append(Check("podman", "storage", "ok" if driver == "overlay" else "broken",
                     f"storage driver {driver}"
                     + ("" if driver == "overlay" else ": every container copies its image"),
                     "modprobe overlay, then `podman system reset`", required=False))
    from vmpool.backends.podman import (
        DEFAULT_IMAGE,
        PodmanBackend,
        image_current,
        machine_image,
    )

    image = machine_image(profile.podman, profile.image)
    fix = "vmpool image build --backend podman" + (
        " --distro debian" if profile.podman.distro == "debian" else "")
    exists = _proc.run(["podman", "image", "exists", image], timeout=_TIMEOUT).returncode == 0
    if not exists:
        out.append(Check("podman", "image", "missing", f"{image} not built", fix))
        return out
    built = image == DEFAULT_IMAGE or profile.podman.image is None
    if built and not image_current(profile.podman, profile.image):
        out.append(Check("podman", "image", "broken", f"{image} is out of date", fix))
    else:
        out.append(Check("podman", "image", "ok", image))
    if not live:
        return out
    backend = PodmanBackend(profile.podman, state_dir / "doctor", profile.image)
    try:
        options = backend.run_options()
    except VmPoolError as exc:
        out.append(Check("podman", "run", "broken", explain(str(exc)), "see the error above"))
        return out
    out.append(Check("podman", "run", "ok",
                     f"a container runs ({' '.join(options.argv()) or 'default options'})"))
    out.append(_podman_network_check(profile, options.argv(), image))
    return out


def _podman_network_check(profile: Profile, run_argv: list[str], image: str) -> Check:
    """Start a container on a new network: the step that needs netavark and iptables."""
    net = f"vmpool-doctor-{secrets.token_hex(3)}"
    created = _proc.run(["podman", "network", "create", "--label", "vmpool.doctor=1", net],
                        timeout=_TIMEOUT)
    if created.returncode != 0:
        return Check("podman", "network", "broken", explain(created.stderr.strip()[-500:]),
                     "see `podman network create --help`")
    try:
        ran = _proc.run(["podman", "run", "--rm", "--network", net, *run_argv,
                         image, "true"], timeout=_TIMEOUT)
    finally:
        _proc.run(["podman", "network", "rm", "-f", net], timeout=_TIMEOUT)
    if ran.returncode != 0:
        error = ran.stderr.strip()[-500:]
        missing = missing_tools(error)
        return Check("podman", "network", "broken", explain(error),
                     install_line(missing) if missing else "apt-get install netavark iptables")
    return Check("podman", "network", "ok", "a container starts on a pool network")


# -- qemu ----------------------------------------------------------------------------------
def _qemu_checks(profile: Profile, state_dir: Path, *, live: bool) -> list[Check]:
    from vmpool.backends.qemu import image as qemu_image

    settings = profile.qemu
    out = _tool_checks("qemu", QEMU_TOOLS, binary=settings.binary)
    image_ok = True
    try:
        qemu_image.find_image(settings)
    except VmPoolError:
        image_ok = False
        out.append(Check("qemu", "image", "missing",
                         f"no guest image in {qemu_image.image_dir(settings)}",
                         "vmpool image build --backend qemu"))
    if image_ok:
        current = qemu_image.image_current(settings)
        if current is False:
            out.append(Check("qemu", "image", "broken",
                             f"{qemu_image.image_dir(settings)} is out of date "
                             "(the kernel, busybox or qemu-ga changed)",
                             "vmpool image build --backend qemu"))
        else:
            out.append(Check("qemu", "image", "ok", str(qemu_image.image_dir(settings))))
    if not image_ok or settings.kernel is None:
        out += _tool_checks("qemu", QEMU_IMAGE_TOOLS)
        out.append(_kernel_check())
    out.append(_kvm_check(profile, state_dir, live=live and image_ok
                          and all(c.ok for c in out if c.name == settings.binary)))
    return out


def _kernel_check() -> Check:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        return Check("qemu", "kernel", "missing", "no /boot/vmlinuz-* for the guest",
                     "apt-get install linux-image-amd64")
    modules = Path("/lib/modules") / kernels[-1].name.removeprefix("vmlinuz-")
    if not modules.is_dir():
        return Check("qemu", "kernel", "broken", f"{kernels[-1]} has no {modules}",
                     "apt-get install --reinstall linux-image-amd64")
    return Check("qemu", "kernel", "ok", str(kernels[-1]))


def _kvm_check(profile: Profile, state_dir: Path, *, live: bool) -> Check:
    settings = profile.qemu
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return Check("qemu", "kvm", "ok", "/dev/kvm absent: guests run under TCG (slower)")
    if not os.access(kvm, os.R_OK | os.W_OK):
        return Check("qemu", "kvm", "ok", "/dev/kvm not accessible: guests run under TCG",
                     "add yourself to group kvm for speed")
    if settings.accel != "auto" or not live:
        return Check("qemu", "kvm", "ok", f"/dev/kvm present; accel = {settings.accel}")
    from vmpool.backends.qemu import QemuBackend

    try:
        accel = QemuBackend(settings, state_dir / "doctor").resolve_accel()
    except VmPoolError as exc:
        return Check("qemu", "kvm", "broken", f"KVM probe failed: {exc}", "set [qemu] accel = "
                     '"tcg"', required=False)
    if accel == "kvm":
        return Check("qemu", "kvm", "ok", "/dev/kvm present and a guest boots under it")
    return Check("qemu", "kvm", "ok",
                 "/dev/kvm present but a guest does not boot under it: TCG is used")


# -- others ---------------------------------------------------------------------------------
def _simple_tool(backend: str, tool: str, fix: str) -> list[Check]:
    where = shutil.which(tool)
    if where is None:
        return [Check(backend, tool, "missing", "not found on PATH", fix)]
    return [Check(backend, tool, "ok", where)]


CHECKS: dict[str, Callable[[Profile, Path, bool], list[Check]]] = {
    "podman": lambda p, d, live: _podman_checks(p, d, live=live),
    "qemu": lambda p, d, live: _qemu_checks(p, d, live=live),
    "docker": lambda p, d, live: _simple_tool("docker", "docker", "install Docker Engine"),
    "orbstack": lambda p, d, live: _simple_tool("orbstack", "orbctl",
                                                "install OrbStack (macOS only)"),
    "sim": lambda p, d, live: [Check("sim", "backend", "ok", "built in")],
}


def run_checks(
    profile: Profile, state_dir: Path, backends: Iterable[str], *, live: bool = True
) -> list[Check]:
    """Every check for ``backends``, the state directory's first.

    ``live`` also starts a container on a throwaway network and lets QEMU's KVM verdict be
    probed (a boot, cached per host), which is what proves a backend works.
    """
    out = _state_checks(state_dir)
    for name in backends:
        try:
            out += CHECKS[name](profile, state_dir, live)
        except VmPoolError as exc:
            out.append(Check(name, "check", "broken", explain(str(exc))))
    return out
