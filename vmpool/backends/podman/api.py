"""Podman's REST API for the pool: the service's lifecycle and a small typed HTTP client.

``ApiService`` runs ``podman system service --time=0 unix://<state>/podman-api/podman.sock``
(the directory is 0700: no other local user can open the socket), records its pid and start
time in ``service.json`` so teardown or gc (``stop_recorded``) stops it, and waits for it with
a ``/_ping`` probe under a deadline. ``PodmanApi`` speaks plain HTTP over that ``AF_UNIX``
socket with ``http.client``; every call has a timeout, and every failure is a BackendError
naming the endpoint and podman's own message. Paths under ``/v4.0.0/libpod`` are podman's API,
paths under ``/v1.41`` the Docker-compatible one that the same service answers.

The CLI path is kept when the service cannot start (``start_api`` returns None and logs why):
the tool is missing or not podman, the socket path is longer than ``AF_UNIX`` allows, or the
service does not answer ``/_ping`` by the deadline (e.g. a podman too old to serve the API).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpool import _proc
from vmpool._files import atomic_write, private_dir
from vmpool.backends.podman.live_reset import start_time
from vmpool.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

SERVICE_DIR = "podman-api"
SOCKET_NAME = "podman.sock"
RECORD_NAME = "service.json"
LOG_NAME = "service.log"
#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included
_SUN_PATH_MAX = 107
_POLL = 0.02  # the probe interval of the deadline loops below: there is no event to wait on
DEFAULT_TIMEOUT = 30.0
#: podman routes its own API only under a version prefix; 4.0.0 is the oldest this client uses
LIBPOD = "/v4.0.0/libpod"
#: the Docker-compatible API the same service answers
COMPAT = "/v1.41"


class _UnixConnection(http.client.HTTPConnection):
    """An HTTPConnection to a unix socket (the host name only fills the Host header)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Response:
    """A finished API call: status and decoded JSON body (None when empty or not JSON)."""

    status: int
    body: Any


