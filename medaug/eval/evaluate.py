"""``medaug evaluate metrics``: a synthetic folder against real prepared data (issue 10).

:func:`evaluate_metrics` runs, in order:

1. the **lineage guard** (:mod:`medaug.eval.lineage`): the real ``split`` rows must share no patient group
   with the generator's training data;
2. per feature **backbone** (:mod:`medaug.eval.features`; one not supplied or not loadable is listed as
   unavailable with its reason, never replaced): features of the real ``split`` rows and of every
   synthetic row, then the **distribution metrics** (:func:`medaug.eval.metrics.compare_features`: FID,
   KID, CMMD, precision/recall, density/coverage, bootstrap intervals, real-vs-real floor) overall, per
   domain and per structure (rows whose ``structures_present`` contain it, in either set); a group with
   fewer than ``min_group_size`` rows in a set is listed with its counts but not scored;
3. **memorization** (:mod:`medaug.eval.memorization`) against the generator's training slices (the
   prepared dataset its lineage names when that is still on disk with the same index hash, else the real
   dataset's train split, with a warning) and that dataset's val split, in pixels and in the features of
   one backbone (``memorization_backbone``, default ``medaug`` when available, else the first available);
4. **intensity fidelity** (:mod:`medaug.eval.fidelity`) per domain, structure and channel;
5. MedVAR's **efficiency** ``Q · (ln(1 + P))^γ`` per backbone with Q its overall FID, when the seconds per
   image are known (``seconds_per_image``, else ``synthesize.json``);
6. the **report** (:mod:`medaug.eval.report`): ``metrics.json``, ``report.md``, ``report.html``, plots and
   image grids in ``out``.

Every number in ``metrics.json`` sits under the backbone that produced it (``distribution.<backbone>``,
``efficiency.<backbone>``, ``memorization.backbone``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medaug.errors import ConfigError
from medaug.eval.fidelity import FidelityConfig
from medaug.eval.memorization import MemorizationConfig
from medaug.eval.metrics import MetricConfig

if TYPE_CHECKING:
    from medaug.data.dataset import PreparedSliceDataset
    from medaug.eval.features import Backbone

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EvaluateConfig:
    """Every knob of :func:`evaluate_metrics` besides its inputs.

    ``device``: where backbones run; ``batch_size``: slices per feature forward; ``min_group_size``: rows
    a group needs in each set to be scored; ``per_structure``: score structure groups too;
    ``memorization_backbone``: the feature space of the memorization check (None: ``medaug`` when
    available, else the first available); ``grid_per_domain``: real and synthetic slices per domain in the
    report's grids; ``figures``: draw the report's plots and images (off: tables only); ``seconds_per_image``/``efficiency_gamma``: P and γ of the efficiency score (P None:
    read from synthesize.json when recorded); ``allow_overlap``: evaluate even when the real data holds
    training patients (flagged in the report).
    """

    device: str = "cpu"
    batch_size: int = 64
    min_group_size: int = 10
    per_structure: bool = True
    memorization_backbone: str | None = None
    grid_per_domain: int = 6
    figures: bool = True
    seconds_per_image: float | None = None
    efficiency_gamma: float = 1.0
    allow_overlap: bool = False
    metrics: MetricConfig = field(default_factory=MetricConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def __post_init__(self) -> None:
        if self.min_group_size < 2:
            raise ConfigError("min_group_size", f"is {self.min_group_size}; expected >= 2 (FID needs two rows)")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"is {self.batch_size}; expected >= 1")


# ---------------------------------------------------------------------------------------------- inputs


def _index_channels(root: Path) -> int:
    import pyarrow.compute as pc

    from medaug.data.index import read_index
    from medaug.data.shards import index_file

    counts = pc.list_value_length(read_index(index_file(root), columns=["channels"]).column("channels"))
    return int(pc.max(counts).as_py() or 1)


def open_datasets(real: Path, synthetic: Path, split: str) -> dict[str, PreparedSliceDataset]:
    """The real ``split`` rows and the synthetic rows with one channel count C_max (the larger of the two)."""
    from medaug.data.dataset import PreparedSliceDataset

    channels = max(_index_channels(real), _index_channels(synthetic))
    datasets = {"real": PreparedSliceDataset(real, split=split, channels_out=channels),
                "synthetic": PreparedSliceDataset(synthetic, channels_out=channels)}
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            where = f"{real} split {split!r}" if name == "real" else str(synthetic)
            raise ConfigError(where, "has no slices; expected rows to evaluate")
    return datasets


def _check_inputs(real: Path, synthetic: Path, split: str) -> None:
    from medaug.data.shards import index_file

    if split not in SPLITS:
        raise ConfigError("split", f"is {split!r}; allowed values: {', '.join(SPLITS)}")
    for label, root in (("real", real), ("synthetic", synthetic)):
        if not index_file(root).is_file():
            raise ConfigError(root, f"no index.parquet or manifest.parquet; expected a {label} prepared or synthetic folder")


# ---------------------------------------------------------------------------------------------- backbones


def load_backbones(backbones: Mapping[str, str | Path | None], device: str) -> tuple[dict[str, Backbone], dict[str, Any]]:
    """Every known backbone (:data:`~medaug.eval.features.BACKBONES`) and any other named: the loaded
    ones, and per name its record ({"status": "available", "weights", "dim", ...} or {"status":
    "unavailable", "reason"})."""
    from medaug.eval.features import BACKBONES, BackboneUnavailable, load_backbone

    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown:
        raise ConfigError("backbone", f"{unknown} unknown; allowed values: {', '.join(BACKBONES)}")
    loaded, records = {}, {}
    for name in BACKBONES:
        path = backbones.get(name)
        try:
            loaded[name] = load_backbone(name, path, device)
        except BackboneUnavailable as error:
            records[name] = {"status": "unavailable", "weights": None if path is None else str(path), "reason": str(error)}
            continue
        records[name] = _backbone_record(loaded[name], path)
    return loaded, records


def _backbone_record(backbone: Backbone, path: str | Path | None) -> dict[str, Any]:
    record = {"status": "available", "weights": str(path), "dim": int(backbone.dim),
              "preprocessing": getattr(backbone, "preprocessing", None)}
    if backbone.name == "medaug" and path is not None:
        record["evaluation"] = _features_run_evaluation(Path(path))
    return record


def _features_run_evaluation(path: Path) -> dict[str, Any] | None:
    """The held-out evaluation (structure-present AUROC, domain accuracy) recorded in a features checkpoint."""
    from medaug.train.checkpoint import META_FILE, latest_checkpoint

    folder = path if (path / META_FILE).is_file() else latest_checkpoint(path)
    if folder is None or not (folder / META_FILE).is_file():
        return None
    return json.loads((folder / META_FILE).read_text()).get("evaluation")


# ---------------------------------------------------------------------------------------------- groups


def row_groups(dataset: PreparedSliceDataset, per_structure: bool) -> dict[str, dict[str, np.ndarray]]:
    """Row positions per group: {"overall": {"all": ...}, "domains": {name: ...}, "structures": {name: ...}}."""
    from medaug.eval.memorization import row_column

    domains = row_column(dataset, "domain")
    groups: dict[str, dict[str, np.ndarray]] = {"overall": {"all": np.arange(len(dataset))}, "domains": {},
                                                "structures": {}}
    for name in sorted(set(domains)):
        groups["domains"][name] = np.flatnonzero(domains == name)
    if per_structure:
        present = dataset.rows.column("structures_present").to_pylist()
        for name in sorted({structure for names in present for structure in names}):
            groups["structures"][name] = np.array([i for i, names in enumerate(present) if name in names], dtype=np.int64)
    return groups


def score_groups(real_ND: np.ndarray, synthetic_MD: np.ndarray, real_groups: dict[str, dict[str, np.ndarray]],
                 synthetic_groups: dict[str, dict[str, np.ndarray]], config: EvaluateConfig) -> dict[str, Any]:
    """:func:`~medaug.eval.metrics.compare_features` on every group present in either set ({"overall": {...},
    "domains": {...}, "structures": {...}}); a group too small in a set holds only its counts and ``skipped``."""
    from medaug.eval.metrics import compare_features

    empty = np.zeros(0, dtype=np.int64)
    scored: dict[str, Any] = {}
    for level in ("overall", "domains", "structures"):
        entries = {}
        for name in sorted(set(real_groups[level]) | set(synthetic_groups[level])):
            real_rows = real_groups[level].get(name, empty)
            synthetic_rows = synthetic_groups[level].get(name, empty)
            if min(real_rows.size, synthetic_rows.size) < config.min_group_size:
                entries[name] = {"n_real": int(real_rows.size), "n_synthetic": int(synthetic_rows.size),
                                 "skipped": f"fewer than {config.min_group_size} rows in a set"}
                continue
            entries[name] = compare_features(real_ND[real_rows], synthetic_MD[synthetic_rows], config.metrics)
        scored[level] = entries["all"] if level == "overall" else entries
    return scored


# ---------------------------------------------------------------------------------------------- memorization


def memorization_reference(real: Path, lineage: dict[str, Any]) -> Path:
    """The prepared dataset the generator was trained on when it is still there unchanged, else ``real``."""
    from medaug.data.shards import INDEX_FILE
    from medaug.train.checkpoint import sha256_file

    data = lineage.get("training_data") or {}
    prepared = data.get("prepared")
    if prepared and (Path(prepared) / INDEX_FILE).is_file():
        if sha256_file(Path(prepared) / INDEX_FILE) == data.get("index_sha256"):
            return Path(prepared)
        log.warning("%s changed since the generator was trained (index hash differs)", prepared)
    if lineage.get("status") != "ok" or (prepared and Path(prepared).resolve() != real.resolve()):
        log.warning("memorization: comparing with %s's train split, which may not be the generator's training data", real)
    return real


def run_memorization(reference: Path, datasets: dict[str, PreparedSliceDataset], backbones: dict[str, Backbone],
                     config: EvaluateConfig, out: Path) -> tuple[dict[str, Any], Any, Any]:
    """Memorization against ``reference``'s train (and val) split; returns (summary, records, inputs)."""
    from medaug.data.dataset import PreparedSliceDataset
    from medaug.eval.features import extract_features
    from medaug.eval.memorization import MemorizationInputs, evaluate_memorization

    channels = datasets["synthetic"].channels_out
    train = PreparedSliceDataset(reference, split="train", channels_out=max(channels, _index_channels(reference)))
    val = PreparedSliceDataset(reference, split="val", channels_out=train.channels_out)
    if len(train) == 0:
        return {"status": "unavailable", "reason": f"{reference} has no train split to compare with"}, None, None
    inputs = MemorizationInputs(datasets["synthetic"], train, val if len(val) else None)
    name = _memorization_backbone(backbones, config)
    if name is not None:
        backbone = backbones[name]
        inputs.backbone = name
        inputs.features = {"synthetic": extract_features(backbone, inputs.synthetic, config.batch_size),
                           "train": extract_features(backbone, train, config.batch_size)}
        if inputs.val is not None:
            inputs.features["val"] = extract_features(backbone, val, config.batch_size)
    summary, records = evaluate_memorization(inputs, config.memorization, out / "memorization.parquet")
    summary["reference"] = str(reference)
    return summary, records, inputs


