"""Exporters (PNG, NIfTI, nnU-Net raw): every file is read back by another library (Pillow, nibabel,
SimpleITK) and compared with the formula computed here, never with the exporter's own helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaug import vocab
from medaug.io.nifti import read_nifti, write_nifti
from medaug.io.volume import Volume
from medaug.prepare.intensity import IntensityMapping, ct_window_mapping
from medaug.synth.export import (
    ExportError,
    ExportSlice,
    NiftiOptions,
    NnunetLabels,
    PngOptions,
    canonical_affine,
    export_batch,
    export_prepared_to_nnunet,
    open_nnunet_dataset,
    write_montage,
    write_nifti_sample,
    write_png_sample,
)
from medaug.synth.export.png import encode_png

CT_WINDOW_HU = (-160.0, 240.0)
T2 = IntensityMapping(kind="mr_percentile", low=47.0, high=1261.0, units="a.u.", percentiles=(0.5, 99.5))
ADC = IntensityMapping(kind="mr_percentile", low=117.27, high=2817.0, units="a.u.", percentiles=(0.5, 99.5))
FLOAT16_EPS = 2.0**-11  # float16 spacing just below 1: model values read from float16 shards are this coarse
PZ, TZ = vocab.structure("prostate_peripheral_zone").id, vocab.structure("prostate_transition_zone").id


def oblique_affine() -> np.ndarray:
    """A pixel → RAS affine with unequal spacings, a rotation about z and an offset origin."""
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array([[0, -0.8, 0], [-0.7, 0, 0], [0, 0, 3.0]])
    affine[:3, 3] = (101.5, -37.25, 12.0)
    return affine


def model_image(rng: np.random.Generator, channels: int, shape=(24, 20)) -> np.ndarray:
    """Model values as float16 shards hold them, plus exact -1, 0, +1 and values outside [-1, 1]."""
    image = rng.uniform(-1.0, 1.0, size=(channels, *shape)).astype(np.float16).astype(np.float32)
    image[:, 0, :5] = [-1.0, 0.0, 1.0, -1.3, 1.2]
    return image


def label_map(rng: np.random.Generator, ids: list[int], shape=(24, 20)) -> np.ndarray:
    label = rng.choice(np.array(ids, dtype=np.uint8), size=shape)
    label[0, 0], label[-1, -1] = vocab.IGNORE, 0
    return label


def ct_sample(sample_id: str = "ct0001", seed: int = 0, **kwargs) -> ExportSlice:
    rng = np.random.default_rng(seed)
    liver, spleen = vocab.structure("liver").id, vocab.structure("spleen").id
    defaults = dict(sample_id=sample_id, image_CHW=model_image(rng, 1), label_HW=label_map(rng, [0, liver, spleen]),
                    channels=("ct",), affine=oblique_affine(), intensity=(ct_window_mapping(CT_WINDOW_HU),),
                    structures=("liver", "spleen"), domain="ct/abdomen")
    return ExportSlice(**{**defaults, **kwargs})


def mr_sample(sample_id: str = "mr0001", seed: int = 1, **kwargs) -> ExportSlice:
    rng = np.random.default_rng(seed)
    defaults = dict(sample_id=sample_id, image_CHW=model_image(rng, 2), label_HW=label_map(rng, [0, PZ, TZ]),
                    channels=("t2", "adc"), affine=canonical_affine(0.6, (24, 20), slice_thickness_mm=3.6),
                    intensity=(T2, ADC.to_dict()), structures=("prostate_peripheral_zone",), domain="mr/prostate")
    return ExportSlice(**{**defaults, **kwargs})


def read_png_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        array = np.array(image)
        return array.astype(np.uint16) if image.mode.startswith("I") else array


# ---------------------------------------------------------------- the sample and its affine


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_canonical_affine_follows_the_prepare_display_convention(plane):
    from medaug.prepare.geometry import full_grid, slice_affines

    spacing, thickness, (height, width) = 0.75, 2.5, (6, 9)
    canonical = canonical_affine(spacing, (height, width), plane, slice_thickness_mm=thickness)
    normal_axis, row_axis, col_axis = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}[plane]
    voxel_mm = np.zeros(3)
    voxel_mm[[row_axis, col_axis, normal_axis]] = (spacing, spacing, thickness)
    shape = np.ones(3, dtype=int)
    shape[[row_axis, col_axis]] = (height, width)
    grid = full_grid(np.diag([*voxel_mm, 1.0]), tuple(shape), plane, spacing)
    prepared = slice_affines(np.diag([*voxel_mm, 1.0]), grid, np.array([0]))[0]
    np.testing.assert_allclose(canonical[:3, :3], prepared[:3, :3])  # same directions and lengths as prepare
    centre = canonical @ np.array([(height - 1) / 2, (width - 1) / 2, 0.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)


def test_canonical_axial_affine_puts_anterior_up_and_patient_right_left():
    affine = canonical_affine((0.5, 0.8), (10, 12))
    top_left, bottom_right = affine @ [0, 0, 0, 1], affine @ [9, 11, 0, 1]
    assert top_left[1] > bottom_right[1]  # row 0 is more anterior (+y)
    assert top_left[0] > bottom_right[0]  # column 0 is the patient's right (+x)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.5, 0.8, 0.5])


@pytest.mark.parametrize("change, match", [
    ({"sample_id": "a/b"}, "file-name safe"),
    ({"channels": ("label",)}, "channels"),
    ({"label_HW": np.zeros((24, 20), dtype=np.int32)}, "uint8"),
    ({"image_CHW": np.zeros((2, 24, 20), dtype=np.float32)}, "C=1"),
    ({"intensity": ()}, "intensity mappings"),
    ({"affine": np.zeros((4, 4))}, "singular"),
], ids=["id", "channel-name", "label-dtype", "channels", "mappings", "affine"])
def test_export_slice_refuses_bad_input(change, match):
    with pytest.raises(ExportError, match=match):
        ct_sample(**change)


# ---------------------------------------------------------------- PNG


def test_png_16bit_channels_are_the_linear_formula_and_label_is_the_label(tmp_path):
    sample = mr_sample()
    paths = write_png_sample(sample, tmp_path)
    assert [path.name for path in paths] == ["mr0001_t2.png", "mr0001_adc.png", "mr0001_label.png"]
    for channel, path in enumerate(paths[:2]):
        model = np.clip(sample.image_CHW[channel].astype(np.float64), -1, 1)
        expected = np.round((model + 1) / 2 * 65535).astype(np.uint16)
        read = read_png_array(path)
        assert read.dtype == np.uint16
        np.testing.assert_array_equal(read, expected)
    assert read_png_array(paths[0])[0, :5].tolist() == [0, 32768, 65535, 0, 65535]
    label = read_png_array(paths[2])
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, sample.label_HW)
    with Image.open(paths[1]) as image:
        assert "source = m * 1349.865 + 1467.135 a.u." in image.info["Description"]


@pytest.mark.parametrize("window", [None, (40.0, 400.0), (0.0, 100.0)], ids=["domain", "abdomen", "narrow"])
def test_png_8bit_window_is_the_windowing_formula_in_hu(tmp_path, window):
    sample = ct_sample()
    path = write_png_sample(sample, tmp_path, PngOptions(bits=8, window=window))[0]
    low, high = CT_WINDOW_HU
    hu = low + (np.clip(sample.image_CHW[0].astype(np.float64), -1, 1) + 1) / 2 * (high - low)
    centre, width = window if window is not None else ((low + high) / 2, high - low)
    expected = np.round(np.clip((hu - centre + width / 2) / width, 0, 1) * 255).astype(np.uint8)
    read = read_png_array(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, expected)


def test_png_8bit_window_per_channel(tmp_path):
    sample = mr_sample()
    paths = write_png_sample(sample, tmp_path, PngOptions(bits=8, window={"adc": (1000.0, 800.0)}))
    t2 = np.clip(sample.image_CHW[0].astype(np.float64), -1, 1)
    np.testing.assert_array_equal(read_png_array(paths[0]), np.round((t2 + 1) / 2 * 255).astype(np.uint8))
    adc = np.clip(sample.image_CHW[1].astype(np.float64), -1, 1) * ADC.scale + ADC.offset
    expected = np.round(np.clip((adc - 600.0) / 800.0, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_png_array(paths[1]), expected)


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgb"])
def test_encode_png_round_trips_through_pillow(tmp_path, kind, level):
    rng = np.random.default_rng(3)
    array = {"gray8": rng.integers(0, 256, (13, 7), dtype=np.uint8),
             "gray16": rng.integers(0, 65536, (13, 7), dtype=np.uint16),
             "rgb": rng.integers(0, 256, (13, 7, 3), dtype=np.uint8)}[kind]
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(array, level, {"Software": "medaug"}))
    np.testing.assert_array_equal(read_png_array(path), array)


def test_png_options_refuse_a_window_for_16bit():
    with pytest.raises(ExportError, match="8-bit"):
        PngOptions(bits=16, window=(40.0, 400.0))


def test_montage_places_overlay_tiles_in_a_grid(tmp_path):
    from medaug.prepare.inspect import overlay_rgb

    samples = [ct_sample(f"s{number}", seed=number) for number in range(5)]
    path = write_montage(samples, tmp_path / "montage.png", columns=3)
    montage = read_png_array(path)
    height, width = 24, 20
    assert montage.shape == (2 * height + 2, 3 * width + 4, 3)
    tile = montage[height + 2:2 * height + 2, width + 2:2 * width + 2]  # sample 4: row 1, column 1
    np.testing.assert_array_equal(tile, overlay_rgb(samples[4].image_CHW[0], samples[4].label_HW))
    assert not montage[height:height + 2].any() and not montage[height + 2:, 2 * width + 4:].any()


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
def test_nifti_ct_round_trip_affine_spacing_and_hu(tmp_path, compress):
    sample = ct_sample()
    image_path, label_path = write_nifti_sample(sample, tmp_path, NiftiOptions(compress=compress))
    assert image_path.name == ("ct0001_ct.nii.gz" if compress else "ct0001_ct.nii")
    volume = read_nifti(image_path)
    assert volume.array.shape == (1, 24, 20, 1) and volume.metadata["stored_dtype"] == "int16"
    np.testing.assert_allclose(volume.affine, sample.affine, atol=1e-4)  # the header stores float32
    np.testing.assert_allclose(volume.spacing_mm, [0.7, 0.8, 3.0], rtol=1e-6)
    np.testing.assert_allclose(sample.spacing_mm, [0.7, 0.8, 3.0])
    low, high = CT_WINDOW_HU
    hu = low + (np.clip(sample.image_CHW[0].astype(np.float64), -1, 1) + 1) / 2 * (high - low)
    tolerance = 0.5 + (high - low) / 2 * FLOAT16_EPS
    assert np.abs(volume.array[0, :, :, 0] - hu).max() <= tolerance
    label = read_nifti(label_path)
    assert label.metadata["stored_dtype"] == "uint8"
    np.testing.assert_array_equal(label.array[0, :, :, 0], sample.label_HW)
    np.testing.assert_allclose(label.affine, sample.affine, atol=1e-4)


def test_nifti_mr_channels_are_float32_in_the_mapping_units(tmp_path):
    sample = mr_sample()
    paths = write_nifti_sample(sample, tmp_path)
    for channel, mapping in enumerate((T2, ADC)):
        volume = read_nifti(paths[channel])
        assert volume.metadata["stored_dtype"] == "float32"
        expected = np.clip(sample.image_CHW[channel].astype(np.float64), -1, 1) * (mapping.high - mapping.low) / 2 \
            + (mapping.high + mapping.low) / 2
        np.testing.assert_allclose(volume.array[0, :, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(read_nifti(paths[0]).spacing_mm, [0.6, 0.6, 3.6], rtol=1e-6)


def test_nifti_geometry_as_simpleitk_reads_it(tmp_path):
    import SimpleITK as sitk

    sample = ct_sample()
    image = sitk.ReadImage(str(write_nifti_sample(sample, tmp_path)[0]))
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.GetOrigin(), lps @ sample.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 0.8, 3.0], rtol=1e-5)
    directions = lps @ sample.affine[:3, :3] / np.array([0.7, 0.8, 3.0])
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), directions, atol=1e-5)


LEFT_HANDED = np.array([[0.9, 0.0, 0.1, -20.0], [0.0, 0.8, 0.0, 5.0], [0.0, 0.0, -2.0, 40.0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("affine", [oblique_affine(), canonical_affine(0.6, (24, 20)), LEFT_HANDED],
                         ids=["oblique", "canonical", "left-handed"])
def test_nifti_bytes_equal_write_nifti_apart_from_the_description(tmp_path, affine):
    sample = mr_sample(affine=affine)
    ours = write_nifti_sample(sample, tmp_path / "ours")[1].read_bytes()
    values = np.clip(sample.image_CHW[1].astype(np.float64), -1, 1) * ADC.scale + ADC.offset
    reference = write_nifti(Volume(values.astype(np.float32)[None, :, :, None], sample.affine), tmp_path / "ref.nii")
    reference = reference.read_bytes()
    descrip = slice(148, 228)  # NIfTI-1 header field ``descrip``, char[80]
    assert len(ours) == len(reference)
    assert ours[:descrip.start] + ours[descrip.stop:] == reference[:descrip.start] + reference[descrip.stop:]
    assert ours[descrip].rstrip(b"\0") == b"medaug synthetic a.u."


# ---------------------------------------------------------------- export_batch and resume


def test_export_batch_writes_both_formats_and_resumes(tmp_path):
    samples = [ct_sample("a0"), mr_sample("b0"), ct_sample("a1", seed=5)]
    first = export_batch(samples, tmp_path, formats=("png", "nifti"), workers=2)
    assert first.written == ["a0", "b0", "a1"] and first.skipped == []
    assert [path.name for path in first.paths["b0"]] == ["b0_t2.png", "b0_adc.png", "b0_label.png",
                                                         "b0_t2.nii", "b0_adc.nii", "b0_label.nii"]
    assert all(path.is_file() for paths in first.paths.values() for path in paths)
    untouched = first.paths["a0"][0].stat().st_mtime_ns
    first.paths["b0"][4].unlink()
    second = export_batch(samples, tmp_path, formats=("png", "nifti"), workers=2)
    assert second.written == ["b0"] and second.skipped == ["a0", "a1"]
    assert first.paths["b0"][4].is_file() and first.paths["a0"][0].stat().st_mtime_ns == untouched
    assert not list(tmp_path.rglob(".part-*"))


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ("png", "tiff")}, "expected one or more of png, nifti, dicom, nnunet"),
    ({"formats": ("nnunet",)}, "open dataset"),
], ids=["unknown-format", "nnunet-without-dataset"])
def test_export_batch_refuses_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export_batch([ct_sample()], tmp_path, **kwargs)


def test_export_batch_refuses_duplicate_sample_ids(tmp_path):
    with pytest.raises(ExportError, match="twice"):
        export_batch([ct_sample("same"), ct_sample("same", seed=2)], tmp_path)


# ---------------------------------------------------------------- nnU-Net


def test_nnunet_labels_are_consecutive_and_resolve_through_the_hierarchy():
    labels = NnunetLabels.from_names(["prostate", "liver", "kidney_left"])
    by_id = sorted(["prostate", "liver", "kidney_left"], key=lambda name: vocab.structure(name).id)
    assert labels.structures == tuple(by_id)
    number = {name: index for index, name in enumerate(by_id, start=1)}
    lut = labels.lut
    assert lut[0] == 0 and lut[vocab.IGNORE] == 4 == labels.ignore_label
    assert lut[vocab.structure("liver").id] == number["liver"]
    assert lut[PZ] == lut[TZ] == number["prostate"]  # zones → their parent in the set
    assert lut[vocab.structure("liver_tumor").id] == number["liver"]
    assert lut[vocab.structure("kidney").id] == 4  # coarser than kidney_left: which side is unknown
    assert lut[vocab.structure("spleen").id] == 0  # labelled, and none of the set
    assert labels.labels_json(True) == {"background": 0, **number, "ignore": 4}


def test_nnunet_background_becomes_ignore_where_a_structure_is_not_annotated():
    labels = NnunetLabels.from_names(["liver", "spleen"])
    liver = vocab.structure("liver").id
    label = np.array([[0, liver], [vocab.IGNORE, 0]], dtype=np.uint8)
    assert labels.structures == ("spleen", "liver")  # vocabulary ids 1 and 5
    np.testing.assert_array_equal(labels.to_nnunet(label, ["liver", "spleen", "aorta"]), [[0, 2], [3, 0]])
    np.testing.assert_array_equal(labels.to_nnunet(label, ["liver"]), [[3, 2], [3, 3]])
    assert labels.covered_by(["liver", "spleen"]) and not labels.covered_by(["liver"])
    assert NnunetLabels.from_names(["prostate_peripheral_zone"]).covered_by(["prostate"])
    assert NnunetLabels.from_names(["prostate"]).covered_by(["prostate_peripheral_zone", "prostate_transition_zone"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two MR prostate and two CT abdomen phantoms through the real prepare pipeline, at 64²."""
    from tests.train.conftest import write_tiny_prepared

    return write_tiny_prepared(tmp_path_factory.mktemp("synth-export"), ["mr_prostate", "ct_abdomen"], n=2)


