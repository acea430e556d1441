"""One section of an INI file, then command-line overrides, into a dataclass.

Both programs read their configuration this way (``[server]``, ``[admin]``,
``[client]``). Values are converted by the field's annotated type; unknown
keys, missing required keys and values that do not convert are refused with a
``ValueError`` naming the key, which each program raises as its own
``ConfigError``. No environment variable is read.
"""

from __future__ import annotations

import configparser
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def split_list(raw: str) -> list[str]:
    """``a, b c`` -> ``[a, b, c]``: commas and whitespace both separate."""
    return [part for part in raw.replace(",", " ").split() if part]


def read_section(path: Path, section: str) -> dict[str, str]:
    """The keys of ``[section]`` in ``path``; empty when the file has no such section."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {exc.start})") from exc
    except configparser.Error as exc:
        raise ValueError(f"config file {path}: {exc}") from exc
    if not parser.has_section(section):
        return {}
    return dict(parser.items(section))


def load(
    cls: type[_T], path: Path | None, section: str, overrides: Mapping[str, Any] | None = None
) -> _T:
    """``cls`` from ``[section]`` of ``path`` (if given), then the non-None ``overrides``.

    The file's strings and the overrides (already typed by the command line)
    both go through ``convert``. The result is not checked beyond its types:
    that is the dataclass's own ``check``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_section(path, section))
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"config file {path}: unknown key(s) in [{section}]: {_names(unknown)}"
            )
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown configuration key(s): {_names(unknown)}")
    missing = [
        name
        for name, field in fields.items()
        if field.init
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
        and not values.get(name)
    ]
    if missing:
        raise ValueError(f"{_names(missing)} is required (in [{section}] or on the command line)")
    return cls(**{key: convert(fields[key], value) for key, value in values.items()})


def convert(field: dataclasses.Field[Any], value: Any) -> Any:
    """A string from the INI file, or an already-typed override, as the field's type."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    try:
        if kind == "str":
            return str(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value)
        if kind == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("not finite")
            return number
        if kind == "bool":
            return _bool(value)
        if kind in ("Path", "Path | None"):
            return Path(value).expanduser()
        if kind == "list[str]":
            return split_list(value) if isinstance(value, str) else [str(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field.name}: {value!r} is not a valid {kind}") from exc
    raise TypeError(f"configuration field {field.name}: no conversion for the type {kind}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not one of {', '.join(sorted(_TRUE | _FALSE))}")


def _names(names: list[str]) -> str:
    return ", ".join(names)
