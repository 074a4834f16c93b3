"""Exporters of labelled slices (DESIGN §3 "Synthetic output"): PNG, NIfTI, DICOM (+ SEG) and nnU-Net raw.

The synthesis engine builds one :class:`ExportSlice` per generated sample (model-space channels of its
domain, vocabulary label map, slice affine, intensity mappings) and calls :func:`export_batch`; the
montage comes from :func:`write_montage`. :func:`export_prepared_to_nnunet` writes the real slices of a
prepared dataset into an nnU-Net dataset that synthetic samples are then appended to
(:func:`open_nnunet_dataset` + ``export_batch(..., formats=("nnunet",), nnunet=dataset)``).

* :mod:`~medaug.synth.export.base`: :class:`ExportSlice`, :func:`canonical_affine`.
* :mod:`~medaug.synth.export.png`: 16-bit or windowed 8-bit channels, label PNG, montage.
* :mod:`~medaug.synth.export.nifti`: channels (HU int16 / MR float32 a.u.) and label with the slice affine.
* :mod:`~medaug.synth.export.dicom`: CT/MR Image or Secondary Capture series marked synthetic, DICOM SEG.
* :mod:`~medaug.synth.export.nnunet`: nnU-Net v2 raw, 2D, consecutive labels, appendable.
* :mod:`~medaug.synth.export.batch`: :func:`export_batch`, threads, resume.
"""

from medaug.synth.export.base import ExportError, ExportSlice, canonical_affine
from medaug.synth.export.batch import BatchExport, export_batch
from medaug.synth.export.dicom import DicomOptions, dicom_paths, write_dicom_sample
from medaug.synth.export.nifti import NiftiOptions, write_nifti_sample
from medaug.synth.export.nnunet import (
    NnunetDataset,
    NnunetExport,
    NnunetLabels,
    export_prepared_to_nnunet,
    open_nnunet_dataset,
)
from medaug.synth.export.png import PngOptions, write_montage, write_png_sample

__all__ = [
    "BatchExport",
    "DicomOptions",
    "ExportError",
    "ExportSlice",
    "NiftiOptions",
    "NnunetDataset",
    "NnunetExport",
    "NnunetLabels",
    "PngOptions",
    "canonical_affine",
    "dicom_paths",
    "export_batch",
    "export_prepared_to_nnunet",
    "open_nnunet_dataset",
    "write_dicom_sample",
    "write_montage",
    "write_nifti_sample",
    "write_png_sample",
]
