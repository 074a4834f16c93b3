"""nnU-Net v2 raw export (2D), for real and synthetic slices in one dataset.

Layout (nnU-Net's ``documentation/dataset_format.md``)::

    DatasetXXX_Name/
      dataset.json                      channel_names, labels, numTraining, file_ending ".nii.gz", medaug
      imagesTr/{case}_{0000,0001,...}.nii.gz   one file per channel, as medaug.synth.export.nifti writes them
      labelsTr/{case}.nii.gz            uint8 nnU-Net labels (below)

Each slice is one case, an (H, W, 1) NIfTI with the slice affine: int16 HU for CT channels (named ``CT`` in
``channel_names`` so that nnU-Net applies its CT normalization), float32 arbitrary units for MR channels
(z-scored by nnU-Net). Case ids are ``real_{volume_id}_{slice_index:04d}`` for the slices of a prepared
dataset and ``syn_{sample_id}`` for synthetic samples, so both go into one dataset without clashing.
nnU-Net's default 5-fold split is random over cases, i.e. over slices: group real cases by the volume id in
their name to build a ``splits_final.json`` that keeps a patient in one fold.

**Labels** (:class:`NnunetLabels`): nnU-Net wants consecutive labels 0..N. The dataset fixes its structures
(vocabulary names, ordered by vocabulary id) when it is created; structure ``structures[i - 1]`` is label i,
and every later export into the dataset must use the same structures. A vocabulary id maps to

* its own label when the structure is in the set;
* else the label of its nearest ancestor in the set (``prostate_peripheral_zone`` → ``prostate``);
* else ``ignore`` when one of its descendants is in the set (a coarser label: which part is unknown);
* else background 0 (a labelled structure that is none of the set).

Vocabulary 255 (ignore) maps to nnU-Net's ``ignore`` label N + 1 (nnU-Net wants it the highest). A row that
does not annotate every structure of the set (``ExportSlice.annotated``; DESIGN §3 "not annotated is never
absent") has its background pixels set to ``ignore`` too. ``"ignore"`` enters ``dataset.json`` once the
first label file uses it (it is written before that file), which changes no other label.

Appending: :func:`open_nnunet_dataset` reopens an existing folder and refuses channels, units or structures
that differ from what its ``dataset.json`` records under ``medaug``. Every file is written atomically and the
label file last, so a case is complete once its label exists; ``numTraining`` counts those and is rewritten
with ``dataset.json`` after every batch.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medaug import vocab
from medaug.io.atomic import PART_PREFIX
from medaug.synth.export.base import HU_UNITS, ExportError, ExportSlice, write_bytes_atomic
from medaug.synth.export.nifti import channel_values, describe, write_nifti_slice

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
FOLDER_PATTERN = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_.-]+$")
NNUNET_CT_CHANNEL = "CT"  # nnU-Net picks CTNormalization for this channel name, z-score for others
REAL_PREFIX, SYNTHETIC_PREFIX = "real_", "syn_"
MAX_LABELS = 254  # labels are uint8 with the ignore label N + 1 <= 255


@dataclass(frozen=True)
class NnunetLabels:
    """The structures of an nnU-Net dataset: ``structures[i - 1]`` is label i (module docstring)."""

    structures: tuple[str, ...]

    def __post_init__(self) -> None:
        ids = [vocab.structure(name).id for name in self.structures]
        if not ids or ids != sorted(set(ids)) or len(ids) > MAX_LABELS:
            raise ExportError("nnunet structures", f"{list(self.structures)}; expected 1..{MAX_LABELS} distinct "
                              "vocabulary names in vocabulary-id order (use NnunetLabels.from_names)")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> NnunetLabels:
        """The distinct vocabulary ``names``, ordered by vocabulary id."""
        return cls(tuple(sorted(set(names), key=lambda name: vocab.structure(name).id)))

    @property
    def ignore_label(self) -> int:
        return len(self.structures) + 1

    def labels_json(self, with_ignore: bool) -> dict[str, int]:
        """dataset.json ``labels``: background 0, the structures 1..N, and ``ignore`` N + 1 when used."""
        labels = {"background": 0, **{name: number for number, name in enumerate(self.structures, start=1)}}
        if with_ignore:
            labels["ignore"] = self.ignore_label
        return labels

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """(256,) uint8, read-only: vocabulary id → nnU-Net label (module docstring); unused ids → ignore."""
        number = {name: label for label, name in enumerate(self.structures, start=1)}
        lut = np.full(256, self.ignore_label, dtype=np.uint8)
        lut[vocab.BACKGROUND] = 0
        for item in vocab.VOCABULARY.values():
            lut[item.id] = self._label_of(item.name, number)
        lut.flags.writeable = False
        return lut

    def _label_of(self, name: str, number: dict[str, int]) -> int:
        for candidate in (name, *vocab.ancestors(name)):
            if candidate in number:
                return number[candidate]
        if any(child in number for child in vocab.descendants(name)):
            return self.ignore_label
        return 0

    def covered_by(self, annotated: Sequence[str]) -> bool:
        """Whether a label map annotating ``annotated`` says where every structure of the set is."""
        annotated = set(annotated)
        return all(_covered(name, annotated) for name in self.structures)

    def to_nnunet(self, label_HW: np.ndarray, annotated: Sequence[str] | None = None) -> np.ndarray:
        """(H, W) uint8 nnU-Net labels for vocabulary ids; background → ignore where the set is not all annotated."""
        labels_HW = self.lut[label_HW]
        if annotated is not None and not self.covered_by(annotated):
            labels_HW[label_HW == vocab.BACKGROUND] = self.ignore_label
        return labels_HW


def _covered(name: str, annotated: set[str]) -> bool:
    """``name`` is annotated itself, through an ancestor, or through all of its children."""
    if name in annotated or any(parent in annotated for parent in vocab.ancestors(name)):
        return True
    children = vocab.children(name)
    return bool(children) and all(_covered(child, annotated) for child in children)


@dataclass
class NnunetDataset:
    """An nnU-Net v2 raw dataset folder being written; get one from :func:`open_nnunet_dataset`."""

    folder: Path
    channels: tuple[str, ...]
    units: tuple[str, ...]
    labels: NnunetLabels
    name: str = ""
    description: str = ""
    has_ignore: bool = False
    cases: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def case_id(self, sample: ExportSlice) -> str:
        """``real_{sample_id}`` or ``syn_{sample_id}``."""
        return (SYNTHETIC_PREFIX if sample.synthetic else REAL_PREFIX) + sample.sample_id

    def case_paths(self, case_id: str) -> list[Path]:
        """The case's files: one image per channel (``_0000``...), then the label."""
        images_dir = self.folder / IMAGES_DIR
        images = [images_dir / f"{case_id}_{number:04d}{FILE_ENDING}" for number in range(len(self.channels))]
        return [*images, self.folder / LABELS_DIR / f"{case_id}{FILE_ENDING}"]

    def add(self, sample: ExportSlice) -> list[Path]:
        """Write one sample as a case (images first, label last), atomically; returns its paths."""
        self._require_compatible(sample)
        case_id = self.case_id(sample)
        paths = self.case_paths(case_id)
        for channel, path in enumerate(paths[:-1]):
            description = describe(sample, sample.intensity[channel].units)
            write_nifti_slice(channel_values(sample, channel), sample.affine, path, description)
        labels_HW = self.labels.to_nnunet(sample.label_HW, sample.annotated)
        if not self.has_ignore and (labels_HW == self.labels.ignore_label).any():
            self._declare_ignore()
        write_nifti_slice(labels_HW, sample.affine, paths[-1], describe(sample, "nnU-Net labels"))
        self.cases.add(case_id)
        return paths

    def _declare_ignore(self) -> None:
        """Add ``ignore`` to dataset.json before the first label file that uses it is written."""
        with self._lock:
            if not self.has_ignore:
                self.has_ignore = True
                self._write_json_locked()

    def _require_compatible(self, sample: ExportSlice) -> None:
        units = tuple(mapping.units for mapping in sample.intensity)
        if sample.channels != self.channels or units != self.units:
            raise ExportError(self.folder, f"holds channels {list(self.channels)} in {list(self.units)}; sample "
                              f"{sample.sample_id!r} has {list(sample.channels)} in {list(units)}; expected the same "
                              "channels and units (one nnU-Net dataset, one channel layout)")

    def write_dataset_json(self) -> Path:
        """Write ``dataset.json`` atomically, with ``numTraining`` = the complete cases (thread-safe)."""
        with self._lock:
            return self._write_json_locked()

    def _write_json_locked(self) -> Path:
        channel_names = {str(number): NNUNET_CT_CHANNEL if unit == HU_UNITS else name
                         for number, (name, unit) in enumerate(zip(self.channels, self.units))}
        record = {
            "channel_names": channel_names,
            "labels": self.labels.labels_json(self.has_ignore),
            "numTraining": len(self.cases),
            "file_ending": FILE_ENDING,
            "name": self.name or self.folder.name,
            "description": self.description,
            "medaug": {"channels": list(self.channels), "units": list(self.units),
                       "structures": list(self.labels.structures),
                       "vocabulary_ids": {name: vocab.structure(name).id for name in self.labels.structures}},
        }
        payload = (json.dumps(record, indent=2) + "\n").encode()
        return write_bytes_atomic(self.folder / DATASET_JSON, payload)


