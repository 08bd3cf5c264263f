"""Podman's live reset (vmpool.backends.podman.live_reset) against the real tool: what it restores,
that it never touches the host through a symlink, and that every condition it needs falls
back to a full reset that is just as clean."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmpool import _proc, reaper
from vmpool.backends.base import MachineSpec
from vmpool.backends.podman import PodmanBackend, build_image
from vmpool.backends.podman import api as podman_api
from vmpool.backends.podman import live_reset as podman_live
from vmpool.config_backends import PodmanSettings
from vmpool.state import JsonStateDir

pytestmark = pytest.mark.podman

#: everything a test could leave on the file system, as seen from inside: each entry's path,
#: type, mode and owner, and each regular file's content hash (the root's file system, /dev
#: and its tmpfs mounts; /proc, /sys and the agent's directory are other file systems)
FINGERPRINT = (
    "find / /dev /dev/shm /dev/mqueue -xdev -exec stat -c '%n %F %a %u %g' {} + | sort; "
    "find / /dev -xdev -type f -exec md5sum {} + | sort"
)


def podman(*args: str) -> _proc.ProcResult:
    return _proc.run(["podman", *args], timeout=60)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    return build_image(PodmanSettings())


@pytest.fixture
def make(image: str, tmp_path: Path) -> Iterator[Callable[..., tuple[PodmanBackend, str]]]:
    """A ready, snapshotted machine on a backend of its own (settings overridable)."""
    made: list[tuple[PodmanBackend, str]] = []

    def make(**settings: Any) -> tuple[PodmanBackend, str]:
        backend = PodmanBackend(PodmanSettings(**{"image": image, **settings}), tmp_path)
        name = f"vmpooltest-{uuid.uuid4().hex[:8]}-live"
        made.append((backend, name))
        backend.create(MachineSpec(name, {"vmpool.session": "livetest"}))
        backend.start(name)
        backend.wait_ready(name, timeout=30)
        backend.snapshot(name)
        return backend, name

    yield make
    for backend, name in made:
        backend.delete(name)
    podman_api.stop_recorded(tmp_path)  # what full resets started (teardown's delete_many would)


def container_id(name: str) -> str:
    return podman("inspect", "--format", "{{.Id}}", name).check().stdout.strip()


def pid1(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Pid}}", name).check().stdout.strip()


def fingerprint(backend: PodmanBackend, name: str) -> str:
    result = backend.exec(name, ["sh", "-c", FINGERPRINT], timeout=60)
    assert result.ok, result.stderr
    return result.stdout


def processes(name: str) -> list[str]:
    """pid, parent, user and command of every live process (zombies, the exec agent's finished
    subshells, left out)."""
    rows = podman("top", name, "pid", "ppid", "user", "state", "args").check().stdout
    fields = [r.split() for r in rows.splitlines()[1:]]
    # a row without a state or command: a process that exited while podman read it
    return sorted(" ".join(f[:3] + f[4:]) for f in fields if len(f) > 4 and f[3] != "Z")


def ipc_objects(name: str) -> list[str]:
    """The SysV IPC objects in the container's IPC namespace (lines of ``ipcs``' tables)."""
    out = _proc.run(["nsenter", "-t", pid1(name), "--ipc", "ipcs"], timeout=30).check().stdout
    return [ln for ln in out.splitlines() if ln[:2] == "0x"]


def process_tree(name: str) -> list[str]:
    """Who runs what under which parent, without the pid numbers: a recreated container's
    processes are the same ones, though the order they started in may number them apart."""
    rows = [r.split(" ", 3) for r in processes(name)]  # pid, parent, user, command
    command = {pid: cmd for pid, _, _, cmd in rows}
    return sorted(f"{user} {cmd} <- {command.get(ppid, '-')}" for _, ppid, user, cmd in rows)


def ready_state(backend: PodmanBackend, name: str) -> tuple[str, list[str], list[str]]:
    return fingerprint(backend, name), process_tree(name), ipc_objects(name)


def run(backend: PodmanBackend, name: str, script: str) -> None:
    result = backend.exec(name, ["sh", "-c", script], timeout=60)
    assert result.ok, result.stderr


# what a hostile test does: every kind of file system change, symlinks that point at host paths
# (if vmpool followed one, it would write the host's file), hard links, tmpfs and IPC objects,
# and processes that outlive it, a fork loop among them
ADVERSARY = """
set -e
H={host}
echo new > /tmp/new; mkdir -p /tmp/d/e; echo deep > /tmp/d/e/f
echo changed >> /etc/group; rm /etc/passwd; ln -s $H/canary /etc/passwd
mv /bin/ls /bin/ls-moved; mv /etc/hosts /tmp/hosts 2>/dev/null || true
chmod 4755 /bin/busybox; chown 65534:65534 /tmp; chmod 700 /tmp
mkdir -p /root/a/b; echo 1 > /root/a/b/c; chown -R 65534:65534 /root; chmod 1777 /root
rm -rf /var; ln -s $H /var
rm -rf /www; mkdir /www; echo opaque > /www/index.html
ln /bin/busybox /tmp/hardlink; ln /etc/group /root/group-link; echo via-link >> /root/group-link
ln -s $H/canary /tmp/evil; ln -s / /tmp/root-link; ln -s $H /tmp/host-dir
mkfifo /tmp/fifo; touch /dev/new-in-dev /dev/mqueue/queue
dd if=/dev/zero of=/dev/shm/big bs=1024 count=64 2>/dev/null; ln -s $H/canary /dev/shm/evil
echo evil > /etc/hostname; echo "192.0.2.1 evil" >> /etc/hosts; : > /etc/resolv.conf
chmod 600 /etc/hosts
setsid sleep 1001 & sleep 1002 &
(while :; do sleep 1003 & sleep 0.05; done) >/dev/null 2>&1 &
sleep 0.3
"""


def test_a_live_reset_undoes_everything_a_hostile_test_did_and_keeps_the_container(
    make: Callable[..., tuple[PodmanBackend, str]], tmp_path: Path
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "canary").write_text("host file\n")
    before_host = sorted((p.name, p.stat().st_mtime_ns) for p in host.iterdir())
    backend, name = make()
    ready = ready_state(backend, name)
    cid = container_id(name)
    run(backend, name, ADVERSARY.format(host=host))
    _proc.run(["nsenter", "-t", pid1(name), "--ipc", "ipcmk", "-M", "4096"], timeout=30).check()
    _proc.run(["nsenter", "-t", pid1(name), "--ipc", "ipcmk", "-Q"], timeout=30).check()
    assert ready_state(backend, name) != ready  # the test did leave traces

    backend.reset(name)

    assert container_id(name) == cid  # reset in place, not recreated
    assert ready_state(backend, name) == ready
    assert sorted((p.name, p.stat().st_mtime_ns) for p in host.iterdir()) == before_host
    assert (host / "canary").read_text() == "host file\n"
    # and again: the second reset starts from what the first one restored
    run(backend, name, "echo again > /etc/group; rm -rf /www; touch /tmp/x; sleep 1004 &")
    backend.reset(name)
    assert container_id(name) == cid
    assert ready_state(backend, name) == ready


def test_a_live_reset_runs_no_podman_process_and_keeps_the_address(
    make: Callable[..., tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, name = make()
    address = backend.address(name)
    run(backend, name, "touch /tmp/x")
    calls: list[Sequence[str]] = []
    real = _proc.run

    def spy(argv: Sequence[str], **kwargs: Any) -> _proc.ProcResult:
        calls.append(argv)
        return real(argv, **kwargs)

    monkeypatch.setattr(_proc, "run", spy)
    backend.reset(name)
    assert backend.address(name) == address
    assert [c[0] for c in calls] == ["nsenter"]  # ipcrm in its IPC namespace, nothing else


def test_the_v2_freezer_works_too(
    make: Callable[..., tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.freeze").exists() and not any(unified.glob("*/cgroup.freeze")):
        unified = Path("/sys/fs/cgroup")  # a v2-only host: the default is v2 already
    monkeypatch.setattr(podman_live, "FREEZER_V1", tmp_path / "no-v1-freezer")
    monkeypatch.setattr(podman_live, "CGROUP_V2", unified)
    backend, name = make()
    ready, cid = ready_state(backend, name), container_id(name)
    run(backend, name, "echo x > /tmp/x; rm /etc/group; sleep 1001 &")
    backend.reset(name)
    assert container_id(name) == cid
    assert ready_state(backend, name) == ready


# -- every condition falls back to a full reset, just as clean ------------------------------------
def _falls_back_clean(
    backend: PodmanBackend, name: str, caplog: pytest.LogCaptureFixture, why: str,
    ready: tuple[str, list[str], list[str]] | None = None,
) -> None:
    ready = ready or ready_state(backend, name)
    cid = container_id(name)
    run(backend, name, "echo x > /tmp/x; rm /etc/group; sleep 1001 &")
    with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
        backend.reset(name)
    assert container_id(name) != cid  # recreated
    assert why in caplog.text
    fp, procs, ipc = ready_state(backend, name)

    def but_hosts(fingerprint: str) -> list[str]:  # a new container may get a new address
        return [ln for ln in fingerprint.splitlines() if not ln.endswith("  /etc/hosts")]

    assert (but_hosts(fp), ipc) == (but_hosts(ready[0]), ready[2])
    assert [p.split(" ", 3)[3] for p in procs] == [p.split(" ", 3)[3] for p in ready[1]]


def test_not_root_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
        monkeypatch.setattr(podman_live.os, "geteuid", lambda: 1000)
        backend, name = make()
        monkeypatch.undo()
    assert "not root" in caplog.text
    _falls_back_clean(backend, name, caplog, "no baseline")


def test_another_storage_driver_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = PodmanBackend._inspect

    def vfs(self: PodmanBackend, name: str) -> dict[str, Any] | None:
        info = real(self, name)
        if info is not None:
            info["GraphDriver"] = {"Name": "vfs", "Data": {}}
        return info

    with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
        monkeypatch.setattr(PodmanBackend, "_inspect", vfs)
        backend, name = make()
        monkeypatch.undo()
    assert "storage driver 'vfs'" in caplog.text
    _falls_back_clean(backend, name, caplog, "no baseline")


def test_a_container_without_an_init_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
        backend, name = make(extra_args=["--systemd=false"])  # vmpool then adds no --init
    assert "not started with an init" in caplog.text
    _falls_back_clean(backend, name, caplog, "no baseline")


def test_an_image_with_a_volume_falls_back_and_no_anonymous_volume_is_left(
    image: str, make: Callable[..., tuple[PodmanBackend, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tag = f"localhost/vmpooltest-volume-{uuid.uuid4().hex[:8]}:latest"
    builder = f"vmpooltest-{uuid.uuid4().hex[:8]}-build"
    podman("create", "--name", builder, image, "true").check()
    try:
        podman("commit", "-q", "--change", "VOLUME /data", builder, tag).check()
    finally:
        podman("rm", "-f", builder).check()
    try:
        with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
            backend, name = make(image=tag)
        assert "volumes or mounts ['/data']" in caplog.text

        def volume() -> str:
            out = podman("inspect", "--format", "{{range .Mounts}}{{.Name}}{{end}}", name)
            return out.check().stdout.strip()

        first = volume()
        _falls_back_clean(backend, name, caplog, "no baseline")
        assert podman("volume", "exists", first).returncode == 1  # removed with its container
        last = volume()
        backend.delete(name)
        assert podman("volume", "exists", last).returncode == 1
    finally:
        podman("image", "rm", "-f", tag)


def test_a_restarted_container_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    podman("restart", "-t", "0", name).check()
    backend.wait_ready(name, timeout=30)
    _falls_back_clean(backend, name, caplog, "not the ready-time one", ready)


def test_a_replaced_container_falls_back(
    image: str, make: Callable[..., tuple[PodmanBackend, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    podman("rm", "-f", "-t", "0", name).check()
    podman("run", "-d", "--init", "--name", name, "--hostname", name,
           *backend.run_options().argv(), image, "sleep", "infinity").check()
    _falls_back_clean(backend, name, caplog, "not the ready-time one", ready)


def test_a_ready_time_process_that_died_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    agent = next(p for p in processes(name) if p.endswith(" sh /.vmpool/agent.sh")).split()[0]
    run(backend, name, f"kill -9 {agent}")
    _falls_back_clean(backend, name, caplog, "ready-time process", ready)


def test_a_stopped_ready_time_process_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    sleeper = next(p for p in processes(name) if p.split(" ", 3)[3] == "sleep infinity")
    run(backend, name, f"kill -STOP {sleeper.split()[0]}")
    _falls_back_clean(backend, name, caplog, "are stopped", ready)


def test_no_cgroup_found_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    monkeypatch.setattr(podman_live, "FREEZER_V1", tmp_path / "none")
    monkeypatch.setattr(podman_live, "CGROUP_V2", tmp_path / "none")
    _falls_back_clean(backend, name, caplog, "no freezer cgroup", ready)


def test_a_paused_container_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    backend, name = make()
    run(backend, name, "touch /tmp/x")
    podman("pause", name).check()
    cid = container_id(name)
    with caplog.at_level(logging.INFO, logger="vmpool.backends.podman.live_reset"):
        backend.reset(name)
    assert container_id(name) != cid and "paused" in caplog.text
    assert backend.exec(name, ["test", "-e", "/tmp/x"], timeout=10).returncode == 1


def test_a_change_it_cannot_undo_falls_back(
    make: Callable[..., tuple[PodmanBackend, str]], caplog: pytest.LogCaptureFixture
) -> None:
    backend, name = make()
    ready = ready_state(backend, name)
    run(backend, name, "rm /dev/null; touch /dev/null")  # a device node it does not recreate
    _falls_back_clean(backend, name, caplog, "/dev/null changed", ready)


# -- nothing is left ------------------------------------------------------------------------------
def test_delete_leaves_no_live_state_process_or_mount(
    make: Callable[..., tuple[PodmanBackend, str]], tmp_path: Path
) -> None:
    backend, name = make()
    run(backend, name, "touch /tmp/x; sleep 1001 &")
    backend.reset(name)
    live = tmp_path / "podman" / "live" / name
    assert live.is_dir() and oct(live.stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o077 == 0 for p in live.rglob("*"))
    cid = container_id(name)
    backend.delete(name)
    assert not live.exists()
    assert not list(Path("/sys/fs/cgroup/freezer").glob(f"**/libpod-{cid}"))
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_gc_removes_the_live_state_of_a_container_removed_outside_vmpool(
    make: Callable[..., tuple[PodmanBackend, str]], tmp_path: Path
) -> None:
    backend, name = make()
    podman("rm", "-f", "-t", "0", name).check()
    podman_dir = tmp_path / "podman"
    old = podman_dir.stat().st_mtime - reaper.LITTER_AGE - 60
    for path in (podman_dir / f"{name}.json", podman_dir / "exec" / name,
                 podman_dir / "live" / name):
        os.utime(path, (old, old))
    prefix = name.rsplit("-", 1)[0]
    report = reaper.reap(JsonStateDir(tmp_path), backend, prefix)
    assert f"podman/live/{name}" in report.files_removed
    assert not (podman_dir / "live" / name).exists()
