"""Issue 8: nothing of a real patient leaks into synthetic output.

A small generator is trained (a few steps: quality does not matter here) on DICOM series whose headers carry
planted identifiers; `medaug synthesize --format dicom,png,nifti` then writes CT series and DICOM SEG. No
byte of any file the synthesis writes, nor of the generator run, may contain a planted identifier, and the
DICOM files say what they are (synthetic patient, derived images, de-identified).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml

from typer.testing import CliRunner

from medaug.synth.plan import PlanRequest
from medaug.synth.run import ExportSettings, read_manifest, synthesize
from medaug_cli.app import app
from tests.pipeline import REPO, TINY_OVERRIDES
from tests.synth.test_send import SCP_AET, STORESCP, free_port, sop_uids, storescp  # noqa: F401  (fixture)

PLANTED = {
    "PatientName": "LEAKY^PLANTED",
    "PatientID": "PLANTED-ID-4711",
    "PatientBirthDate": "19230405",
    "InstitutionName": "Planted General Hospital",
    "ReferringPhysicianName": "DR^PLANTEDREF",
    "AccessionNumber": "PLANTACC99",
    "StudyID": "PLSTUDY7",
    "StudyInstanceUID": "1.2.826.0.1.3680043.10.1374.4711.4711",
}


def _plant(folder: Path) -> int:
    """Write the planted identifiers into every DICOM file under ``folder``; returns the file count."""
    files = sorted(folder.rglob("*.dcm"))
    for path in files:
        dataset = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path)
    return len(files)


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory) -> dict[str, Path]:
    from medaug.config.recipes import load_prepare_recipe
    from medaug.phantoms import write_phantoms
    from medaug.prepare.pipeline import run_prepare
    from medaug.train.tokenizer import train_tokenizer
    from medaug.train.var_task import train_var

    root = tmp_path_factory.mktemp("leak")
    write_phantoms(root / "phantoms", domains=["ct_abdomen"], n=3, seed=5, formats=("dicom",), shape=(56, 56, 10))
    assert _plant(root / "phantoms") == 30
    recipe = yaml.safe_load((REPO / "recipes/datasets/phantom_ct_abdomen_dicom.yaml").read_text())
    recipe["domain"].update(spacing_mm=8.0, size=64)
    recipe["splits"] = {"phantom_0002": "val"}
    (root / "dataset.yaml").write_text(yaml.safe_dump(recipe))
    domain = dict(recipe["domain"])
    (root / "prepare.yaml").write_text(yaml.safe_dump({
        "sources": [{"path": str(root / "phantoms" / "ct_abdomen_dicom"), "dataset": str(root / "dataset.yaml")}],
        "domains": {domain.pop("name"): domain}}))
    summary = run_prepare(load_prepare_recipe(root / "prepare.yaml"), root / "prepared")
    assert summary.volumes_rejected == 0, summary.rejected
    tokenizer = train_tokenizer(root / "prepared", REPO / "recipes/models/tiny.yaml", root / "tok",
                                overrides=[*TINY_OVERRIDES, "train.max_steps=4", "train.batch_size=4"])
    generator = train_var(root / "prepared", tokenizer["run_dir"], REPO / "recipes/models/medvar-tiny.yaml",
                          root / "gen", overrides=["train.max_steps=3", "train.batch_size=4", "samples.per_domain=0",
                                     "train.device=cpu"])
    out = root / "synthetic"
    synthesize(generator["run_dir"], out, PlanRequest(n=4, targets=("liver",), batch_size=2),
               ExportSettings(formats=("dicom", "png", "nifti")), device="cpu")
    return {"out": out, "generator": Path(generator["run_dir"]), "prepared": root / "prepared"}


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {needle.decode()}" for needle in needles if needle in data]
    return hits


def test_no_planted_identifier_reaches_any_synthetic_file_or_the_generator(leak_run):
    needles = [value.encode() for value in PLANTED.values()]
    assert _files_with(leak_run["out"], needles) == []
    assert _files_with(leak_run["generator"], needles) == []


def test_dicom_files_are_marked_synthetic_and_reference_each_other(leak_run):
    dicom_dir = leak_run["out"] / "dicom"
    images = sorted(p for p in dicom_dir.rglob("*.dcm") if not p.name.endswith(".seg.dcm"))
    segs = sorted(dicom_dir.rglob("*.seg.dcm"))
    assert len(images) == 4 and 1 <= len(segs) <= 4
    sop_of = {}
    for path in images:
        dataset = pydicom.dcmread(path)
        assert str(dataset.PatientName) == "SYNTHETIC^MEDAUG" and dataset.PatientIdentityRemoved == "YES"
        assert list(dataset.ImageType)[:2] == ["DERIVED", "SECONDARY"] and dataset.BurnedInAnnotation == "NO"
        assert dataset.SeriesDescription.startswith("SYNTHETIC") and "medaug" in dataset.DerivationDescription
        assert dataset.SOPClassUID == pydicom.uid.CTImageStorage
        assert dataset.StudyInstanceUID != PLANTED["StudyInstanceUID"]
        sop_of[dataset.SOPInstanceUID] = path
    manifest = read_manifest(leak_run["out"]).to_pylist()
    series = {pydicom.dcmread(p).SeriesInstanceUID for p in images}
    assert len(series) == len({r["batch_index"] for r in manifest})  # one series per (domain, batch)
    for path in segs:
        seg = pydicom.dcmread(path)
        assert str(seg.PatientName) == "SYNTHETIC^MEDAUG"
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert referenced in sop_of


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_synthesized_ct_and_seg_pass_dciodvfy(leak_run):
    dicom_dir = leak_run["out"] / "dicom"
    for path in [next(p for p in dicom_dir.rglob("*.dcm") if not p.name.endswith(".seg.dcm")),
                 next(dicom_dir.rglob("*.seg.dcm"))]:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


@pytest.mark.skipif(STORESCP is None, reason="dcmtk storescp not installed (apt-get install dcmtk)")
def test_synthesize_send_delivers_every_instance_to_a_storage_scp(leak_run, storescp, tmp_path):
    port, received = storescp()
    out = tmp_path / "sent"
    result = CliRunner().invoke(app, ["synthesize", "--checkpoint", str(leak_run["generator"]), "-n", "2", "--organ",
                                      "liver", "--format", "dicom", "--out", str(out), "--device", "cpu",
                                      "--send", f"127.0.0.1:{port}", "--aet", SCP_AET, "--json"])
    assert result.exit_code == 0, result.output
    written = sorted((out / "dicom").rglob("*.dcm"))
    assert sop_uids(received.iterdir()) == sop_uids(written)
    unreachable = CliRunner().invoke(app, ["synthesize", "--checkpoint", str(leak_run["generator"]), "-n", "2",
                                           "--organ", "liver", "--format", "dicom", "--out", str(out), "--resume",
                                           "--device", "cpu", "--send", f"127.0.0.1:{free_port()}", "--aet", SCP_AET])
    assert unreachable.exit_code == 2 and "127.0.0.1" in unreachable.output
    assert sorted((out / "dicom").rglob("*.dcm")) == written
