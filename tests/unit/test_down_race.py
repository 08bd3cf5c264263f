"""`vmpool down` against a session adopting the same kept pool: the adopter keeps its machines."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from vmpool import cli
from vmpool.backends.sim import SimBackend
from vmpool.config import Profile
from vmpool.controller import Controller
from vmpool.state import JsonStateDir, MachineState


def _keep_a_pool(directory: JsonStateDir, profile: Profile, session: str) -> None:
    backend = SimBackend(profile.sim, directory.path)
    first = Controller(
        directory=directory, backend=backend, profile=profile, size=2, session=session, keep=True
    )
    first.start()
    first.wait_until_ready(2, 10)
    first.stop(keep=True, lease_timeout=0)


def test_down_racing_an_adopting_session_never_deletes_the_adopters_machines(
    tmp_path: Path, make_profile: Callable[..., Profile]
) -> None:
    profile = make_profile(backoff=0.0)
    for round_ in range(25):
        directory = JsonStateDir(tmp_path / f"state{round_}")
        _keep_a_pool(directory, profile, f"k{round_}")
        backend = SimBackend(profile.sim, directory.path)
        adopter = Controller(
            directory=directory, backend=backend, profile=profile, size=2, session=f"a{round_}"
        )
        go = threading.Barrier(2)

        def down(path: Path = directory.path, go: threading.Barrier = go) -> None:
            go.wait()
            cli.main(["down", "--backend", "sim", "--state-dir", str(path)])

        downer = threading.Thread(target=down)
        downer.start()
        go.wait()
        adopter.start()
        downer.join(30)
        assert not downer.is_alive()
        try:
            if adopter.adopted_from is None:
                continue  # down won: the adopter made a pool of its own
            pool = adopter.wait_until_ready(2, 10)
            ready = {m.name for m in pool.machines if m.state is MachineState.READY}
            existing = {i.name for i in backend.list(profile.pool.name_prefix)}
            assert ready <= existing, f"round {round_}: down deleted {sorted(ready - existing)}"
        finally:
            adopter.stop(keep=False, lease_timeout=0)
