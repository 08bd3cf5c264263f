"""The Debian image's recipe: what it holds, and that any change to it names a new image."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmpool.backends import debian_image
from vmpool.backends.base import MachineSpec
from vmpool.backends.debian_image import BASE_PACKAGES, Recipe
from vmpool.backends.podman import debian_image_name, machine_image, missing_image_message
from vmpool.backends.podman.commands import Commands
from vmpool.backends.podman.options import ContainerOptions
from vmpool.backends.podman.records import write_json
from vmpool.backends.podman.runtime import RuntimeDetector
from vmpool.backends.podman.tool import Tool
from vmpool.config_backends import ImageSettings, PodmanSettings


def test_the_plain_recipe_is_tagged_with_the_release() -> None:
    assert debian_image_name() == "localhost/vmpool-debian:12"
    assert Recipe(("python3",)).tag() == "12"  # a base package adds nothing


def test_extra_packages_make_an_image_of_their_own() -> None:
    plain, extra = Recipe(), Recipe(("curl",))
    assert extra.all_packages == (*BASE_PACKAGES, "curl")
    assert extra.digest() != plain.digest()
    assert extra.tag() == f"12-{extra.digest()[:8]}"
    assert Recipe(("curl", "jq")).digest() == Recipe(("jq", "curl", "jq")).digest()


def test_the_recipe_version_and_hook_are_part_of_the_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = Recipe().digest()
    monkeypatch.setattr(debian_image, "RECIPE_VERSION", debian_image.RECIPE_VERSION + 1)
    assert Recipe().digest() != before
    monkeypatch.undo()
    monkeypatch.setattr(debian_image, "MASKED_UNITS", ("apt-daily.timer",))
    assert Recipe().digest() != before


def test_the_hook_empties_machine_id_drops_host_keys_and_masks_units() -> None:
    hook = Recipe().hook
    assert ': > "$r/etc/machine-id"' in hook
    assert '"$r/etc/ssh/ssh_host_"*' in hook
    assert "apt-daily.timer" in hook and "ln -sf /dev/null" in hook
    assert "PasswordAuthentication no" in hook


def test_distro_selects_the_built_image_unless_one_is_configured() -> None:
    assert machine_image(PodmanSettings()) == "localhost/vmpool-busybox:latest"
    assert machine_image(PodmanSettings(distro="debian")) == "localhost/vmpool-debian:12"
    web = ImageSettings(packages=["nginx-light"])
    assert machine_image(PodmanSettings(distro="debian"), web) == debian_image_name(
        ["nginx-light"]
    )
    assert machine_image(PodmanSettings(distro="debian", image="mine:1"), web) == "mine:1"


def test_a_missing_debian_image_names_the_command_that_builds_it() -> None:
    message = missing_image_message("podman", debian_image_name())
    assert "vmpool image build --backend podman --distro debian" in message


def _options(settings: PodmanSettings, tmp_path: Path) -> ContainerOptions:
    tool = Tool(settings)
    runtime = RuntimeDetector(tool, "img", tmp_path, write_json)
    return ContainerOptions(tool, runtime, Commands(tool, tmp_path / "exec"), "img", tmp_path)


def test_systemd_machines_need_podman_not_docker(tmp_path: Path) -> None:
    from vmpool.backends.podman import PodmanBackend
    from vmpool.errors import BackendUnavailable

    docker = PodmanBackend(PodmanSettings(tool="docker", systemd=True), tmp_path)
    with pytest.raises(BackendUnavailable, match="needs tool = \"podman\""):
        docker.create(MachineSpec("vmpooltest-systemd", {}))
    # auto and false never ask docker for systemd, nor run anything to decide
    assert not _options(PodmanSettings(tool="docker"), tmp_path).boots_systemd()
    assert not _options(PodmanSettings(distro="debian", systemd=False), tmp_path).boots_systemd()
