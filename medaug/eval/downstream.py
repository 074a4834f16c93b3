"""``medaug evaluate downstream``: does synthetic data help a segmentation model on real data? (issue 11)

:func:`evaluate_downstream` trains the same 2D UNet (:mod:`medaug.eval.segmentation`) for the same number of
optimizer steps in every cell of a grid and scores it on the real test split:

* arms: ``real`` (a fraction of the real train split), ``real+synthetic`` (that fraction mixed with synthetic
  slices at a fixed synthetic ratio, :class:`~medaug.monai.MixedDataset`) and ``synthetic`` (synthetic slices
  only; it ignores the fraction, so it runs once per seed);
* fractions of the real train split, taken by whole patient groups (:func:`subset_groups`: at least one
  group, chosen by the seed, nested: for one seed a larger fraction keeps every group of a smaller one);
* seeds 0..n-1: each fixes the UNet's initialisation, the sampling order, the augmentation and the group
  subset, so the spread over seeds covers both the training noise and which patients were drawn.

Each run gives per structure Dice and HD95 (mm) on the real test split and a learning curve (Dice on the real
val split). Cells aggregate mean ± sd (sample sd, n - 1) over seeds. Mask fidelity
(:func:`~medaug.eval.segmentation.mask_fidelity`) uses the real-only model at fraction 1.0, seed 0. The real
test rows must not hold patients the generator was trained on (:mod:`medaug.eval.lineage`).

Output folder: ``downstream.json`` (every number; non-finite values as null), ``report.md``, ``report.html``
(the blocks of :mod:`medaug.eval.report`) and ``learning_curves.png``, each written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medaug.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from medaug.eval.report import Block
    from medaug.monai import SliceDataset, SyntheticDataset

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
ARM_REAL = "real"
ARM_MIXED = "real+synthetic"
ARM_SYNTHETIC = "synthetic"
ARMS: tuple[str, ...] = (ARM_REAL, ARM_MIXED, ARM_SYNTHETIC)
DOWNSTREAM_JSON = "downstream.json"
CURVES_PNG = "learning_curves.png"
FIDELITY_RUN = (ARM_REAL, 1.0, 0)  # (arm, fraction, seed) of the model that judges the generated masks


@dataclass(frozen=True)
class DownstreamConfig:
    """Every knob of :func:`evaluate_downstream` besides its inputs.

    ``structures``: vocabulary names to segment (each one class; sub-structures count as it); ``steps``:
    optimizer steps of every run; ``seeds``: runs per cell (seeds 0..seeds-1); ``fractions``: shares of the
    real train split's patient groups, in (0, 1]; ``ratios``: synthetic shares of the ``real+synthetic``
    arm, in (0, 1); ``arms``: of :data:`ARMS`; ``batch_size``, ``lr``: AdamW on Dice + cross-entropy;
    ``eval_every``: steps between learning-curve points (None: a tenth of ``steps``); ``device``: ``auto``,
    ``cpu``, ``cuda``...; ``unet_channels``: UNet widths per level; ``augment``: random affine + noise;
    ``allow_overlap``: run even when the real test rows hold training patients of the generator (flagged);
    ``num_workers``: DataLoader workers (0 keeps runs bit-exact on the CPU).
    """

    structures: tuple[str, ...]
    steps: int = 500
    seeds: int = 3
    fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    ratios: tuple[float, ...] = (0.5,)
    arms: tuple[str, ...] = ARMS
    batch_size: int = 16
    lr: float = 1e-3
    eval_every: int | None = None
    device: str = "auto"
    unet_channels: tuple[int, ...] = (16, 32, 64, 128)
    augment: bool = True
    allow_overlap: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("structures", "fractions", "ratios", "arms", "unet_channels"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int, float)) else tuple(value))
        self._check_counts()
        self._check_grid()

    def _check_counts(self) -> None:
        if not self.structures:
            raise ConfigError("structures", "is empty; expected vocabulary names, e.g. ['prostate']")
        for name in ("steps", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}; expected >= 1")
        if not self.lr > 0:
            raise ConfigError("lr", f"is {self.lr}; expected > 0")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError("eval_every", f"is {self.eval_every}; expected >= 1 or None")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"is {self.num_workers}; expected >= 0")

    def _check_grid(self) -> None:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ConfigError("fractions", f"is {list(self.fractions)}; expected fractions in (0, 1], e.g. 0.1,0.25,1")
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise ConfigError("ratios", f"is {list(self.ratios)}; expected synthetic shares in (0, 1), e.g. 0.5")
        if not self.arms or any(arm not in ARMS for arm in self.arms) or len(set(self.arms)) < len(self.arms):
            raise ConfigError("arms", f"is {list(self.arms)}; allowed values: {', '.join(ARMS)} (each once)")

    @property
    def curve_every(self) -> int:
        """Steps between learning-curve points."""
        return self.eval_every if self.eval_every is not None else max(1, self.steps // 10)


# ---------------------------------------------------------------------------------------------- inputs


def annotated_structures(real: str | Path) -> list[str]:
    """Vocabulary names that some row of ``real`` annotates (itself, through an ancestor, or through all of
    its children): the valid ``structures``."""
    from medaug import vocab
    from medaug.data.index import read_index
    from medaug.data.shards import index_file
    from medaug.monai import class_labels

    sets = {tuple(names or ()) for names in read_index(index_file(real), columns=["structures_annotated"])
            .column("structures_annotated").to_pylist()}
    candidates = {name for names in sets for item in names for name in (item, *vocab.ancestors(item))}
    return sorted(name for name in candidates if any(class_labels([name]).covered_by(names) for names in sets))


def structure_domains(real: str | Path, structures: Sequence[str]) -> list[str]:
    """Sorted domains of ``real`` whose rows annotate at least one of ``structures``; raises ConfigError
    (listing the valid names) for a name that no domain annotates or that is not in the vocabulary."""
    from medaug import vocab
    from medaug.monai import annotating_domains

    domains: set[str] = set()
    for name in structures:
        known = name in vocab.VOCABULARY
        found = annotating_domains(real, [name]) if known else []
        if not found:
            problem = f"no domain of {real} annotates it" if known else "is not a vocabulary name"
            valid = ", ".join(annotated_structures(real)) or "none"
            raise ConfigError("structure", f"{name!r}: {problem}; valid names: {valid}")
        domains.update(found)
    return sorted(domains)


def check_folders(real: Path, synthetic: Path) -> None:
    """Refuse a ``real`` folder without ``index.parquet`` and a ``synthetic`` one without ``manifest.parquet``."""
    from medaug.data.shards import INDEX_FILE, MANIFEST_FILE

    if not (real / INDEX_FILE).is_file():
        raise ConfigError(real, f"no {INDEX_FILE}; expected a prepared dataset folder (medaug prepare --out)")
    if not (synthetic / MANIFEST_FILE).is_file():
        raise ConfigError(synthetic, f"no {MANIFEST_FILE}; expected a synthetic folder (medaug synthesize --out)")


@dataclass
class DownstreamData:
    """The datasets of one evaluation (labels: consecutive ids of ``classes``, 255 ignore): the real train,
    val and test splits of ``domains``, ``train_groups_N`` each train row's patient group, and the synthetic
    rows of ``domains``."""

    classes: tuple[str, ...]
    domains: list[str]
    train: SliceDataset
    train_groups_N: np.ndarray
    val: SliceDataset
    test: SliceDataset
    synthetic: SyntheticDataset


def row_groups(dataset: SliceDataset) -> np.ndarray:
    """(N,) object array: the ``patient_group`` of each row of ``dataset``, in its order."""
    from medaug.data.index import read_index
    from medaug.data.shards import index_file

    index = read_index(index_file(dataset.root), columns=["slice_id", "patient_group"])
    lookup = dict(zip(index.column("slice_id").to_pylist(), index.column("patient_group").to_pylist()))
    return np.array([lookup[slice_id] for slice_id in dataset.base.rows.column("slice_id").to_pylist()], dtype=object)


def open_data(real: Path, synthetic: Path, structures: Sequence[str], domains: list[str]) -> DownstreamData:
    """The datasets of :class:`DownstreamData`; raises ConfigError for an empty test or train split or no
    synthetic rows of the domains. One domain keeps its channels; several share the largest count, zero-filled."""
    from medaug.monai import SliceDataset, SyntheticDataset

    options = {"domains": domains, "channels": "domain" if len(domains) == 1 else "max", "classes": list(structures)}
    splits = {split: SliceDataset(real, split=split, **options) for split in ("train", "val", "test")}
    for split in ("test", "train"):
        if len(splits[split]) == 0:
            raise ConfigError(f"{real} split {split!r}",
                              f"has no slices of {', '.join(domains)}; expected {split} rows")
    if len(splits["val"]) == 0:
        log.warning("%s has no val slices of %s: learning curves show the training loss only", real, domains)
    generated = SyntheticDataset(synthetic, **options)
    if len(generated) == 0:
        raise ConfigError(synthetic, f"has no samples of {', '.join(domains)}; "
                                     "expected synthetic slices of those domains")
    generated = match_size(generated, tuple(splits["test"][0]["image"].shape[-2:]))
    return DownstreamData(tuple(splits["test"].class_names), domains, splits["train"], row_groups(splits["train"]),
                          splits["val"], splits["test"], generated)


def match_size(synthetic: Dataset, size_HW: tuple[int, int]) -> Dataset:
    """``synthetic`` resampled to the real slices' ``size_HW`` when its side differs (a generator trained at
    64² evaluated against data prepared at 256²): images area/bilinear, labels nearest, as one dataset."""
    from monai.transforms import Resized

    from medaug.eval.segmentation import AugmentedDataset

    own = tuple(synthetic[0]["image"].shape[-2:])
    if own == size_HW:
        return synthetic
    log.info("synthetic slices are %s, real %s: resampling the synthetic ones", own, size_HW)
    mode = ("area" if own[0] > size_HW[0] else "bilinear", "nearest")
    return AugmentedDataset(synthetic, Resized(keys=["image", "label"], spatial_size=size_HW, mode=mode))


# ---------------------------------------------------------------------------------------------- the grid


def subset_groups(groups: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``ceil(fraction × G)`` of the G distinct ``groups`` (at least one), sorted: the first ones of a
    shuffle of the sorted groups by ``seed``, so for one seed a larger fraction keeps every smaller one's."""
    distinct = sorted(set(groups))
    if not distinct:
        raise ConfigError("groups", "is empty; expected patient groups of the real train split")
    count = max(1, math.ceil(fraction * len(distinct) - 1e-9))
    order = np.random.default_rng(seed).permutation(len(distinct))
    return sorted(distinct[int(i)] for i in order[:count])


