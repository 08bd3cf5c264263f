"""Each machine's recipe, kept in ``<state_dir>/<tool>/<name>.json``.

A recipe (the tool's options and the command) lets any process sharing the state directory
recreate a machine exactly, and names the warm images the machine owns.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmpool._files import atomic_write, private_dir

log = logging.getLogger(__name__)


@dataclass
class MachineRecord:
    """How to recreate a machine, and the images it owns."""

    name: str
    image: str
    options: list[str]
    command: list[str]
    network: str | None = None
    warm_image: str | None = None
    warm_image_id: str | None = None
    #: earlier warm images, removed once no container uses them
    stale_images: list[str] = field(default_factory=list)
    #: address on ``network`` when snapshotted; reset asks for it again so it stays stable
    ip: str | None = None
    #: the files podman bind-mounts for the network (inspect's ``HostsPath``,
    #: ``ResolvConfPath``) when snapshotted, which a reset through a holder gives back
    net_files: dict[str, str] = field(default_factory=dict)

    def may_have_warm_image(self) -> bool:
        """False only when the record shows the machine was never snapshotted to an image of
        its own (there is none to remove)."""
        return self.warm_image is not None and self.warm_image != self.image


def may_have_warm_image(record: MachineRecord | None) -> bool:
    """As `MachineRecord.may_have_warm_image`; without a record, removing is the safe guess."""
    return record is None or record.may_have_warm_image()


class RecordStore:
    """The recipes under one directory (``<state_dir>/<tool>``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> MachineRecord | None:
        try:
            data = json.loads(self.path(name).read_text(encoding="utf-8"))
            return MachineRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable record for %s: %s", name, exc)
            return None

    def write(self, record: MachineRecord) -> None:
        write_json(self.path(record.name), asdict(record))

    def forget(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()


def write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    private_dir(path.parent)
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True), fsync=False)
