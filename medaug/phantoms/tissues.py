"""Tissue maps: each phantom paints tissue classes, then derives its label map and image channels from them.

A *tissue* is what sets the intensity (visceral fat and bowel are different tissues, both labelled
``body``); a *label* is what the recipe maps to the vocabulary. Painting order decides overlaps, and a
``replace`` set restricts what a shape may overwrite (an organ paints only over abdominal-cavity tissues,
so it stays inside the muscle wall).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medaug.phantoms.geometry import Region


@dataclass(frozen=True)
class Tissue:
    """One tissue class: its phantom-local label id (0 = unlabelled) and its mean-intensity range per channel."""

    name: str
    label: int
    ranges: dict[str, tuple[float, float]]  # channel -> (low, high) of the tissue's mean intensity


class TissueTable:
    """An ordered list of tissues; tissue id = position (id 0 is the first tissue, air/background)."""

    def __init__(self, tissues: list[Tissue]):
        self.tissues = tuple(tissues)
        self.ids = {tissue.name: index for index, tissue in enumerate(self.tissues)}
        if len(self.ids) != len(self.tissues) or len(self.tissues) > 255:
            raise ValueError("TissueTable: tissue names must be unique and at most 255")

    def __getitem__(self, name: str) -> int:
        return self.ids[name]

    def select(self, *names: str) -> tuple[int, ...]:
        """Tissue ids of ``names``, for ``paint(..., replace=...)``."""
        return tuple(self.ids[name] for name in names)

    def label_lookup(self) -> np.ndarray:
        """``(T,)`` uint8: tissue id -> label id."""
        return np.array([tissue.label for tissue in self.tissues], dtype=np.uint8)

    def draw_means(self, rng: np.random.Generator, channel: str, margin: float = 0.2) -> np.ndarray:
        """``(T,)`` float32 mean intensity per tissue, uniform in the central part of each range.

        ``margin`` is the fraction of the range left out at each end, so that noise, blur and smooth
        variation keep a tissue's median inside its documented range.
        """
        ranges = np.array([tissue.ranges[channel] for tissue in self.tissues], dtype=np.float64)  # (T, 2)
        width = ranges[:, 1] - ranges[:, 0]
        low, high = ranges[:, 0] + margin * width, ranges[:, 1] - margin * width
        return rng.uniform(low, high).astype(np.float32)


def paint(
    tissue_ijk: np.ndarray, region: Region | None, tissue_id: int, replace: tuple[int, ...] | None = None
) -> None:
    """Set ``tissue_ijk`` to ``tissue_id`` inside ``region``, only over tissues in ``replace`` (None: any)."""
    if region is None:
        return
    view = tissue_ijk[region.box]
    mask = region.mask
    if replace is not None:
        mask = mask & np.isin(view, np.asarray(replace, dtype=tissue_ijk.dtype))
    view[mask] = tissue_id


def render_channel(tissue_ijk: np.ndarray, means_t: np.ndarray) -> np.ndarray:
    """The piecewise-constant image ``(I, J, K)`` float32: each voxel gets its tissue's mean."""
    return means_t[tissue_ijk]


def labels_from_tissues(tissue_ijk: np.ndarray, table: TissueTable) -> np.ndarray:
    """The label map ``(I, J, K)`` uint8 (phantom-local ids) of a tissue map."""
    return table.label_lookup()[tissue_ijk]
