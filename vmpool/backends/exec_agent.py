"""A container's exec agent: commands in milliseconds instead of one ``podman exec`` each.

Every ``podman exec`` starts the podman binary, conmon and a cleanup process: about 0.1 s of CPU
and 0.15 s of wall time here, whatever the command. A test that runs ten commands pays that ten
times. The agent is a small POSIX ``sh`` loop started once per container (by one ``exec -d``),
in a host directory bind-mounted at ``/.vmpool``. A host process (any of them: the controller,
any xdist worker) asks it to run a command by writing the argv, quoted, to ``<id>.sh`` and the
line ``run <id>`` to the FIFO ``in``; the agent runs it with stdin from /dev/null and its output
in ``<id>.out`` and ``<id>.err``, then writes the exit status to the FIFO ``<id>.done``, which
the host was waiting on. A round trip costs about 2 ms.

The command runs as the container's own processes do: under its runtime, cgroup, user,
environment and working directory, as ``podman exec`` would run it (the agent itself was started
by one). A timed-out command is killed with everything it started (they carry
``VMPOOL_EXEC_ID=<id>`` in their environment, as with ``podman exec``).

When no agent listens (it was never started, the image has no ``sh``, a test killed it), opening
``in`` fails with ENXIO and ``run`` returns None: the caller uses ``podman exec``.

The directory is shared with the container, which may write anything into it; the host never
follows a symlink there and never writes a file that already exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shlex
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import portalocker

from vmpool._files import private_opener
from vmpool.backends.base import ExecResult
from vmpool.errors import BackendError, ExecTimeout

#: where the agent's directory is mounted in the container
MOUNT_POINT = "/.vmpool"
#: set on every command the agent runs, so a timed-out one can be found with its children
EXEC_ENV = "VMPOOL_EXEC_ID"



def kill_script(token: str) -> str:
    """sh that SIGKILLs every process whose environment carries ``EXEC_ENV=<token>`` (a
    command's whole tree: what it started inherits the variable)."""
    return (
        "for p in /proc/[0-9]*; do "
        f'grep -qs "{EXEC_ENV}={token}" "$p/environ" && kill -9 "${{p#/proc/}}"; '
        "done; true"
    )


SCRIPT = f"""\
# vmpool exec agent (vmpool.backends.exec_agent): runs the commands put in {MOUNT_POINT}
d={MOUNT_POINT}
exec 3<>"$d/in" </dev/null >/dev/null 2>&1
while read -r verb id <&3; do
  case $id in *[!0-9a-f]*|'') continue ;; esac
  case $verb in
    run) (
        sh "$d/$id.sh" </dev/null >"$d/$id.out" 2>"$d/$id.err"
        s=$?; [ -p "$d/$id.done" ] && echo $s >"$d/$id.done"
      ) 3<&- & ;;
    kill) {kill_script("$id")} ;;
  esac
done
"""

_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
#: while a command runs, check this often that the agent is still there
_LIVENESS = 0.5


class ExecAgent:
    """The host end of one container's agent, in ``directory`` (mounted at MOUNT_POINT)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def script(self) -> str:
        """The agent's path inside the container."""
        return f"{MOUNT_POINT}/agent.sh"

    def prepare(self) -> None:
        """Make the directory, the agent script and its request FIFO (before the container)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        script = self.dir / "agent.sh"
        with contextlib.suppress(FileNotFoundError):
            script.unlink()
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(SCRIPT)
        with contextlib.suppress(FileExistsError):
            os.mkfifo(self.dir / "in", 0o600)

    @contextlib.contextmanager
    def starting(self, timeout: float) -> Iterator[bool]:
        """Hold the right to start the agent (a lock beside it; True) or give up after
        ``timeout`` (False). Two agents on one FIFO would each read parts of the same lines, so
        whoever starts one first checks, under this lock, that none listens yet."""
        try:
            with portalocker.Lock(
                str(self.dir / "start.lock"),
                mode="a",
                timeout=timeout,
                check_interval=0.005,
                opener=private_opener,
            ):
                yield True
        except portalocker.exceptions.LockException:
            yield False

    def listening(self) -> bool:
        """Whether an agent has the request FIFO open."""
        fd = self._open_in()
        if fd is None:
            return False
        os.close(fd)
        return True

    def run(self, argv: Sequence[str], timeout: float) -> ExecResult | None:
        """Run ``argv`` through the agent; None when no agent listens (nothing was run).

        Raises ExecTimeout (the command and its children killed) after ``timeout`` seconds.
        """
        rid = uuid.uuid4().hex
        script = f"export {EXEC_ENV}={rid}\nexec {shlex.join(argv)}\n"
        done = self.dir / f"{rid}.done"
        try:
            self._create(f"{rid}.sh", script.encode())
            os.mkfifo(done, 0o600)
            reader = os.open(done, os.O_RDONLY | os.O_NONBLOCK | _FLAGS)
        except FileNotFoundError:  # no directory: the container was made without an agent
            self._clean(rid)
            return None
        except OSError as exc:
            self._clean(rid)
            raise BackendError(f"exec agent in {self.dir}: {exc}") from exc
        try:
            requests = self._open_in()
            if requests is None:
                return None
            try:
                os.write(requests, f"run {rid}\n".encode())  # < PIPE_BUF: one atomic line
            except OSError as exc:  # EAGAIN: a full FIFO, an agent that stopped reading
                raise BackendError(f"exec agent in {self.dir} does not read: {exc}") from exc
            finally:
                os.close(requests)
            status = self._wait(reader, timeout)
            if status is None:
                self._kill(rid)
                raise ExecTimeout(
                    f"{shlex.join(argv)} in {self.dir.name} did not finish within {timeout:g}s "
                    "(killed, with what it started)"
                )
            return ExecResult(status, self._read(f"{rid}.out"), self._read(f"{rid}.err"))
        finally:
            # unlink before closing: an agent still about to report finds no FIFO (and writes a
            # plain file) rather than one with no reader, where it would block for ever
            self._clean(rid)
            os.close(reader)

    # -- helpers -----------------------------------------------------------------------------------
    def _open_in(self) -> int | None:
        try:
            return os.open(self.dir / "in", os.O_WRONLY | os.O_NONBLOCK | _FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader; no FIFO (no agent here)
                return None
            raise BackendError(f"exec agent in {self.dir}: {exc}") from exc

    def _wait(self, reader: int, timeout: float) -> int | None:
        """The exit status the agent writes to the done FIFO; None on timeout.

        Every ``_LIVENESS`` seconds without an answer it checks that the agent still listens: a
        container stopped (or an agent killed, with its subshells) mid-command never answers,
        and that is a BackendError now, not a timeout much later."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(reader, select.POLLIN)
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            events = poller.poll(min(left, _LIVENESS) * 1000)
            try:
                chunk = os.read(reader, 64)
            except BlockingIOError:  # the agent opened the FIFO and has not written yet
                continue
            if not chunk:
                if events:  # opened and closed without a status: the agent died mid-way
                    raise BackendError("exec agent went away before the command finished")
                if not self.listening():
                    raise BackendError(
                        f"{self.dir.name}: exec agent stopped while the command ran (the "
                        "container stopped, or something in it killed the agent); the "
                        "command's outcome is unknown"
                    )
                continue
            data += chunk
        try:
            return int(data.strip())
        except ValueError as exc:
            raise BackendError(f"exec agent sent a bad exit status: {data[:64]!r}") from exc

    def _kill(self, rid: str) -> None:
        with contextlib.suppress(OSError):
            requests = self._open_in()
            if requests is not None:
                try:
                    os.write(requests, f"kill {rid}\n".encode())
                finally:
                    os.close(requests)

    def _create(self, name: str, data: bytes) -> None:
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def _read(self, name: str) -> str:
        try:
            fd = os.open(self.dir / name, os.O_RDONLY | os.O_NONBLOCK | _FLAGS)
        except OSError as exc:
            raise BackendError(f"exec agent: cannot read {name}: {exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise BackendError(f"exec agent: {name} is not a regular file")
            return fh.read().decode("utf-8", errors="replace")

    def _clean(self, rid: str) -> None:
        for suffix in ("sh", "done", "out", "err"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{rid}.{suffix}")
