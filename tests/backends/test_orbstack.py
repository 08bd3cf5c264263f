"""Contract tests of the OrbStack backend against recorded real ``orbctl`` output.

OrbStack runs only on macOS, so these tests never talk to it: a fake ``orbctl``
(``fake_orbctl.py``) is put on PATH, answering every subcommand with output shaped exactly like
the recordings in ``recordings/orbctl/`` (whose README cites where each came from), and running
``orbctl run`` commands on this host. The tests check the command lines the backend issues
against OrbStack's documented syntax, and that it parses every recorded output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmpool.backends.base import LABEL_SESSION, Backend, MachineSpec
from vmpool.backends.orbstack import (
    OrbstackBackend,
    is_machine_not_found,
    parse_info_address,
    parse_list,
)
from vmpool.config_backends import OrbstackSettings
from vmpool.errors import (
    BackendError,
    BackendUnavailable,
    CapabilityError,
    ExecTimeout,
    ReadyTimeout,
)

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_orbctl.py"
RECORDINGS = HERE / "recordings" / "orbctl"
PREFIX = "vmp-t-"
LABELS = {LABEL_SESSION: "s1", "vmpool.pool": "default"}


@dataclass
class FakeOrbctl:
    """The fake ``orbctl`` on PATH, with its call log and a way to drive it directly."""

    bin_dir: Path
    log: Path

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Call the fake directly (as another OrbStack user would), outside the call log."""
        env = {**os.environ, "FAKE_ORBCTL_LOG": ""}
        return subprocess.run(
            [str(self.bin_dir / "orbctl"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    def clear_log(self) -> None:
        self.log.write_text("")


@pytest.fixture
def fake_orbctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOrbctl]:
    """A directory holding an ``orbctl`` wrapper around fake_orbctl.py, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "orbctl"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    wrapper.chmod(0o755)
    log = tmp_path / "orbctl-calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_ORBCTL_STATE", str(tmp_path / "orbstack" / "state.json"))
    monkeypatch.setenv("FAKE_ORBCTL_LOG", str(log))
    for knob in ("FAKE_ORBCTL_STATUS", "FAKE_ORBCTL_FAIL", "FAKE_ORBCTL_BOOT_PROBES"):
        monkeypatch.delenv(knob, raising=False)
    yield FakeOrbctl(bin_dir=bin_dir, log=log)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def backend(fake_orbctl: FakeOrbctl, state_dir: Path) -> OrbstackBackend:
    return OrbstackBackend(OrbstackSettings(), state_dir)


def spec(name: str, **labels: str) -> MachineSpec:
    return MachineSpec(name=name, labels={**LABELS, **labels})


def record_path(state_dir: Path, name: str) -> Path:
    return state_dir / "orbstack" / f"{name}.json"


# -- the protocol and check() -------------------------------------------------------------


def test_backend_satisfies_the_backend_protocol(backend: OrbstackBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "orbstack"
    assert backend.capabilities.labels and backend.capabilities.network
    assert not backend.capabilities.reset


def test_check_passes_when_orbstack_is_running(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.check()
    assert fake_orbctl.calls() == [["status"]]


def test_check_without_orbctl_says_orbstack_is_macos_only(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BackendUnavailable) as info:
        OrbstackBackend(OrbstackSettings(), state_dir).check()
    assert str(info.value) == (
        "orbctl: command not found (OrbStack is macOS-only: https://orbstack.dev)"
    )


def test_check_when_orbstack_is_stopped_says_how_to_start_it(
    backend: OrbstackBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ORBCTL_STATUS", "Stopped")
    with pytest.raises(BackendUnavailable, match=r"not running .*'Stopped'.*orbctl start"):
        backend.check()


# -- create / start / wait_ready ----------------------------------------------------------


def test_create_issues_documented_command_line(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a"))
    assert fake_orbctl.calls() == [["create", "alpine", "vmp-t-a"]]


def test_create_passes_arch_user_and_distro_version(
    fake_orbctl: FakeOrbctl, state_dir: Path
) -> None:
    settings = OrbstackSettings(distro="ubuntu:jammy", arch="amd64", user="tester")
    OrbstackBackend(settings, state_dir).create(spec("vmp-t-a"))
    assert fake_orbctl.calls() == [
        ["create", "--arch", "amd64", "--user", "tester", "ubuntu:jammy", "vmp-t-a"]
    ]
    [machine] = parse_list(fake_orbctl.run("list", "--format", "json").stdout)
    assert (machine.distro, machine.version, machine.arch) == ("ubuntu", "jammy", "amd64")


def test_create_writes_the_ownership_record(backend: OrbstackBackend, state_dir: Path) -> None:
    backend.create(spec("vmp-t-a", extra="1"))
    record = json.loads(record_path(state_dir, "vmp-t-a").read_text())
    assert record == {"name": "vmp-t-a", "labels": {**LABELS, "extra": "1"}}


def test_ownership_record_is_written_before_orbctl_create(
    backend: OrbstackBackend, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ORBCTL_FAIL", "create")
    with pytest.raises(BackendError, match="invalid transition"):
        backend.create(spec("vmp-t-a"))
    # create failed, yet the record exists: it was written first
    assert record_path(state_dir, "vmp-t-a").exists()


def test_create_rejects_a_name_orbstack_would_not_take(backend: OrbstackBackend) -> None:
    with pytest.raises(ValueError, match="invalid machine name"):
        backend.create(spec("../escape"))


def test_create_of_an_existing_name_raises_backend_error(backend: OrbstackBackend) -> None:
    backend.create(spec("vmp-t-a"))
    with pytest.raises(BackendError, match="already exists"):
        backend.create(spec("vmp-t-a"))


def test_start_issues_orbctl_start(backend: OrbstackBackend, fake_orbctl: FakeOrbctl) -> None:
    backend.create(spec("vmp-t-a"))
    fake_orbctl.run("stop", "vmp-t-a")
    fake_orbctl.clear_log()
    backend.start("vmp-t-a")
    assert fake_orbctl.calls() == [["start", "vmp-t-a"]]
    assert backend.list(PREFIX)[0].running


def test_start_of_a_missing_machine_quotes_orbctl(backend: OrbstackBackend) -> None:
    with pytest.raises(BackendError, match=r"machine not found: 'vmp-t-ghost'"):
        backend.start("vmp-t-ghost")


def test_wait_ready_probes_with_orbctl_run_true(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a"))
    backend.start("vmp-t-a")
    fake_orbctl.clear_log()
    backend.wait_ready("vmp-t-a", timeout=10)
    assert fake_orbctl.calls() == [["run", "-m", "vmp-t-a", "true"]]


def test_wait_ready_retries_until_the_machine_answers(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ORBCTL_BOOT_PROBES", "2")
    backend.create(spec("vmp-t-a"))
    fake_orbctl.clear_log()
    backend.wait_ready("vmp-t-a", timeout=20)
    assert fake_orbctl.calls() == [["run", "-m", "vmp-t-a", "true"]] * 3


def test_wait_ready_times_out_with_the_last_probe_error(
    backend: OrbstackBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ORBCTL_BOOT_PROBES", "1000")
    backend.create(spec("vmp-t-a"))
    with pytest.raises(ReadyTimeout, match=r"not ready after 0.5s.*still starting"):
        backend.wait_ready("vmp-t-a", timeout=0.5)


def test_wait_ready_probes_as_the_configured_user(fake_orbctl: FakeOrbctl, state_dir: Path) -> None:
    backend = OrbstackBackend(OrbstackSettings(user="tester"), state_dir)
    backend.create(spec("vmp-t-a"))
    fake_orbctl.clear_log()
    backend.wait_ready("vmp-t-a", timeout=10)
    assert fake_orbctl.calls() == [["run", "-m", "vmp-t-a", "-u", "tester", "true"]]


# -- exec ---------------------------------------------------------------------------------


@pytest.fixture
def ready(backend: OrbstackBackend, fake_orbctl: FakeOrbctl) -> str:
    backend.create(spec("vmp-t-a"))
    backend.wait_ready("vmp-t-a", timeout=10)
    fake_orbctl.clear_log()
    return "vmp-t-a"


def test_exec_returns_stdout_stderr_and_exit_code(backend: OrbstackBackend, ready: str) -> None:
    result = backend.exec(ready, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok


def test_exec_passes_argv_through_unchanged(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl, ready: str
) -> None:
    argv = ["printf", "%s|", "two words", "--flag", "$HOME", "'quoted'"]
    result = backend.exec(ready, argv, timeout=10)
    assert result.ok
    assert result.stdout == "two words|--flag|$HOME|'quoted'|"
    assert fake_orbctl.calls() == [["run", "-m", ready, *argv]]


def test_exec_runs_as_the_configured_user(fake_orbctl: FakeOrbctl, state_dir: Path) -> None:
    backend = OrbstackBackend(OrbstackSettings(user="tester"), state_dir)
    backend.create(spec("vmp-t-a"))
    fake_orbctl.clear_log()
    backend.exec("vmp-t-a", ["true"], timeout=10)
    assert fake_orbctl.calls() == [["run", "-m", "vmp-t-a", "-u", "tester", "true"]]


def test_exec_timeout_raises_exec_timeout(backend: OrbstackBackend, ready: str) -> None:
    with pytest.raises(ExecTimeout, match=r"did not finish within 0\.5s"):
        backend.exec(ready, ["sleep", "30"], timeout=0.5)


def test_exec_in_a_missing_machine_raises_backend_error(backend: OrbstackBackend) -> None:
    with pytest.raises(BackendError, match=r"'vmp-t-ghost' not found"):
        backend.exec("vmp-t-ghost", ["true"], timeout=10)


def test_exec_refuses_argv_that_orbctl_would_read_as_its_own_flag(
    backend: OrbstackBackend, ready: str
) -> None:
    with pytest.raises(BackendError, match="program name"):
        backend.exec(ready, ["-u", "root", "id"], timeout=10)
    with pytest.raises(BackendError, match="empty"):
        backend.exec(ready, [], timeout=10)


# -- delete -------------------------------------------------------------------------------


def test_delete_issues_documented_command_line_and_drops_the_record(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl, state_dir: Path
) -> None:
    backend.create(spec("vmp-t-a"))
    fake_orbctl.clear_log()
    backend.delete("vmp-t-a")
    assert fake_orbctl.calls() == [["delete", "-f", "vmp-t-a"]]
    assert not record_path(state_dir, "vmp-t-a").exists()
    assert backend.list(PREFIX) == []


def test_delete_is_idempotent(backend: OrbstackBackend, fake_orbctl: FakeOrbctl) -> None:
    backend.create(spec("vmp-t-a"))
    backend.delete("vmp-t-a")
    backend.delete("vmp-t-a")  # orbctl says "machine not found": that is success
    backend.delete("vmp-t-never")


def test_delete_of_a_missing_machine_still_drops_a_stale_record(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl, state_dir: Path
) -> None:
    backend.create(spec("vmp-t-a"))
    fake_orbctl.run("delete", "-f", "vmp-t-a")  # gone behind our back
    backend.delete("vmp-t-a")
    assert not record_path(state_dir, "vmp-t-a").exists()


def test_failed_delete_keeps_the_record_and_quotes_orbctl(
    backend: OrbstackBackend, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.create(spec("vmp-t-a"))
    monkeypatch.setenv("FAKE_ORBCTL_FAIL", "delete")
    with pytest.raises(BackendError, match=r"invalid transition from creating to deleting"):
        backend.delete("vmp-t-a")
    assert record_path(state_dir, "vmp-t-a").exists()


# -- list ---------------------------------------------------------------------------------


def test_list_returns_owned_machines_with_labels_from_their_records(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a", slot="0"))
    backend.create(spec("vmp-t-b", slot="1"))
    fake_orbctl.run("stop", "vmp-t-b")
    fake_orbctl.clear_log()
    listed = {m.name: m for m in backend.list(PREFIX)}
    assert fake_orbctl.calls() == [["list", "--format", "json"]]
    assert set(listed) == {"vmp-t-a", "vmp-t-b"}
    assert dict(listed["vmp-t-a"].labels) == {**LABELS, "slot": "0"}
    assert dict(listed["vmp-t-b"].labels) == {**LABELS, "slot": "1"}
    assert listed["vmp-t-a"].running and not listed["vmp-t-b"].running


def test_list_ignores_machines_without_the_prefix(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a"))
    assert fake_orbctl.run("create", "ubuntu", "personal-dev").returncode == 0
    assert fake_orbctl.run("create", "alpine", "vmp-other-x").returncode == 0
    assert [m.name for m in backend.list(PREFIX)] == ["vmp-t-a"]


def test_machine_without_a_record_lists_with_no_labels(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    # someone else's machine that happens to share our prefix: the reaper must leave it alone
    assert fake_orbctl.run("create", "alpine", "vmp-t-foreign").returncode == 0
    [machine] = backend.list(PREFIX)
    assert machine.name == "vmp-t-foreign"
    assert dict(machine.labels) == {}


def test_corrupt_record_counts_as_no_labels(backend: OrbstackBackend, state_dir: Path) -> None:
    backend.create(spec("vmp-t-a"))
    record_path(state_dir, "vmp-t-a").write_text("{not json")
    assert dict(backend.list(PREFIX)[0].labels) == {}


def test_list_with_unparseable_output_raises_backend_error_quoting_it(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    # an orbctl that ignores --format prints the recorded table instead of JSON
    table = (RECORDINGS / "list-table.txt").read_text()
    (fake_orbctl.bin_dir / "orbctl").write_text(
        f"#!/bin/sh\ncat '{RECORDINGS / 'list-table.txt'}'\n"
    )
    with pytest.raises(BackendError) as info:
        backend.list(PREFIX)
    assert "cannot parse `orbctl list --format json`" in str(info.value)
    assert table.splitlines()[2].strip() in str(info.value)


# -- parsing of the recordings ------------------------------------------------------------


def _recorded_lists() -> list[Path]:
    return sorted(RECORDINGS.glob("list-json-*.json"))


@pytest.mark.parametrize("recording", _recorded_lists(), ids=lambda p: p.name)
def test_every_recorded_list_output_parses(recording: Path) -> None:
    text = recording.read_text()
    machines = parse_list(text)
    expected = json.loads(text)
    assert [(m.name, m.state) for m in machines] == [(e["name"], e["state"]) for e in expected]
    assert [m.distro for m in machines] == [e["image"]["distro"] for e in expected]


def test_recorded_two_machine_list_parses_to_names_states_and_ids() -> None:
    machines = parse_list((RECORDINGS / "list-json-two-machines.json").read_text())
    assert [(m.name, m.running, m.id, m.version) for m in machines] == [
        ("alpine-runner1", True, "01J6BWXMDPEP62ANJWCXN6375F", "3.20"),
        ("ubuntu", False, "01H4TAYHCRPT4QR190KH912936", "lunar"),
    ]


def test_recorded_empty_list_parses_to_no_machines() -> None:
    assert parse_list((RECORDINGS / "list-json-empty.json").read_text()) == []


@pytest.mark.parametrize(
    "text",
    [
        "null",
        '{"name": "x"}',
        '[{"state": "running"}]',
        '[{"name": "x"}]',
        "[1]",
        "",
    ],
)
def test_malformed_list_output_raises_backend_error_quoting_it(text: str) -> None:
    with pytest.raises(BackendError) as info:
        parse_list(text)
    assert repr(text.strip()) in str(info.value)


def test_recorded_info_output_gives_the_ipv4_address() -> None:
    text = (RECORDINGS / "info-json-running.json").read_text()
    assert parse_info_address(text) == "198.19.249.228"


@pytest.mark.parametrize("change", [{"ip4": ""}, {"ip4": None}, {"ip4": ..., "ip6": ...}])
def test_info_without_an_address_gives_none(change: dict[str, object]) -> None:
    info = json.loads((RECORDINGS / "info-json-running.json").read_text())
    info.update({k: v for k, v in change.items() if v is not ...})
    for key in [k for k, v in change.items() if v is ...]:
        del info[key]
    assert parse_info_address(json.dumps(info)) is None


@pytest.mark.parametrize("text", ["[]", '{"ip4": "1.2.3.4"}', "oops", '{"record": {}, "ip4": 7}'])
def test_malformed_info_output_raises_backend_error(text: str) -> None:
    with pytest.raises(BackendError):
        parse_info_address(text)


@pytest.mark.parametrize(
    ("recording", "name"),
    [("error-machine-not-found.json", "ghost"), ("error-machine-not-found-2023.json", "openeuler")],
)
def test_recorded_machine_not_found_errors_are_recognised(recording: str, name: str) -> None:
    case = json.loads((RECORDINGS / recording).read_text())
    assert case["exit_code"] == 1
    assert is_machine_not_found(case["stderr"], name)
    assert not is_machine_not_found(case["stderr"], name + "x")


def test_other_recorded_errors_are_not_taken_for_machine_not_found() -> None:
    case = json.loads((RECORDINGS / "error-delete-invalid-transition.json").read_text())
    assert not is_machine_not_found(case["stderr"], "Alpine")
    assert not is_machine_not_found("some output\nmachine not found: 'a'\n", "a")


# -- address and the no-op capabilities ----------------------------------------------------


def test_address_is_the_ip4_that_orbctl_info_reports(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a"))
    fake_orbctl.clear_log()
    address = backend.address("vmp-t-a")
    assert address is not None and address.startswith("198.19.249.")
    assert fake_orbctl.calls() == [["info", "vmp-t-a", "--format", "json"]]


def test_address_of_a_stopped_or_missing_machine_is_none(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.create(spec("vmp-t-a"))
    fake_orbctl.run("stop", "vmp-t-a")
    assert backend.address("vmp-t-a") is None
    assert backend.address("vmp-t-ghost") is None


def test_reset_raises_capability_error(backend: OrbstackBackend) -> None:
    with pytest.raises(CapabilityError):
        backend.reset("vmp-t-a")


def test_snapshot_and_networks_do_nothing(
    backend: OrbstackBackend, fake_orbctl: FakeOrbctl
) -> None:
    backend.snapshot("vmp-t-a")
    backend.create_network("vmp-t-net", LABELS)
    backend.delete_network("vmp-t-net")
    assert backend.list_networks(PREFIX) == []
    assert fake_orbctl.calls() == []


def test_machines_of_one_pool_get_distinct_addresses(backend: OrbstackBackend) -> None:
    backend.create(MachineSpec(name="vmp-t-a", labels=LABELS, network="vmp-t-net"))
    backend.create(MachineSpec(name="vmp-t-b", labels=LABELS, index=1, network="vmp-t-net"))
    assert backend.address("vmp-t-a") != backend.address("vmp-t-b")
