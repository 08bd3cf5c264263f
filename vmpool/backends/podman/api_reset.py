"""The full reset through podman's REST API (vmpool.backends.podman.api): the fallback when a
live reset cannot run.

A reset SIGKILLs the container's cgroup from the host, deletes the container with its anonymous
volumes, creates it again from its warm image and starts it; it is running when inspect says
so (never an API exec: each leaves conmon processes for minutes). On a pool network the address
stays: the machine joins the network namespace of a small *holder* container
(``<name>-nh``, labelled ``vmpool.holder``) that owns the address; the holder is made at the
machine's first API reset, with the address the machine had, and removed with the machine.

The CLI path (``rm -f -v`` + ``run -d``) is kept where the API service cannot run or cannot say
the machine's recipe: docker; the service does not start (`api.start_api` logs why: no podman,
a socket path longer than ``AF_UNIX`` allows, no answer to ``/_ping``); the recipe holds an
option this module does not translate (any ``[podman] extra_args``); a systemd machine
(published ssh port, ``--systemd``: kept on the CLI, which handles their setup).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vmpool.backends.base import LABEL_POOL, LABEL_SESSION, validate_name
from vmpool.backends.podman import api
from vmpool.backends.podman.channel import ApiChannel
from vmpool.backends.podman.records import MachineRecord
from vmpool.errors import BackendError

log = logging.getLogger(__name__)

#: the label on holder containers (its value: the machine's name)
HOLDER_LABEL = "vmpool.holder"
_HOLDER_SUFFIX = "-nh"
#: inspect's keys of the files podman bind-mounts for a container's network
NET_FILES = ("HostsPath", "ResolvConfPath")
#: the holder's command: it only owns the network namespace
_HOLDER_COMMAND = ["sleep", "infinity"]
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30}
#: the options of a recipe that take a value
_VALUED = frozenset({"--name", "--hostname", "--label", "--network", "--runtime", "--ulimit",
                     "--memory", "--cpus", "--volume"})


def holder_name(name: str) -> str:
    """The holder container of machine ``name``'s network namespace."""
    return validate_name(f"{name}{_HOLDER_SUFFIX}")


class Untranslatable(Exception):
    """Internal: the recipe has an option the API spec here cannot say (keep the CLI path)."""


def container_spec(record: MachineRecord, image: str, *, netns_of: str | None) -> dict[str, Any]:
    """The libpod spec generator of ``record``'s container from ``image``; ``netns_of``: the
    holder whose network namespace it joins. Untranslatable for options it does not know."""
    spec: dict[str, Any] = {"image": image, "command": list(record.command),
                            "labels": {}, "mounts": [], "r_limits": []}
    args: Iterator[str] = iter(record.options)
    for arg in args:
        flag, eq, inline = arg.partition("=")
        given = inline if eq else next(args, None) if flag in _VALUED else ""
        if given is None:
            raise Untranslatable(f"{arg} without a value")
        if flag == "--name":
            spec["name"] = given
        elif flag == "--hostname":
            spec["hostname"] = given
        elif flag == "--label":
            key, _, val = given.partition("=")
            spec["labels"][key] = val
        elif flag == "--network" and given == "none" and not record.network:
            spec["netns"] = {"nsmode": "none"}
        elif flag == "--network":
            if given != record.network:  # not the pool's (extra_args): the CLI says it
                raise Untranslatable(arg)
            if netns_of is None:  # a new machine: on the pool network itself
                spec["netns"], spec["networks"] = {"nsmode": "bridge"}, {given: {}}
            # else the holder owns the pool network
        elif flag == "--runtime":
            spec["oci_runtime"] = given
        elif flag == "--ulimit":
            kind, _, limits = given.partition("=")
            soft, _, hard = limits.partition(":")
            spec["r_limits"].append({"type": kind, "soft": int(soft), "hard": int(hard or soft)})
        elif arg == "--init":
            spec["init"] = True
        elif flag == "--memory":
            spec.setdefault("resource_limits", {})["memory"] = {"limit": _bytes(given)}
        elif flag == "--cpus":
            period = 100_000
            cpu = {"quota": int(float(given) * period), "period": period}
            spec.setdefault("resource_limits", {})["cpu"] = cpu
        elif flag == "--volume":
            source, _, rest = given.partition(":")
            destination, _, opts = rest.partition(":")
            options = ["rbind", *([o for o in opts.split(",") if o] if opts else [])]
            spec["mounts"].append({"type": "bind", "source": source,
                                   "destination": destination, "options": options})
        else:
            raise Untranslatable(arg)
    if "name" not in spec:
        raise Untranslatable("no --name")
    if netns_of is not None:
        spec["netns"] = {"nsmode": "container", "value": netns_of}
    return spec


