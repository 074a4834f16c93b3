"""``medaug demo`` end to end with its smallest settings, run once per session as a user runs it (a fresh
``python -m medaug_cli.app demo`` process in a new working folder), and checked against the files it wrote:
the prepared index, the manifest, the PNG / NIfTI / DICOM exports (values recomputed here from the shards),
and the report's numbers under medaug's own feature backbone. Reruns reuse finished stages, redo a missing
one, and refuse other settings or a foreign folder. ``tests/test_readme.py`` runs the README's commands
in the same working folder, on this demo's output (:func:`demo_run_once`).
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS_SCALE = 0.02
SAMPLES = 12
# the smallest demo: 2% of the recipes' steps (at least 2), 12 samples, on the CPU even where a GPU exists
DEMO_ARGS = ("--steps-scale", str(STEPS_SCALE), "--device", "cpu", "--samples", str(SAMPLES))
STAGES = ["phantoms", "prepare", "train", "synthesize", "features", "evaluate", "acceptance"]
DOMAIN_SPACING_MM = {"ct/abdomen": 8.0, "mr/prostate": 2.5, "mr/brain": 3.5}  # at 64 pixels
TARGETS = ("liver", "prostate", "brain_tumor")
HU_TOLERANCE = 0.5 + 200.0 * 2.0**-11  # integer HU in the files; float16 model values (x 200 HU) in the shards


@dataclass(frozen=True)
class DemoRun:
    """The session's demo: the working folder (a stand-in for the repository root), its ``out/demo``,
    the ``--json`` output, and the wall and CPU seconds of the process."""

    workspace: Path
    out: Path
    state: dict[str, Any]
    wall_s: float
    cpu_s: float


_RUNS: dict[str, DemoRun] = {}


def medaug(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``medaug ARGS`` as a user runs it, in a fresh interpreter (``python -m medaug_cli.app``)."""
    return subprocess.run([sys.executable, "-m", "medaug_cli.app", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def demo_run_once(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """Run ``medaug demo`` (default ``--out out/demo``) in a new working folder, once per session."""
    if "run" not in _RUNS:
        workspace = tmp_path_factory.mktemp("workspace")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        finished = medaug(["demo", *DEMO_ARGS, "--json"], cwd=workspace)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-4000:]
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        _RUNS["run"] = DemoRun(workspace, workspace / "out" / "demo", json.loads(finished.stdout), wall, cpu)
    return _RUNS["run"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    return demo_run_once(tmp_path_factory)


def recipe_max_steps(name: str) -> int:
    return yaml.safe_load((REPO / "recipes" / "models" / f"{name}.yaml").read_text())["train"]["max_steps"]


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------- helpers without a run


def test_prepare_recipe_fits_each_phantom_body_at_every_size():
    from medaug_cli.demo import phantom_shape, prepare_recipe

    for size in (64, 128, 256):
        recipe = prepare_recipe(size)
        assert sorted(recipe["domains"]) == sorted(DOMAIN_SPACING_MM)
        for name, entry in recipe["domains"].items():
            assert entry["size"] == size
            assert entry["spacing_mm"] * size == pytest.approx(DOMAIN_SPACING_MM[name] * 64)  # same field of view
        assert [source["path"] for source in recipe["sources"]] == [f"phantoms/{d}" for d in
                                                                    ("ct_abdomen", "mr_prostate", "mr_brain")]
    assert phantom_shape((56, 56, 12), 256) == (224, 224, 12)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_tokenizer_overrides_keep_an_8x8_latent(size):
    from medaug_cli.demo import DemoSettings, train_overrides

    overrides = dict(item.split("=", 1) for item in train_overrides(DemoSettings(size=size, steps_scale=0.5)))
    multipliers = yaml.safe_load(overrides["tokenizer.model.channel_multipliers"])
    assert int(overrides["tokenizer.model.image_size"]) // 2 ** (len(multipliers) - 1) == 8
    # the demo's own budget (1200 tokenizer, 800 MedVAR steps: the one that clears the quality bar) times the scale
    assert int(overrides["tokenizer.train.max_steps"]) == 600
    assert int(overrides["var.train.max_steps"]) == 400
    assert float(overrides["var.sampler.power"]) == 1.0


# ---------------------------------------------------------------- the run


def test_demo_runs_every_stage_once(demo_run):
    state = demo_run.state
    assert list(state["stages"]) == STAGES
    assert all(record["status"] == "done" and not record["reused"] for record in state["stages"].values())
    assert state["settings"] == {"size": 64, "steps_scale": STEPS_SCALE, "subjects": 4, "samples": SAMPLES, "seed": 0}
    train = state["stages"]["train"]["summary"]
    assert train["tokenizer_steps"] == max(2, round(STEPS_SCALE * 1200))  # the demo's budget (medaug_cli.demo.DEMO_STEPS)
    assert train["var_steps"] == max(2, round(STEPS_SCALE * 800))
    assert state["stages"]["features"]["summary"]["steps"] == max(2, round(STEPS_SCALE * 300))
    acceptance = json.loads((demo_run.out / "acceptance.json").read_text())  # measured, judged, not necessarily passed
    assert set(acceptance["checks"]) >= {"presence/liver", "mask_dice/prostate", "fid", "kid", "near_copies"}
    assert state["stages"]["acceptance"]["summary"]["passed"] == acceptance["passed"]
    assert json.loads((demo_run.out / "demo.json").read_text())["stages"].keys() == state["stages"].keys()
    assert Path(state["paths"]["report"]) == Path("out/demo/report/report.html")


def test_prepared_dataset_holds_every_phantom_domain(demo_run):
    rows = read_table(demo_run.out / "prepared" / "index.parquet")
    summary = demo_run.state["stages"]["prepare"]["summary"]
    assert len(rows) == summary["slices"] and summary["volumes"] == 12  # 4 subjects x 3 domains
    for domain, spacing_mm in DOMAIN_SPACING_MM.items():
        mine = [row for row in rows if row["domain"] == domain]
        assert len(mine) == summary["slices_per_domain"][domain]
        assert {row["split"] for row in mine} == {"train", "val", "test"}
        assert all(row["height"] == row["width"] == 64 for row in mine)
        assert all(row["spacing_mm"] == pytest.approx([spacing_mm, spacing_mm]) for row in mine)
    for split, count in summary["slices_per_split"].items():
        assert sum(row["split"] == split for row in rows) == count


def test_manifest_is_class_balanced_and_complete(demo_run):
    rows = read_table(demo_run.out / "synthetic" / "manifest.parquet")
    state = json.loads((demo_run.out / "synthetic" / "synthesize.json").read_text())
    assert [row["sample_index"] for row in rows] == list(range(SAMPLES))
    assert all(row["synthetic"] for row in rows)
    assert {row["generator_sha256"] for row in rows} == {state["generator"]["sha256"]}
    assert {target: sum(row["target"] == target for row in rows) for target in TARGETS} == \
        {target: SAMPLES // len(TARGETS) for target in TARGETS}
    domain_of = {"liver": "ct/abdomen", "prostate": "mr/prostate", "brain_tumor": "mr/brain"}
    assert all(row["domain"] == domain_of[row["target"]] for row in rows)
    assert state["status"] == "complete" and state["samples"] == SAMPLES


def test_png_and_nifti_files_hold_the_samples(demo_run):
    import nibabel as nib

    from medaug.io.png import read_png

    folder = demo_run.out / "synthetic"
    rows = read_table(folder / "manifest.parquet")
    for row in rows:
        for name in [*row["channels"], "label"]:
            assert (folder / "png" / f"{row['sample_id']}_{name}.png").is_file()
            assert (folder / "nifti" / f"{row['sample_id']}_{name}.nii").is_file()
    row = next(row for row in rows if row["domain"] == "ct/abdomen")
    model_HW = np.load(folder / f"{row['shard']}.image.npy")[row["shard_row"], 0].astype(np.float64)
    png = read_png(folder / "png" / f"{row['sample_id']}_ct.png").astype(np.float64)
    # the files were written from float32 samples, the shard holds float16 (relative error <= 2^-11)
    np.testing.assert_allclose(png, (np.clip(model_HW, -1, 1) + 1) / 2 * 65535, atol=0.5 + 65535 * 2.0**-12)
    hu_HW = np.clip(model_HW, -1, 1) * 200.0 + 40.0  # the domain window [-160, 240] HU
    nifti = np.asarray(nib.load(folder / "nifti" / f"{row['sample_id']}_ct.nii").get_fdata())
    np.testing.assert_allclose(np.sort(nifti.ravel()), np.sort(hu_HW.ravel()), atol=HU_TOLERANCE)


def test_dicom_files_are_marked_synthetic_and_hold_hu(demo_run):
    import pydicom

    folder = demo_run.out / "synthetic"
    rows = {row["sample_id"]: row for row in read_table(folder / "manifest.parquet")}
    images = [path for path in (folder / "dicom").rglob("*.dcm") if not path.name.endswith(".seg.dcm")]
    segs = list((folder / "dicom").rglob("*.seg.dcm"))
    assert len(images) == sum(len(row["channels"]) for row in rows.values())
    assert len(segs) == sum(bool(row["structures_present"]) for row in rows.values())
    for path in images:
        dataset = pydicom.dcmread(path)
        assert str(dataset.PatientName) == "SYNTHETIC^MEDAUG" and dataset.PatientIdentityRemoved == "YES"
        assert dataset.SeriesDescription.startswith("SYNTHETIC") and dataset.BurnedInAnnotation == "NO"
        assert list(dataset.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert (dataset.Rows, dataset.Columns) == (64, 64)
        row = rows["_".join(path.name.split(".")[0].split("_")[:2])]  # syn_0000003[_t2].dcm
        if row["domain"] == "ct/abdomen":
            model_HW = np.load(folder / f"{row['shard']}.image.npy")[row["shard_row"], 0].astype(np.float64)
            hu_HW = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
            np.testing.assert_allclose(hu_HW, np.clip(model_HW, -1, 1) * 200.0 + 40.0, atol=HU_TOLERANCE)
            assert dataset.Modality == "CT"


def test_metrics_use_medaugs_own_backbone(demo_run):
    metrics = json.loads((demo_run.out / "report" / "metrics.json").read_text())
    rows = read_table(demo_run.out / "prepared" / "index.parquet")
    assert metrics["counts"] == {"real": sum(row["split"] == "test" for row in rows), "synthetic": SAMPLES}
    assert metrics["lineage"]["status"] == "ok"
    backbone = metrics["backbones"]["medaug"]
    assert backbone["status"] == "available" and Path(backbone["weights"]).name == "features"
    features = json.loads((demo_run.out / "features" / "metrics.json").read_text())
    assert backbone["evaluation"] == features["evaluation"]
    others = [name for name in metrics["backbones"] if name != "medaug"]
    assert others and all(metrics["backbones"][name]["status"] == "unavailable" for name in others)
    fid = metrics["distribution"]["medaug"]["overall"]["fid"]["value"]
    assert math.isfinite(fid) and fid >= 0
    assert demo_run.state["stages"]["evaluate"]["summary"]["medaug"]["fid"] == pytest.approx(fid)
    assert (demo_run.out / "report" / "report.html").is_file()


# ---------------------------------------------------------------- reruns


def test_rerun_reuses_every_stage_and_prints_where_things_are(demo_run):
    manifest = demo_run.out / "synthetic" / "manifest.parquet"
    written = manifest.stat().st_mtime_ns
    finished = medaug(["demo", *DEMO_ARGS], cwd=demo_run.workspace)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout.splitlines()
    table_rows = [line.split("│")[1:3] for line in lines if line.startswith("│")]
    stage_rows = [[cell.strip() for cell in row] for row in table_rows if row[0].strip() in STAGES]
    assert stage_rows == [[stage, "reused"] for stage in STAGES]
    assert any(line.startswith("report:") and line.split()[-1] == "out/demo/report/report.html" for line in lines)
    assert any(line.startswith("montage:") and line.split()[-1] == "out/demo/synthetic/montage.png" for line in lines)
    assert manifest.stat().st_mtime_ns == written  # nothing regenerated


def test_rerun_redoes_only_a_stage_whose_output_is_gone(demo_run):
    metrics = demo_run.out / "report" / "metrics.json"
    fid = json.loads(metrics.read_text())["distribution"]["medaug"]["overall"]["fid"]["value"]
    metrics.unlink()
    finished = medaug(["demo", *DEMO_ARGS, "--json"], cwd=demo_run.workspace)
    assert finished.returncode == 0, finished.stderr[-3000:]
    stages = json.loads(finished.stdout)["stages"]
    assert [stage for stage, record in stages.items() if not record["reused"]] == ["evaluate"]
    assert json.loads(metrics.read_text())["distribution"]["medaug"]["overall"]["fid"]["value"] == pytest.approx(fid)


def test_rerun_continues_an_unfinished_stage_from_its_checkpoints(demo_run):
    """A kill after training's last checkpoint leaves the stage unrecorded: the rerun resumes it (no new
    steps, same weights), and the later stages stay reused."""
    state_path = demo_run.out / "demo.json"
    state = json.loads(state_path.read_text())
    sha256 = json.loads((demo_run.out / "synthetic" / "synthesize.json").read_text())["generator"]["sha256"]
    del state["stages"]["train"]
    state_path.write_text(json.dumps(state))
    finished = medaug(["demo", *DEMO_ARGS, "--json"], cwd=demo_run.workspace)
    assert finished.returncode == 0, finished.stderr[-3000:]
    stages = json.loads(finished.stdout)["stages"]
    assert [stage for stage, record in stages.items() if not record["reused"]] == ["train"]
    assert stages["train"]["summary"]["var_steps"] == demo_run.state["stages"]["train"]["summary"]["var_steps"]
    steps = [json.loads(line)["step"] for line in (demo_run.out / "medvar" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == stages["train"]["summary"]["var_steps"]  # no step twice
    from medaug.synth.engine import SynthGenerator

    assert SynthGenerator(demo_run.out / "medvar", "cpu").sha256 == sha256  # the samples still match the weights


def test_demo_help_has_an_example():
    from typer.testing import CliRunner

    from medaug_cli.app import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "Example: medaug demo" in result.output


def test_other_settings_are_refused(demo_run):
    before = (demo_run.out / "demo.json").read_text()
    finished = medaug(["demo", "--steps-scale", "0.5", "--device", "cpu", "--samples", str(SAMPLES)],
                      cwd=demo_run.workspace)
    assert finished.returncode == 2
    assert f"--steps-scale {STEPS_SCALE}" in finished.stderr and "another --out" in finished.stderr
    assert (demo_run.out / "demo.json").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--size", "100"], "--size"),
    (["--steps-scale", "0"], "--steps-scale"),
    (["--device", "tpu"], "--device"),
], ids=["size", "steps-scale", "device"])
def test_bad_options_fail_before_any_work(tmp_path, args, message):
    finished = medaug(["demo", "--out", str(tmp_path / "demo"), *args], cwd=tmp_path)
    assert finished.returncode == 2 and message in finished.stderr
    assert not (tmp_path / "demo").exists()


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("not a demo")
    finished = medaug(["demo", "--out", str(tmp_path), *DEMO_ARGS], cwd=tmp_path)
    assert finished.returncode == 2 and "not a medaug demo folder" in finished.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.txt"]