def _memorization_backbone(backbones: dict[str, Backbone], config: EvaluateConfig) -> str | None:
    if config.memorization_backbone is not None:
        if config.memorization_backbone not in backbones:
            raise ConfigError("memorization_backbone", f"{config.memorization_backbone!r} is not available; "
                                                       f"available: {sorted(backbones) or 'none'}")
        return config.memorization_backbone
    if "medaug" in backbones:
        return "medaug"
    return next(iter(backbones), None)


# ---------------------------------------------------------------------------------------------- efficiency


def recorded_seconds_per_image(synthetic: Path) -> float | None:
    """Seconds per image from ``synthesize.json``, None when not recorded: ``seconds_per_image`` (top level
    or under ``timing``), else ``images_per_second``, else ``timing.seconds_rank0 / timing.generated_rank0``
    (what ``medaug synthesize`` records: rank 0's wall-clock time per image it made, sampling, decoding
    and export included)."""
    from medaug.synth.layout import SYNTHESIZE_JSON

    path = synthetic / SYNTHESIZE_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    for section in (record, record.get("timing") or {}):
        if isinstance(section.get("seconds_per_image"), (int, float)):
            return float(section["seconds_per_image"])
        rate = section.get("images_per_second")
        if isinstance(rate, (int, float)) and rate > 0:
            return 1.0 / float(rate)
    timing = record.get("timing") or {}
    seconds, generated = timing.get("seconds_rank0"), timing.get("generated_rank0")
    if isinstance(seconds, (int, float)) and isinstance(generated, int) and generated > 0:
        return float(seconds) / generated
    return None


