"""A pool's machines on several podman hosts (``[podman] hosts``): one backend over them all.

Each host (vmpool.backends.podman.hosts) has its own `PodmanBackend`. A new machine goes to the
answering host (``/_ping``) with the fewest of its pool's machines, then the fewest machines
overall, skipping hosts at their ``capacity``. Where each machine lives is recorded twice: the
label ``vmpool.podman_host`` on its container, and a placement file
``<state_dir>/podman-hosts/placements/<name>.json`` that every process of the state directory
reads (the controller, xdist workers, `vmpool status`, `vmpool gc`).

A host that stops answering: every call on one of its machines fails with HostUnreachable
naming the host (checked with a ping when a call fails, so a failure on a live host keeps its
own error and type); the pool replaces such a machine as it replaces any machine whose
pre-ping, reset or test failed, and new machines go only to answering hosts. Deleting a
machine of a host that does not answer fails (its placement is kept), so teardown leaves it in
the pool's record and `vmpool gc` removes it once the host is back. Listing machines or
networks fails while any host does not answer: a reaper must not take what it cannot see for
gone.

Machines of one pool on different hosts do not share a network: the pool's network is made on
each host its machines go to, under the same name.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from vmpool.backends.base import (
    LABEL_POOL,
    BackendBase,
    Capabilities,
    ExecResult,
    MachineInfo,
    MachineSpec,
    SshAccess,
    validate_name,
)
from vmpool.backends.podman.hosts import HOSTS_DIR, Host
from vmpool.backends.podman.records import write_json
from vmpool.config_backends import ImageSettings, PodmanSettings
from vmpool.errors import BackendError, BackendUnavailable, HostUnreachable, VmPoolError

log = logging.getLogger(__name__)

#: the label on each machine's container naming the host's URL
LABEL_PODMAN_HOST = "vmpool.podman_host"
_PLACEMENTS = "placements"
_T = TypeVar("_T")


def machine_hosts(state_dir: Path) -> dict[str, str]:
    """``{machine: host URL}`` of every placed machine of ``state_dir`` (for `vmpool status`)."""
    out: dict[str, str] = {}
    for path in sorted((Path(state_dir) / HOSTS_DIR / _PLACEMENTS).glob("*.json")):
        url = _read_url(path)
        if url is not None:
            out[path.name[: -len(".json")]] = url
    return out


def _read_url(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


class FleetBackend(BackendBase):
    """Podman containers as machines, spread over the podman services of ``[podman] hosts``."""

    name = "podman"
    capabilities = Capabilities(reset=True, labels=True, network=True)

    def __init__(
        self, settings: PodmanSettings, state_dir: Path, image: ImageSettings | None = None
    ) -> None:
        if not settings.hosts:
            raise ValueError("a fleet needs [podman] hosts")
        if settings.runtime is not None:
            log.warning("[podman] runtime is not used on [podman] hosts: each host's "
                        "containers.conf chooses its OCI runtime")
        self.settings = settings
        self.hosts = [Host(entry, settings, state_dir, image) for entry in settings.hosts]
        self._by_url = {h.url: h for h in self.hosts}
        self._placements = Path(state_dir) / HOSTS_DIR / _PLACEMENTS
        #: one choice of host at a time: each counts the placements the one before wrote
        self._choose = threading.Lock()
        #: hosts whose check() passed in this process
        self._checked: set[str] = set()
        #: the pool's network (create_network), made on each host before its first machine
        self._network: tuple[str, dict[str, str]] | None = None
        self._networked: set[str] = set()

    # -- where machines are ----------------------------------------------------------------
    def host_of(self, name: str) -> Host | None:
        """The host machine ``name`` was placed on (None: not placed by this state dir)."""
        url = _read_url(self._placements / f"{validate_name(name)}.json")
        if url is None:
            return None
        host = self._by_url.get(url)
        if host is None:
            raise BackendError(f"machine {name} lives on podman host {url}, which is not in "
                               "[podman] hosts any more; add it back to remove the machine")
        return host

    def _place(self, name: str, host: Host, pool: str | None) -> None:
        write_json(self._placements / f"{name}.json", {"url": host.url, "pool": pool})

    def _unplace(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._placements / f"{name}.json").unlink()

    def _load(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Per host URL: its machines, and how many of them each pool has."""
        counts: dict[str, tuple[int, dict[str, int]]] = {h.url: (0, {}) for h in self.hosts}
        for path in self._placements.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            url, pool = data.get("url"), str(data.get("pool"))
            if url in counts:
                total, pools = counts[url]
                pools[pool] = pools.get(pool, 0) + 1
                counts[url] = (total + 1, pools)
        return counts

    def _pick(self, pool: str | None) -> Host:
        """The answering, checked host with room and the fewest of ``pool``'s machines."""
        load = self._load()
        reasons = []
        candidates = []
        for index, host in enumerate(self.hosts):
            total, pools = load[host.url]
            if host.capacity is not None and total >= host.capacity:
                reasons.append(f"{host.url}: at its capacity ({host.capacity})")
                continue
            try:
                self._check_host(host)
            except BackendError as exc:
                reasons.append(f"{host.url}: {exc}")
                continue
            candidates.append(((pools.get(str(pool), 0), total, index), host))
        if not candidates:
            raise HostUnreachable("no podman host can take a machine: " + "; ".join(reasons))
        return min(candidates, key=lambda c: c[0])[1]

    def _check_host(self, host: Host) -> None:
        if not host.answers():
            raise HostUnreachable(host.down_message("ping"))
        if host.url not in self._checked:
            host.backend.check()
            self._checked.add(host.url)

    def _on(self, name: str, what: str, call: Callable[[Host], _T]) -> _T:
        """``call`` on the host of ``name``, `_guarded`."""
        host = self.host_of(name)
        if host is None:
            host = self._locate(name)
        return _guarded(host, f"{what} {name}", lambda: call(host))

    def _locate(self, name: str) -> Host:
        """Find an unplaced machine (made by another state directory) on the answering hosts."""
        silent = []
        for host in self.hosts:
            if not host.answers():
                silent.append(host.url)
            elif any(m.name == name for m in host.backend.list(name)):
                self._place(name, host, None)
                return host
        if silent:
            raise HostUnreachable(f"no answering podman host has a machine {name!r}; not "
                                  f"answering: {', '.join(silent)}")
        raise BackendError(f"no podman host of [podman] hosts has a machine {name!r}")

    # -- the protocol ----------------------------------------------------------------------
    def check(self) -> None:
        """BackendUnavailable when no host answers and passes its check; the others are
        logged and skipped until they do."""
        problems = []
        for host in self.hosts:
            try:
                self._check_host(host)
            except BackendError as exc:
                problems.append(f"{host.url}: {exc}")
        if len(problems) == len(self.hosts):
            raise BackendUnavailable("no podman host of [podman] hosts works: "
                                     + "; ".join(problems))
        for problem in problems:
            log.warning("podman host skipped for now: %s", problem)

    def prepare(self, *, networked: bool) -> None:
        """Check every host at once (image there, runtime verdict: a throwaway container on
        each) while tests are collected, so the first machines do not wait for it."""
        def check(host: Host) -> None:
            try:
                host.backend.prepare(networked=networked)
                self._check_host(host)
            except BackendError as exc:
                log.warning("podman host skipped for now: %s: %s", host.url, exc)

        with concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self.hosts), thread_name_prefix="vmpool-hosts"
        ) as pool:
            list(pool.map(check, self.hosts))

    def close(self) -> None:
        for host in self.hosts:
            host.backend.close()

    def create(self, spec: MachineSpec) -> None:
        name = validate_name(spec.name)
        pool = spec.labels.get(LABEL_POOL)
        with self._choose:
            host = self._pick(pool)
            self._place(name, host, pool)
        if spec.network is not None:
            self._ensure_network(host, spec.network)
        labels = {**spec.labels, LABEL_PODMAN_HOST: host.url}
        log.debug("creating %s on podman host %s", name, host.url)
        self._on(name, "create", lambda h: h.backend.create(replace(spec, labels=labels)))

    def start(self, name: str) -> None:
        self._on(name, "start", lambda h: h.backend.start(name))

    def wait_ready(self, name: str, timeout: float) -> None:
        self._on(name, "wait for", lambda h: h.backend.wait_ready(name, timeout))

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        return self._on(name, "exec in", lambda h: h.backend.exec(name, argv, timeout))

    def snapshot(self, name: str) -> None:
        self._on(name, "snapshot", lambda h: h.backend.snapshot(name))

    def reset(self, name: str) -> None:
        """The full reset (see vmpool.backends.podman.hosts): the container is recreated."""
        self._on(name, "reset", lambda h: h.backend.reset(name))

    def address(self, name: str) -> str | None:
        return self._on(name, "address of", lambda h: h.backend.address(name))

    def ssh(self, name: str) -> SshAccess | None:
        return self._on(name, "ssh to", lambda h: h.backend.ssh(name))

    def release(self, name: str) -> None:
        host = self.host_of(name)
        if host is not None:
            host.backend.release(name)

    def delete(self, name: str) -> None:
        """Delete on the machine's host; HostUnreachable (placement kept) when it does not
        answer. An unplaced machine is deleted on every host (each must answer)."""
        host = self.host_of(name)
        targets = [host] if host is not None else self.hosts
        for target in targets:
            if not target.answers(fresh=True):
                raise HostUnreachable(target.down_message(f"delete {name}"))
            target.backend.delete(name)
        self._unplace(name)

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """One batch per host; the machines of a host that does not answer are errors."""
        groups: dict[str, list[str]] = {}
        errors: dict[str, str] = {}
        for name in sorted(set(names)):
            try:
                host = self.host_of(name)
            except BackendError as exc:
                errors[name] = str(exc)
                continue
            for target in [host] if host is not None else self.hosts:
                groups.setdefault(target.url, []).append(name)
        for url, group in groups.items():
            host = self._by_url[url]
            if not host.answers(fresh=True):
                for name in group:
                    errors[name] = host.down_message(f"delete {name}")
                continue
            try:
                errors.update(host.backend.delete_many(group))
            except VmPoolError as exc:
                errors.update(dict.fromkeys(group, str(exc)))
        for name in {n for g in groups.values() for n in g} - set(errors):
            self._unplace(name)
        return errors

    def list(self, prefix: str) -> builtins.list[MachineInfo]:
        return self._everywhere("list machines", lambda h: h.backend.list(prefix))

    def list_networks(self, prefix: str) -> builtins.list[MachineInfo]:
        return self._everywhere("list networks", lambda h: h.backend.list_networks(prefix))

    def list_answering(
        self, prefix: str, *, networks: bool = False
    ) -> tuple[builtins.list[MachineInfo], builtins.list[str]]:
        """What the answering hosts list, and a line per host that does not (the reaper
        reaps on the others meanwhile)."""
        what = "list networks" if networks else "list machines"
        return self._answering(what, lambda h: h.backend.list_networks(prefix) if networks
                               else h.backend.list(prefix))

    def _everywhere(
        self, what: str, call: Callable[[Host], builtins.list[MachineInfo]]
    ) -> builtins.list[MachineInfo]:
        """``call`` on every host, merged; HostUnreachable naming the hosts that do not
        answer (a partial listing would look like machines gone)."""
        found, down = self._answering(what, call)
        if down:
            raise HostUnreachable("; ".join(down))
        return found

    def _answering(
        self, what: str, call: Callable[[Host], builtins.list[MachineInfo]]
    ) -> tuple[builtins.list[MachineInfo], builtins.list[str]]:
        found: dict[str, MachineInfo] = {}
        down = []
        for host in self.hosts:
            if not host.answers(fresh=True):
                down.append(host.down_message(what))
                continue
            for info in call(host):
                found.setdefault(info.name, info)
        return sorted(found.values(), key=lambda m: m.name), down

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Remembered, and made on each answering host now (on the others before their first
        machine of the pool)."""
        self._network = (name, dict(labels))
        self._networked.clear()
        for host in self.hosts:
            if host.answers():
                self._ensure_network(host, name)

    def _ensure_network(self, host: Host, name: str) -> None:
        if host.url in self._networked:
            return
        labels = self._network[1] if self._network and self._network[0] == name else {}
        _guarded(host, f"create network {name}",
                 lambda: host.backend.create_network(name, labels))
        self._networked.add(host.url)

    def delete_network(self, name: str) -> None:
        """Removed from every host; HostUnreachable when one does not answer (teardown then
        leaves it to `vmpool gc`)."""
        down = []
        for host in self.hosts:
            if not host.answers(fresh=True):
                down.append(host.down_message(f"delete network {name}"))
                continue
            host.backend.delete_network(name)
            self._networked.discard(host.url)
        if down:
            raise HostUnreachable("; ".join(down))

    def unreachable(self, names: Sequence[str]) -> dict[str, str]:
        """The machines of hosts that do not answer (a ping each, at most every second)."""
        out: dict[str, str] = {}
        for name in names:
            try:
                host = self.host_of(name)
            except (BackendError, ValueError):
                continue
            if host is not None and not host.answers():
                out[name] = host.down_message(f"ping for {name}")
        return out

    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> builtins.list[str]:
        """Each answering host's files of machines gone from it, and the placements of
        machines no host has (placements on a host that does not answer are kept)."""
        gone: builtins.list[str] = []
        for host in self.hosts:
            if host.answers():
                gone += host.backend.forget_missing(prefix, existing, older_than=older_than,
                                                   dry_run=dry_run)
        now = time.time()
        for path in self._placements.glob(f"{prefix}*.json"):
            name = path.name[: -len(".json")]
            placed = self._by_url.get(_read_url(path) or "")
            if name in existing or (placed is not None and not placed.answers()):
                continue
            try:
                if now - path.stat().st_mtime <= older_than:
                    continue
            except FileNotFoundError:
                continue
            if not dry_run:
                self._unplace(name)
            gone.append(f"{HOSTS_DIR}/{_PLACEMENTS}/{path.name}")
        return gone


def _guarded(host: Host, what: str, call: Callable[[], _T]) -> _T:
    """``call()``; its failure becomes HostUnreachable when ``host`` no longer answers, else
    propagates as it is (an ExecTimeout stays an ExecTimeout)."""
    try:
        return call()
    except VmPoolError as exc:
        if host.answers(fresh=True):
            raise
        raise HostUnreachable(host.down_message(what)) from exc
