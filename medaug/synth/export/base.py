"""What every exporter shares: one labelled slice in model space (:class:`ExportSlice`), the canonical slice
affine for samples that have no real position (:func:`canonical_affine`), and atomic byte output.

Array conventions (DESIGN §3): ``image_CHW`` is float32 model space [-1, 1] holding the domain's channels
only (a model's zero-filled extra channels are dropped before export); ``label_HW`` is uint8 vocabulary ids
(0 background, 255 ignore). Row 0 is the top of the screen and column 0 its left, in the radiological view
of ``medaug.prepare.geometry`` (axial: rows anterior → posterior, columns patient right → left). ``affine``
maps pixel ``(row, col, 0, 1)`` to RAS mm, as the index's ``affine`` column (row-major 4x4).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medaug.errors import MedaugError
from medaug.io.atomic import PART_PREFIX

if TYPE_CHECKING:
    from medaug.prepare.intensity import IntensityMapping

# file-name safe: sample ids and channel names become parts of file names
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LABEL_NAME = "label"  # the label file's suffix, so no channel may be called this
HU_UNITS = "HU"
_IOV_MAX = 512  # buffers per writev call; POSIX guarantees at least 16, Linux takes 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
Buffer = bytes | memoryview  # a piece of a file's bytes
PLANES = ("axial", "coronal", "sagittal")


class ExportError(MedaugError):
    """A sample, an option or an output folder does not fit what an exporter writes."""


@dataclass(frozen=True, eq=False)
class ExportSlice:
    """One labelled slice to export (module docstring for the array conventions).

    Attributes:
        sample_id: file-name safe id (letters, digits, ``.``, ``_``, ``-``); names every file of the sample.
        image_CHW: (C, H, W) float32 in model space [-1, 1]; values outside are clipped on export.
        label_HW: (H, W) uint8 vocabulary ids, 0 background, 255 ignore.
        channels: the domain's channel names, in image order (``("ct",)``, ``("t2", "adc")``).
        affine: (4, 4) float64, pixel (row, col, 0, 1) → RAS mm; :func:`canonical_affine` when unknown.
        intensity: one mapping per channel, model → source units (``IntensityMapping`` or its dict form
            as stored in the index's ``intensity`` JSON).
        structures: vocabulary names present in ``label_HW``.
        domain: domain name (``ct/abdomen``), for metadata.
        annotated: vocabulary names the label map annotates at all; None means every structure an
            exporter asks for (a synthetic mask is decoded over the model's whole structure table).
        synthetic: False for real slices (the nnU-Net exporter of a prepared dataset).
        series_key: file-name safe; samples with the same domain and series key form one DICOM series
            (the engine sets the batch id); "" makes the sample a series of its own.
        instance_number: the DICOM InstanceNumber inside the series, ≥ 1 (the engine sets batch position + 1).
    """

    sample_id: str
    image_CHW: np.ndarray
    label_HW: np.ndarray
    channels: tuple[str, ...]
    affine: np.ndarray
    intensity: tuple[IntensityMapping, ...]
    structures: tuple[str, ...] = ()
    domain: str = ""
    annotated: tuple[str, ...] | None = None
    synthetic: bool = True
    series_key: str = ""
    instance_number: int = 1

    def __post_init__(self) -> None:
        where = f"sample {self.sample_id!r}"
        if not isinstance(self.sample_id, str) or not NAME_PATTERN.match(self.sample_id):
            raise ExportError(where, "sample_id is not file-name safe; expected letters, digits, '.', '_', '-'")
        set_field = object.__setattr__  # frozen: normalise once, here
        set_field(self, "channels", _checked_channels(self.channels, where))
        set_field(self, "image_CHW", _checked_image(self.image_CHW, len(self.channels), where))
        set_field(self, "label_HW", _checked_label(self.label_HW, self.image_CHW.shape[1:], where))
        set_field(self, "affine", _checked_affine(self.affine, where))
        set_field(self, "intensity", _checked_mappings(self.intensity, len(self.channels), where))
        set_field(self, "structures", tuple(self.structures))
        if self.annotated is not None:
            set_field(self, "annotated", tuple(self.annotated))
        _check_series(self.series_key, self.instance_number, where)

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) float64: row spacing, column spacing, slice thickness (norms of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def source_HW(self, channel: int) -> np.ndarray:
        """(H, W) float64: channel ``channel`` in source units (HU for CT, a.u. for MR), from clipped model values."""
        mapping = self.intensity[channel]
        source_HW = self.image_CHW[channel].astype(np.float64)  # in place below: mapping.to_source(clip(m))
        np.clip(source_HW, -1.0, 1.0, out=source_HW)
        source_HW *= mapping.scale
        source_HW += mapping.offset
        return source_HW


def _check_series(series_key: str, instance_number: int, where: str) -> None:
    if not isinstance(series_key, str) or (series_key and not NAME_PATTERN.match(series_key)):
        raise ExportError(where, f"series_key {series_key!r} is not file-name safe; expected letters, digits, "
                          "'.', '_', '-' or ''")
    if isinstance(instance_number, bool) or not isinstance(instance_number, (int, np.integer)) or instance_number < 1:
        raise ExportError(where, f"instance_number {instance_number!r}; expected an integer ≥ 1")


def _checked_channels(channels: Sequence[str], where: str) -> tuple[str, ...]:
    channels = tuple(channels)
    bad = [name for name in channels if not NAME_PATTERN.match(str(name)) or name == LABEL_NAME]
    if not channels or bad or len(set(channels)) != len(channels):
        raise ExportError(where, f"channels {list(channels)}; expected distinct file-name safe names, none "
                          f"called {LABEL_NAME!r}")
    return channels


def _checked_image(image_CHW: np.ndarray, channels: int, where: str) -> np.ndarray:
    image_CHW = np.asarray(image_CHW)
    if image_CHW.ndim != 3 or image_CHW.shape[0] != channels or not np.issubdtype(image_CHW.dtype, np.floating):
        raise ExportError(where, f"image is {image_CHW.dtype} {image_CHW.shape}; expected float (C={channels}, H, W)")
    image_CHW = np.ascontiguousarray(image_CHW, dtype=np.float32)
    if not np.isfinite(image_CHW).all():
        raise ExportError(where, "image has NaN/inf values; expected finite model-space values in [-1, 1]")
    return image_CHW


def _checked_label(label_HW: np.ndarray, shape_HW: tuple[int, ...], where: str) -> np.ndarray:
    label_HW = np.asarray(label_HW)
    if label_HW.shape != tuple(shape_HW) or label_HW.dtype != np.uint8:
        raise ExportError(where, f"label is {label_HW.dtype} {label_HW.shape}; expected uint8 {tuple(shape_HW)}")
    return np.ascontiguousarray(label_HW)


def _checked_affine(affine: np.ndarray, where: str) -> np.ndarray:
    try:
        affine = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    except ValueError:
        raise ExportError(where, "affine does not hold 16 numbers; expected a 4x4 pixel → RAS mm matrix") from None
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ExportError(where, "affine is singular or not finite; expected positive pixel spacing")
    return affine


def _checked_mappings(mappings: Sequence[Any], channels: int, where: str) -> tuple[IntensityMapping, ...]:
    from medaug.prepare.intensity import IntensityMapping

    converted = tuple(IntensityMapping.from_dict(dict(m)) if isinstance(m, Mapping) else m for m in mappings)
    if len(converted) != channels or not all(isinstance(m, IntensityMapping) for m in converted):
        raise ExportError(where, f"{len(converted)} intensity mappings; expected one IntensityMapping (or its "
                          f"dict) per channel, {channels}")
    return converted


def canonical_affine(spacing_mm: float | Sequence[float], size: int | Sequence[int], plane: str = "axial",
                     slice_thickness_mm: float | None = None) -> np.ndarray:
    """(4, 4) float64 pixel (row, col, 0, 1) → RAS mm for a slice with no real position.

    The display convention of ``medaug.prepare.geometry`` on an RAS-aligned grid: axial rows run anterior →
    posterior (−y) and columns patient right → left (−x), the third column points +z; coronal rows
    superior → inferior (−z), columns right → left (−x), normal +y; sagittal rows superior → inferior
    (−z), columns anterior → posterior (−y), normal +x. The slice centre sits at RAS (0, 0, 0).

    Args:
        spacing_mm: in-plane pixel spacing, one number or (row, col).
        size: slice size in pixels, one number or (H, W).
        plane: ``axial``, ``coronal`` or ``sagittal``.
        slice_thickness_mm: length of the third column; defaults to the row spacing.
    """
    from medaug.prepare.geometry import PLANE_AXES

    if plane not in PLANES:
        raise ExportError("plane", f"is {plane!r}; expected one of {', '.join(PLANES)}")
    row_mm, col_mm = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (2,))
    height, width = np.broadcast_to(np.asarray(size, dtype=np.int64), (2,))
    if not (row_mm > 0 and col_mm > 0 and height > 0 and width > 0):
        raise ExportError("canonical_affine", f"spacing {spacing_mm} mm, size {size}; expected positive values")
    normal, row_axis, col_axis = PLANE_AXES[plane]
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    affine[row_axis, 0] = -row_mm
    affine[col_axis, 1] = -col_mm
    affine[normal, 2] = row_mm if slice_thickness_mm is None else float(slice_thickness_mm)
    centre_rc = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    affine[:3, 3] = -(affine[:3, :2] @ centre_rc)
    return affine


def write_bytes_atomic(path: Path, buffers: Buffer | Sequence[Buffer]) -> Path:
    """Write ``buffers`` one after another to ``path`` under a temporary name, then rename.

    The temporary name is ``medaug.io.atomic``'s (``.part-{pid}-{name}`` in the same folder, removed on any
    error), so a file under ``path`` is always complete. Written with the fewest system calls (open, one
    ``os.writev`` of the pieces as they are, close, rename; the folder is made only when the open finds it
    missing): a join would copy every byte once more while holding the GIL.
    """
    pieces = [memoryview(buffers)] if isinstance(buffers, (bytes, memoryview)) else [memoryview(b) for b in buffers]
    folder, name = os.path.split(os.fspath(path))
    temporary = os.path.join(folder, f"{PART_PREFIX}{os.getpid()}-{name}")
    try:
        descriptor = os.open(temporary, _WRITE_FLAGS, 0o666)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        descriptor = os.open(temporary, _WRITE_FLAGS, 0o666)
    try:
        try:
            _write_all(descriptor, [piece.cast("B") for piece in pieces if piece.nbytes])
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def _write_all(descriptor: int, pieces: list[memoryview]) -> None:
    """``os.writev`` until every byte is written (a regular file may take a short write)."""
    while pieces:
        written = os.writev(descriptor, pieces[:_IOV_MAX])
        if written == 0:
            raise OSError(f"writev wrote nothing of {sum(piece.nbytes for piece in pieces)} bytes")
        while pieces and written >= pieces[0].nbytes:
            written -= pieces.pop(0).nbytes
        if pieces and written:
            pieces[0] = pieces[0][written:]
