"""What a podman host holds of a pool: its containers, as machines, and the files this backend
keeps beside machines that were removed outside vmpool."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from vmpool.backends.base import MachineInfo
from vmpool.backends.podman.api_reset import HOLDER_LABEL
from vmpool.backends.podman.channel import ApiChannel
from vmpool.backends.podman.image import RECIPE_LABEL
from vmpool.backends.podman.tool import Tool, json_rows, validate_prefix
from vmpool.backends.podman.tool import labels as parse_labels


def machines(tool: Tool, prefix: str, channel: ApiChannel | None = None) -> list[MachineInfo]:
    """The containers named ``prefix…``, holders left out (they are part of their machine);
    through the API service while ``channel`` holds one."""
    validate_prefix(prefix)
    rows = channel.call("list containers", lambda c: c.containers(prefix)) \
        if channel is not None else None
    if rows is None:
        rows = _listed(tool, prefix)
    found: dict[str, MachineInfo] = {}
    for row in rows:
        names = row.get("Names") or row.get("Name") or []
        if isinstance(names, str):
            names = names.split(",")
        labels = parse_labels(row.get("Labels"), ignore=RECIPE_LABEL)
        if HOLDER_LABEL in labels:
            continue
        running = str(row.get("State", "")).lower() == "running"
        for raw in names:
            cname = str(raw).lstrip("/")
            if cname.startswith(prefix):
                found[cname] = MachineInfo(cname, labels, running)
    return sorted(found.values(), key=lambda m: m.name)


def _listed(tool: Tool, prefix: str) -> list[dict[str, Any]]:
    """``ps -a`` of the containers named ``prefix…``: podman's rows, or docker's."""
    if tool.is_podman:
        args = ["ps", "-a", "--format", "json"]
        if prefix:
            args[2:2] = ["--filter", f"name=^{prefix}"]
    else:
        args = ["ps", "-a", "--no-trunc", "--format", "{{json .}}"]
        if prefix:
            args[2:2] = ["--filter", f"name={prefix}"]
    return json_rows(tool.run(*args).check("list containers").stdout)


def sweep(
    directory: Path, prefix: str, existing: set[str], *, older_than: float, dry_run: bool
) -> list[str]:
    """Remove the recipes, agent and live-reset directories under ``directory`` of machines
    named ``prefix…`` not in ``existing``, once untouched for ``older_than`` seconds."""
    validate_prefix(prefix)
    now = time.time()
    gone: list[str] = []
    leftovers = [(p.name[: -len(".json")], p) for p in directory.glob(f"{prefix}*.json")]
    leftovers += [(p.name, p) for p in (directory / "exec").glob(f"{prefix}*")]
    leftovers += [(p.name, p) for p in (directory / "live").glob(f"{prefix}*")]
    for name, path in leftovers:
        try:
            old = now - path.stat().st_mtime > older_than
        except FileNotFoundError:
            continue
        if name in existing or not old:
            continue
        if not dry_run:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        gone.append(str(path.relative_to(directory.parent)))
    return gone
