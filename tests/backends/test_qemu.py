"""The QEMU backend against real qemu-system-x86_64 guests (few boots: two share a module).

The image is built once per session into a temporary cache. Tests marked ``qemu`` need
qemu-system-x86, qemu-utils, busybox-static, qemu-guest-agent and a linux-image kernel.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from vmpool.backends.base import Backend, MachineSpec
from vmpool.backends.qemu import QemuBackend
from vmpool.backends.qemu_image import MANIFEST_FILE, build_image, find_image
from vmpool.config import QemuSettings
from vmpool.errors import BackendError, BackendUnavailable, ExecTimeout

qemu = pytest.mark.qemu
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="qemu-system-x86_64 / qemu-img not installed",
)
#: Bounds the one KVM probe `auto` makes on hosts where KVM hangs (a working KVM boots in ~2 s).
KVM_PROBE_TIMEOUT = 10.0
READY_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("qemu-cache") / "qemu"
    build_image(QemuSettings(image_dir=target))
    return target


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-state")


@pytest.fixture(scope="module")
def backend(image_dir: Path, state_dir: Path) -> QemuBackend:
    settings = QemuSettings(
        image_dir=image_dir, accel="auto", kvm_probe_timeout=KVM_PROBE_TIMEOUT
    )
    return QemuBackend(settings, state_dir)


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
    assert record["group"].startswith("239.")
    assert 20000 <= record["port"] <= 60000
    assert record["subnet"].startswith("10.") and record["subnet"].endswith(".0")
    [listed] = backend.list_networks("vmpool-test")
    assert (listed.name, dict(listed.labels)) == ("vmpool-test-net", {"vmpool.session": "s1"})
    backend.delete_network("vmpool-test-net")
    backend.delete_network("vmpool-test-net")
    assert backend.list_networks("vmpool-test") == []


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
    backend.delete(name)
    backend.delete(name)
    backend.delete(_unique("vmpool-never"))
    assert not (deep / "qemu" / name).exists()
    assert not sock_dir.exists()


@qemu
@needs_qemu
def test_delete_stops_a_started_machine(image_dir: Path, tmp_path: Path) -> None:
    backend = QemuBackend(QemuSettings(image_dir=image_dir, accel="tcg"), tmp_path)
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
    assert time.monotonic() - started < 1.0
