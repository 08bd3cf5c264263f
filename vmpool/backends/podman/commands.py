"""Commands in a machine: through its exec agent (vmpool.backends.podman.exec_agent) when one
listens, else one ``<tool> exec`` process each.

The agent is started on first use (one ``exec -d``); after a failed start, commands go through
``<tool> exec`` for ``_AGENT_RETRY`` seconds before the next try. This module also keeps each
agent's host directory: rebuilt before a container is made from a machine's recipe, its mounts
added to the recipe's options.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from vmpool import _proc
from vmpool._files import private_dir
from vmpool.backends.base import ExecResult
from vmpool.backends.podman.exec_agent import EXEC_ENV, ExecAgent, kill_script
from vmpool.backends.podman.exec_agent import MOUNT_POINT as AGENT_MOUNT
from vmpool.backends.podman.tool import Tool
from vmpool.errors import BackendError, ExecTimeout, VmPoolError

log = logging.getLogger(__name__)

#: after `exec -d` of the agent failed in a container, use `exec` this long before retrying
_AGENT_RETRY = 30.0
#: how long a just-started agent may take to open its request FIFO
_AGENT_START = 2.0


class Commands:
    """Runs commands in the machines of one backend, and keeps their agents' directories
    (``<directory>/<name>``)."""

    def __init__(
        self, tool: Tool, directory: Path, autostarts: Callable[[str], bool] = lambda _: False
    ) -> None:
        self._tool = tool
        #: whether a machine's own command starts its agent (then give it a moment first)
        self._autostarts = autostarts
        self.settings = tool.settings
        self.dir = directory
        #: machine -> when starting its exec agent last failed (monotonic)
        self._agent_failed: dict[str, float] = {}
        self._agent_path_warned = False
        self._nap = threading.Event()  # never set: a sleep that tests' patched time.sleep spares

    def exec(self, name: str, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run ``argv`` in the container; ExecTimeout after ``timeout`` seconds.

        The command's own exit status is returned; a failure of the tool itself (no such
        container, container not running) raises BackendError.
        """
        agent = self.agent(name)
        if agent is not None and self._agent_ready(name, agent):
            answer = agent.run(argv, timeout)
            if answer is not None:
                return answer
        token = uuid.uuid4().hex
        try:
            result = self._tool.run("exec", "--env", f"{EXEC_ENV}={token}", name, *argv,
                                    timeout=timeout)
        except ExecTimeout:
            # killing the client leaves the command running in the container; end it too
            self._kill_exec(name, token)
            raise
        if self._is_tool_error(name, result):
            raise BackendError(
                f"{self._tool.name} exec in {name} failed: {result.stderr.strip()[-2000:]}"
            )
        return ExecResult(result.returncode, result.stdout, result.stderr)

    def started(self, name: str) -> None:
        """The container was (re)started: an agent start that failed before may work now."""
        self._agent_failed.pop(name, None)

    def forget(self, name: str) -> None:
        """Drop the agent directory of a removed machine."""
        shutil.rmtree(self.dir / name, ignore_errors=True)
        self._agent_failed.pop(name, None)

    def agent(self, name: str) -> ExecAgent | None:
        """The machine's agent (None: commands use ``<tool> exec``)."""
        if not self.settings.exec_agent:
            return None
        directory = self.dir / name
        if ":" in str(directory):  # --volume SRC:DST cannot say it
            if not self._agent_path_warned:
                log.warning("no exec agent: its directory %s has a ':' (commands use `%s exec`)",
                            directory, self._tool.name)
                self._agent_path_warned = True
            return None
        return ExecAgent(directory)

    def intact(self, name: str) -> bool:
        """After a live reset: nothing of the last test is left in the agent's ``io`` (it is a
        mount, outside what the live reset reverts), and the ready-time agent still reads the
        request FIFO (only ready-time processes are left, so no test's process is that reader)."""
        agent = self.agent(name)
        if agent is None:
            return True
        agent.scrub()
        return agent.listening()

    def rebuild_dir(self, name: str) -> None:
        """Make the agent's directory as new (its script, an empty FIFO directory), before a
        container is made from the machine's recipe (create, reset): nothing a test left there
        reaches the next one."""
        agent = self.agent(name)
        if agent is not None:
            private_dir(agent.dir.parent)  # <tool>/exec/ and <tool>/ too: 0700 whatever the umask
            agent.rebuild()
        self._agent_failed.pop(name, None)

    def with_mounts(self, name: str, options: Sequence[str]) -> list[str]:
        """``options`` with the agent's ``--volume`` options as this version makes them (a
        recipe written by an older one mounted the whole directory writable)."""
        kept: list[str] = []
        args = iter(options)
        for arg in args:
            if arg == "--volume":
                value = next(args, "")
                if value.partition(":")[2].startswith(AGENT_MOUNT):
                    continue
                kept += [arg, value]
            else:
                kept.append(arg)
        agent = self.agent(name)
        for mount in agent.mounts() if agent is not None else ():
            kept += ["--volume", mount]
        return kept

    def _agent_ready(self, name: str, agent: ExecAgent) -> bool:
        """Whether ``agent`` listens, starting it (one ``exec -d``) if it should and does not.

        A container made without one (no agent directory) never gets one; after a failed start,
        commands go through ``exec`` for ``_AGENT_RETRY`` seconds before the next try. A request
        FIFO the container replaced is put back first.
        """
        if agent.listening():
            return True
        if not agent.installed():  # the container was made without one
            return False
        failed = self._agent_failed.get(name)
        if failed is not None and time.monotonic() - failed < _AGENT_RETRY:
            return False
        with agent.starting(self.settings.command_timeout) as mine:
            if not mine:
                return agent.listening()  # another process kept the lock; it may have started one
            if agent.listening():  # another process (or thread) started it meanwhile
                return True
            if self._autostarts(name) and self._await_listening(agent):
                return True  # the container's command started it: none of ours is needed
            try:
                agent.repair()  # a test may have replaced the FIFO: the agent needs a real one
            except OSError as exc:
                log.info("no exec agent in %s (commands use `%s exec`) for now: %s", name,
                         self._tool.name, exc)
                self._agent_failed[name] = time.monotonic()
                return False
            result = self._tool.run("exec", "-d", name, "sh", agent.script)
            if result.returncode == 0:
                deadline = time.monotonic() + _AGENT_START
                while time.monotonic() < deadline:
                    if agent.listening():
                        self._agent_failed.pop(name, None)
                        return True
                    self._nap.wait(0.005)
        if result.returncode == 0:
            # it started and never listened (a user who cannot use /.vmpool, no FIFO support):
            # it will not work in this container; a new container (create, start, reset) tries
            log.info("no exec agent in %s (commands use `%s exec`): it did not start listening",
                     name, self._tool.name)
            self._agent_failed[name] = math.inf
        else:
            log.info("no exec agent in %s (commands use `%s exec`) for now: %s", name,
                     self._tool.name, result.stderr.strip()[-300:])
            self._agent_failed[name] = time.monotonic()
        return False

    def _await_listening(self, agent: ExecAgent) -> bool:
        deadline = time.monotonic() + _AGENT_START
        while time.monotonic() < deadline:
            if agent.listening():
                return True
            self._nap.wait(0.002)
        return False

    def _is_tool_error(self, name: str, result: _proc.ProcResult) -> bool:
        """Did the tool fail (no such container, not running) rather than the command in it?"""
        lines = result.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        if self._tool.is_podman:
            # podman 4.3 exits 125 or 255 on its own errors; a command may exit so too, so ask
            if result.returncode not in (125, 255) or not last.startswith("Error: "):
                return False
        elif result.returncode == 0 or not (
            last.startswith("Error response from daemon:") or last.startswith("Error: No such")
        ):
            return False
        info = self._tool.inspect(name)
        return info is None or not ((info.get("State") or {}).get("Running"))

    def _kill_exec(self, name: str, token: str) -> None:
        """Best effort: SIGKILL the processes of a timed-out exec (found by its env token)."""
        try:
            result = self._tool.run("exec", name, "sh", "-c", kill_script(token), timeout=10)
        except VmPoolError as exc:
            log.warning("could not stop timed-out command in %s: %s", name, exc)
            return
        if result.returncode != 0:
            log.warning("could not stop timed-out command in %s: %s", name, result.stderr.strip())

