"""A Debian package with a systemd service: build it, install it, wait for it, use it.

Then show that the next test's machine has none of it (the pool resets machines between tests).
"""

from pathlib import Path

import pytest

from vmpool.client import VM
from vmpool.errors import WaitTimeout

PORT = 8080
UNIT = "hello-vmpool.service"

CONTROL = """\
Package: hello-vmpool
Version: 1.0
Architecture: all
Maintainer: vmpool examples <examples@vmpool.invalid>
Depends: python3
Description: a tiny web service for the vmpool examples
"""
SERVICE = f"""\
[Unit]
Description=hello-vmpool web service

[Service]
WorkingDirectory=/usr/share/hello-vmpool
ExecStart=/usr/bin/python3 -m http.server {PORT} --bind 127.0.0.1

[Install]
WantedBy=multi-user.target
"""
FETCH = f"""\
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:{PORT}/", timeout=10).read().decode(), end="")
"""


@pytest.fixture
def package(pool_vm: VM, tmp_path: Path) -> str:
    """hello-vmpool_1.0_all.deb, made from a tree written on the host, built in the machine."""
    root = tmp_path / "hello-vmpool"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(CONTROL)
    (root / "lib" / "systemd" / "system").mkdir(parents=True)
    (root / "lib" / "systemd" / "system" / UNIT).write_text(SERVICE)
    (root / "usr" / "share" / "hello-vmpool").mkdir(parents=True)
    (root / "usr" / "share" / "hello-vmpool" / "index.html").write_text("hello from a .deb\n")
    pool_vm.copy_to(root, "/tmp/build/hello-vmpool")
    pool_vm.succeed("dpkg-deb --build --root-owner-group /tmp/build/hello-vmpool /tmp/hello.deb")
    return "/tmp/hello.deb"


def test_install_the_package_and_use_its_service(pool_vm: VM, package: str) -> None:
    pool_vm.succeed(f"dpkg -i {package}")
    status = pool_vm.succeed(["dpkg-query", "-W", "-f", "${Status}", "hello-vmpool"])
    assert status == "install ok installed"
    pool_vm.succeed(f"systemctl daemon-reload && systemctl enable --now {UNIT}")
    pool_vm.wait_for_unit(UNIT, timeout=30)
    pool_vm.wait_for_port(PORT, timeout=30)
    # the client runs inside the machine too: nothing is sent from the host's network
    assert pool_vm.succeed(["python3", "-c", FETCH]) == "hello from a .deb\n"


def test_the_next_machine_has_none_of_it(pool_vm: VM) -> None:
    pool_vm.fail("dpkg -s hello-vmpool")
    pool_vm.fail(f"systemctl cat {UNIT}")
    pool_vm.fail("test -e /etc/deployed")  # test_deploy_tools' Ansible copy
    with pytest.raises(WaitTimeout):
        pool_vm.wait_for_port(PORT, timeout=0.5)
    assert pool_vm.succeed("test -e /tmp/hello.deb || echo clean") == "clean\n"
