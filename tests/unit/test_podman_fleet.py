"""``[podman] hosts``: the config's validation, and the fleet's decisions (where a machine
goes, what a host that does not answer does to calls) on sim machines standing in for each
host's podman (tests/backends/test_podman_hosts.py runs real podman services)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from vmpool import config, reaper
from vmpool.backends import make_backend
from vmpool.backends.base import LABEL_POOL, ExecResult, MachineSpec
from vmpool.backends.podman import removal
from vmpool.backends.podman.backend import PodmanBackend
from vmpool.backends.podman.fleet import LABEL_PODMAN_HOST, FleetBackend, machine_hosts
from vmpool.backends.podman.records import RecordStore
from vmpool.backends.podman.remote_api import RemoteChannel
from vmpool.backends.podman.tool import Tool
from vmpool.backends.sim import SimBackend
from vmpool.config import PoolSettings
from vmpool.config_backends import PodmanHost, PodmanSettings, SimSettings
from vmpool.controller import Controller
from vmpool.errors import BackendError, ConfigError, HostUnreachable
from vmpool.ownership import ProcessRef, owner_labels
from vmpool.state import JsonStateDir


# -- the config ---------------------------------------------------------------------------------
def _problem(tmp_path: Path, hosts: str, extra: str = "") -> str:
    path = tmp_path / "pool.toml"
    path.write_text(f"[podman]\n{extra}hosts = {hosts}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    [problem] = err.value.problems
    return problem.removeprefix(f"{path}: ")


def test_hosts_take_urls_and_tables_with_a_capacity(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text('[podman]\nhosts = ["unix:///run/h1.sock", {url = "tcp://127.0.0.1:8081", '
                    'capacity = 4}, "ssh://ci@builder/run/podman/podman.sock"]\n')
    hosts = config.load(path, environ={}).default.podman.hosts
    assert [(h.url, h.capacity) for h in hosts] == [
        ("unix:///run/h1.sock", None), ("tcp://127.0.0.1:8081", 4),
        ("ssh://ci@builder/run/podman/podman.sock", None)]


@pytest.mark.parametrize(("entry", "says"), [
    ('"http://127.0.0.1:80"', "podman.hosts.0.url: 'http://127.0.0.1:80': the scheme must be"),
    ('"unix://relative.sock"', "podman.hosts.0.url: 'unix://relative.sock': a unix URL is "
                               "unix:///ABSOLUTE/PATH.sock"),
    ('"tcp://127.0.0.1"', "podman.hosts.0.url: 'tcp://127.0.0.1': a tcp URL needs a port"),
    ('"tcp://127.0.0.1:70000"', "podman.hosts.0.url: 'tcp://127.0.0.1:70000': not a URL"),
    ('"ssh://builder/run/p.sock"', "podman.hosts.0.url: 'ssh://builder/run/p.sock': an ssh URL "
                                   "needs a user"),
    ('"ssh://ci@builder"', "podman.hosts.0.url: 'ssh://ci@builder': an ssh URL needs the "
                           "service's socket path"),
    ('{url = "unix:///a.sock", capacity = 0}', "podman.hosts.0.capacity: must be >= 1"),
])
def test_a_bad_host_entry_is_named_with_its_key(tmp_path: Path, entry: str, says: str) -> None:
    assert _problem(tmp_path, f'["unix:///ok.sock", {entry}]'.replace(
        '"unix:///ok.sock", ', "")).startswith(says)


def test_a_host_listed_twice_and_hosts_on_docker_are_refused(tmp_path: Path) -> None:
    assert _problem(tmp_path, '["unix:///a.sock", "unix:///a.sock"]') == \
        "podman.hosts: 'unix:///a.sock' is listed twice"
    assert _problem(tmp_path, '["unix:///a.sock"]', 'tool = "docker"\n') == \
        'podman: hosts needs tool = "podman" (docker has no --url)'


def test_no_hosts_keeps_the_config_hash_a_pool_had() -> None:
    profile = config.Profile(name="default")
    hosted = config.Profile(name="default", podman=PodmanSettings(
        hosts=[PodmanHost(url="unix:///a.sock")]))
    assert profile.config_hash("podman") == "6771d127c3df"  # the hash before [podman] hosts
    assert hosted.config_hash("podman") != profile.config_hash("podman")


# -- the fleet ----------------------------------------------------------------------------------
class HostSim(SimBackend):
    """A host's podman: sim machines, and every call failing while the host is "down"."""

    def __init__(self, settings: SimSettings, state_dir: Path) -> None:
        super().__init__(settings, state_dir)
        self.up = True

    def _gate(self) -> None:
        if not self.up:
            raise BackendError("Cannot connect to Podman: connection refused")

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        self._gate()
        return super().exec(name, argv, timeout)

    def delete(self, name: str) -> None:
        self._gate()
        super().delete(name)


