"""Checks every reader applies before handing out a Volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medaug.errors import ImageReadError


def require_finite(array: np.ndarray, path: str | Path) -> None:
    """Refuse NaN/inf voxels: a model fed them learns nothing, and silent zero-filling hides a bad file."""
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ImageReadError(path, f"{bad} NaN/inf voxels; expected finite intensities")


def require_valid_affine(affine: np.ndarray, path: str | Path) -> None:
    """Refuse a singular or non-finite affine (zero spacing, broken header)."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ImageReadError(path, "singular or non-finite voxel-to-world affine; expected positive voxel spacing")


def require_file(path: str | Path) -> Path:
    """Refuse a missing path or an empty file before a library reports it less clearly."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder; expected an existing image file or DICOM folder")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "empty file; expected a medical image")
    return path
