"""Label remapping, structure counts and the whole ``harmonize_volume`` on synthetic and real scans.

Real-scan checks go through physical space: a pixel's slice affine names a world point, and the
source volume (read independently, in its stored orientation) says what lies there.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medaug.errors import LabelError
from medaug.io.volume import LPS_TO_RAS, Volume
from medaug.prepare.harmonize import (
    HarmonizeError,
    align_label_to_image,
    harmonize_volume,
    remap_labels,
    structure_pixel_counts,
    structure_pixel_counts_batch,
)

VOCAB = {"spleen": 1, "kidney_right": 2, "liver": 5, "aorta": 52}
TOTALSEG_V2 = {1: "spleen", 2: "kidney_right", 5: "liver", 52: "aorta"}  # TotalSegmentator v2 multilabel ids


# ---------------------------------------------------------------- remap and counts


@pytest.mark.parametrize(("unmapped", "value_for_7"), [("background", 0), ("ignore", 255)])
def test_remap_labels_unmapped_policy(unmapped, value_for_7):
    source = np.array([[0, 1, 2], [7, 1, 0]], dtype=np.int16)
    table = {1: "liver", 2: "ignore", 3: "spleen"}
    mapped, annotated = remap_labels(source, table, unmapped, VOCAB)
    expected = np.array([[0, 5, 255], [value_for_7, 5, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(mapped, expected)
    assert mapped.dtype == np.uint8
    assert annotated == ["spleen", "liver"]  # what the table labels at all, by vocabulary id


def test_remap_labels_reject_names_the_unmapped_ids():
    source = np.array([0, 1, 9, 12, 9], dtype=np.uint8)
    with pytest.raises(LabelError, match=r"seg\.nii\.gz.*\[9, 12\]"):
        remap_labels(source, {1: "liver"}, "reject", VOCAB, where="seg.nii.gz")
    mapped, _ = remap_labels(np.array([0, 1, 1]), {1: "liver"}, "reject", VOCAB)  # 0 is background
    np.testing.assert_array_equal(mapped, [0, 5, 5])


def test_remap_labels_checks_values_and_names():
    mapped, _ = remap_labels(np.array([0.0, 5.0, 1.0]), TOTALSEG_V2, "reject", VOCAB)  # float storage of ids
    np.testing.assert_array_equal(mapped, [0, 5, 1])
    with pytest.raises(LabelError, match="non-integer"):
        remap_labels(np.array([0.5]), TOTALSEG_V2, "reject", VOCAB)
    with pytest.raises(LabelError, match="'pancreas'"):
        remap_labels(np.array([1]), {1: "pancreas"}, "reject", VOCAB)
    with pytest.raises(HarmonizeError, match="unmapped"):
        remap_labels(np.array([1]), {1: "liver"}, "drop", VOCAB)


def test_structure_pixel_counts_match_np_unique():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 5, 52, 255], np.uint8), size=(4, 16, 16), p=[0.5, 0.2, 0.1, 0.1, 0.1])
    batch = structure_pixel_counts_batch(labels)
    for n in range(4):
        values, counts = np.unique(labels[n], return_counts=True)
        expected = {int(v): int(c) for v, c in zip(values, counts) if v not in (0, 255)}
        assert structure_pixel_counts(labels[n]) == expected
        np.testing.assert_array_equal(batch[n, values], counts)


# ---------------------------------------------------------------- harmonize_volume, synthetic


def lps_ct_with_dot(dot_ijk=(23, 31, 5)) -> tuple[Volume, Volume, np.ndarray]:
    """A 0.8 × 0.8 × 2.5 mm CT stored LPS: a 40 HU ellipse body, one 1000 HU voxel at ``dot_ijk`` (label 5
    on the 3 × 3 in-plane voxels around it).

    Returns (image, label, the dot's RAS position in mm).
    """
    shape = (60, 50, 12)
    affine = LPS_TO_RAS @ np.array([[0.8, 0, 0, -20.0], [0, 0.8, 0, 15.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    i, j = np.mgrid[: shape[0], : shape[1]]
    body_2d = ((i - 30) / 27.0) ** 2 + ((j - 25) / 22.0) ** 2 < 1
    hu = np.where(body_2d[:, :, None], 40, -1000).repeat(shape[2], axis=2).astype(np.int16)
    hu[dot_ijk] = 1000
    label = np.zeros(shape, np.uint8)
    di, dj, dk = dot_ijk
    label[di - 1 : di + 2, dj - 1 : dj + 2, dk] = 5  # 3 × 3 voxels: nearest sampling at 1 mm cannot miss it
    dot_world = (affine @ np.array([*dot_ijk, 1.0]))[:3]
    return Volume(hu[None], affine), Volume(label[None], affine), dot_world


def test_a_known_voxel_lands_on_the_pixel_its_slice_affine_names():
    image, label, dot_world = lps_ct_with_dot()
    result = harmonize_volume(image, label, modality="ct", channels=["ct"], target_spacing_mm=1.0, size=48,
                              intensity={"ct": {"window_hu": (-1000, 1000)}}, label_table={5: "liver"},
                              unmapped="reject", vocab_ids=VOCAB)
    assert result.images.shape == (12, 1, 48, 48) and result.plane == "axial"
    np.testing.assert_allclose(np.linalg.norm(result.affines[:, :3, :2], axis=1), 1.0)  # pixel spacing = target
    np.testing.assert_allclose(np.linalg.norm(result.affines[:, :3, 2], axis=1), 2.5)  # slice spacing kept
    pixel = np.array([np.linalg.solve(affine, [*dot_world, 1.0])[:3] for affine in result.affines])  # (N, 3)
    slice_row = int(np.flatnonzero(np.abs(pixel[:, 2]) < 1e-6)[0])
    row, col = np.floor(pixel[slice_row, :2] + 0.5).astype(int)
    image_HW = result.images[slice_row, 0]
    assert np.unravel_index(image_HW.argmax(), image_HW.shape) == (row, col)
    assert image_HW.max() > (40 + 0.25 * 960) / 1000  # at least a quarter of the dot survives bilinear
    assert result.labels[slice_row, row, col] == 5
    labelled = np.argwhere(result.labels == 5)  # (M, 3): slice row, pixel row, pixel column
    assert set(labelled[:, 0]) == {slice_row}
    world = np.einsum("ab,mb->ma", result.affines[slice_row], np.c_[labelled[:, 1:], np.zeros((len(labelled), 1)), np.ones((len(labelled), 1))])
    assert np.abs(world[:, :3] - dot_world).max() <= 1.5 * 0.8 + 1e-6  # inside the 3 × 3 voxel block
    assert result.pixel_counts[slice_row] == {5: len(labelled)}
    assert result.structures_annotated == ["liver"]


def test_empty_slices_are_dropped_and_reported_by_index():
    image, label, _ = lps_ct_with_dot()
    image.array[0, :, :, :3] = -1000  # no body on the 3 most inferior slices
    result = harmonize_volume(image, None, modality="ct", channels=["ct"], target_spacing_mm=1.0, size=48,
                              min_body_fraction=0.05)
    np.testing.assert_array_equal(result.slice_indices, np.arange(3, 12))  # RAS k = stored k (z not flipped)
    assert (result.body_fractions >= 0.05).all() and result.labels is None and result.pixel_counts is None
    assert result.num_source_slices == 12
    assert result.intensity["ct"].low == -1000.0  # CT default window


def test_no_slice_with_enough_body_gives_an_empty_result():
    image, label, _ = lps_ct_with_dot()
    result = harmonize_volume(image, label, modality="ct", channels=["ct"], target_spacing_mm=1.0, size=32,
                              min_body_fraction=0.999, label_table={5: "liver"}, vocab_ids=VOCAB)
    assert result.images.shape == (0, 1, 32, 32) and result.labels.shape == (0, 32, 32)
    assert result.affines.shape == (0, 4, 4) and result.pixel_counts == []


def test_acquisition_plane_hint_from_the_reader_is_used():
    image, _, _ = lps_ct_with_dot()
    image.metadata["acquisition_plane"] = "coronal"
    result = harmonize_volume(image, None, modality="ct", channels=["ct"], target_spacing_mm=1.25, size=32)
    assert result.plane == "coronal" and result.num_source_slices == 50  # slices along j
    np.testing.assert_allclose(result.affines[0, :3, 2], [0.0, 0.8, 0.0])  # normal +y, spacing 0.8 mm
    assert harmonize_volume(image, None, modality="ct", channels=["ct"], target_spacing_mm=1.25, size=32,
                            plane="axial").plane == "axial"  # the recipe wins over the hint


def test_intensity_spec_objects_and_channel_count():
    image, _, _ = lps_ct_with_dot()
    spec = SimpleNamespace(window_hu=(-160.0, 240.0), percentiles=None)  # like the recipe's ChannelIntensity
    result = harmonize_volume(image, None, modality="ct", channels=["ct"], target_spacing_mm=1.0, size=32,
                              intensity={"ct": spec})
    assert result.intensity_json == [{"channel": "ct", "kind": "ct_window", "low": -160.0, "high": 240.0, "units": "HU",
                                      "percentiles": None, "scale": 200.0, "offset": 40.0}]
    with pytest.raises(HarmonizeError, match="2 named"):
        harmonize_volume(image, None, modality="ct", channels=["ct", "pet"], target_spacing_mm=1.0)


# ---------------------------------------------------------------- real scans


def nearest_source_values(volume: Volume, affines_N44: np.ndarray, values_IJK: np.ndarray, height: int, width: int):
    """For every output pixel: the source voxel nearest its world position ((N, H, W) values, inside mask)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([rows.ravel(), cols.ravel(), np.zeros(rows.size), np.ones(rows.size)])
    world = np.einsum("nab,bp->npa", affines_N44, pixels)[..., :3]  # (N, H*W, 3)
    voxel = np.floor(volume.world_to_voxel(world) + 0.5).astype(int)
    inside = np.all((voxel >= 0) & (voxel < volume.spatial_shape), axis=-1)
    found = np.zeros(inside.shape, values_IJK.dtype)
    found[inside] = values_IJK[tuple(voxel[inside].T)]
    return found.reshape(-1, height, width), inside.reshape(-1, height, width)


@pytest.mark.real
def test_brats_is_sliced_axially_and_every_pixel_matches_its_world_position(real_dir):
    from medaug.io.nifti import read_nifti

    folder = real_dir / "brats2013" / "pat0005"
    flair, t1c = (read_nifti(folder / f"{name}_subtrMeanDivStd.nii.gz") for name in ("Flair", "T1c"))
    label = read_nifti(folder / "OTMultiClass.nii.gz")
    image = flair.with_array(np.concatenate([flair.array, t1c.array]))
    assert image.orientation == "LPS"
    table = {1: "spleen", 2: "kidney_right", 3: "liver", 4: "aorta"}  # stand-in names: the check is geometric
    vocab = {"spleen": 1, "kidney_right": 2, "liver": 3, "aorta": 4}
    result = harmonize_volume(image, label, modality="mr", channels=["flair", "t1c"], target_spacing_mm=1.0,
                              size=256, label_table=table, unmapped="reject", vocab_ids=vocab)
    assert result.plane == "axial"
    np.testing.assert_allclose(result.affines[:, :3, 2], np.tile([0.0, 0.0, 1.0], (len(result.affines), 1)), atol=1e-6)
    checked = slice(None, None, 7)  # every 7th slice keeps the test fast; each is checked pixel by pixel
    source_labels, inside = nearest_source_values(label, result.affines[checked], label.array[0].astype(np.uint8), 256, 256)
    np.testing.assert_array_equal(result.labels[checked], source_labels)
    source_flair, _ = nearest_source_values(flair, result.affines[checked], flair.array[0], 256, 256)
    expected = np.where(inside, result.intensity["flair"].to_model(source_flair), -1.0)
    np.testing.assert_allclose(result.images[checked, 0], expected, atol=1e-4)  # 1 mm → 1 mm: pixels are voxels
    assert (source_labels > 0).any() and (~inside).any()  # the checked slices hold tumour and padding
    tumour = sum(sum(counts.values()) for counts in result.pixel_counts)
    assert tumour == int((label.array > 0).sum())  # every tumour voxel kept (its slices have brain)


@pytest.mark.real
def test_ct_3mm_refuses_1mm_accepts_1_5mm_and_keeps_organ_hu(real_dir):
    from medaug.io.nifti import read_nifti

    folder = real_dir / "totalsegmentator"
    ct, seg = read_nifti(folder / "example_ct_sm.nii.gz"), read_nifti(folder / "example_seg.nii.gz")
    kwargs = dict(modality="ct", channels=["ct"], size=256, intensity={"ct": {"window_hu": (-160, 240)}},
                  label_table=TOTALSEG_V2, unmapped="background", vocab_ids=VOCAB)
    with pytest.raises(HarmonizeError, match=r"3 mm.*3\.00× upsampling"):
        harmonize_volume(ct, seg, target_spacing_mm=1.0, **kwargs)
    result = harmonize_volume(ct, seg, target_spacing_mm=1.5, **kwargs)
    hu = result.intensity["ct"].to_source(result.images[:, 0])
    for name, vocab_id in (("liver", 5), ("spleen", 1)):
        source_mean = ct.array[0][seg.array[0] == vocab_id].mean()
        assert abs(hu[result.labels == vocab_id].mean() - source_mean) < 5.0, name


def read_ct_dicom_series(folder: Path) -> Volume:
    """A plain pydicom reader (independent of medaug.io): slices sorted along the normal, HU, LPS→RAS."""
    import pydicom

    slices = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    row_dir, col_dir = (np.array(slices[0].ImageOrientationPatient[a:a + 3], float) for a in (0, 3))
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, float)))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], axis=-1)
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    first, second = (np.array(ds.ImagePositionPatient, float) for ds in slices[:2])
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1] = row_dir * col_mm, col_dir * row_mm  # i = column index, j = row index
    affine_lps[:3, 2], affine_lps[:3, 3] = second - first, first
    return Volume(hu.transpose(1, 0, 2)[None].astype(np.float32), LPS_TO_RAS @ affine_lps, {"source_path": str(folder)})


