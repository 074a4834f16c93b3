"""DICOM export (images + SEG): files are read back with pydicom and highdicom, validated with dciodvfy, and
compared with values, geometry and codes computed here from the sample, never with the exporter's helpers."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medaug import vocab
from medaug.prepare.intensity import IntensityMapping, ct_window_mapping
from medaug.synth.export import DicomOptions, ExportError, ExportSlice, canonical_affine, export_batch
from medaug.synth.export.dicom import dicom_paths, write_dicom_sample

SIZE = 64
CT_WINDOW_HU = (-160.0, 240.0)
T2 = IntensityMapping(kind="mr_percentile", low=0.0, high=1000.0, units="a.u.")  # the synthetic MR range
ADC = IntensityMapping(kind="mr_percentile", low=117.27, high=2817.0, units="a.u.", percentiles=(0.5, 99.5))
SHA256 = "0123456789abcdef" * 4
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
OPTIONS = DicomOptions(model_name="medvar-tiny", model_sha256=SHA256, run_uid="run-1", created_at=CREATED)
CT_STRUCTURES = ("liver", "kidney_left", "kidney_cyst_left", "spleen")  # type modifier, region modifier, plain
MR_STRUCTURES = ("prostate_peripheral_zone", "prostate_transition_zone")
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "SC": "1.2.840.10008.5.1.4.1.1.7", "SEG": "1.2.840.10008.5.1.4.1.1.66.4"}
LPS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine() -> np.ndarray:
    """Pixel (row, col) → RAS: unequal spacings, rotated 17° about z, offset origin."""
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array([[0, -0.8, 0], [-0.7, 0, 0], [0, 0, 3.0]])
    affine[:3, 3] = (101.5, -37.25, 12.0)
    return affine


def label_of(names: tuple[str, ...], seed: int) -> np.ndarray:
    """(64, 64) uint8: one random blob per structure, a few ignore pixels."""
    rng = np.random.default_rng(seed)
    label_HW = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for number, name in enumerate(names):
        top, left = 4 + 14 * number, int(rng.integers(2, 30))
        label_HW[top:top + 10, left:left + int(rng.integers(8, 30))] = vocab.structure(name).id
    label_HW[-2:, -3:] = vocab.IGNORE
    return label_HW


def model_image(channels: int, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).uniform(-1, 1, (channels, SIZE, SIZE)).astype(np.float32)
    image[:, 0, :4] = [-1.0, 1.0, -1.4, 1.3]  # the ends, and values outside [-1, 1] that clip
    return image


def ct_sample(sample_id: str = "ct0001", seed: int = 0, **kwargs) -> ExportSlice:
    defaults = dict(sample_id=sample_id, image_CHW=model_image(1, seed), label_HW=label_of(CT_STRUCTURES, seed),
                    channels=("ct",), affine=oblique_affine(), intensity=(ct_window_mapping(CT_WINDOW_HU),),
                    domain="ct/abdomen", series_key="batch01", instance_number=3)
    return ExportSlice(**{**defaults, **kwargs})


def mr_sample(sample_id: str = "mr0001", seed: int = 1, **kwargs) -> ExportSlice:
    defaults = dict(sample_id=sample_id, image_CHW=model_image(2, seed), label_HW=label_of(MR_STRUCTURES, seed),
                    channels=("t2", "adc"), affine=canonical_affine(0.6, SIZE, slice_thickness_mm=3.6),
                    intensity=(T2, ADC), domain="mr/prostate", series_key="batch01")
    return ExportSlice(**{**defaults, **kwargs})


def source_values(sample: ExportSlice, channel: int) -> np.ndarray:
    """Independent: the model value clipped to [-1, 1] through the mapping, ``m * (high - low) / 2 + (high + low) / 2``."""
    mapping = sample.intensity[channel]
    model = np.clip(sample.image_CHW[channel].astype(np.float64), -1.0, 1.0)
    return model * (mapping.high - mapping.low) / 2 + (mapping.high + mapping.low) / 2


def rescaled(dataset: pydicom.Dataset) -> np.ndarray:
    return dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)


def dciodvfy(path: Path) -> tuple[str, list[str]]:
    """dciodvfy's report for ``path`` and its error lines (as tests/io/test_dicom_write.py checks the writer)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    return report, [line for line in report.splitlines() if "Error" in line]


