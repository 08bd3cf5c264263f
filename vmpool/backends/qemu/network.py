"""Pool networks of the QEMU backend: a record per network and the hub process serving it.

A pool network is a hub process (``hub.py``) listening on a unix socket in a 0700 directory of
ours (``sockets``); guests connect to it with ``-netdev stream``, so another local user can
neither read nor send their frames. Its pid and a token (also on its command line) are recorded
in the network's record, so any process can find and stop exactly it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import secrets
import shlex
import shutil
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from vmpool import _proc
from vmpool._files import private_dir as private_state_dir
from vmpool.backends.base import MachineInfo, validate_name
from vmpool.backends.qemu import hub, process, sockets
from vmpool.backends.qemu.records import (
    NETWORKS_DIR,
    Record,
    read_json,
    read_json_quiet,
    write_json,
)
from vmpool.errors import BackendError

log = logging.getLogger(__name__)

HUB_SOCK = "hub.sock"
HUB_LOG = "hub.log"
_HUB_START_TIMEOUT = 30.0
_HUB_SCRIPT = str(Path(hub.__file__).resolve())
_FIRST_HOST = 10


@dataclass(frozen=True)
class Network:
    name: str
    labels: dict[str, str]
    subnet: str
    prefix: int
    #: the directory of the hub's socket: 0700, ours (the network's own, or a short fallback)
    sock_dir: str
    #: names the hub serving this record (on its command line): it exits once it differs
    token: str
    #: the hub's pid, once it runs
    hub_pid: int | None = None

    @property
    def hub_sock(self) -> Path:
        return Path(self.sock_dir) / HUB_SOCK

    def host(self, index: int) -> str:
        host = _FIRST_HOST + index
        if host > 254:
            raise BackendError(
                f"network {self.name}: slot {index} does not fit in /{self.prefix} "
                f"(at most {255 - _FIRST_HOST} machines)"
            )
        return self.subnet.rsplit(".", 1)[0] + f".{host}"


def mac(network: str, index: int) -> str:
    """The MAC of machine ``index`` on ``network``: distinct per guest (QEMU's default is not)."""
    digest = hashlib.sha256(network.encode()).digest()
    return f"52:54:00:{digest[0]:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def guest_address_commands(record: Record, device: str) -> tuple[list[str], list[str]]:
    """Guest shell lines giving ``device`` the record's MAC and pool address, and lines
    printing them back (MAC, then address/prefix) for the caller to compare; none without."""
    if record.ip is None or record.mac is None:
        return [], []
    dev = shlex.quote(device)
    setting = [
        f"ip link set {dev} down",
        f"ip link set {dev} address {shlex.quote(record.mac)}",
        f"ip addr flush dev {dev}",
        f"ip addr add {shlex.quote(f'{record.ip}/{record.prefix}')} dev {dev}",
        f"ip link set {dev} up",
    ]
    printing = [
        f"cat /sys/class/net/{dev}/address",
        f"ip -o -4 addr show dev {dev} | awk '{{print $4}}'",
    ]
    return setting, printing


class Networks:
    """The network records under ``<root>/networks`` and their hubs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / NETWORKS_DIR
        #: one (re)start of a network's hub at a time (warm-up threads start machines at once)
        self._lock = threading.Lock()

    def create(self, name: str, labels: Mapping[str, str]) -> None:
        """Start the network's hub and record it with a /24 for ``name`` (from its hash).

        The hub's socket is in a 0700 directory of ours; it runs until delete(), or until this
        process has exited and no guest is connected to it.
        """
        validate_name(name)
        digest = hashlib.sha256(name.encode()).digest()
        private_state_dir(self.root)
        folder = sockets.private_dir(self.folder, repair=True)
        net_dir = sockets.private_dir(folder / name, repair=True)
        net = Network(
            name=name,
            labels=dict(labels),
            subnet=f"10.{digest[5]}.{digest[6]}.0",
            prefix=24,
            sock_dir=str(sockets.make_socket_dir(net_dir, HUB_SOCK)),
            token="",
        )
        try:
            with self._lock:
                self._start_hub(net)
        except BaseException:
            self.delete(name)
            raise

    def delete(self, name: str) -> None:
        """Stop the network's hub, remove its record and sockets; a missing network is success."""
        validate_name(name)
        path = self._path(name)
        data = read_json_quiet(path)
        # the record first: a hub that cannot be signalled sees it gone and exits by itself
        path.unlink(missing_ok=True)
        proc = find_hub(data.get("hub_pid"), data.get("token"))
        if proc is not None:
            process.kill(proc)
        net_dir = self.folder / name
        recorded = data.get("sock_dir")
        sock_dirs = {sockets.socket_dir(net_dir, HUB_SOCK)}  # also without a record
        if isinstance(recorded, str):
            sock_dirs.add(Path(recorded))
        shutil.rmtree(net_dir, ignore_errors=True)
        for sock_dir in sock_dirs - {net_dir}:
            if sockets.is_private_dir(sock_dir.parent):
                shutil.rmtree(sock_dir, ignore_errors=True)

    def list(self, prefix: str) -> builtins.list[MachineInfo]:
        """Network records whose name starts with ``prefix`` (a recorded network is usable)."""
        out: builtins.list[MachineInfo] = []
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob("*.json")):
            name = path.stem
            if not name.startswith(prefix):
                continue
            labels = read_json(path).get("labels")
            if isinstance(labels, dict):
                out.append(MachineInfo(name, {str(k): str(v) for k, v in labels.items()}, True))
        return out

    def read(self, name: str) -> Network | None:
        data = read_json(self._path(name))
        if not data:
            return None
        try:
            return Network(**data)
        except TypeError as exc:
            raise BackendError(f"network record {name} is unreadable: {exc}") from exc

    @contextlib.contextmanager
    def held(self, record: Record) -> Iterator[None]:
        """Around a guest's launch: its network's hub runs (started if gone: it exits once its
        creator is gone and no guest is connected) and a connection of ours holds it until
        qemu has connected, which it does before -daemonize returns. (A qemu that finds no
        hub to connect to starts all the same, silently offline.)"""
        if record.network is None or record.hub is None:
            yield
            return
        with self._lock:
            net = self.read(record.network)
            if net is None:
                raise BackendError(
                    f"network {record.network} does not exist (create_network() first)"
                )
            conn = None
            if find_hub(net.hub_pid, net.token) is not None:
                conn = _connect_quiet(net.hub_sock)
            if conn is None:
                log.info("network %s: its hub is not running; starting one", net.name)
                net = self._start_hub(net)
                conn = _connect_quiet(net.hub_sock)
                if conn is None:
                    raise BackendError(f"network {net.name}: its new hub does not accept")
        with conn:
            yield

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _start_hub(self, net: Network) -> Network:
        """Record ``net`` under a new token and start its hub (a previous one sees the new
        token and exits); returns the record with the hub's pid. Call with _lock held."""
        net = replace(net, token=secrets.token_hex(12), hub_pid=None)
        path = self._path(net.name)
        write_json(path, asdict(net))
        pid = start_hub(net.hub_sock, path, net.token, self.folder / net.name / HUB_LOG)
        net = replace(net, hub_pid=pid)
        write_json(path, asdict(net))
        log.debug("network %s: hub pid %d on %s", net.name, pid, net.hub_sock)
        return net


def start_hub(sock: Path, record: Path, token: str, log: Path) -> int:
    """Start a hub on ``sock`` serving the network whose record (holding ``token``) is at
    ``record``; returns its pid once it listens. It outlives the caller while guests use it."""
    argv = [
        sys.executable, "-I", _HUB_SCRIPT,
        "--socket", str(sock), "--record", str(record), "--token", token, "--log", str(log),
    ]
    result = _proc.run(argv, timeout=_HUB_START_TIMEOUT).check("start the network hub")
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError) as exc:
        raise BackendError(f"the network hub did not say its pid: {result.stdout!r}") from exc


def find_hub(pid: object, token: object) -> psutil.Process | None:
    """The running hub with ``pid`` and ``token`` (from a network record), or None."""
    if not isinstance(pid, int) or not isinstance(token, str):
        return None
    found = process.running(pid)
    if found is None:
        return None
    proc, cmdline = found
    try:
        ours = _HUB_SCRIPT in cmdline and cmdline[cmdline.index("--token") + 1] == token
    except (ValueError, IndexError):
        return None
    return proc if ours else None


def _connect_quiet(path: Path) -> socket.socket | None:
    """A connection to the unix socket ``path``, or None if nothing accepts there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock
