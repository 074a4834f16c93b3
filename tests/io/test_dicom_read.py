"""DICOM reading: series geometry, rescale, grouping, enhanced multi-frame, mosaic, SEG, bad input.

Small series are written here with pydicom from known arrays and known LPS geometry (shuffled file
names and InstanceNumbers), so every check compares against the formula DICOM defines:
``world_LPS = IPP + i * PixelSpacing[1] * IOP[0:3] + j * PixelSpacing[0] * IOP[3:6]`` for column i, row j,
and RAS = LPS with x and y negated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medaug.errors import DicomSeriesError, ImageReadError, LabelError
from medaug.io import read_volume
from medaug.io.dicom import read_dicom, read_dicom_seg, read_dicom_series_all, scan_dicom_folder
from medaug.io.dicom.read import parse_csa2, spacing_tolerance_mm
from medaug.io.volume import LPS_TO_RAS, Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def _oblique() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Axial rotated 30° about z, then tilted 20° about the rotated row axis: unit, orthogonal."""
    a, b = math.radians(30), math.radians(20)
    row = np.array([math.cos(a), math.sin(a), 0.0])
    col = np.array([-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b)])
    return tuple(row), tuple(col)


# ------------------------------------------------------------------------------------------- builders


def make_slice(
    stored_ij: np.ndarray,
    position: np.ndarray,
    orientation: tuple[tuple[float, ...], tuple[float, ...]],
    spacing_ij: tuple[float, float],
    series_uid: str,
    **attributes,
) -> Dataset:
    """One CT image whose pixel (row j, column i) holds ``stored_ij[i, j]`` (int16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Manufacturer = "medaug-test"
    ds.PatientPosition = "HFS"
    ds.PatientName = "TEST^MEDAUG"
    ds.PatientID = "test-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.StudyInstanceUID = attributes.pop("study_uid", "1.2.3.4")
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = attributes.pop("frame_uid", "1.2.3.4.5")
    ds.SeriesDescription = attributes.pop("description", "test series")
    ds.ImageType = attributes.pop("image_type", ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*orientation[0], *orientation[1])]
    ds.PixelSpacing = [spacing_ij[1], spacing_ij[0]]  # (between rows, between columns)
    ds.SliceThickness = attributes.pop("thickness", 2.5)
    ds.RescaleSlope = attributes.pop("slope", 1)
    ds.RescaleIntercept = attributes.pop("intercept", -1024)
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    pixels_rc = np.ascontiguousarray(stored_ij.T.astype(np.int16))  # (rows=J, cols=I)
    ds.Rows, ds.Columns = pixels_rc.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels_rc.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write_series(
    folder: Path,
    hu_ijk: np.ndarray,
    origin_lps=(-40.0, 25.0, 100.0),
    orientation=AXIAL,
    spacing_ij=(0.7, 0.9),
    step_lps=None,
    series_uid: str | None = None,
    slopes=None,
    intercepts=None,
    seed: int = 0,
    suffix: str = "",
    per_slice=None,
    **attributes,
) -> list[Path]:
    """Write ``hu_ijk`` (I, J, K) as one slice per file at ``origin + k * step``; names and
    InstanceNumbers are shuffled. ``slopes``/``intercepts`` per slice (stored = (HU - b) / m)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n_slices = hu_ijk.shape[2]
    row, col = np.array(orientation[0]), np.array(orientation[1])
    step = np.cross(row, col) * 2.0 if step_lps is None else np.asarray(step_lps, dtype=float)
    slopes = slopes if slopes is not None else [1] * n_slices
    intercepts = intercepts if intercepts is not None else [-1024] * n_slices
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_slices)
    paths = []
    for k in range(n_slices):
        stored = np.rint((hu_ijk[:, :, k] - intercepts[k]) / slopes[k])
        extra = dict(attributes, **(per_slice(k) if per_slice else {}))
        ds = make_slice(
            stored,
            np.asarray(origin_lps) + k * step,
            orientation,
            spacing_ij,
            series_uid,
            slope=slopes[k],
            intercept=intercepts[k],
            InstanceNumber=int(order[k]) + 1,
            **extra,
        )
        path = folder / f"img_{order[k]:03d}_{series_uid[-6:]}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def known_hu(shape=(5, 4, 6), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def expected_ras(origin_lps, orientation, spacing_ij, step_lps, ijk) -> np.ndarray:
    """DICOM's voxel → LPS formula, then LPS → RAS, written out independently of the reader."""
    i, j, k = ijk
    lps = (
        np.asarray(origin_lps)
        + i * spacing_ij[0] * np.asarray(orientation[0])
        + j * spacing_ij[1] * np.asarray(orientation[1])
        + k * np.asarray(step_lps)
    )
    return np.array([-lps[0], -lps[1], lps[2]])


