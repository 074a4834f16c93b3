"""Helpers for the phantom tests: small phantoms (cached per process) and label statistics in RAS world mm."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from medaug.phantoms import Phantom, make_phantom

# Small matrices: a few hundred thousand voxels each, a few tens of milliseconds per phantom.
SMALL = {"ct_abdomen": (128, 128, 16), "mr_prostate": (112, 112, 14), "mr_brain": (96, 112, 96)}


@lru_cache(maxsize=32)
def small_phantom(domain: str, seed: int) -> Phantom:
    return make_phantom(domain, seed, SMALL[domain])


def label_id(phantom: Phantom, name: str) -> int:
    (found,) = [key for key, value in phantom.labels.items() if value == name]
    return found


def mask(phantom: Phantom, name: str) -> np.ndarray:
    """Boolean ``(I, J, K)`` mask of one structure."""
    return phantom.label.array[0] == label_id(phantom, name)


def centroid_ras(phantom: Phantom, name: str) -> np.ndarray:
    """Centroid of a structure in RAS world mm, through the label volume's affine (``x_world = A @ [i, j, k, 1]``)."""
    ijk = np.argwhere(mask(phantom, name)).astype(np.float64)  # (N, 3)
    assert len(ijk), f"{name} is absent"
    homogeneous = np.concatenate([ijk, np.ones((len(ijk), 1))], axis=1)  # (N, 4)
    return (homogeneous @ phantom.label.affine.T)[:, :3].mean(axis=0)


def median_in(phantom: Phantom, name: str, channel: str) -> float:
    values = phantom.image.array[phantom.channels.index(channel)]
    return float(np.median(values[mask(phantom, name)]))
