"""Harmonization for ``medaug prepare``: one volume (+ label) → model-ready 2D slices (DESIGN §3).

:func:`harmonize_volume` composes small pure steps, each usable and tested alone:

1. :func:`~medaug.prepare.geometry.reorient_to_ras`: permute/flip voxel axes to RAS (no interpolation).
2. :func:`~medaug.prepare.geometry.align_label_to_image`: the label on the image grid by physical
   position (exact permutation/flip on the same grid, else nearest through the affines); ``LabelError``
   when it does not overlap.
3. :func:`~medaug.prepare.geometry.choose_slicing_plane`: recipe plane, else the reader's
   (:func:`~medaug.prepare.geometry.acquisition_plane_hint`: ``metadata["acquisition_plane"]``, or
   for DICOM the plane normal to the stored slice axis), else the plane normal to the clearly coarsest
   axis, else axial.
4. :func:`~medaug.prepare.intensity.body_mask`: computed on an in-plane subsampled copy of the volume
   (about :data:`BODY_MASK_SPACING_MM` per pixel; the mask only centres the crop, measures body
   fractions and selects MR percentile voxels, so full resolution would buy nothing but time).
5. Intensity per channel (:class:`~medaug.prepare.intensity.IntensityMapping`): CT window or MR
   percentiles inside the body.
6. Geometry: one ``size × size`` window per volume centred on the union of the body over all slices,
   on the lattice at ``target_spacing_mm`` (display convention and slice affines:
   :mod:`medaug.prepare.geometry`); slices with body fraction < ``min_body_fraction`` are dropped
   before resampling; images bilinear, labels nearest, straight into the window (no full-size
   intermediate); upsampling beyond 2× refused (:class:`~medaug.prepare.geometry.HarmonizeError`).
7. Model space: clip and scale; pixels outside the scan are -1 (air/background).
8. Labels: :func:`remap_labels` (source id → vocabulary id; 0 background, 255 ignore) and
   :func:`structure_pixel_counts`.

Label policy ``unmapped`` (``background | ignore | reject``) applies to source ids that reach the
output slices; id 0 is background unless the table maps it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medaug.errors import LabelError
from medaug.io.volume import Volume
from medaug.prepare.geometry import (
    PLANE_AXES,
    HarmonizeError,
    SliceGrid,
    SliceStack,
    acquisition_plane_hint,
    align_label_to_image,
    body_window,
    choose_slicing_plane,
    crop_or_pad,
    full_grid,
    project_body_mask,
    reorient_to_ras,
    resample_slices,
    sample_slices,
    slice_affines,
)
from medaug.prepare.intensity import (
    DEFAULT_CT_WINDOW_HU,
    DEFAULT_MR_PERCENTILES,
    MODALITIES,
    IntensityMapping,
    body_mask,
    ct_to_model,
    ct_window_mapping,
    keep_slice,
    mr_percentile_mapping,
    mr_to_model,
    slice_body_fraction,
)

log = logging.getLogger(__name__)

BACKGROUND_ID = 0
IGNORE_ID = 255
UNMAPPED_POLICIES = ("background", "ignore", "reject")
MAX_SOURCE_LABEL_ID = 65535
BODY_MASK_SPACING_MM = 3.0
_UNMAPPED = -1


# ---------------------------------------------------------------- labels


def remap_labels(label_array: np.ndarray, table: Mapping[int, str], unmapped: str, vocab_ids: Mapping[str, int],
                 where: str = "label") -> tuple[np.ndarray, list[str]]:
    """Source label ids → vocabulary ids (uint8, same shape; 0 background, 255 ignore) by a lookup table.

    ``table`` maps source ids to vocabulary names or ``"background"``/``"ignore"``; ``vocab_ids`` maps
    names to ids 1..254. Ids absent from the table follow ``unmapped``: ``background`` → 0,
    ``ignore`` → 255, ``reject`` → :class:`LabelError` naming them (0 is background unless mapped).
    Returns the map and ``structures_annotated``: the table's vocabulary names, by vocabulary id.
    """
    if unmapped not in UNMAPPED_POLICIES:
        raise HarmonizeError("unmapped", f"is {unmapped!r}; expected one of {', '.join(UNMAPPED_POLICIES)}")
    ids = _integer_ids(label_array, where)
    size = max(int(ids.max(initial=0)), max((int(key) for key in table), default=0)) + 1
    lut, annotated = _label_lut(table, vocab_ids, size, where)
    present = np.bincount(ids.ravel(), minlength=size) > 0
    missing = np.flatnonzero(present & (lut == _UNMAPPED))
    if missing.size and unmapped == "reject":
        raise LabelError(where, f"label ids {missing[:10].tolist()} are not in the recipe's label table "
                         f"(unmapped: reject); expected only ids {sorted(int(key) for key in table)}")
    lut[lut == _UNMAPPED] = BACKGROUND_ID if unmapped == "background" else IGNORE_ID
    return lut.astype(np.uint8)[ids], annotated


def _integer_ids(label_array: np.ndarray, where: str) -> np.ndarray:
    ids = np.asarray(label_array)
    if not np.issubdtype(ids.dtype, np.integer):
        if not np.array_equal(ids, np.round(ids)):
            raise LabelError(where, "label map has non-integer values; expected integer label ids")
        ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SOURCE_LABEL_ID):
        raise LabelError(where, f"label ids span {ids.min()}..{ids.max()}; expected ids in 0..{MAX_SOURCE_LABEL_ID}")
    return ids


def _label_lut(table: Mapping[int, str], vocab_ids: Mapping[str, int], size: int, where: str) -> tuple[np.ndarray, list[str]]:
    """(lookup (size,) int16 with -1 for unmapped ids, annotated names sorted by vocabulary id)."""
    lut = np.full(size, _UNMAPPED, dtype=np.int16)
    lut[0] = BACKGROUND_ID
    annotated: dict[str, int] = {}
    for source_id, name in table.items():
        lut[int(source_id)] = vocabulary_id(name, vocab_ids, f"{where}: label id {source_id}")
        if name not in ("background", "ignore"):
            annotated[name] = int(lut[int(source_id)])
    return lut, sorted(annotated, key=annotated.__getitem__)


def vocabulary_id(name: str, vocab_ids: Mapping[str, int], where: str) -> int:
    """The label-map value of a vocabulary name; ``background`` is 0 and ``ignore`` 255."""
    if name == "background":
        return BACKGROUND_ID
    if name == "ignore":
        return IGNORE_ID
    if name not in vocab_ids:
        raise LabelError(where, f"{name!r} is not in the vocabulary; expected a name of medaug/vocab.py, background or ignore")
    vocab_id = int(vocab_ids[name])
    if not 0 < vocab_id < IGNORE_ID:
        raise LabelError(where, f"vocabulary id {vocab_id} of {name!r}; expected 1..254")
    return vocab_id


def structure_pixel_counts(label_HW: np.ndarray) -> dict[int, int]:
    """Vocabulary id → pixel count of one uint8 label slice, without background (0) and ignore (255)."""
    return _counts_to_dict(np.bincount(np.asarray(label_HW, dtype=np.uint8).ravel(), minlength=256))


def structure_pixel_counts_batch(labels_NHW: np.ndarray) -> np.ndarray:
    """(N, 256) int64 pixel counts of every value in every slice of a uint8 stack (one bincount)."""
    labels = np.asarray(labels_NHW, dtype=np.uint8)
    count = labels.shape[0]
    if count == 0:
        return np.zeros((0, 256), dtype=np.int64)
    offsets = (np.arange(count, dtype=np.int64) * 256)[:, None]
    flat = labels.reshape(count, -1) + offsets  # (N, H*W) with slice n's values in [256 n, 256 n + 255]
    return np.bincount(flat.ravel(), minlength=256 * count).reshape(count, 256)


def _counts_to_dict(counts_256: np.ndarray) -> dict[int, int]:
    counts = np.asarray(counts_256).copy()
    counts[[BACKGROUND_ID, IGNORE_ID]] = 0
    return {int(vocab_id): int(counts[vocab_id]) for vocab_id in np.flatnonzero(counts)}


# ---------------------------------------------------------------- the composition


@dataclass
class HarmonizedVolume:
    """One volume, harmonized: model-space slices that a shard stores and the index describes.

    ``images`` (N, C, size, size) float32 in [-1, 1]; ``labels`` (N, size, size) uint8 vocabulary ids
    (255 ignore) or None; ``affines`` (N, 4, 4) pixel (row, col, 0, 1) → RAS mm (convention in
    :mod:`medaug.prepare.geometry`); ``slice_indices`` (N,) along the RAS volume's slice axis;
    ``body_fractions`` (N,); ``pixel_counts`` per slice, vocabulary id → pixels (None without label).
    """

    images: np.ndarray  # (N, C, H, W) float32
    labels: np.ndarray | None  # (N, H, W) uint8
    affines: np.ndarray  # (N, 4, 4) float64
    slice_indices: np.ndarray  # (N,) int64
    body_fractions: np.ndarray  # (N,) float32
    intensity: dict[str, IntensityMapping]
    plane: str
    channels: list[str]
    structures_annotated: list[str]
    pixel_counts: list[dict[int, int]] | None
    spacing_mm: float  # in-plane, = target
    slice_spacing_mm: float  # distance between slice centres, kept from the source
    num_source_slices: int
    source_orientation: str

    @property
    def slice_thickness_mm(self) -> float:
        """The slice spacing (centre to centre), which is what the index records as slice thickness."""
        return self.slice_spacing_mm

    @property
    def intensity_json(self) -> list[dict[str, Any]]:
        """One :meth:`IntensityMapping.to_dict` per channel, in channel order, with its ``channel`` name
        (the index's ``intensity`` column)."""
        return [{"channel": channel, **self.intensity[channel].to_dict()} for channel in self.channels]


def harmonize_volume(
    image: Volume,
    label: Volume | None,
    *,
    modality: str,
    channels: list[str],
    target_spacing_mm: float,
    intensity: Mapping[str, Any] | None = None,
    size: int = 256,
    plane: str = "auto",
    min_body_fraction: float = 0.05,
    label_table: Mapping[int, str] | None = None,
    unmapped: str = "reject",
    vocab_ids: Mapping[str, int] | None = None,
) -> HarmonizedVolume:
    """Harmonize one image (C channels, named ``channels``) and its optional label (module docstring).

    ``intensity`` maps channel name → ``{"window_hu": (low, high)}`` (CT) or ``{"percentiles": (lo, hi)}``
    (MR), as dicts or objects with those attributes; a missing channel gets the modality's default
    (CT [-1000, 1000] HU, MR 0.5/99.5 percentiles). No kept slice gives N = 0 (the caller decides).

    Raises:
        HarmonizeError: bad modality/plane/channel count, upsampling beyond 2×, unusable intensities.
        LabelError: label off the image, label ids not in ``label_table`` under ``unmapped: reject``.
    """
    where = str(image.metadata.get("source_path", "image"))
    _check_request(image, modality, channels, size, where)
    ras = reorient_to_ras(image)
    label_IJK = align_label_to_image(label, ras) if label is not None else None
    plane = choose_slicing_plane(ras.spacing_mm, plane, hint=acquisition_plane_hint(image))
    grid = full_grid(ras.affine, ras.spatial_shape, plane, target_spacing_mm, where)
    strides = body_mask_strides(ras.spacing_mm, plane)
    coarse_CIJK = ras.array[:, :: strides[0], :: strides[1], :: strides[2]]
    body_IJK = body_mask(coarse_CIJK, modality, slice_axis=PLANE_AXES[plane][0])
    mappings = channel_mappings(coarse_CIJK, body_IJK, modality, channels, intensity, where)
    grid = grid.window(*body_window(project_body_mask(body_IJK, grid, strides), size), size)
    fractions = slice_body_fraction(_sample_body(body_IJK, grid, strides))
    kept = np.flatnonzero(keep_slice(fractions, min_body_fraction))
    images = slices_to_model(ras.array, grid, kept, [mappings[channel] for channel in channels])
    labels, annotated, counts = None, [], None
    if label_IJK is not None:
        where_label = str(label.metadata.get("source_path", "label"))
        labels, annotated, counts = _label_slices(label_IJK, grid, kept, label_table or {}, unmapped, vocab_ids or {}, where_label)
    normal = PLANE_AXES[plane][0]
    log.debug("%s: %s, kept %d of %d slices, window %s", where, plane, len(kept), ras.spatial_shape[normal], grid)
    return HarmonizedVolume(
        images=images, labels=labels, affines=slice_affines(ras.affine, grid, kept), slice_indices=kept,
        body_fractions=fractions[kept], intensity=mappings, plane=plane, channels=list(channels),
        structures_annotated=annotated, pixel_counts=counts, spacing_mm=float(target_spacing_mm),
        slice_spacing_mm=float(ras.spacing_mm[normal]), num_source_slices=int(ras.spatial_shape[normal]),
        source_orientation=str(ras.metadata.get("source_orientation", image.orientation)),
    )


def _check_request(image: Volume, modality: str, channels: list[str], size: int, where: str) -> None:
    if modality not in MODALITIES:
        raise HarmonizeError(where, f"modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if len(channels) != image.num_channels:
        raise HarmonizeError(where, f"{image.num_channels} channel(s) but {len(channels)} named {list(channels)}; expected one name per channel")
    if size < 1:
        raise HarmonizeError("size", f"is {size}; expected a positive slice size in pixels")


def body_mask_strides(spacing_mm: np.ndarray, plane: str) -> tuple[int, int, int]:
    """In-plane subsampling so the body mask has about ``BODY_MASK_SPACING_MM`` pixels; 1 through-plane."""
    strides = [max(1, int(BODY_MASK_SPACING_MM // spacing + 1e-6)) for spacing in spacing_mm]
    strides[PLANE_AXES[plane][0]] = 1
    return tuple(strides)  # type: ignore[return-value]


def channel_mappings(array_CIJK: np.ndarray, body_IJK: np.ndarray, modality: str, channels: list[str],
                     intensity: Mapping[str, Any] | None, where: str) -> dict[str, IntensityMapping]:
    """Channel name → mapping: ``window_hu`` (CT window), ``percentiles`` (inside ``body_IJK``), or default."""
    mappings = {}
    for number, channel in enumerate(channels):
        spec = (intensity or {}).get(channel)
        window_hu, percentiles = _spec_field(spec, "window_hu"), _spec_field(spec, "percentiles")
        if window_hu is None and percentiles is None:
            window_hu = DEFAULT_CT_WINDOW_HU if modality == "ct" else None
            percentiles = DEFAULT_MR_PERCENTILES if modality == "mr" else None
        if window_hu is not None:
            mappings[channel] = ct_window_mapping(tuple(window_hu))
        else:
            mappings[channel] = mr_percentile_mapping(array_CIJK[number], body_IJK, tuple(percentiles), f"{where}: channel {channel}")
    return mappings


def _spec_field(spec: Any, name: str) -> Any:
    if spec is None:
        return None
    return spec.get(name) if isinstance(spec, Mapping) else getattr(spec, name, None)


def _sample_body(body_IJK: np.ndarray, grid: SliceGrid, strides: tuple[int, int, int]) -> np.ndarray:
    """The (subsampled) body mask on every slice of the output grid: (N_all, H, W) bool."""
    all_slices = np.arange(body_IJK.shape[PLANE_AXES[grid.plane][0]])
    return sample_slices(body_IJK[None], grid.for_stride(strides), all_slices, linear=False, fill=False)[:, 0]


def slices_to_model(array_CIJK: np.ndarray, grid: SliceGrid, slice_indices: np.ndarray,
                    mappings: list[IntensityMapping]) -> np.ndarray:
    """Bilinear slices on the grid, each channel through its mapping: (N, C, H, W) float32 in [-1, 1].

    Pixels outside the scan are -1 (they are sampled as NaN, which never mixes with data).
    """
    images = sample_slices(array_CIJK, grid, slice_indices, linear=True, fill=np.nan)
    for number, mapping in enumerate(mappings):
        images[:, number] = mapping.to_model(images[:, number])
    return np.nan_to_num(images, copy=False, nan=-1.0)


def _label_slices(label_IJK: np.ndarray, grid: SliceGrid, slice_indices: np.ndarray, table: Mapping[int, str],
                  unmapped: str, vocab_ids: Mapping[str, int], where: str) -> tuple[np.ndarray, list[str], list[dict[int, int]]]:
    """Nearest-sampled, remapped label slices, the annotated names, and per-slice structure pixel counts."""
    sampled = sample_slices(label_IJK[None], grid, slice_indices, linear=False, fill=0)[:, 0]
    labels, annotated = remap_labels(sampled, table, unmapped, vocab_ids, where)
    counts = [_counts_to_dict(row) for row in structure_pixel_counts_batch(labels)]
    return labels, annotated, counts


__all__ = [
    "HarmonizeError", "HarmonizedVolume", "IntensityMapping", "SliceStack", "SliceGrid",
    "harmonize_volume", "reorient_to_ras", "choose_slicing_plane", "align_label_to_image", "resample_slices",
    "crop_or_pad", "body_mask", "ct_to_model", "mr_to_model", "slice_body_fraction", "keep_slice",
    "remap_labels", "structure_pixel_counts", "structure_pixel_counts_batch", "body_window",
]