def open_nnunet_dataset(folder: str | Path, channels: Sequence[str], units: Sequence[str],
                        structures: Sequence[str] | None = None, description: str = "") -> NnunetDataset:
    """Create or reopen (to append) the nnU-Net raw dataset ``folder`` (named ``DatasetXXX_Name``).

    ``channels`` and ``units`` (per channel: ``HU`` or ``a.u.``) fix the image layout; ``structures`` fixes the
    labels (vocabulary names, any order). Reopening takes the structures from ``dataset.json`` when
    ``structures`` is None and refuses any that differ. Stale temporary files of killed writers are removed.
    """
    folder = Path(folder)
    if not FOLDER_PATTERN.match(folder.name):
        raise ExportError(folder, "is not an nnU-Net dataset folder name; expected DatasetXXX_Name (3 digits)")
    channels, units = tuple(channels), tuple(units)
    existing = folder / DATASET_JSON
    if existing.is_file():
        dataset = _reopen(folder, channels, units, structures)
    elif structures is None:
        raise ExportError(folder, "is a new nnU-Net dataset; expected the structures that fix its labels")
    else:
        dataset = NnunetDataset(folder, channels, units, NnunetLabels.from_names(structures), description=description)
        for sub in (IMAGES_DIR, LABELS_DIR):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        dataset.write_dataset_json()
    _remove_stale_parts(folder)
    return dataset


