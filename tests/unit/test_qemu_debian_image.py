"""The Debian QEMU image: its recipe, and a disk made from a tree, rebuilt only on a new recipe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmpool.backends import debian_image
from vmpool.backends.qemu import debian as qemu_debian
from vmpool.backends.qemu.debian import QemuRecipe
from vmpool.config_backends import QemuSettings
from vmpool.errors import BackendUnavailable


def test_the_qemu_recipe_adds_kernel_agent_and_a_tuned_boot() -> None:
    recipe = QemuRecipe()
    assert {"linux-image-amd64", "qemu-guest-agent"} <= set(recipe.all_packages)
    assert recipe.digest() != debian_image.Recipe().digest()
    assert recipe.tag() == "12" and QemuRecipe(("curl",)).tag().startswith("12-")
    hook = recipe.hook
    assert "Address=10.0.2.15/24" in hook and "DefaultDependencies=no" in hook
    assert "virtio_console" in hook and "MODULES=list" in hook and "update-initramfs" in hook
    assert "virtio_blk ext4; do" in hook  # MODULES=list adds no root filesystem module
    assert "PasswordAuthentication no" in hook  # the podman root's hook comes first


def _fake_root(calls: list[str]) -> object:
    def build_root(recipe: debian_image.Recipe, out: Path, **_: object) -> None:
        calls.append(recipe.digest())
        (out / "boot").mkdir(parents=True)
        (out / "boot" / "vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
        (out / "boot" / "initrd.img-6.1.0-99-amd64").write_bytes(b"initrd")
        (out / "etc").mkdir()
        (out / "etc" / "hostname").write_text("debian\n")

    return build_root


def test_build_makes_a_qcow2_of_the_tree_and_rebuilds_only_for_a_new_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(debian_image, "build_root", _fake_root(calls))
    monkeypatch.setattr(qemu_debian, "DISK_SIZE", "16M")
    settings = QemuSettings(image_dir=tmp_path / "qemu")
    with pytest.raises(BackendUnavailable, match="--distro debian"):
        qemu_debian.find_image(settings)

    out = qemu_debian.build_image(settings)
    assert out == tmp_path / "qemu-debian-12" and qemu_debian.find_image(settings) == out
    assert (out / "vmlinuz").read_bytes() == b"kernel"
    info = subprocess.run(["qemu-img", "info", str(out / "disk.qcow2")], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    assert "file format: qcow2" in info
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out / "disk.qcow2"), str(raw)],
                   timeout=30, check=True)
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(raw)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert cat == "debian\n"
    assert (out / "disk.qcow2").stat().st_mode & 0o077 == 0

    assert qemu_debian.build_image(settings) == out and len(calls) == 1  # cached
    qemu_debian.build_image(settings, force=True)
    assert len(calls) == 2
    other = qemu_debian.build_image(settings, packages=["curl"])
    assert other != out and len(calls) == 3 and calls[-1] == QemuRecipe(("curl",)).digest()
