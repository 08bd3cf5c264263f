"""The pool's record and its store: one JSON file per pool, locked read-modify-write.

``StateStore`` is the small interface the lease logic needs; ``JsonStateDir`` implements it
with a JSON file per pool under a lock on a separate lock file (vmpool._lock.hold), written
atomically (temp file, fsync, rename). A database-backed store can implement the same interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import IO, Protocol, TypeVar

import platformdirs
from pydantic import BaseModel, Field, ValidationError

from vmpool._files import atomic_write, private_dir
from vmpool._lock import hold, let_go
from vmpool.backends.base import NAME_RE
from vmpool.errors import LockTimeout, PoolGone, StateError
from vmpool.ownership import ProcessRef, check_pool_id

#: 2: processes are identified by boot id and start in clock ticks (vmpool.ownership), not by
#: a wall-clock start; a schema 1 record is read (its processes judged by pid alone) and
#: written back as 2
SCHEMA_VERSION = 2
LOCK_TIMEOUT = 30.0


class MachineState(StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    READY = "ready"
    LEASED = "leased"
    RESETTING = "resetting"
    REPLACING = "replacing"
    BROKEN = "broken"
    DELETED = "deleted"


class Holder(ProcessRef):
    """Who leased a machine: a worker process, for a test, since when."""

    worker: str = "main"
    test: str | None = None
    since: float = 0.0
    request: str = ""


class Machine(BaseModel):
    name: str
    slot: int
    state: MachineState
    config_hash: str
    created_at: float
    ready_at: float | None = None
    holder: Holder | None = None
    #: the process carrying out a transition (creating, starting, resetting, replacing)
    actor: ProcessRef | None = None
    uses: int = 0
    uses_since_reset: int = 0
    #: when the machine was last known healthy (ready, reset, or back from a passing test)
    checked_at: float | None = None
    address: str | None = None
    error: str | None = None
    #: set by a check-in that asked for a reset/replace the actor has not done yet
    pending: str | None = None
    #: bumped by every grant: the lease's fencing token (a column of the PostgreSQL store)
    generation: int = 0


class Request(BaseModel):
    """A check-out waiting in line; ``granted`` is filled in, atomically, when served."""

    id: str
    holder: Holder
    count: int = 1
    fresh: bool = False
    since: float
    granted: list[str] = Field(default_factory=list)


class SlotFailure(BaseModel):
    attempts: int = 0
    retry_at: float = 0.0
    last_error: str = ""


class Stats(BaseModel):
    created: int = 0
    reset: int = 0
    replaced: int = 0
    broken: int = 0
    reclaimed: int = 0
    checkouts: int = 0
    create_failures: int = 0
    first_ready_at: float | None = None


class Pool(BaseModel):
    schema_version: int = SCHEMA_VERSION
    id: str
    profile: str = "default"
    backend: str
    size: int
    session: str
    name_prefix: str
    config_hash: str
    owner: ProcessRef | None = None
    keep: bool = False
    closing: bool = False
    network: str | None = None
    #: why the controller cannot keep the pool now (its maintainer's error): check-outs fail
    error: str | None = None
    #: every transaction is durable when acknowledged (the PostgreSQL store): a controller
    #: that dies loses no grant, so its pool keeps serving (vmpool.leases.unavailable)
    durable: bool = False
    created_at: float
    next_serial: int = 0
    machines: list[Machine] = Field(default_factory=list)
    queue: list[Request] = Field(default_factory=list)
    failures: dict[int, SlotFailure] = Field(default_factory=dict)
    stats: Stats = Field(default_factory=Stats)

    def machine(self, name: str) -> Machine:
        for m in self.machines:
            if m.name == name:
                return m
        raise StateError(f"pool {self.id}: no machine named {name!r}")

    def find(self, name: str) -> Machine | None:
        for m in self.machines:  # a loop, not next(genexpr): no generator to set up (0.2-0.3 us)
            if m.name == name:
                return m
        return None


R_co = TypeVar("R_co", covariant=True)


class Operation(Protocol[R_co]):
    """A lease operation as data (vmpool.ops): applied to the record, it says what goes back."""

    def apply(self, pool: Pool) -> R_co: ...

    def parse_reply(self, data: bytes) -> R_co: ...

    def model_dump_json(self) -> str: ...


class StateStore(Protocol):
    """Where one pool's record lives. Every read-modify-write goes through transaction()."""

    pool_id: str

    def transaction(self) -> contextlib.AbstractContextManager[Pool]:
        """Lock, read, yield the record for changes, write it back if changed, unlock."""
        ...

    def read(self) -> Pool | None:
        """A consistent snapshot without the lock, or None when the pool does not exist; it may
        lag the owner's latest transactions by milliseconds (see read_current)."""
        ...

    def read_current(self) -> Pool | None:
        """The record as of now (waits for the lock), or None when the pool does not exist."""
        ...

    def create(self, pool: Pool) -> None:
        """Write a new pool record; StateError if one with that id exists."""
        ...

    def remove(self) -> None:
        """Delete the record (missing is fine)."""
        ...


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir("vmpool"))


def write_error(path: Path, exc: OSError) -> StateError:
    """The StateError for a record that cannot be written, with the system's reason (``No
    space left on device``) in the text."""
    return StateError(f"{path}: cannot write it: {exc.strerror or exc}")


