"""``--set dotted.key=value`` overrides of a recipe, checked against its typed config before loading.

Values are YAML (``[1, 2, 3]``, ``true``, ``3.0e-4``; a string that reads as a float, such as ``1e-4``,
which YAML 1.1 leaves a string, becomes one). A key that does not exist in the config's dataclass tree
raises :class:`ConfigError` naming the key and the allowed keys at that level.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from medaug.errors import ConfigError


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], root: type) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.key=value`` set; keys are checked against dataclass ``root``."""
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        check_override_key(parts, key, root)
        node = data
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {key}", f"{'.'.join(parts[:depth + 1])} is not a mapping in the recipe")
            node = node[part]
        node[parts[-1]] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` → ("a.b", YAML value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}", "expected key=value with a dotted key, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}", f"value {raw!r} is not valid YAML") from None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def check_override_key(parts: Sequence[str], key: str, root: type) -> None:
    """Raise ConfigError naming ``key`` unless the dotted path exists in dataclass ``root``."""
    annotation: Any = root
    for depth, part in enumerate(parts):
        annotation = _strip_optional(annotation)
        if dataclasses.is_dataclass(annotation):
            names = [item.name for item in dataclasses.fields(annotation)]
            if part not in names:
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}", f"unknown key {where!r}; allowed keys here: {', '.join(names)}")
            annotation = get_type_hints(annotation)[part]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            raise ConfigError(f"--set {key}", f"{'.'.join(parts[:depth])!r} is a value, not a mapping")


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation
