"""Tiny prepared datasets written with the real ShardWriter, and the arrays they were made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from medaug.data.shards import ShardWriter, write_assembled_index


def make_rows(volume_id: str, slices: int, channels: list[str], *, domain: str = "ct/abdomen",
              split: str | None = "train", group: str | None = None, labelled: bool = True,
              present: list[list[str]] | None = None) -> list[dict]:
    """Index rows of one synthetic volume (slice_index k = 10 + k, so it differs from the shard row)."""
    rows = []
    for k in range(slices):
        names = present[k] if present is not None else (["liver"] if labelled else [])
        rows.append({
            "volume_id": volume_id, "dataset": "tiny", "subject": f"subject-{volume_id}",
            "patient_group": group or f"subject-{volume_id}", "split": split, "domain": domain,
            "modality": "CT" if domain.startswith("ct") else "MR", "channels": channels,
            "source_image": [f"{volume_id}/{c}.nii.gz" for c in channels],
            "source_label": f"{volume_id}/label.nii.gz" if labelled else None,
            "slice_index": 10 + k, "plane": "axial", "spacing_mm": [1.5, 1.5], "slice_thickness_mm": 3.0,
            "affine": np.diag([1.5, 1.5, 3.0, 1.0]) + np.eye(4, k=3) * k,
            "intensity": [{"kind": "window", "low": -160.0, "high": 240.0, "units": "HU"}] * len(channels),
            "body_fraction": 0.25, "structures_annotated": ["liver", "spleen"] if labelled else [],
            "structures_present": names, "structure_pixels": [7] * len(names), "fingerprint": None,
        })
    return rows


@dataclass
class TinyDataset:
    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # volume_id -> (N, C, H, W) float32
    labels: dict[str, np.ndarray | None] = field(default_factory=dict)  # volume_id -> (N, H, W) uint8
    rows: dict[str, list[dict]] = field(default_factory=dict)


def random_volume(rng: np.random.Generator, slices: int, channels: int, size: int = 16,
                  labelled: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    images = rng.uniform(-1, 1, size=(slices, channels, size, size)).astype(np.float32)
    labels = rng.integers(0, 4, size=(slices, size, size), dtype=np.uint8) if labelled else None
    return images, labels


def write_tiny(root: Path, specs: list[dict], seed: int = 0) -> TinyDataset:
    """Write volumes described by ``specs`` (volume_id, slices, channels, and make_rows options)."""
    rng = np.random.default_rng(seed)
    tiny = TinyDataset(root)
    writer = ShardWriter(root, fsync=False)
    for spec in specs:
        spec = dict(spec)
        volume_id, slices, channels = spec.pop("volume_id"), spec.pop("slices"), spec.pop("channels")
        images, labels = random_volume(rng, slices, len(channels), labelled=spec.get("labelled", True))
        rows = make_rows(volume_id, slices, channels, **spec)
        writer.write_volume(volume_id, images, labels, rows)
        tiny.images[volume_id], tiny.labels[volume_id], tiny.rows[volume_id] = images, labels, rows
    write_assembled_index(root)
    return tiny


MIXED_SPECS = [
    {"volume_id": "a000000000000001", "slices": 5, "channels": ["ct"], "split": "train"},
    {"volume_id": "b000000000000002", "slices": 4, "channels": ["t2", "adc"], "domain": "mr/prostate",
     "split": "val", "present": [["prostate"], [], ["prostate", "bladder"], ["bladder"]]},
    {"volume_id": "c000000000000003", "slices": 3, "channels": ["ct"], "split": "test", "labelled": False},
    {"volume_id": "d000000000000004", "slices": 6, "channels": ["t2", "adc"], "domain": "mr/prostate",
     "split": "train"},
]


@pytest.fixture
def mixed(tmp_path: Path) -> TinyDataset:
    """Two domains (1 and 2 channels), three splits, one image-only volume: 18 slices of 16²."""
    return write_tiny(tmp_path / "prepared", MIXED_SPECS)
