"""Memorization: is any synthetic sample a copy of a training patient's slice? (issue 10 item 4)

For every synthetic sample, within its domain, the nearest real **training** slice:

* **in pixels**: both slices area-downsampled to ``size``² (default 64; never upsampled), the domain's
  channels only, in model space. The nearest slice is the one of highest normalized (Pearson)
  correlation over all downsampled pixels of all channels (NCC, in [-1, 1]); for that pair the SSIM is
  measured too (Gaussian window 11, σ 1.5, data range 2, averaged over channels:
  :func:`medaug.models.losses.ssim`);
* **in feature space**: the training slice at the smallest Euclidean distance between backbone features
  (the backbone is named in the result).

The same is done for the real **validation** slices (new patients of the same population) against the
training slices: their nearest-neighbour similarities are what "not a copy" looks like, and the synthetic
distribution is reported against them (quantiles; ``closer_than_val_p05``: the fraction of synthetic
samples whose feature distance is below the 5th percentile of the val→train distances, about 0.05 for a
generator that samples new patients).

**Near-copy rule.** A synthetic sample is flagged when its nearest training slice in pixels has
``NCC >= t_ncc`` and ``SSIM >= t_ssim``, with ``t = max(absolute minimum, the val_quantile (0.99)
quantile of the validation slices' own nearest-training values)`` per domain (capped just below 1, so an
exact copy is always flagged): a sample must be more similar to a training slice than both a fixed bar
(NCC 0.98, SSIM 0.95: the same anatomy at the same position with at most mild noise) and nearly every
real new patient is. Without validation slices the absolute minimums alone apply. Pixel similarity
drives the flag because a copy is a pixel-level event; the feature distances are reported beside it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from medaug.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from medaug.data.dataset import PreparedSliceDataset

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PAIR_TILE_MIN = 160  # closest-pair tiles are enlarged to at least this side (pixels)
_THRESHOLD_CAP = 1.0 - 1e-6


@dataclass(frozen=True)
class MemorizationConfig:
    """``size``: side of the downsampled slices (pixels); ``ncc_min``/``ssim_min``: the absolute bars of the
    near-copy rule; ``val_quantile``: the quantile of the val→train similarities that also has to be
    exceeded; ``batch_size``: slices read at once; ``pairs``: closest pairs drawn in the image."""

    size: int = 64
    ncc_min: float = 0.98
    ssim_min: float = 0.95
    val_quantile: float = 0.99
    batch_size: int = 256
    pairs: int = 8

    def __post_init__(self) -> None:
        if self.size < 11:
            raise ConfigError("memorization.size", f"is {self.size}; expected >= 11 (the SSIM window)")
        if not 0.0 <= self.val_quantile <= 1.0:
            raise ConfigError("memorization.val_quantile", f"is {self.val_quantile}; expected a value in [0, 1]")


# ---------------------------------------------------------------------------------------------- reading


def row_column(dataset: PreparedSliceDataset, name: str) -> np.ndarray:
    """(N,) values of an index column of the dataset's rows (strings as objects)."""
    return dataset.rows.column(name).to_numpy(zero_copy_only=False)


def channel_counts(dataset: PreparedSliceDataset) -> np.ndarray:
    """(N,) int64: the number of the domain's channels of each row."""
    return pc.list_value_length(dataset.rows.column("channels")).to_numpy().astype(np.int64)


def comparison_side(first: PreparedSliceDataset, second: PreparedSliceDataset, size: int) -> int:
    """The side both datasets' slices are compared at: ``size``, or the smallest slice side when smaller
    (slices are never upsampled)."""
    return min(size, first.height, first.width, second.height, second.width)


def read_downsampled(dataset: PreparedSliceDataset, positions: np.ndarray, channels: int, side: int) -> torch.Tensor:
    """(B, channels, side, side) float32 model-space slices at ``positions``, area-averaged (side <= H, W)."""
    image_BCHW = dataset.read_batch(positions.tolist())["image"][:, :channels].float()
    if image_BCHW.shape[-2:] != (side, side):
        image_BCHW = F.interpolate(image_BCHW, size=(side, side), mode="area")
    return image_BCHW


