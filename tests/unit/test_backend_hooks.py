"""The optional backend hooks (prepare, release, delete_many, forget_missing, close): a backend that
defines none works through the pool on BackendBase's defaults, and one that defines a hook
has it called."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from conftest_plugin import roles
from vmpool import reaper
from vmpool.backends.base import Backend, BackendBase, MachineSpec
from vmpool.backends.sim import SimBackend
from vmpool.client import PoolClient
from vmpool.config import Config, Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller, policy_for
from vmpool.errors import BackendError
from vmpool.state import JsonStateDir

HOOKS = ("prepare", "release", "delete_many", "forget_missing", "close", "unreachable",
         "list_answering")


class HookedSim(SimBackend):
    """The sim with every hook defined, recording its calls."""

    def __init__(self, settings: SimSettings, state_dir: Path) -> None:
        super().__init__(settings, state_dir)
        self.calls: list[tuple[str, object]] = []

    def prepare(self, *, networked: bool) -> None:
        self.calls.append(("prepare", networked))

    def release(self, name: str) -> None:
        self.calls.append(("release", name))

    def close(self) -> None:
        self.calls.append(("close", None))

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        names = list(names)
        self.calls.append(("delete_many", names))
        return super().delete_many(names)

    def forget_missing(
        self, prefix: str, existing: set[str], *, older_than: float, dry_run: bool = False
    ) -> list[str]:
        self.calls.append(("forget_missing", (prefix, existing)))
        return [f"{prefix}litter"]

    def called(self, hook: str) -> list[Any]:
        return [arg for name, arg in self.calls if name == hook]


def _run_a_pool(backend: Backend, state_dir: JsonStateDir, profile: Profile) -> list[str]:
    """Warm a pool of 2, lease both machines, give them back, tear down; the leased names."""
    controller = Controller(
        directory=state_dir, backend=backend, profile=profile, size=2, session="s1", serve=False
    )
    controller.start()
    try:
        controller.wait_until_ready(2, 10)
        client = PoolClient(controller.store, backend, policy_for(profile, backend))
        lease = client.checkout(2, timeout=10)
        client.checkin(lease)
    finally:
        controller.stop(lease_timeout=5)
    return sorted(lease.names)


def test_sim_defines_no_hook_of_its_own() -> None:
    # the premise of the next test: the sim runs on the defaults
    for hook in HOOKS:
        assert getattr(SimBackend, hook) is getattr(BackendBase, hook)


def test_a_backend_without_hooks_runs_a_pool_on_the_defaults(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    profile = make_profile(backoff=0.0)
    backend = SimBackend(profile.sim, state_dir.path)
    assert len(_run_a_pool(backend, state_dir, profile)) == 2
    assert backend.list("") == []  # the default delete_many deleted them at teardown
    assert state_dir.pool_ids() == []


def test_checkin_releases_each_machine_and_teardown_deletes_in_one_batch(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    profile = make_profile(backoff=0.0)
    backend = HookedSim(profile.sim, state_dir.path)
    leased = _run_a_pool(backend, state_dir, profile)
    assert sorted(backend.called("release")) == leased
    assert backend.called("delete_many") == [leased]
    assert backend.list("") == []


def test_default_delete_many_deletes_the_rest_and_reports_the_failures(
    state_dir: JsonStateDir,
) -> None:
    class Refusing(SimBackend):
        def delete(self, name: str) -> None:
            if name == "m-b":
                raise BackendError("m-b is stuck")
            super().delete(name)

    backend = Refusing(SimSettings(), state_dir.path)
    for name in ("m-a", "m-b", "m-c"):
        backend.create(MachineSpec(name=name, labels={}))
    assert backend.delete_many(["m-c", "m-b", "m-a"]) == {"m-b": "m-b is stuck"}
    assert [i.name for i in backend.list("m-")] == ["m-b"]
    assert backend.delete_many([]) == {}


def test_reaper_asks_the_backend_to_forget_what_is_missing(
    state_dir: JsonStateDir, make_profile: Callable[..., Profile]
) -> None:
    profile = make_profile()
    backend = HookedSim(profile.sim, state_dir.path)
    report = reaper.reap(state_dir, backend, "vmp")
    assert backend.called("forget_missing") == [("vmp-", set())]
    assert report.files_removed == ["vmp-litter"]


def _role(
    tmp_path: Path, profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> tuple[roles.ControllerRole, list[HookedSim]]:
    """A controller role whose backends are HookedSims (appended to the list as made)."""
    made: list[HookedSim] = []

    def make(name: str, profile: Profile, state_dir: Path) -> Backend:
        made.append(HookedSim(profile.sim, state_dir))
        return made[-1]

    monkeypatch.setattr(roles, "make_backend", make)
    settings = roles.Settings(
        config_path=None,
        overrides={},
        state_dir=str(tmp_path / "state"),
        session="s1",
        default_size=1,
        keep=False,
    )
    return roles.ControllerRole(Config(profiles={"default": profile}), settings), made


def test_the_plugin_prepares_a_backend_before_its_pool_is_asked_for(
    tmp_path: Path, make_profile: Callable[..., Profile], monkeypatch: pytest.MonkeyPatch
) -> None:
    role, made = _role(tmp_path, make_profile(network=True), monkeypatch)
    assert role._prepare_profile("default") is made[0]
    assert made[0].called("prepare") == [True]  # the sim has networks: the pool's is shared
    assert made[0].called("close") == []


def test_the_plugin_closes_a_prepared_backend_after_its_last_reap(
    tmp_path: Path, make_profile: Callable[..., Profile], monkeypatch: pytest.MonkeyPatch
) -> None:
    role, made = _role(tmp_path, make_profile(), monkeypatch)
    role.start()
    role._start_profile("default")
    role.controllers["default"].wait_until_ready(1, 10)
    role.stop()
    hooks = [name for name, _ in made[0].calls if name != "release"]
    assert hooks[0] == "prepare"
    # the teardown's deletion, the last reap's forgetting, then close
    assert hooks[-3:] == ["delete_many", "forget_missing", "close"]
