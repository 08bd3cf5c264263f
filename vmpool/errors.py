"""The exception hierarchy: everything vmpool raises on purpose is a VmPoolError."""

from __future__ import annotations


class VmPoolError(Exception):
    """Base of every error vmpool raises on purpose."""


class ConfigError(VmPoolError):
    """A configuration file, environment variable or option is invalid.

    ``problems`` holds one line per problem, each naming the source and the dotted key.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StateError(VmPoolError):
    """The state directory or a state file cannot be used safely."""


class LockTimeout(StateError):
    """A lock file stayed held by someone else past the timeout (vmpool._lock.file_lock)."""


class PoolGone(StateError):
    """The pool's record was removed (e.g. by `vmpool down`) before a transaction on it."""


class BackendError(VmPoolError):
    """A backend tool failed."""


class BackendUnavailable(BackendError):
    """The backend's tool or image is missing; the message says what to install."""


class HostUnreachable(BackendError):
    """A podman host of ``[podman] hosts`` does not answer; the message names it."""


class ReadyTimeout(BackendError):
    """A machine was not ready by its deadline; the message holds the last probe error."""


class ExecTimeout(BackendError):
    """A command in a machine did not finish before its timeout."""


class CapabilityError(BackendError):
    """The backend cannot do what was asked (e.g. networking)."""


class CheckoutTimeout(VmPoolError):
    """No machine became free before the check-out timeout; the message summarises the pool."""


class PoolUnavailable(VmPoolError):
    """The pool cannot serve machines (e.g. every machine is broken, or the pool was torn down)."""


class CommandFailed(VmPoolError):
    """A command run with ``check=True`` exited non-zero; the message shows command and output."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"command {argv!r} exited {returncode}\n{_output(stdout, stderr)}")


class CommandSucceeded(VmPoolError):
    """A command expected to fail (``VM.fail``) exited 0; the message shows its output."""

    def __init__(self, argv: list[str], stdout: str, stderr: str) -> None:
        self.argv = argv
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {argv!r} succeeded but was expected to fail\n{_output(stdout, stderr)}"
        )


class WaitTimeout(VmPoolError):
    """A condition inside a machine (a command, a unit, a port) did not hold by its deadline;
    the message names it, the timeout and the last thing seen."""


class UnitFailed(VmPoolError):
    """A systemd unit waited for entered the failed state; the message holds its status."""


class TransferError(VmPoolError):
    """A copy to or from a machine failed or was refused (e.g. an archive entry that would
    land outside the destination)."""


def _output(stdout: str, stderr: str) -> str:
    return f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"


def describe(exc: BaseException) -> str:
    """An error as a user reads it: a VmPoolError's own message, anything else with its type
    (``NotADirectoryError: [Errno 20] Not a directory: '…'``)."""
    if isinstance(exc, VmPoolError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class StoreError(StateError):
    """The shared lease store (PostgreSQL) cannot be used; the message names the DSN (without
    its password) and the cause."""


class StoreUnsafe(StoreError):
    """The store's server or session is configured so that acknowledged leases could be lost
    (e.g. ``synchronous_commit`` is not ``on``)."""
