"""Deploy tools reach pool machines over ssh: pytest-testinfra (paramiko) and Ansible.

Both log in with the pool's key as root on 127.0.0.1; host keys are not checked, since every
machine is new.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import testinfra

from vmpool import ansible_inventory
from vmpool.client import VM


def test_testinfra_over_paramiko_sees_a_debian_machine(pool_vm: VM, tmp_path: Path) -> None:
    ssh = pool_vm.ssh
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    host = testinfra.get_host(
        f"paramiko://{ssh.user}@{ssh.host}:{ssh.port}",
        ssh_identity_file=str(ssh.key_file),
        ssh_config=str(config),
    )
    assert host.system_info.distribution == "debian"
    assert host.package("openssh-server").is_installed
    assert host.service("ssh").is_running
    assert host.file("/etc/hostname").content_string.strip() == pool_vm.name
    assert host.user().name == "root"


@pytest.mark.vm(count=2)
def test_ansible_ad_hoc_reaches_two_machines(pool_vms: tuple[VM, ...], tmp_path: Path) -> None:
    inventory = ansible_inventory(pool_vms, tmp_path / "hosts.ini")
    ran = subprocess.run(
        [sys.executable, "-m", "ansible.cli.adhoc", "-i", str(inventory), "vmpool",
         "-m", "ansible.builtin.copy", "-a", "dest=/etc/deployed content=by-ansible"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_NOCOLOR": "1",
             "PATH": "/usr/bin:/bin"},
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    for vm in pool_vms:
        assert f"{vm.name} | CHANGED" in ran.stdout, ran.stdout
        assert vm.succeed("cat /etc/deployed") == "by-ansible"
