"""The lease server's socket: where it is, and the client end (one JSON line each way).

A request line that starts with ``NO_REPLY`` is one the client does not wait for: the server
applies it in order with the connection's other lines and sends nothing back.

Kept free of the state models so that the store (vmpool.state) and the server (vmpool.server)
can both use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: sun_path holds 108 bytes with its NUL; longer paths are reached through /proc/self/fd
_SUN_PATH_MAX = 107
#: after a failed connect, use the file and try the socket again this much later
RETRY_AFTER = 1.0


_OK = b'{"ok":'
#: first byte of a request line that gets no reply (see Connection.post)
NO_REPLY = b"!"


@dataclass(frozen=True)
class Failure:
    """The server's answer when it could not apply a request."""

    message: str


class ServerGone(Exception):
    """The server closed the connection after the request was sent: its outcome is unknown."""


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits in an AF_UNIX address, for bind() or connect()."""
    name = os.fsencode(path)
    if len(name) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float) -> socket.socket | None:
    """A connected client socket to the server at ``path``, or None when nobody answers there
    (no socket, connection refused: the stale socket of a dead controller)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with reachable(path) as where:
            sock.connect(where)
    except OSError:
        sock.close()
        return None
    return sock


def answers(path: Path) -> bool:
    """Whether a live server listens at ``path``."""
    sock = connect(path, 2.0)
    if sock is None:
        return False
    sock.close()
    return True


def ok_line(payload: bytes) -> bytes:
    """The reply line carrying ``payload`` (the operation's reply as JSON)."""
    return _OK + payload + b"}\n"


def is_ok(line: bytes) -> bool:
    """Whether a reply line says the request was applied."""
    return line.startswith(_OK)


def error_line(message: str) -> bytes:
    """The reply line saying the request could not be applied."""
    return json.dumps({"error": message}).encode() + b"\n"


class Connection:
    """A client's connection to one pool's lease server, opened on first use.

    ``call`` returns the reply's JSON (for the operation to parse), a Failure, or None when no
    server answers (the caller then runs the operation itself against the file); it raises
    ServerGone when the server went away with a request in flight.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._retry_at = 0.0
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _connect(self, *, now_or_never: bool = False) -> socket.socket | None:
        now = time.monotonic()
        if now < self._retry_at and not now_or_never:
            return None
        sock = connect(self.path, self.timeout)
        if sock is None:
            self._retry_at = now + RETRY_AFTER
            return None
        self._buffer = b""
        return sock

    def _send(self, line: bytes) -> bool:
        """Send one request line (caller holds _lock); False when no server took it."""
        if self._pid != os.getpid():  # a forked child must not share its parent's socket
            self._sock, self._pid = None, os.getpid()
        for attempt in range(2):
            if self._sock is None:
                self._sock = self._connect(now_or_never=attempt > 0)
                if self._sock is None:
                    return False
            try:
                self._sock.sendall(line)
                return True
            except OSError:
                # closed before reading it all: the server acts on whole lines only, so the
                # request was not applied; one fresh connection may take it
                self.close()
        return False

    def post(self, line: bytes) -> bool:
        """Send a request without waiting for its outcome; False when no server took it (the
        caller then runs it itself). The server applies it before this connection's later
        requests, and only logs it if it fails."""
        with self._lock:
            return self._send(NO_REPLY + line)

    def call(self, line: bytes) -> bytes | Failure | None:
        with self._lock:
            if not self._send(line):
                return None
            assert self._sock is not None
            try:
                while b"\n" not in self._buffer:
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        raise ServerGone(f"{self.path}: server closed the connection")
                    self._buffer += chunk
            except (OSError, ServerGone) as exc:
                self.close()
                raise ServerGone(f"{self.path}: no reply from the lease server ({exc})") from exc
            reply, _, self._buffer = self._buffer.partition(b"\n")
        if is_ok(reply) and reply.endswith(b"}"):
            return reply[len(_OK) : -1]
        try:
            return Failure(str(json.loads(reply)["error"]))
        except (ValueError, KeyError, TypeError):
            return Failure(f"unreadable reply: {reply[:200]!r}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
