"""Fixtures every test directory may use."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmpool.backends.base import Backend
from vmpool.client import VM, Lease
from vmpool.ownership import current_process
from vmpool.state import Holder


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


@pytest.fixture
def handle() -> Callable[[Backend, str], VM]:
    """``handle(backend, name)``: the VM handle a test gets for a machine, without a pool."""

    def make(backend: Backend, name: str) -> VM:
        holder = Holder(**current_process().model_dump())
        return VM(name, backend, None, Lease("r", [name], {name: None}, holder, 0.0))

    return make
