"""The session channel: how the controller and its workers find each other's pools.

The controller serves ``<state_dir>/<session>.session.sock`` (0600, in the 0700 state
directory). Workers send it messages and it answers: ``register`` (the worker's process, so a
controller stopped by a signal can stop them), ``demand`` (the profiles their collected tests
need; the controller warms only those, as soon as the message arrives) and ``pool`` (wait for a
profile's pool id, answered the moment the pool record exists, or with the error that prevented
it). Nothing polls.

The controller is the only writer of the session record, ``<state_dir>/<session>.session``:
written on every change, so `vmpool gc` can tell a dead session's files from a live one's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from vmpool import _wire
from vmpool._files import atomic_write
from vmpool.errors import PoolUnavailable, StateError
from vmpool.ownership import ProcessRef
from vmpool.state import write_error

log = logging.getLogger(__name__)


class SessionRecord(BaseModel):
    session: str
    #: the controller process, so `vmpool gc` can tell a dead session's file from a live one
    owner: ProcessRef | None = None
    #: profiles seen while collection is still going: the controller prepares their backend
    #: (checks, reaping, QEMU's clone template) but makes no machine yet
    early: dict[str, int] = Field(default_factory=dict)
    #: profile -> the largest number of machines one test asks for, once collection is final
    demand: dict[str, int] = Field(default_factory=dict)
    #: profile -> pool id (set by the controller once the pool record exists)
    pools: dict[str, str] = Field(default_factory=dict)
    #: profile -> why no pool could be made
    errors: dict[str, str] = Field(default_factory=dict)
    #: problems found while collecting (count too large, unknown profile): a usage error
    usage_errors: list[str] = Field(default_factory=list)
    #: xdist worker id -> its process, so a controller stopped by a signal can stop them
    workers: dict[str, ProcessRef] = Field(default_factory=dict)


class SessionFile:
    """The session record on disk (written by the controller alone)."""

    def __init__(self, state_dir: Path, session: str) -> None:
        self.session = session
        self.path = Path(state_dir) / f"{session}.session"
        #: left by older versions, which locked the file; `vmpool gc` removes stale ones
        self.lock_path = Path(state_dir) / f"{session}.session.lock"

    def read(self) -> SessionRecord:
        try:
            return SessionRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return SessionRecord(session=self.session)
        except ValidationError as exc:
            raise StateError(f"{self.path}: corrupt session file: {exc}") from exc

    def write(self, record: SessionRecord) -> None:
        try:
            atomic_write(self.path, record.model_dump_json().encode())
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def remove(self) -> None:
        for p in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# -- messages ----------------------------------------------------------------------------------
class Register(BaseModel):
    kind: Literal["register"] = "register"
    worker: str
    process: ProcessRef


class Demand(BaseModel):
    kind: Literal["demand"] = "demand"
    needs: dict[str, int] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)
    final: bool = True


class WaitPool(BaseModel):
    kind: Literal["pool"] = "pool"
    profile: str
    wait: float


class PoolAnswer(BaseModel):
    pool: str | None = None
    error: str | None = None


_MESSAGE: TypeAdapter[Register | Demand | WaitPool] = TypeAdapter(
    Annotated[Register | Demand | WaitPool, Field(discriminator="kind")]
)


def socket_path(state_dir: Path, session: str) -> Path:
    return Path(state_dir) / f"{session}.session.sock"


class SessionServer:
    """The controller's end: holds the record, answers workers, calls ``on_demand`` when a
    worker reports what it collected."""

    def __init__(
        self, state_dir: Path, session: str, owner: ProcessRef, on_demand: Callable[[], None]
    ) -> None:
        self.file = SessionFile(state_dir, session)
        self.path = socket_path(state_dir, session)
        self._on_demand = on_demand
        self._record = SessionRecord(session=session, owner=owner)
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._closed = False

    def start(self) -> None:
        """Write the record and listen; StateError when neither can be done."""
        self.file.write(self._record)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a session id is new: nothing live is there
            old = os.umask(0o177)
            try:
                with _wire.reachable(self.path) as where:
                    listener.bind(where)
            finally:
                os.umask(old)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise StateError(f"{self.path}: cannot listen for this session's workers: {exc}") \
                from exc
        self._listener = listener
        threading.Thread(target=self._accept, name="vmpool-session", daemon=True).start()

    def read(self) -> SessionRecord:
        with self._cond:
            return self._record.model_copy(deep=True)

    @contextlib.contextmanager
    def update(self) -> Iterator[SessionRecord]:
        """Change the record: written, and every waiting worker looks again."""
        with self._cond:
            yield self._record
            self.file.write(self._record)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for conn in list(self._conns):
            # reading ends; a waiting worker's answer (just woken above) still goes out
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.file.remove()

    # -- serving ----------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            with conn:
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, _, buffer = buffer.partition(b"\n")
                        conn.sendall(self._answer(line))
        except OSError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)

    def _answer(self, line: bytes) -> bytes:
        try:
            message = _MESSAGE.validate_json(line)
        except ValidationError as exc:
            return _wire.error_line(f"not a session message: {exc.errors()[0]['msg']}")
        try:
            if isinstance(message, Register):
                with self.update() as rec:
                    rec.workers[message.worker] = message.process
                return _wire.ok_line(b"null")
            if isinstance(message, Demand):
                self._merge(message)
                self._on_demand()
                return _wire.ok_line(b"null")
            return _wire.ok_line(self._wait_pool(message).model_dump_json().encode())
        except StateError as exc:
            return _wire.error_line(str(exc))

    def _merge(self, demand: Demand) -> None:
        with self.update() as rec:
            if demand.problems:
                rec.usage_errors += [p for p in demand.problems if p not in rec.usage_errors]
                return
            target = rec.demand if demand.final else rec.early
            for name, count in demand.needs.items():
                target[name] = max(target.get(name, 0), count)

    def _wait_pool(self, ask: WaitPool) -> PoolAnswer:
        deadline = time.monotonic() + ask.wait
        with self._cond:
            while True:
                rec = self._record
                if ask.profile in rec.errors:
                    return PoolAnswer(error=rec.errors[ask.profile])
                if ask.profile in rec.pools:
                    return PoolAnswer(pool=rec.pools[ask.profile])
                if self._closed:
                    return PoolAnswer(error="the controller stopped before making it (the "
                                      "session is ending)")
                left = deadline - time.monotonic()
                if left <= 0:
                    return PoolAnswer()
                self._cond.wait(left)


class SessionClient:
    """A worker's end of the session channel."""

    def __init__(self, state_dir: Path, session: str) -> None:
        self.session = session
        self._conn = _wire.Connection(socket_path(state_dir, session), timeout=30.0)

    def _call(self, message: BaseModel, *, wait: float = 0.0) -> bytes:
        try:
            data = self._conn.call(message.model_dump_json().encode() + b"\n", wait=wait)
        except _wire.ServerGone as exc:
            raise StateError(f"session {self.session}: {exc}; the controller is gone") from exc
        if isinstance(data, _wire.Failure):
            raise StateError(f"session {self.session}: {data.message}")
        return data

    def register(self, worker: str, process: ProcessRef) -> None:
        self._call(Register(worker=worker, process=process))

    def report(self, needs: dict[str, int], problems: list[str], *, final: bool) -> None:
        self._call(Demand(needs=needs, problems=problems, final=final))

    def wait_pool(self, profile: str, timeout: float) -> str:
        """The pool id of ``profile`` once the controller has made its record."""
        data = self._call(WaitPool(profile=profile, wait=timeout), wait=timeout)
        answer = PoolAnswer.model_validate(json.loads(data))
        if answer.error is not None:
            raise PoolUnavailable(f"vmpool: no pool for profile {profile!r}: {answer.error}")
        if answer.pool is None:
            raise PoolUnavailable(
                f"vmpool: the controller did not create the {profile!r} pool within "
                f"{timeout:g}s (session {self.session})"
            )
        return answer.pool

    def close(self) -> None:
        self._conn.close()
