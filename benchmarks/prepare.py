"""Benchmark: slices/s of medaug's prepare harmonization vs a MONAI chain doing the same work, equal outputs checked.

DESIGN §5 target: with 2 CPU threads, prepare >= 2x a MONAI chain doing the same work on the same volumes in
the same run, with equal output (images within 1e-3 in model units, labels identical).

    python benchmarks/prepare.py                                  # 6 CT phantoms + the real TotalSegmentator CT
    python benchmarks/prepare.py --volumes 2 --repeats 1          # quick
    python benchmarks/prepare.py --json-out benchmarks/results/prepare-cpu2.json

**Volumes.** ``--volumes`` CT abdomen phantoms (``medaug.phantoms.write_phantoms``: int16 HU, 512x512x40,
0.74-0.94 mm pixels, labels uint8, NIfTI gz) written to a temporary folder, plus the real
``example_ct_sm.nii.gz`` + ``example_seg.nii.gz`` of ``--data`` (default ``../shared/real/totalsegmentator``:
122x101x30, 3 mm isotropic, so the 1.5 mm target is exactly 2x upsampling and half the lattice points lie
midway between two voxels). Domain ``ct/abdomen`` as the recipes set it: 1.5 mm in-plane, 256x256, window
[-160, 240] HU, slice spacing kept.

**medaug side** (timed): what ``medaug prepare`` does per volume up to the shard write:
``load_task`` (read the NIfTI image and label) then ``harmonize_volume`` with the recipe's domain (RAS,
plane, body mask, window, resampling of the kept slices straight into the 256x256 window, label remap and
pixel counts). ``medaug_prepare_one`` also times ``pipeline.prepare_one``: the same plus index rows,
fingerprints, float16 and the fsync'ed shard write.

**MONAI side** (timed): ``LoadImaged(image, label)`` -> ``EnsureChannelFirstd`` -> ``Orientationd("RAS")``
-> resample to 1.5 mm in-plane keeping z (``SpatialResample``, the transform ``Spacingd`` calls, images
bilinear, labels nearest, float32) -> ``ScaleIntensityRanged(-160, 240 -> -1, 1, clip)`` ->
``MapLabelValued`` (source ids -> vocabulary ids, the work medaug's remap does) -> ``BorderPadd`` (image -1,
label 0) -> ``SpatialCropd`` to medaug's 256x256 window. Chains are built before timing (one per volume,
because the window is per volume); ``torch.set_num_threads(2)`` holds for both sides (one process).
``monai_spacingd`` also times the textbook chain with ``Spacingd(pixdim=(1.5, 1.5, -1))`` on its own grid
and ``ResizeWithPadOrCropd`` (not compared: another grid), to show that aligning the grid (below) does not
change MONAI's cost.

**How equal outputs were achieved.**

* Grid. ``Spacingd`` keeps the world position of RAS voxel (0, 0, 0) and rounds the extent; medaug's
  lattice is anchored at the first *displayed* pixel (the last voxel of each in-plane RAS axis, see
  ``medaug/prepare/geometry.py``) and keeps the points inside the volume, so for non-integer spacing
  ratios (the phantoms) the two lattices differ by a sub-pixel shift. The MONAI chain is therefore given
  medaug's lattice as its destination, derived here (not from medaug's code) from medaug's output slice
  affines and the file's RAS affine (nibabel): the RAS-ordered lattice through the window's pixel centres
  over every point inside the volume, the full field of view that ``Spacingd`` would produce, then the
  crop window in that lattice. For the 3 mm volume the two grids coincide anyway (121 x 3 / 1.5 is an
  integer). The output's world positions are checked: MONAI's final affine maps each compared pixel to
  the same RAS point as medaug's slice affine (``max_world_diff_mm``).
* Interpolation. Both sample the same world points: medaug's ``grid_sample(align_corners=True)`` on
  voxel-centre coordinates; MONAI's ``AffineTransform`` converts its voxel-to-voxel affine to normalized
  coordinates for ``align_corners=False``. MONAI samples trilinearly in 3D with z on integer slice
  positions (weight ~1e-7 on neighbours). Images agree to ~1e-4 in model units (float32 positions).
* Array convention. medaug slice ``[row, col]`` (rows anterior -> posterior, columns right -> left) is
  MONAI's RAS volume ``[0, 255 - col, 255 - row, k]``: ``volume[0, ::-1, ::-1, k].T``.
* Slices. medaug drops slices with < 5% body (``min_body_fraction``); MONAI keeps all; only the slices
  medaug kept are compared, and both sides' slices/s use medaug's kept count (same numerator, so the
  ratio is the time ratio for the same volumes). Here every slice has body, so nothing is dropped.
* Labels. Compared after MONAI's ``MapLabelValued`` with the recipe's table (phantom ids through
  ``recipes/datasets/phantom_ct_abdomen.yaml``; TotalSegmentator ids are already vocabulary ids). At exact
  ties (a lattice point midway between two voxels: every second point of the 2x-upsampled 3 mm volume)
  "nearest" is a convention: medaug rounds half up, ``floor(x + 0.5)`` (as ITK and scipy order 0 do);
  torch ``grid_sample(mode="nearest")``, which the timed chain uses, rounds half to even on positions
  carrying float rounding. So the timed chain's labels are checked as: identical at every non-tie pixel,
  and at tie pixels equal to one of the tied source voxels' labels (``label_ties``). In the same run the
  chain is also run (untimed) with MONAI's other nearest option, ``mode=0`` (spline order 0 through
  scipy, ties rounded up), whose labels must be identical everywhere (``labels_identical_mode0``). The
  timed chain is the faster of the two MONAI options (order 0 costs ~0.15 s more per phantom).

What the MONAI chain does not do: the body mask and the crop window are medaug's (given to MONAI for
free); MONAI resamples every slice over the full field of view and then crops, where medaug resamples the
kept slices straight into the window. Both read the gzipped NIfTI from the page cache (files are warm).

**Timing.** ``--repeats`` rounds after one warm-up round; in each round every side processes every volume
(sides interleaved, so machine drift hits all sides alike); the median round is reported. Prints one JSON
object (and writes it to ``--json-out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import common
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import medaug  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import nibabel as nib
import nibabel.orientations as nio
from monai.transforms import (
    BorderPadd,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCropd,
    SpatialResample,
)

from medaug import vocab
from medaug.config.base import to_dict
from medaug.config.recipes import DatasetRecipe, load_dataset_recipe
from medaug.prepare.harmonize import HarmonizedVolume, harmonize_volume
from medaug.prepare.pipeline import PlannedVolume, label_table, prepare_one
from medaug.prepare.sources import VolumeTask, discover, load_task

THREADS = 2
TARGET_RATIO = 2.0
IMAGE_TOLERANCE = 1e-3  # model units
TIE_TOLERANCE_VOXELS = 1e-3  # a lattice point this close to a voxel midpoint is a tie
LATTICE_EPS = 1e-6
PHANTOM_RECIPE = REPO / "recipes/datasets/phantom_ct_abdomen.yaml"
REAL_RECIPE = REPO / "recipes/datasets/real_totalsegmentator_ct_sm.yaml"
DEFAULT_REAL_DIR = REPO.parent / "shared/real/totalsegmentator"
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # RAS, stated to silence MONAI's default-change warning
KEYS = ["image", "label"]
SIDES = {
    "medaug": "load_task (NIfTI image + label) -> harmonize_volume (ct/abdomen recipe domain)",
    "monai": "LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> SpatialResample onto medaug's lattice "
             "(image bilinear, label nearest, float32) -> ScaleIntensityRanged(-160, 240 -> -1, 1, clip) -> "
             "MapLabelValued -> BorderPadd -> SpatialCropd (medaug's window)",
    "medaug_prepare_one": "pipeline.prepare_one: medaug + index rows, fingerprints, float16, fsync'ed shard write",
    "monai_spacingd": "as monai, with Spacingd(pixdim=(1.5, 1.5, -1), float32) on MONAI's own grid and "
                      "ResizeWithPadOrCropd((256, 256, -1)); timing only, not compared",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- volumes


@dataclass
class Case:
    """One volume of the benchmark and everything both sides need for it."""

    name: str
    recipe: DatasetRecipe
    task: VolumeTask
    label_ids: dict[int, int] = field(default_factory=dict)  # source id -> vocabulary id


def make_cases(volumes: int, seed: int, real_dir: Path | None, workdir: Path) -> list[Case]:
    """``volumes`` phantoms written to ``workdir`` plus the real TotalSegmentator CT (if ``real_dir`` exists)."""
    from medaug.phantoms import write_phantoms

    cases = []
    if volumes > 0:
        write_phantoms(workdir, domains=["ct_abdomen"], n=volumes, seed=seed, formats=("nifti",))
        recipe = load_dataset_recipe(PHANTOM_RECIPE)
        cases += [Case(task.subject, recipe, task) for task in discover(workdir / "ct_abdomen", recipe)]
    if real_dir is not None and (real_dir / "example_ct_sm.nii.gz").is_file():
        recipe = load_dataset_recipe(REAL_RECIPE)
        cases += [Case(f"totalsegmentator/{task.subject}", recipe, task) for task in discover(real_dir, recipe)]
    elif real_dir is not None:
        log(f"skipping the real volume: {real_dir}/example_ct_sm.nii.gz not found")
    for case in cases:
        case.label_ids = vocabulary_ids(case)
    return cases


def vocabulary_ids(case: Case) -> dict[int, int]:
    """Source label id -> vocabulary id from the recipe's table (background 0, ignore 255)."""
    loaded = load_task(case.task, case.recipe)
    names = vocab.name_to_id()
    special = {"background": 0, "ignore": 255}
    return {int(source): special[name] if name in special else names[name] for source, name in label_table(case.task, loaded, case.recipe).items()}


