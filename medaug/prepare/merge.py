"""``medaug merge``: join prepared datasets (e.g. ``prepare --shard I/N`` outputs) into one.

Inputs must share the domain table and the vocabulary; their per-volume files are linked (or copied)
into the output and the dataset files are recomputed by the same finalization ``prepare`` uses, so a
merge of shards equals an unsharded run.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

from medaug.config.base import from_dict
from medaug.config.recipes import PrepareRecipe
from medaug.errors import ConfigError, MedaugError
from medaug.prepare.pipeline import PrepareSummary, finalize

DATASET_FILES = ("index.parquet", "rejected.parquet", "domains.json", "vocab.json", "prepare.json")


def merge_prepared(inputs: list[str | Path], out: str | Path) -> PrepareSummary:
    """Merge prepared folders into ``out``; refuses inputs whose domains or vocabulary differ."""
    inputs = [Path(path) for path in inputs]
    out = Path(out)
    if not inputs:
        raise ConfigError("inputs", "no prepared folders given")
    recipe = _read_recipe(inputs[0])
    for other in inputs[1:]:
        _require_same(inputs[0], other, "domains.json")
        _require_same(inputs[0], other, "vocab.json")
    for source in inputs:
        _link_tree(source, out)
    return finalize(out, recipe)


def _read_recipe(folder: Path) -> PrepareRecipe:
    record = _read_json(folder / "prepare.json")
    return from_dict(PrepareRecipe, record["recipe"], where=f"{folder}/prepare.json:recipe")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MedaugError(path.parent, f"no {path.name}; expected a finished prepared dataset (run `medaug prepare` to the end)")
    return json.loads(path.read_text())


def _require_same(first: Path, other: Path, name: str) -> None:
    a, b = _read_json(first / name), _read_json(other / name)
    if a != b:
        what = "domains" if name == "domains.json" else "vocabulary"
        raise ConfigError(other / name, f"{what} differ from {first / name}; expected identical {what} in every merged input")


def _link_tree(source: Path, out: Path) -> None:
    """Hard-link (or copy) every per-volume file of ``source`` into ``out``."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or (len(relative.parts) == 1 and relative.name in DATASET_FILES):
            continue
        target = out / relative
        if target.exists():
            if not filecmp.cmp(path, target, shallow=False):
                raise MedaugError(path, f"differs from {target} already in the output; expected each volume in one input only")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
