"""Typed configs from YAML: dataclasses filled from plain dicts, with errors that name the key.

``from_dict(SomeConfig, data, where="recipe.yaml")`` checks every key against the dataclass fields
(unknown keys fail and list the allowed ones), converts values to the annotated types (``int``,
``float``, ``str``, ``bool``, ``Literal``, ``Optional``, ``list``, ``tuple``, ``dict``, nested
dataclasses) and fails with the dotted key path and the expected type or allowed values. It is small on
purpose: no validation library, and configs stay plain frozen dataclasses that serialize back with
:func:`to_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medaug.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(where, f"invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(path, f"top level is {type(data).__name__}; expected a mapping of keys")
    return data


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes error paths (file and key)."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"is {_describe(data)}; expected a mapping with keys {_field_names(cls)}")
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key; allowed keys: {', '.join(fields)}")
    hints = get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = convert(hints[name], data[name], f"{where}.{name}")
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"{where}.{name}", "required key is missing")
    return cls(**values)


def convert(annotation: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to ``annotation`` or raise ConfigError naming ``where``."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin is Literal:
        return _convert_literal(annotation, value, where)
    if origin in (Union, types.UnionType):
        return _convert_union(annotation, value, where)
    if origin in (list, tuple, dict):
        return _convert_container(annotation, value, where)
    return _convert_scalar(annotation, value, where)


def _convert_literal(annotation: Any, value: Any, where: str) -> Any:
    allowed = get_args(annotation)
    if value not in allowed:
        raise ConfigError(where, f"is {value!r}; allowed values: {', '.join(map(str, allowed))}")
    return value


def _convert_union(annotation: Any, value: Any, where: str) -> Any:
    options = get_args(annotation)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(where, f"is empty; expected {_type_name(annotation)}")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return convert(option, value, where)
        except ConfigError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(where, f"is {_describe(value)}; expected {_type_name(annotation)}")


def _convert_container(annotation: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"is {_describe(value)}; expected a mapping")
        key_type, value_type = args or (Any, Any)
        return {
            convert(key_type, key, f"{where}[{key!r}]"): convert(value_type, item, f"{where}.{key}")
            for key, item in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise ConfigError(where, f"is {_describe(value)}; expected a list")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(where, f"has {len(value)} items; expected {len(args)}")
        return tuple(convert(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    item_type = args[0] if args else Any
    items = [convert(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(annotation: Any, value: Any, where: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif annotation is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        raise TypeError(f"config type {annotation!r} at {where} is not supported")
    raise ConfigError(where, f"is {_describe(value)}; expected {_type_name(annotation)}")


def recipe_data(recipe: Any, recipe_type: type, to_data: Callable[[Any], dict[str, Any]],
                resolve: Callable[[Any], Path]) -> tuple[dict[str, Any], str]:
    """(plain data, where) of a recipe given as a ``recipe_type`` instance (through ``to_data``), a dict
    (copied) or a YAML path or name (through ``resolve``); ``where`` names it in errors."""
    if isinstance(recipe, recipe_type):
        return to_data(recipe), "recipe"
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe), "recipe"
    path = resolve(recipe)
    return read_yaml(path), str(path)


def to_dict(config: Any) -> Any:
    """The plain-data form of a config (for JSON next to outputs and in checkpoints)."""
    if dataclasses.is_dataclass(config):
        return {field.name: to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(value) for value in config]
    if isinstance(config, Path):
        return str(config)
    return config


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (JSON-like), in sorted order; a key
    present on one side only counts as changed unless its value there is null (a field added since, left at
    its default: a run stored before the field existed used that default)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(key for key in set(before) | set(after)
                      if (key in before and key in after) or before.get(key, after.get(key)) is not None)
        return [changed for key in keys for changed in changed_keys(before.get(key, _ABSENT), after.get(key, _ABSENT),
                                                                    f"{prefix}{key}.")]
    before = list(before) if isinstance(before, tuple) else before
    after = list(after) if isinstance(after, tuple) else after
    return [] if before == after else [prefix.rstrip(".")]


def warn_recipe_changes(stored: str | Path, current: dict[str, Any], allowed: Sequence[str] = ()) -> list[str]:
    """On resume: log a warning naming every key of ``current`` that differs from the recipe JSON a run
    stored at its start (``allowed``: prefixes that may change, e.g. ``train.max_steps``); returns the keys."""
    path = Path(stored)
    if not path.is_file():
        return []
    changed = [key for key in changed_keys(json.loads(path.read_text()), json.loads(json.dumps(current)))
               if not any(key == a or key.startswith(f"{a}.") for a in allowed)]
    if changed:
        logging.getLogger(__name__).warning(
            "resuming %s with a recipe that differs from the one it started with in %s; the run continues with the "
            "new values", path.parent, ", ".join(changed))
    return changed


_ABSENT = object()  # a key one recipe dict has and the other lacks


def _field_names(cls: type) -> str:
    return ", ".join(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation) if arg is not type(None))
    if origin is list:
        return f"a list of {_type_name(get_args(annotation)[0])}" if get_args(annotation) else "a list"
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


__all__ = ["from_dict", "to_dict", "convert", "read_yaml", "changed_keys", "warn_recipe_changes", "ConfigError"]
