"""config/pool.schema.json is generated; it must match the models."""

from __future__ import annotations

import json
from pathlib import Path

from vmpool.config import json_schema

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "pool.schema.json"


def test_pool_schema_json_is_up_to_date() -> None:
    expected = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    actual = SCHEMA.read_text() if SCHEMA.is_file() else "<missing>"
    assert actual == expected, (
        f"{SCHEMA} is out of date with vmpool/config.py; regenerate it with:\n"
        "    vmpool config schema > config/pool.schema.json"
    )