# ---------------------------------------------------------------- medaug side


def medaug_harmonize(case: Case) -> HarmonizedVolume:
    """Read + harmonize one volume exactly as ``prepare`` does (``pipeline.harmonize_task``'s arguments)."""
    loaded = load_task(case.task, case.recipe)
    domain = case.recipe.domain
    return harmonize_volume(
        loaded.image, loaded.label, modality=domain.modality, channels=domain.channels,
        intensity={name: to_dict(mapping) for name, mapping in domain.intensity.items()},
        target_spacing_mm=domain.spacing_mm, size=domain.size, plane=domain.plane,
        min_body_fraction=domain.min_body_fraction, label_table=label_table(case.task, loaded, case.recipe),
        unmapped=case.recipe.unmapped, vocab_ids=vocab.name_to_id(),
    )


def medaug_prepare_one(case: Case, out: Path) -> None:
    """``pipeline.prepare_one``: read, harmonize, rows, fingerprints, float16, shard write (fsync)."""
    planned = PlannedVolume(case.task, str(case.recipe.name), case.recipe.domain.name)
    rejection = prepare_one(planned, case.recipe, case.recipe.domain, str(out))
    if rejection is not None:
        raise RuntimeError(f"prepare_one rejected {case.name}: {rejection['reason']}")