def _reopen(folder: Path, channels: tuple[str, ...], units: tuple[str, ...],
            structures: Sequence[str] | None) -> NnunetDataset:
    record = json.loads((folder / DATASET_JSON).read_text())
    stored = record.get("medaug")
    if stored is None:
        raise ExportError(folder / DATASET_JSON, "has no 'medaug' entry; expected a dataset medaug wrote (its label "
                          "mapping is unknown otherwise)")
    labels = NnunetLabels(tuple(stored["structures"]))
    if structures is not None and NnunetLabels.from_names(structures) != labels:
        raise ExportError(folder, f"labels structures {list(labels.structures)}; asked for "
                          f"{list(NnunetLabels.from_names(structures).structures)}; expected the same label mapping")
    if (tuple(stored["channels"]), tuple(stored["units"])) != (channels, units):
        raise ExportError(folder, f"holds channels {stored['channels']} in {stored['units']}; asked to add "
                          f"{list(channels)} in {list(units)}; expected the same channels (refusing to mix)")
    labels_dir = folder / LABELS_DIR
    cases = {path.name[: -len(FILE_ENDING)] for path in labels_dir.glob(f"*{FILE_ENDING}")
             if not path.name.startswith(PART_PREFIX)}
    return NnunetDataset(folder, channels, units, labels, name=record.get("name", ""),
                         description=record.get("description", ""), has_ignore="ignore" in record["labels"],
                         cases=cases)


def _remove_stale_parts(folder: Path) -> None:
    """Temporary files of killed writers end in ``.nii.gz`` too, and nnU-Net would take them for cases."""
    from medaug.data.shards import _writer_alive

    for sub in (IMAGES_DIR, LABELS_DIR):
        for path in (folder / sub).glob(f"{PART_PREFIX}*"):
            if not _writer_alive(path):
                path.unlink(missing_ok=True)
                log.info("removed stale temporary file %s", path)


@dataclass
class NnunetExport:
    """What :func:`export_prepared_to_nnunet` did: the dataset, and counts of cases written or skipped."""

    dataset: NnunetDataset
    written: int = 0
    skipped_existing: int = 0
    skipped_unlabelled: int = 0


_INDEX_COLUMNS = ["volume_id", "slice_index", "split", "domain", "channels", "affine", "intensity", "shard",
                  "shard_row", "structures_present", "structures_annotated"]