def one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------- geometry and values


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, _oblique()], ids=["axial", "sagittal", "oblique"])
def test_series_array_and_affine_match_the_known_geometry(tmp_path, orientation):
    hu = known_hu()
    origin, spacing = (-40.0, 25.0, 100.0), (0.7, 0.9)
    step = np.cross(orientation[0], orientation[1]) * 2.0
    write_series(tmp_path, hu, origin, orientation, spacing, step)
    volume = read_dicom(tmp_path)
    assert volume.array.shape == (1, 5, 4, 6)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[0], hu)
    for ijk in [(0, 0, 0), (4, 0, 0), (0, 3, 0), (0, 0, 5), (3, 2, 4)]:
        np.testing.assert_allclose(
            volume.voxel_to_world(np.array(ijk)), expected_ras(origin, orientation, spacing, step, ijk), atol=1e-4
        )
    np.testing.assert_allclose(volume.spacing_mm, [0.7, 0.9, 2.0], atol=1e-6)
    assert volume.metadata["format"] == "dicom"
    assert volume.metadata["n_source_files"] == 6
    assert volume.metadata["modality"] == "CT"
    assert volume.metadata["window_center"] == 40.0
    assert volume.metadata["window_width"] == 400.0
    assert volume.metadata["rescale_intercept"] == -1024.0
    assert volume.metadata["study_instance_uid"] == "1.2.3.4"
    assert (volume.metadata["manufacturer"], volume.metadata["patient_position"]) == ("medaug-test", "HFS")
    assert json.loads(json.dumps(volume.metadata)) == volume.metadata  # plain values only


def test_slices_are_ordered_by_position_not_by_name_or_instance_number(tmp_path):
    """Written with the step against the normal: the reader must put the most-inferior slice first."""
    hu = known_hu()
    origin = np.array([10.0, -5.0, 50.0])
    write_series(tmp_path, hu, origin, AXIAL, (1.0, 1.0), step_lps=(0.0, 0.0, -3.0))
    volume = read_dicom(tmp_path)
    np.testing.assert_array_equal(volume.array[0], hu[:, :, ::-1])
    lowest = origin + 5 * np.array([0.0, 0.0, -3.0])
    np.testing.assert_allclose(volume.voxel_to_world(np.zeros(3)), [-lowest[0], -lowest[1], lowest[2]])
    assert volume.orientation == "LPS"


def test_per_slice_rescale_gives_int16_when_integral_and_float32_otherwise(tmp_path):
    hu = known_hu(seed=2)
    write_series(tmp_path / "int", hu, slopes=[1, 2, 1, 2, 1, 1], intercepts=[-1024, -1000, 0, -1024, -1024, 5])
    integral = read_dicom(tmp_path / "int")
    assert integral.array.dtype == np.int16
    expected = np.stack(
        [
            np.rint((hu[:, :, k] - b) / m) * m + b
            for k, (m, b) in enumerate(zip([1, 2, 1, 2, 1, 1], [-1024, -1000, 0, -1024, -1024, 5]))
        ],
        axis=-1,
    )
    np.testing.assert_array_equal(integral.array[0], expected)
    assert integral.metadata["rescale_slope"] == [1.0, 2.0, 1.0, 2.0, 1.0, 1.0]

    write_series(tmp_path / "float", hu, slopes=[0.5] * 6, intercepts=[-1024.25] * 6)
    fractional = read_dicom(tmp_path / "float")
    assert fractional.array.dtype == np.float32
    stored = np.rint((hu - -1024.25) / 0.5)
    np.testing.assert_allclose(fractional.array[0], stored * 0.5 - 1024.25, atol=1e-3)
    assert fractional.metadata["rescale_slope"] == 0.5


