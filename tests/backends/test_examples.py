"""The example suite through the pool on each real backend, as README's demo runs it.

Afterwards the backend must hold no machine and no network of ours, and no pool record remains.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from vmpool.backends import make_backend
from vmpool.config import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("podman", marks=[pytest.mark.podman, pytest.mark.xdist_group("ex-podman")]),
        pytest.param("qemu", marks=[pytest.mark.qemu, pytest.mark.xdist_group("ex-qemu")]),
    ],
)
def test_examples_pass_through_the_pool_and_leave_nothing(tmp_path: Path, backend: str) -> None:
    state = tmp_path / "state"
    # a prefix of this run's own: another run of this suite on the host (CI beside a
    # developer's run) has machines of its live session under "vmex-" meanwhile
    prefix = "vmex" + secrets.token_hex(3)
    (tmp_path / "pool.toml").write_text(f'[pool]\nname_prefix = "{prefix}"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--vm-pool-size",
            "2",
            "--vm-backend",
            backend,
            "--vm-state-dir",
            str(state),
            "--vm-pool-config",
            str(tmp_path / "pool.toml"),
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(EXAMPLES),
            str(EXAMPLES),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "14 passed" in proc.stdout
    assert "machines created 2" in proc.stdout, proc.stdout[-2000:]
    profile = load(None, environ={}).default
    b = make_backend(backend, profile, state)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert b.list(prefix + "-") == [], output
    assert b.list_networks(prefix + "-") == [], output
    assert not list(state.glob("*.json")), "pool record left behind"
    # and the process table: no guest of this run still running (a QEMU machine is a process
    # whose command line holds its run dir under this state dir; podman's are listed above)
    ours = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(state) in part for part in (p.info["cmdline"] or []))
    ]
    assert ours == [], ours



@pytest.mark.podman
@pytest.mark.xdist_group("ex-debian-podman")
def test_debian_examples_pass_on_podman_through_the_pool_and_leave_nothing(
    tmp_path: Path,
) -> None:
    from vmpool.backends.podman import build_image
    from vmpool.config_backends import PodmanSettings

    build_image(PodmanSettings(distro="debian"))  # .ci/install built it: kept while current
    _run_debian_examples(tmp_path, "podman")


@pytest.mark.qemu
@pytest.mark.xdist_group("ex-debian-qemu")
def test_debian_examples_pass_on_qemu_through_the_pool_and_leave_nothing(
    tmp_path: Path,
) -> None:
    from vmpool.backends.qemu import debian as qemu_debian
    from vmpool.config_backends import QemuSettings

    qemu_debian.find_image(QemuSettings())  # .ci/install built it (90 s): not built here
    _run_debian_examples(tmp_path, "qemu")
    # no qemu process of this state dir is left (its command line holds the run dir)
    state = str(tmp_path / "state")
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if any(state in arg for arg in p.info["cmdline"] or [])]
    assert left == []


def _run_debian_examples(tmp_path: Path, backend_name: str) -> None:
    """examples/debian/ with -n 2 through a pool of 2 machines on ``backend_name``."""
    state = tmp_path / "state"
    prefix = "vmdeb" + secrets.token_hex(3)
    config = tmp_path / "pool.toml"
    # examples/debian/pool.toml, with a prefix of this run's own
    shipped = (EXAMPLES / "debian" / "pool.toml").read_text()
    config.write_text(shipped.replace("[pool]\n", f'[pool]\nname_prefix = "{prefix}"\n', 1))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-n", "2",
            "--vm-backend", backend_name,
            "--vm-state-dir", str(state),
            "--vm-pool-config", str(config),
            "-p", "no:cacheprovider",
            "--rootdir", str(EXAMPLES / "debian"),
            str(EXAMPLES / "debian"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, output
    assert "6 passed" in proc.stdout, output
    assert "machines created 2" in proc.stdout, output
    profile = load(config, environ={}).default
    backend = make_backend(backend_name, profile, state)
    assert backend.list(prefix + "-") == [], output
    assert backend.list_networks(prefix + "-") == [], output
    assert not list(state.glob("*.json")), "pool record left behind"
