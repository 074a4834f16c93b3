"""NIfTI reader/writer: round trips, header variants checked against the NIfTI-1 formulas, and bad input."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medaug.errors import ImageReadError
from medaug.io import read_volume
from medaug.io.nifti import read_nifti, write_nifti
from medaug.io.volume import Volume

NIBABEL_DATA = Path(data_path)
SCL_SLOPE_OFFSET = 112  # byte offsets in the 348-byte NIfTI-1 header (nifti1.h)
SCL_INTER_OFFSET = 116


def _affine_anisotropic() -> np.ndarray:
    affine = np.diag([-0.7, 0.8, 2.5, 1.0])  # LAS-like, as many converters write
    affine[:3, 3] = [91.0, -126.5, -72.25]
    return affine


def _quaternion_affine(b: float, c: float, d: float, qfac: float, pixdim_3, offset_3) -> np.ndarray:
    """NIfTI-1 method 2 (qform), written out from nifti1.h independently of nibabel."""
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([pixdim_3[0], pixdim_3[1], qfac * pixdim_3[2]])
    affine[:3, 3] = offset_3
    return affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_3d_round_trip_keeps_array_dtype_affine(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    hu_IJK = rng.integers(-1024, 3000, size=(6, 5, 4)).astype(np.int16)
    volume = Volume(array=hu_IJK[None], affine=_affine_anisotropic())
    path = write_nifti(volume, tmp_path / f"ct{suffix}")
    read = read_nifti(path)
    assert read.array.shape == (1, 6, 5, 4) and read.array.dtype == np.int16
    np.testing.assert_array_equal(read.array[0], hu_IJK)
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-5)  # header stores float32
    np.testing.assert_allclose(read.spacing_mm, [0.7, 0.8, 2.5], rtol=1e-6)
    assert read.orientation == "LAS"
    assert (read.metadata["qform_code"], read.metadata["sform_code"]) == (1, 1)
    assert not list(tmp_path.glob(".part-*"))


def test_4d_round_trip_is_channels_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    channels_CIJK = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    volume = Volume(array=channels_CIJK, affine=_affine_anisotropic())
    path = write_nifti(volume, tmp_path / "mr.nii.gz")
    on_disk = nib.load(path)
    assert on_disk.shape == (4, 5, 6, 3)  # channels last in the file, as NIfTI's t axis
    np.testing.assert_array_equal(np.asarray(on_disk.dataobj)[..., 2], channels_CIJK[2])
    read = read_nifti(path)
    np.testing.assert_array_equal(read.array, channels_CIJK)
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-5)


def test_writer_stores_bool_as_uint8_and_int64_as_int32(tmp_path: Path) -> None:
    labels_IJK = np.arange(24, dtype=np.int64).reshape(2, 3, 4) % 5
    mask_IJK = labels_IJK > 2
    affine = np.eye(4)
    read_labels = read_nifti(write_nifti(Volume(labels_IJK[None], affine), tmp_path / "labels.nii.gz"))
    read_mask = read_nifti(write_nifti(Volume(mask_IJK[None], affine), tmp_path / "mask.nii.gz"))
    assert read_labels.array.dtype == np.int32 and read_mask.array.dtype == np.uint8
    np.testing.assert_array_equal(read_labels.array[0], labels_IJK)
    np.testing.assert_array_equal(read_mask.array[0], mask_IJK.astype(np.uint8))


def test_scl_slope_and_inter_are_applied(tmp_path: Path) -> None:
    raw_IJK = np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 30
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(raw_IJK, np.eye(4), dtype=np.int16), path)
    header = bytearray(path.read_bytes())
    header[SCL_SLOPE_OFFSET : SCL_INTER_OFFSET + 4] = struct.pack("<ff", 2.5, -10.0)
    path.write_bytes(bytes(header))
    read = read_nifti(path)
    assert np.issubdtype(read.array.dtype, np.floating)
    np.testing.assert_allclose(read.array[0], raw_IJK * 2.5 - 10.0)
    assert read.metadata["stored_dtype"] == "int16"


def test_big_endian_file_written_here_reads_in_native_order(tmp_path: Path) -> None:
    values_IJK = np.linspace(-5, 5, 3 * 4 * 5, dtype=">f4").reshape(3, 4, 5)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">f4")
    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(values_IJK, _affine_anisotropic(), header=header), path)
    assert path.read_bytes()[:4] == struct.pack(">i", 348)  # sizeof_hdr, big-endian on disk
    read = read_nifti(path)
    assert read.array.dtype.isnative and read.array.dtype == np.float32
    np.testing.assert_array_equal(read.array[0], values_IJK.astype(np.float32))
    torch = pytest.importorskip("torch")
    assert torch.from_numpy(read.array).shape == (1, 3, 4, 5)  # torch refuses non-native arrays


def test_nibabel_big_endian_anatomical_matches_raw_bytes() -> None:
    """nibabel's test file anatomical.nii is big-endian int16; decode its voxels by hand from the bytes."""
    path = NIBABEL_DATA / "anatomical.nii"
    raw = path.read_bytes()
    assert raw[:4] == struct.pack(">i", 348)
    shape = struct.unpack(">3h", raw[42:48])  # dim[1..3]
    vox_offset = int(struct.unpack(">f", raw[108:112])[0])
    expected_IJK = np.frombuffer(raw, dtype=">i2", count=int(np.prod(shape)), offset=vox_offset).reshape(shape, order="F")
    read = read_nifti(path)
    assert read.array.shape == (1, *shape) and read.array.dtype == np.int16 and read.array.dtype.isnative
    np.testing.assert_array_equal(read.array[0], expected_IJK)
    assert read.metadata["stored_dtype"] == ">i2"


