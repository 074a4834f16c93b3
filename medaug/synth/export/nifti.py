"""NIfTI export: per sample, one file per channel and one label file, each the slice as an (H, W, 1) volume.

Files, per sample, in the output folder: ``{sample_id}_{channel}.nii`` for each channel and
``{sample_id}_label.nii`` (``.nii.gz`` with ``compress=True``). One file per channel, not one 4D file:
viewers (ITK-SNAP, 3D Slicer) show a 4th axis as time, nnU-Net wants a file per channel, and each file
keeps its channel's name.

* **Geometry**: voxel ``(i, j, k)`` is pixel ``(row, col, 0)``, so the NIfTI affine is the slice affine
  itself (sform and qform, code 1 "scanner", units mm) and the voxel spacing (``pixdim``) is row spacing,
  column spacing, slice thickness.
* **Values**: channels whose mapping is in HU (CT) are int16 HU, ``rint(m * scale + offset)`` clipped to
  the int16 range; other channels (MR) are float32 arbitrary units ``m * scale + offset`` (the source
  file's units; DESIGN §3), where ``m`` is the model value clipped to [-1, 1]. Labels are uint8 vocabulary
  ids (0 background, 255 ignore). The header's ``descrip`` says ``medaug synthetic`` (or ``real``) and the units.

Speed (the export target is ≥ 1,000 slices/s on 2 cores, DESIGN §5; ``benchmarks/export.py``).
``medaug.io.nifti.write_nifti`` spends about 1 ms per 256² file in nibabel (image and header objects,
quaternion fit, array writer): 521 CT / 320 MR (2-channel) slices/s with labels. The header of a slice
file depends only on its shape, dtype, affine and description, and synthetic samples of a domain share one
canonical affine, so :func:`nifti_header` builds it with nibabel as ``write_nifti`` does (the tests compare
the bytes) and caches it; a file is then that header plus the voxels in NIfTI's column-major order, written
atomically: 2,103 / 1,219 slices/s (1,217 / 825 with a distinct affine per slice, as real slices have,
where each header is set into a cached template). gzip at level 1 (zlib runs at about 50 MB/s here) drops
that to 1,198 / 249 for files 6× (CT) and 2× (MR) smaller, so files are uncompressed by default; the
nnU-Net exporter compresses, since nnU-Net's NIfTI readers expect ``.nii.gz``.
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medaug.synth.export.base import HU_UNITS, LABEL_NAME, Buffer, ExportError, ExportSlice, write_bytes_atomic

INT16_RANGE = (-32768, 32767)
GZIP_WBITS = 31  # zlib window 2**15 with the gzip wrapper (16 + 15)
HEADER_CACHE_SIZE = 1024


@dataclass(frozen=True)
class NiftiOptions:
    """``compress``: write ``.nii.gz`` (gzip at ``compress_level``) instead of ``.nii``."""

    compress: bool = False
    compress_level: int = 1

    def __post_init__(self) -> None:
        if self.compress_level not in range(10):
            raise ExportError("nifti.compress_level", f"is {self.compress_level!r}; expected 0..9")

    @property
    def suffix(self) -> str:
        return ".nii.gz" if self.compress else ".nii"


def channel_values(sample: ExportSlice, channel: int) -> np.ndarray:
    """(H, W) channel ``channel`` in source units: int16 HU for HU mappings, float32 a.u. otherwise."""
    source_HW = sample.source_HW(channel)
    if sample.intensity[channel].units == HU_UNITS:
        return np.clip(np.rint(source_HW), *INT16_RANGE).astype(np.int16)
    return source_HW.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _template_header(shape: tuple[int, int, int], dtype: str, description: str):
    """The nibabel header that saving an image of ``shape`` and ``dtype`` writes, and the bytes after it."""
    import nibabel as nib

    data = np.zeros(shape, dtype=dtype)
    image = nib.Nifti1Image(data, np.eye(4), dtype=data.dtype)  # as medaug.io.nifti.write_nifti
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    raw = image.to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    return header, raw[header.sizeof_hdr:len(raw) - data.nbytes]  # the extension flag, up to vox_offset


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _cached_header(shape: tuple[int, int, int], dtype: str, affine_key: bytes, description: str) -> bytes:
    template, extension = _template_header(shape, dtype, description)
    affine = np.frombuffer(affine_key, dtype=np.float64).reshape(4, 4)
    header = template.copy()
    header.set_sform(affine, code=1)  # as write_nifti: sform and qform both hold the affine, code 1
    header.set_qform(affine, code=1)
    return header.binaryblock + extension


def nifti_header(shape: tuple[int, int, int], dtype: np.dtype | str, affine: np.ndarray,
                 description: str = "") -> bytes:
    """The bytes before the voxel data of a single-file NIfTI-1 image (348-byte header + extension flag).

    Built by nibabel as ``write_nifti`` builds it (a saved template per shape, dtype and description, with
    the affine set into its sform and qform) and cached per (shape, dtype, affine, description).
    """
    affine_key = np.ascontiguousarray(affine, dtype=np.float64).tobytes()
    return _cached_header(tuple(int(n) for n in shape), np.dtype(dtype).str, affine_key, description)


def encode_nifti(array_HW: np.ndarray, affine: np.ndarray, description: str = "",
                 compress_level: int | None = None) -> bytes:
    """A NIfTI-1 file's bytes for an (H, W) slice stored as (H, W, 1) with ``affine`` (:func:`nifti_buffers`)."""
    return b"".join(nifti_buffers(array_HW, affine, description, compress_level))


