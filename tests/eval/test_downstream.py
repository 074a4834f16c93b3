"""``medaug evaluate downstream`` on the tiny pipeline: the whole grid, its report, determinism per seed, group
subsets, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from medaug.errors import ConfigError
from medaug.eval.downstream import (
    DownstreamConfig,
    RunSpec,
    evaluate_downstream,
    fraction_rows,
    open_data,
    subset_groups,
    train_set,
)
from medaug.eval.lineage import LineageError
from medaug.eval.report import format_number
from medaug_cli.app import app
from tests.pipeline import write_tiny_prepared

runner = CliRunner()
TINY = {"structures": ("prostate",), "steps": 12, "seeds": 2, "fractions": (0.5, 1.0), "ratios": (0.5,),
        "batch_size": 4, "eval_every": 6, "device": "cpu", "unet_channels": (8, 16)}
CELLS = {("real", 0.5, None), ("real", 1.0, None), ("real+synthetic", 0.5, 0.5), ("real+synthetic", 1.0, 0.5),
         ("synthetic", None, None)}


def prostate_rows(root, name: str, split: str | None = None) -> list[dict]:
    rows = pq.read_table(root / name).to_pylist()
    return [row for row in rows if row["domain"] == "mr/prostate" and (split is None or row["split"] == split)]


@pytest.fixture(scope="module")
def downstream(tiny_prepared, tiny_synthesis, tmp_path_factory):
    """The grid of ``TINY`` on the tiny phantoms and the tiny generator's samples: (result, report folder)."""
    out = tmp_path_factory.mktemp("downstream") / "report"
    return evaluate_downstream(tiny_prepared, tiny_synthesis["out"], DownstreamConfig(**TINY), out), out


def test_every_cell_and_seed_is_trained_and_scored(downstream, tiny_prepared, tiny_synthesis):
    result, _ = downstream
    runs = result["runs"]
    assert {(r["arm"], r["fraction"], r["ratio"], r["seed"]) for r in runs} == {(*c, s) for c in CELLS for s in (0, 1)}
    assert len(runs) == 10 and result["lineage"]["status"] == "ok" and result["domains"] == ["mr/prostate"]
    for run in runs:
        assert 0.0 <= run["dice"] <= 1.0 and run["dice"] == run["structures"]["prostate"]["dice"]
        assert run["hd95_mm"] is None or math.isfinite(run["hd95_mm"]) and run["hd95_mm"] >= 0.0
        assert [p["step"] for p in run["curve"]] == [6, 12] and all(0.0 <= p["val_dice"] <= 1.0 for p in run["curve"])
    n_real = len(prostate_rows(tiny_prepared, "index.parquet", "train"))
    n_synthetic = len(prostate_rows(tiny_synthesis["out"], "manifest.parquet"))
    counts = {(r["arm"], r["n_train_real"], r["n_train_synthetic"]) for r in runs}
    assert counts == {("real", n_real, 0), ("real+synthetic", n_real, n_real), ("synthetic", 0, n_synthetic)}
    assert result["counts"]["real_test"] == len(prostate_rows(tiny_prepared, "index.parquet", "test"))