# ---------------------------------------------------------------- MONAI side


@dataclass(frozen=True)
class MonaiGrid:
    """medaug's output lattice for MONAI: the RAS-ordered full field of view and the crop window in it.

    ``affine`` maps lattice voxel (i', j', k) to RAS mm; ``shape`` (I', J', K); ``window_start`` (i', j') of the
    window's low corner (the window covers ``start .. start + size - 1``; it may leave the lattice).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    window_start: tuple[int, int]


def ras_geometry(path: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS-reoriented voxel->RAS affine and shape of a NIfTI file (nibabel, header only)."""
    image = nib.load(path)
    shape = image.shape[:3]
    transform = nio.ornt_transform(nio.io_orientation(image.affine), nio.axcodes2ornt("RAS"))
    ras_shape = tuple(int(shape[int(axis)]) for axis in transform[:, 0].argsort())
    return image.affine @ nio.inv_ornt_aff(transform, shape), ras_shape  # type: ignore[return-value]


def monai_grid(result: HarmonizedVolume, image_path: str, size: int) -> MonaiGrid:
    """Derive medaug's lattice from its slice affines: window pixel (r, c) -> RAS voxel index, then extend
    along the lattice over every point inside the volume (the full field of view ``Spacingd`` resamples)."""
    affine_ras, shape = ras_geometry(image_path)
    to_index = np.linalg.inv(affine_ras)
    slice_affine = result.affines[0]  # (4, 4) pixel (row, col, 0, 1) -> RAS mm
    first_pixel = (to_index @ slice_affine @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]  # window pixel (0, 0)
    col_step = to_index[:3, :3] @ slice_affine[:3, 1]  # columns run right -> left: (-s_i, 0, 0)
    row_step = to_index[:3, :3] @ slice_affine[:3, 0]  # rows run anterior -> posterior: (0, -s_j, 0)
    if result.plane != "axial" or np.abs(col_step[1:]).max() > LATTICE_EPS or np.abs(row_step[[0, 2]]).max() > LATTICE_EPS:
        raise RuntimeError(f"expected an axial, voxel-axis-aligned lattice; got columns {col_step}, rows {row_step}")
    steps = np.array([-col_step[0], -row_step[1]])  # lattice step in voxels along i, j (> 0)
    low = np.ceil(-first_pixel[:2] / steps - LATTICE_EPS).astype(int)  # lattice index m of the first point inside
    high = np.floor((np.array(shape[:2]) - 1 - first_pixel[:2]) / steps + LATTICE_EPS).astype(int)
    lattice = np.eye(4)
    lattice[[0, 1], [0, 1]] = steps
    lattice[:2, 3] = first_pixel[:2] + low * steps
    start = -(size - 1) - low  # window column c is lattice m = -c, i.e. i' = -c - low
    return MonaiGrid(affine_ras @ lattice, (int(high[0] - low[0] + 1), int(high[1] - low[1] + 1), int(shape[2])),
                     (int(start[0]), int(start[1])))


