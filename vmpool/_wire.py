"""The lease server's socket: where it is, and the client end (one JSON line each way).

Kept free of the state models so that the store (vmpool.state) and the server (vmpool.server)
can both use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: sun_path holds 108 bytes with its NUL; longer paths are reached through /proc/self/fd
_SUN_PATH_MAX = 107
#: how often a blocked recv() wakes to look at its deadline (the kernel's SO_RCVTIMEO)
_TICK = 1.0


_OK = b'{"ok":'


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
    """A client's connection to one pool's lease server: one request line, one reply line, in
    order. It is the client's lifeline: the server reclaims what a closed connection's
    processes held (vmpool.server), so it stays open for the client's life.

    ``call`` returns the reply's JSON (for the operation to parse) or a Failure; it raises
    ServerGone when the server is gone or did not answer within the timeout, with the
    request's outcome unknown. A call interrupted anywhere (KeyboardInterrupt, pytest-timeout's
    signal, a stop signal) gives the connection up: a handler that raises just after a recv()
    returned loses what it read, so the stream can no longer be trusted to pair replies with
    requests. The next call opens a new one; the server treats the old one's closing as the
    end of its waits and leases (the interrupted test is over).
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._finalizer: weakref.finalize[[], Any] | None = None  # closes a dropped one
        self._lock = threading.Lock()
        _connections.add(self)

    def _forget_in_child(self) -> None:
        """A forked child must neither share its parent's socket (the replies would mix) nor
        keep it open (the server would not see the parent's death while the child lives),
        nor wait for a lock a parent thread held at the fork."""
        sock, self._sock, self._buffer = self._sock, None, b""
        self._let_go_of()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # this process's copy: the parent's connection stays open
        self._lock = threading.Lock()

    def _open(self) -> socket.socket:
        if self._sock is None:
            sock = connect(self.path, self.timeout)
            if sock is None:
                raise ServerGone(f"{self.path}: no lease server answers there")
            # Blocking, with the kernel's SO_RCVTIMEO/SO_SNDTIMEO as the tick a call checks its
            # deadline at: a Python socket timeout costs a mode-switching ioctl per
            # settimeout() and a poll() per recv(), each ~10 us in this sandbox's syscalls, and
            # a cycle is four of them
            sock.settimeout(None)
            every = min(_TICK, self.timeout)
            tick = struct.pack("ll", int(every), int(every % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tick)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tick)
            self._sock, self._buffer = sock, b""
            # a connection dropped without close() still closes
            self._finalizer = weakref.finalize(self, sock.close)
        return self._sock

    def _line(self, sock: socket.socket, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:  # a tick: SO_RCVTIMEO ran out
                if time.monotonic() >= deadline:
                    raise ServerGone("no reply in time") from None
                continue
            if not chunk:
                raise ServerGone("server closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def call(self, line: bytes, *, wait: float = 0.0) -> bytes | Failure:
        """Send ``line``; its reply, which may take ``wait`` seconds more than the timeout."""
        with self._lock:
            try:
                sock = self._open()
                sock.sendall(line)  # a full buffer for a tick (SO_SNDTIMEO): the server is stuck
                reply = self._line(sock, time.monotonic() + self.timeout + wait)
            except (OSError, ServerGone) as exc:
                self.close()
                raise ServerGone(f"{self.path}: no reply from the lease server ({exc})") from exc
            except BaseException:
                self.close()  # interrupted: what this stream holds can no longer be trusted
                raise
        if is_ok(reply) and reply.endswith(b"}"):
            return reply[len(_OK) : -1]
        try:
            return Failure(str(json.loads(reply)["error"]))
        except (ValueError, KeyError, TypeError):
            return Failure(f"unreadable reply: {reply[:200]!r}")

    def close(self) -> None:
        sock, self._sock, self._buffer = self._sock, None, b""
        self._let_go_of()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _let_go_of(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None


_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def _forget_in_child() -> None:
    for conn in list(_connections):
        conn._forget_in_child()


os.register_at_fork(after_in_child=_forget_in_child)
