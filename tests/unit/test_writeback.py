"""The owner's write-back store: transactions in memory, the file current when unlocked."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator

import pytest
from _waiting import wait_until

from vmpool.errors import StateError
from vmpool.state import JsonStateDir, Pool
from vmpool.writeback import WriteBackStore


def _pool(pool_id: str) -> Pool:
    return Pool(
        id=pool_id,
        backend="sim",
        size=1,
        session="s1",
        name_prefix="vmpool",
        config_hash="h",
        created_at=0.0,
    )


@pytest.fixture
def owned(state_dir: JsonStateDir) -> Iterator[WriteBackStore]:
    state_dir.store("p1").create(_pool("p1"))
    store = WriteBackStore(state_dir, "p1")
    yield store
    store.close()


def test_changes_are_seen_at_once_and_written_back_soon(
    owned: WriteBackStore, state_dir: JsonStateDir
) -> None:
    with owned.transaction() as pool:
        pool.next_serial = 7
    read = owned.read()
    assert read is not None and read.next_serial == 7
    on_file = state_dir.store("p1")
    wait_until(
        lambda: (p := on_file.read()) is not None and p.next_serial == 7,
        5,
        "the change written back",
        interval=0.001,
    )


def test_many_transactions_share_few_writes(owned: WriteBackStore) -> None:
    for i in range(200):
        with owned.transaction() as pool:
            pool.next_serial = i
    owned.close()
    assert owned.read() is not None and owned.read().next_serial == 199  # type: ignore[union-attr]
    assert 1 <= owned.writes < 50, owned.writes


def test_another_writer_finds_the_file_current(
    owned: WriteBackStore, state_dir: JsonStateDir
) -> None:
    # the owner keeps changing the record while another store (another process, the CLI)
    # read-modify-writes the file: no change of either side may be lost
    other = state_dir.store("p1")
    stop = threading.Event()
    done = {"owner": 0}

    def owner() -> None:
        while not stop.is_set():
            with owned.transaction() as pool:
                pool.stats.checkouts += 1
            done["owner"] += 1

    t = threading.Thread(target=owner)
    t.start()
    try:
        for _ in range(20):
            with other.transaction() as pool:
                pool.stats.reset += 1
    finally:
        stop.set()
        t.join()
    owned.close()
    final = other.read()
    assert final is not None
    assert final.stats.reset == 20
    assert final.stats.checkouts == done["owner"]


def test_a_failed_transaction_changes_nothing(owned: WriteBackStore) -> None:
    with owned.transaction() as pool:
        pool.next_serial = 1
    with pytest.raises(RuntimeError), owned.transaction() as pool:
        pool.next_serial = 99
        pool.queue.clear()
        raise RuntimeError("boom")
    with owned.transaction() as pool:
        assert pool.next_serial == 1


def test_lock_is_let_go_when_idle(owned: WriteBackStore, state_dir: JsonStateDir) -> None:
    with owned.transaction() as pool:
        pool.next_serial = 3
    started = time.monotonic()
    current = state_dir.store("p1").read_current()  # waits for the lock
    assert current is not None and current.next_serial == 3
    assert time.monotonic() - started < 2.0


def test_remove_while_held_does_not_come_back(
    owned: WriteBackStore, state_dir: JsonStateDir
) -> None:
    for i in range(50):
        with owned.transaction() as pool:
            pool.next_serial = i
    owned.remove()
    # a write-back in flight would have landed by now; that none does is what is tested
    time.sleep(0.05)
    assert not (state_dir.path / "p1.json").exists()
    with pytest.raises(StateError, match="does not exist"), owned.transaction():
        pass


def test_a_steady_stream_of_changes_is_written_back_once_per_interval(
    state_dir: JsonStateDir,
) -> None:
    state_dir.store("p1").create(_pool("p1"))
    store = WriteBackStore(state_dir, "p1", write_interval=0.2)
    try:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 0.7:
            with store.transaction() as pool:
                pool.next_serial = i = i + 1
            time.sleep(0.001)
        # one write at the first change, then at most one per 0.2 s (not one per change)
        assert 1 <= store.writes <= 5, store.writes
    finally:
        store.close()
    on_file = state_dir.store("p1").read()
    assert on_file is not None and on_file.next_serial == i


def test_close_writes_what_is_pending_without_waiting_out_the_interval(
    state_dir: JsonStateDir,
) -> None:
    state_dir.store("p1").create(_pool("p1"))
    store = WriteBackStore(state_dir, "p1", write_interval=30.0)
    with store.transaction() as pool:
        pool.next_serial = 1
    # the first change is written at once
    wait_until(lambda: store.writes == 1, 5, "the first write", interval=0.001)
    with store.transaction() as pool:
        pool.next_serial = 2  # this one would wait 30 s for its write-back
    # the writer has seen it and waits out the interval: no write meanwhile is what is tested
    time.sleep(0.2)
    assert store.writes == 1
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 10
    on_file = state_dir.store("p1").read()
    assert on_file is not None and on_file.next_serial == 2


def test_after_close_transactions_go_to_the_file(
    owned: WriteBackStore, state_dir: JsonStateDir
) -> None:
    owned.close()
    with owned.transaction() as pool:
        pool.next_serial = 5
    on_file = state_dir.store("p1").read()
    assert on_file is not None and on_file.next_serial == 5


def test_a_failing_write_back_fails_transactions_with_its_reason_until_one_succeeds(
    owned: WriteBackStore, state_dir: JsonStateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vmpool.state.os.fsync", full)
    with owned.transaction() as pool:
        pool.next_serial = 1  # acknowledged in memory; its write-back fails

    def refused() -> bool:
        try:
            with owned.transaction():
                return False
        except StateError as exc:
            assert "cannot write it: No space left on device" in str(exc)
            return True

    wait_until(refused, 5, "a refused write-back", interval=0.001)
    assert not [p for p in state_dir.path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space is back: the pending write-back goes through
    wait_until(lambda: not refused(), 5, "the write-back through", interval=0.001)
    stored = state_dir.store("p1").read()
    assert stored is not None and stored.next_serial == 1


class _Bump:
    """A lease operation that bumps a counter of the record, or half-does it and raises."""

    def __init__(self, by: int, *, fails: bool = False) -> None:
        self.by, self.fails = by, fails

    def apply(self, pool: Pool) -> int:
        pool.next_serial += self.by
        if self.fails:
            raise RuntimeError("bug in an operation")
        return pool.next_serial

    def parse_reply(self, data: bytes) -> int:
        return int(data)

    def model_dump_json(self) -> str:
        return str(-self.by if self.fails else self.by)

    @staticmethod
    def parse(line: bytes) -> _Bump:
        """An operation read from its JSON (a negative number: one that fails)."""
        by = int(line)
        return _Bump(abs(by), fails=by < 0)


def _lines(*bys: int) -> list[tuple[_Bump, bytes]]:
    """A batch as the lease server hands it over: each operation with its JSON."""
    ops = [_Bump.parse(str(by).encode()) for by in bys]
    return [(op, op.model_dump_json().encode()) for op in ops]


def test_an_operation_that_raises_in_a_batch_is_undone_alone(owned: WriteBackStore) -> None:
    """Rebuilt from the last image and the operations since (earlier batches, a transaction
    in between), the record is as if the failing operation had never been sent."""
    assert owned.apply(_lines(1, 10), _Bump.parse) == [1, 11]
    with owned.transaction() as pool:  # a controller transaction between two batches
        pool.size = 3
    replies = owned.apply(_lines(100, -1000, 10000), _Bump.parse)
    assert replies[0] == 111 and isinstance(replies[1], RuntimeError) and replies[2] == 10111
    pool = owned.read()
    assert pool is not None and pool.next_serial == 10111 and pool.size == 3
    wait_until(lambda: Pool.model_validate_json(owned.path.read_bytes()).next_serial == 10111,
               5, "the write-back of the rebuilt record")


def test_a_batch_keeps_no_operation_alive(owned: WriteBackStore) -> None:
    """Until the next write-back the store keeps what replays a batch, as bytes: the operations
    themselves are freed at once (thousands a second kept as objects made the server's process
    collect garbage hundreds of times a second, pausing every check-out in flight)."""
    batch = _lines(1, 2)
    refs = [weakref.ref(op) for op, _ in batch]
    owned.apply(batch, _Bump.parse)
    del batch
    assert [r() for r in refs] == [None, None]
    pool = owned.read()
    assert pool is not None and pool.next_serial == 3
