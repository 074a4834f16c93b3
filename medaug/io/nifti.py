"""NIfTI-1/2 in and out (nibabel). 3D volumes become one channel, 4D volumes one channel per frame."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from medaug.errors import ImageReadError
from medaug.io.atomic import atomic_output
from medaug.io.checks import require_file, require_finite, require_valid_affine
from medaug.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D or 4D NIfTI file into a channel-first Volume.

    The affine is nibabel's choice of sform/qform (RAS+ by the NIfTI standard); scaling
    (``scl_slope``/``scl_inter``) is applied; the stored dtype is kept where no scaling applies.
    A 4D file ``(I, J, K, T)`` becomes ``(T, I, J, K)``; trailing singleton axes are dropped.

    Raises:
        ImageReadError: missing, truncated or non-NIfTI file, more than 4 dimensions, NaN/inf voxels.
    """
    import nibabel as nib

    path = require_file(path)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as error:
        reason = f"not a readable NIfTI file ({type(error).__name__}: {error}); expected a complete NIfTI-1/2 image"
        raise ImageReadError(path, reason) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(path, f"is {type(image).__name__}; expected NIfTI-1 or NIfTI-2")
    array = _to_channel_first(_native_byte_order(array), path)
    require_finite(array, path)
    require_valid_affine(image.affine, path)
    header = image.header
    metadata = {
        "source_path": str(path),
        "format": "nifti",
        "stored_dtype": str(header.get_data_dtype()),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    return Volume(array=array, affine=np.array(image.affine, dtype=np.float64), metadata=metadata)


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """Big-endian files (still common from old scanners and SPM) give non-native arrays, which torch refuses."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _to_channel_first(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return array[None, :, :, None]
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4:
        return np.moveaxis(array, -1, 0)  # (I, J, K, T) -> (T, I, J, K)
    raise ImageReadError(path, f"{array.ndim}-D data of shape {array.shape}; expected 3D or 4D")


def write_nifti(volume: Volume, path: str | Path, dtype: np.dtype | str | None = None) -> Path:
    """Write a Volume as NIfTI (``.nii`` or ``.nii.gz``), atomically (temporary name, then rename).

    One channel is written as 3D, several as 4D ``(I, J, K, C)``. sform and qform both carry the affine
    (code 1, scanner). ``dtype`` defaults to the array's, except that bool is stored as uint8 and 64-bit
    integers as int32 when their values fit (NIfTI readers outside nibabel rarely take 64-bit integers).
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: expected a .nii or .nii.gz file name")
    array = volume.array.astype(_nifti_dtype(volume.array) if dtype is None else dtype, copy=False)
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(data, volume.affine, dtype=data.dtype)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_output(path) as temporary:
        nib.save(image, str(temporary))
    return path


def _nifti_dtype(array: np.ndarray) -> np.dtype:
    """The dtype to store ``array`` in: its own, but bool → uint8 and 64-bit integers → int32 where lossless."""
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return np.dtype(np.int32)
    return array.dtype
