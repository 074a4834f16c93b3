"""medaug's own feature encoder: its recipe, :class:`FeaturesTask` for the engine, :func:`train_features`
and :func:`load_feature_net` (issue 10: an offline default backbone for every metric).

The encoder (:class:`~medaug.eval.nets.FeatureNet`, a small GroupNorm ResNet) reads model-space slices
of the prepared train split (all channels of a domain, with the channel mask) and learns two things at
once from one pooled feature vector:

* the slice's domain (cross-entropy over the prepared dataset's domains), and
* which structures are present (binary cross-entropy per structure of the structure table, counted only
  where the row annotates the structure: "not annotated" is never "absent"), for the whole slice and for
  each cell of the encoder's coarse grid (e.g. 4x4 cells of 16² pixels at 64²; a cell holding an ignore
  pixel is left out; cells read the label map at the encoder's resolution, slices the index's
  full-resolution ``structures_present``). The slice logit is the smooth maximum of the cell logits
  (:class:`~medaug.eval.nets.FeatureNet`); the dense cell targets teach small structures from few slices:
  on the phantoms they lifted held-out macro AUROC from about 0.90 to 0.95-0.99.

So its features separate modality/region and anatomy, which is what the distribution metrics compare.
After training, :meth:`FeaturesTask.evaluate` scores the held-out split (val, or test when val is empty;
train only as a last resort, flagged ``held_out: false``): per-structure and macro AUROC of structure
presence (over rows that annotate the structure, structures with both classes there) and domain accuracy;
the result goes into ``RUN/metrics.json`` and the final checkpoint's meta.json (``evaluation``), so a
report can show that the backbone is not a random network.

One recipe (``recipes/models/features*.yaml``), loaded with :func:`load_features_recipe`: ``model``
(:class:`~medaug.eval.nets.FeatureNetConfig` without ``image_channels``, ``num_domains`` and
``num_structures``, which come from the data), ``train`` (the engine's TrainConfig; optimizer ``encoder``),
``loss`` (:class:`FeatureLossConfig`) and ``eval`` (:class:`FeatureEvalConfig`).

Several processes (torchrun): the structure term is a mean over annotated (row, structure) pairs, which
and the region term over annotated (cell, structure) pairs differ between ranks; both are rescaled with
:func:`~medaug.train.tokenizer.global_mean_factors` so DDP's gradient average is the gradient of the
global-batch mean.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medaug.config.base import from_dict, recipe_data, to_dict
from medaug.config.overrides import apply_overrides
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.structures import (
    DOMAINS_FILE,
    StructureSliceDataset,
    StructureTable,
    names_matrix,
    read_domain_names,
    read_row_column,
    read_structure_table,
)
from medaug.errors import ConfigError
from medaug.vocab import IGNORE
from medaug.eval.nets import FeatureNet, FeatureNetConfig
from medaug.train.engine import TrainConfig, unwrap
from medaug.train.tokenizer import global_mean_factors, resolve_model_recipe, train_then_evaluate

log = logging.getLogger(__name__)

RECIPE_FILE = "features_recipe.json"
METRICS_FILE = "metrics.json"
FILLED_FROM_DATA = ("image_channels", "num_domains", "num_structures")
"""``model`` keys the prepared dataset decides; a recipe that sets them is refused."""


@dataclass(frozen=True)
class FeatureLossConfig:
    """Weights of the terms: ``domain`` (cross-entropy), ``structures`` (masked multi-label BCE per slice)
    and ``regions`` (the same per cell of the encoder's grid)."""

    domain: float = 1.0
    structures: float = 1.0
    regions: float = 1.0

    def __post_init__(self) -> None:
        weights = (self.domain, self.structures, self.regions)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError("loss", f"weights domain={self.domain}, structures={self.structures}, regions="
                                      f"{self.regions}; expected non-negative weights, not all 0")


@dataclass(frozen=True)
class FeatureEvalConfig:
    """Held-out evaluation: ``batch_size`` slices per forward, at most ``max_slices`` (evenly spaced) slices."""

    batch_size: int = 64
    max_slices: int = 4096

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_slices < 1:
            raise ConfigError("eval", f"batch_size {self.batch_size} / max_slices {self.max_slices}; expected >= 1")


@dataclass(frozen=True)
class FeaturesRecipe:
    """Everything ``medaug train features`` needs besides the data (module docstring)."""

    model: FeatureNetConfig = field(default_factory=FeatureNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    eval: FeatureEvalConfig = field(default_factory=FeatureEvalConfig)


def load_features_recipe(recipe: str | Path | FeaturesRecipe | dict, overrides: Sequence[str] = ()) -> FeaturesRecipe:
    """A typed recipe from a YAML file (path or name under recipes/models), a dict or a recipe, with
    ``key=value`` overrides. Unknown keys, and the data's keys (``FILLED_FROM_DATA``), raise ConfigError."""
    data, where = recipe_data(recipe, FeaturesRecipe, recipe_to_dict, resolve_model_recipe)
    data = apply_overrides(data, overrides, FeaturesRecipe)
    model = data.get("model") or {}
    for key in FILLED_FROM_DATA:
        if isinstance(model, dict) and key in model:
            raise ConfigError(f"{where}.model.{key}", "is filled from the prepared dataset; remove it from the recipe")
    return from_dict(FeaturesRecipe, data, where)


def recipe_to_dict(recipe: FeaturesRecipe) -> dict[str, Any]:
    """The recipe as plain data without the keys the data fills (what ``features_recipe.json`` holds; it reloads)."""
    data = to_dict(recipe)
    for key in FILLED_FROM_DATA:
        data["model"].pop(key, None)
    return data


# ---------------------------------------------------------------- data


class FeatureSliceDataset(Dataset):
    """:class:`StructureSliceDataset` items (image, channel_mask, label, annotated, domain_index, index) plus
    ``present`` (S,) bool: the row's ``structures_present`` among the table's structures (full-resolution
    truth from the index, so a structure that shrinks below a pixel on downsampling still counts)."""

    def __init__(self, base: StructureSliceDataset):
        self.base = base
        present = read_row_column(base.base, "structures_present")
        self._present_NS = torch.from_numpy(names_matrix(present, base.table))

    def __len__(self) -> int:
        return len(self.base)

    def read_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """(B, ...) tensors of the rows at ``indices`` (keys above)."""
        batch = self.base.read_batch(indices)
        batch["present"] = self._present_NS[batch["index"]] & batch["annotated"]
        return batch

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.read_batch([int(item)]).items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        batch = self.read_batch(indices)
        return [{key: value[position] for key, value in batch.items()} for position in range(len(indices))]


def feature_dataset(data: Path, split: str, table: StructureTable, domains: Sequence[str],
                    image_size: int) -> FeatureSliceDataset:
    """The ``split`` rows of prepared dataset ``data`` as the encoder reads them."""
    base = PreparedSliceDataset(data, split=split)
    return FeatureSliceDataset(StructureSliceDataset(base, table, domains, image_size))


# ---------------------------------------------------------------- losses and metrics


def region_targets(label_BHW: torch.Tensor, num_structures: int,
                   grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell of a ``grid`` (h, w) over model-local labels (B, H, W): (present (B, K, h, w) bool, cell
    without ignore pixels (B, 1, h, w) bool). H and W must be multiples of h and w."""
    batch, height, width = label_BHW.shape
    rows, columns = grid
    assert height % rows == 0 and width % columns == 0, f"labels {height}x{width} do not tile a {rows}x{columns} grid"
    cells_BNP = (label_BHW.long().reshape(batch, rows, height // rows, columns, width // columns)
                 .permute(0, 1, 3, 2, 4).reshape(batch, rows * columns, -1))  # (B, h·w, pixels per cell)
    hits_BNV = torch.zeros(batch, rows * columns, 256, dtype=torch.bool, device=label_BHW.device)
    hits_BNV.scatter_(2, cells_BNP, True)  # value v occurs in the cell
    present_BKhw = hits_BNV[:, :, 1:num_structures + 1].transpose(1, 2).reshape(batch, num_structures, rows, columns)
    clean_B1hw = ~hits_BNV[:, :, IGNORE].reshape(batch, 1, rows, columns)
    return present_BKhw, clean_B1hw


def feature_losses(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor],
                   config: FeatureLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted domain CE + slice and region BCE over annotated pairs (rescaled for DDP); (loss, detached terms).

    ``outputs``: :class:`FeatureNet`'s (domain (B, D), structure (B, K'), region (B, K', h, w)) logits; K'
    may exceed the table's K (a table without structures still has one output).
    """
    domain_logits_BD, structure_logits_BK, region_logits_BKhw = outputs
    annotated_BK = batch["annotated"].float()
    num_structures = annotated_BK.shape[1]
    present_BKhw, clean_B1hw = region_targets(batch["label"], num_structures, tuple(region_logits_BKhw.shape[-2:]))
    cell_weight_BKhw = annotated_BK[:, :, None, None] * clean_B1hw.float()
    counts_T = torch.stack([annotated_BK.sum(), cell_weight_BKhw.sum()]).detach()
    factors_T = global_mean_factors(counts_T)
    slice_bce_BK = F.binary_cross_entropy_with_logits(structure_logits_BK.float()[:, :num_structures],
                                                      batch["present"].float(), reduction="none")
    region_bce_BKhw = F.binary_cross_entropy_with_logits(region_logits_BKhw.float()[:, :num_structures],
                                                         present_BKhw.float(), reduction="none")
    structure_bce = factors_T[0] * (slice_bce_BK * annotated_BK).sum() / counts_T[0].clamp(min=1.0)
    region_bce = factors_T[1] * (region_bce_BKhw * cell_weight_BKhw).sum() / counts_T[1].clamp(min=1.0)
    domain_ce = F.cross_entropy(domain_logits_BD.float(), batch["domain_index"])
    loss = config.domain * domain_ce + config.structures * structure_bce + config.regions * region_bce
    with torch.no_grad():
        accuracy = (domain_logits_BD.argmax(dim=1) == batch["domain_index"]).float().mean()
    return loss, {"loss": loss.detach(), "domain_ce": domain_ce.detach(), "structure_bce": structure_bce.detach(),
                  "region_bce": region_bce.detach(), "domain_acc": accuracy}


def binary_auroc(scores_N: np.ndarray, labels_N: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n+ n-), ties counted half); None without both classes."""
    from scipy.stats import rankdata

    labels_N = np.asarray(labels_N, dtype=bool)
    positives, negatives = int(labels_N.sum()), int((~labels_N).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks_N = rankdata(np.asarray(scores_N, dtype=np.float64))
    u_statistic = ranks_N[labels_N].sum() - positives * (positives + 1) / 2.0
    return float(u_statistic / (positives * negatives))


def structure_aurocs(scores_NS: np.ndarray, present_NS: np.ndarray, annotated_NS: np.ndarray,
                     names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per structure: AUROC over the rows that annotate it (None without both classes), positives, negatives."""
    results = {}
    for s, name in enumerate(names):
        rows = annotated_NS[:, s]
        labels = present_NS[rows, s]
        results[name] = {"auroc": binary_auroc(scores_NS[rows, s], labels), "positives": int(labels.sum()),
                         "negatives": int((~labels).sum())}
    return results


@torch.no_grad()
def predict(net: FeatureNet, dataset: FeatureSliceDataset, positions: np.ndarray, batch_size: int,
            device: torch.device) -> dict[str, np.ndarray]:
    """Domain predictions and structure probabilities (eval mode) with the rows' truth, as numpy arrays."""
    net.eval()
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("domain_pred", "domain_true", "scores", "present",
                                                              "annotated")}
    for start in range(0, len(positions), batch_size):
        batch = dataset.read_batch(positions[start:start + batch_size].tolist())
        domain_logits_BD, structure_logits_BS, _ = net(batch["image"].to(device), batch["channel_mask"].to(device))
        parts["domain_pred"].append(domain_logits_BD.argmax(dim=1).cpu().numpy())
        parts["domain_true"].append(batch["domain_index"].numpy())
        parts["scores"].append(torch.sigmoid(structure_logits_BS.float()).cpu().numpy())
        parts["present"].append(batch["present"].numpy())
        parts["annotated"].append(batch["annotated"].numpy())
    return {key: np.concatenate(values) for key, values in parts.items()}


def summarize_predictions(predicted: dict[str, np.ndarray], names: Sequence[str],
                          domains: Sequence[str]) -> dict[str, Any]:
    """Macro AUROC (mean over structures with both classes), per-structure AUROC, and domain accuracy
    (overall and per domain) of :func:`predict`'s output."""
    num_structures = len(names)
    per_structure = structure_aurocs(predicted["scores"][:, :num_structures], predicted["present"],
                                     predicted["annotated"], names)
    scored = [values["auroc"] for values in per_structure.values() if values["auroc"] is not None]
    correct = predicted["domain_pred"] == predicted["domain_true"]
    per_domain = {name: float(correct[predicted["domain_true"] == d].mean())
                  for d, name in enumerate(domains) if (predicted["domain_true"] == d).any()}
    return {"structure_auroc_macro": float(np.mean(scored)) if scored else None,
            "structures_scored": len(scored), "structure_auroc": per_structure,
            "domain_accuracy": float(correct.mean()) if len(correct) else None,
            "domain_accuracy_per_domain": per_domain}


def evenly_spaced(count: int, limit: int) -> np.ndarray:
    """At most ``limit`` positions spread evenly over ``range(count)`` (all of them when count <= limit)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def held_out_split(prepared: Path) -> str:
    """``val`` when the prepared dataset has val rows, else ``test``, else ``train`` (a warning: not held out)."""
    from medaug.data.index import read_index

    splits = set(read_index(Path(prepared) / "index.parquet", columns=["split"]).column("split").to_pylist())
    for split in ("val", "test", "train"):
        if split in splits:
            if split != "val":
                log.warning("%s has no val rows; the feature encoder is evaluated on the %s split%s", prepared, split,
                            " (NOT held out)" if split == "train" else "")
            return split
    raise ConfigError(Path(prepared) / "index.parquet", "has no rows to evaluate the feature encoder on")


# ---------------------------------------------------------------- the task


class FeaturesTask:
    """The engine's Task for medaug's feature encoder (module docstring). Module: ``encoder``."""

    name = "features"

    def __init__(self, data: str | Path, recipe: FeaturesRecipe):
        self.data = Path(data)
        self.recipe = recipe
        self.table = read_structure_table(self.data, "train")
        self.domain_names = read_domain_names(self.data)
        self._train = feature_dataset(self.data, "train", self.table, self.domain_names, recipe.model.image_size)
        if len(self._train) == 0:
            raise ConfigError(self.data / "index.parquet", "has no train rows; expected a prepared dataset with a "
                                                           "train split")
        channels = self._train.base.base.channels_out
        self.model_config = replace(recipe.model, image_channels=channels, num_domains=len(self.domain_names),
                                    num_structures=self.table.num_structures)
        self.eval_results: dict[str, Any] | None = None
        self._lineage: dict[str, Any] | None = None

    def build_modules(self) -> dict[str, nn.Module]:
        return {"encoder": FeatureNet(self.model_config)}

    def train_dataset(self) -> FeatureSliceDataset:
        return self._train

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, torch.Tensor], step: int,
                      update: Callable[[str, torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One encoder update on domain CE + masked slice and region BCE; returns 0-d metric tensors."""
        outputs = modules["encoder"](batch["image"], batch["channel_mask"])
        loss, metrics = feature_losses(outputs, batch, self.recipe.loss)
        update("encoder", loss)
        return metrics

    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata: model config, recipe, domains, structure table, data lineage, evaluation."""
        from medaug import vocab

        return {
            "model_config": to_dict(self.model_config),
            "recipe": recipe_to_dict(self.recipe),
            "image_channels": self.model_config.image_channels,
            "image_size": self.model_config.image_size,
            "feature_dim": self.model_config.feature_dim,
            "domains": json.loads((self.data / DOMAINS_FILE).read_text()),
            "domain_names": list(self.domain_names),
            "structure_table": self.table.to_records(),
            "vocabulary": [vocab.structure(name).as_dict() for name in self.table.names],
            "data": self.data_lineage(),
            "evaluation": self.eval_results,
        }

    def evaluate(self, modules: dict[str, nn.Module], run_dir: Path) -> dict[str, Any]:
        """Held-out structure-present AUROC and domain accuracy (module docstring); kept for :meth:`metadata`."""
        split = held_out_split(self.data)
        dataset = feature_dataset(self.data, split, self.table, self.domain_names, self.model_config.image_size)
        net = unwrap(modules["encoder"])
        device = next(net.parameters()).device
        positions = evenly_spaced(len(dataset), self.recipe.eval.max_slices)
        predicted = predict(net, dataset, positions, self.recipe.eval.batch_size, device)
        summary = summarize_predictions(predicted, self.table.names, self.domain_names)
        self.eval_results = {"split": split, "held_out": split != "train", "slices": int(len(positions)), **summary}
        log.info("features on %s: structure AUROC %s, domain accuracy %s", split,
                 summary["structure_auroc_macro"], summary["domain_accuracy"])
        return self.eval_results

    def data_lineage(self) -> dict[str, Any]:
        """Prepared dataset path, index sha256, training patient groups, train slice count (computed once)."""
        from medaug.train.var_task import data_lineage

        if self._lineage is None:
            self._lineage = data_lineage(self.data, len(self._train))
        return self._lineage


# ---------------------------------------------------------------- run and load


def train_features(
    data: str | Path,
    recipe: str | Path | FeaturesRecipe | dict,
    out: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train medaug's feature encoder on ``data``'s train split into run folder ``out``, then evaluate it.

    ``recipe``: a YAML path, a name under ``recipes/models`` (``features-tiny``), a dict or a recipe;
    ``overrides``: ``key=value`` strings; ``max_steps`` overrides ``train.max_steps``; ``resume`` continues
    from ``out``'s latest checkpoint. Writes ``out/features_recipe.json``, checkpoints and
    ``out/metrics.json``; the evaluation is also added to the final checkpoint's meta.json. Returns
    {run_dir, step, stopped_by, checkpoint, train_metrics, evaluation}.
    """
    steps = [f"train.max_steps={max_steps}"] if max_steps is not None else []
    recipe = load_features_recipe(recipe, [*overrides, *steps])
    task = FeaturesTask(data, recipe)
    return train_then_evaluate(task, recipe.train, recipe_to_dict(recipe), Path(out) / RECIPE_FILE, Path(out),
                               evaluate_checkpoint, resume, progress)


def evaluate_checkpoint(task: FeaturesTask, checkpoint_path: Path, run_dir: Path) -> dict[str, Any]:
    """Evaluate the saved weights (through :func:`load_feature_net`, so the run loads as evaluation will load
    it) and record the result in the checkpoint's meta.json (``evaluation``)."""
    from medaug.train.checkpoint import update_checkpoint_meta
    from medaug.train.distributed import pick_device

    net, _ = load_feature_net(checkpoint_path, pick_device(0, task.recipe.train.device))
    results = task.evaluate({"encoder": net}, run_dir)
    update_checkpoint_meta(checkpoint_path, {"evaluation": results})
    return results


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> tuple[FeatureNet, dict[str, Any]]:
    """A trained encoder from a ``medaug train features`` run or checkpoint folder: (FeatureNet in eval mode,
    meta.json). The model config comes from the checkpoint; the EMA weights are used when saved.
    Raises CheckpointError when the folder is not a verified features checkpoint."""
    from medaug.train.checkpoint import load_checkpoint, load_module_weights

    checkpoint = load_checkpoint(Path(path), expect_kind=FeaturesTask.name, trainer=False)
    try:
        config = from_dict(FeatureNetConfig, checkpoint.meta["model_config"],
                           f"{checkpoint.path}/meta.json:model_config")
    except KeyError as error:
        raise ConfigError(f"{checkpoint.path}/meta.json", f"model_config unreadable ({error})") from None
    net = FeatureNet(config)
    load_module_weights(net, checkpoint, "ema" if "ema" in checkpoint.state_dicts else "model")
    return net.to(device).eval().requires_grad_(False), checkpoint.meta


__all__ = [
    "FeatureEvalConfig",
    "FeatureLossConfig",
    "FeatureSliceDataset",
    "FeaturesRecipe",
    "FeaturesTask",
    "binary_auroc",
    "evaluate_checkpoint",
    "feature_losses",
    "held_out_split",
    "region_targets",
    "load_feature_net",
    "load_features_recipe",
    "structure_aurocs",
    "train_features",
]
