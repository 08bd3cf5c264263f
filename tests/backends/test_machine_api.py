"""The VM-test API on podman machines: a busybox one (no systemd) here."""

from __future__ import annotations

import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.client import VM
from vmpool.config_backends import PodmanSettings
from vmpool.errors import (
    CapabilityError,
    CommandFailed,
    CommandSucceeded,
    TransferError,
    WaitTimeout,
)

pytestmark = pytest.mark.podman

LABELS = {"vmpool.session": "vmapitest", "vmpool.pool": "default"}


@pytest.fixture(scope="module")
def busybox_backend(tmp_path_factory: pytest.TempPathFactory) -> PodmanBackend:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    settings = PodmanSettings()
    build_image(settings)
    return PodmanBackend(settings, tmp_path_factory.mktemp("vmapi-state"))


@pytest.fixture(scope="module")
def busybox_machine(busybox_backend: PodmanBackend) -> Iterator[str]:
    name = f"vmapitest-{uuid.uuid4().hex[:8]}"
    try:
        busybox_backend.create(MachineSpec(name, LABELS))
        busybox_backend.start(name)
        busybox_backend.wait_ready(name, timeout=60)
        yield name
    finally:
        busybox_backend.delete(name)


@pytest.fixture
def vm(
    busybox_backend: PodmanBackend, busybox_machine: str, handle: Callable[[Backend, str], VM]
) -> VM:
    return handle(busybox_backend, busybox_machine)


def test_succeed_returns_stdout_and_raises_with_the_output(vm: VM) -> None:
    assert vm.succeed("hostname") == vm.name + "\n"
    with pytest.raises(CommandFailed, match="said-this"):
        vm.succeed("echo said-this; exit 2")


def test_fail_of_a_succeeding_command_raises(vm: VM) -> None:
    assert vm.fail("echo no; false") == "no\n"
    with pytest.raises(CommandSucceeded):
        vm.fail("true")


def test_wait_until_succeeds_waits_for_a_background_job(vm: VM) -> None:
    vm.succeed("rm -f /tmp/later; (sleep 0.3; echo done > /tmp/later) >/dev/null 2>&1 &")
    assert vm.wait_until_succeeds("cat /tmp/later", timeout=10) == "done\n"


def test_wait_for_port_sees_a_listener_inside_the_machine(vm: VM) -> None:
    vm.succeed("mkdir -p /tmp/www && httpd -p 127.0.0.1:8123 -h /tmp/www")
    try:
        vm.wait_for_port(8123, timeout=10)
    finally:
        vm.exec("pkill -f 'httpd -p 127.0.0.1:8123'")


def test_wait_for_port_times_out_with_a_clear_message(vm: VM) -> None:
    with pytest.raises(WaitTimeout, match=r"TCP port 8124 is not listening within 0.5s"):
        vm.wait_for_port(8124, timeout=0.5)


def test_wait_for_unit_on_a_machine_without_systemd_says_so(vm: VM) -> None:
    with pytest.raises(CapabilityError, match="does not run systemd"):
        vm.wait_for_unit("ssh.service", timeout=1)


def test_copy_to_and_copy_from_keep_files_and_modes(vm: VM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin").chmod(0o700)
    (src / "bin" / "run").write_text("#!/bin/sh\necho ran\n")
    (src / "bin" / "run").chmod(0o755)
    (src / "conf").write_text("k = v\n")
    (src / "conf").chmod(0o640)
    vm.copy_to(src, "/opt/app")
    assert vm.succeed("/opt/app/bin/run; stat -c '%a %U' /opt/app/bin /opt/app/conf") == (
        "ran\n700 root\n640 root\n"
    )
    vm.succeed("echo made-inside > /opt/app/new")
    vm.copy_from("/opt/app", tmp_path / "back")
    assert (tmp_path / "back" / "new").read_text() == "made-inside\n"
    assert stat.S_IMODE((tmp_path / "back" / "conf").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "back" / "bin").stat().st_mode) == 0o700


def test_copy_from_refuses_a_symlink_the_machine_planted(vm: VM, tmp_path: Path) -> None:
    vm.succeed("rm -rf /tmp/trap && mkdir /tmp/trap && ln -s /etc /tmp/trap/etc")
    with pytest.raises(TransferError):
        vm.copy_from("/tmp/trap", tmp_path / "trap")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.qemu
def test_succeed_copy_to_and_copy_from_on_a_qemu_guest(
    tmp_path: Path, handle: Callable[[Backend, str], VM]
) -> None:
    from vmpool.backends.qemu import QemuBackend
    from vmpool.backends.qemu.image import build_image as build_qemu_image
    from vmpool.config_backends import QemuSettings

    settings = QemuSettings(warmup="boot")
    build_qemu_image(settings)  # the user cache's image (.ci/install built it): kept if current
    backend = QemuBackend(settings, tmp_path / "state")
    name = f"vmapitest-{uuid.uuid4().hex[:8]}"
    try:
        backend.create(MachineSpec(name, LABELS))
        backend.start(name)
        backend.wait_ready(name, timeout=120)
        vm = handle(backend, name)
        assert vm.succeed("echo $((6 * 7))") == "42\n"
        src = tmp_path / "src"
        src.mkdir()
        (src / "tool").write_text("#!/bin/sh\necho from-host\n")
        (src / "tool").chmod(0o750)
        vm.copy_to(src, "/tmp/in")
        assert vm.succeed("/tmp/in/tool; stat -c %a /tmp/in/tool") == "from-host\n750\n"
        vm.succeed("echo from-guest > /tmp/in/made")
        vm.copy_from("/tmp/in", tmp_path / "out")
        assert (tmp_path / "out" / "made").read_text() == "from-guest\n"
        assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o750
    finally:
        backend.release(name)
        backend.delete(name)
