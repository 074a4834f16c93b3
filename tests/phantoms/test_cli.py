"""`medaug phantoms` through Typer's CliRunner: files written, summary, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medaug.phantoms import DOMAINS, SPECS
from medaug_cli.app import app

runner = CliRunner()


def test_writes_one_small_phantom_per_domain_and_summarizes(tmp_path):
    result = runner.invoke(app, ["phantoms", "--out", str(tmp_path), "--size", "40x40x8", "--format", "nifti,dicom"])
    assert result.exit_code == 0, result.output
    for domain in DOMAINS:
        nifti, dicom = tmp_path / domain / "phantom_0000", tmp_path / f"{domain}_dicom" / "phantom_0000"
        for channel in SPECS[domain].channels:
            assert (nifti / f"{channel}.nii.gz").is_file()
            assert len(list((dicom / channel).glob("*.dcm"))) == 8
        assert (nifti / "label.nii.gz").is_file() and (dicom / "label.nii.gz").is_file()
        assert domain in result.output
    again = runner.invoke(
        app, ["phantoms", "--out", str(tmp_path), "--size", "40x40x8", "--format", "nifti,dicom", "--json"]
    )
    rows = json.loads(again.output)
    assert len(rows) == 2 * len(DOMAINS) and not any(row["written"] for row in rows)


def test_repeated_domain_option_and_recipe_style_names(tmp_path):
    arguments = [
        "phantoms",
        "-o",
        str(tmp_path),
        "-d",
        "mr/brain",
        "-d",
        "ct_abdomen",
        "--n",
        "2",
        "--seed",
        "3",
        "--size",
        "40x40x8",
        "--json",
    ]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(row["domain"], row["index"]) for row in rows] == [
        ("mr_brain", 0),
        ("mr_brain", 1),
        ("ct_abdomen", 0),
        ("ct_abdomen", 1),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_abdomen", "mr_brain"]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--domain", "ct_chest"], "ct_abdomen, mr_prostate, mr_brain"),
        (["--format", "nifti,png"], "nifti, dicom"),
        (["--size", "tiny"], "default, small"),
    ],
    ids=["unknown-domain", "unknown-format", "bad-size"],
)
def test_bad_names_fail_with_one_line_listing_valid_values(tmp_path, arguments, expected):
    result = runner.invoke(app, ["phantoms", "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_help_has_an_example():
    result = runner.invoke(app, ["phantoms", "--help"])
    assert result.exit_code == 0
    assert "medaug phantoms --out" in result.output
