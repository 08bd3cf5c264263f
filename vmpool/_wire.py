"""The lease server's socket: where it is, and the client end (one JSON line each way).

Kept free of the state models so that the store (vmpool.state) and the server (vmpool.server)
can both use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: sun_path holds 108 bytes with its NUL; longer paths are reached through /proc/self/fd
_SUN_PATH_MAX = 107


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


class _Stream:
    """One connected socket and the replies read from it, numbered in order.

    A thread of its own reads them: a signal handler (KeyboardInterrupt, pytest-timeout's
    SIGALRM) runs in the main thread between two bytecodes, so a caller reading for itself
    loses whatever its last recv() returned when the handler raises right after it, and every
    later reply then pairs with the wrong request. The reader thread never runs handlers; the
    caller only looks at the numbered replies and waits in select() for more, which an
    interrupt can leave at any point without losing anything (no lock, no condition).
    """

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.sent = 0  # requests sent, so the next one's reply is number ``sent``
        self.replies: dict[int, bytes] = {}  # set by the reader alone
        self.gone: str | None = None  # why no more replies will come
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        threading.Thread(target=self._read, name=f"vmpool-wire-{path.name}", daemon=True).start()

    def _read(self) -> None:
        buffer, received, why = b"", 0, "server closed the connection"
        try:
            while chunk := self.sock.recv(65536):
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    self.replies[received] = line
                    received += 1
                if lines:
                    self._wake_w.send(b"x")
        except OSError as exc:
            why = f"connection lost: {exc}"
        finally:
            self.gone = why
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._wake_w.close()
            self.sock.close()  # here, so no other thread's recv can meet a reused fd

    def reply(self, number: int, deadline: float) -> bytes:
        """Reply ``number`` once read."""
        while (reply := self.replies.get(number)) is None:
            if self.gone is not None:
                raise ServerGone(self.gone)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerGone("no reply in time")
            select.select([self._wake_r], [], [], left)
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        for earlier in [n for n in list(self.replies) if n <= number]:
            self.replies.pop(earlier, None)  # this one and those of interrupted calls
        return reply

    def close(self) -> None:
        # the reader sees EOF and closes the socket; the server sees this end close
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._wake_r.close()

    def forget(self) -> None:
        """In a forked child (no reader thread there): close this process's copies only."""
        for sock in (self.sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()


class Connection:
    """A client's connection to one pool's lease server: one request line, one reply line, in
    order. It is the client's lifeline: the server reclaims what a closed connection's
    processes held (vmpool.server), so it stays open for the client's life.

    ``call`` returns the reply's JSON (for the operation to parse) or a Failure; it raises
    ServerGone when the server is gone or did not answer within the timeout, with the
    request's outcome unknown. A call interrupted while waiting (KeyboardInterrupt) leaves its
    reply unread: replies are numbered as they arrive, and each call takes its own number, so
    they never pair with the wrong request.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._stream: _Stream | None = None
        self._finalizer: weakref.finalize[[], Connection] | None = None
        self._lock = threading.Lock()
        _connections.add(self)

    def _forget_in_child(self) -> None:
        """A forked child must neither share its parent's socket (the replies would mix) nor
        keep it open (the server would not see the parent's death while the child lives),
        nor wait for a lock a parent thread held at the fork."""
        if self._stream is not None:
            # the parent's connection stays open: no shutdown here, now or at exit
            self._let_go_of()
            self._stream.forget()
        self._stream = None
        self._lock = threading.Lock()

    def _open(self) -> _Stream:
        if self._stream is None:
            sock = connect(self.path, self.timeout)
            if sock is None:
                raise ServerGone(f"{self.path}: no lease server answers there")
            sock.settimeout(None)  # the reader waits as long as it takes; callers time out
            self._stream = _Stream(sock, self.path)
            # a connection dropped without close() still closes (its reader would keep it)
            self._finalizer = weakref.finalize(self, self._stream.close)
        return self._stream

    def call(self, line: bytes, *, wait: float = 0.0) -> bytes | Failure:
        """Send ``line``; its reply, which may take ``wait`` seconds more than the timeout."""
        with self._lock:
            try:
                stream = self._open()
                number = stream.sent
                try:
                    stream.sock.sendall(line)
                    stream.sent = number + 1
                except BaseException:
                    self.close()  # part of a line may have gone: this stream is unusable
                    raise
                reply = stream.reply(number, time.monotonic() + self.timeout + wait)
            except (OSError, ServerGone) as exc:
                self.close()
                raise ServerGone(f"{self.path}: no reply from the lease server ({exc})") from exc
        if is_ok(reply) and reply.endswith(b"}"):
            return reply[len(_OK) : -1]
        try:
            return Failure(str(json.loads(reply)["error"]))
        except (ValueError, KeyError, TypeError):
            return Failure(f"unreadable reply: {reply[:200]!r}")

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._let_go_of()
            stream.close()

    def _let_go_of(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None


_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def _forget_in_child() -> None:
    for conn in list(_connections):
        conn._forget_in_child()


os.register_at_fork(after_in_child=_forget_in_child)
