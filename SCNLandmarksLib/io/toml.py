"""TOML files: read with clear errors, written atomically (configurations, dataset specs)."""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.io.atomic import write_text_atomically


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a DataError naming it (`what` says which kind)."""
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise DataError(f"{path}: not valid TOML ({error})") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dumps_toml(values: dict[str, Any], prefix: str = "") -> str:
    """Write nested dicts as TOML tables ([a], [a.b], ...) and lists of dicts as arrays of tables
    ([[a]]); a dict whose values are all scalars or lists is written inline only as a value of
    `params` (model parameters)."""

    def is_table(key: str, value: Any) -> bool:
        return isinstance(value, dict) and key != "params"

    def is_table_array(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if not is_table(k, v) and not is_table_array(v)
    ]
    text = "\n".join(lines) + ("\n" if lines else "")
    for name, value in values.items():
        if is_table(name, value):
            text += f"\n[{prefix}{name}]\n" + dumps_toml(value, f"{prefix}{name}.")
        elif is_table_array(value):
            for table in value:
                text += f"\n[[{prefix}{name}]]\n" + dumps_toml(table, f"{prefix}{name}.")
    return text


def write_toml(path: str | os.PathLike, values: dict[str, Any], comment: str = "") -> None:
    """Write `values` as a TOML file atomically, after an optional `# comment` line."""
    write_text_atomically(path, (f"# {comment}\n" if comment else "") + dumps_toml(values))
