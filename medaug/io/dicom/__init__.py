"""DICOM in: series (classic, enhanced multi-frame, Siemens mosaic) as Volumes, and DICOM SEG as label maps.

``read_dicom`` reads the one volume of a file or folder; ``read_dicom_series_all`` every volume of a
folder tree; ``scan_dicom_folder``/``iter_dicom_folder`` give one :class:`SeriesResult` per volume,
skipped object or failure for batch jobs; ``read_dicom_seg`` reads a DICOM SEG into a uint8 label map,
optionally placed on a reference image's grid by physical position.
"""

from __future__ import annotations

from medaug.io.dicom.read import (
    SeriesInfo,
    SeriesResult,
    find_series,
    read_dicom_series,
    iter_dicom_folder,
    read_dicom,
    read_dicom_header,
    read_dicom_series_all,
    scan_dicom_folder,
)
from medaug.io.dicom.seg import SegmentInfo, read_dicom_seg
from medaug.io.dicom.write import MEDAUG_UID_ROOT, write_dicom_series

__all__ = [
    "MEDAUG_UID_ROOT",
    "SegmentInfo",
    "SeriesInfo",
    "find_series",
    "read_dicom_series",
    "write_dicom_series",
    "SeriesResult",
    "iter_dicom_folder",
    "read_dicom",
    "read_dicom_header",
    "read_dicom_seg",
    "read_dicom_series_all",
    "scan_dicom_folder",
]
