#!/usr/bin/env python3
"""A stand-in for OrbStack's ``orbctl`` that answers with the shapes of recorded real output.

OrbStack runs only on macOS, so vmpool's OrbStack backend is contract-tested against this script.
Every answer is built from the files in ``recordings/orbctl/`` (see the README there):

* ``list --format json`` lists machines using the first recorded entry of
  ``list-json-two-machines.json`` as the template, filling in name, id, image and state;
* ``info NAME --format json`` uses ``info-json-running.json`` as the template;
* a missing machine gets the recorded stderr and exit status of ``error-machine-not-found.json``;
* ``run -m NAME [-u USER] ARGV...`` really runs ARGV on this host, in a per-machine directory, so
  its stdout, stderr and exit status are the command's own.

Environment:

* ``FAKE_ORBCTL_STATE`` (required): JSON file holding the machines (created when missing);
  per-machine directories go beside it in ``machines/``.
* ``FAKE_ORBCTL_LOG``: every call's argv is appended to this file as one JSON list per line.
* ``FAKE_ORBCTL_STATUS``: what ``orbctl status`` prints instead of the recorded ``Running``.
* ``FAKE_ORBCTL_FAIL``: comma-separated subcommands that fail with the recorded error of
  ``error-<subcommand>.json`` when there is one (``delete``: ``error-delete-invalid-transition``).
* ``FAKE_ORBCTL_BOOT_PROBES``: how many ``run`` calls a newly created machine refuses before it
  answers (simulates a machine still booting).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RECORDINGS = Path(__file__).resolve().parent / "recordings" / "orbctl"
FAIL_RECORDINGS = {"delete": "error-delete-invalid-transition.json"}
#: Text of the fake's own "still booting" refusal (invented: no real output is recorded for it).
BOOTING = "fake orbctl: machine '{name}' is still starting\n"


def _recording(name: str) -> str:
    return (RECORDINGS / name).read_text(encoding="utf-8")


def _case(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(_recording(name))
    return case


def _replay_error(case_file: str, recorded_name: str | None, name: str) -> int:
    """Print a recorded error (with the recorded machine name replaced) and return its status."""
    case = _case(case_file)
    stderr: str = case["stderr"]
    stdout: str = case["stdout"]
    if recorded_name is not None:
        stderr = stderr.replace(recorded_name, name)
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    status: int = case["exit_code"]
    return status


def _not_found(name: str) -> int:
    # the recording is `orbctl info ghost`; only the machine name differs between commands
    return _replay_error("error-machine-not-found.json", "ghost", name)


def _state_path() -> Path:
    return Path(os.environ["FAKE_ORBCTL_STATE"])


@contextmanager
def _locked_state() -> Iterator[dict[str, Any]]:
    """The machine table, locked for a read-modify-write (tests run calls concurrently)."""
    path = _state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state: dict[str, Any] = (
            json.loads(path.read_text(encoding="utf-8"))
            if path.exists()
            else {"next_id": 1, "machines": {}}
        )
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, path)


def _machine_dir(name: str) -> Path:
    return _state_path().parent / "machines" / name


def _split_flags(
    args: list[str], valued: dict[str, str], flags: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Parse leading flags like orbctl does (not interspersed): stop at the first positional."""
    opts: dict[str, str] = {}
    rest = list(args)
    while rest and rest[0].startswith("-"):
        arg = rest.pop(0)
        if arg == "--":
            break
        key, _, inline = arg.partition("=")
        if key in valued:
            opts[valued[key]] = inline if inline else rest.pop(0)
        elif key in flags:
            opts[flags[key]] = "1"
        else:
            sys.stderr.write(f"Error: unknown flag: {key}\n")
            raise SystemExit(1)
    return opts, rest


