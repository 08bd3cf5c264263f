"""The JSON state store: safe directory, atomic writes, clear errors, locked read-modify-write."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vmpool.errors import StateError
from vmpool.state import (
    SCHEMA_VERSION,
    JsonStateDir,
    JsonStore,
    Pool,
)


def new_pool(pool_id: str = "vmpool-abc123") -> Pool:
    return Pool(
        id=pool_id,
        backend="sim",
        size=2,
        session="abc123",
        name_prefix="vmpool",
        config_hash="0" * 12,
        created_at=1.0,
    )


@pytest.fixture
def store(state_dir: JsonStateDir) -> JsonStore:
    store = state_dir.store("vmpool-abc123")
    store.create(new_pool())
    return store


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- the directory ----------------------------------------------------------------------------
def test_state_dir_is_created_private(tmp_path: Path) -> None:
    directory = JsonStateDir(tmp_path / "a" / "state")
    assert mode(directory.path) == 0o700


def test_existing_state_dir_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    JsonStateDir(path)
    assert mode(path) == 0o700


def test_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateError, match=f"state directory {link} is a symlink"):
        JsonStateDir(link)


def test_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory away")
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(StateError, match=r"owned by uid 65534, not you \(uid 0\)"):
        JsonStateDir(path)


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(StateError, match="is not a directory"):
        JsonStateDir(path)


def test_missing_state_dir_is_not_created_on_request(tmp_path: Path) -> None:
    directory = JsonStateDir(tmp_path / "absent", create=False)
    assert not directory.path.exists()
    assert directory.pool_ids() == []


# -- writing ----------------------------------------------------------------------------------
def test_state_file_is_private_and_leaves_no_temp_files(
    state_dir: JsonStateDir, store: JsonStore
) -> None:
    with store.transaction() as pool:
        pool.size = 5
    assert mode(store.path) == 0o600
    assert sorted(p.name for p in state_dir.path.iterdir()) == [
        "vmpool-abc123.json",
        "vmpool-abc123.lock",
    ]


def test_failed_write_leaves_old_file_and_no_temp_file(
    state_dir: JsonStateDir, store: JsonStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    # a StateError naming the file, with the system's reason
    reason = f"{store.path}: cannot write it: No space left on device"
    with pytest.raises(StateError, match=reason), store.transaction() as pool:
        pool.size = 5
    assert store.path.read_bytes() == before
    assert not [p for p in state_dir.path.iterdir() if p.name.endswith(".tmp")]


def test_exception_in_transaction_writes_nothing(store: JsonStore) -> None:
    before = store.path.read_bytes()
    with pytest.raises(RuntimeError), store.transaction() as pool:
        pool.size = 5
        raise RuntimeError("changed my mind")
    assert store.path.read_bytes() == before


def test_transaction_writes_only_when_changed(store: JsonStore) -> None:
    inode = os.stat(store.path).st_ino
    with store.transaction():
        pass
    assert os.stat(store.path).st_ino == inode
    with store.transaction() as pool:
        pool.size = 3
    assert os.stat(store.path).st_ino != inode
    assert store.read() is not None and store.read().size == 3  # type: ignore[union-attr]


def test_create_refuses_an_existing_pool(store: JsonStore) -> None:
    with pytest.raises(StateError, match="already exists"):
        store.create(new_pool())


def test_transaction_on_missing_pool_is_a_state_error(state_dir: JsonStateDir) -> None:
    with pytest.raises(StateError, match="does not exist"), state_dir.store("nope").transaction():
        pass


def test_remove_deletes_the_record_and_tolerates_absence(
    state_dir: JsonStateDir, store: JsonStore
) -> None:
    store.remove()
    assert store.read() is None
    assert state_dir.pool_ids() == []
    store.remove()


def test_pool_ids_ignore_temp_files(state_dir: JsonStateDir, store: JsonStore) -> None:
    (state_dir.path / ".vmpool-abc123.x.tmp").write_text("{")
    (state_dir.path / ".hidden.json").write_text("{")
    assert state_dir.pool_ids() == ["vmpool-abc123"]


# -- unreadable files ------------------------------------------------------------------------
def _assert_recovery_message(exc: StateError, store: JsonStore) -> None:
    text = str(exc)
    assert str(store.path) in text
    assert f"vmpool down --state-dir {store.dir.path} --pool {store.pool_id} --force" in text, text


@pytest.mark.parametrize("use_transaction", [False, True], ids=["read", "transaction"])
def test_corrupt_json_names_file_and_recovery_and_is_left_alone(
    store: JsonStore, use_transaction: bool
) -> None:
    store.path.write_bytes(b'{"schema_version": 1, "id": ')
    with pytest.raises(StateError, match="corrupt state file") as info:
        if use_transaction:
            with store.transaction():
                pass
        else:
            store.read()
    _assert_recovery_message(info.value, store)
    assert store.path.read_bytes() == b'{"schema_version": 1, "id": '


def test_invalid_record_names_the_bad_field(store: JsonStore) -> None:
    data = json.loads(store.path.read_text())
    data["size"] = "big"
    store.path.write_text(json.dumps(data))
    with pytest.raises(StateError, match=r"corrupt state file \(size: ") as info:
        store.read()
    _assert_recovery_message(info.value, store)


@pytest.mark.parametrize("use_transaction", [False, True], ids=["read", "transaction"])
def test_newer_schema_version_names_file_upgrade_and_recovery(
    store: JsonStore, use_transaction: bool
) -> None:
    data = json.loads(store.path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    data["something_new"] = True
    text = json.dumps(data)
    store.path.write_text(text)
    with pytest.raises(StateError, match="written by a newer vmpool") as info:
        if use_transaction:
            with store.transaction():
                pass
        else:
            store.read()
    assert "upgrade vmpool" in str(info.value)
    _assert_recovery_message(info.value, store)
    assert store.path.read_text() == text


def test_pools_reports_an_unreadable_pool_instead_of_skipping_it(
    state_dir: JsonStateDir, store: JsonStore
) -> None:
    store.path.write_text("not json")
    with pytest.raises(StateError, match="corrupt state file"):
        state_dir.pools()


# -- concurrency ------------------------------------------------------------------------------
def _increment(args: tuple[str, str, int]) -> None:
    path, pool_id, times = args
    store = JsonStateDir(Path(path)).store(pool_id)
    for _ in range(times):
        with store.transaction() as pool:
            pool.next_serial += 1


def test_concurrent_transactions_from_processes_lose_no_update(
    state_dir: JsonStateDir, store: JsonStore
) -> None:
    procs, times = 4, 50
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as workers:
        workers.map(_increment, [(str(state_dir.path), store.pool_id, times)] * procs)
    pool = store.read()
    assert pool is not None
    assert pool.next_serial == procs * times


def test_lock_timeout_is_a_state_error(store: JsonStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import vmpool.state

    monkeypatch.setattr(vmpool.state, "LOCK_TIMEOUT", 0.05)
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        with store.transaction():
            locked.set()
            release.wait(10)

    holder = ctx.Process(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        with pytest.raises(StateError, match=r"could not lock within 0\.05s"), store.transaction():
            pass
    finally:
        release.set()
        holder.join(10)


def _hold_lock(store: JsonStore, locked: Any, release: Any) -> None:
    # hold until told: every caller sets ``release`` (in a finally). A bounded hold shorter than
    # a loaded CI machine's scheduling stalls let the waiter through uninterrupted
    with store.transaction():
        locked.set()
        release.wait(120)


def test_waiting_transaction_proceeds_when_the_holder_releases(store: JsonStore) -> None:
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(store, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        threading.Timer(0.2, release.set).start()
        started = time.monotonic()
        with store.transaction() as pool:
            pool.size = 7
        assert time.monotonic() - started >= 0.15
    finally:
        release.set()
        holder.join(10)
    assert store.read().size == 7  # type: ignore[union-attr]


def test_interrupted_lock_wait_does_not_keep_the_lock(store: JsonStore) -> None:
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(store, locked, release))
    holder.start()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        assert locked.wait(10)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt), store.transaction():
            pass
        assert holder.is_alive(), "the holder let go before the interrupt: nothing was tested"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        holder.join(10)
    # the abandoned wait let go of the lock: another process can take it
    other = ctx.Process(target=_increment, args=((str(store.dir.path), store.pool_id, 1),))
    other.start()
    other.join(10)
    assert other.exitcode == 0
    assert store.read().next_serial == 1  # type: ignore[union-attr]