def standardized(image_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, P) rows of zero mean and unit norm (flat rows stay zero), so a dot product is the NCC."""
    flat_BP = image_BCHW.reshape(image_BCHW.shape[0], -1).double()
    flat_BP = flat_BP - flat_BP.mean(dim=1, keepdim=True)
    norms_B1 = flat_BP.norm(dim=1, keepdim=True)
    return flat_BP / torch.where(norms_B1 > 0, norms_B1, torch.ones_like(norms_B1))


def _chunks(positions: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, positions.size, batch_size):
        yield positions[start:start + batch_size]


# ---------------------------------------------------------------------------------------------- nearest neighbours


def nearest_by_correlation(query: PreparedSliceDataset, query_positions: np.ndarray, reference: PreparedSliceDataset,
                           reference_positions: np.ndarray, channels: int, config: MemorizationConfig
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: (position in ``reference`` of the highest-NCC slice, that NCC) over ``reference_positions``;
    the reference is streamed in batches, so only the queries are held in memory."""
    side = comparison_side(query, reference, config.size)
    query_QP = torch.cat([standardized(read_downsampled(query, chunk, channels, side))
                          for chunk in _chunks(query_positions, config.batch_size)])
    best_Q = torch.full((query_QP.shape[0],), -np.inf, dtype=torch.float64)
    best_index_Q = torch.zeros(query_QP.shape[0], dtype=torch.int64)
    for chunk in _chunks(reference_positions, config.batch_size):
        reference_RP = standardized(read_downsampled(reference, chunk, channels, side))
        ncc_QR = query_QP @ reference_RP.T
        value_Q, index_Q = ncc_QR.max(dim=1)
        better_Q = value_Q > best_Q
        best_Q = torch.where(better_Q, value_Q, best_Q)
        best_index_Q = torch.where(better_Q, torch.from_numpy(chunk)[index_Q], best_index_Q)
    return best_index_Q.numpy(), best_Q.numpy()


def pair_ssim(first: PreparedSliceDataset, first_positions: np.ndarray, second: PreparedSliceDataset,
              second_positions: np.ndarray, channels: int, config: MemorizationConfig) -> np.ndarray:
    """(N,) SSIM (mean over channels) of the downsampled slice pairs ``first[i]``, ``second[i]``."""
    from medaug.models.losses import ssim

    side = comparison_side(first, second, config.size)
    values = []
    for start in range(0, first_positions.size, config.batch_size):
        stop = start + config.batch_size
        a_BCHW = read_downsampled(first, first_positions[start:stop], channels, side)
        b_BCHW = read_downsampled(second, second_positions[start:stop], channels, side)
        with _without_onednn():
            values.append(ssim(a_BCHW, b_BCHW, data_range=2.0).mean(dim=1).double().numpy())
    return np.concatenate(values) if values else np.zeros(0)


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN off for the block: its path for SSIM's thin separable convolutions (1×11 kernels) measured
    4-5x slower than ATen's on the 2-core CPU machine. (``torch.backends.mkldnn.flags`` also resets TF32
    settings and warns, so the switch is flipped directly.)"""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def nearest_by_distance(query_QD: np.ndarray, reference_RD: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: (row of ``reference_RD`` at the smallest Euclidean distance, that distance)."""
    from medaug.eval.metrics import squared_distances

    index_Q = np.zeros(query_QD.shape[0], dtype=np.int64)
    distance_Q = np.zeros(query_QD.shape[0])
    for start in range(0, query_QD.shape[0], chunk):
        squared_CR = squared_distances(query_QD[start:start + chunk], reference_RD)
        index_Q[start:start + chunk] = squared_CR.argmin(axis=1)
        distance_Q[start:start + chunk] = np.sqrt(squared_CR.min(axis=1))
    return index_Q, distance_Q


# ---------------------------------------------------------------------------------------------- per domain


@dataclass
class MemorizationInputs:
    """The slices to compare: ``synthetic`` samples, real ``train`` slices (the generator's training data)
    and real ``val`` slices (new patients; may be None); ``features``: optional backbone features aligned
    with each dataset's rows ({"synthetic", "train", "val"} → (N, D)) from backbone ``backbone``."""

    synthetic: PreparedSliceDataset
    train: PreparedSliceDataset
    val: PreparedSliceDataset | None = None
    features: dict[str, np.ndarray] | None = None
    backbone: str | None = None


