"""The file locks: an exclusive lock on a lock file of its own (never the data file), with
a timeout and an error naming the file. ``file_lock`` is re-entrant within a process (as
filelock's is) and belongs to a thread; ``hold``/``let_go`` is the pool record's lock, which its
owner keeps across threads and which waiters announce themselves on.

The lock file is 0600 (tightened if an older vmpool made it looser) and never followed
through a symlink. Within a process the lock belongs to one thread at a time: the thread
that holds it may take it again (nested ``with``), others wait for it as another process
would, within the same timeout. The kernel lock (flock) is taken once per process and path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import portalocker

from vmpool._files import private_opener
from vmpool.errors import LockTimeout, VmPoolError

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class _Held:
    """One lock file as this process holds it."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()  # which thread of this process has it; re-entrant
        self.lock: portalocker.Lock | None = None  # the kernel lock, while depth > 0
        self.depth = 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _forget_in_child() -> None:
    """A forked child holds none of its parent's locks (flock is per open file description,
    and the child must not think a parent thread's lock is its own)."""
    global _held_guard
    _held.clear()
    _held_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _opener(path: str, flags: int) -> int:
    return private_opener(path, flags | _OPEN_FLAGS)


@contextlib.contextmanager
def file_lock(
    path: Path,
    *,
    timeout: float,
    holder: str = "another process",
    error: Callable[[str], VmPoolError] = LockTimeout,
    check_interval: float = 0.01,
) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the ``with`` block.

    Raises ``error`` ("<holder> holds <path> for over <timeout>s"; LockTimeout by default)
    when it stays held elsewhere past ``timeout`` seconds; an OSError opening the file
    propagates.
    """
    key = os.path.abspath(path)
    with _held_guard:
        held = _held.setdefault(key, _Held())
    deadline = time.monotonic() + timeout
    message = f"{holder} holds {key} for over {timeout:g}s"
    if not held.mutex.acquire(timeout=max(timeout, 0.0)):
        raise error(message)  # another thread of this process has it
    try:
        if held.depth == 0:
            lock = portalocker.Lock(
                key,
                mode="a",
                timeout=max(deadline - time.monotonic(), 0.0),
                check_interval=check_interval,
                opener=_opener,
            )
            try:
                lock.acquire()
            except portalocker.exceptions.AlreadyLocked:
                raise error(message) from None
            held.lock = lock
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.lock is not None:
                held.lock.release()
                held.lock = None
    finally:
        held.mutex.release()


# -- an owner's lock, held across threads (the pool record's) ---------------------------------
#: a process waiting for a lock re-announces itself this often (see announce_waiting)
_ANNOUNCE_EVERY = 0.05


def hold(path: Path, timeout: float) -> IO[str]:
    """An owner's lock on ``path``, not tied to a thread (vmpool.writeback takes it in one
    thread and lets it go in another): the open lock file, to give to let_go(). LockTimeout if
    taking it takes over ``timeout`` seconds; meanwhile the waiter announces itself
    (announce_waiting), so an owner that keeps the lock while busy lets it go soon.

    A busy lock is waited for in the kernel (in a helper thread, so the wait can time out),
    not by polling: on a contended pool, pollers burn the CPU the holder needs, wake up late
    (portalocker sleeps >= 1 ms between attempts) and barge past longer waiters, which is what
    made the check-out tail latency ~3x worse (bench/checkout_latency.py).
    """
    fh = open(path, "a", opener=private_opener)  # noqa: SIM115 - closed by caller or waiter
    try:
        portalocker.lock(fh, portalocker.LOCK_EX | portalocker.LOCK_NB)
    except portalocker.LockException:
        announce_waiting(fh)
        return _Waiter(fh).wait(timeout)
    except BaseException:
        fh.close()
        raise
    return fh


def announce_waiting(fh: IO[str]) -> None:
    """Tell the holder of a lock that someone waits: the lock file's mtime changes (its
    contents are never used). An owner that keeps the lock (vmpool.writeback) watches it."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(fh.fileno(), ns=(now, now))


class _Waiter:
    """A thread blocked on a lock for a caller that may give up (timeout, interrupt)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.done = threading.Event()
        self.guard = threading.Lock()
        self.abandoned = False
        self.error: BaseException | None = None
        threading.Thread(target=self._run, name="vmpool-lock-wait", daemon=True).start()

    def _run(self) -> None:
        try:
            portalocker.lock(self.fh, portalocker.LOCK_EX)
        except BaseException as exc:
            self.error = exc
        with self.guard:
            if not self.abandoned:
                self.done.set()
                return
        # the caller gave up: let go at once
        if self.error is None:
            portalocker.unlock(self.fh)
        self.fh.close()

    def wait(self, timeout: float) -> IO[str]:
        interrupted: BaseException | None = None
        deadline = time.monotonic() + timeout
        try:
            # announce again now and then: a holder that let go and took the lock back before
            # this waiter ran has not seen the first announcement
            while not self.done.wait(min(_ANNOUNCE_EVERY, max(deadline - time.monotonic(), 0))):
                if time.monotonic() >= deadline:
                    break
                announce_waiting(self.fh)
        except BaseException as exc:  # e.g. KeyboardInterrupt: never leave the lock held
            interrupted = exc
        with self.guard:
            got = self.done.is_set()
            self.abandoned = not got  # then the thread lets go as soon as it gets the lock
        if got and (interrupted is not None or self.error is not None):
            if self.error is None:
                portalocker.unlock(self.fh)
            self.fh.close()
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error
        if not got:
            raise LockTimeout(f"{self.fh.name}: still locked after {timeout:g}s")
        return self.fh


def let_go(fh: IO[str]) -> None:
    """Give back a lock taken with hold()."""
    try:
        portalocker.unlock(fh)
    finally:
        fh.close()
