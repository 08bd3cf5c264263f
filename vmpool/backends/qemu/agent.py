"""The guest agent: qemu-ga over the machine's virtio-serial chardev socket.

JSON lines, synced (0xFF, then ``guest-sync`` with a fresh id) before use; commands run with
``guest-exec`` and ``guest-exec-status``. ``Sessions`` keeps one connection per machine open
between one process's commands, and serialises the conversations with each machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmpool.backends.base import ExecResult, probe_until
from vmpool.backends.qemu import process
from vmpool.backends.qemu.records import Record
from vmpool.errors import BackendError, ExecTimeout, ReadyTimeout, VmPoolError

log = logging.getLogger(__name__)

#: a kept guest-agent connection that does not answer a guest-sync this fast is replaced
_CACHED_SYNC_TIMEOUT = 2.0
#: one readiness probe waits for the agent at most this long
PROBE_STEP_TIMEOUT = 5.0
_KILL_GRACE = 1.0


class Agent:
    """One connection to qemu-ga's chardev socket: JSON lines, synced before use."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, path: Path, deadline: float) -> Agent:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path, deadline: float) -> Iterator[Agent]:
        agent = cls.connect(path, deadline)
        try:
            yield agent
        finally:
            agent.close()

    def close(self) -> None:
        self._sock.close()

    def send(self, command: str, arguments: Mapping[str, object] | None = None) -> None:
        message: dict[str, object] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def sync(self, deadline: float) -> None:
        """Flush the agent's parser (0xFF) and discard stale lines until our guest-sync id."""
        ident = random.randrange(1, 2**31)
        self._sock.sendall(b"\xff")
        self.send("guest-sync", {"id": ident})
        while True:
            reply = self._read(deadline, "guest-sync")
            if reply.get("return") == ident:
                return

    def call(
        self, command: str, arguments: Mapping[str, object] | None, deadline: float
    ) -> Any:
        """Send one command and return its ``return`` (BackendError for an agent error)."""
        self.send(command, arguments)
        reply = self._read(deadline, command)
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise AgentError(f"guest agent {command}: {desc}")
        return reply.get("return")

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                text = line.strip(b"\xff \r\t")
                if not text:
                    continue
                try:
                    reply = json.loads(text)
                except ValueError:
                    log.debug("discarding non-JSON agent line %r", text[:200])
                    continue
                if isinstance(reply, dict):
                    return reply
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"guest agent did not answer {what} in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise AgentTimeout(f"guest agent did not answer {what} in time") from None
            if not chunk:
                raise BackendError(f"guest agent connection closed during {what}")
            self._buf += chunk


class AgentError(BackendError):
    """qemu-ga answered with an error."""


class AgentTimeout(ExecTimeout):
    """qemu-ga did not answer before the deadline."""


def guest_exec(
    agent: Agent, name: str, argv: list[str], timeout: float, deadline: float
) -> ExecResult:
    try:
        started = agent.call(
            "guest-exec",
            {"path": argv[0], "arg": argv[1:], "capture-output": True},
            deadline,
        )
    except AgentError as exc:
        # qemu-ga could not spawn it (e.g. no such file): report like a shell would
        return ExecResult(127, "", f"{exc}\n")
    pid = int(started["pid"])
    interval = 0.005
    while True:
        # the agent answers a status query at once, so give it a moment past our own deadline
        status = agent.call(
            "guest-exec-status", {"pid": pid}, max(deadline, time.monotonic() + _KILL_GRACE)
        )
        if status.get("exited"):
            return exec_result(status)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            kill_guest_process(agent, pid)
            raise ExecTimeout(
                f"{argv!r} in qemu machine {name} did not finish within {timeout:g}s"
            )
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.1)


def exec_result(status: Mapping[str, Any]) -> ExecResult:
    if "exitcode" in status:
        code = int(status["exitcode"])
    elif "signal" in status:
        code = 128 + int(status["signal"])  # the shell's convention, like container backends
    else:
        code = -1
    return ExecResult(
        code,
        decode(status.get("out-data")),
        decode(status.get("err-data")),
    )


def decode(data: object) -> str:
    if not isinstance(data, str):
        return ""
    return base64.b64decode(data).decode(errors="replace")