# ---------------------------------------------------------------- validity


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("kind, sop", [("CT", "image"), ("MR", "image"), ("CT", "sc"), ("MR", "sc")],
                         ids=["ct-image", "mr-image", "ct-sc", "mr-sc"])
def test_every_kind_of_file_passes_dciodvfy(tmp_path, kind, sop):
    sample = ct_sample() if kind == "CT" else mr_sample()
    options = DicomOptions(model_name="medvar-tiny", model_sha256=SHA256, run_uid="run-1", sop=sop)
    paths = write_dicom_sample(sample, tmp_path, options)
    iods = [f"{kind}Image" if sop == "image" else "SCImage"] * len(sample.channels) + ["Segmentation"]
    assert len(paths) == len(iods)
    for path, iod in zip(paths, iods):
        report, errors = dciodvfy(path)
        assert iod in report.splitlines()[0], report  # it recognised the IOD
        assert errors == [], f"{path.name}: {errors}"


# ---------------------------------------------------------------- values


def test_ct_pixels_are_rounded_hu_with_the_domain_window(tmp_path):
    sample = ct_sample()
    dataset = pydicom.dcmread(write_dicom_sample(sample, tmp_path, OPTIONS)[0])
    assert dataset.SOPClassUID == SOP_CLASSES["CT"] and dataset.Modality == "CT" and dataset.RescaleType == "HU"
    assert dataset.pixel_array.dtype == np.int16 and dataset.pixel_array.shape == (SIZE, SIZE)
    hu = source_values(sample, 0)
    np.testing.assert_array_equal(rescaled(dataset), np.rint(hu))
    assert rescaled(dataset)[0, :4].tolist() == [-160.0, 240.0, -160.0, 240.0]  # the window ends; outside clips
    assert (float(dataset.WindowCenter), float(dataset.WindowWidth)) == (40.0, 400.0)


def test_mr_channels_are_separate_series_with_values_within_half_a_step(tmp_path):
    sample = mr_sample()
    paths = write_dicom_sample(sample, tmp_path, OPTIONS)
    assert [path.name for path in paths] == ["mr0001_t2.dcm", "mr0001_adc.dcm", "mr0001.seg.dcm"]
    t2, adc = (pydicom.dcmread(path) for path in paths[:2])
    for channel, dataset in enumerate((t2, adc)):
        mapping = sample.intensity[channel]
        slope = float(dataset.RescaleSlope)
        assert dataset.SOPClassUID == SOP_CLASSES["MR"] and dataset.pixel_array.dtype == np.int16
        assert slope <= (mapping.high - mapping.low) / 60000  # spread over most of int16
        assert np.abs(rescaled(dataset) - source_values(sample, channel)).max() <= slope / 2 * (1 + 1e-9)
        assert float(dataset.WindowCenter) == pytest.approx((mapping.low + mapping.high) / 2)
        assert sample.channels[channel] in dataset.SeriesDescription
        assert dataset.SeriesNumber == channel + 1
    assert t2.SeriesInstanceUID != adc.SeriesInstanceUID
    assert t2.StudyInstanceUID == adc.StudyInstanceUID and t2.FrameOfReferenceUID == adc.FrameOfReferenceUID


def test_window_option_overrides_per_channel(tmp_path):
    options = DicomOptions(model_name="m", model_sha256=SHA256, run_uid="r", window={"adc": (1000.0, 500.0)})
    t2, adc = (pydicom.dcmread(path) for path in write_dicom_sample(mr_sample(), tmp_path, options)[:2])
    assert (float(adc.WindowCenter), float(adc.WindowWidth)) == (1000.0, 500.0)
    assert (float(t2.WindowCenter), float(t2.WindowWidth)) == (500.0, 1000.0)  # the mapping's range


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("affine", [oblique_affine(), canonical_affine((0.5, 0.8), SIZE, "coronal", 2.0)],
                         ids=["oblique", "coronal"])
