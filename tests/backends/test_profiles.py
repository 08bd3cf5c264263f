"""Two profiles in one run on a real backend: QEMU guests with different memory sizes.

Each test checks, inside its machine, that it got the profile it asked for; a test in the run
reads `vmpool status --json` and sees one pool per profile.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmpool.backends import make_backend
from vmpool.config import load

pytestmark = [pytest.mark.qemu, pytest.mark.xdist_group("profiles-qemu")]

SUITE = """
import json, subprocess, sys
import pytest

def mem_mib(vm):
    out = vm.exec("grep MemTotal /proc/meminfo", check=True).stdout.split()
    return int(out[1]) // 1024

def test_default_profile_has_small_memory(pool_vm):
    assert "-big-" not in pool_vm.name
    assert mem_mib(pool_vm) < 300

@pytest.mark.vm(profile="big")
def test_big_profile_has_more_memory(pool_vm):
    assert "-big-" in pool_vm.name
    assert mem_mib(pool_vm) > 400

@pytest.mark.vm(profile="big")
def test_status_lists_one_pool_per_profile(pool_vm, request):
    state = request.config.getoption("vm_state_dir")
    doc = json.loads(subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "status", "--json", "--state-dir", state],
        capture_output=True, text=True, check=True, timeout=60).stdout)
    profiles = sorted(p["profile"] for p in doc["pools"])
    assert profiles == ["big", "default"], doc
"""


def test_each_test_runs_on_the_profile_it_asked_for(tmp_path: Path) -> None:
    (tmp_path / "test_profiles_suite.py").write_text(SUITE)
    (tmp_path / "pool.toml").write_text(
        '[pool]\nname_prefix = "vmprof"\n[qemu]\nmemory = 256\n'
        "[profiles.big]\nsize = 1\n[profiles.big.qemu]\nmemory = 512\n"
        "[profiles.unused]\nsize = 3\n"
    )
    state = tmp_path / "state"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--vm-pool-size",
            "1",
            "--vm-backend",
            "qemu",
            "--vm-state-dir",
            str(state),
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    # the summary reports per profile, and the unused profile was never warmed
    assert "big on qemu" in proc.stdout and "vmprof-" in proc.stdout
    assert "unused" not in proc.stdout
    b = make_backend("qemu", load(None, environ={}).default, state)
    assert b.list("vmprof-") == []
