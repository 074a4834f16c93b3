"""Intensity harmonization (DESIGN §3 "Intensity") and the body mask it is measured in.

**Model space** is float32 in [-1, 1], one :class:`IntensityMapping` per channel:
``model = (clip(value, low, high) - offset) / scale`` with ``offset = (low + high) / 2`` and
``scale = (high - low) / 2``; the inverse ``value = model * scale + offset`` is exact inside
``[low, high]``.

* CT (``kind="ct_window"``, units ``"HU"``): ``[low, high]`` is the domain's window in HU.
* MR (``kind="mr_percentile"``, units ``"a.u."``): ``[low, high]`` are the 0.5/99.5 (default)
  percentiles of the channel inside the body mask. MR has no physical unit; exports return MR to
  ``model * scale + offset``, i.e. to the arbitrary units of the source file (for z-scored data, the
  source's z-scores), and record that in their metadata.

**Body mask** (:func:`body_mask`): CT, HU > -500; MR, above the background, which is found as the
dominant low mode of the histogram (not as zero), so the mask also works on data that was already
normalized (BraTS z-scores have a constant negative background). The threshold is the mode plus four
half-widths of its peak (a constant background gives a one-bin peak; Rician noise a wider one),
never above Otsu's threshold. Then: an in-plane opening by the 4-neighbour cross (cuts one-pixel
lines such as a table pad off the body), connected components in 3D (keep the largest and any at
least a quarter its size, which drops the CT table and noise specks) and holes filled slice by slice
(lungs, bowel gas, ventricles are body).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medaug.prepare.geometry import HarmonizeError

log = logging.getLogger(__name__)

CT_BODY_THRESHOLD_HU = -500.0
CT_AIR_HU = -1000.0
DEFAULT_CT_WINDOW_HU = (-1000.0, 1000.0)  # DESIGN §3: only where nothing narrower fits
DEFAULT_MR_PERCENTILES = (0.5, 99.5)
HISTOGRAM_BINS = 1024
HISTOGRAM_SAMPLE = 4_000_000  # voxels used to find the background mode
BACKGROUND_HALF_WIDTHS = 4.0
MIN_COMPONENT_FRACTION = 0.25  # of the largest component
MODALITIES = ("ct", "mr")


@dataclass(frozen=True)
class IntensityMapping:
    """One channel's map to model space (module docstring): ``value = model * scale + offset``.

    ``low``/``high`` are in ``units`` (HU for CT, the source's arbitrary units for MR) and map to -1/+1.
    """

    kind: str  # "ct_window" | "mr_percentile"
    low: float
    high: float
    units: str  # "HU" | "a.u."
    percentiles: tuple[float, float] | None = None  # MR only

    def __post_init__(self) -> None:
        if not np.isfinite([self.low, self.high]).all() or not self.high > self.low:
            raise HarmonizeError("intensity", f"{self.kind} range [{self.low}, {self.high}]; expected low < high, finite")

    @property
    def scale(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def offset(self) -> float:
        return (self.high + self.low) / 2.0

    def to_model(self, values: np.ndarray) -> np.ndarray:
        """Source units → float32 model space in [-1, 1] (clip, then scale)."""
        clipped = np.clip(np.asarray(values, dtype=np.float32), self.low, self.high)
        model = (clipped - np.float32(self.offset)) / np.float32(self.scale)
        return np.clip(model, -1.0, 1.0, out=model)  # float32 rounding may step 1 ulp past ±1

    def to_source(self, model: np.ndarray) -> np.ndarray:
        """Model space → source units (float64): ``model * scale + offset``."""
        return np.asarray(model, dtype=np.float64) * self.scale + self.offset

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``scale`` and ``offset`` spelled out for readers of the index."""
        record = asdict(self)
        record["percentiles"] = list(self.percentiles) if self.percentiles is not None else None
        return {**record, "scale": self.scale, "offset": self.offset}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "IntensityMapping":
        percentiles = record.get("percentiles")
        return cls(kind=record["kind"], low=float(record["low"]), high=float(record["high"]), units=record["units"],
                   percentiles=tuple(percentiles) if percentiles is not None else None)


def ct_window_mapping(window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU) -> IntensityMapping:
    """The CT mapping for a window ``(low, high)`` in HU, e.g. abdomen W400/L40 = (-160, 240)."""
    low, high = (float(v) for v in window_hu)
    return IntensityMapping(kind="ct_window", low=low, high=high, units="HU")


def ct_to_model(hu: np.ndarray, window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU) -> tuple[np.ndarray, IntensityMapping]:
    """HU → float32 model space in [-1, 1] (clip to the window, then scale) and its mapping."""
    mapping = ct_window_mapping(window_hu)
    return mapping.to_model(hu), mapping


def mr_percentile_mapping(values: np.ndarray, body: np.ndarray,
                          percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES, where: str = "image") -> IntensityMapping:
    """The MR mapping from the ``percentiles`` of ``values`` inside the boolean ``body`` (same shape).

    Raises:
        HarmonizeError: empty body mask, or a constant channel inside it.
    """
    inside = np.asarray(values)[np.asarray(body, dtype=bool)]
    if inside.size == 0:
        raise HarmonizeError(where, "body mask is empty; expected a body to measure MR percentiles in")
    low, high = np.percentile(inside, percentiles)
    if not high > low:
        raise HarmonizeError(where, f"MR channel is constant ({low:g}) inside the body; expected varying intensities")
    return IntensityMapping(kind="mr_percentile", low=float(low), high=float(high), units="a.u.",
                            percentiles=(float(percentiles[0]), float(percentiles[1])))


def mr_to_model(values: np.ndarray, body: np.ndarray,
                percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES) -> tuple[np.ndarray, IntensityMapping]:
    """MR values → float32 model space in [-1, 1] by percentiles inside ``body``, and the mapping."""
    mapping = mr_percentile_mapping(values, body, percentiles)
    return mapping.to_model(values), mapping


# ---------------------------------------------------------------- body mask


def body_mask(image: np.ndarray, modality: str, slice_axis: int = -1) -> np.ndarray:
    """Boolean body mask of an image: (C, I, J, K) → (I, J, K), (I, J, K) → same, (H, W) → same.

    CT values are HU; MR values may be raw or already normalized (module docstring). Several channels:
    the union of their foregrounds. Holes are filled within each slice along ``slice_axis`` (of the
    spatial axes; default the last, k = axial in a RAS volume).
    """
    array = np.asarray(image)
    if array.ndim == 2:
        return body_mask(array[:, :, None], modality, slice_axis=2)[:, :, 0]
    channels = array if array.ndim == 4 else array[None]
    if modality not in MODALITIES:
        raise HarmonizeError("modality", f"is {modality!r}; expected one of {', '.join(MODALITIES)}")
    foreground = np.zeros(channels.shape[1:], dtype=bool)
    for channel in channels:
        foreground |= channel > _foreground_threshold(channel, modality)
    opened = open_per_slice(foreground, slice_axis % 3)
    return fill_holes_per_slice(keep_large_components(opened), slice_axis % 3)


def _foreground_threshold(channel: np.ndarray, modality: str) -> float:
    return CT_BODY_THRESHOLD_HU if modality == "ct" else mr_background_threshold(channel)


def mr_background_threshold(values: np.ndarray) -> float:
    """The value above which MR voxels are body: the dominant low mode plus four half-widths of its peak.

    The mode is the histogram's highest bin below Otsu's threshold; the threshold never exceeds Otsu's.
    """
    sample = np.asarray(values).ravel()
    sample = sample[:: max(1, sample.size // HISTOGRAM_SAMPLE)].astype(np.float64)
    low, high = float(sample.min()), float(np.percentile(sample, 99.5))
    if not high > low:
        return low
    counts, edges = np.histogram(sample, bins=HISTOGRAM_BINS, range=(low, high))
    otsu = otsu_bin(counts)
    mode = int(np.argmax(counts[: otsu + 1]))
    below_half = np.flatnonzero(counts[mode:] < counts[mode] / 2)
    half_width_bins = (below_half[0] - 0.5) if below_half.size else float(otsu - mode)
    bin_width = edges[1] - edges[0]
    mode_value = (edges[mode] + edges[mode + 1]) / 2
    return float(min(mode_value + BACKGROUND_HALF_WIDTHS * half_width_bins * bin_width, edges[otsu + 1]))


def otsu_bin(counts: np.ndarray) -> int:
    """Otsu's threshold on a histogram: the last bin of the low class (maximal between-class variance)."""
    probability = counts / max(counts.sum(), 1)
    omega = np.cumsum(probability)
    mu = np.cumsum(probability * np.arange(len(counts)))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between[:-1], nan=0.0))) if len(counts) > 1 else 0


