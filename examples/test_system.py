"""System checks: the kind of test that needs a real machine, not a mock."""

from vmpool.client import VM


def test_machine_has_a_kernel_and_a_shell(pool_vm: VM) -> None:
    result = pool_vm.exec(["uname", "-s"], check=True)
    assert result.stdout.strip() == "Linux"


def test_processes_are_visible(pool_vm: VM) -> None:
    result = pool_vm.exec("ls /proc | grep -c '^[0-9]'", check=True)
    assert int(result.stdout) >= 1


def test_exit_codes_and_stderr_come_back(pool_vm: VM) -> None:
    result = pool_vm.exec("echo oops >&2; exit 7")
    assert result.returncode == 7
    assert result.stderr.strip() == "oops"


def test_root_filesystem_is_writable(pool_vm: VM) -> None:
    pool_vm.exec("echo data > /tmp/probe && sync", check=True)
    assert pool_vm.exec(["cat", "/tmp/probe"], check=True).stdout == "data\n"