def check_nnunet_raw(folder: Path) -> dict:
    """What nnU-Net's verify_dataset_integrity checks, with SimpleITK (nnU-Net's default reader for .nii.gz)."""
    import SimpleITK as sitk

    meta = json.loads((folder / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(meta)
    ending, channels = meta["file_ending"], len(meta["channel_names"])
    label_files = sorted(path.name for path in (folder / "labelsTr").iterdir())
    cases = [name[: -len(ending)] for name in label_files]
    assert all(name.endswith(ending) for name in label_files) and len(cases) == meta["numTraining"]
    image_files = sorted(path.name for path in (folder / "imagesTr").iterdir())
    assert image_files == sorted(f"{case}_{k:04d}{ending}" for case in cases for k in range(channels))
    values = sorted(meta["labels"].values())
    assert values == list(range(len(values)))  # consecutive, 0 = background
    if "ignore" in meta["labels"]:
        assert meta["labels"]["ignore"] == values[-1]
    for case in cases:
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}{ending}"))
        assert set(np.unique(sitk.GetArrayFromImage(label))) <= set(values)
        for k in range(channels):
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_{k:04d}{ending}"))
            assert image.GetSize() == label.GetSize()
            assert not np.isnan(sitk.GetArrayFromImage(image)).any()
            for get in ("GetSpacing", "GetOrigin", "GetDirection"):
                np.testing.assert_allclose(getattr(image, get)(), getattr(label, get)(), rtol=1e-5, atol=1e-5)
    verify_with_nnunet(folder)
    return meta


def verify_with_nnunet(folder: Path) -> None:
    """nnU-Net v2's own ``verify_dataset_integrity`` (raises on a bad dataset), where nnunetv2 is installed.

    CI does not install it (it pulls a CUDA build of torch); it ran here with nnunetv2 2.8.1 (2026-11-29)."""
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError:
        return
    verify_dataset_integrity(str(folder), 1)


def nnunet_label_file(folder: Path, case: str) -> np.ndarray:
    return read_nifti(folder / "labelsTr" / f"{case}.nii.gz").array[0, :, :, 0]


def test_nnunet_real_and_synthetic_share_one_dataset_and_label_mapping(prepared, tmp_path):
    from medaug.data.index import read_index
    from medaug.data.shards import ShardStore

    folder = tmp_path / "Dataset501_Prostate"
    real = export_prepared_to_nnunet(prepared, folder, split="train", domain="mr/prostate")
    rows = [row for row in read_index(prepared / "index.parquet").to_pylist()
            if row["split"] == "train" and row["domain"] == "mr/prostate"]
    assert real.written == len(rows) > 0 and real.skipped_unlabelled == 0
    meta = check_nnunet_raw(folder)
    assert meta["channel_names"] == {"0": "t2", "1": "adc"} and "ignore" not in meta["labels"]
    by_vocab_id = {vocab.structure(name).id: number for name, number in meta["labels"].items() if name != "background"}
    row = rows[len(rows) // 2]
    stored_label = ShardStore(prepared).read(row["shard"], row["shard_row"])[1]
    expected = np.vectorize(lambda value: by_vocab_id.get(int(value), 0))(stored_label)
    case = f"real_{row['volume_id']}_{row['slice_index']:04d}"
    np.testing.assert_array_equal(nnunet_label_file(folder, case), expected)

    dataset = open_nnunet_dataset(folder, ("t2", "adc"), ("a.u.", "a.u."))  # structures from dataset.json
    coarse = np.full((24, 20), vocab.structure("prostate").id, dtype=np.uint8)  # zone unknown → ignore
    samples = [mr_sample("s0"), mr_sample("s1", seed=4, label_HW=coarse)]
    result = export_batch(samples, formats=("nnunet",), nnunet=dataset)
    assert result.written == ["s0", "s1"]
    after = check_nnunet_raw(folder)
    assert after["numTraining"] == len(rows) + 2
    assert after["labels"] == {**meta["labels"], "ignore": len(meta["labels"])}  # same mapping, ignore appended
    ignore = after["labels"]["ignore"]
    synthetic = np.vectorize(lambda value: ignore if value == vocab.IGNORE else by_vocab_id.get(int(value), 0))
    np.testing.assert_array_equal(nnunet_label_file(folder, "syn_s0"), synthetic(samples[0].label_HW))
    assert (nnunet_label_file(folder, "syn_s1") == ignore).all()
    adc = read_nifti(folder / "imagesTr" / "syn_s0_0001.nii.gz").array[0, :, :, 0]
    np.testing.assert_allclose(adc, np.clip(samples[0].image_CHW[1], -1, 1) * ADC.scale + ADC.offset, rtol=1e-6)


def test_nnunet_export_resumes_and_refuses_mixing(prepared, tmp_path):
    folder = tmp_path / "Dataset502_Abdomen"
    first = export_prepared_to_nnunet(prepared, folder, split=None, domain="ct/abdomen")
    meta = check_nnunet_raw(folder)
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == first.written
    stale = folder / "imagesTr" / ".part-999999999-real_x_0000.nii.gz"  # a killed writer's (no such process)
    stale.write_bytes(b"partial")
    again = export_prepared_to_nnunet(prepared, folder, split=None, domain="ct/abdomen")
    assert not stale.exists()
    assert again.written == 0 and again.skipped_existing == first.written
    assert check_nnunet_raw(folder)["numTraining"] == first.written
    with pytest.raises(ExportError, match="refusing to mix"):
        export_prepared_to_nnunet(prepared, folder, split=None, domain="mr/prostate")
    with pytest.raises(ExportError, match="same label mapping"):
        open_nnunet_dataset(folder, ("ct",), ("HU",), structures=["liver"])
    dataset = open_nnunet_dataset(folder, ("ct",), ("HU",))
    with pytest.raises(ExportError, match="same channels and units"):
        dataset.add(mr_sample())
    with pytest.raises(ExportError, match="pass domain="):
        export_prepared_to_nnunet(prepared, tmp_path / "Dataset503_Both", split=None)
    with pytest.raises(ExportError, match="DatasetXXX_Name"):
        open_nnunet_dataset(tmp_path / "prostate", ("ct",), ("HU",), structures=["liver"])
