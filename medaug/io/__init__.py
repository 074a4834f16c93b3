"""Medical image I/O: every reader returns a :class:`Volume` (channel-first, RAS affine, metadata).

``read_volume`` picks the reader from the path: a ``.nii``/``.nii.gz`` file (nibabel), an NRRD/MHA file
(SimpleITK, imported lazily), or a DICOM file or folder (pydicom). DICOM SEG label maps are read with
:func:`medaug.io.dicom.read_dicom_seg`. Errors are :class:`medaug.errors.ImageReadError` with a
one-line reason naming the file.
"""

from __future__ import annotations

from pathlib import Path

from medaug.errors import ImageReadError
from medaug.io.nifti import is_nifti, read_nifti, write_nifti
from medaug.io.volume import LPS_TO_RAS, Volume

__all__ = ["Volume", "LPS_TO_RAS", "read_volume", "read_nifti", "write_nifti", "ImageReadError"]


def read_volume(path: str | Path) -> Volume:
    """Read one volume from a NIfTI, NRRD/MHA, or DICOM file, or a folder holding one DICOM series.

    A folder with several series raises :class:`medaug.errors.DicomSeriesError` listing them; use
    :func:`medaug.io.dicom.read_dicom_series_all` to get every volume of a folder.
    """
    path = Path(path)
    if is_nifti(path):
        return read_nifti(path)
    from medaug.io.itk import is_itk

    if is_itk(path):
        from medaug.io.itk import read_itk

        return read_itk(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder; expected a NIfTI, NRRD/MHA or DICOM file or a DICOM folder")
    from medaug.io.dicom import read_dicom

    return read_dicom(path)