def _query_records(inputs: MemorizationInputs, which: str, domain: str, config: MemorizationConfig) -> pd.DataFrame:
    """Nearest-training records of the ``which`` ("synthetic" or "val") rows of ``domain``."""
    import pandas as pd

    query = inputs.synthetic if which == "synthetic" else inputs.val
    positions = np.flatnonzero(row_column(query, "domain") == domain)
    train_positions = np.flatnonzero(row_column(inputs.train, "domain") == domain)
    if positions.size == 0 or train_positions.size == 0:
        return pd.DataFrame()
    channels = int(channel_counts(inputs.train)[train_positions[0]])
    nearest, ncc = nearest_by_correlation(query, positions, inputs.train, train_positions, channels, config)
    train_ids = row_column(inputs.train, "slice_id")
    frame = pd.DataFrame({"set": which, "domain": domain, "position": positions,
                          "slice_id": row_column(query, "slice_id")[positions], "pixel_nearest": train_ids[nearest],
                          "pixel_nearest_position": nearest, "ncc": ncc,
                          "ssim": pair_ssim(query, positions, inputs.train, nearest, channels, config)})
    if inputs.features is not None:
        feature_rows, distance = nearest_by_distance(inputs.features[which][positions],
                                                     inputs.features["train"][train_positions])
        frame["feature_nearest"] = train_ids[train_positions[feature_rows]]
        frame["feature_distance"] = distance
    return frame


def near_copy_thresholds(val_frame: pd.DataFrame, config: MemorizationConfig) -> dict[str, float]:
    """{"ncc", "ssim"}: the near-copy bars of one domain (module docstring)."""
    thresholds = {"ncc": config.ncc_min, "ssim": config.ssim_min}
    if len(val_frame):
        for name in thresholds:
            thresholds[name] = max(thresholds[name], float(np.quantile(val_frame[name], config.val_quantile)))
    return {name: min(value, _THRESHOLD_CAP) for name, value in thresholds.items()}


def find_nearest(inputs: MemorizationInputs, config: MemorizationConfig | None = None
                 ) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Nearest training slices of every synthetic and val row, and per domain the near-copy thresholds.

    Returns (records, thresholds): one record per row with ``set`` ("synthetic" | "val"), ``domain``,
    ``slice_id``, ``pixel_nearest`` (training slice id), ``ncc``, ``ssim``, with features also
    ``feature_nearest`` and ``feature_distance``, and for synthetic rows ``flagged`` (near copy).
    """
    import pandas as pd

    config = config or MemorizationConfig()
    frames, thresholds = [], {}
    for domain in sorted(set(row_column(inputs.synthetic, "domain"))):
        val_frame = _query_records(inputs, "val", domain, config) if inputs.val is not None else pd.DataFrame()
        synthetic_frame = _query_records(inputs, "synthetic", domain, config)
        if synthetic_frame.empty:
            log.warning("memorization: no training slices of domain %s to compare with", domain)
            continue
        thresholds[domain] = near_copy_thresholds(val_frame, config)
        synthetic_frame["flagged"] = ((synthetic_frame["ncc"] >= thresholds[domain]["ncc"])
                                      & (synthetic_frame["ssim"] >= thresholds[domain]["ssim"]))
        frames += [synthetic_frame, val_frame]
    records = pd.concat([frame for frame in frames if len(frame)], ignore_index=True) if frames else pd.DataFrame()
    return records, thresholds


# ---------------------------------------------------------------------------------------------- summary


def _quantiles(values: pd.Series) -> dict[str, float] | None:
    if values is None or len(values) == 0:
        return None
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def _summary_of(records: pd.DataFrame, thresholds: dict[str, float] | None) -> dict[str, Any]:
    synthetic = records[records["set"] == "synthetic"]
    val = records[records["set"] == "val"]
    summary: dict[str, Any] = {"n_synthetic": int(len(synthetic)), "n_val": int(len(val)),
                               "n_flagged": int(synthetic["flagged"].sum()),
                               "fraction_flagged": float(synthetic["flagged"].mean()) if len(synthetic) else None}
    if thresholds is not None:
        summary["thresholds"] = thresholds
    for name in ("ncc", "ssim", "feature_distance"):
        if name in records:
            summary[name] = {"synthetic": _quantiles(synthetic[name]), "val": _quantiles(val[name])}
    if "feature_distance" in records and len(val):
        p05 = float(np.quantile(val["feature_distance"], 0.05))
        summary["closer_than_val_p05"] = float((synthetic["feature_distance"] < p05).mean()) if len(synthetic) else None
    return summary


def summarize_memorization(records: pd.DataFrame, thresholds: dict[str, dict[str, float]], backbone: str | None,
                           config: MemorizationConfig, pairs: int | None = None) -> dict[str, Any]:
    """The memorization section of metrics.json: overall and per domain counts, flagged fractions,
    quantiles against val, the near-copy rule and the closest pairs (highest NCC first)."""
    if records.empty:
        return {"status": "unavailable", "reason": "no synthetic sample has training slices of its domain"}
    synthetic = records[records["set"] == "synthetic"].sort_values("ncc", ascending=False)
    columns = [c for c in ("slice_id", "domain", "pixel_nearest", "ncc", "ssim", "feature_nearest",
                           "feature_distance", "flagged") if c in synthetic]
    closest = synthetic.head(config.pairs if pairs is None else pairs)[columns]
    return {
        "status": "available",
        "backbone": backbone,
        "rule": {"ncc_min": config.ncc_min, "ssim_min": config.ssim_min, "val_quantile": config.val_quantile,
                 "size": config.size, "pairs": config.pairs},
        "overall": _summary_of(records, None),
        "domains": {domain: _summary_of(records[records["domain"] == domain], thresholds.get(domain))
                    for domain in sorted(records["domain"].unique())},
        "closest_pairs": [{key: _plain(value) for key, value in row.items()} for row in closest.to_dict("records")],
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def evaluate_memorization(inputs: MemorizationInputs, config: MemorizationConfig | None = None,
                          records_path: str | Path | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`find_nearest` then :func:`summarize_memorization`; the per-sample records also go to
    ``records_path`` (parquet) when given. Returns (summary, records)."""
    config = config or MemorizationConfig()
    records, thresholds = find_nearest(inputs, config)
    if records_path is not None and not records.empty:
        from medaug.io.atomic import atomic_output

        with atomic_output(Path(records_path)) as temporary:
            records.to_parquet(temporary, index=False)
    return summarize_memorization(records, thresholds, inputs.backbone, config), records


