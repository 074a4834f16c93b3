"""The typed config loader: conversion, and errors that name the key and the allowed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from medaug.config.base import changed_keys, from_dict, read_yaml, to_dict, warn_recipe_changes
from medaug.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    low: float
    high: float = 1.0


@dataclass(frozen=True)
class Outer:
    name: str
    mode: Literal["fast", "exact"] = "fast"
    sizes: list[int] = field(default_factory=list)
    pair: tuple[float, float] | None = None
    table: dict[int, str] = field(default_factory=dict)
    inner: Inner | None = None


def test_converts_nested_values():
    config = from_dict(
        Outer,
        {"name": "a", "mode": "exact", "sizes": [1, 2], "pair": [0, 2.5], "table": {"3": "x"}, "inner": {"low": 2}},
        "r.yaml",
    )
    assert config == Outer(name="a", mode="exact", sizes=[1, 2], pair=(0.0, 2.5), table={3: "x"}, inner=Inner(2.0))
    assert to_dict(config)["inner"] == {"low": 2.0, "high": 1.0}


@pytest.mark.parametrize(
    "data, where, fragment",
    [
        ({"name": "a", "colour": 1}, "r.yaml.colour", "unknown key; allowed keys: name, mode, sizes"),
        ({"name": "a", "mode": "slow"}, "r.yaml.mode", "allowed values: fast, exact"),
        ({"name": "a", "sizes": [1, "x"]}, "r.yaml.sizes[1]", "expected int"),
        ({"name": "a", "pair": [1]}, "r.yaml.pair", "expected 2"),
        ({"mode": "fast"}, "r.yaml.name", "required key is missing"),
        ({"name": "a", "inner": {"lo": 1}}, "r.yaml.inner.lo", "unknown key"),
        ({"name": "a", "table": {"one": "x"}}, "r.yaml.table['one']", "expected int"),
    ],
    ids=["unknown-key", "bad-literal", "bad-list-item", "tuple-length", "missing", "nested-unknown", "dict-key"],
)
def test_errors_name_the_key(data, where, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data, "r.yaml")
    assert info.value.where == where
    assert fragment in info.value.reason
    assert "\n" not in str(info.value)


def test_read_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(listing)
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_overrides_set_nested_keys_and_name_unknown_ones():
    from medaug.config.overrides import apply_overrides

    data = apply_overrides({"name": "a", "inner": {"low": 1.0}}, ["inner.high=2", "sizes=[1, 2]", "pair=[1e-4, 2]"], Outer)
    assert from_dict(Outer, data, "r") == Outer(name="a", sizes=[1, 2], pair=(1e-4, 2.0), inner=Inner(1.0, 2.0))
    with pytest.raises(ConfigError, match="unknown key 'inner.mid'; allowed keys here: low, high"):
        apply_overrides({"name": "a"}, ["inner.mid=3"], Outer)
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({"name": "a"}, ["inner"], Outer)


def test_a_loaded_tokenizer_recipe_loads_again():
    from medaug.train.tokenizer import load_tokenizer_recipe

    recipe = load_tokenizer_recipe("tiny")
    assert load_tokenizer_recipe(recipe, ["train.max_steps=7"]).train.max_steps == 7


def test_changed_keys_name_every_difference_and_warn_on_resume(tmp_path, caplog):
    import json
    import logging

    before = {"train": {"max_steps": 10, "seed": 0}, "sampler": {"by": "natural", "power": 1.0}, "tags": [1, 2]}
    after = {"train": {"max_steps": 20, "seed": 0}, "sampler": {"by": "structure", "power": 1.0}, "tags": (1, 2),
             "conditioning": {"min_pixels": 8}}
    assert changed_keys(before, after) == ["conditioning", "sampler.by", "train.max_steps"]
    assert changed_keys(after, after) == []
    # a field added since (null: its default) is no change for a run stored before it existed; a set one is
    assert changed_keys({**before, "model": {"depth": 2}}, {**before, "model": {"depth": 2, "null_keeps_domain": None}}) == []
    assert changed_keys({**before, "model": {}}, {**before, "model": {"null_keeps_domain": True}}) == ["model.null_keeps_domain"]
    stored = tmp_path / "recipe.json"
    stored.write_text(json.dumps(before))
    with caplog.at_level(logging.WARNING):
        assert warn_recipe_changes(stored, after, ["train.max_steps"]) == ["conditioning", "sampler.by"]
    assert "conditioning, sampler.by" in caplog.text and "max_steps" not in caplog.text
    assert warn_recipe_changes(tmp_path / "absent.json", after) == []