def test_nibabel_example4d_is_channels_first() -> None:
    path = NIBABEL_DATA / "example4d.nii.gz"
    with gzip.open(path) as stream:
        raw = stream.read()
    dims = struct.unpack("<5h", raw[40:50])  # dim[0..4]
    vox_offset = int(struct.unpack("<f", raw[108:112])[0])
    frames_IJKT = np.frombuffer(raw, dtype="<i2", count=int(np.prod(dims[1:])), offset=vox_offset).reshape(dims[1:], order="F")
    read = read_nifti(path)
    assert read.array.shape == (dims[4], *dims[1:4])
    np.testing.assert_array_equal(read.array[1], frames_IJKT[..., 1])


def test_qform_only_follows_quaternion_formula(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 5, 6))
    header.set_data_dtype(np.float32)
    header["pixdim"][1:4] = [0.9, 1.1, 3.0]
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = 0.1, -0.2, 0.3
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = 10.0, -20.0, 30.0
    header["qform_code"], header["sform_code"] = 1, 0
    path = tmp_path / "qform.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None, header=header), path)
    read = read_nifti(path)
    b, c, d = (float(np.float32(v)) for v in (0.1, -0.2, 0.3))
    expected = _quaternion_affine(b, c, d, 1.0, [0.9, 1.1, 3.0], [10.0, -20.0, 30.0])
    np.testing.assert_allclose(read.affine, expected, atol=1e-5)
    assert (read.metadata["qform_code"], read.metadata["sform_code"]) == (1, 0)


def test_negative_qfac_flips_the_third_axis(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 5, 6))
    header.set_data_dtype(np.int16)
    header["pixdim"][:4] = [-1.0, 2.0, 2.0, 4.0]  # pixdim[0] is qfac
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = 0.0, 0.0, 1.0  # 180° about z
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = 5.0, 6.0, 7.0
    header["qform_code"], header["sform_code"] = 2, 0
    path = tmp_path / "qfac.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None, header=header), path)
    read = read_nifti(path)
    expected = _quaternion_affine(0.0, 0.0, 1.0, -1.0, [2.0, 2.0, 4.0], [5.0, 6.0, 7.0])
    np.testing.assert_allclose(read.affine, expected, atol=1e-6)
    assert read.orientation == "LPI"