def test_cells_are_mean_and_sample_sd_over_seeds(downstream):
    result, _ = downstream
    assert {(c["arm"], c["fraction"], c["ratio"]) for c in result["cells"]} == CELLS
    for cell in result["cells"]:
        members = [r for r in result["runs"] if (r["arm"], r["fraction"], r["ratio"]) == (cell["arm"], cell["fraction"], cell["ratio"])]
        dice = [r["dice"] for r in members]
        assert cell["n_seeds"] == 2 and cell["dice"]["mean"] == pytest.approx(np.mean(dice))
        assert cell["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
        assert cell["structures"]["prostate"]["dice"] == cell["dice"]  # one structure: its numbers are the cell's
        hd95 = [r["hd95_mm"] for r in members if r["hd95_mm"] is not None]
        assert cell["hd95_mm"]["n"] == len(hd95) and (not hd95 or cell["hd95_mm"]["mean"] == pytest.approx(np.mean(hd95)))
    fidelity = result["mask_fidelity"]
    assert fidelity["model"] == {"arm": "real", "fraction": 1.0, "seed": 0}
    entry = fidelity["structures"]["prostate"]
    for key, count in (("synthetic_dice", "n_synthetic"), ("real_test_dice", "n_real"), ("shuffled_real_dice", "n_shuffled")):
        # a set without a slice holding the structure (the tiny generator may draw none) has no Dice
        assert (entry[key] is None) == (entry[count] == 0) and (entry[key] is None or 0.0 <= entry[key] <= 1.0), key
    assert entry["n_real"] > 0
    real_seed_0 = next(r for r in result["runs"] if (r["arm"], r["fraction"], r["seed"]) == ("real", 1.0, 0))
    assert entry["real_test_dice"] == pytest.approx(real_seed_0["dice"])  # the same model on the same test split


def test_report_files_hold_the_json_numbers(downstream):
    result, out = downstream
    assert json.loads((out / "downstream.json").read_text()) == result
    assert (out / "learning_curves.png").stat().st_size > 1000
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    numbers = [cell[metric][key] for cell in result["cells"] for metric in ("dice", "hd95_mm") for key in ("mean", "sd")]
    numbers += list(result["mask_fidelity"]["structures"]["prostate"].values())
    for number in numbers:
        if number is not None:
            assert format_number(number) in markdown and format_number(number) in page, number
    assert "learning_curves.png" in markdown and "data:image/png;base64," in page
    assert "not evidence that synthetic data helps" in markdown


def test_same_seed_same_numbers_other_seed_other_numbers(downstream, tiny_prepared, tiny_synthesis):
    result, _ = downstream
    again = evaluate_downstream(tiny_prepared, tiny_synthesis["out"], DownstreamConfig(**{**TINY, "seeds": 1,
                                                                                            "fractions": (1.0,)}))
    first = {(r["arm"], r["fraction"], r["ratio"], r["seed"]): r for r in result["runs"]}
    assert len(again["runs"]) == 3
    for run in again["runs"]:
        earlier = first[(run["arm"], run["fraction"], run["ratio"], run["seed"])]
        for key in ("dice", "hd95_mm", "structures", "curve", "n_train_real", "n_train_synthetic"):
            assert run[key] == earlier[key], (run["arm"], key)
    assert again["mask_fidelity"] == result["mask_fidelity"]
    for (arm, fraction, ratio, seed), run in first.items():
        if seed == 0:
            other = first[(arm, fraction, ratio, 1)]
            assert run["curve"] != other["curve"] and run["structures"] != other["structures"], arm


# ---------------------------------------------------------------------------------------------- patient groups


@pytest.fixture(scope="module")
def many_groups(tmp_path_factory):
    """Seven MR prostate phantoms at 64²: five train patient groups, one val, one test."""
    return write_tiny_prepared(tmp_path_factory.mktemp("groups"), domains=["mr_prostate"], n=7)


def test_fractions_take_whole_groups_and_grow_with_the_fraction(many_groups, tiny_synthesis):
    data = open_data(many_groups, tiny_synthesis["out"], ["prostate"], ["mr/prostate"])
    train_rows = prostate_rows(many_groups, "index.parquet", "train")
    by_id = {row["slice_id"]: row["patient_group"] for row in train_rows}
    assert data.train_groups_N.tolist() == [by_id[i] for i in data.train.base.rows.column("slice_id").to_pylist()]
    groups = sorted(set(by_id.values()))
    assert len(groups) == 5
    picks = {}
    for seed in range(4):
        previous: set[str] = set()
        for fraction in (0.1, 0.25, 0.5, 1.0):
            chosen = set(subset_groups(data.train_groups_N.tolist(), fraction, seed))
            assert len(chosen) == math.ceil(fraction * 5) and previous <= chosen and chosen <= set(groups)
            rows = fraction_rows(data.train_groups_N, fraction, seed)
            assert len(rows) == sum(row["patient_group"] in chosen for row in train_rows)  # every slice of a group
            assert set(data.train_groups_N[rows].tolist()) == chosen
            dataset, counts = train_set(data, RunSpec("real", fraction, None, seed))
            assert (len(dataset), counts["n_train_real"], counts["train_groups"]) == (len(rows), len(rows), len(chosen))
            assert subset_groups(data.train_groups_N.tolist(), fraction, seed) == sorted(chosen)  # deterministic
            previous = chosen
        picks[seed] = tuple(sorted(subset_groups(groups, 0.25, seed)))
    assert len(set(picks.values())) > 1  # the seed draws other patients


# ---------------------------------------------------------------------------------------------- bad input


def test_config_refuses_bad_values():
    for changes, field in (({"fractions": (0.0, 1.0)}, "fractions"), ({"ratios": (1.0,)}, "ratios"),
                           ({"arms": ("real", "mixed")}, "arms"), ({"steps": 0}, "steps"), ({"structures": ()}, "structures")):
        with pytest.raises(ConfigError, match=field):
            DownstreamConfig(**{**TINY, **changes})


def test_missing_folders_unknown_structures_and_empty_test_split(tiny_prepared, tiny_synthesis, tmp_path):
    config = DownstreamConfig(**TINY)
    with pytest.raises(ConfigError, match="no index.parquet"):
        evaluate_downstream(tmp_path / "absent", tiny_synthesis["out"], config)
    with pytest.raises(ConfigError, match="no manifest.parquet"):
        evaluate_downstream(tiny_prepared, tmp_path, config)
    for name, problem in (("pancreas", "no domain of"), ("prostat", "is not a vocabulary name")):
        with pytest.raises(ConfigError, match=problem) as caught:
            evaluate_downstream(tiny_prepared, tiny_synthesis["out"], DownstreamConfig(**{**TINY, "structures": (name,)}))
        assert "valid names: " in str(caught.value) and ", prostate," in str(caught.value) and "\n" not in str(caught.value)
    no_test = tmp_path / "no-test"
    shutil.copytree(tiny_prepared, no_test)
    index = pq.read_table(no_test / "index.parquet")
    splits = ["val" if split == "test" else split for split in index.column("split").to_pylist()]
    pq.write_table(index.set_column(index.schema.get_field_index("split"), "split", [splits]), no_test / "index.parquet")
    with pytest.raises(ConfigError, match="split 'test'.*has no slices"):
        evaluate_downstream(no_test, tiny_synthesis["out"], config)


def test_refuses_test_patients_the_generator_was_trained_on(tiny_prepared, tiny_synthesis, tmp_path):
    import torch

    from medaug.train.checkpoint import CHECKPOINTS_DIR, save_checkpoint

    groups = sorted(set(pq.read_table(tiny_prepared / "index.parquet").column("patient_group").to_pylist()))
    generator = tmp_path / "generator"
    save_checkpoint(generator / CHECKPOINTS_DIR, 1, "var", {"model": {"weight": torch.zeros(2, 2)}},
                    metadata={"data": {"train_groups": groups}})
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    shutil.copy2(tiny_synthesis["out"] / "manifest.parquet", synthetic / "manifest.parquet")
    (synthetic / "synthesize.json").write_text(json.dumps({"status": "complete", "generator": {"run": str(generator)}}))
    with pytest.raises(LineageError, match="training groups"):
        evaluate_downstream(tiny_prepared, synthetic, DownstreamConfig(**TINY))


def test_cli_bad_structure_is_one_red_line_and_exit_2(tiny_prepared, tiny_synthesis):
    result = runner.invoke(app, ["evaluate", "downstream", "--real", str(tiny_prepared), "--synthetic",
                                 str(tiny_synthesis["out"]), "--structure", "pancreas", "--steps", "2"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "error: structure: 'pancreas': no domain of" in message and "valid names:" in message
    result = runner.invoke(app, ["evaluate", "downstream", "--real", str(tiny_prepared), "--synthetic",
                                 str(tiny_synthesis["out"]), "--structure", "prostate", "--fractions", "0.5,x"])
    assert result.exit_code == 2 and "expected comma-separated numbers" in " ".join(result.output.split())


def test_cli_json_equals_the_written_report(tiny_prepared, tiny_synthesis, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "downstream", "--real", str(tiny_prepared), "--synthetic",
                                 str(tiny_synthesis["out"]), "--structure", "prostate", "--steps", "3", "--seeds", "1",
                                 "--fractions", "1", "--arms", "real", "--batch-size", "4", "--device", "cpu",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "downstream.json").read_text())
    assert [(r["arm"], r["fraction"], r["seed"]) for r in printed["runs"]] == [("real", 1.0, 0)]
    assert printed["config"]["steps"] == 3 and printed["config"]["arms"] == ["real"]


def test_cli_summary_table(tiny_prepared, tiny_synthesis):
    result = runner.invoke(app, ["evaluate", "downstream", "--real", str(tiny_prepared), "--synthetic",
                                 str(tiny_synthesis["out"]), "--structure", "prostate", "--steps", "2", "--seeds", "1",
                                 "--fractions", "1", "--arms", "synthetic", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "lineage: ok" in result.output and "Mask fidelity" in result.output and "synthetic" in result.output
