"""`vmpool doctor`: one line per check, the exact fix, exit 1 when the backend is unusable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vmpool import doctor

CLI_TIMEOUT = 120.0


def _doctor(
    *args: str, cwd: Path, path: str | None = None, state_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMPOOL_")}
    if path is not None:
        env["PATH"] = path
    if state_dir is not None:
        env["VMPOOL_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "doctor", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def _checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    doc = json.loads(result.stdout)
    return {f"{c['backend']}/{c['name']}": c for c in doc["checks"]}


# -- no backend needed ------------------------------------------------------------------------
def test_state_dir_of_another_owner_is_broken_and_named(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    result = _doctor("--backend", "sim", cwd=tmp_path, state_dir=state)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if "state/directory" in x)
    assert line.startswith("broken") and "owned by uid 65534" in line and str(state) in line
    assert "NOT usable" in result.stdout


def test_state_dir_open_to_others_is_broken_with_chmod_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    result = _doctor("--backend", "sim", "--json", cwd=tmp_path, state_dir=state)
    assert result.returncode == 1
    check = _checks(result)["state/directory"]
    assert check["status"] == "broken" and check["fix"] == f"chmod 700 {state}"


def test_sim_with_a_private_state_dir_is_usable(tmp_path: Path) -> None:
    result = _doctor("--backend", "sim", "--json", cwd=tmp_path, state_dir=tmp_path / "new")
    assert result.returncode == 0, result.stdout
    doc = json.loads(result.stdout)
    assert doc["usable"] is True and all(c["status"] == "ok" for c in doc["checks"])


def test_explain_names_the_missing_tool_behind_netavarks_enoent(
    monkeypatch: pytest.MonkeyPatch, path_without: Callable[..., str]
) -> None:
    error = "Error: unable to start container: netavark: No such file or directory (os error 2)"
    monkeypatch.setenv("PATH", path_without("iptables"))
    assert doctor.explain(error).endswith("[cause: iptables not found: apt-get install iptables]")
    monkeypatch.undo()
    if doctor.Tool("iptables", "iptables", "").find() is not None:
        assert doctor.explain(error) == error  # nothing missing: the text is left alone


def test_explain_leaves_unrelated_errors_alone() -> None:
    assert doctor.explain("Error: no space left on device") == "Error: no space left on device"


@pytest.mark.parametrize(
    ("mounts", "mode"),
    [
        ("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "unified"),
        ("tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
         "hybrid"),
        ("tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n", "legacy"),
    ],
)
def test_cgroup_mode_is_read_from_the_mount_table(mounts: str, mode: str) -> None:
    assert doctor.cgroup_mode(mounts) == mode


# -- podman -------------------------------------------------------------------------------------
@pytest.mark.podman
def test_podman_without_iptables_reports_it_missing_with_the_apt_line(
    tmp_path: Path, path_without: Callable[..., str]
) -> None:
    result = _doctor(
        "--backend", "podman", cwd=tmp_path, path=path_without("iptables", "ip6tables"),
        state_dir=tmp_path / "state",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    i = next(i for i, x in enumerate(lines) if "podman/iptables" in x)
    assert lines[i].startswith("missing")
    assert lines[i + 1].strip() == "fix: apt-get install iptables"
    # the live check shows the failure a pool would meet, explained
    network = next(x for x in lines if "podman/network" in x)
    assert network.startswith("broken") and "iptables not found" in network
    assert "backend podman: NOT usable" in result.stdout


@pytest.mark.podman
def test_podman_image_missing_names_the_build_command(tmp_path: Path) -> None:
    (tmp_path / "pool.toml").write_text('[podman]\nimage = "localhost/vmpool-no-such:1"\n')
    result = _doctor("--backend", "podman", "--quick", "--json", cwd=tmp_path,
                     state_dir=tmp_path / "state")
    assert result.returncode == 1
    check = _checks(result)["podman/image"]
    assert check["status"] == "missing"
    assert check["fix"] == "vmpool image build --backend podman"


@pytest.mark.podman
@pytest.mark.qemu
def test_everything_is_ok_on_a_machine_set_up_by_ci_install(tmp_path: Path) -> None:
    result = _doctor(cwd=tmp_path, state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = [x for x in result.stdout.splitlines() if x.startswith(("missing", "broken"))]
    assert bad == []
    assert "backend auto: usable" in result.stdout


# -- qemu ---------------------------------------------------------------------------------------
@pytest.mark.qemu
def test_qemu_image_missing_names_the_build_command(tmp_path: Path) -> None:
    empty = tmp_path / "images"
    empty.mkdir()
    (tmp_path / "pool.toml").write_text(f'[qemu]\nimage_dir = "{empty}"\n')
    result = _doctor("--backend", "qemu", "--json", cwd=tmp_path, state_dir=tmp_path / "state")
    assert result.returncode == 1
    check = _checks(result)["qemu/image"]
    assert check["status"] == "missing" and str(empty) in str(check["detail"])
    assert check["fix"] == "vmpool image build --backend qemu"


@pytest.mark.qemu
def test_qemu_image_out_of_date_is_reported(tmp_path: Path) -> None:
    from vmpool.backends.qemu import image as qemu_image
    from vmpool.config_backends import QemuSettings

    built = qemu_image.image_dir(QemuSettings())
    copy = tmp_path / "images"
    copy.mkdir()
    for f in built.iterdir():
        (copy / f.name).symlink_to(f)
    manifest = json.loads((built / qemu_image.MANIFEST_FILE).read_text())
    manifest["build_version"] = -1
    (copy / qemu_image.MANIFEST_FILE).unlink()
    (copy / qemu_image.MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / "pool.toml").write_text(f'[qemu]\nimage_dir = "{copy}"\n')
    result = _doctor("--backend", "qemu", "--quick", "--json", cwd=tmp_path,
                     state_dir=tmp_path / "state")
    assert result.returncode == 1
    check = _checks(result)["qemu/image"]
    assert check["status"] == "broken" and "out of date" in str(check["detail"])
