"""Package installation: build a tiny package in the machine, install it, run it, remove it."""

import pytest

from vmpool.client import VM

PACKAGE = """
set -e
mkdir -p /tmp/build/hello-1.0/bin
printf '#!/bin/sh\\necho "hello from $0 $*"\\n' > /tmp/build/hello-1.0/bin/hello
chmod 755 /tmp/build/hello-1.0/bin/hello
tar -czf /tmp/hello-1.0.tar.gz -C /tmp/build hello-1.0
"""


@pytest.fixture
def package(pool_vm: VM) -> str:
    pool_vm.exec(PACKAGE, check=True)
    return "/tmp/hello-1.0.tar.gz"


def test_install_then_run(pool_vm: VM, package: str) -> None:
    pool_vm.exec(f"mkdir -p /opt && tar -xzf {package} -C /opt", check=True)
    out = pool_vm.exec(["/opt/hello-1.0/bin/hello", "world"], check=True).stdout
    assert out.strip() == "hello from /opt/hello-1.0/bin/hello world"


def test_uninstall_removes_everything(pool_vm: VM, package: str) -> None:
    pool_vm.exec(f"mkdir -p /opt && tar -xzf {package} -C /opt", check=True)
    pool_vm.exec("rm -rf /opt/hello-1.0", check=True)
    assert pool_vm.exec("test -e /opt/hello-1.0").returncode == 1