def fraction_rows(groups_N: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(M,) int64 positions of the rows whose group :func:`subset_groups` keeps (whole groups only)."""
    chosen = set(subset_groups(groups_N.tolist(), fraction, seed))
    return np.flatnonzero(np.array([group in chosen for group in groups_N], dtype=bool))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: ``fraction`` None for the synthetic arm, ``ratio`` only for the mix."""

    arm: str
    fraction: float | None
    ratio: float | None
    seed: int

    @property
    def cell(self) -> tuple[str, float | None, float | None]:
        return self.arm, self.fraction, self.ratio


def plan_runs(config: DownstreamConfig) -> list[RunSpec]:
    """Every run of the grid, arm by arm, then fraction, ratio and seed."""
    runs = []
    for arm in config.arms:
        fractions = (None,) if arm == ARM_SYNTHETIC else config.fractions
        ratios = config.ratios if arm == ARM_MIXED else (None,)
        runs += [RunSpec(arm, f, r, seed) for f in fractions for r in ratios for seed in range(config.seeds)]
    return runs


def train_set(data: DownstreamData, spec: RunSpec) -> tuple[Dataset, dict[str, Any]]:
    """The training data of a run and its counts: real groups, and real/synthetic items per epoch."""
    from torch.utils.data import Subset

    from medaug.monai import MixedDataset

    if spec.arm == ARM_SYNTHETIC:
        return data.synthetic, {"train_groups": None, "n_train_real": 0, "n_train_synthetic": len(data.synthetic)}
    rows = fraction_rows(data.train_groups_N, spec.fraction, spec.seed)
    real = Subset(data.train, rows.tolist())
    counts = {"train_groups": len(set(data.train_groups_N[rows].tolist())), "n_train_real": len(real),
              "n_train_synthetic": 0}
    if spec.arm == ARM_REAL:
        return real, counts
    mixed = MixedDataset(real, data.synthetic, synthetic_fraction=spec.ratio, seed=spec.seed)
    return mixed, {**counts, "n_train_real": mixed.n_real, "n_train_synthetic": mixed.n_synthetic}


def run_one(data: DownstreamData, spec: RunSpec, config: DownstreamConfig) -> tuple[dict[str, Any], Any]:
    """Train one run and score it on the real test split: (record, model)."""
    from medaug.eval.segmentation import mean_over_classes, predict, score_segmentation, train_segmenter

    started = time.perf_counter()
    dataset, counts = train_set(data, spec)
    model, curve = train_segmenter(dataset, steps=config.steps, seed=spec.seed, batch_size=config.batch_size,
                                   lr=config.lr, device=config.device, eval_set=data.val if len(data.val) else None,
                                   eval_every=config.curve_every, augment=config.augment, channels=config.unet_channels,
                                   class_names=data.classes, num_workers=config.num_workers)
    predicted = predict(model, data.test, config.batch_size, config.device)
    scores = score_segmentation(predicted.pred_NHW, predicted.label_NHW, data.classes, predicted.spacing_N2)
    record = {"arm": spec.arm, "fraction": spec.fraction, "ratio": spec.ratio, "seed": spec.seed, **counts,
              "steps": config.steps, "dice": mean_over_classes(scores, "dice"),
              "hd95_mm": mean_over_classes(scores, "hd95_mm"), "structures": scores, "curve": curve,
              "seconds": round(time.perf_counter() - started, 2)}
    log.info("downstream %s fraction %s ratio %s seed %d: dice %s", spec.arm, spec.fraction, spec.ratio, spec.seed,
             record["dice"])
    return record, model


# ---------------------------------------------------------------------------------------------- aggregation


def mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "n"}`` of the values that are not None: sample sd (n - 1; None below two values)."""
    present = np.array([value for value in values if value is not None], dtype=np.float64)
    mean = float(present.mean()) if present.size else None
    sd = float(present.std(ddof=1)) if present.size > 1 else None
    return {"mean": mean, "sd": sd, "n": int(present.size)}


def aggregate(runs: Sequence[dict[str, Any]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """One cell per (arm, fraction, ratio), in run order: mean ± sd over seeds of the class-mean Dice and
    HD95, of each structure's, and of the training items per epoch."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["arm"], run["fraction"], run["ratio"]), []).append(run)
    aggregated = []
    for (arm, fraction, ratio), members in cells.items():
        structures = {name: {metric: mean_sd([run["structures"][name][metric] for run in members])
                             for metric in ("dice", "hd95_mm")} for name in classes}
        aggregated.append({"arm": arm, "fraction": fraction, "ratio": ratio, "n_seeds": len(members),
                           "seeds": [run["seed"] for run in members],
                           "dice": mean_sd([run["dice"] for run in members]),
                           "hd95_mm": mean_sd([run["hd95_mm"] for run in members]), "structures": structures,
                           "n_train_real": mean_sd([run["n_train_real"] for run in members])["mean"],
                           "n_train_synthetic": mean_sd([run["n_train_synthetic"] for run in members])["mean"]})
    return aggregated


