"""Deploy tools log in by ssh: the pool's key, root on 127.0.0.1, no questions asked."""

import subprocess

from vmpool.client import VM


def test_ssh_runs_a_command_as_root(pool_vm: VM) -> None:
    ssh = pool_vm.ssh
    ran = subprocess.run(ssh.argv("id", "-un"), capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "root\n"), ran.stderr
    assert ssh.host == "127.0.0.1"


def test_the_machine_is_a_systemd_debian_with_sudo_and_python(pool_vm: VM) -> None:
    assert pool_vm.succeed("systemctl is-system-running || true").strip() in ("running", "degraded")
    assert pool_vm.succeed(". /etc/os-release && echo $VERSION_ID") == "12\n"
    assert pool_vm.succeed("sudo -n python3 -c 'print(6 * 7)'") == "42\n"