class ResampleToGridd(MapTransform):
    """``SpatialResample`` (what ``Spacingd`` runs) onto a given destination affine and shape, per key."""

    def __init__(self, keys: list[str], affine: np.ndarray, shape: tuple[int, ...], modes: tuple, dtype=torch.float32):
        super().__init__(keys)
        self.affine = torch.as_tensor(affine, dtype=torch.float64)
        self.shape = tuple(shape)
        self.resamplers = [SpatialResample(mode=mode, padding_mode="border" if isinstance(mode, str) else "nearest",
                                           align_corners=False, dtype=dtype) for mode in modes]

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key, resample in zip(self.keys, self.resamplers):
            out[key] = resample(out[key], dst_affine=self.affine, spatial_size=self.shape)
        return out


def monai_head() -> list:
    """Load, channel first, RAS: the start of every MONAI chain."""
    return [
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys=KEYS),
        Orientationd(keys=KEYS, axcodes="RAS", labels=ORIENTATION_LABELS),
    ]


def monai_intensity(case: Case) -> list:
    """Window to [-1, 1] and remap label ids to the vocabulary."""
    low, high = case.recipe.domain.intensity["ct"].window_hu
    source = sorted(case.label_ids)
    return [
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True),
        MapLabelValued(keys="label", orig_labels=source, target_labels=[case.label_ids[i] for i in source]),
    ]


def monai_chain(case: Case, grid: MonaiGrid, size: int, label_mode: str | int = "nearest") -> Compose:
    """The compared chain: resample onto medaug's lattice, window, remap, pad + crop to medaug's window."""
    pads, roi_start = [], []
    for axis in range(2):
        before = max(0, -grid.window_start[axis])
        after = max(0, grid.window_start[axis] + size - grid.shape[axis])
        pads += [before, after]
        roi_start.append(grid.window_start[axis] + before)
    return Compose([
        *monai_head(),
        ResampleToGridd(KEYS, grid.affine, grid.shape, modes=("bilinear", label_mode)),
        *monai_intensity(case),
        BorderPadd(keys="image", spatial_border=pads + [0, 0], mode="constant", value=-1.0),
        BorderPadd(keys="label", spatial_border=pads + [0, 0], mode="constant", value=0),
        SpatialCropd(keys=KEYS, roi_start=roi_start + [0], roi_end=[s + size for s in roi_start] + [grid.shape[2]]),
    ])