def test_geometry_is_the_affine_in_lps(tmp_path, affine):
    sample = ct_sample(affine=affine)
    dataset = pydicom.dcmread(write_dicom_sample(sample, tmp_path, OPTIONS)[0])
    position = np.array(dataset.ImagePositionPatient, dtype=float)
    row_cosines, column_cosines = np.reshape(np.array(dataset.ImageOrientationPatient, dtype=float), (2, 3))
    row_spacing, column_spacing = (float(value) for value in dataset.PixelSpacing)
    np.testing.assert_allclose(position, LPS @ affine[:3, 3], atol=1e-9)
    np.testing.assert_allclose([row_spacing, column_spacing], np.linalg.norm(affine[:3, :2], axis=0), atol=1e-9)
    assert float(dataset.SliceThickness) == pytest.approx(np.linalg.norm(affine[:3, 2]))
    for row, column in [(0, 0), (5, 40), (63, 1), (63, 63)]:
        # PS3.3 C.7.6.2.1.1: P = S + X·column·Δcolumn + Y·row·Δrow, X the row direction cosines
        dicom_lps = position + row_cosines * column * column_spacing + column_cosines * row * row_spacing
        np.testing.assert_allclose(dicom_lps, LPS @ (affine @ [row, column, 0.0, 1.0])[:3], atol=1e-6)


def test_secondary_capture_is_marked_syn_without_frame_of_reference(tmp_path):
    options = DicomOptions(model_name="m", model_sha256=SHA256, run_uid="r", sop="sc")
    sample = ct_sample(affine=canonical_affine(0.7, SIZE))
    dataset = pydicom.dcmread(write_dicom_sample(sample, tmp_path, options)[0])
    assert dataset.SOPClassUID == SOP_CLASSES["SC"] and dataset.ConversionType == "SYN"
    assert "FrameOfReferenceUID" not in dataset and "ImagePositionPatient" not in dataset
    assert list(dataset.PatientOrientation) == ["L", "P"]  # columns run to the patient's left, rows posterior
    np.testing.assert_array_equal(rescaled(dataset), np.rint(source_values(sample, 0)))
    assert dataset.RescaleType == "HU"


# ---------------------------------------------------------------- marking


