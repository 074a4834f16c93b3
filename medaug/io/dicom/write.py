"""Plain CT / MR Image Storage series out: one file per slice, explicit VR little endian, with geometry.

A one-channel :class:`~medaug.io.volume.Volume` ``(1, I, J, K)`` becomes ``K`` single-frame files. Slice
``k`` holds ``array[0, :, :, k].T``: DICOM rows follow the voxel axis ``j`` and columns the axis ``i``, so

* ImageOrientationPatient = LPS direction of ``i`` (the row direction, along which the column index
  grows), then LPS direction of ``j``;
* PixelSpacing = ``[spacing_j, spacing_i]`` (the spacing between rows first);
* ImagePositionPatient of slice ``k`` = LPS position of voxel ``(0, 0, k)``.

The RAS affine goes back to DICOM's LPS by negating x and y (``LPS_TO_RAS`` is its own inverse).
Intensities are stored as int16 with RescaleSlope / RescaleIntercept chosen so that
``stored * slope + intercept`` reproduces the float array within half a rescale step.

This writer converts a Volume faithfully and nothing more: it does not mark images as synthetic. Callers
that export generated images (DESIGN §3, "Synthetic output") pass the marking attributes in ``extra``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medaug.io.atomic import atomic_output
from medaug.io.volume import LPS_TO_RAS, Volume

__all__ = [
    "MEDAUG_UID_ROOT",
    "SliceGeometry",
    "affine_to_dicom_geometry",
    "choose_rescale",
    "modality_attributes",
    "series_attributes",
    "write_dicom_series",
]

logger = logging.getLogger(__name__)

# Placeholder UID root until medaug registers its own (e.g. a free root from Medical Connections, whose
# arc 1.2.826.0.1.3680043.10 this sits under). UIDs are this root plus a random 128-bit decimal suffix
# (pydicom's generate_uid), truncated by pydicom to the DICOM limit of 64 characters.
MEDAUG_UID_ROOT = "1.2.826.0.1.3680043.10.1374."

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SOP_CLASS_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

INT16_MIN = -32768
INT16_MAX = 32767
# Float data is mapped to +-FLOAT_STORED_HALF_RANGE, leaving headroom for rounding the slope to 16 characters.
FLOAT_STORED_HALF_RANGE = 32000
# i/j axes may deviate from orthogonal, and k from their normal, by this much (cosine) before refusal.
ORTHOGONALITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM Image Plane values for a series, all in LPS millimetres.

    ``orientation_6``: row (i axis) then column (j axis) direction cosines; ``pixel_spacing_2``:
    ``[spacing_j, spacing_i]``; ``positions_K3``: ImagePositionPatient of each slice ``k``;
    ``slice_spacing_mm``: distance between slice planes (the k voxel length); ``slice_locations_K``:
    each position projected on the slice normal (``row × column``).
    """

    orientation_6: np.ndarray
    pixel_spacing_2: np.ndarray
    positions_K3: np.ndarray
    slice_spacing_mm: float
    slice_locations_K: np.ndarray