def test_single_slice_is_a_2d_volume_with_slice_thickness(tmp_path):
    hu = known_hu(shape=(6, 5, 1))
    write_series(tmp_path, hu, orientation=SAGITTAL, thickness=3.0)
    volume = read_dicom(tmp_path)
    assert volume.spatial_shape == (6, 5, 1)
    np.testing.assert_array_equal(volume.array[0], hu)
    normal_ras = LPS_TO_RAS[:3, :3] @ np.cross(*[np.array(v) for v in SAGITTAL])
    np.testing.assert_allclose(volume.affine[:3, 2], 3.0 * normal_ras)


def test_gantry_tilt_gives_a_sheared_affine_through_every_slice_position(tmp_path):
    """Slices 2 mm apart along z, each shifted 2·tan(15°) mm in y: the step is not along the normal."""
    tilt = math.radians(15)
    step = (0.0, 2.0 * math.tan(tilt), 2.0)
    hu = known_hu(seed=3)
    paths = write_series(tmp_path, hu, step_lps=step, GantryDetectorTilt=15)
    volume = read_dicom(tmp_path)
    np.testing.assert_array_equal(volume.array[0], hu)
    assert volume.metadata["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    for path in paths:
        ds = pydicom.dcmread(path)
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        k = int(round((lps[2] - 100.0) / 2.0))
        np.testing.assert_allclose(volume.voxel_to_world(np.array([0, 0, k])), [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_files_without_suffix_are_found_and_other_files_are_skipped(tmp_path):
    hu = known_hu(seed=4)
    write_series(tmp_path / "a" / "b", hu, suffix="")
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "a" / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    dicomdir = Path(pydicom.data.get_testdata_file("DICOMDIR"))
    shutil.copy(dicomdir, tmp_path / "a" / "DICOMDIR")
    volume = read_dicom(tmp_path)
    np.testing.assert_array_equal(volume.array[0], hu)
    assert volume.metadata["n_source_files"] == 6


def test_read_volume_dispatches_folders_to_the_dicom_reader(tmp_path):
    hu = known_hu(seed=5)
    write_series(tmp_path, hu)
    np.testing.assert_array_equal(read_volume(tmp_path).array[0], hu)


# -------------------------------------------------------------------------------------- several volumes


def test_several_series_in_one_folder(tmp_path):
    write_series(tmp_path, known_hu(seed=6), series_uid="1.2.826.0.1.1", description="arterial")
    write_series(tmp_path, known_hu(shape=(5, 4, 3), seed=7), series_uid="1.2.826.0.1.2", description="venous")
    with pytest.raises(DicomSeriesError) as caught:
        read_dicom(tmp_path)
    message = one_line(caught.value)
    assert str(tmp_path) in message
    assert '1.2.826.0.1.1 "arterial" (6 slices, 6 files)' in message
    assert '1.2.826.0.1.2 "venous" (3 slices, 3 files)' in message
    volumes = {v.metadata["series_description"]: v for v in read_dicom_series_all(tmp_path)}
    np.testing.assert_array_equal(volumes["arterial"].array[0], known_hu(seed=6))
    np.testing.assert_array_equal(volumes["venous"].array[0], known_hu(shape=(5, 4, 3), seed=7))


@pytest.mark.parametrize("keyword", ["EchoNumbers", "AcquisitionNumber", "TemporalPositionIdentifier"])
def test_one_series_with_repeated_positions_splits_into_volumes(tmp_path, keyword):
    uid = generate_uid()
    first, second = known_hu(seed=8), known_hu(seed=9)
    write_series(tmp_path, first, series_uid=uid, seed=1, suffix="_a", **{keyword: 1})
    write_series(tmp_path, second, series_uid=uid, seed=2, suffix="_b", **{keyword: 2})
    volumes = read_dicom_series_all(tmp_path)
    assert len(volumes) == 2
    arrays = sorted((v.array[0] for v in volumes), key=lambda a: int(np.array_equal(a, second)))
    np.testing.assert_array_equal(arrays[0], first)
    np.testing.assert_array_equal(arrays[1], second)
    with pytest.raises(DicomSeriesError, match="holds 2 volumes"):
        read_dicom(tmp_path)


def test_one_series_with_two_image_shapes_splits(tmp_path):
    uid = generate_uid()
    write_series(tmp_path, known_hu(shape=(5, 4, 6), seed=10), series_uid=uid, suffix="_a")
    write_series(
        tmp_path, known_hu(shape=(3, 4, 6), seed=11), series_uid=uid, suffix="_b", origin_lps=(0.0, 0.0, 300.0)
    )
    shapes = sorted(v.spatial_shape for v in read_dicom_series_all(tmp_path))
    assert shapes == [(3, 4, 6), (5, 4, 6)]


# -------------------------------------------------------------------------------------------- localizers


def test_three_plane_localizer_is_skipped_or_refused(tmp_path, caplog):
    uid = generate_uid()
    for n, orientation in enumerate([AXIAL, SAGITTAL, ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))]):
        write_series(
            tmp_path / "loc",
            known_hu(shape=(4, 4, 1), seed=n),
            orientation=orientation,
            series_uid=uid,
            suffix=f"_{n}",
            description="3-plane",
        )
    with pytest.raises(DicomSeriesError, match="localizer/scout") as caught:
        read_dicom(tmp_path / "loc")
    assert "not a volume" in one_line(caught.value)
    write_series(tmp_path / "ct", known_hu(seed=12))
    with caplog.at_level(logging.INFO, logger="medaug.io.dicom.read"):
        volumes = read_dicom_series_all(tmp_path)
    assert len(volumes) == 1
    np.testing.assert_array_equal(volumes[0].array[0], known_hu(seed=12))
    assert any("localizer/scout" in record.getMessage() for record in caplog.records)
    skipped = [r for r in scan_dicom_folder(tmp_path) if r.skipped]
    assert len(skipped) == 1 and len(skipped[0].files) == 3


def test_image_type_localizer_is_skipped(tmp_path):
    write_series(tmp_path, known_hu(shape=(4, 4, 2)), image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(DicomSeriesError, match="ImageType LOCALIZER"):
        read_dicom(tmp_path)
    assert read_dicom_series_all(tmp_path) == []


# --------------------------------------------------------------------------------------------- bad input


def test_empty_folder(tmp_path):
    with pytest.raises(ImageReadError, match="empty folder") as caught:
        read_dicom(tmp_path)
    assert str(tmp_path) in one_line(caught.value)


def test_not_a_dicom_file_or_folder(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("hello " * 100)
    with pytest.raises(ImageReadError, match="not a DICOM file") as caught:
        read_dicom(path)
    assert str(path) in one_line(caught.value)
    with pytest.raises(ImageReadError, match="no DICOM file among 1 files"):
        read_dicom(tmp_path)


def test_truncated_header_is_an_error_for_its_series(tmp_path):
    paths = write_series(tmp_path, known_hu(seed=13))
    victim = paths[2]
    victim.write_bytes(victim.read_bytes()[:700])
    with pytest.raises(ImageReadError) as caught:
        read_dicom(tmp_path)
    assert str(victim) in one_line(caught.value)
    assert "truncated" in str(caught.value)
    results = scan_dicom_folder(tmp_path)  # batch callers get the errors, not an exception
    assert all(r.volume is None for r in results)
    assert any(str(victim) in str(r.error) for r in results)


def test_truncated_pixel_data(tmp_path):
    paths = write_series(tmp_path, known_hu(seed=14))
    victim = paths[4]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ImageReadError, match="pixel data") as caught:
        read_dicom(tmp_path)
    assert str(victim) in one_line(caught.value)
    assert [type(r.error) for r in scan_dicom_folder(tmp_path)] == [ImageReadError]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_file_permissions(tmp_path):
    paths = write_series(tmp_path, known_hu(seed=15))
    paths[0].chmod(0)
    with pytest.raises(ImageReadError, match="cannot be opened"):
        read_dicom(tmp_path)


def test_missing_slice_is_reported_with_the_gap(tmp_path):
    paths = write_series(tmp_path, known_hu(seed=16))  # z = 100, 102, ..., 110
    paths[3].unlink()  # z = 106
    with pytest.raises(DicomSeriesError) as caught:
        read_dicom(tmp_path)
    message = one_line(caught.value)
    assert str(tmp_path) in message
    assert "step of 4.000 mm between 104.000 and 108.000 mm" in message
    assert "typical step is 2.000 mm" in message


def test_duplicated_slice_is_reported(tmp_path):
    paths = write_series(tmp_path, known_hu(seed=17))
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "copy_of_slice")
    with pytest.raises(DicomSeriesError, match="duplicated slice") as caught:
        read_dicom(tmp_path)
    message = one_line(caught.value)
    assert "copy_of_slice" in message and "104.000 mm" in message


def test_uneven_spacing_within_tolerance_is_accepted_and_beyond_is_refused(tmp_path):
    jitter = 0.5 * spacing_tolerance_mm(2.0)
    write_series(
        tmp_path / "ok",
        known_hu(seed=18),
        per_slice=lambda k: {"ImagePositionPatient": [-40.0, 25.0, 100.0 + 2.0 * k + (jitter if k == 2 else 0.0)]},
    )
    np.testing.assert_allclose(read_dicom(tmp_path / "ok").spacing_mm[2], 2.0)
    write_series(
        tmp_path / "bad",
        known_hu(seed=18),
        per_slice=lambda k: {"ImagePositionPatient": [-40.0, 25.0, 100.0 + 2.0 * k + (0.5 if k == 2 else 0.0)]},
    )
    with pytest.raises(DicomSeriesError, match="non-uniform slice spacing"):
        read_dicom(tmp_path / "bad")


# ------------------------------------------------------------------------------------------ real scans


def test_totalsegmentator_jpeg2000_series(real_dir):
    folder = real_dir / "totalsegmentator" / "example_ct_dicom"
    volume = read_dicom(folder)
    assert volume.array.shape == (1, 512, 512, 20)
    np.testing.assert_allclose(volume.spacing_mm, [0.9765625, 0.9765625, 2.0])
    hu = volume.array[0]
    assert volume.metadata["intensity_unit"] == "HU" and volume.metadata["modality"] == "CT"
    assert np.median(hu[:30, :30, :]) == pytest.approx(-1024, abs=30)  # air in the corner
    assert 0 <= np.median(hu[236:276, 236:276, :]) <= 100  # soft tissue at the centre
    assert volume.orientation == "LPS"  # rows run to patient left, columns posterior


def test_totalsegmentator_matches_simpleitk(real_dir):
    """GDCM (through SimpleITK) is an independent DICOM series reader: same voxels, same geometry."""
    sitk = pytest.importorskip("SimpleITK")
    folder = real_dir / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    volume = read_dicom(folder)
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.array(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ affine_lps, atol=1e-4)


def test_siemens_mosaic_is_unpacked_like_nibabel(real_dir):
    """nibabel's MosaicWrapper is an independent unpacker: (row, col, slice) axes, LPS affine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel: "The DICOM readers are highly experimental"
        from nibabel.nicom import dicomwrappers

    folder = real_dir / "dcm_qa_nih" / "siemens_mosaic_mr_0003"
    with pytest.raises(DicomSeriesError, match="holds 2 volumes"):
        read_dicom(folder)
    volumes = read_dicom_series_all(folder)
    assert [v.spatial_shape for v in volumes] == [(72, 72, 5), (72, 72, 5)]
    for path, volume in zip(
        sorted(folder.glob("*.dcm")), sorted(volumes, key=lambda v: v.metadata["acquisition_number"])
    ):
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        np.testing.assert_array_equal(volume.array[0], wrapper.get_data().transpose(1, 0, 2))
        np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ wrapper.affine[:, [1, 0, 2, 3]], atol=1e-4)
        assert volume.metadata["siemens_mosaic_tiles"] == 5
    single = read_dicom(folder / "epi_pe_ap-00001.dcm")
    np.testing.assert_allclose(single.spacing_mm, [3.0, 3.0, 12.0])


def test_mosaic_without_csa_header_is_refused(real_dir, tmp_path):
    ds = pydicom.dcmread(real_dir / "dcm_qa_nih" / "siemens_mosaic_mr_0003" / "epi_pe_ap-00001.dcm")
    del ds[ds.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x10)]
    ds.save_as(tmp_path / "mosaic.dcm")
    with pytest.raises(DicomSeriesError, match="unpack with dcm2niix"):
        read_dicom(tmp_path / "mosaic.dcm")


def test_csa2_parser_reads_slice_normal(real_dir):
    ds = pydicom.dcmread(real_dir / "dcm_qa_nih" / "siemens_mosaic_mr_0003" / "epi_pe_ap-00001.dcm")
    tags = parse_csa2(bytes(ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value))
    assert [float(v) for v in tags["SliceNormalVector"]] == [0.0, 0.0, 1.0]
    assert tags["NumberOfImagesInMosaic"] == ["5"]


# ------------------------------------------------------------------------------------ enhanced multi-frame


def test_enhanced_ct_frames_ordered_by_plane_position():
    path = pydicom.data.get_testdata_file("eCT_Supplemental.dcm")
    volume = read_dicom(path)
    assert volume.spatial_shape == (512, 512, 2)
    np.testing.assert_allclose(volume.spacing_mm, [0.388672, 0.388672, 10.0])
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array  # (frames, rows, cols)
    for frame, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        lps = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin([abs(volume.voxel_to_world(np.array([0, 0, kk]))[2] - lps[2]) for kk in range(2)]))
        np.testing.assert_allclose(volume.voxel_to_world(np.array([0, 0, k])), [-lps[0], -lps[1], lps[2]], atol=1e-4)
        np.testing.assert_array_equal(volume.array[0, :, :, k], raw[frame].T.astype(np.int32) - 1024)


def _enhanced_mr_with_geometry(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """emri_small's 10 frames as 2 temporal positions × 5 slices, frames written in shuffled order."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("emri_small.dcm"))
    raw = ds.pixel_array  # (10, 64, 64)
    order = np.random.default_rng(0).permutation(10)  # frame f holds (time, slice) = divmod(order[f], 5)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.6]
    shared.PixelMeasuresSequence[0].SliceThickness = 1.2
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = 0
    shared.PixelValueTransformationSequence[0].RescaleType = "US"
    per_frame = []
    for f in range(10):
        time, slice_ = divmod(int(order[f]), 5)
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [
            -20.0,
            10.0 + 1.2 * slice_,
            30.0,
        ]  # normal row × col = +y (LPS)
        item.FrameContentSequence = [Dataset()]
        item.FrameContentSequence[0].StackID = "1"
        item.FrameContentSequence[0].InStackPositionNumber = slice_ + 1
        item.FrameContentSequence[0].TemporalPositionIndex = time + 1
        per_frame.append(item)
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    path = tmp_path / "emr_geometry"
    ds.save_as(path)
    expected = np.zeros((2, 64, 64, 5), dtype=np.int32)
    for f in range(10):
        time, slice_ = divmod(int(order[f]), 5)
        expected[time, :, :, slice_] = raw[f].T.astype(np.int32) * 2
    return path, expected, order


def test_enhanced_mr_frames_group_by_temporal_position(tmp_path):
    path, expected, _ = _enhanced_mr_with_geometry(tmp_path)
    volumes = sorted(read_dicom_series_all(path), key=lambda v: v.metadata["temporal_position"])
    assert len(volumes) == 2
    for t, volume in enumerate(volumes):
        assert volume.spatial_shape == (64, 64, 5)
        np.testing.assert_array_equal(volume.array[0], expected[t])
        np.testing.assert_allclose(volume.spacing_mm, [0.6, 0.8, 1.2])
        np.testing.assert_allclose(volume.voxel_to_world(np.array([1, 1, 2])), [20.0 - 0.6, -(10.0 + 2.4), 30.0 - 0.8])
    with pytest.raises(DicomSeriesError, match="holds 2 volumes"):
        read_dicom(path)


def test_enhanced_mr_without_functional_groups_is_refused():
    path = pydicom.data.get_testdata_file("emri_small.dcm")
    with pytest.raises(DicomSeriesError, match="without functional groups") as caught:
        read_dicom(path)
    assert str(path) in one_line(caught.value)


# -------------------------------------------------------------------------------------------- DICOM SEG


def _liver_frames() -> tuple[Path, np.ndarray, list[float]]:
    path = Path(pydicom.data.get_testdata_file("liver.dcm"))
    ds = pydicom.dcmread(path)
    z = [float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in ds.PerFrameFunctionalGroupsSequence]
    return path, ds.pixel_array, z  # (frames, rows, cols) 0/1


def test_liver_seg_on_its_own_grid():
    path, frames, z = _liver_frames()
    label, names = read_dicom_seg(path)
    assert names == {1: "Liver"}
    assert label.array.dtype == np.uint8 and label.spatial_shape == (512, 512, 3)
    assert int(np.count_nonzero(label.array)) == int(frames.sum())
    for f, z_f in enumerate(z):
        k = int(np.rint(label.world_to_voxel(np.array([0.0, 0.0, z_f]))[2]))
        np.testing.assert_array_equal(label.array[0, :, :, k], frames[f].T)
    segment = label.metadata["segments"][0]
    assert segment["property_type"] == ["SRT", "T-62000", "Liver"]


@pytest.mark.parametrize("descending", [False, True], ids=["z-up", "z-down"])
def test_liver_seg_placed_on_a_reference_grid_by_position(descending):
    """A 5-slice reference 1 mm apart around the SEG's 3 frames: frames land on the slices at their z."""
    path, frames, z = _liver_frames()
    z_ref = np.arange(min(z) - 1.0, max(z) + 1.5, 1.0)[:: -1 if descending else 1]  # 5 slice positions
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = [0.810547, 0, 0]
    affine_lps[:3, 1] = [0, 0.810547, 0]
    affine_lps[:3, 2] = [0, 0, z_ref[1] - z_ref[0]]
    affine_lps[:3, 3] = [-235.2, -226.8, z_ref[0]]
    reference = Volume(np.zeros((1, 512, 512, 5), np.int16), LPS_TO_RAS @ affine_lps, {})
    label, _ = read_dicom_seg(path, reference=reference)
    np.testing.assert_array_equal(label.affine, reference.affine)
    assert label.spatial_shape == (512, 512, 5)
    for k, z_k in enumerate(z_ref):
        matches = [f for f, z_f in enumerate(z) if abs(z_f - z_k) < 1e-3]
        expected = frames[matches[0]].T if matches else np.zeros((512, 512))
        np.testing.assert_array_equal(label.array[0, :, :, k], expected)


def _write_highdicom_seg(path: Path, sources: list[Dataset], masks_frcs: np.ndarray, segmentation_type: str) -> None:
    """A SEG drawn on ``sources`` with highdicom: masks (frames, rows, cols, segments) per source image."""
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(n, name, codes.SCT.Organ, prop, hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name, prop in [(1, "kidney", codes.SCT.Kidney), (2, "lesion", codes.SCT.Neoplasm)]
    ][: masks_frcs.shape[-1]]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks_frcs,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medaug-test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)


