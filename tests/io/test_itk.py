"""NRRD / MetaImage through SimpleITK: round trips, and the real pyradiomics NRRD against its own header."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from medaug.errors import ImageReadError
from medaug.io import read_volume
from medaug.io.itk import read_itk, write_itk
from medaug.io.volume import Volume

sitk = pytest.importorskip("SimpleITK")

LPS_TO_RAS_3 = np.diag([-1.0, -1.0, 1.0])


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.6, 0.9, 3.0])
    affine[:3, 3] = [12.5, -40.0, 88.0]
    return affine


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8], ids=["int16", "float32", "uint8"])
def test_round_trip(tmp_path: Path, suffix: str, dtype) -> None:
    rng = np.random.default_rng(0)
    values_IJK = (rng.uniform(0, 200, size=(5, 4, 3))).astype(dtype)
    volume = Volume(array=values_IJK[None], affine=_oblique_affine())
    path = write_itk(volume, tmp_path / f"image{suffix}")
    read = read_itk(path)
    assert read.array.shape == (1, 5, 4, 3) and read.array.dtype == dtype
    np.testing.assert_array_equal(read.array[0], values_IJK)
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-9)
    assert not list(tmp_path.glob(".part-*"))


def test_written_geometry_is_lps_for_simpleitk(tmp_path: Path) -> None:
    """What SimpleITK itself reads back: origin/direction in LPS, index (i, j, k) at the RAS point with x, y negated."""
    volume = Volume(array=np.zeros((1, 5, 4, 3), np.int16), affine=_oblique_affine())
    image = sitk.ReadImage(str(write_itk(volume, tmp_path / "geometry.mha")))
    assert image.GetSize() == (5, 4, 3)
    np.testing.assert_allclose(image.GetSpacing(), [0.6, 0.9, 3.0])
    for ijk in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        ras = volume.voxel_to_world(np.array(ijk))
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), LPS_TO_RAS_3 @ ras, atol=1e-9)


def test_writer_converts_dtypes_simpleitk_lacks(tmp_path: Path) -> None:
    big_endian_IJK = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    mask_IJK = big_endian_IJK % 3 == 0
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    read = read_itk(write_itk(Volume(big_endian_IJK[None], affine), tmp_path / "be.nrrd"))
    np.testing.assert_array_equal(read.array[0], big_endian_IJK)
    read_mask = read_itk(write_itk(Volume(mask_IJK[None], affine), tmp_path / "mask.nrrd"))
    assert read_mask.array.dtype == np.uint8
    np.testing.assert_array_equal(read_mask.array[0], mask_IJK)


def test_2d_image_becomes_one_slice(tmp_path: Path) -> None:
    values_JI = np.arange(12, dtype=np.uint16).reshape(3, 4)  # ITK/numpy order: rows = j
    image = sitk.GetImageFromArray(values_JI)
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((10.0, 20.0))
    path = tmp_path / "plane.nrrd"
    sitk.WriteImage(image, str(path))
    read = read_itk(path)
    assert read.array.shape == (1, 4, 3, 1)
    np.testing.assert_array_equal(read.array[0, :, :, 0], values_JI.T)
    np.testing.assert_allclose(read.voxel_to_world(np.array([3, 2, 0])), [-(10.0 + 1.5), -(20.0 + 0.5), 0.0])


def test_vector_image_components_become_channels(tmp_path: Path) -> None:
    values_KJIC = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    path = tmp_path / "vector.mha"
    sitk.WriteImage(sitk.GetImageFromArray(values_KJIC, isVector=True), str(path))
    read = read_itk(path)
    assert read.array.shape == (2, 4, 3, 2)
    np.testing.assert_array_equal(read.array[1], values_KJIC[..., 1].transpose(2, 1, 0))


def test_write_refuses_several_channels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one channel"):
        write_itk(Volume(np.zeros((2, 2, 2, 2)), np.eye(4)), tmp_path / "two.nrrd")


def test_truncated_nrrd_is_refused(tmp_path: Path) -> None:
    path = write_itk(Volume(np.ones((1, 30, 30, 30), np.float32), np.eye(4)), tmp_path / "full.nrrd")
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError) as info:
        read_volume(cut)
    assert str(cut) in str(info.value) and "expected" in str(info.value)


def _nrrd_header(path: Path) -> dict[str, str]:
    """Parse the text header of a NRRD file (fields up to the blank line) without any image library."""
    with path.open("rb") as stream:
        text = stream.read(4096).split(b"\n\n", 1)[0].decode("ascii")
    fields = {}
    for line in text.splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def _vectors(text: str) -> np.ndarray:
    return np.array([[float(v) for v in group.split(",")] for group in re.findall(r"\(([^)]*)\)", text)])


@pytest.mark.real
def test_pyradiomics_brain_nrrd_geometry(real_dir: Path) -> None:
    path = real_dir / "pyradiomics" / "brain1_image.nrrd"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    header = _nrrd_header(path)
    assert header["space"] == "left-posterior-superior"
    directions_33 = _vectors(header["space directions"])  # row n: LPS step of index axis n
    origin_lps = _vectors(header["space origin"])[0]
    read = read_itk(path)
    assert read.array.shape == (1, 256, 256, 25) and read.array.dtype == np.int16
    np.testing.assert_allclose(read.spacing_mm, [0.78125, 0.78125, 6.5], atol=1e-9)
    np.testing.assert_allclose(read.affine[:3, :3], LPS_TO_RAS_3 @ directions_33.T, atol=1e-9)
    np.testing.assert_allclose(read.affine[:3, 3], LPS_TO_RAS_3 @ origin_lps, atol=1e-9)
    image = sitk.ReadImage(str(path))
    direction_33 = np.array(image.GetDirection()).reshape(3, 3)
    expected_ras = LPS_TO_RAS_3 @ direction_33 @ np.diag(image.GetSpacing())
    np.testing.assert_allclose(read.affine[:3, :3], expected_ras, atol=1e-9)
    voxels_KJI = sitk.GetArrayViewFromImage(image)
    for ijk in [(0, 0, 0), (128, 100, 12), (255, 17, 24)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(read.voxel_to_world(np.array(ijk)), [-lps[0], -lps[1], lps[2]], atol=1e-9)
        assert read.array[(0, *ijk)] == voxels_KJI[ijk[2], ijk[1], ijk[0]]
    raw = path.read_bytes()
    assert header["encoding"] == "gzip" and header["endian"] == "little" and header["type"] == "short"
    voxels_from_bytes_KJI = np.frombuffer(gzip.decompress(raw[raw.index(b"\n\n") + 2 :]), "<i2").reshape(25, 256, 256)
    np.testing.assert_array_equal(read.array[0], voxels_from_bytes_KJI.transpose(2, 1, 0))