_CHUNK = 256  # rows read (in this thread) per export_batch call (written on the workers)


def export_prepared_to_nnunet(prepared_dir: str | Path, out: str | Path, split: str | None = "train",
                              structures: Sequence[str] | None = None, domain: str | None = None,
                              workers: int = 2) -> NnunetExport:
    """Add the labelled slices of a prepared dataset to the nnU-Net raw dataset ``out`` (``DatasetXXX_Name``).

    Rows of ``split`` (None: all) and ``domain`` (None: all, which must share one channel layout) are read
    through the index and :class:`~medaug.data.shards.ShardStore`; image-only rows are skipped (nnU-Net
    trains on labelled cases). ``structures`` fixes a new dataset's labels; None takes them from an existing
    ``out`` or else the union of the rows' ``structures_annotated``. Cases already complete are skipped, so a
    killed export resumes. Synthetic samples are added later to the same folder with :func:`export_batch`.
    """
    import pyarrow.compute as pc

    from medaug.data.index import read_index
    from medaug.data.shards import INDEX_FILE

    prepared_dir = Path(prepared_dir)
    table = read_index(prepared_dir / INDEX_FILE, columns=_INDEX_COLUMNS)
    if split is not None:
        table = table.filter(pc.fill_null(pc.equal(table.column("split"), split), False))
    if domain is not None:
        table = table.filter(pc.equal(table.column("domain"), domain))
    rows = table.to_pylist()
    if not rows:
        raise ExportError(prepared_dir, f"has no rows of split {split!r} and domain {domain!r}; expected at least one")
    channels, units = _channel_layout(rows, prepared_dir)
    if structures is None and not (Path(out) / DATASET_JSON).is_file():
        structures = sorted({name for row in rows for name in row["structures_annotated"]})
    dataset = open_nnunet_dataset(out, channels, units, structures, description=f"medaug export of {prepared_dir}")
    return _export_rows(rows, prepared_dir, dataset, workers)


def _channel_layout(rows: list[dict], prepared_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The rows' one (channels, units) layout; several layouts are an error that lists the domains."""
    layouts: dict[tuple[tuple[str, ...], tuple[str, ...]], set[str]] = {}
    for row in rows:
        units = tuple(mapping["units"] for mapping in json.loads(row["intensity"]))
        layouts.setdefault((tuple(row["channels"]), units), set()).add(row["domain"])
    if len(layouts) > 1:
        found = "; ".join(f"{sorted(domains)}: {list(layout[0])}" for layout, domains in layouts.items())
        raise ExportError(prepared_dir, f"rows have different channels ({found}); expected one domain's "
                          "channels per nnU-Net dataset (pass domain=)")
    return next(iter(layouts))


def _export_rows(rows: list[dict], prepared_dir: Path, dataset: NnunetDataset, workers: int) -> NnunetExport:
    from medaug.data.shards import ShardStore
    from medaug.synth.export.batch import export_batch

    store = ShardStore(prepared_dir)
    summary = NnunetExport(dataset)
    for start in range(0, len(rows), _CHUNK):
        samples = []
        for row in rows[start:start + _CHUNK]:
            sample = _row_to_sample(row, store)
            if sample is None:
                summary.skipped_unlabelled += 1
            else:
                samples.append(sample)
        if samples:
            result = export_batch(samples, formats=("nnunet",), nnunet=dataset, workers=workers)
            summary.written += len(result.written)
            summary.skipped_existing += len(result.skipped)
    if summary.skipped_unlabelled:
        log.warning("%s: skipped %d image-only slices (no label map)", prepared_dir, summary.skipped_unlabelled)
    return summary


def _row_to_sample(row: dict, store) -> ExportSlice | None:
    """The real slice of one index row as an :class:`ExportSlice`, or None when it has no label map."""
    image_CHW, label_HW = store.read(row["shard"], int(row["shard_row"]))
    if label_HW is None:
        return None
    return ExportSlice(
        sample_id=f"{row['volume_id']}_{int(row['slice_index']):04d}",
        image_CHW=image_CHW.astype(np.float32),
        label_HW=label_HW,
        channels=tuple(row["channels"]),
        affine=np.asarray(row["affine"], dtype=np.float64).reshape(4, 4),
        intensity=tuple(json.loads(row["intensity"])),
        structures=tuple(row["structures_present"]),
        domain=row["domain"],
        annotated=tuple(row["structures_annotated"]),
        synthetic=False,
    )
