"""DICOM SEG in: a Segmentation object (BINARY, FRACTIONAL or LABELMAP) as a uint8 label map.

The SEG is decoded with highdicom (``segread`` + ``get_volume``), which sorts its frames by plane
position into a regular grid (frames omitted for being empty count as background). Each segment's voxels
get the segment number as label value; where segments overlap, the smaller segment wins (a tumour stays
inside its organ) and the overlap is logged. FRACTIONAL segments count where the value is ≥ 0.5.

With a ``reference`` image Volume, the label map is placed on the reference grid **by physical
position**: every reference voxel centre is mapped through the SEG's own affine (built from its frames'
PlanePosition/PlaneOrientation/PixelMeasures) to the nearest SEG voxel; reference voxels outside the SEG's
frames are background. Array order never matters. FrameOfReferenceUIDs must agree where both are known;
a SEG whose referenced SOP instances are none of the reference's images is read but warned about.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medaug.errors import ImageReadError, LabelError
from medaug.io.checks import require_file
from medaug.io.volume import LPS_TO_RAS, Volume

logger = logging.getLogger(__name__)

MAX_SEGMENT_NUMBER = 254  # 255 is the ignore label of medaug label maps
FRACTIONAL_THRESHOLD = 0.5


@dataclass(frozen=True)
class SegmentInfo:
    """One segment's identity: number (= label value), label and its codes (scheme, value, meaning)."""

    number: int
    label: str
    category: tuple[str, str, str]
    property_type: tuple[str, str, str]
    type_modifier: tuple[str, str, str] | None
    algorithm_type: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "label": self.label,
            "category": list(self.category),
            "property_type": list(self.property_type),
            "type_modifier": list(self.type_modifier) if self.type_modifier else None,
            "algorithm_type": self.algorithm_type,
        }


def read_dicom_seg(path: str | Path, reference: Volume | None = None) -> tuple[Volume, dict[int, str]]:
    """Read a DICOM SEG file into a uint8 label map ``(1, I, J, K)`` and its segment labels.

    Args:
        path: the SEG file.
        reference: the image Volume the SEG was drawn on; the label map is then resampled (nearest
            neighbour, by physical position) onto its grid and shares its affine.

    Returns:
        ``(label_volume, {segment number: SegmentLabel})``. The label volume's metadata holds
        ``segments`` (numbers, labels and codes, so a recipe can map them), the SEG's UIDs and
        ``format: "dicom-seg"``. Without ``reference`` the grid is the SEG's own (i = column, j = row,
        k = slice, RAS affine).

    Raises:
        ImageReadError: not a readable DICOM SEG.
        LabelError: segment numbers above 254, frames that do not form a volume, a different frame of
            reference than ``reference``.
    """
    path = require_file(path)
    seg = _read_segmentation(path)
    segments = _segment_infos(seg)
    labels_ijk, affine_ras = _label_grid(seg, segments, path)
    if reference is not None:
        _check_same_frame_of_reference(seg, reference, path)
        _warn_if_other_images(seg, reference, path)
        labels_ijk = resample_labels_nearest(labels_ijk, affine_ras, reference.spatial_shape, reference.affine)
        affine_ras = reference.affine.copy()
    metadata = _seg_metadata(seg, path, segments, reference)
    volume = Volume(array=labels_ijk[None], affine=affine_ras, metadata=metadata)
    return volume, {s.number: s.label for s in segments}


def _read_segmentation(path: Path) -> Any:
    """highdicom's Segmentation for ``path``; one-line ImageReadError for anything else."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError) as error:
        raise ImageReadError(
            path, f"not a readable DICOM file ({type(error).__name__}: {error}); expected a DICOM SEG"
        ) from None
    modality = str(dataset.get("Modality", ""))
    if modality != "SEG":
        raise ImageReadError(path, f"modality {modality or 'missing'}; expected a DICOM SEG (modality SEG)")
    try:
        return hd.seg.Segmentation.from_dataset(dataset, copy=False)
    except (AttributeError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ImageReadError(path, f"invalid DICOM SEG ({type(error).__name__}: {error})") from None


def _segment_infos(seg: Any) -> list[SegmentInfo]:
    """Segment numbers, labels and codes, in segment-number order."""
    infos = []
    for item in seg.SegmentSequence:
        modifier = None
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        if "SegmentedPropertyTypeModifierCodeSequence" in type_item:
            modifier = _code(type_item.SegmentedPropertyTypeModifierCodeSequence[0])
        infos.append(
            SegmentInfo(
                number=int(item.SegmentNumber),
                label=str(item.get("SegmentLabel", "") or f"segment {int(item.SegmentNumber)}"),
                category=_code(item.SegmentedPropertyCategoryCodeSequence[0]),
                property_type=_code(type_item),
                type_modifier=modifier,
                algorithm_type=str(item.get("SegmentAlgorithmType", "")),
            )
        )
    return sorted(infos, key=lambda s: s.number)


def _code(item: Any) -> tuple[str, str, str]:
    return (
        str(item.get("CodingSchemeDesignator", "")),
        str(item.get("CodeValue", "")),
        str(item.get("CodeMeaning", "")),
    )


def _label_grid(seg: Any, segments: list[SegmentInfo], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The SEG's own regular grid: labels (I, J, K) uint8 and the voxel→RAS affine (4, 4).

    highdicom's volume is (slice, row, column[, segment]) with an LPS affine of those axes; medaug's
    axes are (column, row, slice), hence the transpose and the column reorder.
    """
    too_large = [s.number for s in segments if s.number > MAX_SEGMENT_NUMBER]
    if too_large:
        raise LabelError(
            path, f"segment numbers {too_large} do not fit a uint8 label map; expected at most {MAX_SEGMENT_NUMBER}"
        )
    numbers = [s.number for s in segments]
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        raise LabelError(
            path,
            f"SEG frames do not form a regular volume ({type(error).__name__}: {error}); "
            "expected parallel, evenly spaced frames",
        ) from None
    masks_srcn = np.asarray(volume.array)  # (slices, rows, cols, segments)
    if masks_srcn.ndim == 3:
        masks_srcn = masks_srcn[..., None]
    masks_ijkn = masks_srcn.transpose(2, 1, 0, 3) >= (FRACTIONAL_THRESHOLD if masks_srcn.dtype.kind == "f" else 1)
    affine_lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return _combine_segments(masks_ijkn, numbers, path), LPS_TO_RAS @ affine_lps


