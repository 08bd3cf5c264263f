"""The exec agent's host end and its sh script, run here on the host (no container needed).

The script is the one containers run, with its directory moved from /.vmpool to a temporary one.
The real thing, in podman containers, is in tests/backends/test_podman.py.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _waiting import wait_until

from vmpool.backends.podman.exec_agent import IO_MOUNT, SCRIPT, ExecAgent
from vmpool.errors import BackendError, ExecTimeout


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ExecAgent]:
    """An agent directory with the agent running on the host."""
    agent = ExecAgent(tmp_path / "exec")
    agent.rebuild()
    script = SCRIPT.replace(f"d={IO_MOUNT}\n", f"d={agent.io}\n")
    assert script != SCRIPT
    proc = subprocess.Popen(["sh", "-c", script])
    wait_until(
        lambda: agent.listening() or proc.poll() is not None, 10, "the agent listening"
    )
    assert proc.poll() is None, "the agent ended at its start"
    yield agent
    proc.kill()
    proc.wait(10)


def test_runs_a_command_and_cleans_up_after_it(agent: ExecAgent) -> None:
    result = agent.run(["sh", "-c", "echo out; echo err >&2; exit 5"], timeout=10)
    assert result is not None
    assert (result.returncode, result.stdout, result.stderr) == (5, "out\n", "err\n")
    assert sorted(p.name for p in agent.io.iterdir()) == ["in"]


def test_without_a_listening_agent_nothing_runs(tmp_path: Path) -> None:
    idle = ExecAgent(tmp_path / "idle")
    idle.rebuild()
    assert not idle.listening()
    assert idle.run(["touch", str(tmp_path / "ran")], timeout=5) is None
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in idle.io.iterdir()) == ["in"]
    assert ExecAgent(tmp_path / "never-made").run(["true"], timeout=5) is None


def test_timeout_kills_the_command_and_its_children(agent: ExecAgent, tmp_path: Path) -> None:
    marker, pidfile = tmp_path / "late", tmp_path / "child.pid"
    child = f"echo $$ > {pidfile}.new && mv {pidfile}.new {pidfile}; sleep 2; touch {marker}"
    with pytest.raises(ExecTimeout):
        agent.run(["sh", "-c", f"sh -c '{child}' & sleep 30"], timeout=0.5)
    pid = int(wait_until(pidfile.exists, 5, "the background child's pid") and pidfile.read_text())
    wait_until(lambda: not _running(pid), 5, "the background child killed")
    assert not marker.exists()  # it was killed before it could touch the marker


def test_commands_in_threads_get_their_own_results(agent: ExecAgent) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        result = agent.run(["sh", "-c", f"sleep 0.1; echo {i}"], timeout=10)
        assert result is not None
        results[i] = result.stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(8)}


def test_output_replaced_by_a_symlink_is_not_followed(
    agent: ExecAgent, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    # the command (in a container: anything in it) swaps its own output file for a symlink
    script = f'for f in "{agent.io}"/*.out; do rm "$f"; ln -s "{secret}" "$f"; done'
    with pytest.raises(BackendError, match="cannot read") as info:
        agent.run(["sh", "-c", script], timeout=10)
    assert "host secret" not in str(info.value)


def test_a_request_line_that_is_not_an_id_is_ignored(agent: ExecAgent, tmp_path: Path) -> None:
    victim = tmp_path / "victim.sh"
    victim.write_text(f"touch {tmp_path / 'pwned'}\n")
    fd = os.open(agent.io / "in", os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, f"run ../{victim.stem}\n".encode())
    os.close(fd)
    assert agent.run(["true"], timeout=10) is not None  # the agent read past that line
    assert not (tmp_path / "pwned").exists()


def test_an_agent_killed_mid_command_is_an_error_at_once_not_a_timeout(
    tmp_path: Path,
) -> None:
    agent = ExecAgent(tmp_path / "exec")
    agent.rebuild()
    script = SCRIPT.replace(f"d={IO_MOUNT}\n", f"d={agent.io}\n")
    # its own process group, so the agent and the subshells it forks can be killed together
    # (as when the container stops)
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        wait_until(agent.listening, 10, "the agent listening")
        threading.Timer(0.5, os.killpg, (proc.pid, 9)).start()
        started = time.monotonic()
        with pytest.raises(BackendError, match="stopped while the command ran"):
            agent.run(["sleep", "20"], timeout=15)
        assert time.monotonic() - started < 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


# -- what a machine can write (issue 15, findings 3 and 4) ----------------------------------------
def test_host_only_files_are_outside_the_directory_the_machine_can_write(
    agent: ExecAgent,
) -> None:
    with agent.starting(timeout=5) as mine:
        assert mine
    assert sorted(p.name for p in agent.io.iterdir()) == ["in"]
    assert sorted(p.name for p in agent.dir.iterdir()) == ["io", "root", "start.lock"]
    assert agent.mounts() == [f"{agent.root}:/.vmpool:ro", f"{agent.io}:/.vmpool/io"]
    assert (agent.root / "agent.sh").read_text() == SCRIPT
    for path in (agent.dir / "start.lock", agent.root / "agent.sh"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_rebuild_removes_what_the_machine_left_and_follows_no_symlink(tmp_path: Path) -> None:
    agent = ExecAgent(tmp_path / "exec")
    agent.rebuild()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host file\n")
    # a test's leftovers: the FIFO swapped for a plain file, symlinks to host paths, a tree
    (agent.io / "in").unlink()
    (agent.io / "in").write_text("not a FIFO\n")
    (agent.io / "link").symlink_to(victim)
    (agent.io / "tree" / "deep").mkdir(parents=True)
    (agent.io / "tree" / "deep" / "up").symlink_to(victim)
    io_inode = agent.io.stat().st_ino
    agent.rebuild()
    assert sorted(p.name for p in agent.io.iterdir()) == ["in"]
    assert stat.S_ISFIFO((agent.io / "in").lstat().st_mode)
    assert agent.io.stat().st_ino == io_inode  # emptied in place: a mount of it stays valid
    assert (victim / "keep").read_text() == "host file\n"


@pytest.mark.parametrize("replacement", ["plain file", "directory", "symlink"])
def test_a_request_fifo_replaced_by_the_machine_means_no_agent_not_a_timeout(
    agent: ExecAgent, tmp_path: Path, replacement: str
) -> None:
    fifo = agent.io / "in"
    fifo.unlink()
    {"plain file": lambda: fifo.write_text(""), "directory": fifo.mkdir,
     "symlink": lambda: fifo.symlink_to(tmp_path / "elsewhere")}[replacement]()
    assert not agent.listening()
    started = time.monotonic()
    assert agent.run(["true"], timeout=5) is None  # the caller falls back to `podman exec`
    assert time.monotonic() - started < 1
    assert not (tmp_path / "elsewhere").exists()
    agent.repair()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_rebuild_of_a_directory_a_container_could_write_follows_none_of_its_symlinks(
    tmp_path: Path,
) -> None:
    # the layout before io/ was split off mounted the whole directory: anything may be there
    victim = tmp_path / "victim"
    victim.mkdir()
    top = tmp_path / "exec"
    top.mkdir()
    for name in ("start.lock", "root", "io", "agent.sh"):
        (top / name).symlink_to(victim / name)
    agent = ExecAgent(top)
    agent.rebuild()
    with agent.starting(timeout=5) as mine:
        assert mine
    assert list(victim.iterdir()) == []
    assert sorted(p.name for p in top.iterdir()) == ["io", "root", "start.lock"]
    assert not any(p.is_symlink() for p in top.rglob("*"))


def test_what_the_machine_put_in_place_of_a_fifo_is_only_looked_at_never_opened(
    agent: ExecAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a plain file here; a device node the same way (opening some, as root, has effects)
    fifo = agent.io / "in"
    fifo.unlink()
    fifo.write_text("")
    planted = fifo.stat().st_ino
    opened: list[int] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if os.fstat(fd).st_ino == planted and not flags & os.O_PATH:
            opened.append(flags)
        return fd

    monkeypatch.setattr(os, "open", spy)
    assert not agent.listening()
    assert agent.run(["true"], timeout=5) is None
    monkeypatch.undo()
    assert opened == []


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
