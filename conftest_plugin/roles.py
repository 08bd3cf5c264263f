"""The two roles, decided once in plugin.py: the controller owns pools, workers lease machines."""

from __future__ import annotations

import contextlib
import logging
import shlex
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmpool import doctor, reaper
from vmpool.backends import make_backend
from vmpool.backends.base import Backend
from vmpool.client import Lease, PoolClient
from vmpool.config import Config, Profile
from vmpool.controller import Controller, Progress, policy_for
from vmpool.errors import BackendError, PoolUnavailable, StateError, VmPoolError, describe
from vmpool.ownership import current_process, new_session_id
from vmpool.session import SessionClient, SessionServer
from vmpool.state import JsonStateDir, Pool, default_state_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What both roles need to know; the controller passes it to workers via workerinput."""

    config_path: str | None
    overrides: dict[str, Any]
    state_dir: str
    session: str
    default_size: int
    keep: bool

    def to_workerinput(self) -> dict[str, Any]:
        return {
            "config_path": self.config_path,
            "overrides": self.overrides,
            "state_dir": self.state_dir,
            "session": self.session,
            "default_size": self.default_size,
            "keep": self.keep,
        }

    @classmethod
    def from_workerinput(cls, data: dict[str, Any]) -> Settings:
        return cls(**data)


def resolve_state_dir(cfg: Config) -> Path:
    configured = cfg.default.pool.state_dir
    return Path(configured).expanduser() if configured else default_state_dir()


def profile_size(profile: Profile, default_size: int) -> int:
    return profile.pool.size or default_size


@dataclass
class ProfileOutcome:
    profile: str
    backend: str
    pool: Pool | None
    adopted: bool
    waits: list[float] = field(default_factory=list)
    #: the maintainer's error at teardown, if any
    error: str | None = None
    #: machines and the network teardown could not delete
    left_machines: list[str] = field(default_factory=list)
    left_network: str | None = None


class ControllerRole:
    """Runs in the xdist controller or the single pytest process."""

    def __init__(self, cfg: Config, settings: Settings) -> None:
        self.cfg = cfg
        self.settings = settings
        self.directory = JsonStateDir(Path(settings.state_dir))
        self.session = SessionServer(
            self.directory.path, settings.session, current_process(), self._demand_arrived
        )
        self._demand = threading.Event()
        self.controllers: dict[str, Controller] = {}
        self.progress: list[Progress] = []
        self._progress_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        self.reaped: list[reaper.ReapReport] = []
        self.errors: dict[str, str] = {}
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Watch for demand in the background; nothing is created until a test needs it."""
        self.session.start()
        self._thread = threading.Thread(target=self._watch, name="vmpool-demand", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._watch_demand()
        except Exception as exc:  # never die silently: the workers would wait out their timeout
            log.exception("vmpool: the controller's demand watcher failed")
            self._fail_all(exc)

    def _demand_arrived(self) -> None:
        self._demand.set()

    def _watch_demand(self) -> None:
        while not self._stop.is_set():
            self._demand.wait()  # a worker reported what it collected, or the session stops
            self._demand.clear()
            if self._stop.is_set():
                return
            rec = self.session.read()
            if rec.usage_errors:
                return
            for name in rec.demand:
                if name not in self.controllers and name not in self.errors:
                    self._start_profile(name)
            for name in rec.early:
                if name in self.controllers or name in self.errors:
                    continue
                if self.cfg.profile(name).pool.warm_during_collection:
                    self._start_profile(name)  # the user traded the usage-error rule for speed
                elif name not in self._backends:
                    self._prepare_profile(name)

    def _fail_all(self, exc: BaseException) -> None:
        """Record ``exc`` for every profile without a pool, so no worker waits for one."""
        text = describe(exc)
        try:
            with self.session.update() as rec:
                for name in set(rec.demand) | set(rec.early) | set(self.cfg.profiles):
                    if name not in rec.pools:
                        rec.errors.setdefault(name, text)
                        self.errors.setdefault(name, text)
        except VmPoolError as again:
            log.error("vmpool: cannot tell the workers: %s", again)
            for name in self.cfg.profiles:
                if name not in self.controllers:
                    self.errors.setdefault(name, text)

    def _prepare_profile(self, name: str) -> Backend | None:
        """Make and check the backend, do its one-off preparation, reap orphans."""
        if name in self._backends:
            return self._backends[name]
        try:
            profile = self.cfg.profile(name)
            backend = make_backend(profile.pool.backend, profile, self.directory.path)
            backend.check()
            # prepare first: what it starts (podman's API service) makes the reap's calls cheap
            backend.prepare(networked=profile.pool.network and backend.capabilities.network)
            with contextlib.suppress(VmPoolError):
                self.reaped.append(reaper.reap(self.directory, backend, profile.pool.name_prefix))
        except Exception as exc:  # an OSError too: the workers must hear of it, not wait
            self._fail(name, exc)
            return None
        self._backends[name] = backend
        return backend

    def _fail(self, name: str, exc: BaseException) -> None:
        if not isinstance(exc, VmPoolError):
            log.error("vmpool: profile %r", name, exc_info=exc)
        message = describe(exc)
        if isinstance(exc, BackendError):
            backend = self.cfg.profile(name).pool.backend
            message = (
                f"{doctor.explain(message).rstrip('. ')}. "
                f"Run `vmpool doctor --backend {backend}` to check what this host lacks"
            )
        self.errors[name] = message
        with self.session.update() as rec:
            rec.errors[name] = message

    def _start_profile(self, name: str) -> None:
        backend = self._prepare_profile(name)
        if backend is None:
            return
        try:
            profile = self.cfg.profile(name)
            controller = Controller(
                directory=self.directory,
                backend=backend,
                profile=profile,
                size=profile_size(profile, self.settings.default_size),
                session=self.settings.session,
                keep=self.settings.keep,
                progress=self._on_progress,
            )
            with self._lock:
                if self._stop.is_set():
                    return
                controller.start()
                self.controllers[name] = controller
            with self.session.update() as rec:
                rec.pools[name] = controller.pool_id
        except Exception as exc:
            self._fail(name, exc)

    def _on_progress(self, event: Progress) -> None:
        with self._progress_lock:
            self.progress.append(event)

    def drain_progress(self) -> list[Progress]:
        with self._progress_lock:
            out, self.progress = self.progress, []
        return out

    def gc_command(self, outcome: ProfileOutcome) -> str:
        """The `vmpool gc` command that removes what ``outcome``'s teardown left."""
        argv = ["vmpool", "gc", "--state-dir", str(self.directory.path)]
        argv += ["--backend", outcome.backend]
        if self.settings.config_path:
            argv += ["--config", self.settings.config_path]
        if outcome.profile != "default":
            argv += ["--profile", outcome.profile]
        return shlex.join(argv)

    def usage_errors(self) -> list[str]:
        with contextlib.suppress(StateError):
            return self.session.read().usage_errors
        return []

    def begin_closing(self) -> None:
        """A stop signal: pools about to be destroyed stop serving and resetting (see
        Controller.begin_closing) before the workers are told to stop."""
        with self._lock:
            self._stop.set()  # and no new pool
            self._demand.set()
            controllers = list(self.controllers.values())
        for controller in controllers:
            controller.begin_closing()

    def stop(self, lease_budget: Callable[[float], float] | None = None) -> list[ProfileOutcome]:
        """Tear down every pool (or keep them), then reap orphans of dead sessions.

        ``lease_budget`` maps a pool's teardown_timeout to how long to wait for its leases."""
        with self._lock:
            self._stop.set()
            self._demand.set()
        if self._thread is not None:
            self._thread.join()
        outcomes = []
        for name, controller in self.controllers.items():
            waits = _read_waits(controller.store.side_file("waits"))
            wait = controller.settings.teardown_timeout
            pool = controller.stop(lease_timeout=lease_budget(wait) if lease_budget else None)
            outcomes.append(
                ProfileOutcome(
                    name,
                    controller.backend.name,
                    pool,
                    controller.adopted_from is not None,
                    waits,
                    error=describe(controller.error) if controller.error else None,
                    left_machines=controller.left_machines,
                    left_network=controller.left_network,
                )
            )
            with contextlib.suppress(FileNotFoundError):
                controller.store.side_file("waits").unlink()
            with contextlib.suppress(VmPoolError):
                self.reaped.append(
                    reaper.reap(self.directory, controller.backend, controller.settings.name_prefix)
                )
        for backend in self._backends.values():  # what prepare() left running (podman's API)
            try:
                backend.close()
            except VmPoolError as exc:
                log.warning("vmpool: closing the %s backend: %s", backend.name, exc)
        self.session.stop()
        return outcomes


def _read_waits(path: Path) -> list[float]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        with contextlib.suppress(IndexError, ValueError):
            out.append(float(parts[1]))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class WorkerRole:
    """Runs in each xdist worker (or the single process): leases machines for tests."""

    def __init__(self, cfg: Config, settings: Settings, worker_id: str) -> None:
        self.cfg = cfg
        self.settings = settings
        self.worker_id = worker_id
        self.directory = JsonStateDir(Path(settings.state_dir))
        self.session = SessionClient(self.directory.path, settings.session)
        self._clients: dict[str, PoolClient] = {}

    def register(self) -> None:
        """Record this worker's process in the session, for the controller to signal it."""
        try:
            self.session.register(self.worker_id, current_process())
        except StateError as exc:  # then only xdist stops it, later; the tests can still run
            log.warning("vmpool: worker %s not recorded in the session: %s", self.worker_id, exc)

    def report_demand(
        self, needs: dict[str, int], problems: list[str], *, final: bool = True
    ) -> None:
        """Tell the controller what collection found: ``final=False`` while collecting (it
        prepares, makes nothing), ``final=True`` once the valid selection is known."""
        self.session.report(needs, problems, final=final)

    def client(self, profile_name: str, timeout: float) -> PoolClient:
        if profile_name in self._clients:
            return self._clients[profile_name]
        pool_id = self.session.wait_pool(profile_name, timeout)
        store = self.directory.store(pool_id)
        pool = store.read()
        if pool is None:
            raise PoolUnavailable(f"vmpool: pool {pool_id} vanished")
        profile = self.cfg.profile(profile_name)
        backend: Backend = make_backend(pool.backend, profile, self.directory.path)
        client = PoolClient(
            store,
            backend,
            policy_for(profile, backend),
            worker=self.worker_id,
            pre_ping=profile.pool.pre_ping,
            pre_ping_after=profile.pool.pre_ping_after,
            wait_log=store.side_file("waits"),
        )
        self._clients[profile_name] = client
        return client

    def checkout(
        self, profile_name: str, count: int, fresh: bool, test: str
    ) -> tuple[PoolClient, Lease]:
        profile = self.cfg.profile(profile_name)
        timeout = profile.pool.checkout_timeout
        started = time.monotonic()
        client = self.client(profile_name, timeout)
        remaining = max(timeout - (time.monotonic() - started), 0.001)
        return client, client.checkout(count, fresh=fresh, test=test, timeout=remaining)


def new_settings(
    cfg: Config,
    config_path: Path | None,
    overrides: dict[str, Any],
    default_size: int,
    keep: bool,
) -> Settings:
    return Settings(
        config_path=str(config_path) if config_path else None,
        overrides=overrides,
        state_dir=str(resolve_state_dir(cfg)),
        session=new_session_id(),
        default_size=default_size,
        keep=keep,
    )
