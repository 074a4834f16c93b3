"""write_phantoms: the on-disk layout, NIfTI and DICOM round trips, idempotent resume, and the recipes that read it."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medaug.errors import ConfigError
from medaug.io import read_nifti
from medaug.phantoms import DOMAINS, SPECS, make_phantom, subject_seed, write_phantoms

SHAPE = (48, 48, 8)
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "datasets"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list]:
    """One small subject per domain, in NIfTI and DICOM."""
    out = tmp_path_factory.mktemp("phantoms")
    results: list = []
    write_phantoms(out, n=1, seed=5, formats="nifti,dicom", shape=SHAPE, on_subject=results.append)
    return out, results


def test_layout_and_manifest(written):
    out, results = written
    assert [(r.domain, r.format) for r in results] == [(d, f) for d in DOMAINS for f in ("nifti", "dicom")]
    assert all(r.written for r in results)
    for domain in DOMAINS:
        spec = SPECS[domain]
        nifti, dicom = out / domain / "phantom_0000", out / f"{domain}_dicom" / "phantom_0000"
        assert sorted(p.name for p in nifti.iterdir()) == sorted(
            [f"{c}.nii.gz" for c in spec.channels] + ["label.nii.gz", "phantom.json"]
        )
        assert sorted(p.name for p in dicom.iterdir()) == sorted([*spec.channels, "label.nii.gz", "phantom.json"])
        manifest = json.loads((nifti / "phantom.json").read_text())
        assert manifest["seed"] == subject_seed(5, domain, 0)
        assert manifest["labels"] == {str(k): v for k, v in spec.labels.items()}
    assert not [p for p in out.rglob("*") if p.name.startswith(".part-")]


@pytest.mark.parametrize("domain", DOMAINS)
def test_nifti_reads_back_equal_to_the_phantom(written, domain):
    out, _ = written
    phantom = make_phantom(domain, subject_seed(5, domain, 0), SHAPE)
    folder = out / domain / "phantom_0000"
    for index, channel in enumerate(phantom.channels):
        volume = read_nifti(folder / f"{channel}.nii.gz")
        assert volume.array.dtype == np.int16
        np.testing.assert_array_equal(volume.array[0], phantom.image.array[index])
        np.testing.assert_allclose(volume.affine, phantom.image.affine, atol=1e-5)
    label = read_nifti(folder / "label.nii.gz")
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, phantom.label.array)
    np.testing.assert_array_equal(
        read_nifti(out / f"{domain}_dicom" / "phantom_0000" / "label.nii.gz").array, phantom.label.array
    )


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(path) for path in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))


def _pixel_to_ras(ds: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    """DICOM Image Plane: LPS = IPP + column * PixelSpacing[1] * IOP[:3] + row * PixelSpacing[0] * IOP[3:].

    RAS negates x and y.
    """
    position, orientation = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
    spacing = np.array(ds.PixelSpacing, float)
    lps = position + column * spacing[1] * orientation[:3] + row * spacing[0] * orientation[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("domain", DOMAINS)
def test_dicom_series_read_with_pydicom_gives_the_phantom_values_at_the_same_ras_positions(written, domain):
    out, _ = written
    phantom = make_phantom(domain, subject_seed(5, domain, 0), SHAPE)
    inverse = np.linalg.inv(phantom.image.affine)
    for index, channel in enumerate(phantom.channels):
        series = _read_series(out / f"{domain}_dicom" / "phantom_0000" / channel)
        assert len(series) == SHAPE[2]
        for ds in series[:: SHAPE[2] // 4]:
            assert ds.pixel_array.dtype == np.int16
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # stored LPS
            values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for row, column in [(0, 0), (5, 17), (SHAPE[1] - 1, SHAPE[0] - 2), (30, 9)]:
                ras = _pixel_to_ras(ds, row, column)
                ijk = inverse[:3, :3] @ ras + inverse[:3, 3]
                np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3)  # lands on a voxel centre
                i, j, k = np.rint(ijk).astype(int)
                assert values[row, column] == phantom.image.array[index, i, j, k]


def test_dicom_ct_stored_like_a_scanner_and_marked_synthetic(written):
    out, _ = written
    ds = _read_series(out / "ct_abdomen_dicom" / "phantom_0000" / "ct")[0]
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.pixel_array.min() >= 0  # stored = HU + 1024
    assert ds.SeriesDescription.startswith("SYNTHETIC")
    assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    assert "DERIVED" in ds.ImageType and "phantom" in ds.DerivationDescription


def test_dicom_mr_channels_share_study_and_frame_of_reference(written):
    out, _ = written
    t2, adc = (_read_series(out / "mr_prostate_dicom" / "phantom_0000" / channel)[0] for channel in ("t2", "adc"))
    assert t2.Modality == adc.Modality == "MR"
    assert t2.StudyInstanceUID == adc.StudyInstanceUID
    assert t2.FrameOfReferenceUID == adc.FrameOfReferenceUID
    assert t2.SeriesInstanceUID != adc.SeriesInstanceUID
    assert t2.PatientID == adc.PatientID


def test_rerun_skips_complete_subjects_and_finishes_interrupted_ones(tmp_path):
    results: list = []
    write_phantoms(
        tmp_path, domains=["mr_prostate"], n=2, formats="nifti,dicom", shape=SHAPE, on_subject=results.append
    )
    first = tmp_path / "mr_prostate" / "phantom_0000"
    stamp = (first / "t2.nii.gz").stat().st_mtime_ns
    # Simulate a run killed mid-subject: the manifest (written last) and one channel are missing.
    second = tmp_path / "mr_prostate_dicom" / "phantom_0001"
    (second / "phantom.json").unlink()
    for path in (second / "adc").glob("*.dcm"):
        path.unlink()
    (second / "adc").rmdir()
    results.clear()
    write_phantoms(
        tmp_path, domains=["mr_prostate"], n=2, formats="nifti,dicom", shape=SHAPE, on_subject=results.append
    )
    assert [(r.format, r.index, r.written) for r in results] == [
        ("nifti", 0, False),
        ("dicom", 0, False),
        ("nifti", 1, False),
        ("dicom", 1, True),
    ]
    assert (first / "t2.nii.gz").stat().st_mtime_ns == stamp
    assert len(list((second / "adc").glob("*.dcm"))) == SHAPE[2]
    # A different request (another run seed) rewrites the subject instead of keeping stale files.
    write_phantoms(tmp_path, domains=["mr_prostate"], n=1, seed=9, shape=SHAPE)
    manifest = json.loads((first / "phantom.json").read_text())
    assert manifest["seed"] == subject_seed(9, "mr_prostate", 0)
    expected = make_phantom("mr_prostate", subject_seed(9, "mr_prostate", 0), SHAPE)
    np.testing.assert_array_equal(read_nifti(first / "label.nii.gz").array, expected.label.array)


def test_bad_arguments_name_the_valid_values(tmp_path):
    with pytest.raises(ConfigError, match="nifti, dicom"):
        write_phantoms(tmp_path, formats="nifti,png")
    with pytest.raises(ConfigError, match="ct_abdomen, mr_prostate, mr_brain"):
        write_phantoms(tmp_path, domains=["liver"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_dataset_recipes_describe_the_written_layout(written, domain, fmt):
    """Each recipe's globs find one file per channel and one label; its label table and domain match the code."""
    from medaug.config import load_dataset_recipe

    out, _ = written
    spec = SPECS[domain]
    suffix = "" if fmt == "nifti" else "_dicom"
    recipe = load_dataset_recipe(
        RECIPES / f"phantom_{domain}{suffix}.yaml"
    )  # also validates names against the vocabulary
    assert recipe.version == "medaug phantoms v1" and recipe.layout == "subjects" and recipe.unmapped == "reject"
    assert recipe.labels == spec.labels
    assert recipe.channels == list(spec.channels) and recipe.domain.name == spec.recipe_domain
    subjects = glob.glob(str(out / f"{domain}{suffix}" / recipe.subjects))
    assert len(subjects) == 1
    for pattern in [*recipe.images.values(), recipe.label]:
        assert len(glob.glob(str(Path(subjects[0]) / pattern))) == 1, pattern
