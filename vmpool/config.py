"""Configuration: pydantic models for ``pool.toml`` / ``[tool.vmpool]``, loading and precedence.

Precedence, highest first: command-line option > ``VMPOOL_*`` environment variable > file >
default. Every problem is reported as one line naming its source and dotted key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)

from vmpool.config_backends import (  # re-exported: the sections are part of the config API
    ImageSettings,
    OrbstackSettings,
    PodmanSettings,
    QemuSettings,
    SimSettings,
)
from vmpool.config_backends import Strict as _Strict
from vmpool.config_errors import ErrorText
from vmpool.errors import ConfigError

Policy = Literal["reuse", "reset", "replace"]
BackendName = Literal["auto", "sim", "podman", "docker", "qemu", "orbstack"]
NAME_PART = r"^[a-z][a-z0-9]{0,15}$"


class PoolSettings(_Strict):
    """Keys of the ``[pool]`` table (and of each ``[profiles.NAME]`` table)."""

    size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Machines to keep warm. Default: the xdist worker count, 1 without xdist.",
    )
    backend: BackendName = Field(
        "auto", description="auto tries orbstack, podman, docker, then qemu; first usable wins."
    )
    name_prefix: str = Field(
        "vmpool",
        pattern=NAME_PART,
        description="Machines are named <prefix>-<session>-[<profile>-]<n>.",
    )
    state_dir: Path | None = Field(
        None, description="Where pool state files live. Default: the user state dir (platformdirs)."
    )
    store: str | None = Field(
        None,
        description="Where the pool's lease record lives: unset, a JSON file per pool in "
        "state_dir (one host); a PostgreSQL URI (postgresql://user@host/db; the password from "
        "~/.pgpass or PGPASSWORD, never printed) for a pool shared by sessions on many hosts. "
        "Also VMPOOL_STORE.",
    )
    store_lease: float = Field(
        30.0,
        gt=0,
        description="With a PostgreSQL store: seconds a holder process lives without a "
        "heartbeat (it beats every third of it); a stopped one loses its leases after this.",
    )
    checkout_timeout: float = Field(
        300.0, gt=0, description="Seconds a test waits for a free machine before CheckoutTimeout."
    )
    checkin_policy: Policy = Field(
        "reset", description="After a passing test: reuse as is, reset to snapshot, or replace."
    )
    failure_policy: Policy = Field("replace", description="After a failed test.")
    max_uses: int | None = Field(
        None, ge=1, description="Replace a machine after this many check-outs (unset: no limit)."
    )
    max_age: float | None = Field(
        None, gt=0, description="Replace a machine older than this many seconds (unset: no limit)."
    )
    pre_ping: bool = Field(
        True, description="Probe a machine at check-out; replace it if unhealthy."
    )
    pre_ping_after: float = Field(
        5.0,
        ge=0,
        description="Skip the pre-ping when the machine was known healthy this recently "
        "(seconds; a reset or readiness probe, or a passing test). 0: always ping.",
    )
    warmup_parallelism: int = Field(4, ge=1, le=64, description="Machines created/started at once.")
    retries: int = Field(2, ge=0, le=20, description="Extra attempts for a machine that fails.")
    backoff: float = Field(
        0.5, ge=0, description="First retry delay in seconds; doubles each time, with jitter."
    )
    backoff_max: float = Field(10.0, ge=0, description="Largest retry delay in seconds.")
    ready_timeout: float = Field(
        120.0, gt=0, description="Seconds a machine may take from start to ready."
    )
    teardown_timeout: float = Field(
        60.0, ge=0, description="Seconds teardown waits for outstanding leases."
    )
    keep: bool = Field(
        False, description="Keep the pool idle after the session for the next one to adopt."
    )
    network: bool = Field(
        True, description="Give the pool a private network when the backend supports one."
    )
    warm_during_collection: bool = Field(
        False,
        description="Start making machines at the first pool test collected, while collection "
        "goes on: the first test starts sooner. A usage error found later in the collection "
        "(count too large, unknown profile) then comes after machines were made; they are "
        "destroyed before pytest exits with code 4. false: machines are made once collection "
        "is final and valid (only checks, reaping and templates overlap collection).",
    )

    @field_validator("store")
    @classmethod
    def _postgresql_uri(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.partition("://")[0]
        if scheme not in ("postgresql", "postgres"):
            # never echo the value: it may hold a password
            raise ValueError(
                "must be a PostgreSQL URI, postgresql://[user@]host[:port]/database "
                f"(got a value starting {scheme[:12]!r}); unset, the JSON file store is used"
            )
        return value


class Profile(_Strict):
    """A fully-resolved pool: pool keys plus every backend's settings."""

    name: str
    pool: PoolSettings = PoolSettings()
    sim: SimSettings = SimSettings()
    podman: PodmanSettings = PodmanSettings()
    qemu: QemuSettings = QemuSettings()
    orbstack: OrbstackSettings = OrbstackSettings()
    image: ImageSettings = ImageSettings()

    def config_hash(self, backend: str) -> str:
        """Identity of the machines this profile makes (not of sizes or policies)."""
        section = getattr(self, backend, None)
        settings = section.model_dump(mode="json") if isinstance(section, BaseModel) else None
        if settings is not None and settings.get("hosts") == []:
            del settings["hosts"]  # a pool on this machine's podman keeps the hash it had
        payload: dict[str, Any] = {"backend": backend, "settings": settings}
        if self.image.packages:  # only then: the hashes of every other pool stay as they were
            payload["image"] = self.image.model_dump(mode="json")
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class ConfigFile(_Strict):
    """The whole file: ``[pool]``, backend tables and ``[profiles.NAME]`` overrides."""

    pool: PoolSettings = PoolSettings()
    sim: SimSettings = SimSettings()
    podman: PodmanSettings = PodmanSettings()
    qemu: QemuSettings = QemuSettings()
    orbstack: OrbstackSettings = OrbstackSettings()
    image: ImageSettings = ImageSettings()
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="[profiles.NAME]: pool keys and backend tables that override the defaults.",
    )

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if not re.match(NAME_PART, name) or name == "default":
                raise ValueError(
                    f"profile name {name!r} must match {NAME_PART} and not be 'default'"
                )
        return value


