"""The OCI runtime and ``--ulimit`` values containers need here, detected once per tool binary.

Some hosts need them spelled out (crun fails on cgroups in hybrid mode; runc fails on
``setrlimit`` without explicit limits). The verdict comes from ``[podman] runtime`` and
``ulimits`` when both are set, else from ``<state_dir>/<tool>/runtime.json`` keyed by the tool
binary's path, size and modification time (an upgrade invalidates it), else from running a
throwaway container with each candidate until one works.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpool.backends.podman.image import missing_image_message
from vmpool.backends.podman.tool import Tool, last_line
from vmpool.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Limits runc needs spelled out where the host's hard limits cannot be inherited.
FALLBACK_ULIMITS: Mapping[str, str] = {"nofile": "1024:1024", "nproc": "1024:1024"}
_RUNC_PATHS = ("/usr/bin/runc", "/usr/sbin/runc", "/usr/local/bin/runc", "/usr/local/sbin/runc")
_CACHE_FILE = "runtime.json"


@dataclass(frozen=True)
class RunOptions:
    """The runtime verdict: ``--runtime`` (None: the tool's default) and ``--ulimit`` values."""

    runtime: str | None
    ulimits: tuple[tuple[str, str], ...] = ()

    def argv(self) -> list[str]:
        args = ["--runtime", self.runtime] if self.runtime else []
        for key, value in self.ulimits:
            args += ["--ulimit", f"{key}={value}"]
        return args

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "ulimits": dict(self.ulimits)}

    @classmethod
    def from_json(cls, data: Any) -> RunOptions:
        if not isinstance(data, dict):
            raise ValueError("runtime verdict must be an object")
        runtime = data.get("runtime")
        ulimits = data.get("ulimits") or {}
        if runtime is not None and not isinstance(runtime, str):
            raise ValueError("runtime must be a string or null")
        if not isinstance(ulimits, dict):
            raise ValueError("ulimits must be an object")
        return cls(runtime, ulimit_items(ulimits))


class RuntimeDetector:
    """The verdict for one tool and image, worked out at most once per object (thread-safe)."""

    def __init__(
        self, tool: Tool, image: str, directory: Path, write_json: Callable[[Path, Any], None]
    ) -> None:
        self._tool = tool
        self.settings = tool.settings
        self._image = image
        self._dir = directory
        self._write_json = write_json
        self._options: RunOptions | None = None
        self._lock = threading.Lock()

    def options(self) -> RunOptions:
        """The ``--runtime``/``--ulimit`` verdict: from settings, the cache, or a probe."""
        with self._lock:
            if self._options is None:
                self._options = self._detect_options()
            return self._options

    def _detect_options(self) -> RunOptions:
        s = self.settings
        if s.runtime is not None and s.ulimits is not None:
            return RunOptions(s.runtime, ulimit_items(s.ulimits))
        # the binary's identity costs a stat(), `--version` a process on every session start
        binary = _binary_identity(self._tool.name)
        if binary is None:  # not on PATH: let the tool's own error say what to install
            binary = last_line(self._tool.run("--version").check("version").stdout)
        identity = {"tool": self._tool.name, "binary": binary, "runtime": s.runtime,
                    "ulimits": s.ulimits}
        if self._tool.url is not None:
            identity["url"] = self._tool.url
        key = json.dumps(identity, sort_keys=True)
        cache = self._read_cache()
        if key in cache:
            try:
                options = RunOptions.from_json(cache[key])
            except ValueError as exc:
                log.warning("ignoring bad runtime cache entry in %s: %s", self._dir, exc)
            else:
                log.debug("runtime verdict from cache: %s", options)
                return options
        options = self._probe_options()
        cache[key] = options.to_json()
        self._write_json(self._dir / _CACHE_FILE, cache)
        log.info("%s (%s): using %s", self._tool.name, binary, options.argv() or "the defaults")
        return options

    def _probe_options(self) -> RunOptions:
        """Run ``IMAGE true`` with candidate options until one works; BackendUnavailable if none."""
        s = self.settings
        if not self._tool.image_exists(self._image, what="runtime probe"):
            # else `run` would try a registry and fail with a misleading pull error
            raise BackendUnavailable(missing_image_message(self._tool.name, self._image))
        runtimes: list[str | None] = [s.runtime] if s.runtime is not None else [None]
        # a remote service takes no --runtime: its containers.conf chooses
        if s.runtime is None and _have_runc() and not self._tool.remote:
            runtimes.append("runc")
        limit_sets = [ulimit_items(s.ulimits)] if s.ulimits is not None else [
            (), ulimit_items(FALLBACK_ULIMITS)
        ]
        failures: list[str] = []
        for runtime in runtimes:
            for ulimits in limit_sets:
                candidate = RunOptions(runtime, ulimits)
                result = self._tool.run(
                    "run", "--rm", "--network", "none", *candidate.argv(), self._image, "true"
                )
                if result.returncode == 0:
                    return candidate
                error = result.stderr.strip()[-500:]
                failures.append(f"{' '.join(candidate.argv()) or 'defaults'}: {error}")
                # without limits a failure that is not about rlimits will not be cured by them
                if not ulimits and "rlimit" not in error.lower():
                    break
        raise BackendUnavailable(
            f"{self._tool.name} cannot run a container here (install runc, or set [podman] runtime "
            "and ulimits); tried:\n  " + "\n  ".join(failures)
        )

    def _read_cache(self) -> dict[str, Any]:
        try:
            data = json.loads((self._dir / _CACHE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable runtime cache: %s", exc)
            return {}
        return data if isinstance(data, dict) else {}

def _binary_identity(tool: str) -> str | None:
    """``tool``'s resolved path, size and mtime (changed by an upgrade), or None if not found."""
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _have_runc() -> bool:
    return shutil.which("runc") is not None or any(Path(p).exists() for p in _RUNC_PATHS)


def ulimit_items(ulimits: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in ulimits.items()))