def spacingd_chain(case: Case, size: int) -> Compose:
    """The textbook chain on MONAI's own grid (timing reference only): Spacingd keeping z, centre crop/pad."""
    spacing = case.recipe.domain.spacing_mm
    return Compose([
        *monai_head(),
        Spacingd(keys=KEYS, pixdim=(spacing, spacing, -1), mode=("bilinear", "nearest"), dtype=torch.float32),
        *monai_intensity(case),
        ResizeWithPadOrCropd(keys=KEYS, spatial_size=(size, size, -1)),
    ])


def monai_input(case: Case) -> dict:
    return {"image": case.task.images[0], "label": case.task.label}


# ---------------------------------------------------------------- equality


def ras_to_display(volume_1XYZ: np.ndarray, slice_indices: np.ndarray) -> np.ndarray:
    """MONAI RAS volume (1, X, Y, Z) -> medaug slices (N, rows A->P, cols R->L): ``volume[0, ::-1, ::-1, k].T``."""
    return np.ascontiguousarray(volume_1XYZ[0, ::-1, ::-1, :].transpose(2, 1, 0)[slice_indices])


def world_difference_mm(result: HarmonizedVolume, monai_affine: np.ndarray, size: int) -> float:
    """Max distance between medaug's and MONAI's world position of each window corner, over compared slices."""
    worst = 0.0
    for slice_affine, k in zip(result.affines, result.slice_indices):
        for row, col in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
            medaug_mm = slice_affine @ np.array([row, col, 0.0, 1.0])
            monai_mm = monai_affine @ np.array([size - 1 - col, size - 1 - row, float(k), 1.0])
            worst = max(worst, float(np.abs(medaug_mm[:3] - monai_mm[:3]).max()))
    return worst


def tie_candidates(case: Case, result: HarmonizedVolume) -> tuple[np.ndarray, np.ndarray]:
    """Per compared pixel: is it an exact nearest-neighbour tie, and the labels of its candidate voxels.

    Returns ``(tie (H, W) bool, candidates (4, N, H, W) uint8)``: the remapped source labels at
    {floor, ceil} of each tied in-plane axis (round elsewhere), read from the file reoriented by nibabel.
    """
    image = nib.load(case.task.label)
    transform = nio.ornt_transform(nio.io_orientation(image.affine), nio.axcodes2ornt("RAS"))
    label_IJK = nio.apply_orientation(np.asarray(image.dataobj), transform).astype(np.int64)
    lut = np.zeros(max(label_IJK.max(), max(case.label_ids)) + 1, dtype=np.uint8)
    lut[list(case.label_ids)] = list(case.label_ids.values())
    affine_ras, shape = ras_geometry(case.task.label)
    size = result.images.shape[-1]
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    pixels = np.stack([rows, cols, np.zeros_like(rows), np.ones_like(rows)])  # (4, H, W)
    index = np.einsum("ab,bhw->ahw", np.linalg.inv(affine_ras) @ result.affines[0], pixels)[:2]  # (i, j) per pixel
    tie = np.abs(index - np.floor(index) - 0.5) < TIE_TOLERANCE_VOXELS  # (2, H, W)
    lower = np.where(tie, np.floor(index), np.floor(index + 0.5)).astype(np.int64)
    upper = np.where(tie, np.floor(index) + 1, lower).astype(np.int64)
    i_options, j_options = (lower[0], upper[0]), (lower[1], upper[1])
    candidates = []
    for i in i_options:
        for j in j_options:
            i_c, j_c = np.clip(i, 0, shape[0] - 1), np.clip(j, 0, shape[1] - 1)
            candidates.append(lut[label_IJK[i_c[None], j_c[None], result.slice_indices[:, None, None]]])
    return tie.any(axis=0), np.stack(candidates)