DEFAULT_PROFILE = "default"
#: the tables besides [pool] that a profile may override
_BACKEND_TABLES = ("sim", "podman", "qemu", "orbstack", "image")
#: what a validation error says, in the file's terms
_ERRORS = ErrorText(PoolSettings, _BACKEND_TABLES)
#: Environment variables for pool keys: VMPOOL_<KEY>.
ENV_PREFIX = "VMPOOL_"


@dataclass
class Config:
    """The loaded configuration: one Profile per name ("default" always exists)."""

    profiles: dict[str, Profile]
    source: str = "defaults"
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)

    @property
    def default(self) -> Profile:
        return self.profiles[DEFAULT_PROFILE]

    def profile(self, name: str | None) -> Profile:
        """The named profile; an unknown name is a ConfigError with a did-you-mean."""
        key = name or DEFAULT_PROFILE
        if key not in self.profiles:
            raise ConfigError(unknown_profile_message(key, list(self.profiles)))
        return self.profiles[key]


def unknown_profile_message(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown profile {name!r}{did}; known profiles: {', '.join(sorted(known))}"


def find_config(rootdir: Path) -> Path | None:
    """``pool.toml`` in ``rootdir``, else ``pyproject.toml`` when it has ``[tool.vmpool]``."""
    candidate = rootdir / "pool.toml"
    if candidate.is_file():
        return candidate
    pyproject = rootdir / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            return None
        if isinstance(data.get("tool"), dict) and "vmpool" in data["tool"]:
            return pyproject
    return None


def read_file(path: Path) -> dict[str, Any]:
    """The raw vmpool table of ``path`` (a pool.toml, or pyproject.toml's [tool.vmpool])."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        table = tool.get("vmpool", {}) if isinstance(tool, dict) else {}
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: tool.vmpool: must be a table")
        return table
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Pool keys set through ``VMPOOL_<KEY>`` variables (unknown VMPOOL_ names are ignored)."""
    out: dict[str, str] = {}
    for key in PoolSettings.model_fields:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None and value != "":
            out[key] = value
    return out


def load(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_names: Mapping[str, str] | None = None,
) -> Config:
    """Load and validate the configuration.

    ``overrides`` are pool keys from the command line (highest precedence); ``override_names``
    maps each to the option that set it, so an error names the option. Raises ConfigError
    listing every problem.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a table")
    origins: dict[tuple[str, ...], str] = {}
    pool_raw = raw.get("pool", {})
    if isinstance(pool_raw, dict):
        pool_raw = dict(pool_raw)
        for key, value in env_overrides(env).items():
            pool_raw[key] = value
            origins[("pool", key)] = ENV_PREFIX + key.upper()
        names = override_names or {}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            pool_raw[key] = value
            origins[("pool", key)] = names.get(key, f"--{key}")
        raw = {**raw, "pool": pool_raw}

    problems: list[str] = []
    try:
        top = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_ERRORS.format(exc, source, (), origins, ConfigFile))
        raise ConfigError(problems) from None

    profiles: dict[str, Profile] = {}
    base = {k: raw.get(k, {}) for k in ("pool", *_BACKEND_TABLES)}
    profiles[DEFAULT_PROFILE] = Profile.model_validate({"name": DEFAULT_PROFILE, **base})
    for name, table in top.profiles.items():
        if not isinstance(table, dict):
            problems.append(f"{source}: profiles.{name}: must be a table")
            continue
        merged: dict[str, Any] = {"name": name}
        pool_keys = {k: v for k, v in table.items() if k not in _BACKEND_TABLES}
        # a profile's own size/policies win over the file's [pool], but options and env still win
        file_pool = dict(raw.get("pool", {}))
        merged_pool = {**file_pool, **pool_keys}
        for (table_name, key), _origin in origins.items():
            if table_name == "pool" and key in file_pool:
                merged_pool[key] = file_pool[key]
        merged["pool"] = merged_pool
        for backend in _BACKEND_TABLES:
            section = table.get(backend, {})
            base_section = raw.get(backend, {})
            if not isinstance(section, dict):
                problems.append(f"{source}: profiles.{name}.{backend}: must be a table")
                continue
            merged[backend] = {**base_section, **section}
        try:
            profiles[name] = Profile.model_validate(merged)
        except ValidationError as exc:
            problems.extend(
                _ERRORS.format(exc, source, ("profiles", name), origins, Profile, flat_pool=True)
            )
    if problems:
        raise ConfigError(problems)
    return Config(profiles=profiles, source=source, origins=origins)


def json_schema() -> dict[str, Any]:
    """The JSON schema of the file, as written to config/pool.schema.json."""
    schema = ConfigFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "vmpool pool.toml"
    return schema