def affine_to_dicom_geometry(affine: np.ndarray, num_slices: int, where: str | Path = "affine") -> SliceGeometry:
    """Convert a voxel→RAS affine to DICOM Image Plane values for slices ``k = 0 .. num_slices-1``.

    Oblique planes are supported; refused (``ValueError`` naming ``where``) are zero or non-finite
    spacing, i/j axes that are not orthogonal, and a k axis that leaves the plane normal (sheared
    stacks such as uncorrected gantry tilt, which Image Plane cannot describe per file).
    """
    affine_lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    axes_33 = affine_lps[:3, :3]
    spacing_3 = np.linalg.norm(axes_33, axis=0)
    if not np.all(np.isfinite(affine_lps)) or np.any(spacing_3 < 1e-6):
        raise ValueError(f"{where}: voxel spacing {spacing_3.tolist()} mm; expected finite, positive spacing")
    directions_33 = axes_33 / spacing_3  # unit column per voxel axis, LPS
    row_3, column_3, slice_3 = directions_33.T
    if abs(float(row_3 @ column_3)) > ORTHOGONALITY_TOLERANCE:
        raise ValueError(f"{where}: i and j axes have cosine {row_3 @ column_3:.4f}; expected orthogonal in-plane axes")
    normal_3 = np.cross(row_3, column_3)
    if abs(float(normal_3 @ slice_3)) < 1.0 - ORTHOGONALITY_TOLERANCE:
        raise ValueError(
            f"{where}: k axis is at cosine {normal_3 @ slice_3:.4f} to the i×j normal; expected slices stacked along the normal"
        )
    ijk_K4 = np.zeros((num_slices, 4))
    ijk_K4[:, 2] = np.arange(num_slices)
    ijk_K4[:, 3] = 1.0
    positions_K3 = (ijk_K4 @ affine_lps.T)[:, :3]
    return SliceGeometry(
        orientation_6=np.concatenate([row_3, column_3]),
        pixel_spacing_2=np.array([spacing_3[1], spacing_3[0]]),
        positions_K3=positions_K3,
        slice_spacing_mm=float(spacing_3[2]),
        slice_locations_K=positions_K3 @ normal_3,
    )


def choose_rescale(values: np.ndarray, integers: bool = True) -> tuple[float, float]:
    """Pick (RescaleSlope, RescaleIntercept) so int16 stored values reproduce ``values`` within half a step.

    Integral values that fit int16 (CT HU) keep slope 1, intercept 0; integral values spanning at most
    the int16 range keep slope 1 with an integral intercept; anything else (MR floats) is spread over
    about ±32000. ``integers=False`` spreads integral values too (``values`` is only a range, such as MR
    a.u. [0, 1000], whose integral ends say nothing about the precision of what lies between). Both
    numbers are already rounded to what a 16-character DS string holds.
    """
    values = np.asarray(values)
    low, high = float(np.min(values)), float(np.max(values))
    integral = not np.issubdtype(values.dtype, np.floating) or np.array_equal(values, np.rint(values))
    if integers and integral:
        if low >= INT16_MIN and high <= INT16_MAX:
            return 1.0, 0.0
        if high - low <= INT16_MAX - INT16_MIN:
            return 1.0, float(np.floor(low) - INT16_MIN)
    if high == low:
        return 1.0, _ds_round(low)
    slope = _ds_round((high - low) / (2 * FLOAT_STORED_HALF_RANGE))
    intercept = _ds_round((high + low) / 2)
    return slope, intercept


