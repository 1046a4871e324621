"""The machinery behind pcrl's typed configs; the schemas themselves are dataclass trees (:mod:`pcrl.config`,
the fine-tuning and sweep configs), and everything here works on any of them.

A tree is built from dataclass defaults, then a YAML diff, then ``key.sub=value`` overrides, with exact key
and type checks that name the dotted key (unknown keys get a "did you mean"). A ``Literal[...]`` field is
coerced to the type of its values here and checked against them by :func:`check_choices`, which every
section calls first in its ``__post_init__``, so a section built in code is checked like a loaded one.
Import these names from :mod:`pcrl.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "check",
    "check_choices",
    "check_size",
    "config_hash",
    "config_to_dict",
    "flatten_config",
    "load_schema",
    "parse_overrides",
    "save_config",
    "schema_from_dict",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names the dotted key."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<key>: <message>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_size(value: Sequence[int], key: str) -> None:
    """``value`` must be three positive voxel counts (x, y, z)."""
    check(
        len(value) == 3 and all(int(v) > 0 for v in value),
        key,
        f"expected three positive voxel counts (x, y, z), got {list(value)}",
    )


def check_choices(section: Any, prefix: str) -> None:
    """Check every ``Literal[...]`` field of the dataclass ``section`` against the values its type allows.

    Args:
        section: a config section (a dataclass instance).
        prefix: the section's dotted key (``views``, ``objective.weights``), for the message.

    Raises:
        ConfigError: ``"<prefix>.<field>: must be a, b or c, got 'x'"``, with a "did you mean" for a near miss.
    """
    hints = _type_hints(type(section))
    for f in dataclasses.fields(section):
        allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        value = getattr(section, f.name)
        if not allowed or value in allowed:
            continue
        hint = ""
        if isinstance(value, str):
            by_lower = {str(a).lower(): str(a) for a in allowed}
            close = _closest(value.lower(), list(by_lower))
            hint = f". Did you mean '{by_lower[close]}'?" if close else ""
        names = [str(a) for a in allowed]
        one_of = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise ConfigError(f"{prefix}.{f.name.rstrip('_')}: must be {one_of}, got {value!r}{hint}")


_Schema = TypeVar("_Schema")


def load_schema(
    schema: type[_Schema], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> _Schema:
    """Build the dataclass tree ``schema``: its defaults, then the YAML diff at ``path``, then
    ``key.sub=value`` overrides.

    Raises:
        ConfigError: a key is unknown, a value has the wrong type or is invalid (names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    import yaml

    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            # ValueError: an integer too long for Python to convert; RecursionError: nesting too deep.
            raise ConfigError(f"{p}: not valid YAML: {str(e)[:300] or type(e).__name__}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded
    tree = _deep_update(tree, parse_overrides(overrides))
    try:
        return _merge_into(schema, _from_yaml_keys(tree), "")  # type: ignore[no-any-return]
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{e} (in {path} or the overrides)") from None
        raise


def schema_from_dict(schema: type[_Schema], data: dict[str, Any]) -> _Schema:
    """Rebuild a tree of ``schema`` from :func:`config_to_dict` output, with the same checks."""
    return _merge_into(schema, _from_yaml_keys(data), "")  # type: ignore[no-any-return]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe nested dict of a config tree (tuples as lists, ``global_`` spelled ``global``)."""
    return _to_yaml_keys(dataclasses.asdict(cfg))  # type: ignore[no-any-return]


def flatten_config(cfg: Any) -> dict[str, Any]:
    """Dotted keys to plain values, e.g. ``{"objective.weights.global": 1.0}`` (MLflow params, Ray Tune)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", config_to_dict(cfg))
    return out


def config_hash(cfg: Any) -> str:
    """A short stable hash of the resolved config (recorded with checkpoints and exports)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary name, then rename)."""
    import yaml

    from pcrl.io import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists, except
    that a string field given an unquoted number, boolean, date or null keeps the text as written."""
    import yaml

    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            # Kept as text: the field's type then says what is wrong with it, naming the key.
            value = raw
        if not isinstance(value, str | list | dict):
            value = _OverrideScalar(raw.strip(), value)
        _set_dotted(tree, key, value)
    return tree


# --- typed merging ---------------------------------------------------------------------------------

# YAML spells the siamese weight ``global`` (a Python keyword, so the field is ``global_``).
_ALIASES = {"global": "global_"}


def _to_yaml_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        inv = {v: k for k, v in _ALIASES.items()}
        return {inv.get(k, k): _to_yaml_keys(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_yaml_keys(v) for v in obj]
    return obj


def _from_yaml_keys(obj: Any, where: str = "") -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where or '<root>'}: keys must be strings, got {k!r}")
            key = _ALIASES.get(k, k) if where.endswith("weights") else k
            out[key] = _from_yaml_keys(v, f"{where}.{k}" if where else k)
        return out
    return obj


def _merge_into(dc_type: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``dc_type`` from ``data`` with exact key and type checks (names the dotted key)."""
    fields = {f.name: f for f in dataclasses.fields(dc_type)}
    hints = _type_hints(dc_type)
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        dotted = f"{where}.{k.rstrip('_')}" if where else k.rstrip("_")
        if k not in fields:
            close = _closest(k, [n.rstrip("_") for n in fields])
            hint = f" Did you mean '{close}'?" if close else ""
            known = ", ".join(n.rstrip("_") for n in fields)
            raise ConfigError(f"{dotted}: unknown key.{hint} Known keys here: {known}")
        kwargs[k] = _coerce(v, hints[k], dotted)
    try:
        return dc_type(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(f"{where or '<root>'}: {e}") from e


@functools.cache
def _type_hints(dc_type: type) -> dict[str, Any]:
    return typing.get_type_hints(dc_type)


@dataclass(frozen=True)
class _OverrideScalar:
    """A command-line value that YAML read as a number, a boolean, a date or null: a string field takes the
    text as written (``run.name=28683_00000`` stays that, not the integer 2868300000; ``data.shards=0123``
    is not octal 83), every other field the value YAML read."""

    text: str
    value: Any

    def for_type(self, tp: Any) -> Any:
        if tp is str:
            return "" if self.value is None else self.text
        return self.value


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value can be a 5,000-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        # Coerced to the type of its values here; which values are allowed, check_choices checks.
        tp, origin, args = type(args[0]), None, ()
    if isinstance(value, _OverrideScalar):
        value = value.for_type(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
        return _merge_into(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is dict:
        # Free-form string keys (a sweep's search space is keyed by dotted config keys).
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_inline_list(value, key)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({list(value)})")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _parse_inline_list(text: str, key: str) -> list[Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{key}: cannot parse {text[:100]!r} as a list: {str(e)[:300]}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list like [1, 2], got {text!r}")
    return value


def _closest(name: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return m[0] if m else None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base
