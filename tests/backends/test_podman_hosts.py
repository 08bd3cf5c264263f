"""A pool's machines on several podman hosts (``[podman] hosts``): podman services started here,
each with its own storage, run root, tmp dir and network config, on unix sockets (the network
rule: nothing but unix sockets). Machines run with ``--network none``: these "hosts" share one
kernel, and pool bridges of several podman services on one kernel would share bridge names
and firewall chains with this machine's own podman."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests._waiting import wait_until
from vmpool import _proc
from vmpool.backends.base import LABEL_POOL, LABEL_SESSION, MachineSpec
from vmpool.backends.podman import build_image
from vmpool.backends.podman.fleet import LABEL_PODMAN_HOST, FleetBackend, machine_hosts
from vmpool.config import PodmanHost, PodmanSettings
from vmpool.errors import HostUnreachable

pytestmark = pytest.mark.podman

REPO = Path(__file__).resolve().parents[2]


class Service:
    """One podman "host": ``podman system service`` with storage of its own, on a unix socket."""

    def __init__(self, base: Path, index: int, image_tar: Path) -> None:
        self.dir = base / f"h{index}"
        self.index = index
        self.socket = self.dir / "s.sock"
        self.url = f"unix://{self.socket}"
        self.image_tar = image_tar
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("root", "run", "tmp", "net"):
            (self.dir / sub).mkdir(parents=True, mode=0o700)
        # a default network of its own, should anything use one (machines here have none)
        (self.dir / "containers.conf").write_text(textwrap.dedent(f"""\
            [network]
            network_config_dir = "{self.dir / 'net'}"
            default_network = "vmpoolh{index}"
            default_subnet = "10.23{index}.0.0/24"
            """))

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # what a SIGKILLed service left
        env = {**os.environ, "CONTAINERS_CONF": str(self.dir / "containers.conf")}
        argv = ["podman", "--root", str(self.dir / "root"), "--runroot", str(self.dir / "run"),
                "--tmpdir", str(self.dir / "tmp"), "--network-config-dir", str(self.dir / "net"),
                "system", "service", "--time=0", self.url]
        with open(self.dir / "service.log", "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        wait_until(lambda: self.podman("version").returncode == 0, 30, f"{self.url} answering")

    def kill(self) -> None:
        """SIGKILL the service (its containers and their conmons live on, as on a host whose
        podman service died)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def podman(self, *args: str) -> _proc.ProcResult:
        return _proc.run(["podman", "--url", self.url, *args], timeout=60)

    def load_image(self) -> None:
        self.podman("load", "-q", "-i", str(self.image_tar)).check("load the image")

    def containers(self) -> list[str]:
        out = self.podman("ps", "-a", "--format", "{{.Names}}").check("ps").stdout
        return sorted(out.split())

    def volumes(self) -> list[str]:
        return self.podman("volume", "ls", "-q").check("volume ls").stdout.split()

    def processes(self, *, exec_sessions: bool) -> list[psutil.Process]:
        """Processes of this host's storage (conmon and the containers' cleanup)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            ours = any(str(self.dir / "root") in part for part in cmd)
            if ours and (exec_sessions or "--exec-attach" not in cmd):
                found.append(p)
        return found

    def destroy(self) -> None:
        """Everything of this host goes: containers, the service, lingering processes (exec
        sessions' conmons wait 300 s before they exit), mounts and files."""
        if self.proc is None:
            with contextlib.suppress(Exception):
                self.start()
        with contextlib.suppress(Exception):
            self.podman("rm", "-a", "-f", "-v", "-t", "0")
        self.stop()
        for p in self.processes(exec_sessions=True):
            with contextlib.suppress(psutil.Error):
                p.kill()
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.dir))), reverse=True):
            _proc.run(["umount", "-l", mount], timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def image_tar() -> Iterator[Path]:
    image = build_image(PodmanSettings())
    base = Path(tempfile.mkdtemp(prefix="vmh-img-"))
    tar = base / "image.tar"
    _proc.run(["podman", "save", "-q", "-o", str(tar), image], timeout=120).check("save")
    yield tar
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def services(image_tar: Path) -> Iterator[list[Service]]:
    """Three podman hosts (a short base path: a unix socket path holds 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="vmh-", dir="/tmp"))
    made = [Service(base, i, image_tar) for i in (1, 2, 3)]
    try:
        for s in made:
            s.start()
            s.load_image()
        yield made
    finally:
        for s in made:
            s.destroy()
        shutil.rmtree(base, ignore_errors=True)


def _settings(*urls: str) -> PodmanSettings:
    # --network none: see the module docstring
    return PodmanSettings(hosts=[PodmanHost(url=u) for u in urls],
                          extra_args=["--network", "none"])


def test_one_host_by_url_runs_a_machine_there_and_nowhere_else(
    services: list[Service], tmp_path: Path
) -> None:
    host = services[0]
    fleet = FleetBackend(_settings(host.url), tmp_path)
    name = f"vmh-{uuid.uuid4().hex[:8]}-0"
    fleet.check()
    fleet.create(MachineSpec(name, {LABEL_SESSION: "t", LABEL_POOL: "vmh-p"}))
    try:
        fleet.start(name)
        fleet.wait_ready(name, 30)
        fleet.snapshot(name)
        assert fleet.exec(name, ["sh", "-c", "echo hi > /tmp/mark; hostname"], 30).stdout \
            .strip() == name
        assert host.containers() == [name]
        assert services[1].containers() == []
        local = _proc.run(["podman", "ps", "-a", "--filter", f"name={name}", "--format",
                           "{{.Names}}"], timeout=60).check("ps").stdout.split()
        assert local == []  # not this machine's podman storage
        [info] = fleet.list(name)
        assert info.labels[LABEL_PODMAN_HOST] == host.url
        assert machine_hosts(tmp_path) == {name: host.url}
        fleet.reset(name)  # the full reset: the file written after the snapshot is gone
        assert fleet.exec(name, ["sh", "-c", "test -e /tmp/mark"], 30).returncode == 1
    finally:
        fleet.delete(name)
    assert host.containers() == []
    assert machine_hosts(tmp_path) == {}


def test_a_host_that_does_not_answer_is_named_and_skipped(
    services: list[Service], tmp_path: Path
) -> None:
    alive, dead = services[0], services[1]
    dead.kill()
    fleet = FleetBackend(_settings(dead.url, alive.url), tmp_path)
    fleet.check()  # one host works: enough
    name = f"vmh-{uuid.uuid4().hex[:8]}-0"
    fleet.create(MachineSpec(name, {LABEL_POOL: "vmh-q"}))
    try:
        assert machine_hosts(tmp_path) == {name: alive.url}
        with pytest.raises(HostUnreachable, match=f"podman host {dead.url} does not answer"):
            fleet.list("vmh-")
    finally:
        fleet.delete(name)
