"""CT/MR series writer: read back with pydicom (independent of medaug's reader) and check geometry from first principles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medaug.io.dicom.write import MEDAUG_UID_ROOT, choose_rescale, write_dicom_series
from medaug.io.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SPACING_MM = (0.7, 0.8, 2.5)
ORIGIN_RAS_MM = (-112.3, 40.5, -61.25)


def _rotation_z(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])


def _affine(axes_33: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = axes_33 @ np.diag(SPACING_MM)
    affine[:3, 3] = ORIGIN_RAS_MM
    return affine


AFFINES = {
    "ras": _affine(np.eye(3)),
    "lps": _affine(np.diag([-1.0, -1.0, 1.0])),
    "oblique": _affine(_rotation_z(30.0) @ np.diag([-1.0, 1.0, -1.0])),
    "coronal": _affine(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])),
}


def _ct_volume(affine: np.ndarray, shape=(7, 5, 4)) -> Volume:
    rng = np.random.default_rng(0)
    hu_IJK = np.rint(rng.uniform(-1024, 1500, size=shape)).astype(np.float32)
    return Volume(array=hu_IJK[None], affine=affine)


def _mr_volume(affine: np.ndarray, shape=(7, 5, 4)) -> Volume:
    rng = np.random.default_rng(1)
    values_IJK = rng.uniform(-3.2, 7.9, size=shape)  # z-scored-like MR, float64
    return Volume(array=values_IJK[None], affine=affine)


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in paths]


def _rescaled_JI(dataset: pydicom.Dataset) -> np.ndarray:
    slope = float(getattr(dataset, "RescaleSlope", 1.0))
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
    return dataset.pixel_array.astype(np.float64) * slope + intercept


def _lps_position(affine: np.ndarray, ijk) -> np.ndarray:
    """Independent: voxel (i, j, k) through the RAS affine, then x and y negated."""
    ras = affine @ np.array([*ijk, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


@pytest.mark.parametrize("name", list(AFFINES), ids=list(AFFINES))
def test_ct_values_positions_orientation_spacing(tmp_path: Path, name: str) -> None:
    affine = AFFINES[name]
    volume = _ct_volume(affine)
    paths = write_dicom_series(volume, tmp_path, modality="CT", series_description="phantom")
    datasets = _read_series(paths)
    assert len(datasets) == volume.array.shape[3]
    lps = np.diag([-1.0, -1.0, 1.0])
    row_expected = lps @ affine[:3, 0] / SPACING_MM[0]
    column_expected = lps @ affine[:3, 1] / SPACING_MM[1]
    for k, dataset in enumerate(datasets):
        assert dataset.Rows == volume.array.shape[2] and dataset.Columns == volume.array.shape[1]
        np.testing.assert_array_equal(_rescaled_JI(dataset), volume.array[0, :, :, k].T)
        np.testing.assert_allclose(np.array(dataset.ImagePositionPatient, float), _lps_position(affine, (0, 0, k)), atol=1e-6)
        np.testing.assert_allclose(np.array(dataset.ImageOrientationPatient, float), np.r_[row_expected, column_expected], atol=1e-9)
        np.testing.assert_allclose(np.array(dataset.PixelSpacing, float), [SPACING_MM[1], SPACING_MM[0]])
        assert float(dataset.SliceThickness) == pytest.approx(SPACING_MM[2])
        assert dataset.InstanceNumber == k + 1
        assert dataset.RescaleType == "HU"


@pytest.mark.parametrize("name", list(AFFINES), ids=list(AFFINES))
def test_dicom_geometry_rebuilds_affine_and_places_a_marker_voxel(tmp_path: Path, name: str) -> None:
    """Rebuild the affine the way DICOM readers do (row/column cosines, PixelSpacing, IPP steps)."""
    affine = AFFINES[name]
    volume = _ct_volume(affine)
    marker_ijk = (5, 1, 2)
    volume.array[(0, *marker_ijk)] = 3000.0  # outside the random range: unique
    datasets = _read_series(write_dicom_series(volume, tmp_path, modality="CT", series_description="marker"))
    first, last = datasets[0], datasets[-1]
    cosines = np.array(first.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = cosines[:3] * column_spacing
    affine_lps[:3, 1] = cosines[3:] * row_spacing
    affine_lps[:3, 2] = (np.array(last.ImagePositionPatient, float) - np.array(first.ImagePositionPatient, float)) / (len(datasets) - 1)
    affine_lps[:3, 3] = np.array(first.ImagePositionPatient, float)
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps, affine, atol=1e-6)
    hits = [(k, *np.argwhere(d.pixel_array == 3000)[0]) for k, d in enumerate(datasets) if np.any(d.pixel_array == 3000)]
    assert hits == [(marker_ijk[2], marker_ijk[1], marker_ijk[0])]  # (slice, row = j, column = i)


def test_mr_float_values_within_half_a_rescale_step(tmp_path: Path) -> None:
    volume = _mr_volume(AFFINES["lps"])
    datasets = _read_series(write_dicom_series(volume, tmp_path, modality="MR", series_description="t2"))
    slope = float(datasets[0].RescaleSlope)
    values = volume.array[0]
    assert slope <= (values.max() - values.min()) / 60000  # uses most of the int16 range
    for k, dataset in enumerate(datasets):
        assert dataset.pixel_array.dtype == np.int16
        error = np.abs(_rescaled_JI(dataset) - values[:, :, k].T)
        assert error.max() <= slope / 2 * (1 + 1e-9)
        assert dataset.SOPClassUID == MR_IMAGE_STORAGE
        assert dataset.ScanningSequence and dataset.SequenceVariant
        assert float(dataset.SpacingBetweenSlices) == pytest.approx(SPACING_MM[2])


def test_mr_integral_values_store_without_rescale(tmp_path: Path) -> None:
    values_IJK = np.arange(7 * 5 * 2, dtype=np.int16).reshape(7, 5, 2) * 11
    volume = Volume(array=values_IJK[None], affine=AFFINES["ras"])
    datasets = _read_series(write_dicom_series(volume, tmp_path, modality="MR", series_description="t1"))
    for k, dataset in enumerate(datasets):
        assert "RescaleSlope" not in dataset  # identity; MR Image has no Modality LUT module
        np.testing.assert_array_equal(dataset.pixel_array, values_IJK[:, :, k].T)


def test_uids_unique_per_instance_shared_per_series(tmp_path: Path) -> None:
    volume = _ct_volume(AFFINES["ras"], shape=(4, 3, 5))
    study_uid = "1.2.3.4.5.6"
    paths = write_dicom_series(volume, tmp_path, modality="CT", series_description="uids", study_uid=study_uid, series_number=7)
    assert [path.name for path in paths] == [f"007_{k:04d}.dcm" for k in range(5)]
    datasets = _read_series(paths)
    instance_uids = [d.SOPInstanceUID for d in datasets]
    assert len(set(instance_uids)) == 5
    assert [d.file_meta.MediaStorageSOPInstanceUID for d in datasets] == instance_uids
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({d.data_element(keyword).value for d in datasets}) == 1
    assert {d.StudyInstanceUID for d in datasets} == {study_uid}
    for dataset in datasets:
        assert dataset.SOPClassUID == CT_IMAGE_STORAGE == dataset.file_meta.MediaStorageSOPClassUID
        assert dataset.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        for uid in (dataset.SOPInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID):
            assert uid.startswith(MEDAUG_UID_ROOT) and len(uid) <= 64 and uid.is_valid
        assert dataset.SeriesNumber == 7 and dataset.Manufacturer == "medaug"
    assert not list(tmp_path.glob(".part-*"))
    second = _read_series(write_dicom_series(volume, tmp_path / "b", modality="CT", series_description="uids"))
    assert second[0].SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert second[0].StudyInstanceUID != study_uid


def test_forced_rescale_window_patient_and_extra(tmp_path: Path) -> None:
    hu_IJK = np.array([-1024.0, -1000.0, 0.0, 40.0, 1500.0, 3071.0]).reshape(3, 2, 1)
    volume = Volume(array=hu_IJK[None], affine=AFFINES["ras"])
    paths = write_dicom_series(
        volume, tmp_path, modality="CT", series_description="forced", rescale=(0.5, -1024.0), window=(40, 400),
        patient_id="P-01", patient_name="DOE^JANE", extra={"PatientIdentityRemoved": "YES", "SeriesDescription": "SYNTHETIC x"},
    )  # fmt: skip
    dataset = pydicom.dcmread(paths[0])
    assert (float(dataset.RescaleSlope), float(dataset.RescaleIntercept)) == (0.5, -1024.0)
    np.testing.assert_array_equal(dataset.pixel_array, ((hu_IJK[:, :, 0].T + 1024) / 0.5).astype(np.int16))
    assert (float(dataset.WindowCenter), float(dataset.WindowWidth)) == (40.0, 400.0)
    assert (dataset.PatientID, str(dataset.PatientName)) == ("P-01", "DOE^JANE")
    assert dataset.PatientIdentityRemoved == "YES" and dataset.SeriesDescription == "SYNTHETIC x"


def test_forced_rescale_that_overflows_int16_is_refused(tmp_path: Path) -> None:
    volume = Volume(array=np.full((1, 2, 2, 1), 3000.0), affine=AFFINES["ras"])
    with pytest.raises(ValueError, match=r"rescale.*int16"):
        write_dicom_series(volume, tmp_path / "forced", modality="CT", series_description="x", rescale=(0.01, 0.0))


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param(np.array([-1024.0, 0.0, 3071.0]), (1.0, 0.0), id="integral-hu"),
        pytest.param(np.array([0.0, 60000.0]), (1.0, 32768.0), id="integral-beyond-int16"),
        pytest.param(np.array([5.5, 5.5]), (1.0, 5.5), id="constant"),
    ],
)
def test_choose_rescale_integral_and_constant(values: np.ndarray, expected: tuple[float, float]) -> None:
    slope, intercept = choose_rescale(values)
    assert (slope, intercept) == expected
    stored = np.rint((values - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767
    np.testing.assert_array_equal(stored * slope + intercept, values)


def test_choose_rescale_float_range_fills_int16() -> None:
    values = np.linspace(1e-3, 2345.678, 1001)
    slope, intercept = choose_rescale(values)
    stored = np.rint((values - intercept) / slope)
    assert 31000 < stored.max() <= 32767 and -32768 <= stored.min() < -31000
    assert np.abs(stored * slope + intercept - values).max() <= slope / 2 * (1 + 1e-9)
    assert len(repr(slope)) <= 18  # representable in a 16-character DS


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda v: Volume(np.concatenate([v.array, v.array]), v.affine), "2 channels", id="two-channels"),
        pytest.param(lambda v: Volume(v.array, _sheared(v.affine, 0, 1)), "i and j axes", id="ij-not-orthogonal"),
        pytest.param(lambda v: Volume(v.array, _sheared(v.affine, 2, 0)), "k axis", id="k-sheared"),
        pytest.param(lambda v: Volume(v.array, np.diag([0.7, 0.0, 2.5, 1.0])), "spacing", id="zero-spacing"),
        pytest.param(lambda v: Volume(np.where(v.array > 0, np.nan, v.array), v.affine), "NaN", id="nan"),
    ],
)
def test_refuses_volumes_dicom_cannot_hold(tmp_path: Path, change, message: str) -> None:
    volume = change(_ct_volume(AFFINES["ras"]))
    folder = tmp_path / "refused"
    with pytest.raises(ValueError, match=message) as info:
        write_dicom_series(volume, folder, modality="CT", series_description="x")
    assert str(folder) in str(info.value)
    assert not folder.exists() or not list(folder.iterdir())


def test_refuses_unknown_modality_and_extra_keyword(tmp_path: Path) -> None:
    volume = _ct_volume(AFFINES["ras"])
    with pytest.raises(ValueError, match="modality 'US'"):
        write_dicom_series(volume, tmp_path, modality="US", series_description="x")
    with pytest.raises(ValueError, match="NotAKeyword"):
        write_dicom_series(volume, tmp_path, modality="CT", series_description="x", extra={"NotAKeyword": 1})


def _sheared(affine: np.ndarray, column: int, towards: int) -> np.ndarray:
    sheared = affine.copy()
    sheared[:3, column] += 0.3 * affine[:3, towards]
    return sheared


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, modality: str) -> None:
    volume = _ct_volume(AFFINES["oblique"]) if modality == "CT" else _mr_volume(AFFINES["oblique"])
    paths = write_dicom_series(volume, tmp_path, modality=modality, series_description="validate", window=(40, 400))
    result = subprocess.run(["dciodvfy", str(paths[1])], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert f"{modality}Image" in report  # it recognised the IOD
    assert [line for line in report.splitlines() if "Error" in line] == []
    assert result.returncode == 0


def _closest_canonical(array_IJK: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute voxel axes so that they point R, A, S (nibabel's orientation algebra)."""
    import nibabel.orientations as nio

    transform = nio.io_orientation(affine)
    return nio.apply_orientation(array_IJK, transform), affine @ nio.inv_ornt_aff(transform, array_IJK.shape)


def test_round_trip_through_medaug_dicom_reader(tmp_path: Path) -> None:
    dicom = pytest.importorskip("medaug.io.dicom")
    if not hasattr(dicom, "read_dicom"):
        pytest.skip("medaug.io.dicom.read_dicom not available yet")
    volume = _mr_volume(AFFINES["oblique"])
    paths = write_dicom_series(volume, tmp_path, modality="MR", series_description="round trip")
    read = dicom.read_dicom(tmp_path)
    half_step = float(pydicom.dcmread(paths[0]).RescaleSlope) / 2
    assert read.array.shape[0] == 1
    expected_IJK, expected_affine = _closest_canonical(volume.array[0], volume.affine)
    read_IJK, read_affine = _closest_canonical(read.array[0], read.affine)  # the reader may reorder slices
    np.testing.assert_allclose(read_affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(read_IJK, expected_IJK, atol=half_step + 1e-5)
