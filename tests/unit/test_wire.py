"""vmpool._wire.Connection: the client end of the lease server's socket."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool import _wire


class _FakeServer:
    """Accepts connections on a Unix socket; answers each line with ``reply`` (None: never)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.accepted = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                if self.reply is not None:
                    conn.sendall(self.reply * data.count(b"\n"))

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "pool.sock"


def test_a_reply_comes_back_and_the_connection_is_kept(sock_path: Path) -> None:
    server = _FakeServer(sock_path, b'{"ok":{"x":1}}\n')
    conn = _wire.Connection(sock_path, timeout=5)
    try:
        assert conn.call(b"{}\n") == b'{"x":1}'
        assert conn.call(b"{}\n") == b'{"x":1}'
        assert server.accepted == 1
    finally:
        conn.close()
        server.close()


def test_a_server_that_never_answers_times_out_as_server_gone(sock_path: Path) -> None:
    server = _FakeServer(sock_path, None)
    conn = _wire.Connection(sock_path, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(_wire.ServerGone, match="no reply"):
            conn.call(b"{}\n")
    finally:
        server.close()
    assert 0.25 <= time.monotonic() - started < 1.5  # its deadline, not a longer tick


def test_a_server_that_closes_mid_request_is_server_gone(sock_path: Path) -> None:
    server = _FakeServer(sock_path, None)
    conn = _wire.Connection(sock_path, timeout=5)
    threading.Timer(0.2, server.close).start()
    with pytest.raises(_wire.ServerGone):
        conn.call(b"{}\n")


def test_no_server_is_server_gone(sock_path: Path) -> None:
    """The transport was chosen when the client was built: no silent switch to the file."""
    with pytest.raises(_wire.ServerGone, match="no lease server answers"):
        _wire.Connection(sock_path, timeout=1).call(b"{}\n")


def test_an_interrupted_call_gives_its_connection_up_and_the_next_call_gets_its_own_reply(
    sock_path: Path,
) -> None:
    """A call interrupted while it waits cannot trust its stream any more (a handler raising
    just after recv() loses what it read): the next call opens a new connection, so its reply
    is its own, never the interrupted call's late one."""
    server = _FakeServer(sock_path, None)  # answers nothing on the first connection
    conn = _wire.Connection(sock_path, timeout=5)
    main = threading.get_ident()
    old = signal.signal(signal.SIGUSR1, _raise_interrupt)
    try:
        threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
        with pytest.raises(KeyboardInterrupt):
            conn.call(b"first\n")
        server.reply = b'{"ok":"own"}\n'
        assert conn.call(b"second\n") == b'"own"'
        assert server.accepted == 2
    finally:
        signal.signal(signal.SIGUSR1, old)
        conn.close()
        server.close()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def test_a_forked_child_opens_its_own_connection(sock_path: Path) -> None:
    """Sharing the parent's socket would mix the two processes' replies."""
    server = _FakeServer(sock_path, b'{"ok":1}\n')
    conn = _wire.Connection(sock_path, timeout=5)
    try:
        assert conn.call(b"{}\n") == b"1"
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if its call was answered
            os._exit(0 if conn.call(b"{}\n") == b"1" else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert server.accepted == 2
        assert conn.call(b"{}\n") == b"1"  # the parent's connection is still its own
        assert server.accepted == 2
    finally:
        conn.close()
        server.close()


def test_a_connection_dropped_without_close_still_closes(sock_path: Path) -> None:
    """The server reclaims on EOF: a client forgotten without close() must still give it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    conn = _wire.Connection(sock_path, timeout=5)
    sender = threading.Thread(target=conn.call, args=(b"hello\n",), daemon=True)
    sender.start()
    peer, _ = listener.accept()
    try:
        peer.settimeout(5)
        assert peer.recv(100) == b"hello\n"
        peer.sendall(b'{"ok":1}\n')
        sender.join(5)
        del conn, sender
        gc.collect()
        assert peer.recv(100) == b""  # EOF, not a 5 s timeout
    finally:
        peer.close()
        listener.close()
