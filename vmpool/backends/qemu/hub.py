"""The hub of one QEMU pool network: a small process that forwards every guest frame to the
pool's other guests, over a unix socket only the pool's owner can open.

Guests connect with ``-netdev stream,server=off,addr.type=unix,addr.path=<hub.sock>``; QEMU
frames each packet with a 4-byte big-endian length. The socket lives in a 0700 directory of
ours, so another local user can neither connect nor send (EACCES on the directory).

The process exits by itself when its network record no longer holds its token (the network was
deleted, or another hub replaced it), or when the process that started it has exited and no
guest is connected. It uses the standard library only and is run by path with ``python -I``,
so it is the same code as its caller's whatever ``sys.path`` would find.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import socket
import stat
import sys
import time
from pathlib import Path

#: QEMU's NET_BUFSIZE: no frame a guest sends is longer
MAX_FRAME = 4096 + 65536
#: frames waiting for one slow guest beyond this are dropped (a switch drops, it never blocks)
MAX_BACKLOG = 4 << 20
#: how often the record and the owner are looked at
CHECK_INTERVAL = 0.25
_LISTEN_BACKLOG = 64


class _Port:
    """One connected guest: what it sent that is not a whole frame yet, what waits for it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class Hub:
    """Forward each frame read from one port to every other port."""

    def __init__(
        self, listener: socket.socket, record: Path, token: str, owner: int | None
    ) -> None:
        self.listener = listener
        self.record = record
        self.token = token
        #: a pidfd of the process that started us; None once it has exited
        self.owner = owner
        self.ports: dict[int, _Port] = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, "listen")
        if owner is not None:
            self.sel.register(owner, selectors.EVENT_READ, "owner")
        self.dropped = 0

    def run(self) -> str:
        """Serve until a reason to stop; returns the reason."""
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:
                reason = self._reason_to_stop()
                if reason:
                    return reason
                next_check = now + CHECK_INTERVAL
            for key, events in self.sel.select(max(next_check - now, 0.0)):
                if key.data == "listen":
                    self._accept()
                elif key.data == "owner":
                    self.sel.unregister(key.fileobj)
                    os.close(key.fd)
                    self.owner = None
                    next_check = 0.0
                else:
                    port: _Port = key.data
                    if events & selectors.EVENT_WRITE and self._live(port):
                        self._flush(port)
                    if events & selectors.EVENT_READ and self._live(port):
                        self._read(port)

    def _reason_to_stop(self) -> str:
        try:
            data = json.loads(self.record.read_text())
        except FileNotFoundError:
            return f"{self.record} is gone"
        except (OSError, ValueError):
            return ""  # a writer replaces it atomically: look again next time
        if not isinstance(data, dict) or data.get("token") != self.token:
            return f"{self.record} belongs to another hub"
        if self.owner is None and not self.ports:
            self._accept()  # a guest about to start holds a connection: it counts
            if not self.ports:
                return "its owner exited and no guest is connected"
        return ""

    def _accept(self) -> None:
        """Every pending connection: a guest connected earlier than another sent a frame
        gets that frame."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            port = _Port(sock)
            self.ports[sock.fileno()] = port
            self.sel.register(sock, selectors.EVENT_READ, port)

    def _live(self, port: _Port) -> bool:
        """Not closed meanwhile (by a failed send while forwarding an earlier frame)."""
        return self.ports.get(port.sock.fileno()) is port

    def _close(self, port: _Port) -> None:
        self.ports.pop(port.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(port.sock)
        port.sock.close()

    def _read(self, port: _Port) -> None:
        try:
            chunk = port.sock.recv(1 << 17)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(port)
            return
        port.inbuf += chunk
        while len(port.inbuf) >= 4:
            size = int.from_bytes(port.inbuf[:4], "big")
            if size > MAX_FRAME:
                print(f"hub: a guest sent a {size}-byte frame; closing its port", flush=True)
                self._close(port)
                return
            if len(port.inbuf) < 4 + size:
                break
            frame = bytes(port.inbuf[: 4 + size])
            del port.inbuf[: 4 + size]
            self._forward(frame, port)

    def _forward(self, frame: bytes, source: _Port) -> None:
        for port in list(self.ports.values()):
            if port is source:
                continue
            if len(port.outbuf) + len(frame) > MAX_BACKLOG:
                self.dropped += 1
                continue
            idle = not port.outbuf
            port.outbuf += frame
            if idle:
                self._flush(port)

    def _flush(self, port: _Port) -> None:
        try:
            sent = port.sock.send(port.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(port)
            return
        del port.outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if port.outbuf else 0)
        if self.sel.get_key(port.sock).events != events:
            self.sel.modify(port.sock, events, port)


def _check_private_dir(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SystemExit(f"hub: {path} is not a directory of uid {os.getuid()}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise SystemExit(f"hub: {path} has mode {stat.S_IMODE(st.st_mode):o}, not 700")


def _listen(path: Path) -> socket.socket:
    """Bind ``path`` (mode 0600), replacing a stale socket there but nothing else."""
    _check_private_dir(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"hub: {path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(_LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _owner_pidfd() -> int | None:
    """A pidfd of our parent (the process that asked for the hub), or None if already gone."""
    parent = os.getppid()
    try:
        fd = os.pidfd_open(parent)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise
    if os.getppid() != parent:  # it exited between the two calls: the pid may be reused
        os.close(fd)
        return None
    return fd


def _daemonize(log: Path) -> None:
    """Fork; the parent prints the child's pid and exits, the child detaches from the caller."""
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--foreground", action="store_true")
    args = parser.parse_args(argv)
    listener = _listen(args.socket)
    owner = _owner_pidfd()
    if not args.foreground:
        _daemonize(args.log)
    hub = Hub(listener, args.record, args.token, owner)
    print(f"hub {os.getpid()}: serving {args.socket}", flush=True)
    reason = hub.run()
    print(f"hub {os.getpid()}: exiting, {reason} ({hub.dropped} frames dropped)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