def kill_guest_process(agent: Agent, pid: int) -> None:
    """Best effort: SIGKILL a timed-out guest process and its children, collect its status."""
    script = f"for c in $(pgrep -P {pid} 2>/dev/null); do kill -9 $c; done; kill -9 {pid}"
    deadline = time.monotonic() + _KILL_GRACE
    try:
        killer = agent.call(
            "guest-exec", {"path": "sh", "arg": ["-c", script], "capture-output": True}, deadline
        )
        for reap in (pid, int(killer["pid"])):
            interval = 0.01
            while time.monotonic() < deadline:
                if agent.call("guest-exec-status", {"pid": reap}, deadline).get("exited"):
                    break
                time.sleep(interval)
                interval = min(interval * 2, 0.1)
    except (VmPoolError, OSError, KeyError, ValueError) as exc:
        log.debug("could not kill guest pid %s: %s", pid, exc)


def wait_agent(
    run_dir: Path,
    record: Record,
    timeout: float,
    *,
    what: str,
    run_true: bool = True,
    set_clock: bool = False,
) -> None:
    """Probe until the agent answers a guest-sync (and runs `true`), or raise ReadyTimeout;
    BackendError at once when qemu exits.

    ``set_clock`` then sets the guest's clock to the host's over the same connection: after
    loadvm or -incoming the guest runs on from the saved time. (A `date -s` through
    guest-exec, not guest-set-time: that one also runs `hwclock -w`, which waits for the RTC's
    next second, up to 1.4 s under TCG.)
    """
    sock = record.qga_sock
    overall = time.monotonic() + timeout

    def probe() -> None:
        if process.find(run_dir) is None:
            raise process.QemuExited
        now = time.monotonic()
        # one probe waits for the agent up to a few seconds, never much past the deadline
        deadline = min(now + PROBE_STEP_TIMEOUT, max(overall, now + 0.2))
        with Agent.open(sock, deadline) as agent:
            agent.sync(deadline)
            if run_true:
                result = guest_exec(agent, what, ["true"], PROBE_STEP_TIMEOUT, deadline)
                if not result.ok:
                    raise BackendError(f"`true` exited {result.returncode}: {result.stderr}")
            if set_clock:
                argv = ["date", "-u", "-s", f"@{time.time():.6f}"]
                result = guest_exec(agent, what, argv, PROBE_STEP_TIMEOUT, deadline)
                if not result.ok:
                    raise process.ProbeFailed(f"setting the clock failed: {result.stderr.strip()}")

    try:
        probe_until(probe, timeout=timeout, what=what, first_interval=0.05, max_interval=0.5)
    except process.QemuExited:
        raise BackendError(f"{what}: qemu exited{process.died_hint(run_dir)}") from None
    except process.ProbeFailed as exc:
        raise BackendError(f"{what}: {exc}") from None
    except ReadyTimeout as exc:
        raise ReadyTimeout(f"{exc}{process.died_hint(run_dir)}") from None


class Sessions:
    """This process's conversations with its machines: one at a time per machine, and the
    agent connection kept open between commands until release().

    qemu-ga pauses 100 ms after every disconnect (its virtio-serial EOF handling), which made
    each command cost ~115 ms; a kept connection is re-synced (~1 ms) before each use.
    """

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._agents: dict[str, Agent] = {}

    @contextlib.contextmanager
    def exclusive(self, name: str, deadline: float) -> Iterator[None]:
        """One agent/monitor conversation per machine at a time within this process."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise ExecTimeout(f"qemu machine {name} stayed busy with another command")
        try:
            yield
        finally:
            lock.release()

    def release(self, name: str) -> None:
        """Close the connection kept to ``name``, so that another one can connect."""
        agent = self._agents.pop(name, None)
        if agent is not None:
            agent.close()

    def exec(
        self, run_dir: Path, record: Record, argv: Sequence[str], timeout: float
    ) -> ExecResult:
        """Run ``argv`` through guest-exec; ExecTimeout (and a kill) after ``timeout``."""
        name = record.name
        deadline = time.monotonic() + timeout
        with self.exclusive(name, deadline):
            agent = self._agents.pop(name, None)
            try:
                if agent is not None:
                    try:  # still the same guest and still answering?
                        agent.sync(min(deadline, time.monotonic() + _CACHED_SYNC_TIMEOUT))
                    except (OSError, BackendError):
                        agent.close()
                        agent = None
                if agent is None:
                    agent = Agent.connect(record.qga_sock, deadline)
                    agent.sync(deadline)
                result = guest_exec(agent, name, list(argv), timeout, deadline)
            except OSError as exc:
                if agent is not None:
                    agent.close()
                raise BackendError(
                    f"qemu machine {name}: guest agent unreachable: {exc}"
                    f"{process.died_hint(run_dir)}"
                ) from exc
            except BaseException:
                if agent is not None:
                    agent.close()
                raise
            self._agents[name] = agent
            return result