@pytest.mark.parametrize("sop", ["image", "sc"])
def test_every_instance_says_synthetic_and_holds_no_patient_data(tmp_path, sop):
    options = DicomOptions(model_name="medvar-tiny", model_sha256=SHA256, run_uid="run-1", sop=sop)
    datasets = [pydicom.dcmread(path) for path in write_dicom_sample(ct_sample(), tmp_path, options)]
    for dataset in datasets:
        assert dataset.PatientIdentityRemoved == "YES" and dataset.DeidentificationMethod
        assert str(dataset.PatientName) == "SYNTHETIC^MEDAUG" and dataset.PatientID.startswith("MEDAUG-SYN-")
        assert dataset.SeriesDescription.startswith("SYNTHETIC") and dataset.BurnedInAnnotation == "NO"
        assert "medaug" in dataset.DerivationDescription and "medvar-tiny" in dataset.DerivationDescription
        assert SHA256 in dataset.DerivationDescription
        assert dataset.PatientBirthDate == "" and dataset.PatientSex == ""
        people = [str(element.value) for element in dataset.iterall() if element.VR == "PN" and element.value]
        assert people == ["SYNTHETIC^MEDAUG"]
    image, seg = datasets
    assert list(image.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert list(seg.ImageType) == ["DERIVED", "PRIMARY"]  # fixed by the Segmentation IOD
    assert seg.PatientID == image.PatientID and seg.StudyInstanceUID == image.StudyInstanceUID


# ---------------------------------------------------------------- SEG


def test_seg_masks_and_codes_read_back_by_highdicom(tmp_path):
    import highdicom as hd

    sample = ct_sample()
    image_path, seg_path = write_dicom_sample(sample, tmp_path, OPTIONS)
    image = pydicom.dcmread(image_path)
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SOP_CLASSES["SEG"] and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == image.FrameOfReferenceUID
    assert [item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence] == [image.SOPInstanceUID]
    names = sorted(CT_STRUCTURES, key=lambda name: vocab.structure(name).id)
    masks_HWN = seg.get_pixels_by_source_instance([image.SOPInstanceUID], combine_segments=False)[0]
    assert masks_HWN.shape == (SIZE, SIZE, len(names))
    for number, name in enumerate(names, start=1):
        item = seg.get_segment_description(number)
        structure = vocab.structure(name)
        assert item.segment_label == name
        np.testing.assert_array_equal(masks_HWN[..., number - 1], sample.label_HW == structure.id)
        assert _code(item.SegmentedPropertyCategoryCodeSequence[0]) == structure.category
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        assert _code(type_item) == structure.type
        _check_modifier(item, type_item, structure)


def _code(item: pydicom.Dataset) -> tuple[str, str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)


def _check_modifier(item: pydicom.Dataset, type_item: pydicom.Dataset, structure: vocab.Structure) -> None:
    """The vocabulary's rule: laterality qualifies the region where there is one, else the type."""
    if structure.region is not None:
        region = item.AnatomicRegionSequence[0]
        assert _code(region) == structure.region
        modifiers = [_code(m) for m in region.get("AnatomicRegionModifierSequence", [])]
    else:
        assert "AnatomicRegionSequence" not in item
        modifiers = [_code(m) for m in type_item.get("SegmentedPropertyTypeModifierCodeSequence", [])]
    assert modifiers == ([structure.modifier] if structure.modifier else [])


def test_seg_of_secondary_capture_reads_back(tmp_path):
    import highdicom as hd

    options = DicomOptions(model_name="m", model_sha256=SHA256, run_uid="r", sop="sc")
    sample = mr_sample()
    paths = write_dicom_sample(sample, tmp_path, options)
    t2 = pydicom.dcmread(paths[0])
    seg = hd.seg.segread(paths[-1])
    masks_HWN = seg.get_pixels_by_source_instance([t2.SOPInstanceUID], combine_segments=False)[0]
    for number, name in enumerate(MR_STRUCTURES, start=1):
        np.testing.assert_array_equal(masks_HWN[..., number - 1], sample.label_HW == vocab.structure(name).id)


def test_empty_mask_and_seg_off_write_images_only(tmp_path):
    empty = ct_sample(label_HW=np.where(np.eye(SIZE, dtype=bool), vocab.IGNORE, 0).astype(np.uint8))
    assert [path.name for path in write_dicom_sample(empty, tmp_path / "a", OPTIONS)] == ["ct0001.dcm"]
    no_seg = DicomOptions(model_name="m", model_sha256=SHA256, run_uid="r", seg=False)
    assert [path.name for path in dicom_paths(ct_sample(), tmp_path, no_seg)] == ["ct0001.dcm"]
    assert [path.name for path in dicom_paths(ct_sample(), tmp_path, OPTIONS)] == ["ct0001.dcm", "ct0001.seg.dcm"]
    assert sorted(path.name for path in (tmp_path / "a").rglob("*") if path.is_file()) == ["ct0001.dcm"]


# ---------------------------------------------------------------- UIDs, series, resume


def _uids(paths: list[Path]) -> list[tuple[str, ...]]:
    keywords = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
    return [tuple(str(pydicom.dcmread(path).get(keyword, "")) for keyword in keywords) for path in paths]


def test_uids_are_deterministic_per_run_and_valid(tmp_path):
    first = write_dicom_sample(mr_sample(), tmp_path / "a", OPTIONS)
    again = write_dicom_sample(mr_sample(), tmp_path / "b", OPTIONS)
    other = write_dicom_sample(mr_sample(), tmp_path / "c", DicomOptions(
        model_name="medvar-tiny", model_sha256=SHA256, run_uid="run-2", created_at=CREATED))
    assert _uids(first) == _uids(again)
    assert [a.read_bytes() for a in first[:2]] == [b.read_bytes() for b in again[:2]]  # images byte-identical
    first_uids, other_uids = {u for row in _uids(first) for u in row}, {u for row in _uids(other) for u in row}
    assert not first_uids & other_uids
    for uid in first_uids:
        assert uid.startswith(OPTIONS.uid_root) and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_samples_with_one_series_key_form_one_series(tmp_path):
    grouped = [ct_sample(f"ct{n}", seed=n, instance_number=n + 1) for n in range(3)]
    alone = ct_sample("ct9", seed=9, series_key="", instance_number=1)
    written = [write_dicom_sample(sample, tmp_path, OPTIONS) for sample in [*grouped, alone]]
    images = [pydicom.dcmread(paths[0]) for paths in written]
    assert [paths[0].relative_to(tmp_path).as_posix() for paths in written] == [
        "ct_abdomen/batch01/ct0.dcm", "ct_abdomen/batch01/ct1.dcm", "ct_abdomen/batch01/ct2.dcm",
        "ct_abdomen/single/ct9.dcm"]
    assert len({image.SeriesInstanceUID for image in images[:3]}) == 1
    assert len({image.SOPInstanceUID for image in images}) == 4
    assert images[3].SeriesInstanceUID != images[0].SeriesInstanceUID
    assert [image.InstanceNumber for image in images] == [1, 2, 3, 1]
    segs = [pydicom.dcmread(paths[1]) for paths in written]
    assert len({seg.SeriesInstanceUID for seg in segs[:3]}) == 1 and [s.InstanceNumber for s in segs] == [1, 2, 3, 1]


def test_export_batch_writes_dicom_and_resumes(tmp_path):
    samples = [ct_sample("c0"), mr_sample("m0"), ct_sample("c1", seed=5)]
    first = export_batch(samples, tmp_path, formats=("dicom",), dicom=OPTIONS)
    assert first.written == ["c0", "m0", "c1"] and first.skipped == []
    assert first.paths["m0"] == dicom_paths(samples[1], tmp_path / "dicom", OPTIONS)
    assert all(path.is_file() for paths in first.paths.values() for path in paths)
    untouched = first.paths["c0"][0].stat().st_mtime_ns
    first.paths["m0"][1].unlink()
    second = export_batch(samples, tmp_path, formats=("dicom",), dicom=OPTIONS)
    assert second.written == ["m0"] and second.skipped == ["c0", "c1"]
    assert first.paths["m0"][1].is_file() and first.paths["c0"][0].stat().st_mtime_ns == untouched
    assert not list(tmp_path.rglob(".part-*"))
    with pytest.raises(ExportError, match="DicomOptions"):
        export_batch(samples, tmp_path, formats=("dicom",))


@pytest.mark.parametrize("change, field", [
    ({"sop": "xa"}, "dicom.sop"),
    ({"model_sha256": "not-a-hash"}, "dicom.model_sha256"),
    ({"model_name": "a\\b"}, "dicom.model_name"),
    ({"uid_root": "1.2.03."}, "dicom.uid_root"),
    ({"run_uid": ""}, "dicom.run_uid"),
    ({"window": (40.0, 0.0)}, "dicom.window"),
], ids=["sop", "sha", "model-name", "uid-root", "run-uid", "window"])
def test_options_refuse_bad_values(change, field):
    with pytest.raises(ExportError, match=field.replace(".", r"\.")):
        DicomOptions(**{"model_name": "m", "model_sha256": SHA256, "run_uid": "r", **change})


def test_sample_without_domain_or_with_a_bad_series_key_is_refused(tmp_path):
    with pytest.raises(ExportError, match="domain"):
        write_dicom_sample(ct_sample(domain=""), tmp_path, OPTIONS)
    with pytest.raises(ExportError, match="series_key"):
        ct_sample(series_key="a/b")
