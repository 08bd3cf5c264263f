"""The QEMU backend against real qemu-system-x86_64 guests (few boots: two share a module).

The image is built once per session into a temporary cache. Tests marked ``qemu`` need
qemu-system-x86, qemu-utils, busybox-static, qemu-guest-agent and a linux-image kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.qemu import QemuBackend
from vmpool.backends.qemu import agent as qemu_agent
from vmpool.backends.qemu.image import MANIFEST_FILE, build_image, find_image
from vmpool.backends.qemu.records import Record
from vmpool.backends.qemu.template import valid_template
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout
from vmpool.reaper import reap
from vmpool.state import JsonStateDir

qemu = pytest.mark.qemu
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="qemu-system-x86_64 / qemu-img not installed",
)
#: Bounds the one KVM probe `auto` makes on hosts where KVM hangs (a working KVM boots in ~2 s).
KVM_PROBE_TIMEOUT = 10.0
READY_TIMEOUT = 120.0
#: what runs as another user (the test's own interpreter may be under /root)
OTHER_USER_PYTHON = "/usr/bin/python3"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
as_another_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(OTHER_USER_PYTHON),
    reason="needs root, setpriv and /usr/bin/python3 to act as uid 65534",
)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("qemu-cache") / "qemu"
    build_image(QemuSettings(image_dir=target))
    return target


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """Open to other users up to qemu/ (unlike pytest's 0700 tmp dirs), so that what keeps
    them out of a network is the backend's own directory."""
    path = Path(tempfile.mkdtemp(prefix="vmpool-qemu-state-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's clone templates: its image is temporary, keep them out of the user cache."""
    return tmp_path_factory.mktemp("qemu-templates")


@pytest.fixture(scope="module")
def backend(image_dir: Path, state_dir: Path, template_dir: Path) -> QemuBackend:
    settings = QemuSettings(
        image_dir=image_dir, accel="auto", kvm_probe_timeout=KVM_PROBE_TIMEOUT
    )
    return QemuBackend(settings, state_dir, template_dir=template_dir)


@dataclass(frozen=True)
class Pair:
    network: str
    a: str
    b: str
    labels: dict[str, str]


@pytest.fixture(scope="module")
def pair(backend: QemuBackend) -> Iterator[Pair]:
    """Two running, ready machines on one network (booted in parallel)."""
    run = uuid.uuid4().hex[:6]
    labels = {"vmpool.session": f"test-{run}", "vmpool.pool": "qemu-tests"}
    p = Pair(f"vmpool-test-{run}-net", f"vmpool-test-{run}-a", f"vmpool-test-{run}-b", labels)
    backend.create_network(p.network, labels)
    try:
        for index, name in enumerate((p.a, p.b)):
            backend.create(MachineSpec(name, labels, index=index, network=p.network))
        for name in (p.a, p.b):
            backend.start(name)
        for name in (p.a, p.b):
            backend.wait_ready(name, READY_TIMEOUT)
        yield p
    finally:
        for name in (p.a, p.b):
            backend.delete(name)
        backend.delete_network(p.network)


def _gone(pid: int) -> bool:
    try:
        # a zombie counts as gone: the host's init may be slow to reap daemonized qemu
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _unique(prefix: str = "vmpool-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- without qemu ------------------------------------------------------------------------


def test_check_names_the_package_when_the_binary_is_missing(tmp_path: Path) -> None:
    settings = QemuSettings(binary="qemu-does-not-exist", image_dir=tmp_path / "img")
    with pytest.raises(BackendUnavailable, match="apt-get install qemu-system-x86"):
        QemuBackend(settings, tmp_path).check()


def test_find_image_without_a_build_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="vmpool image build --backend qemu"):
        find_image(QemuSettings(image_dir=tmp_path / "empty"))


def test_backend_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(QemuBackend(QemuSettings(), tmp_path), Backend)


def test_networks_are_recorded_listed_and_removed(tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(), tmp_path)
    backend.create_network("vmpool-test-net", {"vmpool.session": "s1"})
    record = json.loads((tmp_path / "qemu" / "networks" / "vmpool-test-net.json").read_text())
    assert record["subnet"].startswith("10.") and record["subnet"].endswith(".0")
    hub = _hub(record)
    [listed] = backend.list_networks("vmpool-test")
    assert (listed.name, dict(listed.labels)) == ("vmpool-test-net", {"vmpool.session": "s1"})
    backend.delete_network("vmpool-test-net")
    backend.delete_network("vmpool-test-net")
    assert backend.list_networks("vmpool-test") == []
    assert _gone(hub.pid)
    assert list((tmp_path / "qemu" / "networks").iterdir()) == []


def test_a_networks_folder_an_older_version_left_open_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "qemu" / "networks"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    backend = QemuBackend(QemuSettings(), tmp_path)
    backend.create_network("vmpool-old-net", {})
    try:
        assert folder.stat().st_mode & 0o777 == 0o700
        assert (folder / "vmpool-old-net").stat().st_mode & 0o777 == 0o700
    finally:
        backend.delete_network("vmpool-old-net")


# --- the network hub (no guests: these connect as QEMU's stream netdev does) ---------------


def _hub(record: dict[str, object]) -> psutil.Process:
    """The network's hub process, checked to be running; its socket and directory private."""
    proc = psutil.Process(int(str(record["hub_pid"])))
    assert proc.status() != psutil.STATUS_ZOMBIE
    sock = Path(str(record["sock_dir"])) / "hub.sock"
    assert (os.stat(sock).st_mode & 0o777, os.stat(sock.parent).st_mode & 0o777) == (0o600, 0o700)
    return proc


def _network(backend: QemuBackend, name: str) -> dict[str, object]:
    record: dict[str, object] = json.loads(
        (backend.root / "networks" / f"{name}.json").read_text()
    )
    return record


def _guest(record: dict[str, object]) -> socket.socket:
    """A connection to the hub like a guest's ``-netdev stream``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(Path(str(record["sock_dir"])) / "hub.sock"))
    return sock


def _send_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(len(frame).to_bytes(4, "big") + frame)


def _recv_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the hub closed the connection"
            data += chunk
        return data

    return exactly(int.from_bytes(exactly(4), "big"))


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_hub_forwards_each_frame_to_every_other_guest_only(tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(), tmp_path)
    backend.create_network("vmpool-hub-net", {})
    try:
        record = _network(backend, "vmpool-hub-net")
        a, b, c = (_guest(record) for _ in range(3))
        frames = [bytes([i]) * (60 + 100 * i) for i in range(15)]  # a burst, 60..1460 bytes
        for frame in frames:
            _send_frame(a, frame)
        for other in (b, c):
            assert [_recv_frame(other) for _ in frames] == frames
        _send_frame(b, b"from-b")
        assert (_recv_frame(a), _recv_frame(c)) == (b"from-b", b"from-b")
        a.settimeout(0.3)
        with pytest.raises(TimeoutError):
            a.recv(1)  # a never gets its own frames back
    finally:
        backend.delete_network("vmpool-hub-net")


def _network_of_an_exited_process(state: Path, name: str) -> dict[str, object]:
    """Create network ``name`` in a child process that then exits (a crashed controller)
    once a guest is connected. Returns the network's record with that guest's socket under
    "guest"."""
    code = (
        "import json, sys; from pathlib import Path; "
        "from vmpool.backends.qemu import QemuBackend; from vmpool.config import QemuSettings; "
        "from vmpool.ownership import current_process, owner_labels; "
        f"labels = owner_labels({name[:-4]!r}, 'sess01', current_process(), 'cfg'); "
        f"QemuBackend(QemuSettings(), Path({str(state)!r})).create_network({name!r}, labels); "
        "print('created', flush=True); sys.stdin.readline()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "created\n"
    record: dict[str, object] = json.loads(
        (state / "qemu" / "networks" / f"{name}.json").read_text()
    )
    record["guest"] = _guest(record)
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    return record


def test_the_hub_of_an_exited_creator_stops_once_no_guest_is_connected(tmp_path: Path) -> None:
    record = _network_of_an_exited_process(tmp_path, "vmpool-gone01-net")
    hub = _hub(record)
    guest = record["guest"]
    assert isinstance(guest, socket.socket)
    assert not _wait_gone(hub.pid, timeout=1.0)  # a guest still uses it (a kept pool's)
    guest.close()
    assert _wait_gone(hub.pid)
    QemuBackend(QemuSettings(), tmp_path).delete_network("vmpool-gone01-net")
    assert not Path(str(record["sock_dir"])).exists()


def test_the_hub_stops_by_itself_when_its_network_record_is_removed(tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(), tmp_path)
    backend.create_network("vmpool-rm-net", {})
    record = _network(backend, "vmpool-rm-net")
    hub = _hub(record)
    (backend.root / "networks" / "vmpool-rm-net.json").unlink()  # e.g. by a process it ignores
    assert _wait_gone(hub.pid)
    backend.delete_network("vmpool-rm-net")  # without its record: what is left still goes
    assert not Path(str(record["sock_dir"])).exists()
    assert list((backend.root / "networks").iterdir()) == []


def test_gc_of_a_crashed_pool_stops_its_network_hub(tmp_path: Path) -> None:
    record = _network_of_an_exited_process(tmp_path, "vmpool-crash1-net")
    hub = _hub(record)
    backend = QemuBackend(QemuSettings(), tmp_path)
    report = reap(JsonStateDir(tmp_path), backend, "vmpool")
    assert report.networks_deleted == ["vmpool-crash1-net"], report
    assert _wait_gone(hub.pid)
    assert backend.list_networks("vmpool") == []
    assert list((tmp_path / "qemu" / "networks").iterdir()) == []


def test_a_deep_state_dir_puts_the_hub_socket_in_the_private_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = QemuBackend(QemuSettings(), tmp_path / ("d" * 60) / ("e" * 60))
    backend.create_network("vmpool-deep-net", {})
    record = _network(backend, "vmpool-deep-net")
    sock_dir = Path(str(record["sock_dir"]))
    assert sock_dir.parent == tmp_path / f"vmpool-{os.getuid()}"
    assert len(str(sock_dir / "hub.sock")) <= 107
    a, b = _guest(record), _guest(record)
    _send_frame(a, b"deep")
    assert _recv_frame(b) == b"deep"
    backend.delete_network("vmpool-deep-net")
    assert _wait_gone(int(str(record["hub_pid"])))
    assert not sock_dir.exists()


def test_a_hub_that_cannot_start_fails_create_network_naming_why() -> None:
    state = Path(tempfile.mkdtemp(prefix="vmpool-bad-"))  # short: the socket is in net_dir
    try:
        net_dir = state / "qemu" / "networks" / "vmpool-bad-net"
        net_dir.mkdir(parents=True, mode=0o700)
        (net_dir / "hub.sock").write_text("not a socket")
        backend = QemuBackend(QemuSettings(), state)
        with pytest.raises(BackendError, match=r"hub\.sock exists and is not a socket"):
            backend.create_network("vmpool-bad-net", {})
        assert backend.list_networks("vmpool-bad") == []
        assert not net_dir.exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_guest_launch_restarts_a_hub_that_is_gone(tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(), tmp_path)
    backend.create_network("vmpool-re-net", {})
    try:
        old = _hub(_network(backend, "vmpool-re-net"))
        old.kill()
        assert _wait_gone(old.pid)
        launching = Record(
            name="vmpool-re-0", index=0, sock_dir=str(tmp_path), kernel="k", initrd="i",
            network="vmpool-re-net", hub=str(tmp_path / "recorded-at-create"),
        )
        with backend.networks.held(launching):  # what every launch of a guest runs inside
            record = _network(backend, "vmpool-re-net")
            assert _hub(record).pid != old.pid
        a, b = _guest(record), _guest(record)
        _send_frame(a, b"again")
        assert _recv_frame(b) == b"again"
    finally:
        backend.delete_network("vmpool-re-net")


@as_another_user
def test_another_user_cannot_connect_or_send_to_a_network_hub() -> None:
    state = Path(tempfile.mkdtemp(prefix="vmpool-open-"))  # not pytest's tmp: that is 0700
    backend = QemuBackend(QemuSettings(), state)
    try:
        backend.create_network("vmpool-priv-net", {})
        hub = Path(str(_network(backend, "vmpool-priv-net")["sock_dir"])) / "hub.sock"
        for level in (state, backend.root):
            level.chmod(0o755)  # open up to qemu/: what refuses is the network's own directory
        assert _other_user_tries([hub], backend.root) == ["EACCES EACCES"]
    finally:
        backend.delete_network("vmpool-priv-net")
        shutil.rmtree(state, ignore_errors=True)


def _other_user_tries(sockets: list[Path], readable: Path) -> list[str]:
    """As uid 65534: list ``readable`` (so the refusal is not at some parent directory), then
    per socket the errno of a stream connect() and of a datagram sendto() ("ok" if it worked)."""
    probe = """
import errno, os, socket, sys
os.listdir(sys.argv[1])
for path in sys.argv[2:]:
    seen = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(path) if kind == socket.SOCK_STREAM else s.sendto(b"x" * 64, path)
            seen.append("ok")
        except OSError as exc:
            seen.append(errno.errorcode[exc.errno])
    print(" ".join(seen))
"""
    done = subprocess.run(
        [*NOBODY, OTHER_USER_PYTHON, "-I", "-c", probe, str(readable), *map(str, sockets)],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


# --- image -------------------------------------------------------------------------------


@qemu
@needs_qemu
def test_build_image_keeps_an_unchanged_image(image_dir: Path) -> None:
    manifest = image_dir / MANIFEST_FILE
    before = manifest.stat().st_mtime_ns
    assert build_image(QemuSettings(image_dir=image_dir)) == image_dir
    assert manifest.stat().st_mtime_ns == before
    paths = find_image(QemuSettings(image_dir=image_dir))
    assert paths.kernel.is_file() and paths.initrd.is_file() and paths.disk.is_file()


# --- machines that never boot (cheap) ----------------------------------------------------


@qemu
@needs_qemu
def test_delete_is_idempotent_and_cleans_sockets_of_a_long_state_dir(
    image_dir: Path, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # socket paths would exceed 107 bytes here
    backend = QemuBackend(QemuSettings(image_dir=image_dir), deep)
    name = _unique()
    backend.create(MachineSpec(name, {"k": "v"}))
    record = json.loads((deep / "qemu" / name / "machine.json").read_text())
    sock_dir = Path(record["sock_dir"])
    assert len(str(sock_dir / "qmp.sock")) <= 107
    assert sock_dir.is_dir()
    for level in (sock_dir.parent, sock_dir):  # /tmp/vmpool-<uid>/<hash>: ours alone
        st = os.lstat(level)
        assert (st.st_uid, st.st_mode & 0o7777) == (os.getuid(), 0o700), level
    backend.delete(name)
    backend.delete(name)
    backend.delete(_unique("vmpool-never"))
    assert not (deep / "qemu" / name).exists()
    assert not sock_dir.exists()


def _fallback_for(run_dir: Path) -> Path:
    """Where the backend puts the sockets of a run directory too deep for sun_path."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vmpool-{os.getuid()}" / digest


def _plant(plant: str, fallback: Path, elsewhere: Path) -> None:
    base = fallback.parent
    if plant == "symlink":
        base.symlink_to(elsewhere)
        return
    base.mkdir(mode=0o700)
    if plant == "other-owner":
        os.chown(base, 65534, 65534)
    elif plant == "open-mode":
        base.chmod(0o755)
    elif plant == "subdir-symlink":
        fallback.symlink_to(elsewhere)
    elif plant == "subdir-other-owner":
        fallback.mkdir(mode=0o700)
        os.chown(fallback, 65534, 65534)
    elif plant == "subdir-open-mode":
        fallback.mkdir(mode=0o700)
        fallback.chmod(0o777)


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@qemu
@needs_qemu
@pytest.mark.parametrize(
    "plant",
    [
        "symlink",
        pytest.param("other-owner", marks=as_root),
        "open-mode",
        "subdir-symlink",
        pytest.param("subdir-other-owner", marks=as_root),
        "subdir-open-mode",
    ],
)
def test_a_socket_fallback_directory_not_ours_alone_is_refused_not_followed(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    (tmp_path / "tmp").mkdir(mode=0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # not the host's /tmp
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    backend = QemuBackend(QemuSettings(image_dir=image_dir), deep)
    name = _unique()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _plant(plant, _fallback_for(deep / "qemu" / name), elsewhere)
    with pytest.raises(BackendError, match="refusing to put sockets there"):
        backend.create(MachineSpec(name, {}))
    assert list(elsewhere.iterdir()) == []  # nothing made through a symlink
    assert not (deep / "qemu" / name).exists()


@qemu
@needs_qemu
def test_delete_stops_a_started_machine(image_dir: Path, tmp_path: Path) -> None:
    backend = QemuBackend(
        QemuSettings(image_dir=image_dir, accel="tcg"), tmp_path, template_dir=tmp_path / "t"
    )
    name = _unique()
    backend.create(MachineSpec(name, {}))
    backend.start(name)
    pid = int((tmp_path / "qemu" / name / "qemu.pid").read_text())
    assert [m.running for m in backend.list(name)] == [True]
    backend.delete(name)
    assert backend.list(name) == []
    assert _gone(pid)


@qemu
@needs_qemu
def test_address_is_none_without_a_network(image_dir: Path, tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(image_dir=image_dir), tmp_path)
    name = _unique()
    backend.create(MachineSpec(name, {}))
    try:
        assert backend.address(name) is None
    finally:
        backend.delete(name)


@qemu
@needs_qemu
def test_create_refuses_an_existing_name(image_dir: Path, tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(image_dir=image_dir), tmp_path)
    name = _unique()
    backend.create(MachineSpec(name, {}))
    try:
        with pytest.raises(BackendError, match="already exists"):
            backend.create(MachineSpec(name, {}))
    finally:
        backend.delete(name)


# --- running machines --------------------------------------------------------------------


@qemu
@needs_qemu
def test_started_machine_becomes_ready_and_runs_commands(
    backend: QemuBackend, pair: Pair
) -> None:
    result = backend.exec(pair.a, ["hostname"], timeout=30)
    assert result.ok
    assert result.stdout.strip() == pair.a


@qemu
@needs_qemu
def test_exec_returns_stdout_stderr_and_exit_code(backend: QemuBackend, pair: Pair) -> None:
    result = backend.exec(pair.a, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


@qemu
@needs_qemu
def test_exec_of_a_missing_command_exits_127(backend: QemuBackend, pair: Pair) -> None:
    result = backend.exec(pair.a, ["no-such-command"], timeout=30)
    assert result.returncode == 127
    assert "no-such-command" in result.stderr


@qemu
@needs_qemu
def test_exec_timeout_raises_and_kills_the_command(backend: QemuBackend, pair: Pair) -> None:
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        backend.exec(pair.a, ["sleep", "300"], timeout=1)
    assert time.monotonic() - started < 5
    left = backend.exec(pair.a, ["sh", "-c", "ps | grep -c '[s]leep 300'"], timeout=30)
    assert left.stdout.strip() == "0"


@qemu
@needs_qemu
def test_commands_share_one_agent_connection_until_release(
    backend: QemuBackend, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.release(pair.a)
    opened: list[Path] = []
    real_connect = qemu_agent.Agent.connect

    def connect(path: Path, deadline: float) -> qemu_agent.Agent:
        opened.append(path)
        return real_connect(path, deadline)

    monkeypatch.setattr(qemu_agent.Agent, "connect", connect)
    for i in range(4):
        assert backend.exec(pair.a, ["echo", str(i)], 30).stdout == f"{i}\n"
    assert len(opened) == 1
    backend.release(pair.a)
    assert backend.exec(pair.a, ["true"], 30).ok
    assert len(opened) == 2
    backend.release(pair.a)


@qemu
@needs_qemu
def test_after_release_another_process_runs_commands_at_once(
    backend: QemuBackend, pair: Pair, image_dir: Path, state_dir: Path, template_dir: Path
) -> None:
    assert backend.exec(pair.a, ["true"], 30).ok  # this process now holds the connection
    backend.release(pair.a)
    code = (
        "import sys; from pathlib import Path; "
        "from vmpool.backends.qemu import QemuBackend; from vmpool.config import QemuSettings; "
        f"b = QemuBackend(QemuSettings(image_dir=Path({str(image_dir)!r})), "
        f"Path({str(state_dir)!r}), template_dir=Path({str(template_dir)!r})); "
        f"print(b.exec({pair.a!r}, ['echo', 'other'], 10).stdout, end='')"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert (other.returncode, other.stdout) == (0, "other\n"), other.stderr


@qemu
@needs_qemu
def test_reset_discards_files_written_after_snapshot(backend: QemuBackend, pair: Pair) -> None:
    backend.snapshot(pair.b)
    assert backend.exec(pair.b, ["sh", "-c", "echo x > /tmp/after-snapshot"], 30).ok
    backend.reset(pair.b)
    assert backend.exec(pair.b, ["test", "-e", "/tmp/after-snapshot"], 30).returncode == 1


@qemu
@needs_qemu
def test_reset_without_snapshot_fails_and_leaves_the_machine_running(
    backend: QemuBackend, pair: Pair
) -> None:
    # no test in this module snapshots machine a
    with pytest.raises(BackendError, match="does not exist"):
        backend.reset(pair.a)
    assert backend.exec(pair.a, ["true"], 30).ok


@qemu
@needs_qemu
def test_list_finds_machines_with_their_labels(backend: QemuBackend, pair: Pair) -> None:
    prefix = pair.a.rsplit("-", 1)[0]
    listed = {m.name: m for m in backend.list(prefix)}
    assert set(listed) == {pair.a, pair.b}
    assert all(m.running and dict(m.labels) == pair.labels for m in listed.values())
    assert backend.list("vmpool-nomatch") == []


@qemu
@needs_qemu
def test_machines_on_one_network_reach_each_other(backend: QemuBackend, pair: Pair) -> None:
    addr_a, addr_b = backend.address(pair.a), backend.address(pair.b)
    assert addr_a is not None and addr_b is not None and addr_a != addr_b
    serve = "mkdir -p /tmp/www && echo hello-from-a > /tmp/www/f && httpd -p 8080 -h /tmp/www"
    assert backend.exec(pair.a, ["sh", "-c", serve], 30).ok
    fetched = backend.exec(
        pair.b, ["timeout", "10", "wget", "-q", "-O", "-", f"http://{addr_a}:8080/f"], 30
    )
    assert (fetched.returncode, fetched.stdout) == (0, "hello-from-a\n"), fetched.stderr


@qemu
@needs_qemu
@as_another_user
def test_another_user_can_open_no_socket_of_the_pool_network_or_its_guests(
    backend: QemuBackend, pair: Pair
) -> None:
    hub = Path(str(_network(backend, pair.network)["sock_dir"])) / "hub.sock"
    sockets = [hub]
    for name in (pair.a, pair.b):
        record = _record(backend, name)
        assert record["hub"] == str(hub)
        sockets += [Path(str(record["sock_dir"])) / s for s in ("qmp.sock", "qga.sock")]
        qemu_proc = psutil.Process(int((backend.root / name / "qemu.pid").read_text()))
        # no inet socket at all: no multicast group and port for anyone to join
        assert qemu_proc.net_connections("inet") == []
        assert "mcast=" not in " ".join(qemu_proc.cmdline())
    # (and the guests reach each other: test_machines_on_one_network_reach_each_other)
    backend.root.chmod(0o755)  # open up to qemu/: what refuses is the network's own directory
    assert _other_user_tries(sockets, backend.root) == ["EACCES EACCES"] * len(sockets)


@qemu
@needs_qemu
def test_auto_accel_is_probed_once_and_machines_boot_with_it(
    backend: QemuBackend, pair: Pair, state_dir: Path
) -> None:
    accel = backend.resolve_accel()
    assert accel in ("kvm", "tcg")
    record = json.loads((state_dir / "qemu" / pair.a / "machine.json").read_text())
    assert record["accel"] == accel  # and the pair fixture booted it
    # a second backend (another worker) reads the cached verdict instead of probing again
    again = QemuBackend(backend.settings, state_dir)
    started = time.monotonic()
    assert again.resolve_accel() == accel
    assert time.monotonic() - started < 5.0  # a probe would take its deadline (10 s) or a boot


# --- warm-up by cloning a saved state --------------------------------------------------------


def _stream(body: bytes) -> bytes:
    """A minimal well-formed QEMU migration stream: magic, body, EOF, then the vmdesc JSON."""
    desc = b'{"page_size": 4096, "devices": []}'
    return b"QEVM\x00\x00\x00\x03" + body + b"\x00\x06" + len(desc).to_bytes(4, "big") + desc


def test_a_complete_migration_stream_is_avalid_template(tmp_path: Path) -> None:
    path = tmp_path / "t.state"
    path.write_bytes(_stream(b"\x05" * 1000))
    assert valid_template(path) is not None


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage" * 1000, id="garbage"),
        pytest.param(_stream(b"\x05" * 1000)[:-1], id="truncated"),
        pytest.param(_stream(b"\x05" * 1000)[:500], id="cut-in-the-middle"),
        pytest.param(b"XXXX" + _stream(b"\x05" * 1000)[4:], id="bad-magic"),
    ],
)
def test_an_incomplete_or_foreign_file_is_not_a_template(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "t.state"
    path.write_bytes(content)
    assert valid_template(path) is None
    assert valid_template(tmp_path / "missing.state") is None


def _clone_settings(image_dir: Path) -> QemuSettings:
    return QemuSettings(
        image_dir=image_dir, accel="auto", kvm_probe_timeout=KVM_PROBE_TIMEOUT, warmup="clone"
    )


def test_templates_whose_inputs_changed_are_pruned(tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(), tmp_path, template_dir=tmp_path / "t")
    backend.template_dir.mkdir()
    kernel, other = tmp_path / "vmlinuz", tmp_path / "other"
    kernel.write_text("k")
    other.write_text("o")

    def template(key: str, inputs: list[Path]) -> None:
        ident = {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in inputs}
        (backend.template_dir / f"{key}.state").write_bytes(b"state")
        (backend.template_dir / f"{key}.json").write_text(json.dumps({"files": ident}))

    template("live", [kernel])
    template("changed", [other])
    template("gone", [other])
    template("building", [other])
    other.write_text("rebuilt")  # a rebuilt image: new size and mtime
    (backend.template_dir / "gone.json").write_text(
        json.dumps({"files": {str(tmp_path / "deleted"): "1:1"}})
    )
    backend.templates.prune(keep=backend.template_dir / "building.state")
    left = sorted(p.name for p in backend.template_dir.glob("*.state"))
    assert left == ["building.state", "live.state"]


@pytest.fixture(scope="module")
def cloner(image_dir: Path, state_dir: Path, template_dir: Path) -> QemuBackend:
    return QemuBackend(_clone_settings(image_dir), state_dir, template_dir=template_dir)


@pytest.fixture(scope="module")
def clones(cloner: QemuBackend) -> Iterator[Pair]:
    """Two clones on one network: the first start builds the template, the second reuses it."""
    run = uuid.uuid4().hex[:6]
    labels = {"vmpool.session": f"test-{run}", "vmpool.pool": "qemu-clone-tests"}
    p = Pair(f"vmpool-clone-{run}-net", f"vmpool-clone-{run}-a", f"vmpool-clone-{run}-b", labels)
    cloner.create_network(p.network, labels)
    try:
        for index, name in enumerate((p.a, p.b)):
            cloner.create(MachineSpec(name, labels, index=index, network=p.network))
        for name in (p.a, p.b):
            cloner.start(name)
        for name in (p.a, p.b):
            cloner.wait_ready(name, READY_TIMEOUT)
        yield p
    finally:
        for name in (p.a, p.b):
            cloner.delete(name)
        cloner.delete_network(p.network)


def _record(backend: QemuBackend, name: str) -> dict[str, object]:
    record: dict[str, object] = json.loads((backend.root / name / "machine.json").read_text())
    return record


@qemu
@needs_qemu
def test_clones_are_restored_from_the_template_and_answer_exec(
    cloner: QemuBackend, clones: Pair
) -> None:
    template = cloner.template_path(networked=True)
    assert valid_template(template) is not None
    for name in (clones.a, clones.b):
        record = _record(cloner, name)
        assert record["template"] == str(template) and record["clone_pending"] is False
        result = cloner.exec(name, ["sh", "-c", "hostname; date +%s"], timeout=30)
        assert result.ok, result.stderr
        hostname, guest_time = result.stdout.split()
        assert hostname == name
        # the template's clock is stale; a clone's is set from the host's
        assert abs(int(guest_time) - time.time()) < 10


@qemu
@needs_qemu
def test_clones_on_one_network_get_their_own_address_and_mac_and_reach_each_other(
    cloner: QemuBackend, clones: Pair
) -> None:
    seen = {}
    for name in (clones.a, clones.b):
        result = cloner.exec(
            name,
            ["sh", "-c", "cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0"],
            timeout=30,
        )
        assert result.ok, result.stderr
        mac, addr_line = result.stdout.split("\n", 1)
        record = _record(cloner, name)
        assert mac == record["mac"]
        assert f"inet {cloner.address(name)}/24" in addr_line
        assert addr_line.count("inet ") == 1  # the template's address (if any) is gone
        seen[name] = (mac, cloner.address(name))
    assert seen[clones.a][0] != seen[clones.b][0] and seen[clones.a][1] != seen[clones.b][1]
    serve = "mkdir -p /tmp/www && echo hello-from-a > /tmp/www/f && httpd -p 8080 -h /tmp/www"
    assert cloner.exec(clones.a, ["sh", "-c", serve], 30).ok
    fetched = cloner.exec(
        clones.b,
        ["timeout", "10", "wget", "-q", "-O", "-", f"http://{seen[clones.a][1]}:8080/f"],
        30,
    )
    assert (fetched.returncode, fetched.stdout) == (0, "hello-from-a\n"), fetched.stderr


@qemu
@needs_qemu
def test_reset_after_clone_discards_a_file(cloner: QemuBackend, clones: Pair) -> None:
    cloner.snapshot(clones.b)
    assert cloner.exec(clones.b, ["sh", "-c", "echo x > /tmp/after-snapshot"], 30).ok
    cloner.reset(clones.b)
    assert cloner.exec(clones.b, ["test", "-e", "/tmp/after-snapshot"], 30).returncode == 1
    # and the clone keeps the identity it was given, not the template's
    assert cloner.exec(clones.b, ["hostname"], 30).stdout.strip() == clones.b


@qemu
@needs_qemu
def test_four_clones_warm_in_parallel_with_distinct_identities(
    cloner: QemuBackend, clones: Pair
) -> None:
    run = uuid.uuid4().hex[:6]
    network = f"vmpool-clone4-{run}-net"
    names = [f"vmpool-clone4-{run}-{i}" for i in range(4)]
    cloner.create_network(network, {})

    def warm(index: int) -> str:
        # what the controller does per machine, in its own thread
        cloner.create(MachineSpec(names[index], {}, index=index, network=network))
        cloner.start(names[index])
        cloner.wait_ready(names[index], READY_TIMEOUT)
        cloner.snapshot(names[index])
        out = cloner.exec(names[index], ["sh", "-c", "hostname; ip -o -4 addr show eth0"], 30)
        assert out.ok, out.stderr
        return out.stdout

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            outputs = list(pool.map(warm, range(4)))
        for name, output in zip(names, outputs, strict=True):
            assert output.split()[0] == name
            assert f"inet {cloner.address(name)}/24" in output
            assert _record(cloner, name)["template"] is not None
        last = cloner.address(names[3])
        assert cloner.exec(names[0], ["ping", "-c", "1", "-W", "5", str(last)], 30).ok
    finally:
        for name in names:
            cloner.delete(name)
        cloner.delete_network(network)


def _start_one(backend: QemuBackend) -> str:
    name = _unique("vmpool-clone")
    backend.create(MachineSpec(name, {}))
    backend.start(name)
    backend.wait_ready(name, READY_TIMEOUT)
    return name


@qemu
@needs_qemu
def test_a_truncated_template_is_not_used_but_rebuilt(
    image_dir: Path, tmp_path: Path, cloner: QemuBackend, clones: Pair
) -> None:
    backend = QemuBackend(
        _clone_settings(image_dir), tmp_path / "state", template_dir=tmp_path / "templates"
    )
    template = backend.template_path(networked=True)
    template.parent.mkdir(parents=True)
    good = cloner.template_path(networked=True).read_bytes()
    template.write_bytes(good[: len(good) // 2])  # what a save cut short would leave
    network = _unique("vmpool-net")
    backend.create_network(network, {})
    name = _unique("vmpool-clone")
    backend.create(MachineSpec(name, {}, index=0, network=network))
    try:
        backend.start(name)
        backend.wait_ready(name, READY_TIMEOUT)
        assert valid_template(template) is not None  # rebuilt in place
        assert _record(backend, name)["template"] == str(template)
        assert backend.exec(name, ["hostname"], 30).stdout.strip() == name
    finally:
        backend.delete(name)
        backend.delete_network(network)


@qemu
@needs_qemu
def test_a_template_qemu_cannot_load_is_dropped_and_the_machine_boots(
    image_dir: Path,
    tmp_path: Path,
    cloner: QemuBackend,
    clones: Pair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = QemuBackend(
        _clone_settings(image_dir), tmp_path / "state", template_dir=tmp_path / "templates"
    )
    template = backend.template_path(networked=True)
    template.parent.mkdir(parents=True)
    good = bytearray(cloner.template_path(networked=True).read_bytes())
    good[8:4096] = b"\xee" * (4096 - 8)  # complete-looking, but no device section QEMU knows
    template.write_bytes(bytes(good))
    assert valid_template(template) is not None
    network = _unique("vmpool-net")
    backend.create_network(network, {})
    name = _unique("vmpool-clone")
    backend.create(MachineSpec(name, {}, index=0, network=network))
    try:
        backend.start(name)
        backend.wait_ready(name, READY_TIMEOUT)
        record = _record(backend, name)
        assert record["template"] is None  # booted instead
        assert "booting it instead" in caplog.text
        assert not template.exists()  # the next machine builds a good one
        result = backend.exec(name, ["sh", "-c", "hostname; ip -o -4 addr show eth0"], 30)
        assert result.stdout.split()[0] == name and f"inet {record['ip']}/24" in result.stdout
    finally:
        backend.delete(name)
        backend.delete_network(network)


@qemu
@needs_qemu
def test_a_failed_template_build_boots_the_machine(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = QemuBackend(
        _clone_settings(image_dir), tmp_path / "state", template_dir=tmp_path / "templates"
    )
    builds = []

    def broken(*args: object) -> None:
        builds.append(args)
        raise BackendError("template guest did not answer")

    monkeypatch.setattr(backend.templates, "_build", broken)
    first = _start_one(backend)
    try:
        second = _start_one(backend)
        try:
            assert [_record(backend, n)["template"] for n in (first, second)] == [None, None]
            assert backend.exec(second, ["hostname"], 30).stdout.strip() == second
            assert len(builds) == 1  # a failed build is not retried for every machine
        finally:
            backend.delete(second)
    finally:
        backend.delete(first)
