"""Write phantoms to disk in the layout the ``recipes/datasets/phantom_*.yaml`` recipes read.

::

    OUT/ct_abdomen/phantom_0000/ct.nii.gz, label.nii.gz, phantom.json           (format nifti)
    OUT/mr_prostate/phantom_0000/t2.nii.gz, adc.nii.gz, label.nii.gz, phantom.json
    OUT/ct_abdomen_dicom/phantom_0000/ct/*.dcm, label.nii.gz, phantom.json     (format dicom)
    OUT/mr_brain_dicom/phantom_0000/flair/*.dcm, t1c/*.dcm, label.nii.gz, phantom.json

NIfTI images are int16 (HU for CT, arbitrary units for MR) with voxel axes along RAS +x, +y, +z; labels
are uint8 on the same grid. DICOM series are CT or MR Image Storage, int16, stored the way scanners store
axial slices: rows run anterior → posterior and columns right → left (ImageOrientationPatient
``1\\0\\0\\0\\1\\0``, LPS); CT has RescaleIntercept -1024 and a W400/L40 window. The label beside a
DICOM series stays in the NIfTI (RAS) voxel order, so readers must match them by physical position.
Every series says it is synthetic (SeriesDescription ``SYNTHETIC ...``, PatientIdentityRemoved YES,
DerivationDescription naming the generator, domain and seed); the channels of one MR subject share a
study and a frame of reference.

Subject ``i`` of a domain gets the seed :func:`~medaug.phantoms.make.subject_seed` ``(seed, domain, i)``,
the same for every format, so the DICOM variant shows the same anatomy as the NIfTI one. Each file is
written under a temporary name and renamed (DICOM series: the whole channel folder), and
``phantom.json`` is written last: a subject whose ``phantom.json`` matches the request and whose files
exist is skipped, so re-running after a kill finishes the job and re-running a finished job is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medaug.errors import ConfigError
from medaug.io.atomic import PART_PREFIX, atomic_output
from medaug.io.volume import Volume
from medaug.phantoms.base import GENERATOR_VERSION, Phantom
from medaug.phantoms.make import (
    DOMAINS,
    ShapeLike,
    make_phantom,
    resolve_domain,
    resolve_shape,
    subject_seed,
)

log = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom")
MANIFEST_NAME = "phantom.json"
CT_DICOM_RESCALE = (1.0, -1024.0)  # (slope, intercept): stored 0..4095 for -1024..3071 HU, as scanners store
CT_DICOM_WINDOW = (40.0, 400.0)  # (centre, width) HU, the abdomen soft-tissue window [-160, 240]


@dataclass(frozen=True)
class SubjectResult:
    """One subject folder of one format: where it is and whether this call wrote it or found it complete."""

    domain: str
    format: str
    index: int
    seed: int
    folder: Path
    written: bool


def resolve_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Formats from ``"nifti,dicom"`` or a sequence (entries may hold commas); duplicates dropped, order kept.

    Raises:
        ConfigError: an unknown format; the message lists the valid ones.
    """
    items = [formats] if isinstance(formats, str) else list(formats)
    names = [name.strip().lower() for item in items for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        shown = repr(unknown[0]) if unknown else "nothing"
        raise ConfigError("format", f"got {shown}; expected one or more of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


def subject_folder(out_dir: str | Path, domain: str, fmt: str, index: int) -> Path:
    """``OUT/<domain>[_dicom]/phantom_<index:04d>``."""
    suffix = "" if fmt == "nifti" else f"_{fmt}"
    return Path(out_dir) / f"{domain}{suffix}" / f"phantom_{index:04d}"


def write_phantoms(
    out_dir: str | Path,
    domains: Iterable[str] | None = None,
    n: int = 1,
    seed: int = 0,
    formats: str | Iterable[str] = ("nifti",),
    shape: ShapeLike = None,
    on_subject: Callable[[SubjectResult], None] | None = None,
) -> list[Path]:
    """Write ``n`` phantoms per domain and format under ``out_dir``; return the subject folders in order.

    Args:
        out_dir: output root (created).
        domains: names from :data:`DOMAINS` (or ``ct/abdomen``-style); None = all.
        n: subjects per domain.
        seed: run seed; subject ``i`` of domain ``d`` uses ``subject_seed(seed, d, i)``.
        formats: ``"nifti"``, ``"dicom"`` or both (``"nifti,dicom"`` or a sequence).
        shape: voxel matrix for every domain (``(I, J, K)`` or ``"IxJxK"``), or a size name
            (``"default"``, ``"small"``) resolved per domain; None = default.
        on_subject: called after each subject (written or skipped), e.g. to advance a progress bar.

    Raises:
        ConfigError: unknown domain or format, malformed shape, negative ``n`` or ``seed``.
    """
    specs = list({spec.name: spec for spec in map(resolve_domain, domains or DOMAINS)}.values())
    formats = resolve_formats(formats)
    if n < 0 or seed < 0:
        raise ConfigError("n" if n < 0 else "seed", f"is {n if n < 0 else seed}; expected a non-negative integer")
    shapes = {spec.name: resolve_shape(spec, shape) for spec in specs}
    folders = []
    for domain, domain_shape in shapes.items():
        for index in range(n):
            results = _write_subject_formats(Path(out_dir), domain, index, seed, formats, domain_shape)
            for result in results:
                folders.append(result.folder)
                if on_subject is not None:
                    on_subject(result)
    return folders


def _write_subject_formats(
    out_dir: Path, domain: str, index: int, seed: int, formats: tuple[str, ...], shape: tuple[int, int, int]
) -> list[SubjectResult]:
    """Write (or find complete) one subject in every format, drawing the phantom at most once."""
    subject = subject_seed(seed, domain, index)
    phantom: Phantom | None = None
    results = []
    for fmt in formats:
        folder = subject_folder(out_dir, domain, fmt, index)
        request = _request(domain, fmt, index, seed, subject, shape)
        written = not _is_complete(folder, request)
        if written:
            phantom = phantom or make_phantom(domain, subject, shape)
            _write_subject(phantom, folder, fmt, request)
            log.info("wrote %s", folder)
        results.append(SubjectResult(domain, fmt, index, subject, folder, written))
    return results


def _request(domain: str, fmt: str, index: int, seed: int, subject: int, shape: tuple[int, int, int]) -> dict:
    """What identifies a subject's content: a complete folder with the same request is not rewritten."""
    return {
        "generator": GENERATOR_VERSION,
        "domain": domain,
        "format": fmt,
        "index": index,
        "run_seed": seed,
        "seed": subject,
        "shape": list(shape),
    }


def _is_complete(folder: Path, request: dict) -> bool:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if any(manifest.get(key) != value for key, value in request.items()):
        return False
    return all((folder / name).exists() for name in manifest.get("files", []))


def _write_subject(phantom: Phantom, folder: Path, fmt: str, request: dict) -> None:
    """Write the images and label of one subject, then its ``phantom.json`` (the completion marker)."""
    from medaug.io.nifti import write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    if fmt == "nifti":
        files = [write_nifti(phantom.channel(name), folder / f"{name}.nii.gz").name for name in phantom.channels]
    else:
        files = _write_dicom_channels(phantom, folder, request)
    files.append(write_nifti(phantom.label, folder / "label.nii.gz").name)
    manifest = {
        **request,
        "recipe_domain": phantom.image.metadata["domain"],
        "modality": phantom.image.metadata["modality"],
        "channels": list(phantom.channels),
        "labels": {str(key): name for key, name in phantom.labels.items()},
        "spacing_mm": [round(float(s), 6) for s in phantom.image.spacing_mm],
        "files": files,
    }
    with atomic_output(folder / MANIFEST_NAME) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")


def ras_to_lps_storage(volume: Volume) -> Volume:
    """The same volume with voxel axes i and j reversed, so they point along LPS +x (left) and +y (posterior).

    A RAS-ordered grid (``affine`` columns along +x, +y) becomes the usual DICOM axial layout: columns
    run from the patient's right to left and rows from anterior to posterior. World positions are kept.
    """
    size_i, size_j = volume.spatial_shape[:2]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [size_i - 1, size_j - 1]  # new index (i', j') = (I-1-i, J-1-j)
    array = np.ascontiguousarray(volume.array[:, ::-1, ::-1, :])
    return Volume(array, volume.affine @ flip, dict(volume.metadata))


def _write_dicom_channels(phantom: Phantom, folder: Path, request: dict) -> list[str]:
    """One DICOM series per channel, in ``folder/<channel>/``, sharing study and frame of reference."""
    from pydicom.uid import generate_uid

    from medaug.io.dicom.write import MEDAUG_UID_ROOT

    study_uid, frame_uid = generate_uid(prefix=MEDAUG_UID_ROOT), generate_uid(prefix=MEDAUG_UID_ROOT)
    modality = phantom.image.metadata["modality"].upper()
    extra = {"FrameOfReferenceUID": frame_uid, "PatientPosition": "HFS", **_synthetic_marking(phantom)}
    patient_id = f"phantom_{phantom.domain}_{request['index']:04d}_s{request['run_seed']}"
    names = []
    for number, channel in enumerate(phantom.channels, start=1):
        volume = ras_to_lps_storage(phantom.channel(channel))
        if modality == "CT":
            options = {"rescale": CT_DICOM_RESCALE, "window": CT_DICOM_WINDOW}
        else:
            options = {"window": _mr_window(volume)}
        _write_series_folder(
            volume,
            folder / channel,
            modality=modality,
            series_description=f"SYNTHETIC medaug phantom {phantom.domain} {channel}",
            patient_id=patient_id,
            patient_name="SYNTHETIC^MEDAUG",
            study_uid=study_uid,
            series_number=number,
            extra=extra,
            **options,
        )
        names.append(channel)
    return names


def _synthetic_marking(phantom: Phantom) -> dict[str, str]:
    """DICOM attributes that say the images are synthetic and hold no patient data (DESIGN §3)."""
    return {
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": "synthetic: medaug procedural phantom, no patient data",
        "BurnedInAnnotation": "NO",
        "DerivationDescription": f"{GENERATOR_VERSION}: procedural phantom {phantom.domain}, seed {phantom.seed}",
    }


def _mr_window(volume: Volume) -> tuple[float, float]:
    """(centre, width) spanning the 1st to 99.5th percentile of the voxels above the noise floor."""
    values = volume.array[volume.array > np.percentile(volume.array, 20)]
    low, high = np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0)
    return float((low + high) / 2), float(max(high - low, 1.0))


def _write_series_folder(volume: Volume, folder: Path, **options) -> None:
    """Write a series into a temporary sibling folder, then rename it to ``folder`` (replacing a stale one)."""
    from medaug.io.dicom.write import write_dicom_series

    temporary = folder.with_name(f"{PART_PREFIX}{os.getpid()}-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write_dicom_series(volume, temporary, **options)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
