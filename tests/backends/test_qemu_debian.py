"""The QEMU backend with ``distro = "debian"``: systemd readiness, ssh, per-machine identity,
snapshot reset. Two machines booted once for the module (a cold boot is 20-30 s under TCG)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vmpool
from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.qemu import QemuBackend
from vmpool.backends.qemu import debian as qemu_debian
from vmpool.client import VM
from vmpool.config_backends import QemuSettings
from vmpool.errors import (
    BackendUnavailable,
    CommandFailed,
    CommandSucceeded,
    UnitFailed,
    WaitTimeout,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("ssh") is None,
        reason="qemu-system-x86_64 and ssh are not installed",
    ),
]

READY_TIMEOUT = 240.0


def _image_built() -> bool:
    try:
        qemu_debian.find_image(QemuSettings())
    except BackendUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Pair:
    backend: QemuBackend
    network: str
    a: str
    b: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not _image_built():
        # .ci/install builds it; building here would cost every developer's run 90 s
        pytest.fail(f"the QEMU Debian image is not built: {qemu_debian.BUILD_HINT}")
    state = tmp_path_factory.mktemp("qemu-debian")
    backend = QemuBackend(QemuSettings(distro="debian", accel="tcg"), state)
    run = uuid.uuid4().hex[:6]
    labels = {"vmpool.session": f"test-{run}"}
    p = Pair(backend, f"vmpool-deb-{run}-net", f"vmpool-deb-{run}-a", f"vmpool-deb-{run}-b")
    backend.create_network(p.network, labels)
    try:
        for index, name in enumerate((p.a, p.b)):
            backend.create(MachineSpec(name, labels, index=index, network=p.network))
            backend.start(name)
        for name in (p.a, p.b):
            backend.wait_ready(name, READY_TIMEOUT)
            backend.snapshot(name)
        yield p
    finally:
        for name in (p.a, p.b):
            backend.delete(name)
        backend.delete_network(p.network)
        assert backend.list("vmpool-deb-") == []


def _sh(p: Pair, name: str, script: str) -> str:
    result = p.backend.exec(name, ["sh", "-c", script], 60)
    assert result.ok, result
    return result.stdout.strip()


def test_a_debian_machine_is_ready_with_systemd_running_and_logs_in_by_ssh(p: Pair) -> None:
    state = p.backend.exec(p.a, ["systemctl", "is-system-running"], 30).stdout.strip()
    assert state in ("running", "degraded")
    access = p.backend.ssh(p.a)
    assert access is not None and access.host == "127.0.0.1" and access.user == "root"
    assert access.key_file.stat().st_mode & 0o777 == 0o600
    out = subprocess.run(access.argv("cat", "/etc/hostname"), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == p.a


def test_two_machines_differ_in_hostname_machine_id_host_keys_and_addresses(p: Pair) -> None:
    probe = ("hostname; cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
             " | awk '{print $2}'; cat /sys/class/net/eth1/address;"
             " ip -o -4 addr show dev eth1 | awk '{print $4}'")
    a = _sh(p, p.a, probe).split()
    b = _sh(p, p.b, probe).split()
    assert len(a) == len(b) == 5
    assert [x != y for x, y in zip(a, b, strict=True)] == [True] * 5, (a, b)
    assert a[0] == p.a and b[0] == p.b
    assert a[4].split("/")[0] == p.backend.address(p.a)
    ports = {p.backend.ssh(p.a).port, p.backend.ssh(p.b).port}  # type: ignore[union-attr]
    assert len(ports) == 2
    # the pool network joins them: a reaches b's address
    reach = f"timeout 10 bash -c '</dev/tcp/{p.backend.address(p.b)}/22' && echo ok"
    assert _sh(p, p.a, reach) == "ok"


def test_reset_restores_the_ready_state_and_sets_the_clock(p: Pair) -> None:
    _sh(p, p.a, "touch /root/left-behind; systemctl stop cron.service 2>/dev/null; true")
    p.backend.reset(p.a)
    assert _sh(p, p.a, "test -e /root/left-behind && echo there || echo gone") == "gone"
    guest = float(_sh(p, p.a, "date +%s.%N"))
    assert abs(guest - time.time()) < 2.0
    # identity is the machine's own after the restore too
    assert _sh(p, p.a, "hostname") == p.a
    access = p.backend.ssh(p.a)
    assert access is not None
    out = subprocess.run(access.argv("true"), capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr


def test_the_guest_has_no_route_off_the_host(p: Pair) -> None:
    # user-mode networking with restrict=on: nothing but the forwarded ssh port
    out = p.backend.exec(p.a, ["sh", "-c", "timeout 5 bash -c '</dev/tcp/10.0.2.2/22'"], 30)
    assert not out.ok


@pytest.fixture
def p(pair: Pair) -> Pair:
    return pair




# --- the VM-test API on a QEMU Debian guest (machine b; a is the reset test's) ----------------


@pytest.fixture
def vm(pair: Pair, handle: Callable[[Backend, str], VM]) -> VM:
    return handle(pair.backend, pair.b)


def test_succeed_and_fail_raise_with_the_output(vm: VM) -> None:
    assert vm.succeed("echo $((6 * 7))") == "42\n"
    with pytest.raises(CommandFailed, match="said-this"):
        vm.succeed("echo said-this; exit 2")
    assert vm.fail("echo no; false") == "no\n"
    with pytest.raises(CommandSucceeded):
        vm.fail("true")


def test_wait_for_unit_returns_for_an_active_unit_and_raises_at_once_for_a_failed_one(
    vm: VM,
) -> None:
    vm.wait_for_unit("ssh.service", timeout=30)
    vm.succeed(
        "printf '[Service]\\nType=oneshot\\n"
        "ExecStart=/bin/sh -c \"echo about-to-fail; exit 3\"\\n' "
        "> /etc/systemd/system/vmpool-broken.service && systemctl daemon-reload && "
        "systemctl start --no-block vmpool-broken.service"
    )
    started = time.monotonic()
    with pytest.raises(UnitFailed) as info:
        vm.wait_for_unit("vmpool-broken.service", timeout=60)
    assert time.monotonic() - started < 5
    assert "vmpool-broken.service" in str(info.value) and "status=3" in str(info.value)


def test_wait_for_port_sees_sshd_and_times_out_on_a_closed_port(vm: VM) -> None:
    vm.wait_for_port(22, timeout=30)
    with pytest.raises(WaitTimeout, match=r"TCP port 2222 is not listening within 0.5s"):
        vm.wait_for_port(2222, timeout=0.5)


def test_copy_to_and_copy_from_keep_files_and_modes(vm: VM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_text("#!/bin/sh\necho from-host\n")
    (src / "tool").chmod(0o750)
    vm.copy_to(src, "/opt/in")
    assert vm.succeed("/opt/in/tool; stat -c %a /opt/in/tool") == "from-host\n750\n"
    vm.succeed("echo from-guest > /opt/in/made")
    vm.copy_from("/opt/in", tmp_path / "out")
    assert (tmp_path / "out" / "made").read_text() == "from-guest\n"
    assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o750


def test_ssh_takes_the_pool_key_only_and_ansible_pings_both_machines(
    pair: Pair, handle: Callable[[Backend, str], VM], tmp_path: Path
) -> None:
    vms = [handle(pair.backend, name) for name in (pair.a, pair.b)]
    access = vms[0].ssh
    assert stat.S_IMODE(access.key_file.parent.stat().st_mode) == 0o700
    config = vms[0].succeed("sshd -T | grep -E '^(passwordauthentication|permitrootlogin) '")
    assert sorted(config.splitlines()) == [
        "passwordauthentication no", "permitrootlogin without-password"
    ]
    inventory = vmpool.ansible_inventory(vms, tmp_path / "hosts.ini")
    ran = subprocess.run(
        [sys.executable, "-m", "ansible.cli.adhoc", "-i", str(inventory), "vmpool", "-m", "ping"],
        capture_output=True, text=True, timeout=300, check=False,
        env={"ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_NOCOLOR": "1",
             "PATH": "/usr/bin:/bin"},
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    for machine in vms:
        assert f"{machine.name} | SUCCESS" in ran.stdout
