"""`medaug train tokenizer` through the CLI: a short run writes a checkpoint, metrics and the reconstruction
grid; --resume continues from the last step; bad --set keys and reused run folders fail with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medaug.io.png import read_png
from medaug.train.checkpoint import latest_checkpoint, load_checkpoint
from medaug_cli.app import app
from tests.train.conftest import write_tiny_prepared

runner = CliRunner()
SMALL = ["--set", "model.base_channels=8", "--set", "eval.max_slices=8", "--set", "eval.grid_rows=2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two MR prostate phantoms at 64² (one train, one val)."""
    return write_tiny_prepared(tmp_path_factory.mktemp("cli-data"), domains=["mr_prostate"], n=2)


def train_args(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "tokenizer", "--data", str(prepared), "--recipe", "tiny", "--out", str(out), *SMALL, *extra]


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_tokenizer_help_has_an_example():
    result = runner.invoke(app, ["train", "tokenizer", "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "--recipe" in result.output
    assert "tokenizer" in runner.invoke(app, ["train", "--help"]).output


def test_train_then_resume(prepared, tmp_path):
    run = tmp_path / "run"
    first = runner.invoke(app, train_args(prepared, run, "--max-steps", "3", "--set", "train.log_every=1", "--json"))
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert summary["step"] == 3 and summary["stopped_by"] == "max_steps"
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == run / "checkpoints" / "step_000003" and (checkpoint / "model.safetensors").is_file()
    assert (run / "reconstructions.png").is_file() and (run / "metrics.json").is_file()
    assert read_png(run / "reconstructions.png").shape[0] == 2 * (128 + 14)
    assert summary["evaluation"]["split"] == "val" and "mr/prostate/t2" in summary["evaluation"]["image"]
    assert log_steps(run) == [1, 2, 3]

    again = runner.invoke(app, train_args(prepared, run, "--max-steps", "3", "--json"))
    assert again.exit_code == 2 and "--resume" in again.output  # a run folder is never silently overwritten

    resumed = runner.invoke(app, train_args(prepared, run, "--max-steps", "5", "--set", "train.log_every=1", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert log_steps(run) == [1, 2, 3, 4, 5]  # continued from step 3, not restarted
    assert latest_checkpoint(run) == run / "checkpoints" / "step_000005"
    meta = load_checkpoint(latest_checkpoint(run), expect_kind="tokenizer").meta
    assert meta["step"] == 5 and meta["evaluation"]["split"] == "val"
    for text in ("Reconstruction on val", "Decoded masks", "checkpoint:", "step_000005"):
        assert text in resumed.output  # the summary tables


def test_bad_set_key_fails_naming_it(prepared, tmp_path):
    result = runner.invoke(app, train_args(prepared, tmp_path / "run", "--set", "model.base_chanels=8"))
    assert result.exit_code == 2
    assert "model.base_chanels" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