def compare(case: Case, result: HarmonizedVolume, monai_out: dict, mode0_label: np.ndarray) -> dict:
    """Image max |diff|, label mismatches (all / off ties / not a tied neighbour), mode-0 mismatches, world check."""
    size = result.images.shape[-1]
    image = ras_to_display(monai_out["image"].numpy(), result.slice_indices)
    label = ras_to_display(monai_out["label"].numpy(), result.slice_indices).round().astype(np.int64)
    mode0 = ras_to_display(mode0_label, result.slice_indices).round().astype(np.int64)
    mismatch = label != result.labels
    tie, candidates = tie_candidates(case, result)
    explained = (candidates == label[None]).any(axis=0)
    return {
        "name": case.name,
        "source_shape": list(nib.load(case.task.images[0]).shape),
        "slices_kept": int(len(result.slice_indices)),
        "slices_source": int(result.num_source_slices),
        "max_image_diff": float(np.abs(image - result.images[:, 0]).max()),
        "label_pixels": int(mismatch.size),
        "tie_pixels": int(tie.sum() * len(result.slice_indices)),
        "label_mismatches_nearest": int(mismatch.sum()),
        "label_mismatches_nearest_off_ties": int((mismatch & ~tie[None]).sum()),
        "label_mismatches_nearest_not_a_tied_neighbour": int((mismatch & ~explained).sum()),
        "label_mismatches_mode0": int((mode0 != result.labels).sum()),
        "max_world_diff_mm": world_difference_mm(result, monai_out["image"].affine.numpy(), size),
    }


def check_equality(cases: list[Case], results: list[HarmonizedVolume], chains: list[Compose], mode0_chains: list[Compose]) -> dict:
    """Run both MONAI variants once per volume and compare with medaug's outputs."""
    details = []
    for case, result, chain, mode0_chain in zip(cases, results, chains, mode0_chains):
        details.append(compare(case, result, chain(monai_input(case)), mode0_chain(monai_input(case))["label"].numpy()))
        log(f"checked {case.name}: {details[-1]}")
    summary = {
        "image_tolerance": IMAGE_TOLERANCE,
        "max_image_diff": max(d["max_image_diff"] for d in details),
        "label_mismatches_nearest": sum(d["label_mismatches_nearest"] for d in details),
        "label_mismatches_nearest_off_ties": sum(d["label_mismatches_nearest_off_ties"] for d in details),
        "label_mismatches_nearest_not_a_tied_neighbour": sum(d["label_mismatches_nearest_not_a_tied_neighbour"] for d in details),
        "label_mismatches_mode0": sum(d["label_mismatches_mode0"] for d in details),
        "max_world_diff_mm": max(d["max_world_diff_mm"] for d in details),
    }
    summary["images_equal"] = summary["max_image_diff"] <= IMAGE_TOLERANCE
    summary["labels_identical_mode0"] = summary["label_mismatches_mode0"] == 0
    summary["labels_nearest_differ_only_at_ties"] = (summary["label_mismatches_nearest_off_ties"] == 0
                                                     and summary["label_mismatches_nearest_not_a_tied_neighbour"] == 0)
    summary["pass"] = summary["images_equal"] and summary["labels_identical_mode0"] and summary["labels_nearest_differ_only_at_ties"]
    return {**summary, "volumes": details}


# ---------------------------------------------------------------- timing


def time_rounds(sides: dict[str, Callable[[int], None]], count: int, repeats: int) -> dict[str, np.ndarray]:
    """Seconds per side, round and volume, (repeats, count): one warm-up round (dropped), then ``repeats``
    rounds with the sides interleaved. ``sides[name](v)`` processes volume ``v``."""
    seconds = {name: np.zeros((repeats + 1, count)) for name in sides}
    for round_number in range(repeats + 1):
        for name, run_one in sides.items():
            for volume in range(count):
                start = time.perf_counter()
                run_one(volume)
                seconds[name][round_number, volume] = time.perf_counter() - start
        log(f"round {round_number}{' (warm-up)' if round_number == 0 else ''}: "
            + ", ".join(f"{name} {values[round_number].sum():.2f} s" for name, values in seconds.items()))
    return {name: values[1:] for name, values in seconds.items()}


# ---------------------------------------------------------------- report


def machine() -> dict:
    return common.machine(platform=platform.platform())


def versions() -> dict:
    import monai
    import scipy

    return {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "nibabel": nib.__version__, "scipy": scipy.__version__}


def commit() -> dict:
    return common.commit("medaug", "benchmarks/prepare.py", dirty_key="medaug_or_benchmark_uncommitted")


