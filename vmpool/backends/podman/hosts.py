"""One podman host of ``[podman] hosts``: a podman service reached by URL.

A host is asked whether it answers with ``GET /_ping`` over its unix socket or TCP port
(vmpool.backends.podman.remote_api, a deadline of two seconds); an ``ssh://`` host has no REST
client here, so it is asked through ``podman --url URL version`` (ssh costs about half a second
a call). Its machines are driven by a `PodmanBackend` with that URL: creates, starts, inspects,
lists and removals through the host's REST API (unix, tcp), everything else (and everything on
ssh) through ``podman --url URL``, with a state directory of its own
(``<state_dir>/podman-hosts/<id>/``: recipes, the runtime verdict). Nothing host-side applies on
such a host, not even when the URL is a socket on this machine: no exec agent (its FIFOs are
directories of this machine: a command is a ``podman exec``), no live reset and no cgroup kill
(they need the host's cgroups and overlays), no API service of this machine, no iptables
isolation of the pool bridge; a reset is the full one on the CLI (``rm -f -v`` + ``run -d``
from the warm image), and the host's containers.conf chooses the OCI runtime (a remote
``podman run`` takes no ``--runtime``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vmpool.backends.podman.backend import PodmanBackend
from vmpool.backends.podman.remote_api import host_api
from vmpool.backends.podman.tool import Tool
from vmpool.config_backends import ImageSettings, PodmanHost, PodmanSettings
from vmpool.errors import BackendError, VmPoolError

log = logging.getLogger(__name__)

#: the directory under the state directory holding one directory per host
HOSTS_DIR = "podman-hosts"
#: how long a ping may take (a host slower than this is taken as not answering)
PING_TIMEOUT = 2.0
#: a ping's answer is trusted this long (create asks every host; a burst of creates asks once)
_PING_TTL = 1.0


def host_id(url: str) -> str:
    """A short name for ``url`` that a directory can have: readable part + hash."""
    readable = re.sub(r"[^a-z0-9]+", "-", url.lower()).strip("-")[-24:].strip("-")
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


@dataclass
class _Ping:
    ok: bool
    at: float
    error: str


class Host:
    """A podman service by URL, and the backend driving the machines on it."""

    def __init__(
        self, entry: PodmanHost, settings: PodmanSettings, state_dir: Path,
        image: ImageSettings | None = None,
    ) -> None:
        self.url = entry.url
        self.capacity = entry.capacity
        self.id = host_id(entry.url)
        self._parts = urllib.parse.urlsplit(entry.url)
        # the agent's FIFOs and the in-place reset work on this machine's files: off there
        own = settings.model_copy(update={"hosts": [], "exec_agent": False, "runtime": None})
        self.backend = PodmanBackend(own, Path(state_dir) / HOSTS_DIR / self.id, image,
                                     url=entry.url)
        self._tool = Tool(own, url=entry.url)
        self._ping: _Ping | None = None

    def __repr__(self) -> str:
        return f"Host({self.url!r})"

    def answers(self, *, fresh: bool = False) -> bool:
        """Whether the service answers ``/_ping`` (remembered ``_PING_TTL`` seconds unless
        ``fresh``)."""
        now = time.monotonic()
        known = self._ping
        if not fresh and known is not None and now - known.at < _PING_TTL:
            return known.ok
        error = self._ping_error()
        self._ping = _Ping(error is None, time.monotonic(), error or "")
        if error is not None:
            log.info("podman host %s does not answer: %s", self.url, error)
        return error is None

    @property
    def last_error(self) -> str:
        """Why the last ping failed ("" when it did not)."""
        return self._ping.error if self._ping is not None else ""

    def _ping_error(self) -> str | None:
        scheme = self._parts.scheme
        if scheme == "ssh":
            try:
                result = self._tool.run("version", "--format", "{{.Server.Version}}",
                                        timeout=max(PING_TIMEOUT, 10.0))
            except VmPoolError as exc:
                return str(exc)
            return None if result.returncode == 0 else result.stderr.strip()[-300:]
        client = host_api(self.url, timeout=PING_TIMEOUT)
        assert client is not None  # unix and tcp URLs have one
        try:
            client.request("GET", "/_ping", ok=(200,))
        except BackendError as exc:
            return str(exc)
        return None

    def down_message(self, what: str) -> str:
        """The text of a HostUnreachable for ``what`` (e.g. ``exec in NAME``)."""
        return (f"podman host {self.url} does not answer ({what}): {self.last_error}; its "
                "machines are replaced on the other hosts, and `vmpool gc` removes them once it "
                "is back")
