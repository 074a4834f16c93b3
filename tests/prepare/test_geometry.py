"""Geometry steps: RAS reorientation, slicing plane, label alignment, resampling, crop/pad.

Each test checks the result against an independent computation through the affines (world
positions), never against the code's own index bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pytest

from medaug.errors import LabelError
from medaug.io.volume import Volume
from medaug.prepare.geometry import (
    HarmonizeError,
    align_label_to_image,
    body_window,
    choose_slicing_plane,
    crop_or_pad,
    reorient_to_ras,
    resample_slices,
    sample_slices,
    full_grid,
)

AXIS_OF = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def affine_for(axcodes: str, spacing_mm, origin_mm, rotation_deg: float = 0.0) -> np.ndarray:
    """A voxel→RAS affine whose voxel axes point to ``axcodes`` (e.g. "LPS"), optionally rotated about z."""
    affine = np.eye(4)
    for voxel_axis, code in enumerate(axcodes):
        world_axis, sign = AXIS_OF[code]
        affine[:3, voxel_axis] = 0.0
        affine[world_axis, voxel_axis] = sign * spacing_mm[voxel_axis]
    angle = np.deg2rad(rotation_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rotation @ affine[:3, :3]
    affine[:3, 3] = origin_mm
    return affine


def all_voxels(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)


# ---------------------------------------------------------------- reorientation


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PSL", "ILA"])
def test_reorient_to_ras_keeps_every_voxel_at_its_world_position(axcodes):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    volume = Volume(array, affine_for(axcodes, (0.7, 1.3, 2.1), (10.0, -20.0, 30.0), rotation_deg=12.0))
    ras = reorient_to_ras(volume)
    assert ras.orientation == "RAS"
    assert ras.metadata["source_orientation"] == axcodes
    source = all_voxels(volume.spatial_shape)
    target = ras.world_to_voxel(volume.voxel_to_world(source))
    np.testing.assert_allclose(target, np.round(target), atol=1e-6)  # lands on a voxel centre
    target = np.round(target).astype(int)
    for channel in range(2):
        np.testing.assert_array_equal(ras.array[channel][tuple(target.T)], array[channel][tuple(source.T)])


# ---------------------------------------------------------------- slicing plane


@pytest.mark.parametrize(
    ("spacing", "requested", "hint", "expected"),
    [
        ((1.0, 1.0, 1.0), "auto", None, "axial"),
        ((0.8, 0.8, 3.0), "auto", None, "axial"),
        ((3.0, 0.8, 0.8), "auto", None, "sagittal"),
        ((0.8, 4.0, 0.8), "auto", None, "coronal"),
        ((1.0, 1.0, 1.08), "auto", None, "axial"),  # within 10%: treated as isotropic
        ((1.0, 1.08, 1.0), "auto", None, "axial"),
        ((0.5, 3.0, 3.0), "auto", None, "axial"),  # no single coarsest axis
        ((3.0, 0.8, 0.8), "coronal", None, "coronal"),  # the recipe wins
        ((1.0, 1.0, 1.0), "auto", "Sagittal", "sagittal"),  # DICOM hint beats the isotropic default
        ((0.8, 0.8, 3.0), "auto", "coronal", "coronal"),
        ((0.8, 0.8, 3.0), "auto", "oblique", "axial"),  # unknown hint ignored
    ],
    ids=["iso", "axial-stack", "sagittal-stack", "coronal-stack", "near-iso-z", "near-iso-y",
         "two-coarse", "recipe", "hint", "hint-over-spacing", "bad-hint"],
)
def test_choose_slicing_plane(spacing, requested, hint, expected):
    assert choose_slicing_plane(np.array(spacing), requested, hint) == expected


def test_dicom_slice_axis_names_the_acquisition_plane():
    """An isotropic DICOM series stacked along y (coronal acquisition) is sliced coronally."""
    from medaug.prepare.geometry import acquisition_plane_hint

    coronal_lps = affine_for("LSP", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # i → L, j → S, k (slices) → P
    volume = Volume(np.zeros((1, 4, 4, 4)), coronal_lps, {"format": "dicom"})
    assert acquisition_plane_hint(volume) == "coronal"
    assert choose_slicing_plane(reorient_to_ras(volume).spacing_mm, "auto", acquisition_plane_hint(volume)) == "coronal"
    assert acquisition_plane_hint(Volume(np.zeros((1, 4, 4, 4)), coronal_lps, {"format": "nifti"})) is None
    assert acquisition_plane_hint(Volume(np.zeros((1, 4, 4, 4)), coronal_lps, {"acquisition_plane": "sagittal"})) == "sagittal"


def test_choose_slicing_plane_rejects_unknown_plane():
    with pytest.raises(HarmonizeError, match="transverse"):
        choose_slicing_plane(np.ones(3), "transverse")


# ---------------------------------------------------------------- label alignment


def test_align_label_flipped_storage_is_exact():
    """A label stored with j and k flipped (its affine says so) comes back on the image's voxel order."""
    rng = np.random.default_rng(1)
    shape = (6, 7, 5)
    image = Volume(np.zeros((1, *shape)), affine_for("LPS", (0.9, 0.9, 2.0), (100.0, 80.0, -50.0)))
    truth = rng.integers(0, 9, size=shape).astype(np.uint8)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    flip[1, 3], flip[2, 3] = shape[1] - 1, shape[2] - 1  # stored index j' = J-1-j, k' = K-1-k
    stored = Volume(truth[:, ::-1, ::-1][None].copy(), image.affine @ flip)
    np.testing.assert_array_equal(align_label_to_image(stored, image), truth)


