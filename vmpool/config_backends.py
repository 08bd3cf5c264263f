"""Configuration of the backends: the ``[sim]``, ``[podman]``, ``[qemu]``, ``[image]`` and
``[orbstack]`` sections of ``pool.toml`` (vmpool.config loads them with the rest)."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Debian's rule for package names (policy 5.6.1)
DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


class Strict(BaseModel):
    """A section: unknown keys are errors, values frozen, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SimSettings(Strict):
    """``[sim]``: the simulated backend (test double and benchmark baseline)."""

    root: Path | None = Field(
        None, description="Where sim machines live. Default: <state_dir>/sim."
    )
    create_latency: float = Field(0.0, ge=0, description="Seconds a create takes.")
    start_latency: float = Field(0.0, ge=0, description="Seconds a start takes.")
    ready_latency: float = Field(0.0, ge=0, description="Seconds from start until ready.")
    reset_latency: float = Field(0.0, ge=0, description="Seconds a reset takes.")
    delete_latency: float = Field(0.0, ge=0, description="Seconds a delete takes.")
    exec_latency: float = Field(0.0, ge=0, description="Seconds an exec takes.")
    fail_create: list[int] = Field(
        default_factory=list,
        description="Fail the k-th create (1-based, counted across processes).",
    )
    fail_every_create: bool = Field(False, description="Every create fails.")
    hang_on_start: bool = Field(False, description="start() never becomes ready.")
    fail_delete: bool = Field(False, description="Every delete of a machine or network fails.")


#: the schemes of a ``[podman] hosts`` entry
HOST_SCHEMES = ("unix", "tcp", "ssh")