def nifti_buffers(array_HW: np.ndarray, affine: np.ndarray, description: str = "",
                  compress_level: int | None = None) -> list[Buffer]:
    """A NIfTI-1 file of an (H, W) slice stored as (H, W, 1), as consecutive pieces; gzip when a level is given.

    The voxel data is the slice in NIfTI's column-major order, i.e. the C-order bytes of its transpose.
    gzip output is deterministic (zlib's gzip wrapper writes mtime 0).
    """
    array_HW = np.asarray(array_HW)
    dtype = array_HW.dtype.newbyteorder("=")
    header = nifti_header((*array_HW.shape, 1), dtype, affine, description)
    voxels_WH = np.ascontiguousarray(array_HW.T, dtype=dtype)  # (W, H): i (rows) fastest on disk
    if compress_level is None:
        return [header, voxels_WH.data]
    compressor = zlib.compressobj(compress_level, zlib.DEFLATED, GZIP_WBITS)
    return [compressor.compress(header), compressor.compress(voxels_WH.data), compressor.flush()]


def write_nifti_slice(array_HW: np.ndarray, affine: np.ndarray, path: str | Path, description: str = "",
                      compress_level: int = 1) -> Path:
    """Write one (H, W) slice as an (H, W, 1) NIfTI file atomically; gzip when ``path`` ends in ``.gz``."""
    path = Path(path)
    level = compress_level if path.name.endswith(".gz") else None
    return write_bytes_atomic(path, nifti_buffers(array_HW, affine, description, level))


def nifti_paths(sample_id: str, channels: Sequence[str], folder: Path, suffix: str = ".nii") -> list[Path]:
    """The files of one sample: one per channel, then the label."""
    return [folder / f"{sample_id}_{name}{suffix}" for name in (*channels, LABEL_NAME)]


def describe(sample: ExportSlice, units: str) -> str:
    """The ``descrip`` header text: ``medaug synthetic HU``, ``medaug real a.u.``, ``medaug synthetic labels``."""
    return f"medaug {'synthetic' if sample.synthetic else 'real'} {units}"


def write_nifti_sample(sample: ExportSlice, folder: str | Path, options: NiftiOptions = NiftiOptions()) -> list[Path]:
    """Write the sample's channel files and label file (module docstring); returns the paths."""
    paths = nifti_paths(sample.sample_id, sample.channels, Path(folder), options.suffix)
    for channel, path in enumerate(paths[:-1]):
        description = describe(sample, sample.intensity[channel].units)
        write_nifti_slice(channel_values(sample, channel), sample.affine, path, description, options.compress_level)
    write_nifti_slice(sample.label_HW, sample.affine, paths[-1], describe(sample, "labels"), options.compress_level)
    return paths
