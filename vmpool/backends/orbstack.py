"""OrbStack Linux machines driven through ``orbctl`` (macOS only), owned via ownership records.

OrbStack machines carry no labels, so this backend keeps one ownership record per machine at
``state_dir/orbstack/NAME.json`` holding the spec's labels. The record is written *before*
``orbctl create``: a machine this backend made is never without its owner, and ``list()`` reads
labels back from the records (a machine without a record lists with no labels, which the reaper
leaves alone).

Networking: every OrbStack machine sits on the one bridge network OrbStack gives all machines,
so ``create_network``/``delete_network`` have nothing to do and ``list_networks`` is empty.
``address()`` is the machine's own IPv4 address on that bridge as ``orbctl info NAME --format
json`` reports it (``ip4``). We use it rather than ``NAME.orb.local`` because OrbStack documents
``.orb.local`` names for reaching machines from macOS, and those names resolve to a separate
per-machine relay address, not the machine's bridge address
(https://github.com/orbstack/orbstack/issues/2676); the bridge address needs no DNS in the guest.

The exact command lines and output shapes this module relies on are recorded, with their
sources, in ``tests/backends/recordings/orbctl/README.md``.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vmpool._files import atomic_write, private_dir
from vmpool._proc import ProcResult, run
from vmpool.backends.base import (
    NAME_RE,
    BackendBase,
    Capabilities,
    ExecResult,
    MachineInfo,
    MachineSpec,
    SshAccess,
    probe_until,
    validate_name,
)
from vmpool.config_backends import OrbstackSettings
from vmpool.errors import BackendError, BackendUnavailable, CapabilityError

log = logging.getLogger(__name__)

ORBCTL = "orbctl"
#: Appended to "orbctl: command not found" by the subprocess helper.
INSTALL_HINT = "OrbStack is macOS-only: https://orbstack.dev"
#: How much of a tool's output an error message quotes.
_QUOTE_LIMIT = 2000

# orbctl reports a missing machine on stderr, exit status 1, as
# "[-32098] machine not found: 'NAME'" (older releases: "machine not found: NAME").
_NOT_FOUND_RE = re.compile(r"^(?:\[-?\d+\]\s*)?machine not found:\s*'?(?P<name>[^'\s]+)'?$")


@dataclass(frozen=True)
class OrbMachine:
    """One entry of ``orbctl list --format json``."""

    name: str
    state: str
    id: str = ""
    distro: str = ""
    version: str = ""
    arch: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


class OwnershipRecord(BaseModel):
    """What ``state_dir/orbstack/NAME.json`` holds: the labels the machine was created with."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    labels: dict[str, str]


def _quote(text: str) -> str:
    text = text.strip()
    if len(text) > _QUOTE_LIMIT:
        text = text[:_QUOTE_LIMIT] + " …"
    return repr(text)


def is_machine_not_found(stderr: str, name: str) -> bool:
    """True when ``stderr`` is exactly orbctl's "machine not found" error for ``name``."""
    match = _NOT_FOUND_RE.match(stderr.strip())
    return match is not None and match.group("name") == name


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendError(f"cannot parse `{what}` output as JSON ({exc}): {_quote(text)}") from exc


def parse_list(text: str) -> list[OrbMachine]:
    """Machines from ``orbctl list --format json`` output; BackendError quoting it if malformed."""
    what = "orbctl list --format json"
    data = _load_json(text, what)
    if not isinstance(data, list):
        raise BackendError(f"`{what}` output is not a JSON list: {_quote(text)}")
    machines = []
    for entry in data:
        if not isinstance(entry, dict):
            raise BackendError(f"`{what}` listed a non-object entry {entry!r}: {_quote(text)}")
        name, state = entry.get("name"), entry.get("state")
        if not isinstance(name, str) or not name or not isinstance(state, str):
            raise BackendError(
                f"`{what}` listed an entry without a name and state {entry!r}: {_quote(text)}"
            )
        image = entry.get("image")
        image = image if isinstance(image, dict) else {}
        machines.append(
            OrbMachine(
                name=name,
                state=state,
                id=str(entry.get("id") or ""),
                distro=str(image.get("distro") or ""),
                version=str(image.get("version") or ""),
                arch=str(image.get("arch") or ""),
            )
        )
    return machines


