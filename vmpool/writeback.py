"""The pool owner's store: it keeps the lock and the record in memory while busy, and writes back.

The controller's process makes most of a pool's transactions: its own (warm-up, replacement,
reclaim) and, through the lease server (vmpool.server), every worker's check-out and check-in.
As file transactions (lock, read, parse, change, write, fsync, rename: about 1 ms each here) eight
busy workers queue behind one another. This store takes the pool's lock once and keeps it while
transactions keep coming. Each transaction changes the record in memory; it begins by taking
the record's JSON image (about 0.1 ms for 64 machines), which rolls back a transaction that
raises and is also what the next write-back writes. A background thread writes the image back
atomically (temp file, fsync, rename) ``flush_delay`` seconds after a change, and no sooner than
``write_interval`` seconds after the last write: one write for many transactions, 4 a second
under a steady stream of check-outs, not hundreds. This is the crash snapshot: the lease server
(vmpool.server) is the record's only writer while its controller lives, and the file lags it by
at most ``write_interval`` plus one write.

The lock is let go only when the file is current: after ``idle_release`` seconds without a
transaction, or, when another process is blocked on it, at most ``max_hold`` seconds after it was
taken (then a short pause lets that process in). So the
CLI, a reaper, or a client without a server always read-modify-write a current file.

What this gives up: a transaction is acknowledged up to ``write_interval`` (plus one write)
before it is on disk. If the controller's process dies in that window, its last grants are
missing from the file; a pool whose owner is dead therefore serves no more check-outs
(vmpool.leases.unavailable) and is reaped as a whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from vmpool.errors import StateError
from vmpool.state import JsonStateDir, JsonStore, Operation, Pool

log = logging.getLogger(__name__)

#: after a forced release (max_hold), wait this long before taking the lock again
_COOLDOWN = 0.002
#: after a failed write, try again this much later
_RETRY_WRITE = 0.1


class WriteBackStore(JsonStore):
    """A JsonStore for the pool's owner: in-memory transactions, the file written back."""

    def __init__(
        self,
        directory: JsonStateDir,
        pool_id: str,
        *,
        flush_delay: float = 0.002,
        write_interval: float = 0.25,
        idle_release: float = 0.005,
        max_hold: float = 0.1,
    ) -> None:
        super().__init__(directory, pool_id)
        self.flush_delay = flush_delay
        self.write_interval = write_interval
        self.idle_release = idle_release
        self.max_hold = max_hold
        self._cond = threading.Condition()
        self._fh: IO[str] | None = None  # the pool's lock, while held
        self._pool: Pool | None = None  # the record, current while the lock is held
        self._image = b""  # the record as last dumped (current unless _dirty)
        self._dirty = False  # the record changed since it was last dumped to _image
        self._on_disk = b""  # what the file holds (last read or written by us)
        self._held_since = 0.0
        self._lock_mtime = 0  # the lock file's mtime when taken: a waiter changes it
        self._last_change = 0.0
        self._last_write = 0.0  # when the last write-back began
        self._cooldown_until = 0.0
        self._closed = False
        #: why the last write-back failed (a full disk): transactions fail with it until one
        #: succeeds, rather than pile up in memory a record that cannot reach the file
        self._failed: StateError | None = None
        self._writing = False  # a write-back is in progress outside the mutex
        self._listeners: list[Callable[[], None]] = []
        #: the JSON of the operations apply() made since _image was dumped, in order (what
        #: rebuilds the record)
        self._applied: list[bytes] = []
        self._unlogged = False  # a transaction() changed the record since _image was dumped
        self._nap = threading.Event()  # set on close: a sleep that tests' patched time.sleep spares
        #: how many times the record was written back (for benchmarks and tests)
        self.writes = 0
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"vmpool-writeback-{pool_id}", daemon=True
        )
        self._flusher.start()

    # -- StateStore ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Pool]:
        with self._cond:
            if self._closed:
                with super().transaction() as pool:
                    yield pool
                return
            if self._failed is not None:
                raise StateError(str(self._failed))
            pool = self._hold()
            before = self._dump()  # the rollback image; also what a write-back needs next
            try:
                yield pool
            except BaseException:
                self._pool = self._parse(before)  # roll back to the record as it was
                raise
            self._dirty = True  # a transaction that changed nothing is found out at the write
            self._unlogged = True  # its changes are neither in _image nor in _applied
            self._last_change = time.monotonic()
            self._cond.notify_all()
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    def apply(
        self,
        ops: Sequence[tuple[Operation[Any], bytes]],
        parse: Callable[[bytes], Operation[Any]],
    ) -> list[Any]:
        """Apply the lease server's batch in one transaction, each operation alone: the reply
        of each, or the exception it raised. Each comes with the JSON it was read from, and
        ``parse`` reads it again. One that raises is undone without an image of its own: the
        record is rebuilt from the last image and the operations applied since, parsed again
        from their JSON (they carry their clock readings, so they replay to the same record).
        That spares a dump of the record (about 0.1 ms for 64 machines) per batch; and the
        log holds bytes, not models: a quarter-second of operations kept alive as objects
        (thousands of them) made the cyclic collector run hundreds of times a second in the
        server's process, with pauses of up to 2 ms."""
        with self._cond:
            if self._closed or self._failed is not None:
                return [self._apply_alone(op) for op, _ in ops]
            pool = self._hold()
            if self._unlogged:  # what replay starts from must hold every change so far
                self._dump()
            out: list[Any] = []
            for op, line in ops:
                try:
                    out.append(op.apply(pool))
                except Exception as exc:
                    log.exception("pool %s: lease operation failed: %s", self.pool_id, op)
                    out.append(exc)
                    pool = self._pool = self._replayed(parse)
                else:
                    self._applied.append(line)
            self._dirty = True
            self._last_change = time.monotonic()
            self._cond.notify_all()
            listeners = list(self._listeners)
        for notify in listeners:
            notify()
        return out

    def _apply_alone(self, op: Operation[Any]) -> Any:
        try:
            with self.transaction() as pool:
                return op.apply(pool)
        except Exception as exc:
            return exc

    def _replayed(self, parse: Callable[[bytes], Operation[Any]]) -> Pool:
        pool = self._parse(self._image)
        for line in self._applied:
            parse(line).apply(pool)
        return pool

    def on_change(self, notify: Callable[[], None]) -> None:
        """Call ``notify`` (in the committing thread, after the commit) whenever a transaction
        ends: the lease server answers waiting check-outs that a controller transaction
        served."""
        self._listeners.append(notify)

    def read(self) -> Pool | None:
        with self._cond:
            if self._fh is not None:
                return self._parse(self._dump())
        return super().read()

    def read_current(self) -> Pool | None:
        return self.read()

    def remove(self) -> None:
        with self._cond:
            while self._writing:  # or its rename would bring the file back
                self._cond.wait()
            if self._fh is None:
                super().remove()
                return
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._on_disk = self._image = b""
            self._dirty = False
            self._applied.clear()
            self._pool = None
            self._let_go()

    def close(self) -> None:
        """Write back what is pending, let the lock go, and stop the writer thread. Later
        transactions are plain file transactions."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._nap.set()  # a write-back waiting out write_interval: what is pending is written here
        self._flusher.join(30)
        with self._cond:
            if self._fh is not None:
                if self._dump() != self._on_disk:
                    try:
                        self._write(self._image)
                    except StateError as exc:  # the file keeps its last state; gc reads it
                        log.error(
                            "pool %s: closing without its last changes: %s", self.pool_id, exc
                        )
                    else:
                        self._on_disk = self._image
                        self.writes += 1
                self._let_go()

    # -- the lock and the image ------------------------------------------------------------------
    def _hold(self) -> Pool:
        """Take the lock and load the record if not already held (caller holds _cond)."""
        if self._fh is not None and self._pool is not None:
            return self._pool
        pause = self._cooldown_until - time.monotonic()
        if pause > 0:
            self._nap.wait(pause)
        fh = self._acquire()
        try:
            raw = self._read_raw()
            if raw is None:
                raise StateError(f"pool {self.pool_id} does not exist in {self.dir.path}")
            if self._pool is None or raw != self._on_disk:
                self._pool = self._parse(raw)
        except BaseException:
            self._release(fh)
            raise
        self._fh = fh
        self._lock_mtime = os.fstat(fh.fileno()).st_mtime_ns
        self._image = self._on_disk = raw
        self._dirty = False
        self._applied.clear()
        self._held_since = self._last_change = time.monotonic()
        self._cond.notify_all()
        return self._pool

    def _dump(self) -> bytes:
        """The record as JSON as of now (caller holds _cond and the lock)."""
        if self._dirty and self._pool is not None:
            self._image = self._pool.model_dump_json().encode()
            self._dirty = False
            self._applied.clear()  # the image holds them now
            self._unlogged = False
        return self._image

    def _let_go(self, *, pause: bool = False) -> None:
        """Release the lock; the file must be current (caller holds _cond)."""
        if self._fh is not None:
            self._release(self._fh)
            self._fh = None
        if pause:
            self._cooldown_until = time.monotonic() + _COOLDOWN

    def _flush_loop(self) -> None:
        while not self._closed:
            try:
                self._flush_once()
            except Exception:  # keep writing back whatever happens; never hold the lock forever
                log.exception("pool %s: write-back failed", self.pool_id)
                self._nap.wait(_RETRY_WRITE)

    def _flush_once(self) -> None:
        """One round: wait for a change (letting the lock go when idle), then write it back."""
        with self._cond:
            if self._closed:
                return
            if self._fh is None:
                self._cond.wait()
                return
            now = time.monotonic()
            if not self._dirty and self._image == self._on_disk:
                idle = now - self._last_change >= self.idle_release
                if idle or (self._held_too_long(now) and self._someone_waits()):
                    self._let_go(pause=not idle)
                else:
                    self._cond.wait(
                        min(self._last_change + self.idle_release, self._held_since + self.max_hold)
                        - now
                    )
                return
            delay = max(self.flush_delay, self._last_write + self.write_interval - now)
        self._nap.wait(delay)  # let more transactions join this write
        with self._cond:
            if self._fh is None or self._closed:
                return
            image = self._dump()
            if image == self._on_disk:  # changed and changed back: nothing to write
                return
            if self._held_too_long(time.monotonic()) and self._someone_waits():
                # another process waits for the lock: write under the mutex and let it in
                if self._write_back(image):
                    self._let_go(pause=True)
                return
            self._writing = True
        # the usual case: write outside the mutex while transactions go on in memory; nobody
        # else can write the file meanwhile, the lock is still ours
        try:
            self._write_back(image)
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _someone_waits(self) -> bool:
        """A process blocked on the lock has announced itself (vmpool._lock.announce_waiting)."""
        assert self._fh is not None
        try:
            return os.fstat(self._fh.fileno()).st_mtime_ns != self._lock_mtime
        except OSError:
            return True

    def _held_too_long(self, now: float) -> bool:
        """Held ``max_hold`` seconds; the clock restarts when nobody turns out to be waiting."""
        if now - self._held_since < self.max_hold:
            return False
        self._held_since = now
        return True

    def _write_back(self, image: bytes) -> bool:
        self._last_write = time.monotonic()
        try:
            self._write(image)
        except StateError as exc:
            with self._cond:
                if self._failed is None or str(self._failed) != str(exc):
                    log.error("pool %s: %s; retrying", self.pool_id, exc)
                self._failed = exc
            self._nap.wait(_RETRY_WRITE)
            return False
        with self._cond:
            if self._failed is not None:
                log.warning("pool %s: written back again", self.pool_id)
            self._failed = None
            self._on_disk = image
            self.writes += 1
        return True
