"""`medaug evaluate metrics` end to end with medaug's own backbone, and the evaluation's ordering checks."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from medaug_cli.app import app
from tests.eval.conftest import light_config, write_synthetic_folder

runner = CliRunner()


def cli_args(eval_data, synthetic, out, *extra):
    return ["evaluate", "metrics", "--real", str(eval_data["real"]), "--synthetic", str(synthetic), "--out", str(out),
            "--bootstrap", "5", "--min-group-size", "5", *extra]


def test_help_has_an_example():
    result = runner.invoke(app, ["evaluate", "metrics", "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "--backbone" in result.output
    assert "metrics" in runner.invoke(app, ["evaluate", "--help"]).output


def test_cli_writes_the_report_and_prints_metrics_json(eval_data, synthetic_fresh, features_run, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, cli_args(eval_data, synthetic_fresh, out, "--backbone", f"medaug={features_run}",
                                         "--seconds-per-image", "0.5", "--json"))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "metrics.json").read_text())
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert printed["lineage"]["status"] == "ok" and printed["split"] == "test"
    assert printed["backbones"]["medaug"]["status"] == "available"
    assert {printed["backbones"][n]["status"] for n in ("inception-fid", "radimagenet-resnet50", "clip")} == {"unavailable"}
    overall = printed["distribution"]["medaug"]["overall"]
    assert overall["n_real"] == printed["counts"]["real"] and overall["n_synthetic"] == printed["counts"]["synthetic"]
    assert printed["efficiency"]["backbones"]["medaug"]["value"] == pytest.approx(overall["fid"]["value"] * math.log(1.5))
    assert printed["memorization"]["overall"]["n_flagged"] == 0
    assert printed["config"]["metrics"]["bootstrap"] == 5


def test_cli_summary_without_json(eval_data, synthetic_fresh, tmp_path):
    result = runner.invoke(app, cli_args(eval_data, synthetic_fresh, tmp_path / "report", "--bootstrap", "0"))
    assert result.exit_code == 0, result.output
    assert "unavailable" in result.output and "report.html" in result.output and "lineage: ok" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "medaug"], "expected NAME=PATH"),
    (["--backbone", "vgg=weights.pt"], "allowed values"),
    (["--split", "train"], "training groups"),
    (["--split", "holdout"], "allowed values: train, val, test"),
], ids=["malformed-backbone", "unknown-backbone", "overlap", "bad-split"])
def test_cli_refuses_bad_input(eval_data, synthetic_fresh, tmp_path, extra, message):
    result = runner.invoke(app, cli_args(eval_data, synthetic_fresh, tmp_path / "report", *extra))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_noisier_and_shifted_synthetic_sets_score_worse(eval_data, synthetic_fresh, features_run, tmp_path):
    from medaug.eval.evaluate import evaluate_metrics

    config = light_config(per_structure=False, figures=False)
    backbones = {"medaug": features_run}
    scores = {"fresh": evaluate_metrics(eval_data["real"], synthetic_fresh, backbones, tmp_path / "fresh", config=config)}
    # CMMD (sigma 10 on unit-norm embeddings) is about 10 |mean shift of the embeddings|^2; the pooled GroupNorm
    # encoder averages i.i.d. noise of sd 0.3 nearly away (shift^2 0.0003-0.0035 on six 20-step encoders), of the
    # order of its cross term with the fresh-vs-real gap of 32 test rows (|gap|^2 0.004-0.011), whose sign varies by
    # encoder: CMMD, FID and precision then each ranked the noisier set better on some encoders. At sd 1.0 (half
    # the model range) the six encoders x three noise draws gave CMMD +0.04..+0.53, FID +1.0..+7.2, precision
    # -0.04..-0.73 against the fresh set.
    for name, transform in (("noisier", lambda x, rng: x + rng.normal(0.0, 1.0, x.shape)),
                            ("shifted", lambda x, rng: x + 0.4)):
        folder = write_synthetic_folder(tmp_path / f"synthetic-{name}", [(eval_data["fresh"], None)],
                                        generator=eval_data["generator"], transform=transform)
        scores[name] = evaluate_metrics(eval_data["real"], folder, backbones, tmp_path / name, config=config)
    overall = {name: result["distribution"]["medaug"]["overall"] for name, result in scores.items()}
    for worse in ("noisier", "shifted"):
        assert overall[worse]["fid"]["value"] > overall["fresh"]["fid"]["value"], worse
        assert overall[worse]["cmmd"]["value"] > overall["fresh"]["cmmd"]["value"], worse
        assert overall[worse]["precision"]["value"] <= overall["fresh"]["precision"]["value"], worse
    liver = {name: result["fidelity"]["domains"]["ct/abdomen"]["liver"]["ct"] for name, result in scores.items()}
    assert liver["shifted"]["median_difference"] > liver["fresh"]["median_difference"] + 40  # 0.4 model units = 80 HU
