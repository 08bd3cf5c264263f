"""The REST API of a podman host by URL (``[podman] hosts``): the channel (see
vmpool.backends.podman.channel) a backend with that URL creates, starts, inspects, lists and
removes through, over the host's unix socket or TCP port.

Nothing is started or stopped here: the service is the host's own. Unlike the pool's local
service, nothing host-side goes with it: containers are deleted without a cgroup kill from this
machine (their pids are the host's), and the full reset stays on the CLI (it kills cgroups and
rewrites bind-mounted files from this machine). An ``ssh://`` host has no REST client here:
everything goes through ``podman --url``. A request that fails falls back to the CLI, as with
the local service, but the client is kept (the host may answer again; the CLI names what
failed meanwhile).
"""

from __future__ import annotations

import http.client
import urllib.parse
from pathlib import Path

from vmpool.backends.podman.api import PodmanApi
from vmpool.backends.podman.channel import ApiChannel


class TcpApi(PodmanApi):
    """`PodmanApi` over TCP (``tcp://HOST:PORT``)."""

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        super().__init__(Path(f"{host}:{port}"), timeout=timeout)  # what errors name
        self.host, self.port = host, port

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def host_api(url: str, *, timeout: float) -> PodmanApi | None:
    """A client of the podman service at ``url``; None for ``ssh://`` (CLI only)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return PodmanApi(Path(parts.path), timeout=timeout)
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        return TcpApi(parts.hostname, parts.port, timeout=timeout)
    return None


class RemoteChannel(ApiChannel):
    """A podman host's own service as a backend object's channel: always held, never
    started or stopped by vmpool."""

    def __init__(self, client: PodmanApi, *, timeout: float) -> None:
        super().__init__(Path("/nonexistent"), timeout=timeout)  # no service dir: none starts
        self._remote = client
        self.held = True

    def begin(self) -> None:
        """Nothing to start."""

    def client(self, *, start: bool = False) -> PodmanApi | None:
        return self._remote

    def lost(self, client: PodmanApi) -> None:
        """Kept: the host may answer again."""

    def close(self) -> None:
        """Nothing to stop: the service is the host's."""


def remote_channel(url: str, *, timeout: float) -> RemoteChannel | None:
    """The channel of a backend driving the podman host at ``url`` (None: ssh, CLI only)."""
    client = host_api(url, timeout=timeout)
    return RemoteChannel(client, timeout=timeout) if client is not None else None