def _small_series_and_organ(tmp_path: Path) -> tuple[Volume, list[Dataset], np.ndarray]:
    paths = write_series(
        tmp_path / "ct", known_hu(shape=(8, 6, 5), seed=20), orientation=_oblique(), spacing_ij=(0.8, 0.8)
    )
    sources = [pydicom.dcmread(p) for p in paths]  # paths[k] is slice k (positions along +normal)
    organ = np.zeros((5, 6, 8), bool)  # (frames, rows, cols) per source image
    organ[1:4, 1:5, 2:7] = True  # frames 0 and 4 are empty: highdicom omits them
    return read_dicom(tmp_path / "ct"), sources, organ


def test_highdicom_seg_on_a_small_series_with_overlapping_segments(tmp_path):
    image, sources, organ = _small_series_and_organ(tmp_path)
    lesion = np.zeros_like(organ)
    lesion[2, 2:4, 3:5] = True  # inside the organ
    _write_highdicom_seg(tmp_path / "seg.dcm", sources, np.stack([organ, lesion], axis=-1).astype(np.uint8), "BINARY")
    label, names = read_dicom_seg(tmp_path / "seg.dcm", reference=image)
    assert names == {1: "kidney", 2: "lesion"}
    expected_kji = organ.astype(np.uint8)
    expected_kji[lesion] = 2  # the smaller segment wins the overlap
    np.testing.assert_array_equal(label.array[0], expected_kji.transpose(2, 1, 0))
    other = Volume(image.array, image.affine, {**image.metadata, "frame_of_reference_uid": "1.2.999"})
    with pytest.raises(LabelError, match="FrameOfReferenceUID"):
        read_dicom_seg(tmp_path / "seg.dcm", reference=other)


