"""Clones: a machine started from a template state (``-incoming``) instead of booting.

After launch, finish() checks the restore and gives the clone its own identity through the
guest agent (hostname, clock, MAC, address: a clone starts with the template's); whatever
goes wrong, the machine is booted instead, within the same wait.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

from vmpool.backends.base import probe_until
from vmpool.backends.qemu import agent, process, qmp
from vmpool.backends.qemu.network import guest_address_commands
from vmpool.backends.qemu.records import RECORD, Accel, Record, save_record
from vmpool.backends.qemu.template import Templates
from vmpool.errors import BackendError, ReadyTimeout, VmPoolError

log = logging.getLogger(__name__)

#: From a clone's launch until its state is restored and personalized; past it, it boots.
CLONE_TIMEOUT = 60.0


class Clones:
    """Finishes clones: restore checked, identity set, or a boot instead."""

    def __init__(
        self, launcher: process.Launcher, templates: Templates, accel: Callable[[], Accel]
    ) -> None:
        self.launcher = launcher
        self.templates = templates
        self.accel = accel

    def finish(self, run_dir: Path, record: Record, deadline: float) -> Record:
        """Check the restore, give the clone its identity; boot it instead if that fails.

        Returns the record to probe with. Raises ReadyTimeout when ``deadline`` (one slice of
        the caller's wait) passes first while the clone still has time of its own.
        """
        if not record.clone_pending:
            return record
        launched = record.launched_at if record.launched_at is not None else time.monotonic()
        clone_deadline = launched + CLONE_TIMEOUT
        phase = "restore"
        try:
            timeout = min(deadline, clone_deadline) - time.monotonic()
            if timeout <= 0:
                raise ReadyTimeout(f"qemu machine {record.name} is still restoring")
            _await_restore(run_dir, record, timeout)
            phase = "identity"
            _personalize(run_dir, record, min(deadline, clone_deadline))
        except ReadyTimeout as exc:
            if time.monotonic() < clone_deadline:
                raise  # the caller's slice ended; the clone has time left
            failure = f"{phase}: not done {CLONE_TIMEOUT:g}s after launch: {exc}"
        except process.QemuExited:
            failure = f"{phase}: qemu exited{process.died_hint(run_dir)}"
        except (process.ProbeFailed, VmPoolError, OSError) as exc:
            failure = f"{phase}: {exc}"
        else:
            done = replace(record, clone_pending=False)
            save_record(run_dir, done)
            return done
        if not (run_dir / RECORD).is_file():
            raise BackendError(f"qemu machine {record.name} was deleted while it restored")
        log.warning("qemu machine %s: clone failed (%s); booting it instead", record.name, failure)
        if phase == "restore" and "qemu exited" in failure and record.template is not None:
            # a state qemu cannot load is of no use to the next machine either
            self.templates.discard(Path(record.template), record.template_stamp)
        process.kill_run(run_dir)
        accel = cast(Accel, record.accel or self.accel())
        booted = replace(
            record, template=None, template_stamp=None, clone_pending=False,
            launched_at=time.monotonic(),
        )
        save_record(run_dir, booted)
        self.launcher.launch(run_dir, booted, accel)
        return booted


def _await_restore(run_dir: Path, record: Record, timeout: float) -> None:
    """Until the clone runs: a state saved running resumes by itself, a paused one not."""

    def probe() -> None:
        if process.find(run_dir) is None:
            raise process.QemuExited
        status = qmp.qmp(record, "query-status", None)
        state = status.get("status") if isinstance(status, dict) else None
        if state == "running":
            return
        if state == "inmigrate":
            raise BackendError("still restoring")
        if state == "paused":
            qmp.qmp(record, "cont", None)
            raise BackendError("was paused, resumed it")
        raise process.ProbeFailed(f"after restore the guest is {state}")

    probe_until(probe, timeout=timeout, what=f"qemu machine {record.name} restore",
                first_interval=0.02, max_interval=0.25)


def _personalize(run_dir: Path, record: Record, deadline: float) -> None:
    """Give a clone its hostname, clock, MAC and address (it has the template's)."""
    script = identity_script(record)
    sock = record.qga_sock
    what = f"qemu machine {record.name} identity"

    def probe() -> None:
        if process.find(run_dir) is None:
            raise process.QemuExited
        now = time.monotonic()
        step = min(now + agent.PROBE_STEP_TIMEOUT, max(deadline, now + 0.2))
        with agent.Agent.open(sock, step) as conn:
            conn.sync(step)
            # the clock is set as late as possible: the template's is stale
            argv = ["sh", "-c", script, "identity", str(round(time.time()))]
            result = agent.guest_exec(conn, what, argv, agent.PROBE_STEP_TIMEOUT, step)
        if not result.ok:
            raise process.ProbeFailed(f"setting it failed (exit {result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-500:]}")
        seen = result.stdout.split()
        expected = [record.name, *([record.mac, f"{record.ip}/{record.prefix}"]
                                   if record.ip is not None else [])]
        if seen != expected:
            raise process.ProbeFailed(f"the guest reports {seen}, expected {expected}")

    timeout = max(deadline - time.monotonic(), 0.01)
    probe_until(probe, timeout=timeout, what=what, first_interval=0.05, max_interval=0.5)


def identity_script(record: Record) -> str:
    """sh -c script (``$1``: the host's epoch seconds) setting a clone's identity; it prints
    the hostname, then with a network the MAC and address, for the caller to compare."""
    q = shlex.quote
    lines = [
        "set -e",
        f"hostname {q(record.name)}",
        'date -s "@$1" >/dev/null',
        # mix host randomness in: clones start with the template's pool (reseeds soon after)
        f"echo {secrets.token_hex(32)} > /dev/urandom",
    ]
    setting, printing = guest_address_commands(record, "eth0")
    lines += [*setting, "hostname", *printing]
    return "\n".join(lines) + "\n"