def _list_entry(machine: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = json.loads(_recording("list-json-two-machines.json"))[0]
    entry = copy.deepcopy(template)
    entry["id"] = machine["id"]
    entry["name"] = machine["name"]
    entry["image"].update(
        distro=machine["distro"], version=machine["version"], arch=machine["arch"]
    )
    if machine.get("user"):
        entry["config"]["default_username"] = machine["user"]
    entry["state"] = machine["state"]
    return entry


def _wants_json(opts: dict[str, str]) -> bool:
    return opts.get("format") == "json"


def cmd_status(args: list[str]) -> int:
    sys.stdout.write(os.environ.get("FAKE_ORBCTL_STATUS", _recording("status.txt").strip()) + "\n")
    return 0


def cmd_version(args: list[str]) -> int:
    sys.stdout.write(_recording("version.txt"))
    return 0


def cmd_create(args: list[str]) -> int:
    opts, rest = _split_flags(
        args, {"--arch": "arch", "-a": "arch", "--user": "user", "-u": "user"}, {}
    )
    if len(rest) != 2:
        sys.stderr.write("Error: usage: orbctl create [flags] DISTRO[:VERSION] NAME\n")
        return 1
    image, name = rest
    distro, _, version = image.partition(":")
    with _locked_state() as state:
        if name in state["machines"]:
            # invented text: no recording of this error was found
            sys.stderr.write(f"[-32098] machine already exists: '{name}'\n")
            return 1
        number = state["next_id"]
        state["next_id"] = number + 1
        state["machines"][name] = {
            "id": f"01JF{number:022d}",
            "number": number,
            "name": name,
            "distro": distro,
            "version": version or "latest",
            "arch": opts.get("arch", "arm64"),
            "user": opts.get("user", ""),
            "state": "running",
            "refuse_runs": int(os.environ.get("FAKE_ORBCTL_BOOT_PROBES", "0")),
        }
    _machine_dir(name).mkdir(parents=True, exist_ok=True)
    return 0


def _set_state(args: list[str], new_state: str) -> int:
    _, rest = _split_flags(args, {}, {"--force": "force", "-f": "force"})
    name = rest[0] if rest else ""
    with _locked_state() as state:
        machine = state["machines"].get(name)
        if machine is None:
            return _not_found(name)
        machine["state"] = new_state
    return 0


def cmd_start(args: list[str]) -> int:
    return _set_state(args, "running")


def cmd_stop(args: list[str]) -> int:
    return _set_state(args, "stopped")


def cmd_delete(args: list[str]) -> int:
    _, rest = _split_flags(args, {}, {"--force": "force", "-f": "force"})
    name = rest[0] if rest else ""
    with _locked_state() as state:
        if name not in state["machines"]:
            return _not_found(name)
        del state["machines"][name]
    shutil.rmtree(_machine_dir(name), ignore_errors=True)
    return 0


def cmd_list(args: list[str]) -> int:
    opts, _ = _split_flags(args, {"--format": "format", "-f": "format"}, {})
    with _locked_state() as state:
        machines = list(state["machines"].values())
    if _wants_json(opts):
        sys.stdout.write(json.dumps([_list_entry(m) for m in machines], indent=2) + "\n")
        return 0
    # the table layout of the recorded `orbctl list` (list-table.txt)
    rows = [
        ("NAME", "STATE", "DISTRO", "VERSION", "ARCH"),
        ("----", "-----", "------", "-------", "----"),
    ]
    rows += [(m["name"], m["state"], m["distro"], m["version"], m["arch"]) for m in machines]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    return 0


def cmd_info(args: list[str]) -> int:
    opts, rest = _split_flags(args, {"--format": "format", "-f": "format"}, {})
    name = rest[0] if rest else ""
    if len(rest) > 1:  # `info NAME --format json`: flags may follow the name
        more, _ = _split_flags(rest[1:], {"--format": "format", "-f": "format"}, {})
        opts.update(more)
    with _locked_state() as state:
        machine = state["machines"].get(name)
    if machine is None:
        return _not_found(name)
    info: dict[str, Any] = json.loads(_recording("info-json-running.json"))
    info["record"] = _list_entry(machine)
    if machine["state"] == "running":
        info["ip4"] = f"198.19.249.{machine['number'] % 250 + 2}"
    else:
        # assumption (not recorded): a stopped machine reports no addresses
        info.pop("ip4", None)
        info.pop("ip6", None)
    if _wants_json(opts):
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write(f"Name: {name}\nState: {machine['state']}\n")
    return 0


def cmd_run(args: list[str]) -> int:
    opts, argv = _split_flags(
        args,
        {
            "--machine": "machine",
            "-m": "machine",
            "--user": "user",
            "-u": "user",
            "--workdir": "workdir",
            "-w": "workdir",
        },
        {},
    )
    name = opts.get("machine", "")
    with _locked_state() as state:
        machine = state["machines"].get(name)
        if machine is None:
            return _not_found(name)
        if machine["state"] != "running" or machine["refuse_runs"] > 0:
            machine["refuse_runs"] = max(machine["refuse_runs"] - 1, 0)
            sys.stderr.write(BOOTING.format(name=name))
            return 1
    if not argv:
        sys.stderr.write("Error: no command given\n")
        return 1
    workdir = _machine_dir(name)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(opts.get("workdir", workdir))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # replace this process, so a timeout that kills it kills the command
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"fake orbctl: {argv[0]}: {exc.strerror}\n")
        return 127


COMMANDS = {
    "status": cmd_status,
    "version": cmd_version,
    "create": cmd_create,
    "start": cmd_start,
    "stop": cmd_stop,
    "delete": cmd_delete,
    "list": cmd_list,
    "info": cmd_info,
    "run": cmd_run,
}


def main(argv: list[str]) -> int:
    log = os.environ.get("FAKE_ORBCTL_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(argv) + "\n")
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f'Error: unknown command {argv[0] if argv else ""!r} for "orbctl"\n')
        return 1
    failing = {c.strip() for c in os.environ.get("FAKE_ORBCTL_FAIL", "").split(",") if c.strip()}
    if argv[0] in failing:
        return _replay_error(
            FAIL_RECORDINGS.get(argv[0], "error-delete-invalid-transition.json"), None, ""
        )
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
