"""`medaug prepare`, `merge` and `inspect` through the CLI, on small phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medaug.io.png import read_png
from medaug.phantoms import write_phantoms
from medaug_cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, domains=["mr_prostate"], n=2, seed=3, shape=(64, 64, 8))
    return root / "mr_prostate"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The phantom prostate recipe at a coarse spacing so 64-voxel phantoms fit 64 pixels."""
    data = yaml.safe_load(Path("recipes/datasets/phantom_mr_prostate.yaml").read_text())
    data["domain"].update(spacing_mm=2.5, size=64)
    path = tmp_path_factory.mktemp("recipe") / "phantom_mr_prostate_small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_prepare_with_a_dataset_recipe_and_sources(phantoms, recipe, tmp_path):
    result = runner.invoke(app, ["prepare", str(phantoms), "--recipe", str(recipe), "--out", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["volumes_total"] == summary["volumes_done"] == 2
    assert summary["slices_per_domain"] == {"mr/prostate": summary["slices"]}
    assert "prostate_peripheral_zone" in summary["slices_per_structure"]
    again = runner.invoke(app, ["prepare", str(phantoms), "--recipe", str(recipe), "--out", str(tmp_path / "p"), "--json"])
    assert json.loads(again.output)["volumes_skipped"] == 2


def test_sharded_prepare_then_merge_then_inspect(phantoms, recipe, tmp_path):
    for index in range(2):
        result = runner.invoke(app, ["prepare", str(phantoms), "-r", str(recipe), "-o", str(tmp_path / f"s{index}"), "--shard", f"{index}/2", "--json"])
        assert result.exit_code == 0, result.output
    merged = runner.invoke(app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"), "--json"])
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.output)["volumes_total"] == 2
    montage = tmp_path / "montage.png"
    shown = runner.invoke(app, ["inspect", str(tmp_path / "m"), "--montage", str(montage), "--per-domain", "3"])
    assert shown.exit_code == 0, shown.output
    assert "mr/prostate" in shown.output
    picture = read_png(montage)
    assert picture.shape[1] == 3 * 64 and picture.shape[2] == 3
    overlay = (picture[..., 0] != picture[..., 1]) | (picture[..., 1] != picture[..., 2])
    assert overlay.sum() > 50  # coloured mask pixels drawn over the gray image


@pytest.mark.parametrize("shard", ["2/2", "x", "1/0"])
def test_bad_shard_argument(phantoms, recipe, tmp_path, shard):
    result = runner.invoke(app, ["prepare", str(phantoms), "-r", str(recipe), "-o", str(tmp_path / "p"), "--shard", shard])
    assert result.exit_code == 2
    assert "--shard" in result.output


def test_bad_recipe_is_one_line_naming_the_key(phantoms, tmp_path):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(Path("recipes/datasets/phantom_mr_prostate.yaml").read_text())
    data["unmapped"] = "drop"
    bad.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["prepare", str(phantoms), "-r", str(bad), "-o", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "unmapped" in result.output and "background, ignore, reject" in result.output
    assert not (tmp_path / "p").exists()