def _recovery(state_dir: Path, pool_id: str) -> str:
    return (
        f"recover with: vmpool down --state-dir {state_dir} --pool {pool_id} --force "
        "(destroys that pool's machines by their owner labels and removes the file)"
    )


class JsonStateDir:
    """A state directory: ``<id>.json`` per pool beside ``<id>.lock``, mode 0700/0600."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._check(create)

    def _check(self, create: bool) -> None:
        p = self.path
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not create:
                return
            try:
                private_dir(p)
            except OSError as exc:
                raise StateError(f"state directory {p}: cannot create: {exc.strerror}") from exc
            st = os.lstat(p)
        except OSError as exc:
            raise StateError(f"state directory {p}: cannot use it: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise StateError(
                f"state directory {p} is a symlink; refusing it (another user could redirect "
                "it): point --vm-state-dir / VMPOOL_STATE_DIR at a real directory"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state directory {p} is not a directory")
        if st.st_uid != os.getuid():
            raise StateError(
                f"state directory {p} is owned by uid {st.st_uid}, not you (uid {os.getuid()}); "
                "use a directory of your own"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(p, 0o700)
        if not os.access(p, os.W_OK | os.X_OK):
            raise StateError(f"state directory {p} is not writable")

    def pool_ids(self) -> list[str]:
        if not self.path.is_dir():
            return []
        # only names a pool can have: anything else there is not vmpool's
        return sorted(f.stem for f in self.path.glob("*.json") if NAME_RE.match(f.stem))

    def store(self, pool_id: str) -> JsonStore:
        return JsonStore(self, pool_id)

    def pools(self) -> list[Pool]:
        """Every readable pool; an unreadable one raises StateError (nothing is forgotten)."""
        out = []
        for pid in self.pool_ids():
            pool = self.store(pid).read()
            if pool is not None:
                out.append(pool)
        return out


class JsonStore:
    """One pool's JSON file. Implements StateStore.

    While the pool's controller lives, its lease server (vmpool.server, at ``socket_path``) is
    the record's only writer; clients reach it through a transport (vmpool.transport).
    """

    def __init__(self, directory: JsonStateDir, pool_id: str) -> None:
        try:
            check_pool_id(pool_id)
        except ValueError as exc:
            raise StateError(f"{directory.path}: {exc}") from None
        self.dir = directory
        self.pool_id = pool_id
        self.path = directory.path / f"{pool_id}.json"
        self.lock_path = directory.path / f"{pool_id}.lock"
        self.socket_path = directory.path / f"{pool_id}.sock"

    def _acquire(self) -> IO[str]:
        """Take the pool's lock (StateError after LOCK_TIMEOUT); give it back with _release."""
        try:
            return hold(self.lock_path, LOCK_TIMEOUT)
        except LockTimeout as exc:
            raise StateError(
                f"{self.lock_path}: could not lock within {LOCK_TIMEOUT:g}s (a process holds it)"
            ) from exc

    @staticmethod
    def _release(fh: IO[str]) -> None:
        let_go(fh)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fh = self._acquire()
        try:
            yield
        finally:
            self._release(fh)

    def _parse(self, data: bytes) -> Pool:
        # the fast path parses and validates in one pass; anything unusual (corrupt, newer
        # schema) takes the slow path below, which says precisely what is wrong
        try:
            pool = Pool.model_validate_json(data)
        except ValidationError:
            pass
        else:
            if pool.schema_version <= SCHEMA_VERSION:
                pool.schema_version = SCHEMA_VERSION
                return pool
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise StateError(
                f"{self.path}: corrupt state file (not JSON: {exc}); "
                + _recovery(self.dir.path, self.pool_id)
            ) from exc
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: written by a newer vmpool (schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade vmpool, or " + _recovery(self.dir.path, self.pool_id)
            )
        try:
            return Pool.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StateError(
                f"{self.path}: corrupt state file ({where}: {first['msg']}); "
                + _recovery(self.dir.path, self.pool_id)
            ) from exc

    def _read_unlocked(self) -> Pool | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return self._parse(data)

    def read(self) -> Pool | None:
        return self._read_unlocked()

    def read_current(self) -> Pool | None:
        """The record as of now: waits for the lock, so an owner keeping the record in memory
        (vmpool.writeback) has written it back. ``read`` may be a few milliseconds behind."""
        with self._locked():
            return self._read_unlocked()

    def _write(self, data: bytes) -> None:
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Pool]:
        with self._locked():
            raw = self._read_raw()
            if raw is None:
                raise PoolGone(f"pool {self.pool_id} does not exist in {self.dir.path}")
            pool = self._parse(raw)
            yield pool
            new = pool.model_dump_json().encode()
            if new != raw:
                self._write(new)

    def _read_raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def create(self, pool: Pool) -> None:
        with self._locked():
            if self.path.exists():
                raise StateError(f"pool {self.pool_id} already exists in {self.dir.path}")
            self._write(pool.model_dump_json().encode())

    def remove(self) -> None:
        # the lock file stays: a waiter may hold its inode; `vmpool gc` removes stale ones
        with self._locked(), contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def side_file(self, suffix: str) -> Path:
        """A file beside the record for append-only data (e.g. check-out wait samples)."""
        return self.dir.path / f"{self.pool_id}.{suffix}"
