"""The lease server: while its controller lives, the pool record's only writer.

Clients (xdist workers, the CLI) send lease operations (vmpool.ops) as JSON lines to
``<pool>.sock`` in the state directory, or hand them over in this process (``submit``; see
vmpool.transport). The server applies every operation that arrived meanwhile in **one**
transaction of the controller's store, a vmpool.writeback.WriteBackStore (the record in memory
under the pool's lock, the file a crash snapshot written back a few times a second), then
answers each.

It owns the line, so nothing polls it:
- a check-out that cannot be served at once waits in the line and is answered the moment a
  check-in, a reset or a new machine serves it (every commit, the server's own or the
  controller's, looks at the waiting requests), or when its ``wait`` runs out;
- a connection that closes (its process exited or was killed) gives up at once what the
  processes that spoke through it held: their waiting requests leave the line and their
  leases are reclaimed under the failure policy, as pytest-xdist turns a closed channel into
  ``errordown``. The process table (psutil) is asked only about holders without a connection.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from vmpool import _wire, leases
from vmpool.errors import StateError
from vmpool.ops import (
    OP_ADAPTER,
    Cancel,
    CheckinReply,
    CheckoutReply,
    CheckoutStep,
    ResetDone,
    ReturnUnhealthy,
    Step,
    holder_of,
)
from vmpool.ownership import ProcessRef
from vmpool.writeback import WriteBackStore

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 20
#: servers running in this process (see _freeze)
_running = 0
_running_lock = threading.Lock()
#: the longest the serving thread sleeps with nothing to do (it wakes on every event anyway)
_IDLE = 1.0


@dataclass
class ServerStats:
    batches: int = 0
    ops: int = 0
    largest_batch: int = 0
    #: requests received, by operation kind (a waiting check-out is one request)
    requests: dict[str, int] = field(default_factory=dict)
    #: leases and waits given up because their connection closed
    reclaimed_on_close: int = 0
    #: CPU time the serving thread spent committing batches (decoding, deciding, replying)
    cpu_s: float = 0.0


class _Peer:
    """One client: a connection, or one in-process request; where its replies go, and which
    processes spoke through it (what its closing gives up)."""

    def __init__(self, conn: socket.socket | None = None) -> None:
        self.conn = conn
        self.buffer = b""
        self.holders: list[ProcessRef] = []
        self.future: Future[bytes | _wire.Failure] | None = None

    def speaks_for(self, ref: ProcessRef) -> bool:
        return any(h.same_process(ref) for h in self.holders)

    def answer(self, line: bytes) -> bool:
        """Send one reply line; False when the client cannot take it."""
        if self.future is not None:
            if line.startswith(b'{"ok":'):
                self.future.set_result(line[len(b'{"ok":') : -2])
            else:
                self.future.set_result(_wire.Failure(line.decode(errors="replace")))
            return True
        assert self.conn is not None
        try:
            self.conn.sendall(line)
        except OSError:  # BlockingIOError included: a client that does not read its replies
            return False
        return True


@dataclass
class _Waiting:
    """A check-out in the line, answered once granted, refused or out of time."""

    peer: _Peer
    op: CheckoutStep
    started: float  # monotonic
    deadline: float  # monotonic


def _leaves_work(op: Step, result: object) -> bool:
    """Whether ``op`` left the controller something to do (a replacement, a background
    reset)."""
    if isinstance(op, ReturnUnhealthy):
        return bool(op.bad)
    if isinstance(result, CheckinReply):
        return any(
            action == "replace" or (action == "reset" and name not in result.mine)
            for name, action in result.actions.items()
        )
    return isinstance(op, ResetDone) and not op.ok


def _reply(model: BaseModel) -> bytes:
    return _wire.ok_line(model.model_dump_json().encode())


def _freeze(starting: bool) -> None:
    """While a server runs, what its process held when it started (modules, pytest's items, the
    config) is out of the cyclic collector's reach (gc.freeze): a full collection stops every
    thread, and it walks every tracked object (38k of them in a bare session: 13-17 ms here,
    each time stalling every check-out in flight). Frozen objects that become garbage are
    freed by reference counting as ever; only cycles among them wait for the unfreeze, at the
    last server's stop."""
    global _running
    with _running_lock:
        _running += 1 if starting else -1
        if starting and _running == 1:
            gc.freeze()
        elif not starting and _running == 0:
            gc.unfreeze()


