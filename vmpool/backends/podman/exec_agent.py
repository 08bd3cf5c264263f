"""A container's exec agent: commands in milliseconds instead of one ``podman exec`` each.

Every ``podman exec`` starts the podman binary, conmon and a cleanup process: about 0.1 s of CPU
and 0.15 s of wall time here, whatever the command. A test that runs ten commands pays that ten
times. The agent is a small POSIX ``sh`` loop started once per container (by one ``exec -d``)
from a script the host mounts at ``/.vmpool``. A host process (any of them: the controller, any
xdist worker) asks it to run a command by writing the argv, quoted, to ``<id>.sh`` and the line
``run <id>`` to the FIFO ``in``, both in ``/.vmpool/io``; the agent runs it with stdin from
/dev/null and its output in ``<id>.out`` and ``<id>.err``, then writes the exit status to the
FIFO ``<id>.done``, which the host was waiting on. A round trip costs about 2 ms.

The command runs as the container's own processes do: under its runtime, cgroup, user,
environment and working directory, as ``podman exec`` would run it (the agent itself was started
by one). A timed-out command is killed with everything it started (they carry
``VMPOOL_EXEC_ID=<id>`` in their environment, as with ``podman exec``).

Whatever runs in the container may write anything it can reach, so the host directory
``exec/<name>/`` is split in three:

- ``start.lock``: host-only (never mounted);
- ``root/``: mounted read-only at ``/.vmpool``: the script ``agent.sh``, and ``io/``, an empty
  directory the next mount covers;
- ``io/``: mounted read-write at ``/.vmpool/io``: the FIFO ``in`` and each command's files. The
  host opens names there only through a descriptor of the directory, with ``O_NOFOLLOW``, and
  checks the type of what it opened (a FIFO where it expects one, a regular file for output):
  a symlink the container planted is never followed, a file it swapped in is never trusted.

``rebuild()`` makes all three as new, so a test that tampered with them (a FIFO turned into a
plain file, a planted symlink) cannot reach the next user of the machine; it runs before each
container is made from the machine's recipe (create, reset). An ``in`` that is not a FIFO, or
that nobody reads (no agent was started, the image has no ``sh``, a test killed it), makes
``run`` return None: the caller uses ``podman exec``, and ``repair()`` puts a FIFO back before
the agent is started again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shlex
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from vmpool._lock import file_lock
from vmpool.backends.base import ExecResult
from vmpool.errors import BackendError, ExecTimeout, LockTimeout

log = logging.getLogger(__name__)

#: where the agent's read-only directory (its script) is mounted in the container
MOUNT_POINT = "/.vmpool"
#: where its read-write directory (requests, commands' files) is mounted, inside MOUNT_POINT
IO_MOUNT = f"{MOUNT_POINT}/io"
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
# vmpool exec agent (vmpool.backends.podman.exec_agent): runs the commands put in {IO_MOUNT}
d={IO_MOUNT}
exec 3<>"$d/in" </dev/null >/dev/null 2>&1
while read -r verb id <&3; do
  case $id in *[!0-9a-f]*|'') continue ;; esac
  case $verb in
    run) (
        (umask 077; : >"$d/$id.out"; : >"$d/$id.err")  # 0600, the command keeps its umask
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
_IN = "in"
#: O_PATH where the platform has it (Linux), for type checks before an open
_O_PATH: int | None = getattr(os, "O_PATH", None)
_LOCK = "start.lock"


class ExecAgent:
    """The host end of one container's agent, in the host-only ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        #: the read-only tree mounted at MOUNT_POINT
        self.root = directory / "root"
        #: the read-write directory mounted at IO_MOUNT: everything here is the container's
        self.io = directory / "io"

    @property
    def script(self) -> str:
        """The agent's path inside the container."""
        return f"{MOUNT_POINT}/agent.sh"

    def mounts(self) -> list[str]:
        """``--volume`` values that give a container this agent (read-only tree first)."""
        return [f"{self.root}:{MOUNT_POINT}:ro", f"{self.io}:{IO_MOUNT}"]

    def installed(self) -> bool:
        """Whether ``rebuild()`` made this directory (so the container has the mounts)."""
        return (self.root / "agent.sh").is_file()

    def rebuild(self) -> None:
        """Make the directory as new: the script, an empty ``io`` and its request FIFO.

        Call it while no process of the container runs (before create, after the container is
        removed on reset): it deletes whatever the last user of the machine left in ``io``.
        ``io`` itself is emptied, not replaced, so a mount of it stays valid.
        """
        try:
            self._rebuild()
        except OSError as exc:
            raise BackendError(f"cannot make the exec agent's directory {self.dir}: {exc}") from exc

    def _rebuild(self) -> None:
        self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        with _directory(self.dir) as top:
            # a lock file in use stays (it may be held); anything else not ours goes, e.g. a
            # tree of the layout before io/ was split off, which the container could write
            _empty(top, keep={"root", "io"} | ({_LOCK} if _is_regular(top, _LOCK) else set()))
            for sub in ("root", "io"):
                if not _is_directory(top, sub):
                    _remove(top, sub)
                    os.mkdir(sub, 0o700, dir_fd=top)
        with _directory(self.root) as root:
            # a directory there stays: on the host it is also the mount point of io in a
            # container still running (removing it would unmount io there)
            _empty(root, keep={"io"} if _is_directory(root, "io") else ())
            if not _is_directory(root, "io"):
                os.mkdir("io", 0o700, dir_fd=root)
            fd = os.open("agent.sh", os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600,
                         dir_fd=root)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(SCRIPT)
        with _directory(self.io) as io:
            _empty(io)
            os.mkfifo(_IN, 0o600, dir_fd=io)

    def scrub(self) -> None:
        """Empty ``io`` but for its request FIFO, while the agent keeps running (a live reset):
        nothing the last test left there reaches the next one. A ``in`` that is not a FIFO is
        removed too; ``listening()`` then says the agent no longer serves."""
        try:
            with _directory(self.io) as io:
                fifo = {_IN} if _is_fifo(io, _IN) else set()
                _empty(io, keep=fifo)
        except OSError as exc:
            raise BackendError(f"cannot empty the exec agent's {self.io}: {exc}") from exc

    def repair(self) -> None:
        """Put a FIFO back as ``io/in`` if the container replaced it (call before starting an
        agent, under ``starting()``)."""
        with _directory(self.io) as io:
            try:
                if stat.S_ISFIFO(os.stat(_IN, dir_fd=io, follow_symlinks=False).st_mode):
                    return
            except FileNotFoundError:
                pass
            else:
                log.info("exec agent in %s: %s/in is not a FIFO; making a new one",
                         self.dir.name, IO_MOUNT)
                _remove(io, _IN)
            os.mkfifo(_IN, 0o600, dir_fd=io)

    @contextlib.contextmanager
    def starting(self, timeout: float) -> Iterator[bool]:
        """Hold the right to start the agent (a lock beside it; True) or give up after
        ``timeout`` (False). Two agents on one FIFO would each read parts of the same lines, so
        whoever starts one first checks, under this lock, that none listens yet."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(file_lock(self.dir / _LOCK, timeout=timeout, check_interval=0.005))
        except LockTimeout:
            yield False
            return
        except OSError as exc:
            raise BackendError(f"exec agent: cannot lock {self.dir / _LOCK}: {exc}") from exc
        with held:
            yield True

    def listening(self) -> bool:
        """Whether an agent has the request FIFO open."""
        io = _open_directory(self.io)
        if io is None:
            return False
        try:
            fd = _open_in(io)
        finally:
            os.close(io)
        if fd is None:
            return False
        os.close(fd)
        return True

    def run(self, argv: Sequence[str], timeout: float) -> ExecResult | None:
        """Run ``argv`` through the agent; None when no agent listens (nothing was run).

        Raises ExecTimeout (the command and its children killed) after ``timeout`` seconds.
        """
        io = _open_directory(self.io)
        if io is None:  # no directory: the container was made without an agent
            return None
        try:
            return self._run(io, argv, timeout)
        finally:
            os.close(io)

    # -- helpers -----------------------------------------------------------------------------------
    def _run(self, io: int, argv: Sequence[str], timeout: float) -> ExecResult | None:
        rid = uuid.uuid4().hex
        script = f"export {EXEC_ENV}={rid}\nexec {shlex.join(argv)}\n"
        try:
            _create(io, f"{rid}.sh", script.encode())
            os.mkfifo(f"{rid}.done", 0o600, dir_fd=io)
            reader = _open_if(io, f"{rid}.done", os.O_RDONLY | os.O_NONBLOCK, stat.S_ISFIFO)
        except OSError as exc:
            _clean(io, rid)
            raise BackendError(f"exec agent in {self.io}: {exc}") from exc
        if reader is None:  # the container swapped it before we opened it
            _clean(io, rid)
            return None
        try:
            requests = _open_in(io)
            if requests is None:
                return None
            try:
                os.write(requests, f"run {rid}\n".encode())  # < PIPE_BUF: one atomic line
            except OSError as exc:  # EAGAIN: a full FIFO, an agent that stopped reading
                raise BackendError(f"exec agent in {self.io} does not read: {exc}") from exc
            finally:
                os.close(requests)
            status = self._wait(reader, timeout)
            if status is None:
                self._kill(io, rid)
                raise ExecTimeout(
                    f"{shlex.join(argv)} in {self.dir.name} did not finish within {timeout:g}s "
                    "(killed, with what it started)"
                )
            return ExecResult(status, _read(io, f"{rid}.out"), _read(io, f"{rid}.err"))
        finally:
            # unlink before closing: an agent still about to report finds no FIFO (and writes a
            # plain file) rather than one with no reader, where it would block for ever
            _clean(io, rid)
            os.close(reader)

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

    def _kill(self, io: int, rid: str) -> None:
        with contextlib.suppress(OSError):
            requests = _open_in(io)
            if requests is not None:
                try:
                    os.write(requests, f"kill {rid}\n".encode())
                finally:
                    os.close(requests)


# -- the container's directory, through descriptors ---------------------------------------------
@contextlib.contextmanager
def _directory(path: Path) -> Iterator[int]:
    """A descriptor of the directory ``path`` (not a symlink), closed afterwards."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_directory(path: Path) -> int | None:
    """A descriptor of the directory ``path`` (not a symlink); None if it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _FLAGS)
    except FileNotFoundError:
        return None


def _open_if(io: int, name: str, flags: int, is_type: Callable[[int], bool]) -> int | None:
    """``name`` in the directory ``io`` opened with ``flags`` if ``is_type(st_mode)``, else
    None; never through a symlink.

    The type is checked before the real open, on an ``O_PATH`` descriptor, then that very
    inode is opened through ``/proc/self/fd``: a device node the container made (where its
    runtime allows mknod) is never opened for real on the host, where opening some (a
    watchdog, a tape) has effects.
    """
    if _O_PATH is None:  # no O_PATH (not Linux): check after opening, O_NONBLOCK at least
        fd = os.open(name, flags | os.O_NONBLOCK | _FLAGS, dir_fd=io)
        if is_type(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        return None
    handle = os.open(name, _O_PATH | _FLAGS, dir_fd=io)
    try:
        if not is_type(os.fstat(handle).st_mode):
            return None
        return os.open(f"/proc/self/fd/{handle}", flags | os.O_CLOEXEC)
    finally:
        os.close(handle)


def _open_in(io: int) -> int | None:
    """The request FIFO opened for writing; None when no agent reads it or it is no FIFO
    (missing, or replaced by a file, a directory or a symlink: the agent cannot be used)."""
    try:
        return _open_if(io, _IN, os.O_WRONLY | os.O_NONBLOCK, stat.S_ISFIFO)
    except OSError as exc:
        # ENXIO: a FIFO nobody reads; ENOENT...: no FIFO there at all
        if exc.errno != errno.ENXIO:
            log.debug("exec agent: cannot open %s/in: %s", IO_MOUNT, exc)
        return None


def _create(io: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600, dir_fd=io)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _read(io: int, name: str) -> str:
    try:
        fd = _open_if(io, name, os.O_RDONLY, stat.S_ISREG)
    except OSError as exc:
        raise BackendError(f"exec agent: cannot read {name}: {exc}") from exc
    if fd is None:
        raise BackendError(f"exec agent: cannot read {name}: not a regular file")
    with os.fdopen(fd, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _clean(io: int, rid: str) -> None:
    for suffix in ("sh", "done", "out", "err"):
        # whatever the container put there instead (a directory) stays until the next rebuild
        with contextlib.suppress(OSError):
            os.unlink(f"{rid}.{suffix}", dir_fd=io)


def _empty(fd: int, keep: Iterable[str] = ()) -> None:
    """Remove every entry of the directory ``fd`` but ``keep``, following no symlink."""
    kept = set(keep)
    for name in os.listdir(fd):
        if name not in kept:
            _remove(fd, name)


def _remove(fd: int, name: str) -> None:
    """Remove ``name`` in the directory ``fd`` (a whole tree if it is a directory); never
    follows a symlink, missing is fine."""
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(name, dir_fd=fd)


def _is_fifo(fd: int, name: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _is_directory(fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _is_regular(fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False