class PodmanHost(Strict):
    """One entry of ``[podman] hosts``: a podman service reached by URL (``podman --url``)."""

    url: str = Field(
        description="unix:///PATH.sock, tcp://HOST:PORT or ssh://USER@HOST[:PORT]/PATH.sock"
    )
    capacity: int | None = Field(
        None, ge=1, le=4096,
        description="Machines (of every pool of this state directory) the host takes at most "
        "(unset: no limit).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        problem = host_url_problem(value)
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value


def host_url_problem(url: str) -> str | None:
    """What is wrong with a ``[podman] hosts`` URL, None when nothing is."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in HOST_SCHEMES:
        return f"the scheme must be one of {', '.join(s + '://' for s in HOST_SCHEMES)}"
    if parts.query or parts.fragment:
        return "a host URL takes no ?query or #fragment"
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            return "a unix URL is unix:///ABSOLUTE/PATH.sock (three slashes, no host)"
        return None
    if not parts.hostname:
        return f"a {parts.scheme} URL needs a host"
    if parts.scheme == "tcp":
        if port is None:
            return "a tcp URL needs a port (tcp://HOST:PORT)"
        if parts.path not in ("", "/") or parts.username:
            return "a tcp URL is tcp://HOST:PORT (no user, no path)"
        return None
    if not parts.username:
        return "an ssh URL needs a user (ssh://USER@HOST/PATH.sock)"
    if not parts.path.startswith("/") or parts.path == "/":
        return "an ssh URL needs the service's socket path (ssh://USER@HOST/run/podman/podman.sock)"
    return None


class PodmanSettings(Strict):
    """``[podman]``: podman or docker containers as machines."""

    tool: Literal["podman", "docker"] = Field("podman", description="The container CLI to drive.")
    image: str | None = Field(
        None,
        description="Image machines run. Default: the one `vmpool image build --backend podman "
        "--distro DISTRO` makes for `distro`.",
    )
    distro: Literal["busybox", "debian"] = Field(
        "busybox",
        description="The built image machines run when `image` is unset: busybox (tiny, starts "
        "in a fraction of a second) or debian (Debian 12 with systemd, apt, python3, sudo and "
        "sshd; ready in about 2 s).",
    )
    systemd: Literal["auto", True, False] = Field(
        "auto",
        description="Run systemd as PID 1 (`/sbin/init`, podman's --systemd=always). auto: when "
        "the image's command is /sbin/init (the debian image's is). Needs podman, not docker.",
    )
    ready_states: list[str] = Field(
        default_factory=lambda: ["running", "degraded"],
        min_length=1,
        description="A systemd machine is ready once `systemctl is-system-running` says one of "
        "these.",
    )
    command: list[str] = Field(
        default_factory=lambda: ["sleep", "infinity"], description="Keeps the container running."
    )
    runtime: str | None = Field(None, description="OCI runtime (auto: runc if crun cannot run).")
    ulimits: dict[str, str] | None = Field(
        None, description="--ulimit values, e.g. {nofile = '1024:1024'} (auto: detected)."
    )
    memory: str | None = Field(None, description="--memory, e.g. '512m'.")
    cpus: float | None = Field(None, gt=0, description="--cpus.")
    extra_args: list[str] = Field(default_factory=list, description="Extra `run` arguments.")
    command_timeout: float = Field(60.0, gt=0, description="Timeout for each podman command.")
    exec_agent: bool = Field(
        True,
        description="Run commands through a small sh agent started once per container (about "
        "2 ms each, not a `podman exec`, about 0.15 s); it shows in the container's process list. "
        "false: every command is a `podman exec`.",
    )
    hosts: list[PodmanHost] = Field(
        default_factory=list,
        description="Podman services the pool's machines live on, each a URL string "
        "(unix:///PATH.sock, tcp://127.0.0.1:PORT, ssh://USER@HOST/PATH.sock) or a table "
        "{url = ..., capacity = N}. A new machine goes to the answering host with the fewest of "
        "the pool's machines. Empty: this machine's podman. Needs tool = \"podman\".",
    )

    @field_validator("hosts")
    @classmethod
    def _distinct_hosts(cls, value: list[PodmanHost]) -> list[PodmanHost]:
        seen: set[str] = set()
        for host in value:
            if host.url in seen:
                raise ValueError(f"{host.url!r} is listed twice")
            seen.add(host.url)
        return value

    @model_validator(mode="after")
    def _hosts_need_podman(self) -> PodmanSettings:
        if self.hosts and self.tool != "podman":
            raise ValueError('hosts needs tool = "podman" (docker has no --url)')
        return self


class QemuSettings(Strict):
    """``[qemu]``: one qemu-system process per machine, QMP + guest agent."""

    binary: str = Field("qemu-system-x86_64", description="The QEMU system emulator.")
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto probes KVM by booting with a deadline, else uses TCG."
    )
    memory: int = Field(256, ge=64, description="Guest memory in MiB.")
    cpus: int = Field(1, ge=1, le=64, description="Guest vCPUs.")
    image_dir: Path | None = Field(
        None, description="Where `vmpool image build` puts the guest image (default: user cache)."
    )
    kernel: Path | None = Field(None, description="Your own kernel (default: the built image's).")
    initrd: Path | None = Field(
        None, description="Your own initramfs (default: the built image's)."
    )
    disk: Path | None = Field(
        None, description="Base disk (qcow2/raw); each machine boots a qcow2 overlay of it."
    )
    append: str = Field("", description="Extra kernel command line.")
    machine: str = Field("pc", description="QEMU -M value.")
    distro: Literal["busybox", "debian"] = Field(
        "busybox",
        description="The built image machines boot: busybox (a kernel and a busybox initramfs, "
        "ready in about 5 s under TCG) or debian (Debian 12 with systemd, apt, python3, sudo and "
        "sshd from `vmpool image build --backend qemu --distro debian`; a cold boot takes "
        "20-30 s under TCG, a snapshot reset a fraction of a second). Debian guests get at least "
        "512 MiB, boot (no clone warm-up) and forward a free 127.0.0.1 port to their sshd.",
    )
    ready_states: list[str] = Field(
        default_factory=lambda: ["running", "degraded"],
        min_length=1,
        description="A debian machine is ready once `systemctl is-system-running` says one of "
        "these (and its ssh port answers).",
    )
    kvm_probe_timeout: float = Field(
        10.0, gt=0, description="Deadline of the KVM boot probe (its verdict is cached per host)."
    )
    warmup: Literal["clone", "boot"] = Field(
        "clone",
        description=(
            "How machines start. clone: the first machine of a configuration boots a template "
            "whose running state is saved once per host (user cache, ~90 MiB per memory size "
            "and network/no network); every machine then restores a copy in about a second "
            "and gets its own hostname, MAC, address and clock through the guest agent; "
            "anything that fails boots that machine instead. Clones share the template's "
            "kernel memory (boot log, uptime, /proc/cmdline). boot: every machine boots its "
            "kernel, about 5 s alone under TCG, and parallel boots share the CPUs (4 on 2 "
            "cores: about 19 s, against 2.6 s for 4 clones)."
        ),
    )


class ImageSettings(Strict):
    """``[image]``: what `vmpool image build --distro debian` puts in the Debian image."""

    packages: list[str] = Field(
        default_factory=list,
        description="Debian packages to add to the image (it always has systemd, dbus, python3, "
        "openssh-server, sudo, iproute2 and ca-certificates). Each set of packages gets an "
        "image of its own, rebuilt when the set changes.",
    )

    @field_validator("packages")
    @classmethod
    def _package_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not DEBIAN_PACKAGE.match(name):
                raise ValueError(
                    f"{name!r} is not a Debian package name (lowercase letters, digits, '+', "
                    "'-' and '.', at least two characters, starting with a letter or digit)"
                )
        return value


class OrbstackSettings(Strict):
    """``[orbstack]``: OrbStack Linux machines via ``orbctl`` (macOS only)."""

    distro: str = Field("alpine", description="Distro image, e.g. 'ubuntu:jammy'.")
    arch: str | None = Field(None, description="amd64 or arm64 (default: host).")
    user: str | None = Field(None, description="Default user for commands.")
    command_timeout: float = Field(300.0, gt=0, description="Timeout for each orbctl command.")