# ---------------------------------------------------------------------------------------------- the stage


def evaluate_downstream(real: str | Path, synthetic: str | Path, config: DownstreamConfig,
                        out: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid of :class:`DownstreamConfig` (module docstring) on the real prepared dataset ``real`` and
    the synthetic folder ``synthetic``; with ``out``, write ``downstream.json``, ``report.md``, ``report.html``
    and the learning-curve plot there. Returns what ``downstream.json`` holds.

    Raises ConfigError for missing folders, unknown or unannotated structures and empty splits, and
    :class:`~medaug.eval.lineage.LineageError` when the real test rows hold the generator's training
    patients (unless ``config.allow_overlap``)."""
    from medaug.eval.lineage import check_lineage
    from medaug.eval.report import json_safe

    real, synthetic = Path(real), Path(synthetic)
    check_folders(real, synthetic)
    domains = structure_domains(real, config.structures)
    lineage = check_lineage(real, synthetic, "test", config.allow_overlap).to_dict()
    data = open_data(real, synthetic, config.structures, domains)
    runs, fidelity_model = _run_grid(data, config, progress)
    result = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "real": str(real),
              "synthetic": str(synthetic), "structures": list(config.structures), "classes": list(data.classes),
              "domains": domains, "lineage": lineage, "counts": _counts(data), "config": _config_dict(config),
              "runs": runs, "cells": aggregate(runs, data.classes),
              "mask_fidelity": _fidelity(fidelity_model, data, config, progress)}
    result = json_safe(result)
    if out is not None:
        result["files"] = write_downstream_report(result, Path(out))
    return result


def _run_grid(data: DownstreamData, config: DownstreamConfig,
              progress: Progress | None) -> tuple[list[dict[str, Any]], Any]:
    """Every planned run's record, and the model for mask fidelity (trained extra when the grid lacks it)."""
    specs = plan_runs(config)
    fidelity_spec = RunSpec(FIDELITY_RUN[0], FIDELITY_RUN[1], None, FIDELITY_RUN[2])
    total = len(specs) + (fidelity_spec not in specs)
    runs, fidelity_model = [], None
    for done, spec in enumerate(specs):
        if progress is not None:
            progress(_stage(spec), done, total)
        record, model = run_one(data, spec, config)
        runs.append(record)
        if spec == fidelity_spec:
            fidelity_model = model
    if fidelity_model is None:
        if progress is not None:
            progress(f"mask fidelity model ({_stage(fidelity_spec)})", len(specs), total)
        fidelity_model = run_one(data, fidelity_spec, config)[1]
    return runs, fidelity_model


def _stage(spec: RunSpec) -> str:
    where = "" if spec.fraction is None else f" fraction {spec.fraction:g}"
    mix = "" if spec.ratio is None else f" ratio {spec.ratio:g}"
    return f"{spec.arm}{where}{mix} seed {spec.seed}"


def _fidelity(model: Any, data: DownstreamData, config: DownstreamConfig, progress: Progress | None) -> dict[str, Any]:
    from medaug.eval.segmentation import mask_fidelity

    if progress is not None:
        progress("mask fidelity", 0, 0)
    scores = mask_fidelity(model, data.test, data.synthetic, data.classes, config.batch_size, config.device,
                           seed=FIDELITY_RUN[2])
    arm, fraction, seed = FIDELITY_RUN
    return {"model": {"arm": arm, "fraction": fraction, "seed": seed}, "structures": scores}


def _counts(data: DownstreamData) -> dict[str, int]:
    return {"real_train": len(data.train), "real_train_groups": len(set(data.train_groups_N.tolist())),
            "real_val": len(data.val), "real_test": len(data.test), "synthetic": len(data.synthetic)}


def _config_dict(config: DownstreamConfig) -> dict[str, Any]:
    from medaug.config.base import to_dict

    return {**to_dict(config), "curve_every": config.curve_every}


# ---------------------------------------------------------------------------------------------- the report


def _plus_minus(entry: dict[str, Any]) -> str:
    from medaug.eval.report import format_number

    if entry.get("mean") is None:
        return "-"
    if entry.get("sd") is None:
        return format_number(entry["mean"])
    return f"{format_number(entry['mean'])} ± {format_number(entry['sd'])}"


def _cell_name(cell: dict[str, Any]) -> tuple[str, str, str]:
    from medaug.eval.report import format_number

    fraction = "-" if cell["fraction"] is None else format_number(cell["fraction"])
    ratio = "-" if cell["ratio"] is None else format_number(cell["ratio"])
    return cell["arm"], fraction, ratio


def small_data_sentence(result: dict[str, Any]) -> str:
    """What the numbers mean when the real data is small, in one sentence."""
    from medaug.eval.report import format_number

    config, counts = result["config"], result["counts"]
    smallest = min(config["fractions"])
    groups = max(1, math.ceil(smallest * counts["real_train_groups"] - 1e-9))
    return (f"With {counts['real_train_groups']} real training patient groups (fraction {format_number(smallest)} "
            f"trains on {groups}) and {config['seeds']} seeds, each sd is the noise of the seed and of which patients "
            "were drawn: a difference between arms smaller than their sds is not evidence that synthetic data helps "
            "or hurts, and a small test split makes every mean uncertain too.")


def segmentation_blocks(result: dict[str, Any], figure: Path | None) -> list[Block]:
    """The arm × fraction table, the per-structure table, the small-data sentence and the learning curves."""
    from medaug.eval.report import Block, format_number, table

    rows = [(*_cell_name(cell), format_number(cell["n_train_real"]), format_number(cell["n_train_synthetic"]),
             _plus_minus(cell["dice"]), _plus_minus(cell["hd95_mm"]), cell["n_seeds"]) for cell in result["cells"]]
    structure_rows = [(*_cell_name(cell), name, _plus_minus(entry["dice"]), _plus_minus(entry["hd95_mm"]),
                       entry["dice"]["n"]) for cell in result["cells"] for name, entry in cell["structures"].items()]
    blocks = [Block("h2", "Segmentation on the real test split"),
              Block("p", f"A UNet trained for {result['config']['steps']} steps per run, scored on "
                         f"{result['counts']['real_test']} real test slices. Dice: mean over the test slices that "
                         "hold the structure; HD95 (mm): mean over the slices where both prediction and truth hold "
                         "it; both leave out pixels labelled ignore and average over structures; mean ± sd over "
                         "seeds (n). Train slices: items per epoch, mean over seeds."),
              table("Dice and HD95 per arm and fraction of the real train split",
                    ("arm", "real fraction", "synthetic ratio", "real train slices", "synthetic train slices",
                     "Dice", "HD95 (mm)", "n"), rows),
              table("Per structure", ("arm", "real fraction", "synthetic ratio", "structure", "Dice", "HD95 (mm)", "n"),
                    structure_rows),
              Block("p", small_data_sentence(result))]
    if figure is not None:
        blocks.append(Block("image", "Learning curves: Dice on the real val split (mean over seeds), one line per arm",
                            path=figure))
    return blocks


def fidelity_blocks(result: dict[str, Any]) -> list[Block]:
    """The mask-fidelity table and how to read it."""
    from medaug.eval.report import Block, table

    record = result["mask_fidelity"]
    rows = [(name, entry["synthetic_dice"], entry["real_test_dice"], entry["shuffled_real_dice"], entry["n_synthetic"],
             entry["n_real"]) for name, entry in record["structures"].items()]
    model = record["model"]
    return [Block("h2", "Mask fidelity"),
            Block("p", f"The {model['arm']}-only UNet (fraction {model['fraction']:g}, seed {model['seed']}) segments "
                       "the synthetic images; Dice against the generated masks near its Dice on real test slices means "
                       "the masks match what the images show as well as real masks do; near the shuffled baseline (its "
                       "real test predictions against masks of other real test slices of the same domain) means no "
                       "better than what position alone explains."),
            table("Mask fidelity per structure", ("structure", "synthetic Dice", "real test Dice", "shuffled real Dice",
                                                  "n synthetic", "n real"), rows)]


def report_blocks(result: dict[str, Any], figure: Path | None) -> list[Block]:
    """The whole downstream report, in reading order."""
    from medaug.eval.report import Block

    counts, lineage = result["counts"], result["lineage"]
    header = [Block("h1", "medaug downstream segmentation report"),
              Block("p", f"Real: {result['real']} ({counts['real_train']} train slices in "
                         f"{counts['real_train_groups']} patient groups, {counts['real_val']} val, "
                         f"{counts['real_test']} test). Synthetic: {result['synthetic']} ({counts['synthetic']} "
                         f"slices). Structures: {', '.join(result['structures'])}; domains: {', '.join(result['domains'])}. "
                         f"Created {result['created_at']}."),
              Block("h2", "Lineage"),
              Block("p", f"Status: {lineage['status'].upper()}. {lineage['message']}")]
    return [*header, *segmentation_blocks(result, figure), *fidelity_blocks(result)]


def _mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean over runs of ``key`` at each step; NaN where no run has it)."""
    steps = sorted({point["step"] for run in runs for point in run["curve"]})
    values = [[point[key] for run in runs for point in run["curve"] if point["step"] == step and point[key] is not None]
              for step in steps]
    return np.array(steps, dtype=float), np.array([np.mean(v) if v else np.nan for v in values], dtype=float)


def plot_learning_curves(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One panel per real fraction, one line per arm (and ratio): val Dice (else training loss) against step,
    mean over seeds; the synthetic arm, which has no fraction, is drawn in every panel. Written atomically."""
    from medaug.eval.report import _pyplot
    from medaug.io.atomic import atomic_output

    if not runs:
        return None
    key = "val_dice" if any(p["val_dice"] is not None for run in runs for p in run["curve"]) else "loss"
    fractions = sorted({run["fraction"] for run in runs if run["fraction"] is not None}) or [None]
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 3.2), squeeze=False)
    for axis, fraction in zip(axes[0], fractions):
        lines: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            if run["fraction"] in (fraction, None):
                label = run["arm"] if run["ratio"] is None else f"{run['arm']} {run['ratio']:g}"
                lines.setdefault(label, []).append(run)
        for label, members in lines.items():
            axis.plot(*_mean_curve(members, key), marker="o", markersize=3, label=label)
        axis.set_title("synthetic only" if fraction is None else f"real fraction {fraction:g}", fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.set_ylabel("val Dice" if key == "val_dice" else "training loss", fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return path


def write_downstream_report(result: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``downstream.json``, ``report.md``, ``report.html`` and the learning curves into ``out``
    (atomically); returns {kind: file name}, also stored in the JSON as ``files``."""
    from medaug.eval.report import REPORT_HTML, REPORT_MD, write_report_files

    out.mkdir(parents=True, exist_ok=True)
    figure = plot_learning_curves(result["runs"], out / CURVES_PNG)
    files = {"json": DOWNSTREAM_JSON, "markdown": REPORT_MD, "html": REPORT_HTML}
    if figure is not None:
        files["figure:learning_curves"] = figure.name
    result["files"] = files
    write_report_files(out, DOWNSTREAM_JSON, result, report_blocks(result, figure), "medaug downstream report")
    return files


__all__ = [
    "ARMS",
    "DOWNSTREAM_JSON",
    "DownstreamConfig",
    "DownstreamData",
    "RunSpec",
    "aggregate",
    "annotated_structures",
    "evaluate_downstream",
    "fraction_rows",
    "mean_sd",
    "open_data",
    "plan_runs",
    "plot_learning_curves",
    "report_blocks",
    "row_groups",
    "structure_domains",
    "subset_groups",
    "train_set",
    "write_downstream_report",
]