def test_fractional_seg_counts_values_of_at_least_one_half(tmp_path):
    image, sources, organ = _small_series_and_organ(tmp_path)
    halo = np.zeros_like(organ)
    halo[1:4, 0, 2:7] = True  # next to the organ, probability 0.3
    probability = organ * 0.9 + halo * 0.3
    _write_highdicom_seg(tmp_path / "seg.dcm", sources, probability[..., None].astype(np.float32), "FRACTIONAL")
    label, names = read_dicom_seg(tmp_path / "seg.dcm", reference=image)
    assert names == {1: "kidney"}
    np.testing.assert_array_equal(label.array[0], organ.astype(np.uint8).transpose(2, 1, 0))


def test_read_dicom_refuses_a_seg_and_read_dicom_seg_refuses_an_image(tmp_path):
    with pytest.raises(DicomSeriesError, match="read_dicom_seg"):
        read_dicom(pydicom.data.get_testdata_file("liver.dcm"))
    paths = write_series(tmp_path, known_hu(shape=(4, 4, 1)))
    with pytest.raises(ImageReadError, match="expected a DICOM SEG") as caught:
        read_dicom_seg(paths[0])
    assert str(paths[0]) in one_line(caught.value)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc/self/mem as an unreadable file")
def test_unreadable_file_even_as_root(tmp_path):
    """A file whose read fails with an OS error (here EIO from /proc/self/mem, unreadable even for root)."""
    write_series(tmp_path, known_hu(seed=15))
    victim = tmp_path / "zz_unreadable.dcm"
    victim.symlink_to("/proc/self/mem")
    with pytest.raises(ImageReadError, match="cannot be opened") as caught:
        read_dicom(tmp_path)
    assert str(victim) in one_line(caught.value)
