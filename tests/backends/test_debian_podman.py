"""Debian machines on podman: systemd readiness, units, ports, ssh, identity and reset.

Two machines for the whole module (each systemd container takes about 2 s to be ready); the
image is built once (or found up to date: its recipe label matches).
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmpool
from vmpool import _proc
from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image, debian_image_name
from vmpool.client import VM
from vmpool.config_backends import PodmanSettings
from vmpool.errors import UnitFailed, WaitTimeout

pytestmark = [pytest.mark.podman, pytest.mark.xdist_group("debian-podman")]

LABELS = {"vmpool.session": "debiantest", "vmpool.pool": "default"}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> PodmanBackend:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    settings = PodmanSettings(distro="debian")
    assert build_image(settings) == debian_image_name()
    return PodmanBackend(settings, tmp_path_factory.mktemp("debian-state"))


@pytest.fixture(scope="module")
def machines(backend: PodmanBackend) -> Iterator[list[str]]:
    names = [f"debiantest-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    try:
        for name in names:
            backend.create(MachineSpec(name, LABELS))
            backend.start(name)
        for name in names:
            backend.wait_ready(name, timeout=120)
        yield names
    finally:
        for name in names:
            backend.delete(name)


@pytest.fixture
def vms(
    backend: PodmanBackend, machines: list[str], handle: Callable[[Backend, str], VM]
) -> list[VM]:
    return [handle(backend, name) for name in machines]


def test_a_ready_machine_runs_systemd_with_its_own_identity(vms: list[VM]) -> None:
    seen = []
    for vm in vms:
        assert vm.exec(["systemctl", "is-system-running"]).stdout.strip() in ("running", "degraded")
        assert vm.succeed("cat /proc/1/comm") == "systemd\n"
        hostname, machine_id, host_key = vm.succeed(
            "hostname; cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub"
        ).splitlines()
        assert hostname == vm.name
        assert len(machine_id) == 32
        ssh = vm.ssh
        endpoint = (vm.backend.address(vm.name), ssh.port if ssh is not None else None)
        seen.append((hostname, machine_id, host_key.split()[1], endpoint))
        guest_clock = float(vm.succeed("date +%s.%N"))
        assert abs(guest_clock - time.time()) < 2.0
    for i in range(4):  # hostname, machine-id, ssh host key and address/ssh port all differ
        assert seen[0][i] != seen[1][i]


def test_wait_for_unit_returns_for_an_active_unit(vms: list[VM]) -> None:
    vms[0].wait_for_unit("ssh.service", timeout=30)


def test_wait_for_unit_of_a_failing_unit_raises_at_once_with_its_status(vms: list[VM]) -> None:
    vm = vms[0]
    vm.succeed(
        # oneshot: "activating" until its command ends, then failed; a simple service is
        # "active" for the moment between its start and its exit, which wait_for_unit may see
        "printf '[Service]\\nType=oneshot\\n"
        "ExecStart=/bin/sh -c \"echo about-to-fail; exit 3\"\\n' "
        "> /etc/systemd/system/vmpool-broken.service && systemctl daemon-reload && "
        "systemctl start --no-block vmpool-broken.service"
    )
    started = time.monotonic()
    with pytest.raises(UnitFailed) as info:
        vm.wait_for_unit("vmpool-broken.service", timeout=60)
    assert time.monotonic() - started < 5
    assert "vmpool-broken.service" in str(info.value)
    assert "status=3" in str(info.value)


def test_wait_for_port_sees_sshd_and_times_out_on_a_closed_port(vms: list[VM]) -> None:
    vms[0].wait_for_port(22, timeout=10)
    with pytest.raises(WaitTimeout, match=r"TCP port 2222 is not listening within 0.5s"):
        vms[0].wait_for_port(2222, timeout=0.5)


def test_ssh_logs_in_on_127_0_0_1_with_the_pool_key(vms: list[VM]) -> None:
    vm = vms[0]
    access = vm.ssh
    assert (access.host, access.user) == ("127.0.0.1", "root")
    assert stat.S_IMODE(access.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(access.key_file.parent.stat().st_mode) == 0o700
    ran = _proc.run(access.argv("hostname"), timeout=60)
    assert (ran.returncode, ran.stdout) == (0, vm.name + "\n"), ran.stderr
    # published on the loopback only
    info = json.loads(_proc.run(["podman", "inspect", vm.name], timeout=30).stdout)[0]
    bindings = info["NetworkSettings"]["Ports"]["22/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    # and no password logins: the machine's sshd refuses them
    config = vm.succeed("sshd -T | grep -E '^(passwordauthentication|permitrootlogin) '")
    assert sorted(config.splitlines()) == [
        "passwordauthentication no", "permitrootlogin without-password"
    ]


def test_ansible_inventory_lists_every_machine_with_its_ssh_endpoint(
    vms: list[VM], tmp_path: Path
) -> None:
    path = vmpool.ansible_inventory(vms, tmp_path / "hosts.ini")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0] == "[vmpool]"
    for vm, line in zip(vms, lines[1:3], strict=True):
        access = vm.ssh
        assert line == (
            f"{vm.name} ansible_host=127.0.0.1 ansible_port={access.port} ansible_user=root "
            f"ansible_ssh_private_key_file={access.key_file}"
        )
    assert "[vmpool:vars]" in lines and "ansible_host_key_checking=False" in lines
    assert any("StrictHostKeyChecking=no" in line for line in lines)


def test_reset_brings_a_systemd_machine_back_to_its_ready_state(
    backend: PodmanBackend, vms: list[VM]
) -> None:
    vm = vms[1]
    machine_id = vm.succeed("cat /etc/machine-id")
    backend.snapshot(vm.name)
    vm.succeed("touch /etc/after-snapshot && systemctl stop ssh.service")
    started = time.monotonic()
    backend.reset(vm.name)
    took = time.monotonic() - started
    assert vm.fail("test -e /etc/after-snapshot") == ""
    assert vm.exec(["systemctl", "is-system-running"]).stdout.strip() in ("running", "degraded")
    vm.wait_for_unit("ssh.service", timeout=10)
    assert vm.succeed("hostname") == vm.name + "\n"
    ran = _proc.run(vm.ssh.argv("true"), timeout=60)
    assert ran.returncode == 0, ran.stderr
    print(f"reset of a systemd machine: {took:.2f}s; machine-id {machine_id.strip()} -> "
          f"{vm.succeed('cat /etc/machine-id').strip()}")


def test_ansible_ping_reaches_every_machine_of_the_inventory(
    vms: list[VM], tmp_path: Path
) -> None:
    # ansible-core is a dev extra (`pip install -e '.[dev]'`, as .ci/install does)
    inventory = vmpool.ansible_inventory(vms, tmp_path / "hosts.ini")
    ran = _proc.run(
        [sys.executable, "-m", "ansible.cli.adhoc", "-i", str(inventory), "vmpool", "-m", "ping"],
        timeout=300,
        env={"ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_NOCOLOR": "1"},
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    for vm in vms:
        assert f"{vm.name} | SUCCESS" in ran.stdout