def test_align_label_on_another_grid_is_nearest_by_world_position():
    rng = np.random.default_rng(2)
    image = Volume(np.zeros((1, 12, 10, 8)), affine_for("LPS", (1.0, 1.0, 1.5), (5.0, 3.0, -7.0)))
    label_affine = affine_for("RAS", (2.0, 2.0, 3.0), (-9.3, -10.1, -6.4))
    label_array = rng.integers(0, 5, size=(8, 7, 6)).astype(np.uint8)
    aligned = align_label_to_image(Volume(label_array[None], label_affine), image)
    voxels = all_voxels(image.spatial_shape)
    in_label = np.linalg.solve(label_affine, np.c_[image.voxel_to_world(voxels), np.ones(len(voxels))].T).T[:, :3]
    nearest = np.floor(in_label + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < label_array.shape), axis=1)
    expected = np.zeros(len(voxels), np.uint8)
    expected[inside] = label_array[tuple(nearest[inside].T)]
    assert inside.mean() > 0.3 and (~inside).any()  # the case covers both parts
    np.testing.assert_array_equal(aligned[tuple(voxels.T)], expected)


def test_align_label_refuses_a_label_elsewhere_in_the_world():
    image = Volume(np.zeros((1, 10, 10, 10)), affine_for("RAS", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    label = Volume(np.ones((1, 10, 10, 10), np.uint8), affine_for("RAS", (1.0, 1.0, 1.0), (0.0, 0.0, 500.0)),
                   metadata={"source_path": "seg.nii.gz"})
    with pytest.raises(LabelError, match="seg.nii.gz.*overlaps"):
        align_label_to_image(label, image)


def test_align_label_refuses_same_geometry_with_transposed_shape():
    affine = affine_for("RAS", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = Volume(np.zeros((1, 10, 12, 4)), affine)
    with pytest.raises(LabelError, match="shape"):
        align_label_to_image(Volume(np.zeros((1, 12, 10, 4), np.uint8), affine), image)


# ---------------------------------------------------------------- resampling and slice affines


EXPECTED_DIRECTIONS = {  # (row step, column step, normal) in RAS, display convention
    "axial": ((0, -1, 0), (-1, 0, 0), (0, 0, 1)),
    "coronal": ((0, 0, -1), (-1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 0, -1), (0, -1, 0), (1, 0, 0)),
}


def linear_world_volume(axcodes: str, shape, spacing, rotation_deg: float = 0.0) -> tuple[Volume, np.ndarray]:
    """A volume whose value at each voxel is a linear function of its RAS position, and that function."""
    volume = Volume(np.zeros((1, *shape), np.float32), affine_for(axcodes, spacing, (40.0, -60.0, 25.0), rotation_deg))
    coefficients = np.array([0.5, -1.25, 2.0, 7.0])
    voxels = all_voxels(shape)
    world = volume.voxel_to_world(voxels)
    volume.array[0][tuple(voxels.T)] = world @ coefficients[:3] + coefficients[3]
    return volume, coefficients


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_resampled_pixels_sit_where_their_affine_says(plane):
    """Bilinear sampling of a linear function is exact: every pixel must equal f(affine @ pixel)."""
    volume, coefficients = linear_world_volume("LPS", (21, 17, 13), (0.8, 0.9, 1.7), rotation_deg=7.0)
    stack = resample_slices(reorient_to_ras(volume), None, plane, 1.25)
    count, _, height, width = stack.images.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([rows.ravel(), cols.ravel(), np.zeros(rows.size), np.ones(rows.size)])  # (4, H*W)
    for n in range(count):
        world = (stack.affines[n] @ pixels)[:3].T
        expected = world @ coefficients[:3] + coefficients[3]
        np.testing.assert_allclose(stack.images[n, 0].ravel(), expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(stack.affines[:, :3, :2], axis=1), 1.25)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slice_affine_follows_the_display_convention(plane):
    volume, _ = linear_world_volume("LPS", (9, 8, 7), (1.0, 1.0, 2.0))
    stack = resample_slices(reorient_to_ras(volume), None, plane, 1.0)
    row_step, col_step, normal = EXPECTED_DIRECTIONS[plane]
    affine = stack.affines[0]
    np.testing.assert_allclose(affine[:3, 0] / np.linalg.norm(affine[:3, 0]), row_step, atol=1e-9)
    np.testing.assert_allclose(affine[:3, 1] / np.linalg.norm(affine[:3, 1]), col_step, atol=1e-9)
    np.testing.assert_allclose(affine[:3, 2] / np.linalg.norm(affine[:3, 2]), normal, atol=1e-9)


def test_labels_are_sampled_nearest_and_keep_their_ids():
    rng = np.random.default_rng(3)
    volume = Volume(np.zeros((1, 20, 18, 4), np.float32), affine_for("LPS", (0.7, 0.7, 3.0), (0.0, 0.0, 0.0)))
    ras = reorient_to_ras(volume)
    label = rng.integers(0, 4, size=ras.spatial_shape).astype(np.uint8) * 60
    stack = resample_slices(ras, label, "axial", 1.1)
    assert stack.labels.dtype == np.uint8 and set(np.unique(stack.labels)) <= {0, 60, 120, 180}
    height, width = stack.labels.shape[1:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    for n in range(stack.labels.shape[0]):
        world = (stack.affines[n] @ np.stack([rows.ravel(), cols.ravel(), 0 * rows.ravel(), 1 + 0 * rows.ravel()]))[:3].T
        nearest = np.floor(ras.world_to_voxel(world) + 0.5).astype(int)
        np.testing.assert_array_equal(stack.labels[n].ravel(), label[tuple(nearest.T)])


@pytest.mark.parametrize("image_dtype", [">f4", np.uint16, np.float64, np.int16])
@pytest.mark.parametrize("label_dtype", [">i2", np.uint16, np.uint8])
def test_sampling_accepts_stored_dtypes(image_dtype, label_dtype):
    """Big-endian and unsigned arrays (as files store them) sample like their native float/int values."""
    rng = np.random.default_rng(4)
    volume = Volume(rng.integers(0, 1000, size=(1, 9, 8, 3)).astype(image_dtype), affine_for("RAS", (1.0, 1.0, 2.0), (0, 0, 0)))
    label = rng.integers(0, 300, size=(9, 8, 3)).astype(label_dtype)
    reference = resample_slices(Volume(volume.array.astype(np.float64), volume.affine), label.astype(np.int64), "axial", 1.5)
    stack = resample_slices(volume, label, "axial", 1.5)
    np.testing.assert_allclose(stack.images, reference.images, rtol=1e-6)
    np.testing.assert_array_equal(stack.labels, reference.labels)


def test_upsampling_beyond_twice_is_refused_with_the_spacing():
    volume = Volume(np.zeros((1, 8, 8, 8)), affine_for("RAS", (3.0, 3.0, 3.0), (0.0, 0.0, 0.0)))
    with pytest.raises(HarmonizeError, match=r"3 mm.*at most 2×"):
        resample_slices(volume, None, "axial", 1.0)
    assert resample_slices(volume, None, "axial", 1.5).images.shape[2:] == (15, 15)  # exactly 2×: allowed


def test_window_straight_from_the_volume_equals_full_view_then_crop_or_pad():
    volume, _ = linear_world_volume("LPS", (40, 30, 6), (0.9, 0.9, 2.5))
    ras = reorient_to_ras(volume)
    body = np.zeros(ras.spatial_shape, bool)
    body[5:20, 3:12, 1:5] = True  # off-centre body so the window is shifted
    label = body.astype(np.uint8) * 7
    full = resample_slices(ras, label, "axial", 0.6)
    body_NHW = sample_slices(body[None], full_grid(ras.affine, ras.spatial_shape, "axial", 0.6), np.arange(6), linear=False)[:, 0]
    cropped = crop_or_pad(full, body_NHW, 48, image_fill=-5.0)
    direct = resample_slices(ras, label, "axial", 0.6, size=48, body_IJK=body, image_fill=-5.0)
    np.testing.assert_allclose(direct.images, cropped.images, atol=1e-4)
    np.testing.assert_array_equal(direct.labels, cropped.labels)
    np.testing.assert_allclose(direct.affines, cropped.affines, atol=1e-9)
    assert (direct.images == -5.0).any()  # the window needed padding


def test_crop_or_pad_centres_the_body_and_pads():
    images = np.arange(2 * 1 * 10 * 12, dtype=np.float32).reshape(2, 1, 10, 12)
    affines = np.repeat(np.eye(4)[None], 2, axis=0)
    from medaug.prepare.geometry import SliceStack

    stack = SliceStack(images, None, affines, np.arange(2), "axial")
    body = np.zeros((2, 10, 12), bool)
    body[0, 1:4, 8:12] = True  # bounding box rows 1..3, cols 8..11 → centre (2, 9.5)
    out = crop_or_pad(stack, body, 6, image_fill=-1.0)
    top, left = body_window(body.any(axis=0), 6)
    assert (top, left) == (0, 7)  # round(2 - 2.5) = 0 (half up), round(9.5 - 2.5) = 7
    np.testing.assert_array_equal(out.images[:, :, :, :5], images[:, :, 0:6, 7:12])
    assert (out.images[:, :, :, 5] == -1.0).all()
    np.testing.assert_allclose(out.affines[0, :3, 3], [top, left, 0])  # identity pixel→world moved by the window