def test_sform_only_uses_srow(tmp_path: Path) -> None:
    srow_34 = np.array([[0.0, 0.0, -2.5, 40.0], [0.8, 0.0, 0.0, -60.0], [0.0, -0.8, 0.0, 70.0]])
    header = nib.Nifti1Header()
    header.set_data_shape((4, 5, 6))
    header.set_data_dtype(np.uint8)
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_34
    header["qform_code"], header["sform_code"] = 0, 4
    path = tmp_path / "sform.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), None, header=header), path)
    read = read_nifti(path)
    np.testing.assert_allclose(read.affine[:3], srow_34, atol=1e-6)
    np.testing.assert_allclose(read.spacing_mm, [0.8, 0.8, 2.5], rtol=1e-6)


def test_neither_qform_nor_sform_falls_back_to_pixdim(tmp_path: Path) -> None:
    shape = (4, 5, 6)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["pixdim"][1:4] = [1.5, 2.0, 3.0]
    header["qform_code"], header["sform_code"] = 0, 0
    path = tmp_path / "neither.nii"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), None, header=header), path)
    read = read_nifti(path)
    # nibabel's documented fallback (Analyze "base affine"): x flipped, volume centred on the origin.
    zooms = np.array([-1.5, 2.0, 3.0])
    expected = np.diag([*zooms, 1.0])
    expected[:3, 3] = -zooms * (np.array(shape) - 1) / 2
    np.testing.assert_allclose(read.affine, expected)
    assert (read.metadata["qform_code"], read.metadata["sform_code"]) == (0, 0)


def test_dipy_s0_10slices_keeps_its_53mm_sheared_slice_axis() -> None:
    """dipy ships S0_10slices.nii.gz in its wheel (no download): 4D with one frame, sform with shear."""
    spec = importlib.util.find_spec("dipy")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dipy not installed (optional test-time dependency)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "files" / "S0_10slices.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not shipped by this dipy")
    with gzip.open(path) as stream:
        raw = stream.read(348)
    srow_34 = np.array(struct.unpack("<12f", raw[280:328])).reshape(3, 4)
    read = read_nifti(path)
    assert read.array.shape == (1, 128, 128, 10)  # the trailing one-frame axis is dropped
    np.testing.assert_allclose(read.affine[:3], srow_34, rtol=1e-6)
    assert read.spacing_mm[2] == pytest.approx(np.linalg.norm(srow_34[:, 2]), rel=1e-6)
    assert read.spacing_mm[2] == pytest.approx(53.14, abs=0.01)


def _assert_read_error(path: Path, expected_words: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message and "expected" in message and expected_words in message
    assert "\n" not in message
    return info.value


def test_truncated_nii_gz_is_refused(tmp_path: Path) -> None:
    path = write_nifti(Volume(np.ones((1, 20, 20, 20), np.float32), np.eye(4)), tmp_path / "full.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = _assert_read_error(cut, "NIfTI")
    assert "EOFError" in error.reason


def test_truncated_uncompressed_nii_is_refused(tmp_path: Path) -> None:
    path = write_nifti(Volume(np.ones((1, 20, 20, 20), np.float32), np.eye(4)), tmp_path / "full.nii")
    cut = tmp_path / "cut.nii"
    cut.write_bytes(path.read_bytes()[:1000])
    _assert_read_error(cut, "NIfTI")


def test_text_renamed_nii_gz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("patient list, not an image\n")
    _assert_read_error(path, "NIfTI")


def test_random_bytes_nrrd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.nrrd"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_read_error(path, "NRRD")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_voxels_are_refused(tmp_path: Path, bad_value: float) -> None:
    values_IJK = np.zeros((3, 3, 3), np.float32)
    values_IJK[1, 2, 0] = bad_value
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(values_IJK, np.eye(4)), path)
    error = _assert_read_error(path, "finite")
    assert error.reason.startswith("1 NaN/inf voxels")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.touch()
    _assert_read_error(path, "empty file")


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as info:
        read_nifti(tmp_path / "absent.nii.gz")
    assert str(tmp_path / "absent.nii.gz") in str(info.value) and "no such file" in str(info.value)
    assert "expected" in str(info.value)


def test_zero_spacing_affine_is_refused(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((3, 3, 3))
    header.set_data_dtype(np.int16)
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    header["qform_code"], header["sform_code"] = 0, 1
    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None, header=header), path)
    _assert_read_error(path, "spacing")


def test_write_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(Volume(np.zeros((1, 2, 2, 2)), np.eye(4)), tmp_path / "x.nrrd")
