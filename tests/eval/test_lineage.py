"""The lineage guard: real evaluation rows must not hold the generator's training patients."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from medaug.data.index import read_index
from medaug.eval.lineage import LineageError, check_lineage, read_generator_record
from tests.eval.conftest import write_synthetic_folder


def groups_of(prepared, split):
    index = read_index(prepared / "index.parquet", columns=["split", "patient_group"]).to_pandas()
    return set(index.loc[index["split"] == split, "patient_group"])


def test_disjoint_test_split_passes(eval_data, synthetic_fresh):
    report = check_lineage(eval_data["real"], synthetic_fresh, "test")
    assert report.status == "ok" and report.overlapping_groups == []
    assert report.evaluated_groups == len(groups_of(eval_data["real"], "test")) == 3
    assert report.training_data["train_groups"] == len(groups_of(eval_data["real"], "train"))
    assert report.training_data["prepared"] == str(eval_data["real"].resolve())
    assert "checkpoints/step_000001" in report.generator


def test_overlap_with_training_groups_is_refused(eval_data, synthetic_fresh):
    expected = sorted(groups_of(eval_data["real"], "train"))
    with pytest.raises(LineageError, match=f"{len(expected)} of {len(expected)} patient groups"):
        check_lineage(eval_data["real"], synthetic_fresh, "train")
    with pytest.raises(LineageError, match="training groups"):
        check_lineage(eval_data["real"], synthetic_fresh, None)  # every row: the train rows are among them


def test_allowed_overlap_is_flagged(eval_data, synthetic_fresh, caplog):
    with caplog.at_level(logging.ERROR, logger="medaug.eval.lineage"):
        report = check_lineage(eval_data["real"], synthetic_fresh, "train", allow_overlap=True)
    assert report.status == "overlap"
    assert report.overlapping_groups == sorted(groups_of(eval_data["real"], "train"))
    assert report.message.startswith("OVERLAP ALLOWED") and "OVERLAP ALLOWED" in caplog.text


def test_evaluation_refuses_overlap_before_writing_anything(eval_data, synthetic_fresh, tmp_path):
    from medaug.eval.evaluate import evaluate_metrics

    with pytest.raises(LineageError):
        evaluate_metrics(eval_data["real"], synthetic_fresh, {}, tmp_path / "report", split="train")
    assert not (tmp_path / "report").exists()


def test_missing_generator_record_warns(eval_data, tmp_path, caplog):
    synthetic = write_synthetic_folder(tmp_path / "synthetic", [(eval_data["fresh"], None)], generator=None)
    assert read_generator_record(synthetic) is None
    with caplog.at_level(logging.WARNING, logger="medaug.eval.lineage"):
        report = check_lineage(eval_data["real"], synthetic, "train")  # nothing to check it against: no error
    assert report.status == "unknown" and "names no generator" in caplog.text


def test_unreadable_generator_warns(eval_data, synthetic_fresh, tmp_path, caplog):
    synthetic = tmp_path / "synthetic"
    shutil.copytree(synthetic_fresh, synthetic)
    record = json.loads((synthetic / "synthesize.json").read_text())
    record["generator"] = {"run": str(tmp_path / "gone"), "sha256": "ab"}
    (synthetic / "synthesize.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="medaug.eval.lineage"):
        report = check_lineage(eval_data["real"], synthetic, "test")
    assert report.status == "unknown" and report.generator == str(tmp_path / "gone")
    assert "not checked" in report.message and "gone" in caplog.text


@pytest.mark.parametrize("entry, expected", [
    ("runs/var", "runs/var"),
    ({"run": "runs/var", "checkpoint": "runs/var/checkpoints/step_000010", "sha256": "ab"},
     "runs/var/checkpoints/step_000010"),
    ({"run": "runs/var", "sha256": "ab"}, "runs/var"),
    ({"path": "runs/var"}, "runs/var"),
], ids=["string", "checkpoint", "run", "path"])
def test_generator_record_forms(tmp_path, entry, expected):
    (tmp_path / "synthesize.json").write_text(json.dumps({"generator": entry}))
    assert read_generator_record(tmp_path)["path"] == expected