# ---------------------------------------------------------------------------------------------- the image


def tile_rgb(dataset: PreparedSliceDataset, position: int, side: int) -> np.ndarray:
    """(side, side, 3) uint8: the first channel of row ``position`` with its mask in vocabulary colours
    (:func:`medaug.prepare.inspect.overlay_rgb`), resized (nearest) to ``side``."""
    from PIL import Image

    from medaug.prepare.inspect import overlay_rgb

    batch = dataset.read_batch([position])
    rgb_HW3 = overlay_rgb(batch["image"][0, 0].float().numpy(), batch["label"][0].numpy())
    if rgb_HW3.shape[:2] == (side, side):
        return rgb_HW3
    return np.asarray(Image.fromarray(rgb_HW3).resize((side, side), Image.Resampling.NEAREST))


def tile_side(datasets: Sequence[PreparedSliceDataset], minimum: int) -> int:
    """A common tile side: the largest slice side, enlarged by a whole factor to at least ``minimum``."""
    largest = max(max(dataset.height, dataset.width) for dataset in datasets)
    return largest * max(1, -(-minimum // largest))


def write_closest_pairs(records: pd.DataFrame, inputs: MemorizationInputs, path: str | Path, pairs: int = 8) -> Path | None:
    """A PNG: one row per synthetic sample of highest NCC (flagged ones first), the sample beside its
    nearest training slice (first channel, masks in vocabulary colours), captioned with NCC, SSIM, the
    feature distance and the flag. None when there are no records."""
    from PIL import Image, ImageDraw

    from medaug.io.png import write_png

    if records.empty:
        return None
    chosen = records[records["set"] == "synthetic"].sort_values(["flagged", "ncc"], ascending=False).head(pairs)
    side, caption = tile_side([inputs.synthetic, inputs.train], PAIR_TILE_MIN), 14
    canvas = Image.new("RGB", (2 * side, (side + caption) * len(chosen)), "black")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(chosen.to_dict("records")):
        top = r * (side + caption)
        draw.text((2, top), _pair_caption(row), fill=(255, 80, 80) if row["flagged"] else (255, 255, 0))
        canvas.paste(Image.fromarray(tile_rgb(inputs.synthetic, int(row["position"]), side)), (0, top + caption))
        canvas.paste(Image.fromarray(tile_rgb(inputs.train, int(row["pixel_nearest_position"]), side)), (side, top + caption))
    return write_png(np.asarray(canvas), Path(path))


def _pair_caption(row: dict[str, Any]) -> str:
    text = f"ncc {row['ncc']:.3f} ssim {row['ssim']:.3f}"
    if "feature_distance" in row:
        text += f" d {row['feature_distance']:.3g}"
    return text + (" - NEAR COPY" if row["flagged"] else "")


__all__ = [
    "MemorizationConfig",
    "MemorizationInputs",
    "channel_counts",
    "comparison_side",
    "evaluate_memorization",
    "find_nearest",
    "near_copy_thresholds",
    "nearest_by_correlation",
    "nearest_by_distance",
    "pair_ssim",
    "read_downsampled",
    "row_column",
    "standardized",
    "summarize_memorization",
    "tile_rgb",
    "tile_side",
    "write_closest_pairs",
]
