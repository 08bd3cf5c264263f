"""The tool options a machine's container is made with: name and hostname, labels, network,
runtime and limits, an init as PID 1, the exec agent's mounts, and for systemd machines
podman's ``--systemd=always`` with sshd published on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
#: $0 of the shell that starts the exec agent beside the machine's command
AGENT_ARGV0 = "vmpool-agent"


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
        #: image -> its Config (``[podman] systemd = "auto"``, the entrypoint)
        self._image_configs: dict[str, dict[str, Any]] = {}

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
        cmd = self._image_config().get("Cmd")
        return isinstance(cmd, list) and bool(cmd) and cmd[0] in _SYSTEMD_COMMANDS

    def command(self, name: str, *, systemd: bool) -> list[str]:
        """The machine's command: systemd's, or ``[podman] command`` with the exec agent started
        beside it (so no ``exec -d`` is needed once it runs) where the image has no entrypoint
        that would take the wrapper for its arguments."""
        if systemd:
            return [INIT]
        command = list(self.settings.command)
        agent = self._commands.agent(name)
        if agent is None or self._image_config().get("Entrypoint"):
            return command
        return ["sh", "-c", f'sh {agent.script} & exec "$@"', AGENT_ARGV0, *command]

    def _image_config(self) -> dict[str, Any]:
        """The image's ``Config`` (Cmd, Entrypoint ...), asked once per image."""
        known = self._image_configs.get(self._image)
        if known is None:
            result = self._tool.run("image", "inspect", "--format", "{{json .Config}}",
                                    self._image)
            try:
                data = json.loads(result.stdout) if result.returncode == 0 else None
            except ValueError:
                data = None
            known = data if isinstance(data, dict) else {}
            self._image_configs[self._image] = known
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

