"""Configuration: precedence, profiles, and one clear line per problem."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from vmpool import config
from vmpool.config import PoolSettings
from vmpool.config_backends import (
    ImageSettings,
    OrbstackSettings,
    PodmanSettings,
    QemuSettings,
    SimSettings,
)
from vmpool.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "pool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path | None, **kwargs: Any) -> list[str]:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        config.load(path, **kwargs)
    return info.value.problems


def only_problem(path: Path | None, **kwargs: Any) -> str:
    found = problems(path, **kwargs)
    assert len(found) == 1, found
    assert "\n" not in found[0]
    return found[0]


# -- error lines ------------------------------------------------------------------------------
def test_out_of_range_value_names_file_key_reason_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 0\n")
    assert only_problem(path) == f"{path}: pool.size: must be >= 1, got 0"


def test_error_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[pool]\nsize = 0\n")
    monkeypatch.chdir(tmp_path)
    assert only_problem(Path("pool.toml")) == "pool.toml: pool.size: must be >= 1, got 0"


def test_error_message_is_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 0\nretries = -1\n")
    found = problems(path)
    assert sorted(found) == [
        f"{path}: pool.retries: must be >= 0, got -1",
        f"{path}: pool.size: must be >= 1, got 0",
    ]
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert str(info.value).splitlines() == found


def test_misspelt_pool_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsise = 3\n")
    assert only_problem(path) == f"{path}: pool.sise: unknown key (did you mean 'size'?)"


def test_misspelt_table_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[pol]\nsize = 3\n")
    assert only_problem(path) == f"{path}: pol: unknown key (did you mean 'pool'?)"


def test_misspelt_backend_key_suggests_from_that_backend(tmp_path: Path) -> None:
    path = write(tmp_path, "[sim]\ncreate_latncy = 1\n")
    assert only_problem(path) == (
        f"{path}: sim.create_latncy: unknown key (did you mean 'create_latency'?)"
    )


def test_unknown_key_without_near_match_has_no_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nzzzzzz = 3\n")
    assert only_problem(path) == f"{path}: pool.zzzzzz: unknown key"


def test_invalid_toml_names_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = \n")
    line = only_problem(path)
    assert line.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in line


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert only_problem(path) == f"{path}: file not found"


def test_unknown_backend_lists_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nbackend = 'vmware'\n")
    line = only_problem(path)
    assert line.startswith(f"{path}: pool.backend: must be one of ")
    for name in ("auto", "sim", "podman", "docker", "qemu", "orbstack"):
        assert repr(name) in line
    assert line.endswith("got 'vmware'")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[pool]\nsize = 'three'\n", "pool.size: must be an integer, got 'three'"),
        ("[pool]\nsize = 2.5\n", "pool.size: must be a whole number, got 2.5"),
        ("[pool]\npre_ping = 'maybe'\n", "pool.pre_ping: must be true or false, got 'maybe'"),
        (
            "[pool]\ncheckout_timeout = 'soon'\n",
            "pool.checkout_timeout: must be a number, got 'soon'",
        ),
        ("[pool]\nname_prefix = 7\n", "pool.name_prefix: must be a string, got 7"),
        ("[sim]\nfail_create = 3\n", "sim.fail_create: must be a list, got 3"),
        ("pool = 3\n", "pool: must be a table, got 3"),
        ("[profiles]\nbig = 3\n", "profiles.big: must be a table, got 3"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}: {expected}"


def test_pattern_mismatch_shows_the_pattern(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nname_prefix = 'My-Pool'\n")
    assert only_problem(path) == (
        f"{path}: pool.name_prefix: must match ^[a-z][a-z0-9]{{0,15}}$, got 'My-Pool'"
    )


def test_env_var_error_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    assert only_problem(path, environ={"VMPOOL_SIZE": "abc"}) == (
        "VMPOOL_SIZE: must be an integer, got 'abc'"
    )


def test_env_var_range_error_names_the_variable(tmp_path: Path) -> None:
    assert only_problem(None, environ={"VMPOOL_SIZE": "0"}) == "VMPOOL_SIZE: must be >= 1, got '0'"


def test_cli_override_error_names_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    line = only_problem(path, overrides={"size": 0}, override_names={"size": "--vm-pool-size"})
    assert line == "--vm-pool-size: must be >= 1, got 0"


def test_cli_override_without_a_name_falls_back_to_the_key(tmp_path: Path) -> None:
    assert only_problem(None, overrides={"retries": -1}) == "--retries: must be >= 0, got -1"


# -- precedence ---------------------------------------------------------------------------------
def test_defaults_apply_without_a_file() -> None:
    pool = config.load(None, environ={}).default.pool
    assert pool == PoolSettings()
    assert pool.size is None
    assert pool.checkin_policy == "reset"
    assert pool.failure_policy == "replace"


def test_file_beats_default(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    assert config.load(path, environ={}).default.pool.size == 2


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    loaded = config.load(path, environ={"VMPOOL_SIZE": "4"})
    assert loaded.default.pool.size == 4
    assert loaded.origins[("pool", "size")] == "VMPOOL_SIZE"


def test_cli_beats_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    loaded = config.load(
        path,
        environ={"VMPOOL_SIZE": "4"},
        overrides={"size": 5},
        override_names={"size": "--vm-pool-size"},
    )
    assert loaded.default.pool.size == 5
    assert loaded.origins[("pool", "size")] == "--vm-pool-size"


def test_unset_cli_override_leaves_env_in_force(tmp_path: Path) -> None:
    loaded = config.load(None, environ={"VMPOOL_SIZE": "4"}, overrides={"size": None})
    assert loaded.default.pool.size == 4


def test_empty_env_var_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n")
    assert config.load(path, environ={"VMPOOL_SIZE": ""}).default.pool.size == 2


def test_env_var_sets_boolean_and_float_keys() -> None:
    pool = config.load(
        None, environ={"VMPOOL_PRE_PING": "false", "VMPOOL_CHECKOUT_TIMEOUT": "2.5"}
    ).default.pool
    assert pool.pre_ping is False
    assert pool.checkout_timeout == 2.5


# -- pyproject.toml -------------------------------------------------------------------------------
def test_tool_vmpool_table_in_pyproject_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[tool.vmpool.pool]\nsize = 3\n[tool.vmpool.sim]\ncreate_latency = 0.5\n",
        name="pyproject.toml",
    )
    loaded = config.load(path, environ={})
    assert loaded.default.pool.size == 3
    assert loaded.default.sim.create_latency == 0.5


def test_pyproject_error_names_pyproject(tmp_path: Path) -> None:
    path = write(tmp_path, "[tool.vmpool.pool]\nsize = 0\n", name="pyproject.toml")
    assert only_problem(path) == f"{path}: pool.size: must be >= 1, got 0"


def test_find_config_prefers_pool_toml(tmp_path: Path) -> None:
    write(tmp_path, "[tool.vmpool.pool]\nsize = 3\n", name="pyproject.toml")
    write(tmp_path, "[pool]\nsize = 2\n")
    assert config.find_config(tmp_path) == tmp_path / "pool.toml"


def test_find_config_uses_pyproject_only_with_tool_vmpool(tmp_path: Path) -> None:
    write(tmp_path, "[tool.other]\nx = 1\n", name="pyproject.toml")
    assert config.find_config(tmp_path) is None
    write(tmp_path, "[tool.vmpool]\n", name="pyproject.toml")
    assert config.find_config(tmp_path) == tmp_path / "pyproject.toml"


# -- profiles -------------------------------------------------------------------------------------
def test_profile_inherits_pool_and_backend_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[pool]\nsize = 2\nretries = 5\n[sim]\nstart_latency = 2.0\n"
        "[profiles.big]\nsize = 4\nsim = { create_latency = 1.0 }\n",
    )
    big = config.load(path, environ={}).profile("big")
    assert big.name == "big"
    assert big.pool.size == 4
    assert big.pool.retries == 5
    assert big.sim.create_latency == 1.0
    assert big.sim.start_latency == 2.0


def test_profile_does_not_change_the_default_profile(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n[profiles.big]\nsize = 4\n")
    loaded = config.load(path, environ={})
    assert loaded.default.pool.size == 2
    assert sorted(loaded.profiles) == ["big", "default"]


def test_env_and_cli_beat_a_profiles_own_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\nretries = 1\n[profiles.big]\nsize = 4\nretries = 3\n")
    loaded = config.load(path, environ={"VMPOOL_SIZE": "7"}, overrides={"retries": 9})
    assert loaded.profile("big").pool.size == 7
    assert loaded.profile("big").pool.retries == 9


def test_profile_error_names_profiles_name_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 2\n[profiles.big]\nsize = 0\n")
    assert only_problem(path) == f"{path}: profiles.big.size: must be >= 1, got 0"


def test_profile_backend_error_names_the_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[profiles.big]\nsim = { create_latency = -1 }\n")
    assert only_problem(path) == (
        f"{path}: profiles.big.sim.create_latency: must be >= 0.0, got -1"
    )


def test_misspelt_profile_key_suggests_a_pool_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[profiles.big]\nsiz = 3\n")
    assert only_problem(path) == f"{path}: profiles.big.siz: unknown key (did you mean 'size'?)"


def test_profile_backend_table_of_wrong_type_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "[profiles.big]\nsim = 3\n")
    assert only_problem(path) == f"{path}: profiles.big.sim: must be a table"


def test_invalid_profile_name_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "[profiles.Big]\nsize = 4\n")
    assert only_problem(path) == (
        f"{path}: profiles: profile name 'Big' must match ^[a-z][a-z0-9]{{0,15}}$ "
        "and not be 'default'"
    )


def test_unknown_profile_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "[profiles.big]\nsize = 4\n")
    loaded = config.load(path, environ={})
    with pytest.raises(ConfigError) as info:
        loaded.profile("bgi")
    assert str(info.value) == (
        "unknown profile 'bgi' (did you mean 'big'?); known profiles: big, default"
    )


def test_no_profile_name_means_the_default(tmp_path: Path) -> None:
    loaded = config.load(None, environ={})
    assert loaded.profile(None) is loaded.default


# -- identity ---------------------------------------------------------------------------------
def test_config_hash_changes_with_backend_settings_not_pool_size() -> None:
    base = config.Profile(name="default")
    resized = base.model_copy(update={"pool": PoolSettings(size=9)})
    slower = base.model_copy(update={"sim": SimSettings(create_latency=1.0)})
    assert base.config_hash("sim") == resized.config_hash("sim")
    assert base.config_hash("sim") != slower.config_hash("sim")
    assert base.config_hash("sim") != base.config_hash("podman")


# -- the shipped example ------------------------------------------------------------------------
_SECTIONS: dict[str, type[BaseModel]] = {
    "pool": PoolSettings,
    "sim": SimSettings,
    "podman": PodmanSettings,
    "qemu": QemuSettings,
    "orbstack": OrbstackSettings,
    "image": ImageSettings,
}


def _section(text: str, table: str) -> str:
    """The lines of ``[table]`` (commented out or not) up to the next table header."""
    header = re.compile(r"^\s*#?\s*\[(?P<name>[^\]]+)\]\s*$")
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        match = header.match(line)
        if match:
            inside = match.group("name").strip() == table
            continue
        if inside:
            out.append(line)
    return "\n".join(out)


def test_shipped_pool_toml_loads() -> None:
    path = REPO / "config" / "pool.toml"
    assert path.is_file(), f"{path} is missing: it documents every key"
    config.load(path, environ={})


@pytest.mark.parametrize("table", sorted(_SECTIONS))
def test_shipped_pool_toml_mentions_every_key(table: str) -> None:
    path = REPO / "config" / "pool.toml"
    assert path.is_file(), f"{path} is missing: it documents every key"
    section = _section(path.read_text(), table)
    assert section, f"{path} has no [{table}] table (commented out or not)"
    missing = [
        key
        for key in _SECTIONS[table].model_fields
        if not re.search(rf"^\s*#?\s*{re.escape(key)}\s*=", section, re.M)
    ]
    assert not missing, f"{path}: [{table}] does not mention {missing}"


# -- [image] and the podman distro ------------------------------------------------------------
def test_image_packages_must_be_debian_package_names(tmp_path: Path) -> None:
    path = write(tmp_path, '[image]\npackages = ["curl", "Bad Name"]\n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}: image.packages: ")
    assert "'Bad Name' is not a Debian package name" in problem


def test_image_packages_are_per_profile_and_part_of_its_machines_identity(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[podman]\ndistro = "debian"\n[profiles.web]\nimage = {packages = ["nginx-light"]}\n',
    )
    cfg = config.load(path, environ={})
    default, web = cfg.profile(None), cfg.profile("web")
    assert (default.image.packages, web.image.packages) == ([], ["nginx-light"])
    assert web.podman.distro == "debian"
    assert default.config_hash("podman") != web.config_hash("podman")
    # no packages: the hash is what it was before [image] existed
    assert default.config_hash("podman") == config.Profile(
        name="x", podman=default.podman
    ).config_hash("podman")


def test_podman_systemd_takes_auto_or_a_boolean(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, "[podman]\nsystemd = true\n"), environ={})
    assert loaded.default.podman.systemd is True
    problem = only_problem(write(tmp_path, '[podman]\nsystemd = "yes"\n'))
    assert problem.startswith(f"{tmp_path / 'pool.toml'}: podman.systemd: ")


def test_store_takes_a_postgresql_uri_from_the_environment_and_never_echoes_another() -> None:
    cfg = config.load(environ={"VMPOOL_STORE": "postgresql://ci@db.example/vmpool"})
    assert cfg.default.pool.store == "postgresql://ci@db.example/vmpool"
    with pytest.raises(ConfigError, match="VMPOOL_STORE: must be a PostgreSQL URI") as info:
        config.load(environ={"VMPOOL_STORE": "mysql://ci:hunter2@db/vmpool"})
    assert "hunter2" not in str(info.value)
    assert config.load(environ={}).default.pool.store is None  # the JSON file store
