"""Intensity fidelity: per structure, the intensities inside the masks of synthetic slices against real
ones (issue 10 item 5; the check MAISI ships as its quality gate).

For every (domain, structure, channel), the pixels of each slice whose label map holds the structure
(rows whose ``structures_present`` contain it) are taken back from model space to physical or scanner
units through the row's ``intensity`` mapping (``value = clip(model, -1, 1) · scale + offset``):

* **CT**: Hounsfield units, through each row's own window mapping. Both sets are clipped to their window,
  so a structure whose true HU lie outside the window shows the window edge.
* **MR**: arbitrary units. Each real volume has its own percentile mapping to source units, which differ
  between scanners and volumes, while synthetic MR is exported on one fixed scale (model -1 → 0,
  +1 → 1000 a.u., :data:`medaug.synth.layout.MR_EXPORT_RANGE`). With ``mr_scale="export"`` (default) every
  MR row, real or synthetic, is put on that export scale from model space, where the percentile
  normalization made volumes comparable; ``mr_scale="source"`` uses each row's own mapping instead.

Reported per set: ``median``, ``q25``, ``q75``, ``iqr`` (q75 - q25), ``n_pixels`` (pixels measured) and
``n_slices``; and ``median_difference`` (synthetic - real, in the units named), ``iqr_ratio`` (synthetic
/ real) and ``median_in_real_iqr`` (the synthetic median lies within the real interquartile range).
Above ``max_values`` pixels per (domain, structure, channel) and set, every pixel is kept with the same
probability (seeded), sized from the index's ``structure_pixels``, so the quantiles stay unbiased.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medaug.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from medaug.data.dataset import PreparedSliceDataset
    from medaug.prepare.intensity import IntensityMapping

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (domain, structure, channel)


@dataclass(frozen=True)
class FidelityConfig:
    """``max_values``: pixel values kept per (domain, structure, channel) and set; ``mr_scale``: "export"
    or "source" (module docstring); ``batch_size``: slices read at once; ``seed``: the subsampling draws."""

    max_values: int = 1_000_000
    mr_scale: Literal["export", "source"] = "export"
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mr_scale not in ("export", "source"):
            raise ConfigError("fidelity.mr_scale", f"is {self.mr_scale!r}; allowed values: export, source")
        if self.max_values < 1:
            raise ConfigError("fidelity.max_values", f"is {self.max_values}; expected a positive count")


def index_rows(dataset: PreparedSliceDataset, columns: list[str]) -> pd.DataFrame:
    """Index ``columns`` (plus ``slice_id``) of the dataset's rows, in the dataset's order."""
    from medaug.data.index import read_index
    from medaug.data.shards import index_file

    names = list(dict.fromkeys(["slice_id", *columns]))
    frame = read_index(index_file(dataset.root), columns=names).to_pandas().set_index("slice_id", drop=False)
    order = dataset.rows.column("slice_id").to_pylist()
    return frame.loc[order].reset_index(drop=True)


def export_mr_mapping() -> IntensityMapping:
    """The synthetic MR export scale as a mapping: model -1 → 0 a.u., +1 → 1000 a.u."""
    from medaug.prepare.intensity import IntensityMapping
    from medaug.synth.layout import MR_EXPORT_RANGE

    return IntensityMapping(kind="mr_export", low=MR_EXPORT_RANGE[0], high=MR_EXPORT_RANGE[1], units="a.u.")


def row_mappings(intensity_json: str, modality: str, config: FidelityConfig) -> list[IntensityMapping]:
    """The per-channel mappings used for one row (module docstring: CT own window, MR by ``mr_scale``)."""
    from medaug.data.index import intensity_from_json
    from medaug.prepare.intensity import IntensityMapping

    records = intensity_from_json(intensity_json)
    if modality.lower() == "mr" and config.mr_scale == "export":
        return [export_mr_mapping()] * len(records)
    return [IntensityMapping.from_dict(record) for record in records]


def _keep_rates(rows: pd.DataFrame, config: FidelityConfig) -> dict[tuple[str, str], float]:
    """Per (domain, structure): the probability of keeping a pixel, from the index's pixel counts."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for domain, names, pixels in zip(rows["domain"], rows["structures_present"], rows["structure_pixels"]):
        for name, count in zip(names, pixels):
            totals[(domain, name)] += int(count)
    return {key: min(1.0, config.max_values / total) if total else 1.0 for key, total in totals.items()}