def rates(seconds: dict[str, np.ndarray], slices: int) -> dict:
    """slices/s of the median round per side, and the rounds' seconds."""
    medians = {name: float(np.median(values.sum(axis=1))) for name, values in seconds.items()}
    return {
        "slices_per_s": {name: round(slices / median, 1) for name, median in medians.items()},
        "seconds_median": {name: round(median, 3) for name, median in medians.items()},
        "seconds_rounds": {name: [round(float(v), 3) for v in values.sum(axis=1)] for name, values in seconds.items()},
    }


def per_volume(cases: list[Case], results: list[HarmonizedVolume], seconds: dict[str, np.ndarray]) -> list[dict]:
    """Median seconds per volume and side, with the volume's kept slices."""
    return [
        {"name": case.name, "slices": int(len(result.slice_indices)),
         "seconds_median": {name: round(float(np.median(values[:, number])), 3) for name, values in seconds.items()}}
        for number, (case, result) in enumerate(zip(cases, results))
    ]


def run(args: argparse.Namespace, workdir: Path) -> dict:
    torch.set_num_threads(THREADS)
    cases = make_cases(args.volumes, args.seed, None if args.data == Path("none") else args.data, workdir)
    if not cases:
        raise SystemExit("no volumes: give --volumes > 0 or a --data folder with example_ct_sm.nii.gz")
    size = cases[0].recipe.domain.size
    log(f"{len(cases)} volumes: {[case.name for case in cases]}")
    results = [medaug_harmonize(case) for case in cases]
    grids = [monai_grid(result, case.task.images[0], size) for case, result in zip(cases, results)]
    chains = [monai_chain(case, grid, size) for case, grid in zip(cases, grids)]
    mode0_chains = [monai_chain(case, grid, size, label_mode=0) for case, grid in zip(cases, grids)]
    spacing_chains = [spacingd_chain(case, size) for case in cases]
    equality = check_equality(cases, results, chains, mode0_chains)
    shard_root = workdir / "prepared"
    sides = {
        "medaug": lambda v: medaug_harmonize(cases[v]),
        "monai": lambda v: chains[v](monai_input(cases[v])),
        "medaug_prepare_one": lambda v: medaug_prepare_one(cases[v], shard_root),
        "monai_spacingd": lambda v: spacing_chains[v](monai_input(cases[v])),
    }
    load_before = os.getloadavg()[0]
    seconds = time_rounds(sides, len(cases), args.repeats)
    slices = sum(len(result.slice_indices) for result in results)
    figures = rates(seconds, slices)
    ratio = figures["seconds_median"]["monai"] / figures["seconds_median"]["medaug"]
    return {
        "benchmark": "prepare",
        "what": "slices/s of read + harmonize (ct/abdomen: RAS, 1.5 mm in-plane, z kept, window [-160, 240], "
                f"crop/pad 256^2, labels remapped), {THREADS} torch threads, medaug vs a MONAI chain on the same "
                "volumes in the same run; slices = medaug's kept slices on both sides",
        "medaug_slices_per_s": figures["slices_per_s"]["medaug"],
        "monai_slices_per_s": figures["slices_per_s"]["monai"],
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "pass": bool(ratio >= TARGET_RATIO and equality["pass"]),
        "sides": SIDES,
        "ratio_vs_monai_spacingd_own_grid": round(figures["seconds_median"]["monai_spacingd"] / figures["seconds_median"]["medaug"], 2),
        "volumes": len(cases),
        "phantom_volumes": args.volumes,
        "slices": slices,
        "source_slices": sum(result.num_source_slices for result in results),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        **figures,
        "per_volume": per_volume(cases, results, seconds),
        "equality": equality,
        "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": versions(),
        "machine": machine(),
        **commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=6, help="CT abdomen phantoms to write and process (default 6)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round (median reported)")
    parser.add_argument("--data", type=Path, default=DEFAULT_REAL_DIR,
                        help="folder with example_ct_sm.nii.gz + example_seg.nii.gz ('none' to skip)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # "nvImageCodec is not available" per reader
    with tempfile.TemporaryDirectory(prefix="medaug-bench-prepare-") as workdir:
        report = run(args, Path(workdir))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
