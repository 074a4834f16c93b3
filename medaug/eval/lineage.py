"""The lineage guard (issue 10 item 3, DESIGN.md §3 "Splits and lineage"): real evaluation data must not
hold patients the generator was trained on.

A synthetic folder's ``synthesize.json`` names its generator (``generator``: a record with the ``checkpoint``
and ``run`` folders and ``sha256``, :func:`read_generator_record`); the generator's checkpoint meta.json holds ``data``, the prepared dataset
lineage written at training time (:func:`medaug.train.var_task.data_lineage`: ``prepared`` path,
``index_sha256``, ``train_groups``, ``train_slices``). :func:`check_lineage` compares the patient groups
of the real rows being evaluated with ``train_groups`` and raises :class:`LineageError` on any overlap,
unless ``allow_overlap`` (then the overlap is logged as an error and recorded, so the report flags it).
A synthetic folder without a generator record, or a generator whose checkpoint cannot be read, gives a
warning and the status ``unknown``: nothing proves the data disjoint, and the report says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medaug.errors import MedaugError

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_OVERLAP = "overlap"
STATUS_UNKNOWN = "unknown"
_EXAMPLES = 5  # overlapping group names quoted in messages


class LineageError(MedaugError):
    """Real evaluation data overlaps the generator's training patient groups."""


@dataclass
class LineageReport:
    """What the guard found. ``status``: ``ok`` (disjoint), ``overlap`` (allowed, flagged) or ``unknown``
    (no usable generator record); ``overlapping_groups``: sorted patient groups in both sets."""

    status: str
    generator: str | None = None
    generator_sha256: str | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    evaluated_groups: int = 0
    overlapping_groups: list[str] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_generator_record(synthetic: str | Path) -> dict[str, Any] | None:
    """The ``generator`` entry of ``synthetic/synthesize.json`` as ``{"path", "sha256"}`` (sha256 may be
    None), or None when the file or the entry is missing or names no path.

    ``medaug synthesize`` records ``{"run", "checkpoint", "sha256", "weights"}``: the checkpoint it sampled
    from is preferred, then the run folder (its latest checkpoint); a plain ``path`` or string also works."""
    from medaug.synth.layout import SYNTHESIZE_JSON

    path = Path(synthetic) / SYNTHESIZE_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get("generator")
    except (json.JSONDecodeError, AttributeError):
        log.warning("%s: not a JSON object; the generator is unknown", path)
        return None
    if isinstance(record, str):
        return {"path": record, "sha256": None}
    if isinstance(record, dict):
        path = next((record[key] for key in ("checkpoint", "run", "path") if record.get(key)), None)
        if path is not None:
            return {"path": str(path), "sha256": record.get("sha256")}
    return None


def resolve_generator_path(record_path: str, synthetic: str | Path) -> Path:
    """The generator run path as recorded: absolute, else relative to the working folder, else to the
    synthetic folder."""
    path = Path(record_path)
    if path.is_absolute() or path.exists():
        return path
    return Path(synthetic) / path


def read_training_lineage(generator: str | Path) -> dict[str, Any]:
    """The ``data`` record of a generator checkpoint (a run folder: its latest checkpoint) without loading
    its trainer state. Raises CheckpointError for an unreadable checkpoint, LineageError without ``data``."""
    from medaug.train.checkpoint import load_checkpoint

    meta = load_checkpoint(Path(generator), trainer=False).meta
    data = meta.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("train_groups"), list):
        raise LineageError(generator, "checkpoint meta.json has no data.train_groups; expected a generator trained "
                                      "by medaug train var (which records its training patient groups)")
    return data


def real_patient_groups(real: str | Path, split: str | None) -> set[str]:
    """Patient groups of the real prepared dataset's rows in ``split`` (all rows for None)."""
    from medaug.data.index import read_index
    from medaug.data.shards import index_file

    index = read_index(index_file(real), columns=["split", "patient_group"])
    pairs = zip(index.column("split").to_pylist(), index.column("patient_group").to_pylist())
    return {group for row_split, group in pairs if split is None or row_split == split}


def check_lineage(real: str | Path, synthetic: str | Path, split: str | None = "test",
                  allow_overlap: bool = False) -> LineageReport:
    """Refuse real evaluation rows (``real``'s ``split``) whose patient groups the generator of ``synthetic``
    was trained on (module docstring). Returns the report; raises :class:`LineageError` on overlap unless
    ``allow_overlap``."""
    groups = real_patient_groups(real, split)
    record = read_generator_record(synthetic)
    if record is None:
        message = (f"{synthetic}: synthesize.json names no generator; cannot check that the real {split} rows "
                   "are disjoint from its training patients")
        log.warning(message)
        return LineageReport(STATUS_UNKNOWN, evaluated_groups=len(groups), message=message)
    generator = resolve_generator_path(record["path"], synthetic)
    report = LineageReport(STATUS_UNKNOWN, str(generator), record["sha256"], evaluated_groups=len(groups))
    try:
        lineage = read_training_lineage(generator)
    except MedaugError as error:
        report.message = f"generator lineage unreadable ({error}); overlap with its training patients not checked"
        log.warning(report.message)
        return report
    report.training_data = {key: lineage.get(key) for key in ("prepared", "index_sha256", "train_slices")}
    report.training_data["train_groups"] = len(lineage["train_groups"])
    report.overlapping_groups = sorted(groups & set(lineage["train_groups"]))
    return _judge(report, real, split, allow_overlap)


def _judge(report: LineageReport, real: str | Path, split: str | None, allow_overlap: bool) -> LineageReport:
    overlap = report.overlapping_groups
    if not overlap:
        report.status = STATUS_OK
        report.message = f"the real {split} rows share no patient group with the generator's training data"
        return report
    examples = ", ".join(overlap[:_EXAMPLES]) + (" ..." if len(overlap) > _EXAMPLES else "")
    reason = (f"split {split!r}: {len(overlap)} of {report.evaluated_groups} patient groups are among the generator's "
              f"training groups ({examples}); expected real evaluation data disjoint from the training patients")
    if not allow_overlap:
        raise LineageError(real, reason)
    report.status = STATUS_OVERLAP
    report.message = f"OVERLAP ALLOWED: {reason}"
    log.error("%s: %s", real, report.message)
    return report


__all__ = [
    "LineageError",
    "LineageReport",
    "STATUS_OK",
    "STATUS_OVERLAP",
    "STATUS_UNKNOWN",
    "check_lineage",
    "read_generator_record",
    "read_training_lineage",
    "real_patient_groups",
    "resolve_generator_path",
]