def _fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           capacities: Sequence[int | None] = (None, None, None)) -> FleetBackend:
    settings = PodmanSettings(hosts=[PodmanHost(url=f"unix:///nowhere/h{i}.sock", capacity=c)
                                     for i, c in enumerate(capacities)])
    fleet = FleetBackend(settings, tmp_path)
    for host in fleet.hosts:
        sim = HostSim(SimSettings(root=tmp_path / "sim" / host.id), tmp_path)
        host.backend = sim  # type: ignore[assignment]
        monkeypatch.setattr(host, "answers", lambda *, fresh=False, sim=sim: sim.up)
    return fleet


def _sim(fleet: FleetBackend, index: int) -> Any:
    return fleet.hosts[index].backend


def _make(fleet: FleetBackend, name: str, pool: str = "vmp-a") -> None:
    fleet.create(MachineSpec(name, {LABEL_POOL: pool}))
    fleet.start(name)


def test_machines_go_to_the_host_with_the_fewest_of_their_pools_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet(tmp_path, monkeypatch)
    for i in range(6):
        _make(fleet, f"vmp-a-{i}")
    _make(fleet, "vmp-b-0", pool="vmp-b")
    hosts = machine_hosts(tmp_path)
    urls = [h.url for h in fleet.hosts]
    assert sorted(u for n, u in hosts.items() if n.startswith("vmp-a")) == sorted(urls * 2)
    assert hosts["vmp-b-0"] == urls[0]  # a tie: the first listed
    [info] = [i for i in fleet.list("vmp-") if i.name == "vmp-a-1"]
    assert info.labels[LABEL_PODMAN_HOST] == hosts["vmp-a-1"]


def test_a_host_at_its_capacity_takes_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet(tmp_path, monkeypatch, capacities=(1, 2))
    for i in range(3):
        _make(fleet, f"vmp-a-{i}")
    assert sorted(machine_hosts(tmp_path).values()) == sorted(
        [fleet.hosts[0].url] + [fleet.hosts[1].url] * 2)
    with pytest.raises(HostUnreachable, match=r"at its capacity \(1\).*at its capacity \(2\)"):
        fleet.create(MachineSpec("vmp-a-3", {LABEL_POOL: "vmp-a"}))


def test_a_host_that_stops_answering_is_named_skipped_and_kept_for_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet(tmp_path, monkeypatch, capacities=(None, None))
    _make(fleet, "vmp-a-0")
    _make(fleet, "vmp-a-1")
    down = fleet.hosts[0]
    _sim(fleet, 0).up = False
    with pytest.raises(HostUnreachable, match=f"podman host {down.url} does not answer "
                                              r"\(exec in vmp-a-0\)"):
        fleet.exec("vmp-a-0", ["true"], 5)
    assert fleet.exec("vmp-a-1", ["true"], 5).ok
    _make(fleet, "vmp-a-2")  # the replacement: on the host that answers
    assert machine_hosts(tmp_path)["vmp-a-2"] == fleet.hosts[1].url
    with pytest.raises(HostUnreachable, match=r"\(delete vmp-a-0\)"):
        fleet.delete("vmp-a-0")
    with pytest.raises(HostUnreachable, match=r"\(list machines\)"):
        fleet.list("vmp-")  # a listing without that host would look like its machines gone
    errors = fleet.delete_many(["vmp-a-0", "vmp-a-1"])
    assert list(errors) == ["vmp-a-0"]
    # the machine of the host that does not answer keeps its placement, files and all
    assert fleet.forget_missing("vmp-", {"vmp-a-2"}, older_than=0) == []
    assert machine_hosts(tmp_path) == {"vmp-a-0": down.url, "vmp-a-2": fleet.hosts[1].url}
    _sim(fleet, 0).up = True  # back: gc's delete goes through
    fleet.delete("vmp-a-0")
    assert "vmp-a-0" not in machine_hosts(tmp_path)
    assert [i.name for i in fleet.list("vmp-")] == ["vmp-a-2"]


def test_no_answering_host_makes_the_fleet_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet(tmp_path, monkeypatch, capacities=(None, None))
    for i in (0, 1):
        _sim(fleet, i).up = False
    with pytest.raises(BackendError, match="no podman host of \\[podman\\] hosts works"):
        fleet.check()
    with pytest.raises(HostUnreachable, match="no podman host can take a machine"):
        fleet.create(MachineSpec("vmp-a-0", {LABEL_POOL: "vmp-a"}))