def efficiency(distribution: dict[str, Any], seconds_per_image: float | None, gamma: float) -> dict[str, Any]:
    """Per backbone: MedVAR's efficiency with Q the overall FID (units: FID units · ln(1 + s/image)^γ)."""
    from medaug.eval.metrics import medvar_efficiency

    if seconds_per_image is None:
        return {"status": "unavailable", "reason": "seconds per image not given and not in synthesize.json"}
    result: dict[str, Any] = {"status": "available", "seconds_per_image": seconds_per_image, "gamma": gamma,
                              "quality_metric": "fid", "formula": "Q * ln(1 + P)^gamma, P in seconds per image",
                              "backbones": {}}
    for name, scored in distribution.items():
        quality = (scored["overall"].get("fid") or {}).get("value")
        if quality is not None:
            result["backbones"][name] = {"quality": quality, "value": medvar_efficiency(quality, seconds_per_image, gamma)}
    return result


# ---------------------------------------------------------------------------------------------- the stage


def evaluate_metrics(
    real: str | Path,
    synthetic: str | Path,
    backbones: Mapping[str, str | Path | None] | None,
    out: str | Path,
    split: str = "test",
    config: EvaluateConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``synthetic`` (a folder of ``medaug synthesize``) against the ``split`` rows of the real
    prepared dataset ``real`` (module docstring) and write the report into ``out``.

    ``backbones``: {name: weights path or None} for names of :data:`~medaug.eval.features.BACKBONES`;
    names left out are reported unavailable. Raises :class:`~medaug.eval.lineage.LineageError` when the
    real rows overlap the generator's training patients (unless ``config.allow_overlap``), ConfigError for
    bad inputs. Returns what ``out/metrics.json`` holds.
    """
    from medaug.eval.lineage import check_lineage
    from medaug.eval.report import write_report

    config = config or EvaluateConfig()
    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    _check_inputs(real, synthetic, split)
    step = _stepper(progress)
    step("lineage")
    lineage = check_lineage(real, synthetic, split, config.allow_overlap).to_dict()
    datasets = open_datasets(real, synthetic, split)
    step("backbones")
    loaded, backbone_records = load_backbones(backbones or {}, config.device)
    distribution = _distribution(loaded, datasets, config, step)
    out.mkdir(parents=True, exist_ok=True)
    step("memorization")
    memorization, records, inputs = run_memorization(memorization_reference(real, lineage), datasets, loaded, config, out)
    step("fidelity")
    from medaug.eval.fidelity import compare_intensity

    fidelity = compare_intensity(datasets["real"], datasets["synthetic"], config.fidelity)
    seconds = config.seconds_per_image if config.seconds_per_image is not None else recorded_seconds_per_image(synthetic)
    result = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "real": str(real),
              "synthetic": str(synthetic), "split": split, "counts": {k: len(v) for k, v in datasets.items()},
              "lineage": lineage, "backbones": backbone_records, "distribution": distribution,
              "memorization": memorization, "fidelity": fidelity,
              "efficiency": efficiency(distribution, seconds, config.efficiency_gamma), "config": _config_dict(config)}
    step("report")
    write_report(result, out, datasets, memorization_records=records, memorization_inputs=inputs,
                 grid_per_domain=config.grid_per_domain, with_figures=config.figures)
    return result


def _distribution(loaded: dict[str, Backbone], datasets: dict[str, PreparedSliceDataset], config: EvaluateConfig,
                  step: Callable[[str], None]) -> dict[str, Any]:
    from medaug.eval.features import extract_features

    real_groups = row_groups(datasets["real"], config.per_structure)
    synthetic_groups = row_groups(datasets["synthetic"], config.per_structure)
    distribution = {}
    for name, backbone in loaded.items():
        step(f"features {name}")
        real_ND = extract_features(backbone, datasets["real"], config.batch_size)
        synthetic_MD = extract_features(backbone, datasets["synthetic"], config.batch_size)
        step(f"metrics {name}")
        distribution[name] = score_groups(real_ND, synthetic_MD, real_groups, synthetic_groups, config)
    if not loaded:
        log.warning("no feature backbone available: distribution metrics skipped (supply --backbone NAME=PATH)")
    return distribution


def _stepper(progress: Progress | None) -> Callable[[str], None]:
    """A ``step(stage)`` that logs and reports stages in order (the total is not known ahead)."""
    count = [0]

    def step(stage: str) -> None:
        count[0] += 1
        log.info("evaluate: %s", stage)
        if progress is not None:
            progress(stage, count[0], 0)

    return step


def _config_dict(config: EvaluateConfig) -> dict[str, Any]:
    from medaug.config.base import to_dict

    return to_dict(config)


__all__ = [
    "EvaluateConfig",
    "efficiency",
    "evaluate_metrics",
    "load_backbones",
    "memorization_reference",
    "open_datasets",
    "recorded_seconds_per_image",
    "row_groups",
    "run_memorization",
    "score_groups",
]
