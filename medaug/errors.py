"""Typed errors that carry the file (or config field) they are about.

Every message is one line of the form ``<where>: <what was wrong>; expected <what>``, so that a batch
job can store ``str(error)`` in ``rejected.parquet`` and a person can act on it.
"""

from __future__ import annotations

from pathlib import Path


class MedaugError(Exception):
    """Base class: ``where`` names the file or field, ``reason`` says what was expected."""

    def __init__(self, where: str | Path, reason: str):
        self.where = str(where)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.where}: {self.reason}")


class ImageReadError(MedaugError):
    """A file or folder could not be read as a medical image (missing, truncated, not an image, bad values)."""


class DicomSeriesError(ImageReadError):
    """A DICOM series is inconsistent (missing/duplicated slices, mixed geometry, mosaic, localizer...)."""


class LabelError(MedaugError):
    """A label map does not fit its image or the recipe's label table."""


class ConfigError(MedaugError):
    """A recipe or config value is invalid; ``where`` is the dotted key path."""


class CheckpointError(MedaugError):
    """A checkpoint is corrupt or does not match what loads it."""