def api_spec(record: MachineRecord, image: str, *, netns_of: str | None) -> dict[str, Any] | None:
    """`container_spec`, or None where the CLI must make the container: a systemd machine
    (published ssh port, ``--systemd``: the CLI handles their setup) or an option the spec here
    cannot say (any ``[podman] extra_args``)."""
    if any(o.startswith("--systemd") or o == "--publish" for o in record.options):
        return None
    try:
        return container_spec(record, image, netns_of=netns_of)
    except (Untranslatable, ValueError) as exc:
        log.debug("%s on the CLI: the API spec cannot say %s", record.name, exc)
        return None


def _rewrite(path: Path, text: str) -> None:
    """Make ``path`` ``text``, 0644 and (as root) root's, in place (it is bind-mounted: a
    rename would not show in the container)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
        os.fchmod(out.fileno(), 0o644)
        if os.geteuid() == 0:  # rootless: the files are the user's already
            os.fchown(out.fileno(), 0, 0)


def _bytes(text: str) -> int:
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


class ApiReset:
    """Full resets of one backend's machines through the pool's API service (podman only)."""

    def __init__(self, channel: ApiChannel) -> None:
        self._channel = channel
        self._timeout = channel.timeout

    def reset(self, record: MachineRecord, image: str, *,
              before_create: Callable[[], None]) -> bool:
        """Recreate ``record``'s machine from ``image``, calling ``before_create`` once the old
        container is gone; False (nothing done) where the CLI path must do it. BackendError
        when the API failed part-way (the caller's CLI path then makes the machine anew)."""
        holder = holder_name(record.name) if record.network else None
        spec = api_spec(record, image, netns_of=holder)
        if spec is None:
            return False
        client = self._channel.client(start=True)
        if client is None:
            return False
        try:
            self._recreate(client, record, spec, holder, before_create)
        except BackendError as exc:
            if not isinstance(exc, api.ApiError):  # the service did not answer
                self._channel.lost(client)
            raise
        return True

    def _recreate(self, client: api.PodmanApi, record: MachineRecord, spec: dict[str, Any],
                  holder: str | None, before_create: Callable[[], None]) -> None:
        api.remove(client, record.name, timeout=self._timeout)
        before_create()
        if holder is not None and not self._holder_running(client, holder):
            # the machine's first API reset: its address was its own, now freed; the holder
            # takes it over
            self._make_holder(client, record, holder, spec)
        info = api.run(client, spec, timeout=self._timeout)
        if holder is not None:
            # a joining container shares the holder's hosts and resolv.conf (a test may have
            # changed them) and podman writes the holder's name in them: the ready-time ones back
            for key, text in record.net_files.items():
                if info.get(key):
                    _rewrite(Path(str(info[key])), text)

    @staticmethod
    def _holder_running(client: api.PodmanApi, holder: str) -> bool:
        info = client.inspect(holder)
        return bool(info and (info.get("State") or {}).get("Running"))

    def _make_holder(self, client: api.PodmanApi, record: MachineRecord, holder: str,
                     machine: dict[str, Any]) -> None:
        assert record.network is not None
        client.delete(holder)  # a stopped one left by a crash
        # the machine's name resolves on the network to the holder, which has its address
        network: dict[str, Any] = {"aliases": [record.name]}
        if record.ip:
            network["static_ips"] = [record.ip]
        labels = {k: v for k, v in machine["labels"].items() if k in (LABEL_SESSION, LABEL_POOL)}
        spec = {
            "name": holder, "image": record.image, "command": _HOLDER_COMMAND,
            "labels": {**labels, HOLDER_LABEL: record.name},
            "netns": {"nsmode": "bridge"}, "networks": {record.network: network},
            "r_limits": machine["r_limits"],
            **({"oci_runtime": machine["oci_runtime"]} if "oci_runtime" in machine else {}),
        }
        api.run(client, spec, timeout=self._timeout)
        log.info("reset %s: holder %s keeps address %s", record.name, holder, record.ip)


def holders(names: Sequence[str]) -> list[str]:
    """The holder containers machines ``names`` may have."""
    return [holder_name(n) for n in names if len(n) + len(_HOLDER_SUFFIX) <= 63]
