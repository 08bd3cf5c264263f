"""The ``podman`` (or ``docker``) command line: one runner, and parsers of what it prints.

Every tool process of the backend goes through `Tool.run` (vmpool._proc: an argv list, a
timeout, the install hint when the tool is missing).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from vmpool import _proc
from vmpool.config_backends import PodmanSettings
from vmpool.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

INSTALL_HINTS = {
    "podman": "apt-get install podman runc",
    "docker": "install Docker Engine: https://docs.docker.com/engine/install/",
}
_PREFIX_RE = re.compile(r"^[a-z0-9-]*$")


class Tool:
    """Runs ``<tool> ARGS`` with ``[podman] command_timeout`` unless told otherwise; with a
    ``url`` (a ``[podman] hosts`` entry), ``podman --url URL ARGS``: the service there does it."""

    def __init__(self, settings: PodmanSettings, url: str | None = None) -> None:
        self.settings = settings
        self.name: str = settings.tool
        #: the podman service every command goes to; None: this machine's podman
        self.url = url
        self._global = ["--url", url] if url is not None else []

    @property
    def is_podman(self) -> bool:
        return self.name == "podman"

    @property
    def remote(self) -> bool:
        """Commands go to a podman service by URL: nothing of its host is reachable from here
        (no cgroups, overlays, network namespaces, paths)."""
        return self.url is not None

    def run(
        self, *args: str, timeout: float | None = None, input: bytes | None = None
    ) -> _proc.ProcResult:
        return _proc.run(
            [self.name, *self._global, *args],
            timeout=self.settings.command_timeout if timeout is None else timeout,
            input=input,
            install_hint=INSTALL_HINTS[self.name],
        )

    def inspect(self, name: str) -> dict[str, Any] | None:
        """The container's inspect record, None when there is no such container."""
        result = self.run("container", "inspect", name)
        if result.returncode != 0:
            if is_missing(result.stderr):
                return None
            result.check(f"inspect {name}")
        rows = json_rows(result.stdout)
        return rows[0] if rows else None

    def image_exists(self, image: str, *, what: str) -> bool:
        """Whether ``image`` is there; BackendUnavailable when the tool itself does not work."""
        if self.is_podman:
            args = ["image", "exists", image]
        else:
            args = ["image", "inspect", "--format", "{{.Id}}", image]
        result = self.run(*args)
        if result.returncode == 0:
            return True
        if result.returncode == 1 and (self.is_podman or is_missing(result.stderr)):
            return False
        raise BackendUnavailable(
            f"{self.name} does not work ({what}): {self.name} {' '.join(args)} exited "
            f"{result.returncode}: {result.stderr.strip()[-1000:]}"
        )

    def image_label(self, image: str, label: str) -> str | None:
        result = self.run(
            "image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', image
        )
        value = result.stdout.strip()
        return value if result.returncode == 0 and value not in ("", "<no value>") else None

    def remove_container(self, name: str) -> None:
        """``rm -f`` the container with its anonymous volumes; a missing one is no error."""
        # podman's rm -f first waits the stop timeout (10 s) for `sleep` as pid 1 to ignore TERM;
        # -v: the anonymous volumes the image declares go too (one would leak per reset)
        args = ["rm", "-f", "-v", "-t", "0", name] if self.is_podman else ["rm", "-f", "-v", name]
        result = self.run(*args)
        if result.returncode != 0 and not is_missing(result.stderr):
            result.check(f"remove {name}")

    def remove_image(self, image: str, *, missing_ok: bool) -> bool:
        """Remove ``image`` unless a container uses it; True when it is gone."""
        result = self.run("image", "rm", image)
        if result.returncode == 0 or (missing_ok and is_missing(result.stderr)):
            return True
        log.debug("could not remove image %s: %s", image, result.stderr.strip())
        return False


# -- small parsers --------------------------------------------------------------------------------
def validate_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"invalid name prefix {prefix!r}: use lowercase letters, digits and '-'")


def is_missing(stderr: str) -> bool:
    text = stderr.lower()
    return any(
        marker in text
        for marker in ("no such container", "no such image", "no such network", "not known",
                       "not found", "no such object")
    )


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def json_rows(text: str) -> list[dict[str, Any]]:
    """A JSON array (podman ``--format json``) or one object per line (docker ``{{json .}}``)."""
    text = text.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise BackendError(f"unexpected output (not JSON): {text[:200]!r}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise BackendError(f"unexpected output (not a JSON list): {text[:200]!r}")
    return [row for row in data if isinstance(row, dict)]


def labels(raw: Any, *, ignore: str = "") -> dict[str, str]:
    """Labels as a dict (podman) or ``k=v,k=v`` (docker's table output), without ``ignore``
    (the image's recipe label, which every container of the image inherits)."""
    if isinstance(raw, dict):
        pairs: Iterable[tuple[str, str]] = ((str(k), str(v)) for k, v in raw.items())
    elif isinstance(raw, str) and raw:
        pairs = ((k, v) for k, _, v in (item.partition("=") for item in raw.split(",")))
    else:
        return {}
    return {k: v for k, v in pairs if k and k != ignore}
