"""The session record: how the controller and its workers find each other's pools.

Workers write the profiles their collected tests need (``demand``); the controller warms
only those, and publishes each profile's pool id (or the error that prevented it).
Stored as ``<state_dir>/<session>.session`` beside the pool files, locked like them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import portalocker
from pydantic import BaseModel, Field, ValidationError

from vmpool._files import atomic_write, private_opener
from vmpool.errors import StateError
from vmpool.ownership import ProcessRef
from vmpool.state import write_error


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
    def __init__(self, state_dir: Path, session: str) -> None:
        self.session = session
        self.path = Path(state_dir) / f"{session}.session"
        self.lock_path = Path(state_dir) / f"{session}.session.lock"

    def read(self) -> SessionRecord:
        try:
            return SessionRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return SessionRecord(session=self.session)
        except ValidationError as exc:
            raise StateError(f"{self.path}: corrupt session file: {exc}") from exc

    @contextlib.contextmanager
    def update(self) -> Iterator[SessionRecord]:
        with portalocker.Lock(
            self.lock_path,
            mode="a",
            opener=private_opener,
            timeout=30,
            check_interval=0.001,
            flags=portalocker.LOCK_EX | portalocker.LOCK_NB,
        ):
            record = self.read()
            yield record
            try:
                atomic_write(self.path, record.model_dump_json().encode())
            except OSError as exc:
                raise write_error(self.path, exc) from exc

    def remove(self) -> None:
        for p in (self.path, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