def collect_values(dataset: PreparedSliceDataset, config: FidelityConfig) -> tuple[dict[Key, np.ndarray], dict[Key, int]]:
    """Pixel values in units per (domain, structure, channel) of every row of ``dataset``, and the number
    of slices each came from."""
    from medaug import vocab

    rows = index_rows(dataset, ["domain", "modality", "channels", "intensity", "structures_present", "structure_pixels"])
    rates = _keep_rates(rows, config)
    rng = np.random.default_rng(config.seed)
    values: dict[Key, list[np.ndarray]] = defaultdict(list)
    slices: dict[Key, int] = defaultdict(int)
    for start in range(0, len(rows), config.batch_size):
        batch = dataset.read_batch(list(range(start, min(start + config.batch_size, len(rows)))))
        images_BCHW, labels_BHW = batch["image"].float().clamp(-1.0, 1.0).numpy(), batch["label"].numpy()
        for b, row in enumerate(rows.iloc[start:start + len(labels_BHW)].itertuples()):
            mappings = row_mappings(row.intensity, row.modality, config)
            for name in row.structures_present:
                mask_HW = labels_BHW[b] == vocab.structure(name).id
                rate = rates[(row.domain, name)]
                if rate < 1.0:
                    mask_HW &= rng.random(mask_HW.shape) < rate
                for c, channel in enumerate(row.channels):
                    key = (row.domain, name, str(channel))
                    values[key].append(mappings[c].to_source(images_BCHW[b, c][mask_HW]))
                    slices[key] += 1
    return {key: np.concatenate(parts) for key, parts in values.items()}, dict(slices)


def describe(values: np.ndarray, n_slices: int) -> dict[str, Any]:
    """Median, quartiles, IQR and counts of a set of pixel values (None statistics when empty)."""
    if values.size == 0:
        return {"median": None, "q25": None, "q75": None, "iqr": None, "n_pixels": 0, "n_slices": n_slices}
    q25, median, q75 = (float(v) for v in np.quantile(values, [0.25, 0.5, 0.75]))
    return {"median": median, "q25": q25, "q75": q75, "iqr": q75 - q25, "n_pixels": int(values.size), "n_slices": n_slices}


def _compare(real: dict[str, Any], synthetic: dict[str, Any]) -> dict[str, Any]:
    if real["median"] is None or synthetic["median"] is None:
        return {"median_difference": None, "iqr_ratio": None, "median_in_real_iqr": None}
    ratio = synthetic["iqr"] / real["iqr"] if real["iqr"] > 0 else None
    inside = real["q25"] <= synthetic["median"] <= real["q75"]
    return {"median_difference": synthetic["median"] - real["median"], "iqr_ratio": ratio, "median_in_real_iqr": inside}


def compare_intensity(real: PreparedSliceDataset, synthetic: PreparedSliceDataset,
                      config: FidelityConfig | None = None) -> dict[str, Any]:
    """The fidelity section of metrics.json: ``{"mr_scale", "domains": {domain: {structure: {channel: {"units",
    "real", "synthetic", "median_difference", "iqr_ratio", "median_in_real_iqr"}}}}}`` over the structures
    present in either set."""
    config = config or FidelityConfig()
    real_values, real_slices = collect_values(real, config)
    synthetic_values, synthetic_slices = collect_values(synthetic, config)
    units = _channel_units(real, config) | _channel_units(synthetic, config)
    domains: dict[str, Any] = {}
    for key in sorted(set(real_values) | set(synthetic_values)):
        domain, structure, channel = key
        real_entry = describe(real_values.get(key, np.zeros(0)), real_slices.get(key, 0))
        synthetic_entry = describe(synthetic_values.get(key, np.zeros(0)), synthetic_slices.get(key, 0))
        entry = {"units": units.get((domain, channel)), "real": real_entry, "synthetic": synthetic_entry,
                 **_compare(real_entry, synthetic_entry)}
        domains.setdefault(domain, {}).setdefault(structure, {})[channel] = entry
    return {"mr_scale": config.mr_scale, "domains": domains}


def _channel_units(dataset: PreparedSliceDataset, config: FidelityConfig) -> dict[tuple[str, str], str]:
    """(domain, channel) → the units of the values measured ("HU", "a.u. (export scale 0-1000)", "a.u.")."""
    rows = index_rows(dataset, ["domain", "modality", "channels"]).drop_duplicates("domain")
    units = {}
    for row in rows.itertuples():
        is_mr = str(row.modality).lower() == "mr"
        label = "a.u. (export scale 0-1000)" if is_mr and config.mr_scale == "export" else ("a.u." if is_mr else "HU")
        units.update({(row.domain, str(channel)): label for channel in row.channels})
    return units


__all__ = [
    "FidelityConfig",
    "collect_values",
    "compare_intensity",
    "describe",
    "export_mr_mapping",
    "index_rows",
    "row_mappings",
]
