"""A session's controller of a shared pool, in its own process, for the election tests:
``leader.py DSN STATE_DIR PREFIX SESSION``. Prints ``leading`` once it controls the pool and
two machines are ready, then waits for stdin to close and leaves the pool."""

from __future__ import annotations

import sys
from pathlib import Path

from vmpool.backends.sim import SimBackend
from vmpool.config import PoolSettings, Profile
from vmpool.config_backends import SimSettings
from vmpool.controller import Controller
from vmpool.state import JsonStateDir


def main() -> int:
    dsn, state, prefix, session = sys.argv[1:5]
    directory = JsonStateDir(Path(state))
    profile = Profile(name="default", pool=PoolSettings(
        size=2, backend="sim", name_prefix=prefix, checkin_policy="reuse", pre_ping=False,
        network=False, store=dsn, store_lease=2.0,
    ), sim=SimSettings())
    controller = Controller(directory=directory, backend=SimBackend(profile.sim, directory.path),
                            profile=profile, size=2, session=session, store=dsn)
    controller.start()
    assert controller.shared is not None and controller.shared.election.wait_leading(30)
    controller.wait_until_ready(2, 60)
    print("leading", flush=True)
    sys.stdin.read()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
