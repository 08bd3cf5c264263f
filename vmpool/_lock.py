"""The one file lock: an exclusive lock on a lock file of its own (never the data file), with
a timeout and an error naming the file, re-entrant within a process (as filelock's is).

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
