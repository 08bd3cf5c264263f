"""Fixtures every test directory may use."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def path_without(tmp_path: Path) -> Callable[..., str]:
    """``path_without("iptables")``: a PATH with every tool of today's PATH but those named.

    The tools are symlinked into one directory, so a test can hide a tool that shares a
    directory (``/usr/sbin``) with tools it still needs.
    """

    def build(*hidden: str) -> str:
        farm = tmp_path / ("path-without-" + "-".join(hidden))
        farm.mkdir()
        for directory in os.environ.get("PATH", "").split(os.pathsep):
            if not directory or not os.path.isdir(directory):
                continue
            for entry in os.scandir(directory):
                link = farm / entry.name
                if entry.name in hidden or link.exists() or link.is_symlink():
                    continue
                link.symlink_to(entry.path)
        return str(farm)

    return build
