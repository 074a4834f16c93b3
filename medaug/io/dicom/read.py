"""DICOM series in: a file or a folder tree of CT/MR/PT images → one :class:`Volume` per volume.

How a folder becomes volumes (what hospital exports need):

1. **Scan** (headers only, ``stop_before_pixels``): every regular file under the folder, in sorted
   order, whatever its suffix. A file is DICOM when it has the ``DICM`` preamble (or, without one, starts
   with a group 0002/0008 tag and parses); anything else is skipped, and so is ``DICOMDIR``.
   A DICOM file whose header cannot be read becomes an error for its series.
2. **Slices**: a classic image is one slice; an Enhanced CT/MR/PET multi-frame image gives one slice per
   frame from its shared and per-frame functional groups (PlanePosition, PlaneOrientation,
   PixelMeasures, PixelValueTransformation, FrameContent); a Siemens mosaic (ImageType ``MOSAIC``) is
   unpacked into its tiles, each placed with the mosaic correction (the stored position is the corner
   of the whole mosaic; the tile's corner lies half the unused mosaic width further in) and stepped
   along the CSA header's ``SliceNormalVector`` by SpacingBetweenSlices. Objects that are not
   cross-sectional images (SR, PR, RT, SEG, CR/DX projections...) are skipped with a logged reason.
3. **Grouping**: by SeriesInstanceUID, then by orientation (within 1e-3), image shape, pixel spacing and
   enhanced StackID. A series whose orientation groups all hold 1-3 images, an orientation group of
   1-3 images beside a larger one, and any image with ImageType ``LOCALIZER`` are localizers/scouts:
   skipped. Where one group repeats positions (or does not form a uniform stack), it is split by
   TemporalPositionIdentifier / EchoNumbers / AcquisitionNumber / TriggerTime (enhanced: temporal
   position index, effective echo time), the first key whose parts are each a clean stack.
4. **Geometry**: slices are ordered by position along the normal ``n = row × col`` of
   ImageOrientationPatient, never by file name or InstanceNumber. The voxel axes are the NIfTI/ITK ones:
   ``i`` = column index, along the row direction (IOP[0:3]) with spacing PixelSpacing[1]; ``j`` = row
   index, along the column direction (IOP[3:6]) with spacing PixelSpacing[0]; ``k`` = slice index, along
   the measured step between consecutive positions (SliceThickness is not used for spacing). Steps must be
   uniform within ``min(max(1 %, 0.1 mm), 5 %)`` of the step; a gap (missing slice) or a repeated position
   (duplicated slice) raises :class:`DicomSeriesError`. A single slice is a 2D volume (K = 1) whose third
   axis is the normal times SliceThickness (else SpacingBetweenSlices, else 1 mm).
   **Gantry tilt** is kept, not rejected: when the step between positions is not parallel to ``n``, the
   third affine column is the actual step vector, a sheared affine that maps every voxel to its true
   position (``metadata["gantry_tilt_deg"]`` says by how much). Resample it if an orthogonal grid is needed.
5. **Pixels**: RescaleSlope/RescaleIntercept per slice (they may differ) → float32, or int16 where every
   slope and intercept is integral and the result fits; CT values are HU. The affine is LPS → RAS
   (:data:`LPS_TO_RAS`).

Batch callers: :func:`scan_dicom_folder` (or :func:`iter_dicom_folder`, one volume in memory at a time)
returns one :class:`SeriesResult` per volume, skipped object or failure, and never raises for a bad
series; :func:`read_dicom_series_all` raises the first failure; :func:`read_dicom` wants exactly one volume.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medaug.errors import DicomSeriesError, ImageReadError
from medaug.io.checks import require_finite, require_valid_affine
from medaug.io.volume import LPS_TO_RAS, Volume

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
ORIENTATION_TOL = 1e-3  # max |Δ direction cosine| for two slices to share an orientation
DUPLICATE_TOL_MM = 1e-3  # two positions closer than this along the normal are the same slice
MAX_LOCALIZER_IMAGES = 3
LOCALIZER_WORDS = ("LOCALIZER", "LOCALISER", "SCOUT", "SURVEY", "TOPOGRAM", "SCANOGRAM", "PILOT")
SPLIT_KEYS = ("temporal", "echo", "acquisition", "trigger")
SPLIT_KEY_METADATA = {
    "temporal": "temporal_position",  # TemporalPositionIdentifier, or an enhanced frame's TemporalPositionIndex
    "echo": "echo",  # EchoNumbers, or an enhanced MR frame's EffectiveEchoTime (ms)
    "acquisition": "acquisition_number",
    "trigger": "trigger_time_ms",
}
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}  # images without geometry in other modalities are skipped
NON_VOLUME_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG"}


# ---------------------------------------------------------------------------------------------- results


@dataclass
class SeriesResult:
    """One volume found in a DICOM folder, or one object left out, or one failure.

    Exactly one of ``volume`` (loaded), ``skipped`` (a reason: localizer, SR, SEG...) and ``error``
    (an :class:`ImageReadError`/:class:`DicomSeriesError` with a one-line message) is set.
    """

    series_uid: str
    description: str
    files: tuple[Path, ...]
    volume: Volume | None = None
    skipped: str | None = None
    error: ImageReadError | None = None

    @property
    def ok(self) -> bool:
        return self.volume is not None

    def label(self) -> str:
        """``uid "description" (N files)`` for messages."""
        return f'{self.series_uid or "?"} "{self.description}" ({len(self.files)} files)'


@dataclass(eq=False)
class _Slice:
    """One 2D image placed in LPS space: a classic file, one frame of a multi-frame file, or a mosaic tile."""

    path: Path
    header: Any  # the pydicom Dataset (header only), shared by the frames of one file
    frame: int | None  # 0-based frame of a multi-frame file; None for a single-frame file
    tile: tuple[int, int] | None  # (first row, first column) of a mosaic tile
    rows: int
    cols: int
    position_lps: np.ndarray  # (3,) centre of the first transmitted pixel, mm
    row_dir: np.ndarray  # (3,) direction of increasing column index (IOP[0:3])
    col_dir: np.ndarray  # (3,) direction of increasing row index (IOP[3:6])
    spacing_rc_mm: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    thickness_mm: float | None
    slope: float = 1.0
    intercept: float = 0.0
    stack: str = ""
    keys: dict[str, Any] = field(default_factory=dict)  # split keys: temporal, echo, acquisition, trigger
    image_type: tuple[str, ...] = ()

    @property
    def normal(self) -> np.ndarray:
        normal = np.cross(self.row_dir, self.col_dir)
        return normal / np.linalg.norm(normal)


@dataclass
class _Candidate:
    """A would-be volume after grouping: its slices in order and its LPS affine, or why it is not one."""

    series_uid: str
    description: str
    where: Path
    slices: list[_Slice]
    files: tuple[Path, ...]
    affine_lps: np.ndarray | None = None  # (4, 4)
    tilt_deg: float = 0.0
    skipped: str | None = None
    error: ImageReadError | None = None


# ------------------------------------------------------------------------------------------ public API


def read_dicom(path: str | Path) -> Volume:
    """Read the one volume held by a DICOM file or a folder tree (recursive).

    Returns a Volume ``(1, I, J, K)`` (i = column, j = row, k = slice), RAS affine, float32 or int16
    values after rescale (HU for CT), and metadata (``format: "dicom"``, UIDs, modality, window...).

    Raises:
        ImageReadError: missing path, empty folder, not DICOM, unreadable or truncated file.
        DicomSeriesError: several volumes (listed: series UID, description, file count), only
            localizers, a missing or duplicated slice, inconsistent geometry.
    """
    path = Path(path)
    candidates = _candidates_for(path)
    failures = sorted(
        (c.error for c in candidates if c.error is not None), key=lambda e: isinstance(e, DicomSeriesError)
    )
    if failures:
        raise failures[0]  # an unreadable file first: it usually explains the series errors
    volumes = [c for c in candidates if c.skipped is None]
    if not volumes:
        reasons = "; ".join(sorted({f"{c.series_uid}: {c.skipped}" for c in candidates}))
        raise DicomSeriesError(path, f"no image volume, only {reasons}")
    if len(volumes) > 1:
        listing = "; ".join(_candidate_label(c) for c in volumes)
        raise DicomSeriesError(
            path,
            f"holds {len(volumes)} volumes: {listing}; expected exactly one "
            "(use read_dicom_series_all or pass one series folder)",
        )
    return _load_candidate(volumes[0])


def read_dicom_series_all(folder: str | Path) -> list[Volume]:
    """Read every volume in a DICOM folder tree, for batch ingestion.

    Non-DICOM files and DICOMDIR are ignored; localizers and non-image objects are skipped with a logged
    reason. Raises the first failure (unreadable file, missing slice...): a batch caller that wants to
    go on past a bad series calls :func:`scan_dicom_folder` instead and reads ``SeriesResult.error``.
    """
    volumes = []
    for result in iter_dicom_folder(folder):
        if result.error is not None:
            raise result.error
        if result.volume is not None:
            volumes.append(result.volume)
    return volumes


def scan_dicom_folder(folder: str | Path) -> list[SeriesResult]:
    """Every volume, skipped object and failure in a DICOM folder tree, one :class:`SeriesResult` each.

    Never raises for a bad series or file (its result carries the error); raises
    :class:`ImageReadError` only when the folder itself is missing or holds no DICOM file at all.
    """
    return list(iter_dicom_folder(folder))


def iter_dicom_folder(folder: str | Path) -> Iterator[SeriesResult]:
    """Like :func:`scan_dicom_folder`, but loads one volume at a time (headers are scanned first)."""
    for candidate in _candidates_for(Path(folder)):
        yield _result_for(candidate)


# ------------------------------------------------------------------------------------------ scanning


def _candidates_for(path: Path) -> list[_Candidate]:
    """Scan a file or folder and group its slices into candidate volumes (no pixel data read)."""
    if not path.exists():
        raise ImageReadError(path, "no such file or folder; expected a DICOM file or folder")
    files = [path] if path.is_file() else _list_files(path)
    if not files:
        raise ImageReadError(path, "empty folder; expected DICOM files")
    headers, failures = _scan_headers(files)
    if not headers and not failures:
        what = "not a DICOM file" if path.is_file() else f"no DICOM file among {len(files)} files"
        raise ImageReadError(path, f"{what}; expected DICOM (a 'DICM' preamble)")
    return _group_candidates(path, headers, failures)


def _list_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (recursive, sorted; hidden files included, links followed)."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(Path(root) / name for name in sorted(names))
    return [p for p in found if p.is_file()]


def _scan_headers(files: Sequence[Path]) -> tuple[list[tuple[Path, Any]], list[tuple[Path, Any, ImageReadError]]]:
    """Headers of the DICOM files among ``files``; failures keep whatever header part was readable."""
    headers = []
    failures = []
    for path in files:
        try:
            header = read_dicom_header(path)
        except ImageReadError as error:
            failures.append((path, None, error))
            continue
        if header is None:
            continue
        problem = _header_problem(path, header)
        if problem is not None:
            failures.append((path, header, problem))
        else:
            headers.append((path, header))
    return headers, failures


def read_dicom_header(path: str | Path) -> Any | None:
    """The header (no pixel data) of a DICOM file, or None when the file is not DICOM or is a DICOMDIR.

    Detection reads the 128-byte preamble + ``DICM``; a file without it counts as DICOM only when it
    starts with a group 0002/0008 element and pydicom parses it.

    Raises:
        ImageReadError: the file cannot be opened, or it is DICOM but its header cannot be parsed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        return None
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError as error:
        raise ImageReadError(path, f"cannot be opened ({error.strerror}); expected a readable file") from None
    has_preamble = head[128:132] == b"DICM"
    if not has_preamble and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if not has_preamble:
            return None
        raise ImageReadError(path, f"unreadable DICOM header ({type(error).__name__}: {error})") from None
    if not has_preamble and "SOPClassUID" not in header and "Modality" not in header:
        return None
    media_class = str(getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in header:
        return None
    return header


def _header_problem(path: Path, header: Any) -> ImageReadError | None:
    """A truncated header: an image SOP class (or none at all) but no Rows/Columns."""
    if "Rows" in header and "Columns" in header:
        return None
    sop_name = _sop_class_name(header)
    if sop_name and "Image Storage" not in sop_name:
        return None  # a non-image object (SR, PR, RT...): skipped later with a reason
    return ImageReadError(path, "truncated or incomplete DICOM header: no Rows/Columns; expected an image header")


def _sop_class_name(header: Any) -> str:
    uid = header.get("SOPClassUID") or getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", None)
    if not uid:
        return ""
    return str(getattr(uid, "name", uid))


# ------------------------------------------------------------------------------------- header → slices


def _slices_from_header(path: Path, header: Any) -> list[_Slice]:
    """The 2D slices a DICOM image file holds (classic, enhanced multi-frame, or mosaic)."""
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        return _enhanced_slices(path, header)
    if int(header.get("NumberOfFrames") or 1) > 1:
        raise DicomSeriesError(
            path,
            f"multi-frame image ({header.NumberOfFrames} frames) without functional groups "
            "(PlanePositionSequence/PlaneOrientationSequence/PixelMeasuresSequence); expected per-frame geometry",
        )
    if "MOSAIC" in _image_type(header):
        return _mosaic_slices(path, header)
    return [_classic_slice(path, header)]


def _classic_slice(path: Path, header: Any) -> _Slice:
    """One single-frame image (CT/MR/PT Image Storage and the like)."""
    position, row_dir, col_dir = _plane_geometry(
        path, header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    )
    spacing = _pixel_spacing(path, header.get("PixelSpacing"))
    return _Slice(
        path=path,
        header=header,
        frame=None,
        tile=None,
        rows=int(header.Rows),
        cols=int(header.Columns),
        position_lps=position,
        row_dir=row_dir,
        col_dir=col_dir,
        spacing_rc_mm=spacing,
        thickness_mm=_optional_float(header.get("SliceThickness")),
        slope=_optional_float(header.get("RescaleSlope")) or 1.0,
        intercept=_optional_float(header.get("RescaleIntercept")) or 0.0,
        keys=_classic_keys(header),
        image_type=_image_type(header),
    )


def _classic_keys(header: Any) -> dict[str, Any]:
    """Values that tell volumes of one series apart (None where absent)."""
    return {
        "temporal": header.get("TemporalPositionIdentifier"),
        "echo": _first(header.get("EchoNumbers")),
        "acquisition": header.get("AcquisitionNumber"),
        "trigger": header.get("TriggerTime"),
    }


def _plane_geometry(path: Path, position: Any, orientation: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImagePositionPatient (3,) and the two unit direction cosines (3,) each, validated."""
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        raise DicomSeriesError(
            path, "no ImagePositionPatient/ImageOrientationPatient; expected cross-sectional image geometry"
        )
    position_lps = np.array([float(v) for v in position], dtype=np.float64)
    cosines = np.array([float(v) for v in orientation], dtype=np.float64)
    row_dir, col_dir = cosines[:3], cosines[3:]
    norms = (np.linalg.norm(row_dir), np.linalg.norm(col_dir))
    if min(norms) < 0.5 or abs(float(row_dir @ col_dir)) / (norms[0] * norms[1]) > 0.01:
        raise DicomSeriesError(path, f"ImageOrientationPatient {list(cosines)} is not two orthogonal unit vectors")
    return position_lps, row_dir / norms[0], col_dir / norms[1]


def _pixel_spacing(path: Path, value: Any) -> tuple[float, float]:
    if value is None or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise DicomSeriesError(path, f"PixelSpacing {value!r}; expected two positive values (mm)")
    return float(value[0]), float(value[1])


def _enhanced_slices(path: Path, header: Any) -> list[_Slice]:
    """One slice per frame of an Enhanced CT/MR/PET image, from shared + per-frame functional groups."""
    n_frames = int(header.get("NumberOfFrames") or 1)
    shared_seq = header.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n_frames):
        raise DicomSeriesError(
            path, f"{len(per_frame)} per-frame functional groups for {n_frames} frames; expected one each"
        )
    slices = []
    for frame in range(n_frames):
        groups = (per_frame[frame] if len(per_frame) else None, shared)
        slices.append(_enhanced_frame(path, header, frame, groups))
    return slices


def _enhanced_frame(path: Path, header: Any, frame: int, groups: tuple[Any, Any]) -> _Slice:
    """Frame ``frame`` (0-based) of an enhanced image; ``groups`` = (per-frame item, shared item)."""
    where = f"{path} frame {frame + 1}"
    position = _functional(groups, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _functional(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
    position_lps, row_dir, col_dir = _plane_geometry(Path(where), position, orientation)
    content = _functional_item(groups, "FrameContentSequence")
    frame_types = _functional(groups, "CTImageFrameTypeSequence", "FrameType") or _functional(
        groups, "MRImageFrameTypeSequence", "FrameType"
    )
    return _Slice(
        path=path,
        header=header,
        frame=frame,
        tile=None,
        rows=int(header.Rows),
        cols=int(header.Columns),
        position_lps=position_lps,
        row_dir=row_dir,
        col_dir=col_dir,
        spacing_rc_mm=_pixel_spacing(Path(where), _functional(groups, "PixelMeasuresSequence", "PixelSpacing")),
        thickness_mm=_optional_float(_functional(groups, "PixelMeasuresSequence", "SliceThickness")),
        slope=_optional_float(_functional(groups, "PixelValueTransformationSequence", "RescaleSlope")) or 1.0,
        intercept=_optional_float(_functional(groups, "PixelValueTransformationSequence", "RescaleIntercept")) or 0.0,
        stack=str(content.get("StackID", "")) if content is not None else "",
        keys={
            "temporal": content.get("TemporalPositionIndex") if content is not None else None,
            "echo": _functional(groups, "MREchoSequence", "EffectiveEchoTime"),
            "acquisition": None,
            "trigger": _functional(groups, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
        },
        image_type=tuple(str(v).upper() for v in frame_types) if frame_types else _image_type(header),
    )


def _functional_item(groups: tuple[Any, Any], sequence: str) -> Any | None:
    """The first item of ``sequence`` in the per-frame group, else in the shared group, else None."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _functional(groups: tuple[Any, Any], sequence: str, keyword: str) -> Any | None:
    item = _functional_item(groups, sequence)
    return None if item is None else item.get(keyword)


# --------------------------------------------------------------------------------------- Siemens mosaic


def _mosaic_slices(path: Path, header: Any) -> list[_Slice]:
    """Unpack a Siemens mosaic: tile t of an ``m × m`` grid (m = ceil(sqrt(N))) is slice t.

    Tile t's first pixel lies at the mosaic's ImagePositionPatient moved by half the unused mosaic size
    ``((Columns − c)/2 along the row direction, (Rows − r)/2 along the column direction)``, and tiles step
    by SpacingBetweenSlices (else SliceThickness) along the CSA image header's SliceNormalVector.
    """
    count = _mosaic_count(path, header)
    grid = math.ceil(math.sqrt(count))
    rows, cols = int(header.Rows), int(header.Columns)
    if rows % grid or cols % grid:
        raise DicomSeriesError(
            path, f"Siemens mosaic {rows}x{cols} does not split into a {grid}x{grid} grid of {count} tiles"
        )
    normal = _csa_vector(path, header, "SliceNormalVector")
    base = _classic_slice(path, header)
    tile_rows, tile_cols = rows // grid, cols // grid
    shift = (
        base.row_dir * base.spacing_rc_mm[1] * (cols - tile_cols) / 2
        + base.col_dir * base.spacing_rc_mm[0] * (rows - tile_rows) / 2
    )
    step_mm = _optional_float(header.get("SpacingBetweenSlices")) or base.thickness_mm or 1.0
    slices = []
    for tile in range(count):
        corner = ((tile // grid) * tile_rows, (tile % grid) * tile_cols)
        position = base.position_lps + shift + tile * step_mm * normal
        slices.append(
            _Slice(**{**base.__dict__, "tile": corner, "rows": tile_rows, "cols": tile_cols, "position_lps": position})
        )
    return slices


def _mosaic_count(path: Path, header: Any) -> int:
    """NumberOfImagesInMosaic from (0019,xx0A) of the 'SIEMENS MR HEADER' block, else the CSA header."""
    try:
        return int(header.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value)
    except (KeyError, ValueError, TypeError):
        pass
    values = _csa_values(path, header, "NumberOfImagesInMosaic")
    if not values:
        raise DicomSeriesError(
            path, "Siemens mosaic without NumberOfImagesInMosaic (0019,100A); expected it, or unpack with dcm2niix"
        )
    return int(float(values[0]))


def _csa_vector(path: Path, header: Any, name: str) -> np.ndarray:
    values = _csa_values(path, header, name)
    if len(values) != 3:
        raise DicomSeriesError(
            path,
            f"Siemens mosaic without a CSA image header {name}; "
            "expected one to place the tiles, or unpack with dcm2niix",
        )
    vector = np.array([float(v) for v in values])
    return vector / np.linalg.norm(vector)


def _csa_values(path: Path, header: Any, name: str) -> list[str]:
    """The string items of tag ``name`` in the Siemens CSA image header (0029,xx10), [] if absent."""
    try:
        raw = header.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value
    except (KeyError, ValueError, TypeError):
        return []
    return parse_csa2(bytes(raw)).get(name, [])


def parse_csa2(raw: bytes) -> dict[str, list[str]]:
    """Parse a Siemens CSA2 ('SV10') header into ``{tag name: [item strings]}``; {} for other formats.

    Layout: 'SV10', 4 unused bytes, uint32 tag count, uint32 77; per tag: 64-byte name, int32 VM,
    4-byte VR, int32 SyngoDT, int32 item count, int32 77; per item: 4 int32 (the second is the length),
    then the value padded to 4 bytes.
    """
    if raw[:4] != b"SV10" or len(raw) < 16:
        return {}
    n_tags = int(np.frombuffer(raw, "<u4", 1, 8)[0])
    offset = 16
    tags: dict[str, list[str]] = {}
    try:
        for _ in range(n_tags):
            name = raw[offset : offset + 64].split(b"\0")[0].decode("latin-1")
            n_items = int(np.frombuffer(raw, "<i4", 1, offset + 76)[0])
            offset += 84
            items = []
            for _ in range(n_items):
                length = int(np.frombuffer(raw, "<i4", 1, offset + 4)[0])
                offset += 16
                items.append(raw[offset : offset + length].split(b"\0")[0].decode("latin-1").strip())
                offset += length + (-length % 4)
            tags[name] = [item for item in items if item]
    except ValueError:  # ran past the end: keep the tags read so far
        pass
    return tags


# ---------------------------------------------------------------------------------------------- grouping


def _group_candidates(
    where: Path, headers: list[tuple[Path, Any]], failures: list[tuple[Path, Any, ImageReadError]]
) -> list[_Candidate]:
    """Headers → candidate volumes per series; a series with a failed file becomes one failure."""
    series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path, header in headers:
        series[_series_uid(header)].append((path, header))
    failed: dict[str, list[tuple[Path, Any, ImageReadError]]] = defaultdict(list)
    candidates = []
    for path, header, error in failures:
        uid = _series_uid(header)
        if uid:
            failed[uid].append((path, header, error))
        else:
            candidates.append(_Candidate(uid, _description(header), where, [], (path,), error=error))
    for uid in list(series) + [uid for uid in failed if uid not in series]:
        members = series.get(uid, [])
        files = tuple(path for path, _ in members) + tuple(path for path, _, _ in failed[uid])
        description = _description(members[0][1] if members else failed[uid][0][1])
        if failed[uid]:
            candidates.append(_Candidate(uid, description, where, [], files, error=failed[uid][0][2]))
        else:
            candidates.extend(_series_candidates(where, uid, description, members))
    return candidates


def _series_uid(header: Any) -> str:
    return "" if header is None else str(header.get("SeriesInstanceUID", "") or "")


def _series_candidates(where: Path, uid: str, description: str, members: list[tuple[Path, Any]]) -> list[_Candidate]:
    """One series → candidate volumes, plus one skip for its localizers (or one skip/failure in all)."""
    files = tuple(path for path, _ in members)
    skip = _skip_reason(members[0][1])
    if skip is not None:
        logger.info("%s: skipping series %s (%s): %s", where, uid, description, skip)
        return [_Candidate(uid, description, where, [], files, skipped=skip)]
    slices: list[_Slice] = []
    try:
        for path, header in members:
            slices.extend(_slices_from_header(path, header))
    except DicomSeriesError as error:
        return [_Candidate(uid, description, where, [], files, error=error)]
    where_series = f"{where} series {uid}" + (f" ({description})" if description else "")
    candidates = []
    localizers: list[_Slice] = []
    reasons: list[str] = []
    for group, localizer in _orientation_groups(slices, description):
        if localizer is not None:
            localizers.extend(group)
            reasons.append(localizer)
            continue
        for part in _split_volumes(group, where_series):
            candidates.append(_candidate_from(uid, description, where, where_series, part))
    if localizers:
        reason = reasons[0]
        logger.info("%s: skipping %d image(s): %s", where_series, len(localizers), reason)
        candidates.append(_Candidate(uid, description, where, localizers, _files_of(localizers), skipped=reason))
    return candidates


def _skip_reason(header: Any) -> str | None:
    """Why a series is not an image volume (None when it may be one)."""
    modality = str(header.get("Modality", "") or "").upper()
    sop_name = _sop_class_name(header)
    if modality == "SEG" or sop_name == "Segmentation Storage":
        return "DICOM SEG, not an image volume (read it with read_dicom_seg)"
    if "Rows" not in header:
        return f"not an image (SOP class {sop_name or 'unknown'}, modality {modality or 'unknown'})"
    if modality in NON_VOLUME_MODALITIES:
        return f"modality {modality} is not an image volume"
    has_geometry = (
        "ImagePositionPatient" in header
        or "PerFrameFunctionalGroupsSequence" in header
        or "SharedFunctionalGroupsSequence" in header
    )
    if not has_geometry and modality not in VOLUME_MODALITIES and "MOSAIC" not in _image_type(header):
        kind = modality or "unknown modality"
        return f"{kind} image without patient geometry (projection or secondary capture), not a volume"
    return None


def _orientation_groups(slices: list[_Slice], description: str) -> list[tuple[list[_Slice], str | None]]:
    """Slices grouped by orientation, shape, pixel spacing and stack; each with a localizer reason or None.

    Localizer/scout: ImageType LOCALIZER; or a group of 1-3 images when the series has several
    orientations; or a group of 1-3 images in a series described as a localizer/scout/survey/topogram.
    """
    by_orientation = _cluster(slices, lambda s: np.concatenate([s.row_dir, s.col_dir]), ORIENTATION_TOL)
    described = any(word in description.upper() for word in LOCALIZER_WORDS)
    grouped = []
    for group in by_orientation:
        reason = None
        if len(group) <= MAX_LOCALIZER_IMAGES and (len(by_orientation) > 1 or described):
            why = "in an orientation of their own" if len(by_orientation) > 1 else f'series "{description}"'
            reason = f"localizer/scout (1-3 images, {why}), not a volume"
        by_shape: dict[tuple, list[_Slice]] = defaultdict(list)
        for s in group:
            by_shape[_shape_key(s)].append(s)
        for part in [p for same in by_shape.values() for p in _cluster(same, _spacing_signature, 1e-3)]:
            localizer_type = any("LOCALIZER" in s.image_type for s in part)
            grouped.append(
                (part, reason or ("localizer/scout (ImageType LOCALIZER), not a volume" if localizer_type else None))
            )
    return grouped


def _shape_key(s: _Slice) -> tuple:
    """Slices of one volume share image shape, enhanced stack and mosaic-ness exactly."""
    return (s.rows, s.cols, s.stack, s.tile is not None)


def _spacing_signature(s: _Slice) -> np.ndarray:
    return np.array(s.spacing_rc_mm)


def _cluster(slices: list[_Slice], signature: Callable[[_Slice], np.ndarray], tol: float) -> list[list[_Slice]]:
    """Greedy clustering: a slice joins the first cluster whose signature is within ``tol`` (max abs)."""
    clusters: list[tuple[np.ndarray, list[_Slice]]] = []
    for s in slices:
        key = signature(s)
        for centre, members in clusters:
            if np.max(np.abs(centre - key)) <= tol:
                members.append(s)
                break
        else:
            clusters.append((key, [s]))
    return [members for _, members in clusters]


def _split_volumes(group: list[_Slice], where: str) -> list[list[_Slice]]:
    """Split one orientation/shape group into volumes by the first split key that yields clean stacks."""
    if _is_clean_stack(group, where):
        return [group]
    has_duplicates = _has_duplicate_positions(group)
    for keys in [(key,) for key in SPLIT_KEYS] + [SPLIT_KEYS]:
        parts = _partition(group, keys)
        if len(parts) < 2 or not all(_is_clean_stack(part, where) for part in parts):
            continue
        if has_duplicates or all(len(part) > 1 for part in parts):
            return parts
    return [group]  # the geometry check then raises the precise error (gap, duplicate...)


def _partition(group: list[_Slice], keys: Sequence[str]) -> list[list[_Slice]]:
    parts: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in group:
        parts[tuple(str(s.keys.get(key)) for key in keys)].append(s)
    return [parts[key] for key in sorted(parts)]


def _is_clean_stack(group: list[_Slice], where: str) -> bool:
    try:
        _stack_geometry(group, where)
    except DicomSeriesError:
        return False
    return True


def _has_duplicate_positions(group: list[_Slice]) -> bool:
    distances = np.sort([float(s.position_lps @ group[0].normal) for s in group])
    return bool(np.any(np.diff(distances) < DUPLICATE_TOL_MM))


def _candidate_from(uid: str, description: str, where: Path, where_series: str, part: list[_Slice]) -> _Candidate:
    candidate = _Candidate(uid, description, where, part, _files_of(part))
    try:
        candidate.slices, candidate.affine_lps, candidate.tilt_deg = _stack_geometry(part, where_series)
    except DicomSeriesError as error:
        candidate.error = error
    return candidate


# ---------------------------------------------------------------------------------------------- geometry


def spacing_tolerance_mm(step_mm: float) -> float:
    """How far a slice step may differ from the mean step: ``min(max(1 %, 0.1 mm), 5 %)`` of it."""
    return min(max(0.01 * step_mm, 0.1), 0.05 * step_mm)


def _stack_geometry(group: list[_Slice], where: str | Path) -> tuple[list[_Slice], np.ndarray, float]:
    """Order slices along the normal and build the LPS affine (4, 4) of voxel (i=col, j=row, k=slice).

    Returns (ordered slices, affine_lps, gantry tilt in degrees).

    Raises:
        DicomSeriesError: duplicated position, gap or uneven spacing, slices not on one line.
    """
    first = group[0]
    normal = first.normal
    ordered = sorted(group, key=lambda s: float(s.position_lps @ normal))
    positions = np.stack([s.position_lps for s in ordered])  # (K, 3)
    affine = np.eye(4)
    affine[:3, 0] = first.row_dir * first.spacing_rc_mm[1]
    affine[:3, 1] = first.col_dir * first.spacing_rc_mm[0]
    affine[:3, 3] = positions[0]
    if len(ordered) == 1:
        affine[:3, 2] = normal * (
            first.thickness_mm or _optional_float(first.header.get("SpacingBetweenSlices")) or 1.0
        )
        return ordered, affine, 0.0
    _check_steps(ordered, positions @ normal, where)
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)  # (3,) mean step, mm
    _check_collinear(positions, step, where)
    affine[:3, 2] = step
    tilt_deg = float(np.degrees(np.arccos(np.clip(step @ normal / np.linalg.norm(step), -1.0, 1.0))))
    return ordered, affine, tilt_deg


def _check_steps(ordered: list[_Slice], distances_mm: np.ndarray, where: str | Path) -> None:
    """Refuse repeated positions and steps that deviate from the mean step (missing/extra slices)."""
    steps = np.diff(distances_mm)  # (K-1,)
    duplicate = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if duplicate.size:
        a, b = ordered[duplicate[0]], ordered[duplicate[0] + 1]
        raise DicomSeriesError(
            where,
            f"duplicated slice: {_slice_name(a)} and {_slice_name(b)} are both at {distances_mm[duplicate[0]]:.3f} mm "
            "along the slice normal; expected one image per position",
        )
    mean_step = float(distances_mm[-1] - distances_mm[0]) / len(steps)
    worst = int(np.argmax(np.abs(steps - mean_step)))
    median_step = float(np.median(steps))
    if abs(steps[worst] - median_step) > spacing_tolerance_mm(median_step) or abs(
        mean_step - median_step
    ) > spacing_tolerance_mm(median_step):
        raise DicomSeriesError(
            where,
            f"non-uniform slice spacing: a step of {steps[worst]:.3f} mm between {distances_mm[worst]:.3f} and "
            f"{distances_mm[worst + 1]:.3f} mm along the normal where the typical step is {median_step:.3f} mm "
            f"(missing slice?); expected uniform spacing within {spacing_tolerance_mm(median_step):.3f} mm",
        )


def _check_collinear(positions: np.ndarray, step: np.ndarray, where: str | Path) -> None:
    """Every position must lie at ``p0 + k * step`` (within the spacing tolerance)."""
    expected = positions[0] + np.arange(len(positions))[:, None] * step  # (K, 3)
    error_mm = float(np.max(np.linalg.norm(positions - expected, axis=1)))
    tol = spacing_tolerance_mm(float(np.linalg.norm(step)))
    if error_mm > tol:
        raise DicomSeriesError(
            where,
            f"slice positions are not on one line (off by up to {error_mm:.3f} mm); "
            f"expected a regular stack within {tol:.3f} mm",
        )


# ------------------------------------------------------------------------------------------ pixel data


def _result_for(candidate: _Candidate) -> SeriesResult:
    """Load a candidate into a SeriesResult; a pixel-data failure becomes the result's error."""
    result = SeriesResult(
        candidate.series_uid, candidate.description, candidate.files, skipped=candidate.skipped, error=candidate.error
    )
    if candidate.skipped is None and candidate.error is None:
        try:
            result.volume = _load_candidate(candidate)
        except ImageReadError as error:
            result.error = error
    return result


def _load_candidate(candidate: _Candidate) -> Volume:
    """Decode, rescale and stack the candidate's pixels into a Volume (1, I, J, K)."""
    slices = candidate.slices
    first = slices[0]
    values_ijk = np.empty((first.cols, first.rows, len(slices)), dtype=np.float32)
    integral = True
    by_file: dict[Path, list[int]] = defaultdict(list)
    for k, s in enumerate(slices):
        by_file[s.path].append(k)
    for path, ks in by_file.items():
        frames = _decode_pixels(path)
        for k in ks:
            raw_rc = _slice_pixels(frames, slices[k], path)
            integral &= np.issubdtype(raw_rc.dtype, np.integer) and _is_integral(slices[k].slope, slices[k].intercept)
            values_ijk[:, :, k] = (raw_rc.astype(np.float64) * slices[k].slope + slices[k].intercept).T
    array = _narrow_dtype(values_ijk, integral)[None]  # (1, I, J, K)
    affine = LPS_TO_RAS @ candidate.affine_lps
    where = candidate.where
    require_finite(array, where)
    require_valid_affine(affine, where)
    return Volume(array=array, affine=affine, metadata=_metadata(candidate))


def _decode_pixels(path: Path) -> np.ndarray:
    """All frames of one file, (F, rows, cols) or (rows, cols), as stored (before rescale)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, force=True)
        pixels = dataset.pixel_array
    except (
        ValueError,
        EOFError,
        OSError,
        AttributeError,
        RuntimeError,
        NotImplementedError,
        KeyError,
        TypeError,
    ) as error:
        message = " ".join(str(error).split())[:200]
        raise ImageReadError(
            path, f"pixel data cannot be decoded ({type(error).__name__}: {message}); expected complete image pixels"
        ) from None
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise ImageReadError(
            path,
            f"{samples} samples per pixel ({dataset.get('PhotometricInterpretation')}); expected a grayscale image",
        )
    return pixels


def _slice_pixels(frames: np.ndarray, s: _Slice, path: Path) -> np.ndarray:
    """The slice's stored values (rows, cols) out of the decoded frames (frame index, mosaic tile)."""
    image = frames
    if s.frame is not None and frames.ndim == 3:
        image = frames[s.frame]
    if image.ndim != 2:
        raise ImageReadError(path, f"decoded pixels of shape {frames.shape}; expected one 2D frame per slice")
    if s.tile is not None:
        row0, col0 = s.tile
        image = image[row0 : row0 + s.rows, col0 : col0 + s.cols]
    if image.shape != (s.rows, s.cols):
        raise ImageReadError(path, f"decoded slice is {image.shape}; expected {(s.rows, s.cols)} from Rows/Columns")
    return image


def _is_integral(slope: float, intercept: float) -> bool:
    return float(slope).is_integer() and float(intercept).is_integer()


def _narrow_dtype(values: np.ndarray, integral: bool) -> np.ndarray:
    """int16 when every value came from integral rescale and fits int16, else the float32 values."""
    info = np.iinfo(np.int16)
    if integral and values.size and info.min <= values.min() and values.max() <= info.max:
        return values.astype(np.int16)
    return values


# ------------------------------------------------------------------------------------------- metadata


def _metadata(candidate: _Candidate) -> dict[str, Any]:
    """Provenance kept with the Volume (JSON-friendly values only)."""
    slices = candidate.slices
    header = slices[0].header
    slopes = [s.slope for s in slices]
    intercepts = [s.intercept for s in slices]
    modality = str(header.get("Modality", "") or "")
    metadata = {
        "format": "dicom",
        "source_path": str(candidate.where),
        "n_source_files": len(candidate.files),
        "modality": modality,
        "series_instance_uid": candidate.series_uid,
        "study_instance_uid": str(header.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(header.get("FrameOfReferenceUID", "") or ""),
        "series_description": candidate.description,
        "series_number": _optional_int(header.get("SeriesNumber")),
        "manufacturer": str(header.get("Manufacturer", "") or ""),
        "patient_position": str(header.get("PatientPosition", "") or ""),
        "image_type": list(slices[0].image_type),
        "window_center": _window(header, "WindowCenter"),
        "window_width": _window(header, "WindowWidth"),
        "rescale_slope": slopes[0] if len(set(slopes)) == 1 else slopes,
        "rescale_intercept": intercepts[0] if len(set(intercepts)) == 1 else intercepts,
        "intensity_unit": "HU" if modality == "CT" else str(header.get("RescaleType", "") or "arbitrary"),
        "slice_thickness_mm": slices[0].thickness_mm,
        "gantry_tilt_deg": round(candidate.tilt_deg, 4),
        "sop_instance_uids": [str(s.header.get("SOPInstanceUID", "") or "") for s in slices],
        "transfer_syntax_uid": str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or ""),
    }
    for key, value in slices[0].keys.items():
        if value is not None:
            metadata[SPLIT_KEY_METADATA[key]] = _plain(value)
    if slices[0].tile is not None:
        metadata["siemens_mosaic_tiles"] = len(slices)
    return metadata


def _window(header: Any, keyword: str) -> float | None:
    """The first VOI window value of the image, or of an enhanced image's shared FrameVOILUTSequence."""
    value = header.get(keyword)
    if value is None:
        shared = header.get("SharedFunctionalGroupsSequence") or []
        value = _functional((shared[0] if len(shared) else None, None), "FrameVOILUTSequence", keyword)
    return _optional_float(_first(value))


# --------------------------------------------------------------------------------------------- helpers


def _files_of(slices: list[_Slice]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(s.path for s in slices))


def _slice_name(s: _Slice) -> str:
    name = s.path.name
    if s.frame is not None:
        name += f" frame {s.frame + 1}"
    if s.tile is not None:
        name += f" tile {s.tile}"
    return name


def _candidate_label(candidate: _Candidate) -> str:
    counts = f"{len(candidate.slices)} slices, {len(candidate.files)} files"
    return f'{candidate.series_uid or "?"} "{candidate.description}" ({counts})'


def _description(header: Any) -> str:
    if header is None:
        return ""
    return str(header.get("SeriesDescription", "") or "")


def _image_type(header: Any) -> tuple[str, ...]:
    value = header.get("ImageType") or ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).upper() for v in value)


def _first(value: Any) -> Any:
    if value is None or isinstance(value, (str, bytes)):
        return value
    try:
        return value[0] if len(value) else None
    except TypeError:
        return value


def _optional_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _optional_int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """pydicom values (DSfloat, IS, MultiValue) → float/int/str/list."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


# ------------------------------------------------------------------------------------ series listing


@dataclass(frozen=True)
class SeriesInfo:
    """A volume (or a SEG / skipped object) found by a header-only scan, for batch planning.

    ``index`` numbers the volumes of one series (several orientations, echoes or time points) in scan
    order; ``folder`` is the narrowest folder holding all of its files, so that reading it again scans
    only that folder. For a DICOM SEG, ``referenced_series`` names the image series it labels.
    """

    series_uid: str
    index: int
    description: str
    folder: str
    files: tuple[Path, ...]
    patient_id: str = ""
    modality: str = ""
    is_seg: bool = False
    referenced_series: tuple[str, ...] = ()
    skipped: str | None = None
    error: str | None = None


def find_series(folder: str | Path) -> list[SeriesInfo]:
    """Header-only listing of every volume and SEG object under ``folder`` (no pixel data read)."""
    infos, counts = [], defaultdict(int)
    for candidate in _candidates_for(Path(folder)):
        header = read_dicom_header(candidate.files[0]) if candidate.files else None
        modality = str(header.get("Modality", "") or "").upper() if header is not None else ""
        is_seg = modality == "SEG"
        index = counts[candidate.series_uid]
        if candidate.skipped is None:
            counts[candidate.series_uid] += 1
        referenced = ()
        if is_seg and header is not None:
            referenced = tuple(str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence", []))
        infos.append(
            SeriesInfo(
                series_uid=candidate.series_uid,
                index=index,
                description=candidate.description,
                folder=os.path.commonpath([str(p.parent) for p in candidate.files]) if candidate.files else str(folder),
                files=candidate.files,
                patient_id=str(header.get("PatientID", "") or "") if header is not None else "",
                modality=modality,
                is_seg=is_seg,
                referenced_series=referenced,
                skipped=candidate.skipped,
                error=str(candidate.error) if candidate.error is not None else None,
            )
        )
    return infos


def read_dicom_series(folder: str | Path, series_uid: str, index: int = 0) -> Volume:
    """Read volume ``index`` of series ``series_uid`` under ``folder`` (see :func:`find_series`)."""
    volumes = [c for c in _candidates_for(Path(folder)) if c.series_uid == series_uid and c.skipped is None]
    if not 0 <= index < len(volumes):
        raise DicomSeriesError(folder, f"series {series_uid} volume {index} not found ({len(volumes)} volumes); expected the folder scanned at planning time")
    if volumes[index].error is not None:
        raise volumes[index].error
    return _load_candidate(volumes[index])
