"""The tool options a machine's container is made with: name and hostname, labels, network,
runtime and limits, an init as PID 1, the exec agent's mounts, and for systemd machines
podman's ``--systemd=always`` with sshd published on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from vmpool.backends.podman.commands import Commands
from vmpool.backends.podman.image import INIT
from vmpool.backends.podman.runtime import RuntimeDetector
from vmpool.backends.podman.tool import Tool
from vmpool.errors import BackendError, BackendUnavailable
from vmpool.ssh import pool_key

#: podman's option that sets up /run, /tmp and cgroups for systemd as PID 1
SYSTEMD_OPTION = "--systemd=always"
#: image commands that mean "this image boots systemd" (``[podman] systemd = "auto"``)
_SYSTEMD_COMMANDS = frozenset({INIT, "/lib/systemd/systemd", "/usr/lib/systemd/systemd"})
#: sshd's port in a systemd machine, published on the host's 127.0.0.1 only
SSH_PORT = 22
SSH_PUBLISH = f"127.0.0.1::{SSH_PORT}"


class ContainerOptions:
    """Builds the options of one backend's containers."""

    def __init__(
        self, tool: Tool, runtime: RuntimeDetector, commands: Commands, image: str,
        state_dir: Path,
    ) -> None:
        self._tool = tool
        self.settings = tool.settings
        self._runtime = runtime
        self._commands = commands
        self._image = image
        self._state_dir = state_dir
        #: image -> whether it boots systemd (``[podman] systemd = "auto"``)
        self._systemd_images: dict[str, bool] = {}

    def boots_systemd(self) -> bool:
        """Whether machines run systemd as PID 1 (``[podman] systemd``; auto: when the image's
        command is systemd's, as the debian image's is)."""
        setting = self.settings.systemd
        if setting is False:
            return False
        if not self._tool.is_podman:
            if setting is True:
                raise BackendUnavailable(
                    "[podman] systemd = true needs tool = \"podman\" (docker has no --systemd)"
                )
            return False
        if setting is True:
            return True
        known = self._systemd_images.get(self._image)
        if known is None:
            result = self._tool.run("image", "inspect", "--format", "{{json .Config.Cmd}}",
                                    self._image)
            try:
                cmd = json.loads(result.stdout) if result.returncode == 0 else None
            except ValueError:
                cmd = None
            known = isinstance(cmd, list) and bool(cmd) and cmd[0] in _SYSTEMD_COMMANDS
            self._systemd_images[self._image] = known
        return known

    def build(
        self, name: str, labels: Mapping[str, str], network: str | None, *, systemd: bool = False
    ) -> list[str]:
        s = self.settings
        options = ["--name", name, "--hostname", name]
        for key, value in sorted(labels.items()):
            options += ["--label", f"{key}={value}"]
        if network:
            options += ["--network", network]
        options += self._runtime.options().argv()
        if self._tool.is_podman and not systemd and not any(
            a == "--init" or a.startswith("--systemd") for a in s.extra_args
        ):
            options.append("--init")  # an init as PID 1 reaps orphans; a live reset needs one
        if s.memory:
            options += ["--memory", s.memory]
        if s.cpus:
            options += ["--cpus", f"{s.cpus:g}"]
        options = self._commands.with_mounts(name, options)
        if systemd:
            # sshd for deploy tools: the pool's key is root's only way in (no passwords)
            public = pool_key(self._state_dir).with_suffix(".pub")
            if ":" in str(public):
                raise BackendError(f"the state directory {self._state_dir} has a ':', which "
                                   "--volume cannot say; choose another [pool] state_dir")
            options += [SYSTEMD_OPTION, "--publish", SSH_PUBLISH,
                        "--volume", f"{public}:/root/.ssh/authorized_keys:ro"]
        return options + list(s.extra_args)