class PodmanApi:
    """A client of podman's service on ``socket_path``; one connection per call (the service
    closes idle ones, and a call never reuses a connection that broke mid-way)."""

    def __init__(self, socket_path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> Response:
        """``method path`` with a JSON ``body``; a status outside ``ok`` raises BackendError
        with the endpoint and podman's message, as does a transport failure or a timeout."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        endpoint = f"{method} {target}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = self._connection(self.timeout if timeout is None else timeout)
        started = time.monotonic()
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise BackendError(
                f"podman API {endpoint} on {self.socket_path}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            conn.close()
        log.debug("podman API %s %s: %s in %.3fs", method, path, resp.status,
                  time.monotonic() - started)
        decoded = _decode(raw)
        if resp.status not in ok:
            raise ApiError(endpoint, resp.status, _message(decoded, raw))
        return Response(resp.status, decoded)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection to the service (vmpool.backends.podman.remote_api: over TCP)."""
        return _UnixConnection(str(self.socket_path), timeout)

    def ping(self, timeout: float = 2.0) -> bool:
        """True when the service answers ``GET /_ping`` with 200."""
        try:
            return self.request("GET", "/_ping", timeout=timeout).status == 200
        except BackendError:
            return False

    # -- containers (podman's own API) -------------------------------------------------------
    def create(self, spec: Mapping[str, Any]) -> str:
        """Create a container from a libpod spec generator; its id."""
        body = self.request("POST", f"{LIBPOD}/containers/create", dict(spec)).body
        if not isinstance(body, dict) or not isinstance(body.get("Id"), str):
            raise BackendError(f"podman API POST {LIBPOD}/containers/create: no Id in {body!r}")
        return str(body["Id"])

    def start(self, name: str) -> bool:
        """Start a created container; False when it was running already (304)."""
        resp = self.request("POST", f"{LIBPOD}/containers/{_q(name)}/start", ok=(204, 304))
        return resp.status == 204

    def inspect(self, name: str) -> dict[str, Any] | None:
        """The container's inspect record, None when there is no such container."""
        resp = self.request("GET", f"{LIBPOD}/containers/{_q(name)}/json", ok=(200, 404))
        return resp.body if resp.status == 200 and isinstance(resp.body, dict) else None

    def delete(self, name: str, *, volumes: bool = True) -> bool:
        """Remove the container at once (force, no stop timeout), with its anonymous volumes
        unless ``volumes`` is False; False when it was already gone."""
        # libpod's name for it is `volumes`; `v` (docker's) is silently ignored on /libpod paths
        query = {"force": "true", "timeout": "0", "volumes": "true" if volumes else "false"}
        resp = self.request(
            "DELETE", f"{LIBPOD}/containers/{_q(name)}", query=query, ok=(200, 204, 404)
        )
        return resp.status != 404


    def containers(self, prefix: str) -> list[dict[str, Any]]:
        """Every container (running or not) whose name starts with ``prefix``: podman's list
        rows (``Names``, ``Labels``, ``State`` ...)."""
        query = {"all": "true"}
        if prefix:
            query["filters"] = json.dumps({"name": [f"^{prefix}"]})
        body = self.request("GET", f"{LIBPOD}/containers/json", query=query).body
        return [row for row in body or [] if isinstance(row, dict)]

    def changes(self, name: str) -> list[str]:
        """The container's filesystem changes as ``podman diff`` prints them (``C /etc``)."""
        body = self.request("GET", f"{LIBPOD}/containers/{_q(name)}/changes").body
        kinds = {0: "C", 1: "A", 2: "D"}
        return [f"{kinds.get(int(row.get('Kind', -1)), '?')} {row.get('Path')}"
                for row in body or [] if isinstance(row, dict)]

    # -- images and networks -----------------------------------------------------------------
    def remove_images(self, images: list[str]) -> list[str]:
        """Remove ``images`` in one call (missing ones are ignored); podman's errors, if any
        (an image a container still uses stays)."""
        query = "&".join(f"images={_q(i)}" for i in images) + "&ignore=true"
        resp = self.request("DELETE", f"{LIBPOD}/images/remove?{query}", ok=(200, 404))
        errors = resp.body.get("Errors") if isinstance(resp.body, dict) else None
        return [str(e) for e in errors or []]

    def networks(self) -> list[dict[str, Any]]:
        """Every network: podman's rows (``name``, ``labels``, ``network_interface`` ...)."""
        body = self.request("GET", f"{LIBPOD}/networks/json").body
        return [row for row in body or [] if isinstance(row, dict)]

    def network(self, name: str) -> dict[str, Any] | None:
        """The network's inspect record, None when there is no such network."""
        resp = self.request("GET", f"{LIBPOD}/networks/{_q(name)}/json", ok=(200, 404))
        return resp.body if resp.status == 200 and isinstance(resp.body, dict) else None

    def create_network(self, name: str, labels: Mapping[str, str],
                       options: Mapping[str, str]) -> bool:
        """Create a bridge network; False when one of that name exists already."""
        body = {"name": name, "driver": "bridge", "labels": dict(labels),
                "options": dict(options)}
        resp = self.request("POST", f"{LIBPOD}/networks/create", body, ok=(200, 409))
        return resp.status == 200

    def delete_network(self, name: str) -> bool:
        """Remove the network; False when it was already gone."""
        resp = self.request("DELETE", f"{LIBPOD}/networks/{_q(name)}", ok=(200, 204, 404))
        return resp.status != 404


class ApiError(BackendError):
    """The service answered with an error status; ``status`` and podman's ``message`` kept."""

    def __init__(self, endpoint: str, status: int, message: str) -> None:
        self.endpoint = endpoint
        self.status = status
        self.message = message
        super().__init__(f"podman API {endpoint} answered {status}: {message}")


@dataclass(frozen=True)
class ServiceRecord:
    """What gc needs to stop a service this state directory started: pid, its start time
    (so a reused pid is never signalled) and the socket."""

    pid: int
    start: int
    socket: str

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


class ApiService:
    """The pool's ``podman system service``: started once, stopped at teardown."""

    def __init__(self, state_dir: Path, *, tool: str = "podman") -> None:
        self.dir = Path(state_dir) / SERVICE_DIR
        self.tool = tool
        self.socket_path = self.dir / SOCKET_NAME
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> PodmanApi:
        """Start the service (or reuse the recorded one that still answers) and wait until it
        answers ``/_ping``; BackendUnavailable (with the service's log) when it cannot."""
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise BackendUnavailable(
                f"podman API socket path {self.socket_path} is longer than a unix socket "
                f"allows ({_SUN_PATH_MAX} bytes); choose a shorter [pool] state_dir"
            )
        private_dir(self.dir)
        api = PodmanApi(self.socket_path)
        old = read_record(self.dir)
        if old is not None and old.alive() and api.ping():
            log.debug("reusing podman API service pid %s", old.pid)
            return api
        stop_recorded(self.dir.parent)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        argv = [self.tool, "system", "service", "--time=0", f"unix://{self.socket_path}"]
        proc = _proc.spawn(argv, log_path=self.dir / LOG_NAME, install_hint="install podman")
        self._proc = proc
        started = start_time(proc.pid)
        if started is not None:
            record = ServiceRecord(proc.pid, started, str(self.socket_path))
            atomic_write(self.dir / RECORD_NAME, json.dumps(record.__dict__))
        deadline = time.monotonic() + timeout
        while not api.ping(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            code = proc.poll()
            if code is not None or time.monotonic() >= deadline:
                self.stop()
                why = f"exited {code}" if code is not None else f"did not answer in {timeout}s"
                raise BackendUnavailable(
                    f"podman API service ({' '.join(argv)}) {why}: {self._log_tail()}"
                )
            time.sleep(_POLL)
        log.info("podman API service pid %s on %s", proc.pid, self.socket_path)
        return api

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the service (SIGTERM, then SIGKILL at the deadline) and drop its record."""
        if self._proc is not None:
            _terminate(self._proc.pid, timeout, self._proc)
            self._proc = None
        stop_recorded(self.dir.parent, timeout=timeout)

    def _log_tail(self) -> str:
        try:
            text = (self.dir / LOG_NAME).read_text(errors="replace").strip()
        except OSError as exc:
            return f"(no log: {exc})"
        return text[-1500:] or "(no output)"


def start_api(state_dir: Path, *, tool: str = "podman",
              timeout: float = DEFAULT_TIMEOUT) -> tuple[ApiService, PodmanApi] | None:
    """The pool's API service and client, or None (logged) when the CLI path must be kept."""
    service = ApiService(state_dir, tool=tool)
    try:
        return service, service.start(timeout)
    except BackendUnavailable as exc:
        log.warning("keeping the podman CLI path: %s", exc)
        return None


def read_record(service_dir: Path) -> ServiceRecord | None:
    """The recorded service of ``service_dir``, None when there is none or it is unreadable."""
    try:
        data = json.loads((service_dir / RECORD_NAME).read_text())
        return ServiceRecord(int(data["pid"]), int(data["start"]), str(data["socket"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_recorded(state_dir: Path, *, timeout: float = 10.0) -> bool:
    """Stop the service recorded under ``state_dir`` if it still runs (gc and teardown);
    remove its record and socket. True when a process was stopped."""
    service_dir = Path(state_dir) / SERVICE_DIR
    record = read_record(service_dir)
    stopped = False
    if record is not None and record.alive():
        _terminate(record.pid, timeout, None, start=record.start)
        stopped = True
    for name in (RECORD_NAME, SOCKET_NAME):
        with contextlib.suppress(FileNotFoundError):
            (service_dir / name).unlink()
    return stopped


def _terminate(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None,
               start: int | None = None) -> None:
    start = start_time(pid) if start is None else start
    if start is None:
        if proc is not None:
            proc.poll()  # reap a zombie child
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if start_time(pid) != start:
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and start_time(pid) != start:
                return
            time.sleep(_POLL)
        log.warning("podman API service pid %s did not exit on %s", pid, sig.name)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _message(decoded: Any, raw: bytes) -> str:
    if isinstance(decoded, dict):
        for key in ("message", "cause"):
            if isinstance(decoded.get(key), str) and decoded[key]:
                return str(decoded[key])
    return raw.decode(errors="replace").strip()[-500:] or "(empty body)"


def remove(api: PodmanApi, name: str, *, timeout: float = DEFAULT_TIMEOUT,
           killed: bool = False) -> None:
    """SIGKILL the container's processes from the host (its cgroup's pids) unless the caller
    has (``killed``), then delete it with its anonymous volumes; a missing container is no
    error."""
    deadline = time.monotonic() + timeout
    info = None if killed else api.inspect(name)
    pid = int(info.get("State", {}).get("Pid") or 0) if info else 0
    if pid > 0:
        _kill_cgroup(pid)
    while True:
        try:
            api.delete(name)
            return
        except ApiError as exc:  # "container state improper" right after a host-side kill
            if exc.status != 500 or time.monotonic() >= deadline:
                raise
            time.sleep(_POLL)


def run(api: PodmanApi, spec: Mapping[str, Any], *,
        timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Create ``spec`` and start it; ready when inspect says Running (never an API exec: those
    leave conmon processes for minutes). Returns the container's inspect record."""
    deadline = time.monotonic() + timeout
    name = str(spec["name"])
    api.create(spec)
    api.start(name)
    while True:
        info = api.inspect(name)
        if info is not None and info.get("State", {}).get("Running"):
            return info
        if time.monotonic() >= deadline:
            raise BackendError(f"podman API: {name} not running {timeout}s after start: "
                               f"{(info or {}).get('State')!r}")
        time.sleep(_POLL)


def recreate(api: PodmanApi, name: str, spec: Mapping[str, Any], *,
             timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The full reset through the API: `remove` the container, then `run` ``spec``."""
    remove(api, name, timeout=timeout)
    return run(api, spec, timeout=timeout)


def _kill_cgroup(pid: int) -> None:
    """SIGKILL every process in ``pid``'s cgroup (the container's), from the host."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, _, rel = line.split(":", 2)
        for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"),
                     Path("/sys/fs/cgroup")):
            procs = root / rel.lstrip("/") / "cgroup.procs"
            if rel != "/" and procs.exists():
                for entry in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(entry), signal.SIGKILL)
                return