def test_the_pool_replaces_idle_machines_of_a_host_that_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _fleet(tmp_path, monkeypatch, capacities=(None, None))
    profile = config.Profile(name="default", pool=PoolSettings(network=False, backoff=0.0))
    state = JsonStateDir(tmp_path / "state")
    controller = Controller(directory=state, backend=fleet, profile=profile, size=2,
                            session="s1", serve=False)
    controller.start()
    try:
        pool = controller.wait_until_ready(2, 10)
        placed = machine_hosts(tmp_path)
        assert sorted(placed[m.name] for m in pool.machines) == sorted(h.url for h in fleet.hosts)
        down = fleet.hosts[0]
        _sim(fleet, 0).up = False

        def replaced() -> bool:
            ready = [m for m in controller.snapshot().machines if m.state.value == "ready"]
            hosts = machine_hosts(tmp_path)
            return len(ready) == 2 and all(hosts[m.name] != down.url for m in ready)

        wait_until(replaced, 10, "the idle machine of the silent host replaced")
        [lost] = [m for m in controller.snapshot().machines if m.state.value == "replacing"]
        assert f"podman host {down.url} does not answer" in (lost.error or "")
    finally:
        controller.stop(lease_timeout=5)
    # teardown could not delete it: the record keeps it for `vmpool gc`
    assert controller.left_machines == [lost.name]
    _sim(fleet, 0).up = True
    assert [i.name for i in fleet.list("")] == [lost.name]


# -- a backend with a URL -----------------------------------------------------------------------
@pytest.mark.parametrize(("url", "channel"), [
    ("unix:///run/h1.sock", "PodmanApi"), ("tcp://127.0.0.1:8081", "TcpApi"),
    ("ssh://ci@builder/run/podman/podman.sock", None)])
def test_a_backend_with_a_url_uses_that_hosts_api_and_nothing_host_side(
    tmp_path: Path, url: str, channel: str | None
) -> None:
    backend = PodmanBackend(PodmanSettings(exec_agent=False), tmp_path, url=url)
    assert backend._live is None and backend._api is None  # live and API resets: host-side
    client = backend._channel.client() if backend._channel is not None else None
    assert (type(client).__name__ if client is not None else None) == channel
    assert backend._tool.url == url


def test_removal_on_a_remote_host_kills_no_cgroup_from_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []

    def remove(client: Any, name: str, *, timeout: float, killed: bool = False) -> None:
        calls.append((name, killed))

    class Client:
        def remove_images(self, images: list[str]) -> list[str]:
            return []

    monkeypatch.setattr(removal.api, "remove", remove)
    url = "unix:///run/h1.sock"
    removing = removal.Removal(Tool(PodmanSettings(), url=url), RecordStore(tmp_path),
                               RemoteChannel(Client(), timeout=5),  # type: ignore[arg-type]
                               None, lambda name: None)
    assert removing.delete_many(["vmp-a-0"]) == {}
    # the machine and the holder it may have; killed: the API call skips the host-side kill
    assert calls == [("vmp-a-0", True), ("vmp-a-0-nh", True)]


def test_hosts_make_a_fleet_on_podman_and_are_refused_on_docker(tmp_path: Path) -> None:
    profile = config.Profile(name="default", podman=PodmanSettings(
        hosts=[PodmanHost(url="unix:///run/h1.sock")]))
    assert isinstance(make_backend("podman", profile, tmp_path), FleetBackend)
    with pytest.raises(ConfigError, match=r'\[podman\] hosts needs backend "podman"'):
        make_backend("docker", profile, tmp_path)


def test_gc_reaps_on_the_answering_hosts_while_one_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_process: ProcessRef,
    live_process: ProcessRef,
) -> None:
    fleet = _fleet(tmp_path, monkeypatch, capacities=(None, None))
    dead = owner_labels("vmp-a", "s1", dead_process, "h")
    for name in ("vmp-a-0", "vmp-a-1"):  # one per host, of a session that died
        fleet.create(MachineSpec(name, dead))
    fleet.create(MachineSpec("vmp-b-0", owner_labels("vmp-b", "s2", live_process, "h")))
    silent = fleet.hosts[0]
    orphan_there = next(n for n, u in machine_hosts(tmp_path).items() if u == silent.url
                        and n.startswith("vmp-a"))
    _sim(fleet, 0).up = False
    report = reaper.reap(JsonStateDir(tmp_path / "state"), fleet, "vmp")
    [other] = [n for n in ("vmp-a-0", "vmp-a-1") if n != orphan_there]
    assert report.machines_deleted == [other]
    assert [e for e in report.errors if f"podman host {silent.url} does not answer" in e]
    assert orphan_there in machine_hosts(tmp_path)  # left for when the host is back
    _sim(fleet, 0).up = True
    report = reaper.reap(JsonStateDir(tmp_path / "state"), fleet, "vmp")
    assert report.machines_deleted == [orphan_there] and not report.errors
    assert sorted(machine_hosts(tmp_path)) == ["vmp-b-0"]  # a live session's: spared
