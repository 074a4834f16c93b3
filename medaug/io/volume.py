"""The ``Volume``: one image (all channels) with the geometry that places it in the patient.

Conventions (DESIGN §2), the ones MONAI's ``MetaTensor`` and nibabel use:

* ``array``: channel-first ``(C, I, J, K)``; a 3D scan has ``C == 1``; a 2D image has ``K == 1``.
* ``affine``: 4×4 float64 mapping voxel index ``(i, j, k, 1)`` to world millimetres in **RAS+**:
  +x towards the patient's Right, +y Anterior, +z Superior (DICOM's LPS+ with x and y negated).
  So the liver (patient's right) has larger x than the spleen.
* ``spacing_mm``: the length of each voxel axis (norms of the affine's first three columns).
* ``metadata``: provenance (source path, modality, channel names, DICOM UIDs...); readers fill it and
  nothing downstream drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# DICOM patient coordinates are LPS+; RAS+ negates x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A channel-first image array with its voxel→RAS affine and metadata."""

    array: np.ndarray  # (C, I, J, K)
    affine: np.ndarray  # (4, 4) voxel → RAS mm
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, I, J, K), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along i, j, k in mm, shape (3,)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        return "".join(affine_to_axcodes(self.affine))

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` to RAS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Map RAS mm ``(..., 3)`` to (fractional) voxel indices ``(..., 3)``."""
        inverse = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inverse[:3, :3].T + inverse[:3, 3]

    def with_array(self, array: np.ndarray, **metadata: Any) -> "Volume":
        """A copy on the same grid with another array (e.g. a label map) and updated metadata."""
        return Volume(array=array, affine=self.affine.copy(), metadata={**self.metadata, **metadata})


def affine_to_axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """The RAS axis code each voxel axis points to most, e.g. ``('L', 'P', 'S')``."""
    import nibabel.orientations as nio

    return tuple(nio.aff2axcodes(affine))  # type: ignore[return-value]


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
