"""NRRD and MetaImage (MHA/MHD) in and out through SimpleITK, imported only when used.

SimpleITK reports geometry in LPS+ (origin, spacing, direction of the *index* axes); the affine is
``LPS_TO_RAS @ [direction·diag(spacing) | origin]``. Vector images (several components per voxel)
become channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medaug.errors import ImageReadError
from medaug.io.atomic import atomic_output
from medaug.io.checks import require_file, require_finite, require_valid_affine
from medaug.io.volume import LPS_TO_RAS, Volume

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_itk(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk(path: str | Path) -> Volume:
    """Read a 3D (or 2D) NRRD/MHA/MHD image into a Volume with a RAS affine.

    Raises:
        ImageReadError: missing or unreadable file, not 2D/3D, NaN/inf voxels.
    """
    import SimpleITK as sitk

    path = require_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageReadError(path, f"not a readable NRRD/MetaImage file ({last_line}); expected a 2D/3D ITK image") from None
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise ImageReadError(path, f"{dimension}-D image; expected 2D or 3D")
    array = sitk.GetArrayFromImage(image)  # (K, J, I[, comp]) in ITK's reversed axis order
    components = image.GetNumberOfComponentsPerPixel()
    if dimension == 2:
        array = array[None]
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if components == 1 else np.moveaxis(array, (0, 1, 2, 3), (3, 2, 1, 0))
    array = array[None] if components == 1 else array  # (C, I, J, K)
    affine = _itk_affine(image)
    require_finite(array, path)
    require_valid_affine(affine, path)
    metadata = {"source_path": str(path), "format": "itk", "stored_dtype": str(array.dtype)}
    return Volume(array=np.ascontiguousarray(array), affine=affine, metadata=metadata)


def _itk_affine(image) -> np.ndarray:
    dimension = image.GetDimension()
    direction = np.eye(3)
    direction[:dimension, :dimension] = np.array(image.GetDirection()).reshape(dimension, dimension)
    spacing = np.ones(3)
    spacing[:dimension] = image.GetSpacing()
    origin = np.zeros(3)
    origin[:dimension] = image.GetOrigin()
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing  # scales column j by spacing[j]
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def write_itk(volume: Volume, path: str | Path) -> Path:
    """Write a one-channel Volume as NRRD/MHA (format from the suffix), atomically.

    The array is stored in native byte order; bool becomes uint8 and float16 float32 (SimpleITK has
    neither pixel type).
    """
    import SimpleITK as sitk

    if volume.num_channels != 1:
        raise ValueError(f"{path}: write_itk writes one channel, got {volume.num_channels}")
    affine_lps = LPS_TO_RAS @ volume.affine
    spacing = volume.spacing_mm
    array_KJI = np.ascontiguousarray(np.transpose(volume.array[0], (2, 1, 0)), dtype=_itk_dtype(volume.array.dtype))
    image = sitk.GetImageFromArray(array_KJI)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in affine_lps[:3, 3]])
    image.SetDirection([float(d) for d in (affine_lps[:3, :3] / spacing).ravel()])
    with atomic_output(path) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return Path(path)


def _itk_dtype(dtype: np.dtype) -> np.dtype:
    """A native-byte-order dtype SimpleITK can hold for ``dtype``."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype.newbyteorder("=")
