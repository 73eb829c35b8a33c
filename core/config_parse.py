"""Typed dataclass configs from TOML tables and `--section.key value` overrides.

Hand-written (about 150 lines) rather than pydantic/omegaconf: the project's configs are flat
dataclasses of scalars, lists and Literal choices, and we want errors phrased for this CLI
("optim.lr: expected a number, got 'fast'"; "unknown key train.step, did you mean train.steps?").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import textwrap
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import tomllib

from core.errors import ConfigError


def option(help: str, default: Any = dataclasses.MISSING, *, factory=None, key: str | None = None):
    """A config field with its one-line help (and, rarely, a TOML key other than its name)."""
    meta = {"help": help, **({"key": key} if key else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def toml_key(f: dataclasses.Field) -> str:
    """The key a field has in TOML (a field may be renamed, e.g. `async_` <-> `async`)."""
    return f.metadata.get("key", f.name)


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {toml_key(f): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def did_you_mean(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f", did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "unset (omit the key)"}.get(tp, str(tp))


def coerce(value: Any, tp, where: str) -> Any:
    """Check `value` (from TOML, or a string from the command line) against type `tp`."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}{extra}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            # A TOML list (`[1, 2]`) is a list; otherwise commas outside braces separate items
            # (`a,b` is two; the brace pattern `shard-{a,b}.tar` stays one).
            parsed = _parse_cli_value(value)
            value = parsed if isinstance(parsed, list) else split_outside_braces(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if _is_intlike(value) else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):   # TOML reads nan and inf; no setting of ours means anything by them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def split_outside_braces(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item != ""]


def _is_intlike(s: str) -> bool:
    try:
        return float(s).is_integer() and ("e" in s.lower() or "." in s)
    except ValueError:
        return False


def _parse_cli_value(text: str) -> Any:
    """A command-line value as TOML would read it (`[1, 2]`, `3e-4`, `true`), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_section(cls, table: dict, section: str):
    """Make dataclass `cls` from a TOML table, naming the section in every error."""
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: expected a table of keys, got {table!r}")
    known = field_types(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}{did_you_mean(key, known)}")
        f, tp = known[key]
        kwargs[f.name] = coerce(value, tp, f"{section}.{key}")
    return cls(**kwargs)


def apply_overrides(tables: dict[str, dict], overrides: list[str], sections: dict[str, type]) -> None:
    """Fold `--section.key value` (or `--section.key=value`) pairs into the raw TOML tables."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an override like --optim.lr 3e-4, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override --{key} needs a value")
            value = overrides[i + 1]
            i += 1
        i += 1
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"override --{key}: use --section.key value (sections: {', '.join(sections)})")
        if section not in sections:
            raise ConfigError(f"unknown section {section!r} in --{key}{did_you_mean(section, sections)}")
        known = field_types(sections[section])
        if name not in known:
            raise ConfigError(f"unknown key {section}.{name}{did_you_mean(name, known)}")
        _, tp = known[name]
        # Strings stay strings for str fields; other types read the value as TOML would.
        tables.setdefault(section, {})[name] = value if tp is str else _parse_cli_value(value)


def section_to_dict(obj) -> dict:
    """A dataclass as a TOML-ready table (None values are left out: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is not None:
            out[toml_key(f)] = list(v) if isinstance(v, tuple) else v
    return out


def _short_type(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        named = [_short_type(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(named) + (" (or unset)" if type(None) in get_args(tp) else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_short_type(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _toml_value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def describe_keys(sections: dict[str, type], prefix: str = "--") -> str:
    """Every key of `sections` with its type, default and help text: the `--help` listing, read
    from the dataclasses themselves so it cannot drift from what the loader accepts."""
    lines = [f"config keys: [section] key = value in the TOML file, or {prefix}section.key value:"]
    for section, cls in sections.items():
        lines.append(f"\n  [{section}]")
        for key, (f, tp) in field_types(cls).items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {prefix}{section}.{key}  ({_short_type(tp)}, default {_toml_value(default)})")
            lines.append(textwrap.fill(f.metadata.get("help", ""), width=100, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
    return "\n".join(lines)
