"""The text of a configuration error: each pydantic validation error as one line naming where
the value came from (file key, option or variable), what was wrong and, for a misspelt key,
the nearest known one."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

#: what each kind of pydantic error says, in the file's terms
_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_pattern_mismatch": "must match {pattern}",
    "literal_error": "must be one of {expected}",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


class ErrorText:
    """Formats validation errors of a file whose profile tables hold ``pool`` keys directly,
    beside the backend ``tables``."""

    def __init__(self, pool: type[BaseModel], tables: tuple[str, ...]) -> None:
        self.pool = pool
        self.tables = tables

    def format(
        self,
        exc: ValidationError,
        source: str,
        prefix: tuple[str, ...],
        origins: Mapping[tuple[str, ...], str],
        model: type[BaseModel],
        *,
        flat_pool: bool = False,
    ) -> list[str]:
        """One line per error of ``exc`` (raised validating ``model`` at ``prefix``)."""
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            known = None
            if flat_pool and loc[:1] == ("pool",):
                loc = loc[1:]  # profile tables hold pool keys directly
                # so a misspelt key there is near a pool key or a backend table, not a Profile field
                known = self._profile_keys()
            origin = origins.get(loc) if not prefix else None
            where = origin if origin else f"{source}: {'.'.join(prefix + loc)}"
            lines.append(f"{where}: {self._describe(err, loc, model, known)}")
        return lines

    def _profile_keys(self) -> list[str]:
        return [*self.pool.model_fields, *self.tables]

    def _describe(
        self, err: Any, loc: tuple[str, ...], model: type[BaseModel], known: list[str] | None
    ) -> str:
        kind = err["type"]
        ctx = err.get("ctx") or {}
        got = err.get("input")
        if kind == "extra_forbidden":
            if known is None:
                known = self._known_keys(model, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            return f"unknown key{did}"
        if kind == "value_error":
            # our own validators say what was wrong; the input may be a whole table
            return str(ctx.get("error", err["msg"]))
        template = _MESSAGES.get(kind)
        text = template.format(**ctx) if template else str(err["msg"])
        return f"{text}, got {got!r}" if kind != "missing" else text

    def _known_keys(self, model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
        current: Any = model
        for part in loc:
            fields = getattr(current, "model_fields", {})
            if part in fields:
                current = fields[part].annotation
            else:
                current = self.pool if part not in self.tables else None
        fields = getattr(current, "model_fields", None)
        if fields is None and loc and loc[0] == "profiles":
            return self._profile_keys()
        return list(fields or [])