def _combine_segments(masks_ijkn: np.ndarray, numbers: list[int], path: Path) -> np.ndarray:
    """Per-segment masks (I, J, K, N) bool → one uint8 label map (I, J, K); smaller segments win overlaps."""
    labels = np.zeros(masks_ijkn.shape[:3], dtype=np.uint8)
    sizes = masks_ijkn.reshape(-1, masks_ijkn.shape[3]).sum(axis=0)
    for n in np.argsort(-sizes, kind="stable"):
        mask = masks_ijkn[..., n]
        overlap = int(np.count_nonzero(labels[mask]))
        if overlap:
            logger.warning(
                "%s: segment %d overlaps %d voxels of larger segments; the smaller segment wins",
                path,
                numbers[n],
                overlap,
            )
        labels[mask] = numbers[n]
    return labels


def resample_labels_nearest(
    labels_ijk: np.ndarray, affine_ras: np.ndarray, target_shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid, by physical (RAS mm) position.

    Target voxels whose nearest source voxel lies outside the source grid (more than half a voxel beyond
    its edge) get 0. Works one target slice at a time to bound memory. Returns uint8 (I, J, K).
    """
    to_source = np.linalg.inv(affine_ras) @ np.asarray(target_affine, dtype=np.float64)  # target ijk → source ijk
    shape = np.array(labels_ijk.shape)
    out = np.zeros(target_shape, dtype=labels_ijk.dtype)
    ii, jj = np.meshgrid(np.arange(target_shape[0]), np.arange(target_shape[1]), indexing="ij")  # (I, J) each
    for k in range(target_shape[2]):
        target = np.stack([ii, jj, np.full_like(ii, k), np.ones_like(ii)], axis=-1)  # (I, J, 4)
        source = np.rint(target @ to_source.T)[..., :3].astype(np.int64)  # (I, J, 3)
        inside = np.all((source >= 0) & (source < shape), axis=-1)  # (I, J)
        picked = source[inside]
        out[:, :, k][inside] = labels_ijk[picked[:, 0], picked[:, 1], picked[:, 2]]
    return out


def _check_same_frame_of_reference(seg: Any, reference: Volume, path: Path) -> None:
    seg_uid = str(seg.get("FrameOfReferenceUID", "") or "")
    reference_uid = str(reference.metadata.get("frame_of_reference_uid", "") or "")
    if seg_uid and reference_uid and seg_uid != reference_uid:
        raise LabelError(
            path,
            f"FrameOfReferenceUID {seg_uid} differs from the reference image's {reference_uid}; "
            "expected a SEG drawn on that image's frame of reference",
        )


def _warn_if_other_images(seg: Any, reference: Volume, path: Path) -> None:
    """Warn when the SEG references SOP instances and none of them is one of the reference's slices."""
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }
    reference_uids = {uid for uid in reference.metadata.get("sop_instance_uids", []) if uid}
    if referenced and reference_uids and not referenced & reference_uids:
        logger.warning(
            "%s: SEG references none of the reference image's SOP instances; placed by physical position", path
        )


def _seg_metadata(seg: Any, path: Path, segments: list[SegmentInfo], reference: Volume | None) -> dict[str, Any]:
    referenced_series = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    return {
        "format": "dicom-seg",
        "source_path": str(path),
        "modality": "SEG",
        "segmentation_type": str(seg.get("SegmentationType", "")),
        "series_instance_uid": str(seg.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(seg.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(seg.get("FrameOfReferenceUID", "") or ""),
        "referenced_series_uids": referenced_series,
        "segments": [s.as_dict() for s in segments],
        "label_values": {str(s.number): s.label for s in segments},
        "on_reference_grid": reference is not None,
        "reference_series_uid": reference.metadata.get("series_instance_uid") if reference is not None else None,
    }