def _ds_round(value: float) -> float:
    """The float a DS (decimal string, ≤ 16 characters) element will hold for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    return float(format_number_as_ds(float(value)))


def _values_to_stored(values: np.ndarray, slope: float, intercept: float, where: str | Path) -> np.ndarray:
    """Float values → int16 stored values ``round((v - intercept) / slope)``, refusing overflow."""
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    if stored.size and (stored.min() < INT16_MIN or stored.max() > INT16_MAX):
        raise ValueError(
            f"{where}: rescale (slope {slope}, intercept {intercept}) maps values to [{stored.min():.0f}, {stored.max():.0f}]; "
            "expected the int16 range"
        )
    return stored.astype("<i2")


def _check_volume(volume: Volume, modality: str, folder: Path) -> None:
    if modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"{folder}: modality {modality!r}; expected one of {sorted(SOP_CLASS_BY_MODALITY)}")
    if volume.num_channels != 1:
        raise ValueError(f"{folder}: volume has {volume.num_channels} channels; expected one (write channels as separate series)")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.all(np.isfinite(volume.array)):
        raise ValueError(f"{folder}: volume holds NaN/inf voxels; expected finite intensities")


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str,
    series_description: str,
    patient_id: str = "ANONYMOUS",
    patient_name: str = "ANONYMOUS^",
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    series_number: int = 1,
    uid_root: str = MEDAUG_UID_ROOT,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a one-channel Volume as a CT or MR Image Storage series, one file per k slice.

    Args:
        volume: ``(1, I, J, K)`` intensities (CT in HU, MR in arbitrary units) with a voxel→RAS affine
            whose i and j axes are orthogonal (oblique is fine) and whose k axis is their normal.
        folder: output folder, created if missing; files are ``{series_number:03d}_{k:04d}.dcm``.
        modality: ``"CT"`` (CT Image Storage, RescaleType HU) or ``"MR"`` (MR Image Storage).
        series_description: SeriesDescription.
        patient_id, patient_name: PatientID / PatientName (DICOM PN, ``"FAMILY^GIVEN"``).
        study_uid, series_uid: reuse a study or series UID; fresh ones (under ``uid_root``) otherwise.
        rescale: ``(slope, intercept)`` to force; by default :func:`choose_rescale` of the whole volume.
        window: ``(center, width)`` in rescaled units (HU for CT) for WindowCenter / WindowWidth.
        series_number: SeriesNumber and file name prefix.
        uid_root: prefix of every generated UID (ends with ``"."``).
        extra: DICOM keyword → value, set on every file last (overrides anything above; e.g. a shared
            FrameOfReferenceUID for co-registered channels, or the synthetic-output marking).

    Returns:
        The written paths in slice order ``k = 0 .. K-1``.

    Raises:
        ValueError: naming the folder and field, for several channels, NaN/inf voxels, an unknown
            modality, non-orthogonal or sheared axes, values that overflow int16, unknown ``extra`` keywords.
    """
    folder = Path(folder)
    _check_volume(volume, modality, folder)
    _check_extra_keywords(extra or {}, folder)
    values_IJK = volume.array[0]
    geometry = affine_to_dicom_geometry(volume.affine, values_IJK.shape[2], where=f"{folder} (affine)")
    slope, intercept = choose_rescale(values_IJK) if rescale is None else (_ds_round(rescale[0]), _ds_round(rescale[1]))
    stored_IJK = _values_to_stored(values_IJK, slope, intercept, folder)
    series = series_attributes(
        modality=modality,
        series_description=series_description,
        patient=(patient_id, patient_name),
        uids=(study_uid or _new_uid(uid_root), series_uid or _new_uid(uid_root), _new_uid(uid_root)),
        rescale=(slope, intercept),
        window=window,
        series_number=series_number,
    )
    series.update(_plane_attributes(geometry, stored_IJK.shape))
    dataset = _series_dataset(series)
    paths = []
    for k in range(stored_IJK.shape[2]):
        _set_slice(dataset, geometry, k, stored_IJK[:, :, k].T, uid_root)
        _set_attributes(dataset, extra or {})
        path = folder / f"{series_number:03d}_{k:04d}.dcm"
        with atomic_output(path) as temporary:
            dataset.save_as(temporary, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d %s slices to %s (slope %s, intercept %s)", len(paths), modality, folder, slope, intercept)
    return paths


def _new_uid(uid_root: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=uid_root))


def _ds(values: np.ndarray | float) -> list[str] | str:
    """Decimal strings (≤ 16 characters) for DS elements; ``-0`` is written as ``0``."""
    from pydicom.valuerep import format_number_as_ds

    if np.ndim(values) == 0:
        return format_number_as_ds(float(values) + 0.0)
    return [format_number_as_ds(float(v) + 0.0) for v in np.ravel(values)]


def _check_extra_keywords(extra: dict[str, Any], folder: Path) -> None:
    from pydicom.datadict import tag_for_keyword

    unknown = sorted(keyword for keyword in extra if tag_for_keyword(keyword) is None)
    if unknown:
        raise ValueError(f"{folder}: extra has unknown DICOM keywords {unknown}; expected pydicom data dictionary keywords")


def _set_attributes(dataset: Any, attributes: dict[str, Any]) -> None:
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)


