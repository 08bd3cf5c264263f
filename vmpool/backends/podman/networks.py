"""The pool's networks: create, remove and list (through the API service while the backend
object holds one, vmpool.backends.podman.channel, else ``<tool> network``), and, on rootful
podman, vmpool's own isolation of each pool bridge (vmpool.backends.podman.isolation)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vmpool.backends.base import MachineInfo, validate_name
from vmpool.backends.podman import isolation
from vmpool.backends.podman.channel import ApiChannel
from vmpool.backends.podman.image import RECIPE_LABEL
from vmpool.backends.podman.tool import Tool, is_missing, json_rows, validate_prefix
from vmpool.backends.podman.tool import labels as parse_labels

log = logging.getLogger(__name__)


class Networks:
    """The networks of one tool."""

    def __init__(self, tool: Tool, channel: ApiChannel | None = None) -> None:
        self._tool = tool
        self._channel = channel

    def create(self, name: str, labels: Mapping[str, str]) -> None:
        validate_name(name)
        made = self._channel.call(
            f"create network {name}",
            lambda c: c.create_network(name, labels, {"isolate": "true"}),
        ) if self._channel is not None else None
        if made is None:
            self._create_cli(name, labels)
        elif not made:
            log.debug("network %s already exists", name)
        bridge = self._bridge(name)
        if bridge is not None:
            isolation.isolate(bridge)

    def _create_cli(self, name: str, labels: Mapping[str, str]) -> None:
        args = ["network", "create"]
        if self._tool.is_podman:
            # podman bridges forward to each other by default (docker's are isolated already);
            # netavark's isolation can lapse (vmpool.backends.podman.isolation), vmpool's cannot
            args += ["--opt", "isolate=true"]
        for key, value in sorted(labels.items()):
            args += ["--label", f"{key}={value}"]
        result = self._tool.run(*args, name)
        if result.returncode != 0:
            if "already exists" not in result.stderr:
                result.check(f"create network {name}")
            log.debug("network %s already exists", name)

    def _bridge(self, name: str) -> str | None:
        """The host bridge of pool network ``name`` where vmpool isolates it (rootful podman),
        else None."""
        if not self._tool.is_podman or self._tool.remote or not isolation.applies():
            return None
        info = self._channel.call(f"inspect network {name}", lambda c: c.network(name)) \
            if self._channel is not None else None
        if info is not None:
            return str(info.get("network_interface") or "") or None
        result = self._tool.run("network", "inspect", "--format", "{{.NetworkInterface}}", name)
        if result.returncode != 0:
            return None
        return result.stdout.strip() or None

    def delete(self, name: str) -> None:
        validate_name(name)
        bridge = self._bridge(name)
        if bridge is not None:
            isolation.release(bridge)
        if self._channel is not None and self._channel.call(
            f"delete network {name}", lambda c: c.delete_network(name)
        ) is not None:
            return
        result = self._tool.run("network", "rm", name)
        if result.returncode != 0 and not is_missing(result.stderr):
            result.check(f"delete network {name}")

    def list(self, prefix: str) -> list[MachineInfo]:
        validate_prefix(prefix)
        rows = self._channel.call("list networks", lambda c: c.networks()) \
            if self._channel is not None else None
        if rows is None:
            fmt = "json" if self._tool.is_podman else "{{json .}}"
            result = self._tool.run("network", "ls", "--format", fmt).check("list networks")
            rows = json_rows(result.stdout)
        found = []
        for row in rows:
            net = str(row.get("name") or row.get("Name") or "")
            if net and net.startswith(prefix):
                raw = row.get("labels", row.get("Labels"))
                found.append(MachineInfo(net, parse_labels(raw, ignore=RECIPE_LABEL)))
        return sorted(found, key=lambda m: m.name)