def parse_info_address(text: str) -> str | None:
    """The ``ip4`` of ``orbctl info NAME --format json`` output, or None when it has none."""
    what = "orbctl info --format json"
    data = _load_json(text, what)
    if not isinstance(data, dict) or not isinstance(data.get("record"), dict):
        raise BackendError(f"`{what}` output has no machine record: {_quote(text)}")
    ip4 = data.get("ip4")
    if ip4 is None or ip4 == "":
        return None  # a stopped machine has no address
    if not isinstance(ip4, str):
        raise BackendError(f"`{what}` output has a non-string ip4 {ip4!r}: {_quote(text)}")
    return ip4


class OrbstackBackend(BackendBase):
    """OrbStack Linux machines via ``orbctl``; labels live in ownership records."""

    name = "orbstack"
    capabilities = Capabilities(reset=False, labels=True, network=True)

    def __init__(
        self,
        settings: OrbstackSettings,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.records_dir = Path(state_dir) / "orbstack"
        self._clock = clock
        self._sleep = sleep

    # -- helpers ---------------------------------------------------------------------------

    def _orbctl(self, args: Sequence[str], timeout: float | None = None) -> ProcResult:
        return run(
            [ORBCTL, *args],
            timeout=self.settings.command_timeout if timeout is None else timeout,
            install_hint=INSTALL_HINT,
        )

    def _user_args(self) -> list[str]:
        return ["-u", self.settings.user] if self.settings.user else []

    def _record_path(self, name: str) -> Path:
        return self.records_dir / f"{validate_name(name)}.json"

    def _write_record(self, name: str, labels: Mapping[str, str]) -> None:
        record = OwnershipRecord(name=name, labels=dict(labels))
        private_dir(self.records_dir)
        # a reader (another worker's list()) must never see a half-written record
        atomic_write(self._record_path(name), record.model_dump_json(indent=2))

    def _read_labels(self, name: str) -> dict[str, str]:
        if not NAME_RE.match(name):
            return {}  # not a name vmpool gives, so never one of ours (and unsafe as a path)
        path = self.records_dir / f"{name}.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning(
                "cannot read ownership record %s (%s): %s counts as unowned", path, exc, name
            )
            return {}
        try:
            record = OwnershipRecord.model_validate_json(text)
        except ValidationError as exc:
            log.warning("corrupt ownership record %s (%s); treating %s as unowned", path, exc, name)
            return {}
        if record.name != name:
            log.warning(
                "ownership record %s is for %r: %s counts as unowned", path, record.name, name
            )
            return {}
        return dict(record.labels)

    # -- Backend protocol ------------------------------------------------------------------

    def check(self) -> None:
        """Raise BackendUnavailable unless ``orbctl`` exists and OrbStack is running."""
        result = self._orbctl(["status"])
        status = result.stdout.strip()
        if result.returncode != 0 or status.lower() != "running":
            said = status or result.stderr.strip() or f"exit status {result.returncode}"
            raise BackendUnavailable(
                f"OrbStack is not running (`orbctl status` said {said!r}); "
                "start it with `orbctl start` or by opening the OrbStack app"
            )

    def create(self, spec: MachineSpec) -> None:
        """Write the ownership record, then ``orbctl create [--arch A] [--user U] DISTRO NAME``.

        OrbStack boots a machine as part of creating it. ``spec.network`` is ignored: all
        OrbStack machines share one network.
        """
        name = validate_name(spec.name)
        self._write_record(name, spec.labels)
        argv = ["create"]
        if self.settings.arch:
            argv += ["--arch", self.settings.arch]
        if self.settings.user:
            argv += ["--user", self.settings.user]
        argv += [self.settings.distro, name]
        log.info("creating orbstack machine %s (%s)", name, self.settings.distro)
        self._orbctl(argv).check(f"create orbstack machine {name}")

    def start(self, name: str) -> None:
        """``orbctl start NAME`` (a no-op for a machine that is already running)."""
        self._orbctl(["start", name]).check(f"start orbstack machine {name}")

    def wait_ready(self, name: str, timeout: float) -> None:
        """Probe with ``orbctl run -m NAME true`` until it exits 0, or raise ReadyTimeout."""
        deadline = self._clock() + timeout

        def probe() -> None:
            remaining = max(deadline - self._clock(), 0.5)
            result = self._orbctl(["run", "-m", name, *self._user_args(), "true"], remaining)
            if result.returncode != 0:
                raise BackendError(
                    f"`orbctl run -m {name} true` exited {result.returncode}: "
                    f"{_quote(result.stderr or result.stdout)}"
                )

        probe_until(
            probe,
            timeout=timeout,
            what=f"orbstack machine {name!r}",
            clock=self._clock,
            sleep=self._sleep,
        )

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """``orbctl run -m NAME [-u USER] ARGV...``; ExecTimeout after ``timeout`` seconds."""
        if not argv:
            raise BackendError("exec needs a command: argv is empty")
        if argv[0].startswith("-"):
            # orbctl stops parsing its own flags at the first guest argument, so a leading
            # dash would be taken as an orbctl flag
            raise BackendError(f"exec argv must start with a program name, not {argv[0]!r}")
        result = self._orbctl(["run", "-m", name, *self._user_args(), *argv], timeout)
        orbctl_failed = result.returncode != 0 and not result.stdout
        if orbctl_failed and is_machine_not_found(result.stderr, name):
            raise BackendError(f"orbstack machine {name!r} not found: {_quote(result.stderr)}")
        return ExecResult(result.returncode, result.stdout, result.stderr)

    def snapshot(self, name: str) -> None:
        """No-op: OrbStack machines cannot be snapshotted in place."""

    def reset(self, name: str) -> None:
        raise CapabilityError(
            "orbstack machines cannot be reset to a snapshot; the pool replaces them instead"
        )

    def delete(self, name: str) -> None:
        """``orbctl delete -f NAME``, then drop the ownership record; a missing machine is fine."""
        validate_name(name)
        result = self._orbctl(["delete", "-f", name])
        if result.returncode != 0:
            if is_machine_not_found(result.stderr, name):
                log.debug("orbstack machine %s was already gone", name)
            else:
                # keep the record: the machine may still exist and must stay owned
                result.check(f"delete orbstack machine {name}")
        self._record_path(name).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[MachineInfo]:
        """Machines named ``prefix...`` with labels from their ownership records."""
        result = self._orbctl(["list", "--format", "json"]).check("list orbstack machines")
        return [
            MachineInfo(name=m.name, labels=self._read_labels(m.name), running=m.running)
            for m in parse_list(result.stdout)
            if m.name.startswith(prefix)
        ]

    def address(self, name: str) -> str | None:
        """The machine's IPv4 address on OrbStack's shared bridge (``ip4`` of ``orbctl info``)."""
        result = self._orbctl(["info", name, "--format", "json"])
        if result.returncode != 0 and is_machine_not_found(result.stderr, name):
            return None
        result.check(f"inspect orbstack machine {name}")
        return parse_info_address(result.stdout)

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """No-op: OrbStack machines already share one network."""
        log.debug("orbstack: network %s needs no creation (machines share one network)", name)

    def delete_network(self, name: str) -> None:
        """No-op: there is no per-pool network to remove."""

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        """Always empty: OrbStack has no per-pool networks."""
        return []

    def ssh(self, name: str) -> SshAccess | None:
        """None: log in with `orb -m NAME` (vmpool sets up no ssh endpoint here)."""
        return None