def series_attributes(
    *,
    modality: str,
    series_description: str,
    patient: tuple[str, str],
    uids: tuple[str, str, str],
    rescale: tuple[float, float],
    window: tuple[float, float] | None,
    series_number: int,
    created: dt.datetime | None = None,
) -> dict[str, Any]:
    """Keyword → value shared by every file of the series (patient, study, series, equipment, pixels).

    ``created`` stamps the study, series and content dates and times (default: now).
    """
    from medaug import __version__

    now = created or dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    study_uid, series_uid, frame_uid = uids
    attributes: dict[str, Any] = {
        "SOPClassUID": SOP_CLASS_BY_MODALITY[modality],
        "StudyDate": date, "SeriesDate": date, "ContentDate": date,
        "StudyTime": time, "SeriesTime": time, "ContentTime": time,
        "AccessionNumber": "", "Modality": modality, "Laterality": "", "Manufacturer": "medaug",
        "ReferringPhysicianName": "", "SeriesDescription": series_description,
        "ManufacturerModelName": "medaug", "SoftwareVersions": __version__,
        "PatientName": patient[1], "PatientID": patient[0], "PatientBirthDate": "", "PatientSex": "",
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "StudyID": "1",
        "SeriesNumber": series_number, "AcquisitionNumber": 1, "PatientPosition": "",
        "FrameOfReferenceUID": frame_uid, "PositionReferenceIndicator": "",
        "DerivationDescription": f"voxel volume written by medaug {__version__}",
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
    }  # fmt: skip
    if modality == "CT" or rescale != (1.0, 0.0):
        # MR Image has no Modality LUT; vendors add one anyway for scaled data, and readers honour it.
        attributes.update(RescaleIntercept=_ds(rescale[1]), RescaleSlope=_ds(rescale[0]))
    if window is not None:
        attributes.update(WindowCenter=_ds(window[0]), WindowWidth=_ds(window[1]))
    attributes.update(modality_attributes(modality))
    if any(not str(value).isascii() for value in (*patient, series_description)):
        attributes["SpecificCharacterSet"] = "ISO_IR 192"  # UTF-8
    return attributes


def modality_attributes(modality: str) -> dict[str, Any]:
    """CT Image / MR Image module values; acquisition parameters medaug cannot know stay empty (type 2)."""
    if modality == "CT":
        return {"ImageType": ["DERIVED", "SECONDARY", "AXIAL"], "KVP": None, "RescaleType": "HU"}
    return {
        "ImageType": ["DERIVED", "SECONDARY", "OTHER"],
        "ScanningSequence": "RM",  # research mode: no scanner sequence produced these intensities
        "SequenceVariant": "NONE",
        "ScanOptions": "",
        "MRAcquisitionType": "",
        "RepetitionTime": None,
        "EchoTime": None,
        "EchoTrainLength": None,
    }


def _plane_attributes(geometry: SliceGeometry, stored_IJK_shape: tuple[int, ...]) -> dict[str, Any]:
    """Image Plane and Image Pixel size values shared by every slice."""
    return {
        "Rows": int(stored_IJK_shape[1]),
        "Columns": int(stored_IJK_shape[0]),
        "PixelSpacing": _ds(geometry.pixel_spacing_2),
        "ImageOrientationPatient": _ds(geometry.orientation_6),
        "SliceThickness": _ds(geometry.slice_spacing_mm),
        "SpacingBetweenSlices": _ds(geometry.slice_spacing_mm),
    }


def _series_dataset(series: dict[str, Any]) -> Any:
    """A file dataset (explicit VR little endian) holding the series values; slices then fill their own."""
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series["SOPClassUID"]
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    dataset = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    _set_attributes(dataset, series)
    return dataset


def _set_slice(dataset: Any, geometry: SliceGeometry, k: int, stored_JI: np.ndarray, uid_root: str) -> None:
    """Set slice k's UID, number, position and pixels (rows j, columns i) on the series dataset."""
    sop_instance_uid = _new_uid(uid_root)
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.InstanceNumber = k + 1
    dataset.ImagePositionPatient = _ds(geometry.positions_K3[k])
    dataset.SliceLocation = _ds(geometry.slice_locations_K[k])
    dataset.PixelData = np.ascontiguousarray(stored_JI, dtype="<i2").tobytes()
