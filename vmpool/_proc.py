"""The one subprocess helper: argv lists only, always a timeout, output captured."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcResult:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float

    def check(self, what: str = "") -> ProcResult:
        """Raise BackendError showing the command and its stderr when it exited non-zero."""
        if self.returncode != 0:
            label = f"{what}: " if what else ""
            raise BackendError(
                f"{label}{' '.join(self.argv)} exited {self.returncode}: "
                f"{(self.stderr or self.stdout).strip()[-2000:]}"
            )
        return self


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    install_hint: str = "",
    umask: int = -1,
) -> ProcResult:
    """Run ``argv`` (never through a shell) and wait at most ``timeout`` seconds.

    The child runs in its own process group so a timeout kills it and everything it started.
    A missing executable raises BackendUnavailable naming it (and ``install_hint``).
    ``umask`` (when not -1) is the child's, for tools that create files in vmpool's directories.
    """
    args = [str(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    data = input.encode() if isinstance(input, str) else input
    started = time.monotonic()
    log.debug("run %s (timeout %ss)", args, timeout)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            umask=umask,
        )
    except FileNotFoundError as exc:
        hint = f" ({install_hint})" if install_hint else ""
        raise BackendUnavailable(f"{args[0]}: command not found{hint}") from exc
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise ExecTimeout(f"{' '.join(args)} did not finish within {timeout}s") from exc
    except BaseException:
        _kill_group(proc)
        raise
    duration = time.monotonic() - started
    log.debug("done %s: exit %s in %.3fs", args[:3], proc.returncode, duration)
    return ProcResult(
        tuple(args),
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        duration,
    )


def spawn(
    argv: Sequence[str], *, log_path: Path, install_hint: str = ""
) -> subprocess.Popen[bytes]:
    """Start a long-running ``argv`` (a service) in its own session, output appended to
    ``log_path`` (0600); the caller owns the process and must stop it."""
    args = [str(a) for a in argv]
    log.debug("spawn %s", args)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
        )
    except FileNotFoundError as exc:
        hint = f" ({install_hint})" if install_hint else ""
        raise BackendUnavailable(f"{args[0]}: command not found{hint}") from exc
    finally:
        os.close(fd)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        log.debug("process group %s already gone", proc.pid)
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("process %s did not exit after SIGKILL", proc.pid)
