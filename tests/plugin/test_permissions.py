"""Nothing vmpool leaves in a state directory or its cache is group- or other-accessible (files
0600, directories 0700), during a session and after it, on sim, podman and qemu, under the
common umask 022 with which the review found 0644 records and 0755 directories."""

from __future__ import annotations

import inspect
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vmpool.backends.qemu.image import build_image
from vmpool.config_backends import QemuSettings

#: whole sessions with a stat of every file they made (12-32 s each under -n 2)
pytestmark = pytest.mark.slow

if TYPE_CHECKING:
    from conftest import Harness

#: as the plugin harness runs pytest (conftest.QUICK)
QUICK = ("-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest")

#: a test that walks the directories while its pool is live (machines, records, locks, agents)
SUITE = """
import os
import stat
from pathlib import Path

import pytest

{loose}

@pytest.mark.parametrize("i", range(2))
def test_walk_while_live(pool_vm, i):
    assert pool_vm.exec(["echo", "hi"]).stdout.strip() == "hi"
    found = _loose([Path(r) for r in {roots!r}])
    assert not found, "group/other-accessible:\\n" + "\\n".join(found)
"""


def _loose(roots: list[Path]) -> list[str]:
    found = []
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for path in [Path(folder), *(Path(folder) / n for n in files)]:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    found.append(f"{path} {stat.filemode(st.st_mode)}")
    return found


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the sessions inherit it
    try:
        yield
    finally:
        os.umask(old)


def _session(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, backend: str, toml: str = ""
) -> list[Path]:
    """Run a two-test session on ``backend``; returns the roots it was walked over."""
    cache = harness.path / "cache"  # platformdirs' user cache (the qemu accel verdict, templates)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    roots = [harness.state_dir, cache]
    harness.pytester.makefile(".toml", pool=f"[pool]\nsize = 2\n{toml}")
    suite = SUITE.format(loose=inspect.getsource(_loose), roots=[str(r) for r in roots])
    harness.pytester.makepyfile(test_suite=suite)
    result = harness.pytester.runpytest_subprocess(
        *QUICK, "-n", "2", "--vm-backend", backend, "--vm-state-dir", str(harness.state_dir),
        timeout=300,
    )  # fmt: skip
    assert result.ret == 0, harness.output(result)
    result.assert_outcomes(passed=2)
    return roots


def test_sim_session_leaves_nothing_accessible_to_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    roots = _session(harness, monkeypatch, "sim")
    assert (harness.state_dir / "sim").is_dir()
    assert _loose(roots) == []


@pytest.mark.podman
def test_podman_session_leaves_nothing_accessible_to_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    prefix = f"perm{os.getpid() % 100000}"
    roots = _session(harness, monkeypatch, "podman", f'name_prefix = "{prefix}"\n')
    assert (harness.state_dir / "podman").is_dir()
    assert _loose(roots) == []


@pytest.mark.qemu
def test_qemu_session_and_its_image_cache_leave_nothing_accessible_to_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu is not installed")
    images = harness.path / "cache" / "vmpool" / "images" / "qemu"
    build_image(QemuSettings(image_dir=images))  # the image cache, built under umask 022
    toml = f'[qemu]\nimage_dir = "{images}"\naccel = "tcg"\n'
    roots = _session(harness, monkeypatch, "qemu", toml)
    assert (harness.state_dir / "qemu").is_dir() and (images / "vmlinuz").is_file()
    assert _loose(roots) == []
