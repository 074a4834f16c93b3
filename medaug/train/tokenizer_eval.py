"""Reconstruction quality of a trained tokenizer on held-out slices (DESIGN.md §3 "Paired masks").

Every slice goes through the path the generator will use: ``img_to_indices`` (image + mask → per-scale
codes), then the decoder on the accumulated codes (image clamped to [-1, 1]; label = the argmax over
background and the structures the row annotates, :func:`annotated_argmax`). Measured:

* **Image**, per domain channel (``"ct/abdomen/ct"``): PSNR in model units, 10·log10(2² / MSE) with the
  [-1, 1] range, and SSIM (Gaussian window 11, σ 1.5, :func:`medaug.models.losses.ssim`), averaged over
  slices. CT channels also in HU through the row's intensity mapping (HU = model·scale + offset):
  ``mae_hu`` and ``psnr_hu`` = 10·log10(window width² / MSE_HU). Both images live inside the window, so
  ``psnr_hu`` equals the model-unit PSNR (the mapping is linear); ``mae_hu`` is the figure to read.
* **Masks**, per structure over (slice, structure) pairs where the row annotates the structure and it is
  present in the ground truth: Dice, and HD95 in mm (:func:`hd95_mm`: MONAI's symmetric 95th-percentile
  Hausdorff distance, computed with SciPy, with the row's pixel spacing), binned by the structure's area as a fraction of the slice
  (``AREA_BINS``). A pair whose decoded mask is empty has Dice 0 and no HD95 (counted as ``missed``);
  an annotated structure absent from the ground truth but decoded counts as a ``false_positive``.
  Ignore pixels (255) are excluded from the prediction before scoring.
* **Codes**: per scale, the fraction of the V codes used and the perplexity of the code histogram.
* A PNG grid (``reconstructions.png``): one row per picked slice; per channel, the original with its
  ground-truth mask beside the reconstruction with the decoded mask (vocabulary colours).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medaug.data.structures import StructureSliceDataset, read_row_column
from medaug.models.losses import ssim
from medaug.models.quant import codebook_stats
from medaug.models.vqvae import VQVAE

log = logging.getLogger(__name__)

AREA_BINS: tuple[tuple[str, float, float], ...] = (("<1%", 0.0, 0.01), ("1-5%", 0.01, 0.05), (">5%", 0.05, 1.01))
"""(name, low, high): a structure of area fraction a (of the slice's pixels) falls in low <= a < high."""
MODEL_RANGE = 2.0  # model space [-1, 1]
TILE_MIN_PIXELS = 128  # grid tiles are enlarged (nearest) to at least this side


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings: batch size, a cap on slices (evenly spaced over the split), grid rows."""

    batch_size: int = 16
    max_slices: int | None = 1000
    grid_rows: int = 8


@dataclass
class _Accumulator:
    """Per-slice results gathered over batches."""

    image: dict[str, dict[str, list[float]]]
    pairs: list[dict[str, Any]]
    false_positives: dict[str, int]
    counts_KV: torch.Tensor
    grid: list[dict[str, Any]]


def evaluate_tokenizer(vqvae: VQVAE, dataset: StructureSliceDataset, config: EvalConfig,
                       png_path: Path | None = None) -> dict[str, Any]:
    """Reconstruction metrics of ``vqvae`` on ``dataset`` (module docstring); writes the grid to ``png_path``."""
    positions = evenly_spaced(len(dataset), config.max_slices)
    rows = _RowInfo(dataset)
    picks = set(pick_grid_rows(dataset, positions, config.grid_rows))
    quantizer = vqvae.quantizer
    acc = _Accumulator(defaultdict(lambda: defaultdict(list)), [], defaultdict(int),
                       torch.zeros(quantizer.num_scales, quantizer.config.codebook_size, dtype=torch.long), [])
    was_training = vqvae.training
    vqvae.eval()
    try:
        for start in range(0, len(positions), config.batch_size):
            batch = dataset.read_batch(positions[start:start + config.batch_size])
            _score_batch(vqvae, batch, rows, dataset, picks, acc)
    finally:
        vqvae.train(was_training)
    results = _summarize(acc, dataset, len(positions))
    if png_path is not None and acc.grid:
        results["reconstructions_png"] = str(write_grid(acc.grid, dataset, png_path))
    return results


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """All of ``range(count)``, or ``limit`` positions spread evenly over it."""
    if limit is None or count <= limit:
        return list(range(count))
    return np.linspace(0, count - 1, num=limit).round().astype(int).tolist()


def pick_grid_rows(dataset: StructureSliceDataset, positions: list[int], rows: int) -> list[int]:
    """Up to ``rows`` positions for the PNG grid: round-robin over domains, labelled slices first,
    spread evenly within each domain."""
    present = read_row_column(dataset.base, "structures_present")
    domains = dataset.base.rows.column("domain").to_pylist()
    per_domain: dict[str, list[int]] = defaultdict(list)
    for position in sorted(positions, key=lambda p: (not present[p], p)):
        per_domain[domains[position]].append(position)
    quota = {name: evenly_spaced(len(items), max(1, rows // len(per_domain))) for name, items in per_domain.items()}
    chosen = [per_domain[name][i] for name in sorted(quota) for i in quota[name]]
    return chosen[:rows]


class _RowInfo:
    """Row metadata of the dataset by position: channel names, pixel spacing in mm, intensity mappings."""

    def __init__(self, dataset: StructureSliceDataset):
        self.domains = dataset.base.rows.column("domain").to_pylist()
        self.channels = dataset.base.rows.column("channels").to_pylist()
        spacing = read_row_column(dataset.base, "spacing_mm")
        self.spacing_mm = [[value * dataset.pixel_scale for value in row] for row in spacing]
        self.intensity = [json.loads(text) for text in read_row_column(dataset.base, "intensity")]


@torch.no_grad()
def reconstruct(vqvae: VQVAE, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Tokenize and decode a batch: (image (B, C, H, W) float32 in [-1, 1], label (B, H, W) int64
    model-local, per-scale indices [(B, p_k, p_k)]), all on the CPU.

    The decoded label is the argmax over background and the row's annotated structures
    (:func:`annotated_argmax`): where a row does not annotate a structure, the loss never told the
    model it is absent, so its logit there means "unknown", not "present".
    """
    device = next(vqvae.parameters()).device
    image_BCHW = batch["image"].to(device)
    mask_BC = batch["channel_mask"].to(device)
    label_BHW = batch["label"].to(device) if vqvae.config.num_structures else None
    indices = vqvae.img_to_indices(image_BCHW, mask_BC, label_BHW)
    image_rec_BCHW, logits_BKHW = vqvae.decode(vqvae.quantizer.indices_to_features(indices))
    label_rec_BHW = annotated_argmax(logits_BKHW.float().cpu(), batch["annotated"].cpu())
    return image_rec_BCHW.float().clamp(-1.0, 1.0).cpu(), label_rec_BHW, [idx.cpu() for idx in indices]


def annotated_argmax(logits_BKHW: torch.Tensor, annotated_BS: torch.Tensor) -> torch.Tensor:
    """Most likely label (B, H, W) int64 among background (0) and each row's annotated structures."""
    if logits_BKHW.shape[1] == 1:  # image-only model: background everywhere
        return logits_BKHW.new_zeros(logits_BKHW.shape[0], *logits_BKHW.shape[2:], dtype=torch.long)
    allowed_BK = torch.cat([annotated_BS.new_ones(annotated_BS.shape[0], 1), annotated_BS.bool()], dim=1)
    return logits_BKHW.masked_fill(~allowed_BK[:, :, None, None], float("-inf")).argmax(dim=1)


def _score_batch(vqvae: VQVAE, batch: dict[str, torch.Tensor], rows: _RowInfo, dataset: StructureSliceDataset,
                 picks: set[int], acc: _Accumulator) -> None:
    image_rec_BCHW, label_rec_BHW, indices = reconstruct(vqvae, batch)
    for k, indices_Bpp in enumerate(indices):
        acc.counts_KV[k] += torch.bincount(indices_Bpp.flatten(), minlength=acc.counts_KV.shape[1])
    ssim_BC = ssim(image_rec_BCHW, batch["image"], data_range=MODEL_RANGE)
    for b, position in enumerate(batch["index"].tolist()):
        _score_image(image_rec_BCHW[b], batch["image"][b], ssim_BC[b], rows, position, acc)
        if vqvae.config.num_structures:
            _score_masks(label_rec_BHW[b].numpy(), batch["label"][b].numpy(), batch["annotated"][b].numpy(),
                         rows.spacing_mm[position], dataset, acc)
        if position in picks:
            acc.grid.append({"position": position, "domain": rows.domains[position], "image": batch["image"][b].numpy(),
                             "image_rec": image_rec_BCHW[b].numpy(), "label": batch["label"][b].numpy(),
                             "label_rec": label_rec_BHW[b].numpy(), "channels": len(rows.channels[position])})


def psnr(rec: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """10·log10(range² / MSE) in dB; MSE is floored at 1e-12·range² (120 dB for identical images)."""
    mse = float(np.mean((np.asarray(rec, np.float64) - np.asarray(target, np.float64)) ** 2))
    return 10.0 * math.log10(data_range**2 / max(mse, 1e-12 * data_range**2))


def _score_image(rec_CHW: torch.Tensor, target_CHW: torch.Tensor, ssim_C: torch.Tensor, rows: _RowInfo,
                 position: int, acc: _Accumulator) -> None:
    for c, channel in enumerate(rows.channels[position]):
        key = f"{rows.domains[position]}/{channel}"
        rec, target = rec_CHW[c].numpy(), target_CHW[c].numpy()
        values = acc.image[key]
        values["psnr"].append(psnr(rec, target, MODEL_RANGE))
        values["ssim"].append(float(ssim_C[c]))
        mapping = rows.intensity[position][c]
        if mapping.get("kind") == "ct_window":
            scale, offset = float(mapping["scale"]), float(mapping["offset"])
            rec_hu, target_hu = rec.astype(np.float64) * scale + offset, target.astype(np.float64) * scale + offset
            values["psnr_hu"].append(psnr(rec_hu, target_hu, float(mapping["high"]) - float(mapping["low"])))
            values["mae_hu"].append(float(np.mean(np.abs(rec_hu - target_hu))))


def _score_masks(pred_HW: np.ndarray, true_HW: np.ndarray, annotated_S: np.ndarray, spacing_mm: list[float],
                 dataset: StructureSliceDataset, acc: _Accumulator) -> None:
    labelled_HW = true_HW != 255
    for local in np.flatnonzero(annotated_S) + 1:
        name = dataset.table.names[local - 1]
        truth_HW = true_HW == local
        predicted_HW = (pred_HW == local) & labelled_HW
        if not truth_HW.any():
            acc.false_positives[name] += int(predicted_HW.any())
            continue
        acc.pairs.append({"name": name, "area": float(truth_HW.mean()), "dice": dice(predicted_HW, truth_HW),
                          "hd95_mm": hd95_mm(predicted_HW, truth_HW, spacing_mm) if predicted_HW.any() else None})


def dice(predicted_HW: np.ndarray, truth_HW: np.ndarray) -> float:
    """2|P∩T| / (|P| + |T|) of two boolean masks; 1.0 when both are empty."""
    total = int(predicted_HW.sum()) + int(truth_HW.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted_HW, truth_HW).sum()) / total


def hd95_mm(predicted_HW: np.ndarray, truth_HW: np.ndarray, spacing_mm: list[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two non-empty boolean masks.

    MONAI's definition (``compute_hausdorff_distance(percentile=95)``, which the tests compare against):
    boundary pixels are a mask minus its 4-neighbour erosion; each boundary's distances to the other
    boundary (Euclidean, ``spacing_mm`` = [row, col]) give a 95th percentile (linear interpolation);
    the larger of the two is returned. Written with SciPy so that evaluation needs no MONAI.
    """
    from scipy import ndimage

    edges = [mask & ~ndimage.binary_erosion(mask) for mask in (predicted_HW, truth_HW)]
    to_truth = ndimage.distance_transform_edt(~edges[1], sampling=spacing_mm)[edges[0]]
    to_predicted = ndimage.distance_transform_edt(~edges[0], sampling=spacing_mm)[edges[1]]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_predicted, 95)))


def area_bin(area_fraction: float) -> str:
    """The name of the ``AREA_BINS`` entry holding ``area_fraction``."""
    return next(name for name, low, high in AREA_BINS if low <= area_fraction < high)


def _summarize(acc: _Accumulator, dataset: StructureSliceDataset, slices: int) -> dict[str, Any]:
    image = {key: {metric: _mean(values) for metric, values in metrics.items()} for key, metrics in sorted(acc.image.items())}
    structures = {name: _structure_summary(name, acc) for name in dataset.table.names
                  if any(pair["name"] == name for pair in acc.pairs) or acc.false_positives.get(name)}
    stats = codebook_stats(acc.counts_KV)
    return {
        "slices": slices,
        "image": image,
        "image_mean": {metric: _mean([v[metric] for v in image.values() if v.get(metric) is not None])
                       for metric in ("psnr", "ssim")},
        "structures": structures,
        "dice_mean": _mean([s["dice"] for s in structures.values() if s["dice"] is not None]),
        "dice_by_area": _by_area(acc.pairs),
        "codebook": {"usage_per_scale": stats["usage_K"].tolist(), "perplexity_per_scale": stats["perplexity_K"].tolist(),
                     "usage": float(stats["usage"])},
    }


def _structure_summary(name: str, acc: _Accumulator) -> dict[str, Any]:
    pairs = [pair for pair in acc.pairs if pair["name"] == name]
    return {
        "dice": _mean([pair["dice"] for pair in pairs]),
        "hd95_mm": _mean([pair["hd95_mm"] for pair in pairs if pair["hd95_mm"] is not None]),
        "slices": len(pairs),
        "missed": sum(pair["hd95_mm"] is None for pair in pairs),
        "false_positive_slices": acc.false_positives.get(name, 0),
        "by_area": _by_area(pairs),
    }


def _by_area(pairs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, _, _ in AREA_BINS:
        members = [pair for pair in pairs if area_bin(pair["area"]) == name]
        summary[name] = {"dice": _mean([pair["dice"] for pair in members]),
                         "hd95_mm": _mean([pair["hd95_mm"] for pair in members if pair["hd95_mm"] is not None]),
                         "slices": len(members)}
    return summary


def _mean(values: list[float]) -> float | None:
    """Mean of finite values; None (JSON null) when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def write_grid(samples: list[dict[str, Any]], dataset: StructureSliceDataset, path: Path) -> Path:
    """The PNG grid: per sample a caption bar and, per channel, original+truth beside reconstruction+decoded."""
    from PIL import Image, ImageDraw

    from medaug.io.png import write_png
    from medaug.prepare.inspect import overlay_rgb

    to_vocab = dataset.table.local_to_vocab_lut()
    side = samples[0]["image"].shape[-1]
    zoom = max(1, -(-TILE_MIN_PIXELS // side))
    tile, caption = side * zoom, 14
    columns = 2 * samples[0]["image"].shape[0]
    canvas = Image.new("RGB", (tile * columns, (tile + caption) * len(samples)), "black")
    draw = ImageDraw.Draw(canvas)
    for row, sample in enumerate(samples):
        top = row * (tile + caption)
        draw.text((2, top), f"{sample['domain']}  original | reconstruction", fill=(255, 255, 0))
        truth, decoded = to_vocab[sample["label"].clip(0, 255)], to_vocab[sample["label_rec"].clip(0, 255)]
        for c in range(sample["channels"]):
            for offset, (image_HW, label_HW) in enumerate(((sample["image"][c], truth), (sample["image_rec"][c], decoded))):
                picture = overlay_rgb(image_HW, label_HW).repeat(zoom, axis=0).repeat(zoom, axis=1)
                canvas.paste(Image.fromarray(picture), ((2 * c + offset) * tile, top + caption))
    return write_png(np.asarray(canvas), path)


def structure_quality(table_records: list[dict[str, Any]], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The structure table with each structure's reconstruction quality (``results["structures"]``) added;
    structures not seen in the evaluation get ``"reconstruction": None``."""
    quality = results.get("structures", {})
    return [{**record, "reconstruction": quality.get(record["name"])} for record in table_records]


__all__ = [
    "AREA_BINS",
    "EvalConfig",
    "annotated_argmax",
    "area_bin",
    "dice",
    "evaluate_tokenizer",
    "evenly_spaced",
    "hd95_mm",
    "pick_grid_rows",
    "psnr",
    "reconstruct",
    "structure_quality",
    "write_grid",
]
