"""The VM-test API on a sim machine: succeed/fail, waits, copies (and what unpacking refuses)."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpool import transfer
from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.sim import SimBackend
from vmpool.client import VM
from vmpool.config_backends import SimSettings
from vmpool.errors import CommandFailed, CommandSucceeded, TransferError, WaitTimeout


@pytest.fixture
def vm(tmp_path: Path, handle: Callable[[Backend, str], VM]) -> Iterator[VM]:
    backend = SimBackend(SimSettings(), tmp_path / "state")
    backend.create(MachineSpec("m", {}))
    backend.start("m")
    yield handle(backend, "m")
    backend.delete("m")


def machine_dir(vm: VM) -> Path:
    assert isinstance(vm.backend, SimBackend)
    return vm.backend.root / "machines" / vm.name / "fs"


def test_succeed_returns_stdout(vm: VM) -> None:
    assert vm.succeed("echo hello; echo noise >&2") == "hello\n"


def test_succeed_of_a_failing_command_raises_command_failed_with_its_output(vm: VM) -> None:
    with pytest.raises(CommandFailed) as info:
        vm.succeed("echo out; echo err >&2; exit 4")
    assert (info.value.returncode, info.value.stdout, info.value.stderr) == (4, "out\n", "err\n")


def test_fail_returns_the_output_of_a_failing_command(vm: VM) -> None:
    assert vm.fail("echo why; exit 1") == "why\n"


def test_fail_of_a_succeeding_command_raises_command_succeeded(vm: VM) -> None:
    with pytest.raises(CommandSucceeded, match="expected to fail") as info:
        vm.fail(["echo", "fine"])
    assert info.value.stdout == "fine\n"


def test_wait_until_succeeds_returns_once_the_command_succeeds(vm: VM) -> None:
    flag = machine_dir(vm) / "flag"
    threading.Timer(0.3, flag.touch).start()
    started = time.monotonic()
    assert vm.wait_until_succeeds("test -e flag && echo there", timeout=10) == "there\n"
    assert time.monotonic() - started < 5


def test_wait_until_succeeds_times_out_with_the_last_output(vm: VM) -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        vm.wait_until_succeeds("echo not-yet; exit 1", timeout=0.5)
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert "within 0.5s" in message and "not-yet" in message and "exited 1" in message


def test_wait_for_port_returns_while_something_listens(vm: VM) -> None:
    # sim machines share the host's network namespace: a listener here is one in the machine
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        vm.wait_for_port(server.getsockname()[1], timeout=5)


def test_wait_for_port_times_out_naming_the_port_and_timeout(vm: VM) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening
        with pytest.raises(WaitTimeout) as info:
            vm.wait_for_port(port, timeout=0.4)
    assert f"TCP port {port} is not listening within 0.4s" in str(info.value)


def test_listening_ports_reads_both_tables() -> None:
    from vmpool.client import _listening_ports

    table = (
        "  sl  local_address rem_address   st\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n"
        "   1: 0100007F:0016 0100007F:9C40 01 00000000:00000000\n"
        "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A\n"
    )
    assert _listening_ports(table) == {8080, 80}


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub").chmod(0o750)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    (root / "tool").write_text("#!/bin/sh\n")
    (root / "tool").chmod(0o755)
    (root / "sub" / "data").write_bytes(bytes(range(256)) * 1000)  # > one chunk in base64
    (root / "link").symlink_to("tool")


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
        for p in sorted(root.rglob("*"))
        if not p.is_symlink()
    }


def test_copy_to_and_back_keeps_contents_and_modes(vm: VM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    vm.copy_to(src, "deep/dir/copy")
    assert vm.succeed("stat -c %a deep/dir/copy/secret deep/dir/copy/sub") == "600\n750\n"
    back = tmp_path / "back"
    vm.copy_from("deep/dir/copy", back)
    assert _modes(back) == _modes(src)
    assert (back / "sub" / "data").read_bytes() == (src / "sub" / "data").read_bytes()
    assert os.readlink(back / "link") == "tool"


def test_copy_to_a_single_file_names_it_in_the_machine(vm: VM, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("one")
    vm.copy_to(tmp_path / "f", "renamed")
    assert vm.succeed("cat renamed") == "one"


def test_copy_from_a_missing_path_is_a_transfer_error(vm: VM, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="nothing-here"):
        vm.copy_from("nothing-here", tmp_path / "x")


def test_copy_from_refuses_a_symlink_pointing_out_and_writes_nothing(
    vm: VM, tmp_path: Path
) -> None:
    vm.succeed("mkdir d && ln -s ../../../../../../../etc d/escape && echo x > d/file")
    with pytest.raises(TransferError):
        vm.copy_from("d", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".vmpool")) == []
    assert not (tmp_path / "d").exists()


def test_copy_from_replaces_a_symlink_at_the_destination_without_following_it(
    vm: VM, tmp_path: Path
) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "dest").symlink_to(target)
    vm.succeed("echo new > f")
    vm.copy_from("f", tmp_path / "dest")
    assert target.read_text() == "keep"
    assert not (tmp_path / "dest").is_symlink() and (tmp_path / "dest").read_text() == "new\n"


def _tar(*entries: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "entries",
    [
        [_entry("d", tarfile.DIRTYPE), _entry("d/../../outside")],
        [_entry("d", tarfile.DIRTYPE), _entry("d/l", tarfile.SYMTYPE, "/etc"), _entry("d/l/x")],
        [_entry("d", tarfile.DIRTYPE), _entry("d/h", tarfile.LNKTYPE, "../../etc/passwd")],
        [_entry("d", tarfile.DIRTYPE), _entry("d/dev", tarfile.CHRTYPE)],
        [_entry("other")],
    ],
    ids=["dotdot", "through-symlink", "hardlink-out", "device", "other-top-entry"],
)
@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-3.11.2"])
def test_unpack_refuses_entries_that_escape(
    entries: list[tarfile.TarInfo], filters: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian 12's Python 3.11.2 has no tarfile filters: vmpool's own checks must hold alone
    monkeypatch.setattr(transfer, "_HAS_FILTERS", filters and transfer._HAS_FILTERS)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(TransferError):
        transfer.unpack(_tar(*entries, data=b"x"), "d", dest / "d")
    assert list(dest.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_unpack_without_tarfile_filters_keeps_modes_and_not_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "_HAS_FILTERS", False)
    d = _entry("d", tarfile.DIRTYPE)
    d.mode = 0o750
    f = _entry("d/f")
    f.mode, f.size, f.uid, f.gid = 0o4755, 1, 4242, 4242
    link = _entry("d/l", tarfile.SYMTYPE, "f")
    dest = tmp_path / "dest"
    transfer.unpack(_tar(d, f, link, data=b"x"), "d", dest)
    assert (dest / "f").read_bytes() == b"x"
    assert stat.S_IMODE((dest / "f").stat().st_mode) == 0o755  # setuid dropped
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert (dest / "f").stat().st_uid == os.getuid()
    assert os.readlink(dest / "l") == "f"
