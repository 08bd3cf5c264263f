"""A pool that cannot be made because a tool is missing says which tool, and `vmpool doctor`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Harness

ONE_TEST = """
def test_uses_a_machine(pool_vm):
    assert pool_vm.exec("true").ok
"""


@pytest.mark.slow
@pytest.mark.podman
def test_podman_pool_without_iptables_names_iptables_and_vmpool_doctor(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, path_without: Callable[..., str]
) -> None:
    harness.pytester.makepyfile(test_one=ONE_TEST)
    (harness.path / "pool.toml").write_text('[pool]\nname_prefix = "vmmisstool"\n')
    monkeypatch.setenv("PATH", path_without("iptables", "ip6tables"))
    result = harness.run("--vm-backend", "podman", "--vm-pool-size", "1")
    monkeypatch.undo()
    output = harness.output(result)
    assert result.ret != 0
    assert "iptables not found: apt-get install iptables" in output
    assert "Run `vmpool doctor --backend podman`" in output
    # the failed machines were removed, and the pool's network and record with them
    left = subprocess.run(
        ["podman", "ps", "-a", "--filter", "name=^vmmisstool", "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    nets = subprocess.run(
        ["podman", "network", "ls", "--filter", "name=^vmmisstool", "--format", "{{.Name}}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert left == [] and nets == []
    assert harness.pool_files() == []


@pytest.mark.podman
def test_a_backend_that_fails_its_check_points_at_vmpool_doctor(harness: Harness) -> None:
    harness.pytester.makepyfile(test_one=ONE_TEST)
    (harness.path / "pool.toml").write_text(
        '[pool]\nname_prefix = "vmnoimage"\n[podman]\nimage = "localhost/vmpool-no-such:1"\n'
    )
    result = harness.run("--vm-backend", "podman", "--vm-pool-size", "1")
    output = harness.output(result)
    assert result.ret != 0
    assert "localhost/vmpool-no-such:1 not found" in output
    assert "Run `vmpool doctor --backend podman` to check what this host lacks" in output
    assert harness.pool_files() == []
