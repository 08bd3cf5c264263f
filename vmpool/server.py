"""The lease server: the controller serves its pool's check-outs and check-ins over a Unix socket.

Clients (xdist workers) send lease operations (vmpool.ops) as JSON lines to ``<pool>.sock`` in
the state directory. The server applies every operation that arrived meanwhile in **one**
transaction of the controller's store, a vmpool.writeback.WriteBackStore (the record in memory
under the pool's lock, written back a few times a second at most), then answers each. That is
what lets eight processes check machines out and in within milliseconds: with a file
transaction per operation (lock, read, parse, write, fsync, rename) they queue behind one
another.

The file stays the record: the write-back store lets the lock go only with the file current, so
the CLI, the reaper and clients without a server (no socket, or a stale one) work on it directly
and safely."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from pydantic import ValidationError

from vmpool import _wire
from vmpool.errors import StateError
from vmpool.ops import OP_ADAPTER, AnyStep
from vmpool.state import JsonStore

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 20
#: what a request sent without a wait (never answered) is marked with once applied
_APPLIED = _wire.ok_line(b"null")


class _Retry(Exception):
    """An operation raised inside the batch: redo the batch without it."""


@dataclass
class ServerStats:
    batches: int = 0
    ops: int = 0
    largest_batch: int = 0
    #: CPU time the serving thread spent committing batches (decoding, deciding, replying)
    cpu_s: float = 0.0


class LeaseServer:
    """Serve one pool's lease operations until stop(); start() is False when it cannot listen."""

    def __init__(self, store: JsonStore) -> None:
        """``store``: the pool's store in this process, best a vmpool.writeback.WriteBackStore."""
        self.store = store
        self.path = store.socket_path
        self.stats = ServerStats()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._stopping = False

    def start(self) -> bool:
        if self._claim_path():
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                old = os.umask(0o177)  # the socket is 0600 from birth, in a 0700 directory
                try:
                    with _wire.reachable(self.path) as where:
                        listener.bind(where)
                finally:
                    os.umask(old)
                listener.listen(64)
                listener.setblocking(False)
            except OSError as exc:
                listener.close()
                log.warning("no lease server at %s (%s); clients use the file", self.path, exc)
                return False
            self._listener = listener
            self._thread = threading.Thread(
                target=self._serve, name=f"vmpool-lease-{self.store.pool_id}", daemon=True
            )
            self._thread.start()
            return True
        return False

    def _claim_path(self) -> bool:
        """Remove a stale socket left by a dead server; False if a live one answers there."""
        if not os.path.lexists(self.path):
            return True
        if not _wire.answers(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        log.warning("a lease server already answers at %s; not starting another", self.path)
        return False

    def stop(self) -> None:
        """Finish the batch in hand, close every connection and remove the socket."""
        if self._thread is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        self._thread.join(10)
        self._thread = None

    # -- the serving thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        buffers: dict[socket.socket, bytes] = {}
        try:
            while not self._stopping:
                batch: list[tuple[socket.socket, bytes]] = []
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept(sel, buffers)
                    elif key.data == "conn":
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        self._read(sel, conn, buffers, batch)
                if batch:
                    started = time.thread_time()
                    self._commit(batch, sel, buffers)
                    self.stats.cpu_s += time.thread_time() - started
        except Exception:  # never die silently: clients fall back to the file once it is gone
            log.exception("lease server for %s failed", self.store.pool_id)
        finally:
            for conn in list(buffers):
                self._drop(sel, conn, buffers)
            sel.close()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._stop_r.close()
            self._stop_w.close()

    def _accept(self, sel: selectors.BaseSelector, buffers: dict[socket.socket, bytes]) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, "conn")
            buffers[conn] = b""

    def _read(
        self,
        sel: selectors.BaseSelector,
        conn: socket.socket,
        buffers: dict[socket.socket, bytes],
        batch: list[tuple[socket.socket, bytes]],
    ) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sel, conn, buffers)
            return
        data = buffers[conn] + chunk
        *lines, rest = data.split(b"\n")
        if len(rest) > _MAX_LINE:
            self._drop(sel, conn, buffers)
            return
        buffers[conn] = rest
        batch.extend((conn, line) for line in lines if line)

    @staticmethod
    def _drop(
        sel: selectors.BaseSelector, conn: socket.socket, buffers: dict[socket.socket, bytes]
    ) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        buffers.pop(conn, None)
        conn.close()

    def _commit(
        self,
        batch: list[tuple[socket.socket, bytes]],
        sel: selectors.BaseSelector,
        buffers: dict[socket.socket, bytes],
    ) -> None:
        replies: list[bytes | None] = [None] * len(batch)
        ops: dict[int, AnyStep] = {}
        quiet = set()  # requests whose client does not wait for the reply
        for i, (_, line) in enumerate(batch):
            if line.startswith(_wire.NO_REPLY):
                quiet.add(i)
                line = line[len(_wire.NO_REPLY) :]
            try:
                ops[i] = OP_ADAPTER.validate_json(line)
            except ValidationError as exc:
                replies[i] = _wire.error_line(f"not a lease operation: {exc.errors()[0]['msg']}")
        failed: set[int] = set()
        while True:
            done: dict[int, bytes] = {}
            try:
                with self.store.batch() as pool:
                    for i, op in ops.items():
                        if i in failed:
                            continue
                        try:
                            # a reply nobody waits for is not serialised, only marked applied
                            if i in quiet:
                                op.apply_quietly(pool)
                                done[i] = _APPLIED
                            else:
                                done[i] = _wire.ok_line(op.apply_json(pool))
                        except Exception as exc:
                            # the record may be half-changed: drop the whole transaction and
                            # redo the others without this one
                            log.exception("lease operation failed: %s", op)
                            failed.add(i)
                            replies[i] = _wire.error_line(f"{type(exc).__name__}: {exc}")
                            raise _Retry from exc
            except _Retry:
                continue
            except StateError as exc:
                for i in ops:
                    if i not in failed:
                        replies[i] = _wire.error_line(str(exc))
            else:
                for i, line in done.items():
                    replies[i] = line
            break
        self.stats.batches += 1
        self.stats.ops += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for i, ((conn, _), answer) in enumerate(zip(batch, replies, strict=True)):
            assert answer is not None
            if i in quiet:
                if not _wire.is_ok(answer):
                    log.warning("lease operation sent without a wait failed: %s", answer.decode())
                continue
            try:
                conn.sendall(answer)
            except (BlockingIOError, OSError):  # a client that does not read its replies
                self._drop(sel, conn, buffers)
