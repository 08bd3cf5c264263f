"""pytest hooks and options for vmpool; the role (controller or worker) is decided once here."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest_plugin.roles import (
    ControllerRole,
    ProfileOutcome,
    Settings,
    WorkerRole,
    new_settings,
    percentile,
)
from conftest_plugin.stopsignals import StopSignals
from vmpool import config as vmconfig
from vmpool.errors import ConfigError, StateError, VmPoolError

PLUGIN_NAME = "vmpool-session"
POOL_FIXTURES = ("pool_vm", "pool_vms")
MARK_ARGS = {"fresh", "count", "profile"}

#: option dest -> (pool key, option spelling, ini name, converter)
_OPTIONS: dict[str, tuple[str, str, str]] = {
    "vm_pool_size": ("size", "--vm-pool-size", "vm_pool_size"),
    "vm_backend": ("backend", "--vm-backend", "vm_backend"),
    "vm_state_dir": ("state_dir", "--vm-state-dir", "vm_state_dir"),
    "vm_checkout_timeout": ("checkout_timeout", "--vm-checkout-timeout", "vm_checkout_timeout"),
}

call_failed_key = pytest.StashKey[bool]()

pytest_plugins = ["conftest_plugin.fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmpool", "vmpool: a pre-warmed pool of real machines")
    group.addoption(
        "--vm-pool-size",
        dest="vm_pool_size",
        default=None,
        metavar="N",
        help="machines to keep warm (default: xdist worker count, 1 without xdist)",
    )
    group.addoption(
        "--vm-backend",
        dest="vm_backend",
        default=None,
        metavar="NAME",
        help="auto, sim, podman, docker, qemu or orbstack (default: auto)",
    )
    group.addoption(
        "--vm-pool-config",
        dest="vm_pool_config",
        default=None,
        metavar="PATH",
        help="pool.toml (default: pool.toml in the rootdir, else [tool.vmpool])",
    )
    group.addoption(
        "--vm-state-dir",
        dest="vm_state_dir",
        default=None,
        metavar="DIR",
        help="where pool state lives (default: the user state directory)",
    )
    group.addoption(
        "--vm-pool-keep",
        dest="vm_pool_keep",
        action="store_true",
        default=None,
        help="keep the pool idle after the session for the next one to adopt",
    )
    group.addoption(
        "--vm-checkout-timeout",
        dest="vm_checkout_timeout",
        default=None,
        metavar="SECONDS",
        help="seconds a test waits for a free machine",
    )
    for dest, (_key, _flag, ini) in _OPTIONS.items():
        parser.addini(ini, f"default for --{dest.replace('_', '-')}", default=None)
    parser.addini("vm_pool_config", "default for --vm-pool-config", default=None)
    parser.addini("vm_pool_keep", "default for --vm-pool-keep", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm(fresh=False, count=1, profile=None): machines for pool_vm/pool_vms: fresh=True wants "
        "machines no test used since their reset; count=N checks out N machines together; "
        "profile=NAME picks a [profiles.NAME] pool",
    )
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and "vmpool" in workerinput:
        settings = Settings.from_workerinput(workerinput["vmpool"])
        cfg = _load(config, settings.config_path, settings.overrides)
        role = WorkerRole(cfg, settings, str(workerinput.get("workerid", "gw?")))
        role.register()
        config.pluginmanager.register(VmPoolSession(config, cfg, settings, None, role), PLUGIN_NAME)
        return
    path = _config_path(config)
    overrides = _overrides(config)
    cfg = _load(config, str(path) if path else None, overrides)
    keep = bool(
        config.getoption("vm_pool_keep") or _ini(config, "vm_pool_keep") or cfg.default.pool.keep
    )
    settings = new_settings(cfg, path, overrides, _default_size(config), keep)
    try:
        controller = ControllerRole(cfg, settings)
    except StateError as exc:
        raise pytest.UsageError(f"vmpool: {exc}") from None
    distributed = _xdist_workers(config) > 0
    worker: WorkerRole | None = None if distributed else WorkerRole(cfg, settings, "main")
    signals = StopSignals(controller.session, controller.begin_closing)
    signals.install()
    config.pluginmanager.register(signals, PLUGIN_NAME + "-signals")
    config.pluginmanager.register(
        VmPoolSession(config, cfg, settings, controller, worker, signals), PLUGIN_NAME
    )


def _ini(config: pytest.Config, name: str) -> Any:
    try:
        return config.getini(name)
    except (ValueError, KeyError):
        return None


def _config_path(config: pytest.Config) -> Path | None:
    given = (
        config.getoption("vm_pool_config")
        or _ini(config, "vm_pool_config")
        or os.environ.get("VMPOOL_CONFIG")
    )
    if given:
        path = Path(given)
        if not path.is_absolute():
            path = Path(config.invocation_params.dir) / path
        if not path.is_file():
            raise pytest.UsageError(f"vmpool: --vm-pool-config: {given}: file not found")
        return path
    return vmconfig.find_config(Path(config.rootpath))


def _overrides(config: pytest.Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, (key, _flag, ini) in _OPTIONS.items():
        value = config.getoption(dest)
        if value is None and vmconfig.ENV_PREFIX + key.upper() not in os.environ:
            value = _ini(config, ini) or None
        if value is not None:
            out[key] = value
    return out


_OVERRIDE_NAMES = {key: flag for key, flag, _ini_name in _OPTIONS.values()}


def _load(config: pytest.Config, path: str | None, overrides: dict[str, Any]) -> vmconfig.Config:
    try:
        return vmconfig.load(
            Path(path) if path else None, overrides=overrides, override_names=_OVERRIDE_NAMES
        )
    except ConfigError as exc:
        raise pytest.UsageError(
            "vmpool: invalid configuration:\n  " + "\n  ".join(exc.problems)
        ) from None


def _xdist_workers(config: pytest.Config) -> int:
    n = getattr(config.option, "numprocesses", None)
    if not n or getattr(config.option, "dist", "no") == "no":
        return 0
    try:
        return int(n)
    except (TypeError, ValueError):
        return 0


def _default_size(config: pytest.Config) -> int:
    return max(_xdist_workers(config), 1)


class VmPoolSession:
    """The per-process plugin object: hooks that need the role."""

    def __init__(
        self,
        config: pytest.Config,
        cfg: vmconfig.Config,
        settings: Settings,
        controller: ControllerRole | None,
        worker: WorkerRole | None,
        signals: StopSignals | None = None,
    ) -> None:
        self.config = config
        self.cfg = cfg
        self.settings = settings
        self.controller = controller
        self.worker = worker
        self.signals = signals
        self.outcomes: list[ProfileOutcome] = []
        self._shown: dict[str, int] = {}
        self._early: dict[str, int] = {}
        #: xdist workers configured and not yet down; whether one went down with an error
        self._nodes_up = 0
        self._node_failed = False
        #: the pools' teardown, once begun (see pytest_testnodedown)
        self._teardown: threading.Thread | None = None
        self._teardown_error: VmPoolError | None = None
        self._problems: list[str] = []

    # -- controller -------------------------------------------------------------------------
    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["vmpool"] = self.settings.to_workerinput()
        self._nodes_up += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        # Once every worker has finished its session normally (their machines are checked in),
        # the pools' teardown begins in the background while xdist waits for the worker
        # processes to exit; sessionfinish waits for it. A worker that crashed, or a stop
        # signal, leaves the teardown to sessionfinish, after xdist has stopped the workers.
        self._nodes_up -= 1
        self._node_failed = self._node_failed or error is not None
        signals = self.signals
        if (self.controller is None or self._nodes_up > 0 or self._node_failed
                or self._teardown is not None or (signals is not None and signals.received)):
            return
        if signals is not None:
            signals.teardown_begins()
        self._teardown = threading.Thread(target=self._stop_pools, name="vmpool-teardown",
                                          daemon=True)
        self._teardown.start()

    def _stop_pools(self) -> None:
        """Tear the pools down (or keep them); the outcomes, or the error, are kept."""
        assert self.controller is not None
        signals = self.signals
        self._problems = self.controller.usage_errors()
        try:
            # after a stop signal, the whole teardown fits in teardown_timeout from the signal
            self.outcomes = self.controller.stop(
                lease_budget=signals.remaining if signals is not None else None
            )
        except VmPoolError as exc:
            self._teardown_error = exc

    # tryfirst: the session channel listens before xdist starts the workers that use it
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.controller is not None:
            try:
                self.controller.start()
            except StateError as exc:
                raise pytest.UsageError(str(exc)) from None

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        # Report early demand at the first pool test collected, so the slow one-off work
        # (backend checks, reaping, QEMU's clone template) overlaps the rest of collection; no
        # machine is made until modifyitems reports the final, validated set (a usage error
        # found later must come before any machine). Not when -k, -m, --deselect, --lf or --sw
        # may drop tests later.
        if self.worker is None or _may_deselect(self.config):
            return
        needs, problems = _needs([item], self.cfg, self.settings.default_size)
        early = {p: n for p, n in needs.items() if n > self._early.get(p, 0)}
        if early and not problems:
            self._early.update(early)
            self.worker.report_demand(early, [], final=False)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if self.worker is None:
            return
        needs, problems = _needs(items, self.cfg, self.settings.default_size)
        if problems:
            self.worker.report_demand({}, problems)
            if self.controller is not None:  # single process: a usage error right away
                raise pytest.UsageError("vmpool: " + "\n  ".join(problems))
            # an xdist worker runs nothing; the controller reports and exits with code 4
            config.hook.pytest_deselected(items=list(items))
            items[:] = []
            return
        if needs:
            self.worker.report_demand(needs, [])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._show_progress()

    def _show_progress(self, final: bool = False) -> None:
        if self.controller is None:
            return
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        events = self.controller.drain_progress()
        if tr is None or not events or self.config.getoption("verbose") < 0:
            return
        latest: dict[str, Any] = {}
        for e in events:
            latest[e.pool] = e
        for e in latest.values():
            if self._shown.get(e.pool) == e.ready and not final:
                continue
            self._shown[e.pool] = e.ready
            profile = "" if e.profile == "default" else f" [{e.profile}]"
            broken = f", {e.broken} broken" if e.broken else ""
            tr.write_line(
                f"vmpool: {e.ready}/{e.size} ready on {e.backend}{profile}{broken} "
                f"({_elapsed(self.controller.started_at):.1f}s)"
            )

    # trylast: after pytest's own sessionfinish has torn down fixtures still set up (an
    # interrupted session checks its machines in only then) and xdist has stopped its workers;
    # stopping the pool before that waits out teardown_timeout for our own leases.
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.controller is None:
            return
        signals = self.signals
        if signals is not None:
            signals.teardown_begins()
        self._show_progress()
        if self._teardown is None:
            self._stop_pools()
        else:
            self._teardown.join()
        problems = self._problems
        if self._teardown_error is not None:
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line(f"vmpool: teardown error: {self._teardown_error}", red=True)
        if problems:
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line("ERROR: vmpool: " + "\n  ".join(problems), red=True)
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        if signals is not None:
            if signals.exit_status is not None:
                session.exitstatus = signals.exit_status
            signals.restore()  # nothing of the pool is left for a signal to leak

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.controller is None:
            return
        tr = terminalreporter
        quiet = self.config.getoption("verbose") < 0
        errors = self.controller.errors
        if not self.outcomes and not errors:
            return
        if not quiet:
            tr.write_sep("=", "vmpool")
        for name, err in errors.items():
            tr.write_line(f"vmpool [{name}]: no pool: {err}", red=True)
        for o in self.outcomes:
            self._show_trouble(tr, o)
            if o.pool is None:
                continue
            s = o.pool.stats
            waits = o.waits
            first = (
                f"{s.first_ready_at - self.controller.started_at:.1f}s"
                if s.first_ready_at
                else "n/a"
            )
            label = o.profile if o.profile != "default" else o.pool.id
            if quiet:
                tr.write_line(
                    f"vmpool {label}: {s.created} created, {s.reset} reset, "
                    f"{s.replaced} replaced, {s.broken} broken"
                )
                continue
            tr.write_line(
                f"{label} on {o.backend}{' (adopted)' if o.adopted else ''}: "
                f"machines created {s.created}, reset {s.reset}, replaced {s.replaced}, "
                f"broken {s.broken}, reclaimed {s.reclaimed}; check-outs {s.checkouts}"
            )
            tr.write_line(
                f"  check-out wait p50 {percentile(waits, 50):.3f}s, "
                f"p95 {percentile(waits, 95):.3f}s, max {max(waits, default=0.0):.3f}s; "
                f"first machine ready after {first}"
            )

    def _show_trouble(self, tr: Any, o: ProfileOutcome) -> None:
        """The pool's error, and what its teardown left behind with the command that removes
        it (shown even with -q)."""
        assert self.controller is not None
        label = o.profile if o.profile != "default" else (o.pool.id if o.pool else o.profile)
        if o.error:
            tr.write_line(f"vmpool {label}: error: {o.error}", red=True)
        if not o.left_machines and not o.left_network:
            return
        left = []
        if o.left_machines:
            left.append(f"{len(o.left_machines)} machine(s) {', '.join(o.left_machines)}")
        if o.left_network:
            left.append(f"network {o.left_network}")
        tr.write_line(
            f"vmpool {label}: teardown left {' and '.join(left)} on {o.backend}", red=True
        )
        tr.write_line(f"  remove them with: {self.controller.gc_command(o)}", red=True)


def _may_deselect(config: pytest.Config) -> bool:
    """Whether options that drop collected tests in modifyitems are in use."""
    o = config.option
    return bool(
        getattr(o, "keyword", "")
        or getattr(o, "markexpr", "")
        or getattr(o, "deselect", None)
        or getattr(o, "lf", False)
        or getattr(o, "stepwise", False)
        or getattr(o, "stepwise_skip", False)
    )


def _elapsed(since: float) -> float:
    return time.time() - since


def _needs(
    items: list[pytest.Item], cfg: vmconfig.Config, default_size: int
) -> tuple[dict[str, int], list[str]]:
    """Profiles the collected tests need (largest count each), and usage problems."""
    needs: dict[str, int] = {}
    problems: list[str] = []
    for item in items:
        fixturenames = getattr(item, "fixturenames", ())
        if not any(f in fixturenames for f in POOL_FIXTURES):
            continue
        try:
            count, _fresh, profile = mark_args(item)
        except ValueError as exc:
            problems.append(f"{item.nodeid}: {exc}")
            continue
        if profile not in cfg.profiles:
            problems.append(
                f"{item.nodeid}: {vmconfig.unknown_profile_message(profile, list(cfg.profiles))}"
            )
            continue
        size = cfg.profiles[profile].pool.size or default_size
        if count > size:
            problems.append(
                f"{item.nodeid}: asks for count={count} machines but the {profile!r} pool has "
                f"size {size} (raise --vm-pool-size or the profile's size)"
            )
            continue
        if "pool_vm" in fixturenames and count != 1:
            problems.append(
                f"{item.nodeid}: pool_vm gives one machine; use pool_vms for count={count}"
            )
            continue
        needs[profile] = max(needs.get(profile, 0), count)
    return needs, problems


def mark_args(item: pytest.Item) -> tuple[int, bool, str]:
    """(count, fresh, profile) from the closest ``vm`` marker; ValueError on a bad argument."""
    marker = item.get_closest_marker("vm")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    if marker and marker.args:
        raise ValueError(f"@pytest.mark.vm takes keyword arguments only, got {marker.args!r}")
    unknown = set(kwargs) - MARK_ARGS
    if unknown:
        raise ValueError(
            f"@pytest.mark.vm: unknown argument(s) {sorted(unknown)}; known: {sorted(MARK_ARGS)}"
        )
    count = kwargs.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"@pytest.mark.vm: count must be an integer >= 1, got {count!r}")
    fresh = kwargs.get("fresh", False)
    if not isinstance(fresh, bool):
        raise ValueError(f"@pytest.mark.vm: fresh must be True or False, got {fresh!r}")
    profile = kwargs.get("profile") or vmconfig.DEFAULT_PROFILE
    if not isinstance(profile, str):
        raise ValueError(f"@pytest.mark.vm: profile must be a string, got {profile!r}")
    return count, fresh, profile


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[call_failed_key] = True
    return report
