"""`vmpool …`: parses, calls the library, prints. No pool logic of its own.

Exit codes: 0 success; 1 an operation failed (backend error, pool unavailable, some
machine could not be removed); 2 usage or configuration error; 3 unreadable state.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmpool import config as vmconfig
from vmpool import reaper, status
from vmpool.backends import NAMES, make_backend
from vmpool.backends.base import Backend
from vmpool.controller import Controller, Progress
from vmpool.errors import ConfigError, StateError, VmPoolError
from vmpool.ownership import (
    check_pool_id,
    current_process,
    is_alive,
    new_session_id,
    pool_machines,
    pool_network,
)
from vmpool.state import JsonStateDir, Pool, StateStore, default_state_dir

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STATE = 0, 1, 2, 3
_WATCH_INTERVAL = 1.0
log = logging.getLogger("vmpool")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmpool",
        description="A pre-warmed pool of real machines for pytest.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage/config error, 3 unreadable state",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, backend: bool = False) -> None:
        sp.add_argument(
            "--state-dir",
            type=Path,
            help="state directory (default: config, VMPOOL_STATE_DIR, then the user state dir)",
        )
        sp.add_argument(
            "--config",
            type=Path,
            help="pool.toml (default: ./pool.toml or [tool.vmpool] in ./pyproject.toml)",
        )
        if backend:
            sp.add_argument("--backend", choices=["auto", *NAMES], help="backend to use")
        sp.add_argument("--profile", default="default", help="profile from the config")

    st = sub.add_parser("status", help="show pools and their machines")
    common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")

    up = sub.add_parser("up", help="warm a pool outside pytest and keep it for sessions to adopt")
    common(up, backend=True)
    up.add_argument("--size", type=int, help="machines to warm (default: config, else 1)")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready")

    down = sub.add_parser("down", help="destroy pools (kept or orphaned; --force for live ones)")
    common(down, backend=True)
    down.add_argument("--pool", type=_pool_id_arg, help="only this pool id")
    down.add_argument(
        "--force",
        action="store_true",
        help="also destroy pools of live sessions and unreadable pool files",
    )

    gc = sub.add_parser("gc", help="reap machines and pools of dead sessions")
    common(gc, backend=True)
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    doc = sub.add_parser("doctor", help="check that a backend can work here; print the fixes")
    common(doc)
    doc.add_argument(
        "--backend",
        choices=["auto", *NAMES],
        help="check only this backend (default: podman and qemu; the exit code follows the "
        "configured backend)",
    )
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument(
        "--quick",
        action="store_true",
        help="skip the live checks (a container on a throwaway network, the KVM boot probe)",
    )

    cfg = sub.add_parser("config", help="configuration helpers")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("path", nargs="?", type=Path)
    cfg_sub.add_parser("schema", help="print the JSON schema of pool.toml")

    img = sub.add_parser("image", help="guest images")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    build = img_sub.add_parser("build", help="build the default image for a backend")
    common(build)
    build.add_argument("--backend", choices=["qemu", "podman", "docker"], default="qemu")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument(
        "--distro",
        choices=["busybox", "debian"],
        default=None,
        help="the image to build (default: the profile's [podman] distro; qemu: busybox)",
    )
    return p


def _pool_id_arg(value: str) -> str:
    """argparse type for a pool id: a bad one is a usage error (exit 2) naming the argument."""
    try:
        return check_pool_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="vmpool: %(levelname)s: %(message)s",
    )
    try:
        return int(_dispatch(args))
    except ConfigError as exc:
        print("vmpool: invalid configuration:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"vmpool: {exc}", file=sys.stderr)
        return EXIT_STATE
    except VmPoolError as exc:
        print(f"vmpool: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        return _config_cmd(args)
    if args.command == "image":
        return _image(args)
    commands = {"status": _status, "up": _up, "down": _down, "gc": _gc, "doctor": _doctor}
    return commands[args.command](args)


def _load(args: argparse.Namespace) -> vmconfig.Config:
    path = getattr(args, "config", None) or vmconfig.find_config(Path.cwd())
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, attr in (("state_dir", "state_dir"), ("backend", "backend"), ("size", "size")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
            names[key] = "--" + attr.replace("_", "-")
    return vmconfig.load(path, overrides=overrides, override_names=names)


def _state_dir(cfg: vmconfig.Config) -> JsonStateDir:
    configured = cfg.default.pool.state_dir
    return JsonStateDir(Path(configured) if configured else default_state_dir())


def _config_cmd(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        print(json.dumps(vmconfig.json_schema(), indent=2, sort_keys=True))
        return EXIT_OK
    path = args.path or vmconfig.find_config(Path.cwd())
    if path is None:
        print("vmpool: no pool.toml or [tool.vmpool] here; defaults apply", file=sys.stderr)
        return EXIT_OK
    cfg = vmconfig.load(path)
    print(f"{path}: ok ({len(cfg.profiles)} profile(s): {', '.join(cfg.profiles)})")
    return EXIT_OK


def _image(args: argparse.Namespace) -> int:
    cfg = _load(args)
    profile = cfg.profile(args.profile)

    def progress(msg: str) -> None:
        print(f"vmpool: {msg}", file=sys.stderr)

    if args.backend == "qemu":
        if args.distro == "debian":
            from vmpool.backends.qemu import debian as qemu_debian

            print(qemu_debian.build_image(profile.qemu, packages=profile.image.packages,
                                          force=args.force, progress=progress))
            return EXIT_OK
        from vmpool.backends.qemu.image import build_image

        print(build_image(profile.qemu, force=args.force, progress=progress))
    else:
        from vmpool.backends.podman import build_image as build_podman

        settings = profile.podman.model_copy(update={"tool": args.backend})
        print(build_podman(settings, force=args.force, progress=progress, distro=args.distro,
                           image_settings=profile.image))
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from vmpool import doctor

    cfg = _load(args)
    profile = cfg.profile(args.profile)
    configured = cfg.default.pool.state_dir
    state_dir = Path(configured) if configured else default_state_dir()
    chosen = args.backend or profile.pool.backend
    names = ["podman", "qemu"] if chosen == "auto" or args.backend is None else [chosen]
    if chosen not in names and chosen != "auto":
        names.append(chosen)
    checks = doctor.run_checks(profile, state_dir, names, live=not args.quick)
    if chosen == "auto":
        ok = any(doctor.usable(checks, n) for n in names)
    else:
        ok = doctor.usable(checks, chosen)
    if args.json:
        doc = {"backend": chosen, "usable": ok, "checks": [c.to_json() for c in checks]}
        print(json.dumps(doc, indent=2))
    else:
        for check in checks:
            print(check.line())
        verdict = "usable" if ok else "NOT usable: apply the fixes above"
        print(f"backend {chosen}: {verdict}")
    return EXIT_OK if ok else EXIT_FAILED


# -- status --------------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    directory = _state_dir(cfg)
    while True:
        doc = status.status_doc(directory, cfg.default.pool.store)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            status.print_status(doc, directory.path)
        if not args.watch:
            return EXIT_OK
        sys.stdout.flush()  # each refresh reaches a pipe (`| tee`, a CI log) as it is made
        time.sleep(_WATCH_INTERVAL)  # a refresh period for a human, not a readiness wait


# -- up / down / gc ---------------------------------------------------------------------------
def _up(args: argparse.Namespace) -> int:
    cfg = _load(args)
    profile = cfg.profile(args.profile)
    directory = _state_dir(cfg)
    backend = make_backend(profile.pool.backend, profile, directory.path)
    size = profile.pool.size or 1

    def progress(e: Progress) -> None:
        print(f"vmpool: {e.ready}/{e.size} ready on {e.backend} ({e.message})", file=sys.stderr)

    controller = Controller(
        directory=directory,
        backend=backend,
        profile=profile,
        size=size,
        session=new_session_id(),
        keep=True,
        progress=progress,
    )
    controller.start()
    try:
        controller.wait_until_ready(size, args.timeout)
    except BaseException:
        controller.stop(keep=False, lease_timeout=0)
        raise
    controller.stop(keep=True, lease_timeout=0)
    print(f"pool {controller.pool_id}: {size} machine(s) ready on {backend.name}, kept")
    return EXIT_OK


class _LiveSession(Exception):
    """`vmpool down` found the pool owned by a live session (and no --force)."""


def _claim_for_down(store: StateStore, *, force: bool) -> Pool | None:
    """Decide and mark the pool closing in one transaction: a session adopting the kept pool
    takes the same lock, so either it adopted first (and the pool is live: skipped) or it sees
    the pool closing, owned by this process, and does not adopt it. None: no record."""
    if store.read() is None:
        return None
    with store.transaction() as pool:
        live = pool.owner is not None and is_alive(pool.owner) and not pool.keep
        if live and not force:
            raise _LiveSession(store.pool_id)
        pool.closing = True
        pool.keep = False
        pool.owner = current_process()
        return pool.model_copy(deep=True)


def _backend_for(
    cfg: vmconfig.Config, directory: JsonStateDir, name: str | None = None
) -> Callable[[Pool | None], Backend]:
    """A pool's own backend (its record's backend and profile; without a record ``name``, else
    the configured one)."""

    def backend(pool: Pool | None) -> Backend:
        if pool is None:
            return make_backend(name or cfg.default.pool.backend, cfg.default, directory.path)
        return make_backend(pool.backend, cfg.profiles.get(pool.profile, cfg.default),
                            directory.path)

    return backend


def _down(args: argparse.Namespace) -> int:
    cfg = _load(args)
    directory = _state_dir(cfg)
    shared = cfg.default.pool.store
    if args.pool and shared is not None:
        from vmpool.pgstore import closing
        from vmpool.pgstore.store import pool_ids

        if args.pool in pool_ids(shared):  # attached sessions: PoolInUse (exit 1)
            outcome = closing.down(shared, args.pool, _backend_for(cfg, directory, args.backend),
                                   force=args.force, lease=cfg.default.pool.store_lease)
            print(outcome.line())
            return EXIT_FAILED if outcome.failed else EXIT_OK
    status = EXIT_OK
    ids = [args.pool] if args.pool else directory.pool_ids()
    for pid in ids:
        store = directory.store(pid)
        pool: Pool | None
        try:
            pool = _claim_for_down(store, force=args.force)
        except StateError as exc:
            if not args.force:
                raise
            print(f"vmpool: {exc}; --force: destroying by labels", file=sys.stderr)
            pool = None
        except _LiveSession:
            print(
                f"vmpool: pool {pid} belongs to a live session; skipped (use --force)",
                file=sys.stderr,
            )
            status = EXIT_FAILED
            continue
        backend_name = pool.backend if pool else (args.backend or cfg.default.pool.backend)
        profile = cfg.profiles.get(pool.profile if pool else "default", cfg.default)
        backend = make_backend(backend_name, profile, directory.path)
        names = {m.name for m in pool.machines} if pool else set()
        names |= pool_machines(backend, pid)
        failed = False
        for name in sorted(names):
            try:
                backend.delete(name)
                print(f"deleted {name}")
            except VmPoolError as exc:
                print(f"vmpool: could not delete {name}: {exc}", file=sys.stderr)
                failed = True
        network = pool.network if pool else pool_network(backend, pid)
        if network:
            with contextlib.suppress(VmPoolError):
                backend.delete_network(network)
        if failed:
            status = EXIT_FAILED
            continue
        if pool is None:
            with contextlib.suppress(FileNotFoundError):
                store.path.unlink()
        else:
            store.remove()
        print(f"pool {pid} destroyed")
    return status


def _gc(args: argparse.Namespace) -> int:
    cfg = _load(args)
    profile = cfg.profile(args.profile)
    directory = _state_dir(cfg)
    backend = make_backend(profile.pool.backend, profile, directory.path)
    shared = cfg.default.pool.store
    failed = False
    listing: Callable[[], list[str]] | None = None
    if shared is not None:  # first the shared pools no session is attached to
        from vmpool.pgstore import closing
        from vmpool.pgstore.store import pool_ids

        for outcome in closing.gc(shared, _backend_for(cfg, directory), dry_run=args.dry_run,
                                  lease=cfg.default.pool.store_lease):
            print(outcome.line(args.dry_run))
            failed = failed or outcome.failed
        listing = functools.partial(pool_ids, shared)  # their machines are theirs
    report = reaper.reap(directory, backend, profile.pool.name_prefix, dry_run=args.dry_run,
                         shared=listing)
    verb = "would delete" if args.dry_run else "deleted"
    for name in report.machines_deleted:
        print(f"{verb} machine {name}")
    for name in report.networks_deleted:
        print(f"{verb} network {name}")
    for pid in report.pools_removed:
        print(f"{verb} pool record {pid}")
    for name in report.files_removed:
        print(f"{verb} stale file {name}")
    for name in report.spared:
        print(f"spared {name} (its session is alive or kept)")
    for name in report.unknown:
        print(f"left {name} alone (no owner information)")
    for err in report.errors:
        print(f"vmpool: {err}", file=sys.stderr)
    if report.empty:
        print(f"nothing to reap in {directory.path} on {backend.name}")
    return EXIT_FAILED if report.errors or failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