class LeaseServer:
    """Serve one pool's lease operations until stop(); start() is False when it cannot listen."""

    def __init__(
        self,
        store: WriteBackStore,
        policy: leases.Policy,
        *,
        clock: Callable[[], float] = time.time,
        on_work: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_work``: called when an operation left the controller work (a machine to
        replace, or to reset in the background), so it starts at once rather than at its next
        tick."""
        self.store = store
        self.policy = policy
        self.clock = clock
        self._on_work = on_work
        self.path = store.socket_path
        self.stats = ServerStats()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._inbox: list[tuple[_Peer, bytes]] = []  # in-process requests (submit)
        self._inbox_lock = threading.Lock()
        self._served = False  # the serving thread has ended: submit() answers at once
        self._peers: dict[socket.socket, _Peer] = {}
        self._waiting: dict[str, _Waiting] = {}
        #: the processes with an open connection (read by the controller's reclaim)
        self.connected: tuple[ProcessRef, ...] = ()
        store.on_change(self._changed)

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> bool:
        if not self._claim_path():
            return False
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
        _freeze(True)
        return True

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
        """Finish the batch in hand, refuse what waits, close every connection, remove the
        socket."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(10)
        self._thread = None
        _freeze(False)

    def submit(self, line: bytes) -> Future[bytes | _wire.Failure]:
        """Hand a request line over in this process (vmpool.transport.LocalTransport)."""
        peer = _Peer()
        peer.future = Future()
        with self._inbox_lock:
            if self._thread is None or self._served:
                peer.future.set_result(_wire.Failure("the lease server is not running"))
                return peer.future
            self._inbox.append((peer, line))
        self._wake()
        return peer.future

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"x")

    def _changed(self) -> None:
        # a commit of the controller's may have served a waiting request; the server's own
        # commits are followed by that look anyway
        if self._waiting and threading.current_thread() is not self._thread:
            self._wake()

    # -- the serving thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stopping:
                batch: list[tuple[_Peer, bytes]] = []
                closed: list[_Peer] = []
                for key, _ in sel.select(timeout=self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        with self._inbox_lock:
                            batch.extend(self._inbox)
                            self._inbox.clear()
                    else:
                        peer = self._peers[key.fileobj]  # type: ignore[index]
                        if not self._read(peer, batch):
                            closed.append(peer)
                started = time.thread_time()
                if batch:
                    self._commit(batch)
                for peer in closed:
                    self._close(sel, peer)
                if self._waiting:
                    self._look_at_waiting()
                self.stats.cpu_s += time.thread_time() - started
        except Exception:  # never die silently: clients see their connection close
            log.exception("lease server for %s failed", self.store.pool_id)
        finally:
            self._refuse_waiting(f"pool {self.store.pool_id}: its lease server stopped")
            for peer in list(self._peers.values()):
                assert peer.conn is not None
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(peer.conn)
                peer.conn.close()
            self._peers.clear()
            sel.close()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            with self._inbox_lock:
                self._served = True
                for peer, _ in self._inbox:
                    peer.answer(_wire.error_line("the lease server stopped"))
                self._inbox.clear()

    def _timeout(self) -> float:
        if not self._waiting:
            return _IDLE
        first = min(w.deadline for w in self._waiting.values())
        return min(_IDLE, max(first - time.monotonic(), 0.0))

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, None)
            self._peers[conn] = _Peer(conn)

    def _read(self, peer: _Peer, batch: list[tuple[_Peer, bytes]]) -> bool:
        """Take the whole lines that arrived; False when the connection closed."""
        assert peer.conn is not None
        try:
            chunk = peer.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            chunk = b""
        if not chunk:
            return False
        *lines, rest = (peer.buffer + chunk).split(b"\n")
        if len(rest) > _MAX_LINE:
            return False
        peer.buffer = rest
        batch.extend((peer, line) for line in lines if line)
        return True

    # -- operations ------------------------------------------------------------------------------
    def _commit(self, batch: list[tuple[_Peer, bytes]]) -> None:
        replies: list[bytes | None] = [None] * len(batch)
        ops: dict[int, Step] = {}
        for i, (peer, line) in enumerate(batch):
            try:
                op = OP_ADAPTER.validate_json(line)
            except ValidationError as exc:
                replies[i] = _wire.error_line(f"not a lease operation: {exc.errors()[0]['msg']}")
                continue
            ops[i] = op
            self.stats.requests[op.kind] = self.stats.requests.get(op.kind, 0) + 1
            holder = holder_of(op)
            if holder is not None and peer.conn is not None and not peer.speaks_for(holder):
                peer.holders.append(holder)
                self._update_connected()
        self._withdraw({peer for peer, _ in batch})
        order = list(ops)
        last = {peer: i for i, (peer, _) in enumerate(batch)}
        try:
            results = self.store.apply([(ops[i], batch[i][1]) for i in order],
                                       OP_ADAPTER.validate_json)
        except StateError as exc:  # the record cannot be had (a full disk, a removed pool)
            results = [exc] * len(order)
        withdrawn: list[tuple[str, _Waiting]] = []
        for i, result in zip(order, results, strict=True):
            op = ops[i]
            if isinstance(result, BaseException):
                text = str(result) if isinstance(result, StateError) else (
                    f"{type(result).__name__}: {result}"
                )
                replies[i] = _wire.error_line(text)
            elif (
                isinstance(op, CheckoutStep)
                and isinstance(result, CheckoutReply)
                and not result.final
                and op.wait > 0
            ):
                started = time.monotonic()
                waiting = _Waiting(batch[i][0], op, started, started + op.wait)
                if last[waiting.peer] > i:
                    # its client sent more after it (an interrupted wait, then its Cancel):
                    # withdrawn now, or its answer would come after the later ones
                    withdrawn.append((op.request.id, waiting))
                    replies[i] = _reply(CheckoutReply(problem="withdrawn by the client"))
                else:
                    self._waiting[op.request.id] = waiting
            else:
                replies[i] = _reply(result)
        if withdrawn:
            self._give_up(withdrawn)
        if any(_leaves_work(op, result) for op, result in zip(
            (ops[i] for i in order), results, strict=True
        )):
            self._on_work()
        self.stats.batches += 1
        self.stats.ops += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for (peer, _), reply in zip(batch, replies, strict=True):
            if reply is not None and not peer.answer(reply) and peer.conn is not None:
                with contextlib.suppress(OSError):  # seen as closed at the next select
                    peer.conn.shutdown(socket.SHUT_RDWR)

    def _withdraw(self, peers: set[_Peer]) -> None:
        """A new request from a client ends its wait: it gave up on it (an interrupted call;
        its Cancel follows). The request leaves the line, what it was granted goes back, and
        the wait is answered first, so the client's replies stay in order."""
        ended = [(rid, w) for rid, w in self._waiting.items() if w.peer in peers]
        if not ended:
            return
        for rid, _ in ended:
            del self._waiting[rid]
        self._give_up(ended)
        for _, w in ended:
            w.peer.answer(_reply(CheckoutReply(problem="withdrawn by the client")))

    def _give_up(self, ended: list[tuple[str, _Waiting]]) -> None:
        try:
            with self.store.transaction() as pool:
                now = self.clock()
                for rid, w in ended:
                    Cancel(request=rid, holder=w.op.request.holder, now=now).apply(pool)
        except StateError as exc:
            log.warning("pool %s: cannot withdraw waiting check-outs: %s",
                        self.store.pool_id, exc)

    def _look_at_waiting(self) -> None:
        """Answer the waiting check-outs that were served, refused or ran out of time."""
        answers: list[tuple[_Peer, bytes]] = []
        try:
            with self.store.transaction() as pool:
                now, mono = self.clock(), time.monotonic()
                leases.serve_queue(pool, now)
                for rid, w in list(self._waiting.items()):
                    reply = w.op.look(now).apply(pool)
                    if not reply.final and mono >= w.deadline:
                        reply = w.op.expire(pool, mono - w.started, now)
                    if reply.final:
                        del self._waiting[rid]
                        answers.append((w.peer, _reply(reply)))
        except StateError as exc:
            self._refuse_waiting(str(exc))
            return
        for peer, line in answers:
            peer.answer(line)

    def _refuse_waiting(self, why: str) -> None:
        for w in self._waiting.values():
            w.peer.answer(_wire.error_line(why))
        self._waiting.clear()

    def _close(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        """The connection closed: its waits and leases are given up at once."""
        assert peer.conn is not None
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(peer.conn)
        self._peers.pop(peer.conn, None)
        peer.conn.close()
        ended = [(rid, w) for rid, w in self._waiting.items() if w.peer is peer]
        for rid, _ in ended:
            del self._waiting[rid]
        self._give_up(ended)
        # a process still connected another way keeps what it holds
        gone = [h for h in peer.holders
                if not any(p.speaks_for(h) for p in self._peers.values())]
        if not gone:
            return
        try:
            with self.store.transaction() as pool:
                taken = leases.reclaim(
                    pool, self.policy,
                    lambda ref: not any(ref.same_process(h) for h in gone), self.clock(),
                )
        except StateError as exc:
            log.warning("pool %s: cannot reclaim what a closed connection held: %s",
                        self.store.pool_id, exc)
            return
        finally:
            self._update_connected()
        if taken:
            self._on_work()
            self.stats.reclaimed_on_close += len(taken)
            log.warning("reclaimed %s: their holder's connection closed", taken)

    def _update_connected(self) -> None:
        self.connected = tuple(h for p in self._peers.values() for h in p.holders)
