"""The full reset on the command line: where the API service cannot do it
(vmpool.backends.podman.api_reset says when), ``rm -f -v`` and ``run -d`` from the warm image."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vmpool.backends.podman.commands import Commands
from vmpool.backends.podman.records import MachineRecord
from vmpool.backends.podman.tool import Tool

log = logging.getLogger(__name__)


def cli_reset(tool: Tool, commands: Commands, record: MachineRecord, holder: str | None) -> None:
    """Replace ``record``'s container by a new one from its warm image, keeping the address
    where it can: through ``holder``'s network namespace (an API reset made one), else by
    asking for the recorded address."""
    name, image = record.name, str(record.warm_image)
    tool.remove_container(name)
    # the last user may have tampered with the agent's files: the new container gets new
    # ones (and its agent in wait_ready)
    commands.rebuild_dir(name)
    options = commands.with_mounts(name, record.options)
    if holder is not None:  # an API reset gave it a holder, which owns the address
        options = _joining(options, holder)
    run = ["run", "-d", *options]
    result = None
    if record.ip and holder is None:
        result = tool.run(*run, "--ip", record.ip, image, *record.command)
        if result.returncode != 0:
            # the address was taken meanwhile (or the network has no fixed subnet)
            log.info("reset %s: cannot keep address %s: %s", name, record.ip,
                     result.stderr.strip()[-300:])
            tool.remove_container(name)
    if result is None or result.returncode != 0:
        tool.run(*run, image, *record.command).check(f"reset {name}")


def _joining(options: Sequence[str], holder: str) -> list[str]:
    """``options`` with ``--network NET`` replaced by joining ``holder``'s namespace."""
    out: list[str] = []
    args = iter(options)
    for arg in args:
        if arg == "--network":
            next(args, None)
            out += ["--network", f"container:{holder}"]
        else:
            out.append(arg)
    return out