def keep_large_components(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component and any at least a quarter its size."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool, copy=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= MIN_COMPONENT_FRACTION * sizes.max()
    keep[0] = False
    return keep[labels]


def _in_plane_cross(slice_axis: int) -> np.ndarray:
    """A 3×3×3 structure holding the 2D 4-neighbour cross in the plane normal to ``slice_axis``."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    in_plane = [slice(None)] * 3
    in_plane[slice_axis] = slice(1, 2)
    structure[tuple(in_plane)] = np.expand_dims(ndimage.generate_binary_structure(2, 1), slice_axis)
    return structure


def open_per_slice(mask: np.ndarray, slice_axis: int) -> np.ndarray:
    """Binary opening by the in-plane cross: cuts one-pixel lines (table pads, noise) off the body."""
    from scipy import ndimage

    return ndimage.binary_opening(mask, structure=_in_plane_cross(slice_axis))


def fill_holes_per_slice(mask: np.ndarray, slice_axis: int) -> np.ndarray:
    """Fill the holes of each 2D slice along ``slice_axis``: background not connected to the slice's edge."""
    from scipy import ndimage

    background, count = ndimage.label(~mask, structure=_in_plane_cross(slice_axis))
    moved = np.moveaxis(background, slice_axis, 0)  # (S, A, B)
    edge = np.concatenate([moved[:, 0].ravel(), moved[:, -1].ravel(), moved[:, :, 0].ravel(), moved[:, :, -1].ravel()])
    outside = np.zeros(count + 1, dtype=bool)
    outside[edge] = True
    outside[0] = False
    return ~outside[background]


def slice_body_fraction(body_NHW: np.ndarray) -> np.ndarray:
    """(N,) float32: the fraction of each slice's pixels that are body."""
    body = np.asarray(body_NHW, dtype=bool)
    return body.reshape(body.shape[0], -1).mean(axis=1, dtype=np.float64).astype(np.float32)


def keep_slice(body_fraction: np.ndarray | float, min_body_fraction: float = 0.05) -> np.ndarray:
    """Boolean (N,) (or scalar): slices whose body fraction reaches ``min_body_fraction``."""
    return np.asarray(body_fraction) >= min_body_fraction
