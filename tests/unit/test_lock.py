"""vmpool._lock.file_lock: one holder at a time across processes and threads, re-entrant for
the thread that holds it, a clear error at the timeout, a 0600 lock file never followed."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpool._lock import file_lock
from vmpool.errors import BackendError, LockTimeout, StateError

_HOLDER = """
import sys, portalocker
fh = open(sys.argv[1], "a")
portalocker.lock(fh, portalocker.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def held_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A lock file another process holds until the test ends."""
    path = tmp_path / "x.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield path
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _taken_elsewhere(path: Path) -> bool:
    """Whether another process can take the lock right now (it exits at once either way)."""
    probe = (
        "import sys, portalocker\n"
        "try:\n"
        "    portalocker.lock(open(sys.argv[1], 'a'), portalocker.LOCK_EX | portalocker.LOCK_NB)\n"
        "except portalocker.LockException:\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], timeout=30, check=False)
    return done.returncode == 0


def test_the_lock_file_is_private_and_beside_the_data(tmp_path: Path) -> None:
    with file_lock(tmp_path / "data.lock", timeout=1):
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "data.lock").st_mode) == 0o600


def test_another_process_cannot_take_it_while_held(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with file_lock(path, timeout=1):
        assert not _taken_elsewhere(path)
    assert _taken_elsewhere(path)


def test_held_elsewhere_past_the_timeout_raises_naming_the_file(held_elsewhere: Path) -> None:
    started = time.monotonic()
    expected = re.escape(f"another process holds {held_elsewhere} for over 0.2s")
    with pytest.raises(LockTimeout, match=expected), file_lock(held_elsewhere, timeout=0.2):
        pass
    assert 0.2 <= time.monotonic() - started < 5
    assert issubclass(LockTimeout, StateError)


def test_a_caller_chooses_the_error_and_names_the_holder(held_elsewhere: Path) -> None:
    with (
        pytest.raises(BackendError, match=r"^a build holds"),
        file_lock(held_elsewhere, timeout=0.05, holder="a build", error=BackendError),
    ):
        pass


def test_the_holding_thread_may_take_it_again_and_keeps_it_until_the_outer_exit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.lock"
    with file_lock(path, timeout=1):
        with file_lock(path, timeout=1):  # would wait for itself without re-entrancy
            pass
        assert not _taken_elsewhere(path)  # the inner exit did not let it go
    assert _taken_elsewhere(path)


def test_another_thread_waits_for_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    order: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with file_lock(path, timeout=5):
            order.append("first in")
            entered.set()
            release.wait(10)  # holds until the test has seen the other thread wait
            order.append("first out")

    def wait_then_take() -> None:
        with file_lock(path, timeout=10):
            order.append("second in")

    first = threading.Thread(target=hold)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=wait_then_take)
    second.start()
    second.join(0.2)  # it must still be waiting: the first thread holds the lock
    assert second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["first in", "first out", "second in"]


def test_another_thread_gives_up_at_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    errors: list[BaseException] = []

    def try_it() -> None:
        try:
            with file_lock(path, timeout=0.1):
                pass
        except LockTimeout as exc:
            errors.append(exc)

    with file_lock(path, timeout=1):
        t = threading.Thread(target=try_it)
        t.start()
        t.join(10)
    assert len(errors) == 1 and str(path) in str(errors[0])


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(OSError), file_lock(tmp_path / "x.lock", timeout=1):
        pass
