"""What a phantom is (:class:`Phantom`) and how a domain describes itself (:class:`DomainSpec`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medaug.io.volume import Volume
from medaug.phantoms.geometry import Grid

GENERATOR_VERSION = "medaug phantoms v1"


@dataclass(frozen=True)
class PhantomArrays:
    """What a domain builder returns: channel images, label map and the grid they live on."""

    image_cijk: np.ndarray  # (C, I, J, K) int16, channel units (HU for CT, arbitrary units for MR)
    label_ijk: np.ndarray  # (I, J, K) uint8, phantom-local label ids
    grid: Grid


Builder = Callable[[np.random.Generator, tuple[int, int, int]], PhantomArrays]


@dataclass(frozen=True)
class DomainSpec:
    """One phantom domain: its name, the recipe domain it feeds, channels, label table, shapes and builder."""

    name: str  # e.g. "ct_abdomen"
    recipe_domain: str  # e.g. "ct/abdomen"
    modality: str  # "ct" | "mr"
    channels: tuple[str, ...]
    labels: dict[int, str]  # phantom-local id -> vocabulary name
    default_shape: tuple[int, int, int]
    small_shape: tuple[int, int, int]
    units: str
    build: Builder


@dataclass(frozen=True)
class Phantom:
    """A procedural volume: image (C channels, int16), label map (1 channel, uint8) on the same RAS grid.

    ``image.affine`` maps voxel ``(i, j, k)`` to RAS mm; voxel axes run along +x (patient's right),
    +y (anterior), +z (superior). ``labels`` maps phantom-local ids to vocabulary names (0 = background).
    """

    domain: str
    seed: int
    image: Volume  # (C, I, J, K) int16
    label: Volume  # (1, I, J, K) uint8
    channels: tuple[str, ...]
    labels: dict[int, str]

    def channel(self, name: str) -> Volume:
        """One channel as a one-channel Volume on the same grid."""
        index = self.channels.index(name)
        return self.image.with_array(self.image.array[index : index + 1], channels=[name])