@pytest.fixture(scope="module")
def totalseg_dicom(real_dir):
    folder = real_dir / "totalsegmentator"
    from medaug.io.nifti import read_nifti

    return read_ct_dicom_series(folder / "example_ct_dicom"), read_nifti(folder / "example_seg_dicom.nii.gz")


@pytest.mark.real
def test_dicom_label_stored_with_flipped_axes_is_aligned_by_position(totalseg_dicom):
    image, label = totalseg_dicom
    assert image.orientation != label.orientation  # y flipped between the two (and z in storage order)
    aligned = align_label_to_image(label, image)
    hu = image.array[0]
    means = {name: hu[aligned == vocab_id].mean() for vocab_id, name in TOTALSEG_V2.items() if (aligned == vocab_id).any()}
    assert 75 <= means["spleen"] <= 95 and 80 <= means["liver"] <= 95  # contrast-enhanced parenchyma
    assert 140 <= means["aorta"] <= 200  # contrast in the aorta
    naive = hu[label.array[0] == 1].mean()  # pairing arrays by index puts the spleen in air and fat
    assert naive < 0


@pytest.mark.real
def test_dicom_ct_harmonized_slices_keep_organ_hu(real_dir, totalseg_dicom):
    from medaug.io import read_volume

    image = read_volume(real_dir / "totalsegmentator" / "example_ct_dicom")  # the project's DICOM reader
    _, label = totalseg_dicom
    assert image.metadata["format"] == "dicom"  # so the slice axis names the acquisition plane
    result = harmonize_volume(image, label, modality="ct", channels=["ct"], target_spacing_mm=1.0, size=256,
                              intensity={"ct": {"window_hu": (-160, 240)}}, label_table=TOTALSEG_V2,
                              unmapped="background", vocab_ids=VOCAB)
    assert result.plane == "axial" and result.images.shape[0] == 20
    hu = result.intensity["ct"].to_source(result.images[:, 0])
    assert 80 <= hu[result.labels == 5].mean() <= 95
    assert 75 <= hu[result.labels == 1].mean() <= 95
    assert result.structures_annotated == ["spleen", "kidney_right", "liver", "aorta"]
