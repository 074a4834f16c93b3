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


# ---------------------------------------------------------------- the transformer: train all, train var

TINY_ALL = ["--set", "tokenizer.model.base_channels=8", "--set", "tokenizer.eval.max_slices=8",
            "--set", "tokenizer.eval.grid_rows=2", "--set", "tokenizer.train.max_steps=2",
            "--set", "var.train.max_steps=3", "--set", "var.samples.per_domain=2", "--set", "var.train.log_every=1",
            "--set", "var.train.batch_size=4"]


@pytest.fixture(scope="module")
def all_run(prepared, tmp_path_factory) -> tuple[Path, dict]:
    """``medaug train all --recipe medvar-tiny`` for 2 tokenizer and 3 transformer steps: (run folder, summary)."""
    run = tmp_path_factory.mktemp("all") / "run"
    result = runner.invoke(app, ["train", "all", "--data", str(prepared), "--recipe", "medvar-tiny", "--out", str(run),
                                 *TINY_ALL, "--json"])
    assert result.exit_code == 0, result.output
    return run, json.loads(result.output)


def test_train_var_and_all_help_have_examples():
    for command in ("var", "all"):
        result = runner.invoke(app, ["train", command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output and "--recipe" in result.output, result.output


def test_train_all_writes_both_runs_checkpoints_and_samples(all_run):
    from medaug.train.token_cache import tokenizer_sha256

    run, summary = all_run
    assert summary["tokenizer"]["step"] == 2 and summary["var"]["step"] == 3
    tokenizer_checkpoint = run / "tokenizer_run" / "checkpoints" / "step_000002"
    assert Path(summary["tokenizer"]["checkpoint"]) == tokenizer_checkpoint
    assert Path(summary["var"]["checkpoint"]) == run / "checkpoints" / "step_000003"
    meta = load_checkpoint(run, expect_kind="var").meta
    assert meta["tokenizer"]["sha256"] == tokenizer_sha256(tokenizer_checkpoint) == tokenizer_sha256(run / "tokenizer")
    assert meta["domain_names"] == ["mr/prostate"]
    picture = read_png(run / "samples.png")  # one domain row: 2 samples x 2 channels (t2, adc) of 128 px
    assert picture.shape == (128 + 14, 2 * 2 * 128, 3)
    samples = json.loads((run / "samples.json").read_text())["samples"]
    assert [sample["seed"] for sample in samples] == [0, 1] and {s["domain"] for s in samples} == {"mr/prostate"}
    assert log_steps(run) == [1, 2, 3]


def test_train_var_on_a_trained_tokenizer_then_resume(all_run, prepared, tmp_path):
    run, _ = all_run
    out = tmp_path / "var"
    args = ["train", "var", "--data", str(prepared), "--recipe", "medvar-tiny", "--out", str(out),
            "--set", "train.log_every=1", "--set", "samples.per_domain=1", "--set", "train.batch_size=4"]
    first = runner.invoke(app, [*args, "--tokenizer", str(run / "tokenizer_run"), "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    for text in ("acc k0", "token cache (built)", "samples:", "checkpoint:", "step_000002"):
        assert text in first.output
    assert (out / "samples.png").is_file() and (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    resumed = runner.invoke(app, [*args, "--max-steps", "3", "--resume"])  # the run's own tokenizer copy
    assert resumed.exit_code == 0, resumed.output
    assert "token cache (reused)" in resumed.output and log_steps(out) == [1, 2, 3]
    again = runner.invoke(app, [*args, "--tokenizer", str(run / "tokenizer_run"), "--max-steps", "3"])
    assert again.exit_code == 2 and "--resume" in again.output  # a run folder is never silently overwritten


def test_train_var_and_all_refuse_bad_arguments(prepared, tmp_path):
    missing = runner.invoke(app, ["train", "var", "--data", str(prepared), "--recipe", "medvar-tiny", "--out", str(tmp_path / "a")])
    assert missing.exit_code == 2 and "--tokenizer" in missing.output
    unprefixed = runner.invoke(app, ["train", "all", "--data", str(prepared), "--recipe", "medvar-tiny",
                                     "--out", str(tmp_path / "b"), "--set", "train.max_steps=2"])
    assert unprefixed.exit_code == 2 and "tokenizer." in unprefixed.output
    assert not (tmp_path / "b").exists()
