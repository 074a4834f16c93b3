"""Bad input during `prepare`: each volume lands in rejected.parquet with a one-line reason, the run goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from medaug.config.recipes import load_dataset_recipe, load_prepare_recipe
from medaug.data.index import read_index
from medaug.errors import ConfigError
from medaug.io import Volume, write_nifti
from medaug.prepare.pipeline import recipe_for_sources, run_prepare

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def ct_volume(shape=(40, 40, 5)) -> np.ndarray:
    """A disc of soft tissue (40 HU) in air, so every slice has a body."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    disc = (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 < (shape[0] / 3) ** 2
    return np.where(disc[..., None], 40.0, -1000.0).repeat(shape[2], axis=2).astype(np.float32)


def label_volume(shape=(40, 40, 5), value=1) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[15:25, 15:25] = value
    return label


def write_subject(root: Path, name: str, image=None, label=None, image_affine=AFFINE, label_affine=AFFINE) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if image is not None:
        write_nifti(Volume(image[None] if image.ndim == 3 else np.moveaxis(image, -1, 0), image_affine), folder / "ct.nii.gz")
    if label is not None:
        write_nifti(Volume(label[None], label_affine), folder / "label.nii.gz")
    return folder


def write_recipe(path: Path, **overrides) -> Path:
    recipe = {
        "name": "bad_inputs",
        "layout": "subjects",
        "subjects": "case*",
        "channels": ["ct"],
        "images": {"ct": "ct.nii.gz"},
        "label": "label.nii.gz",
        "labels": {1: "liver"},
        "unmapped": "reject",
        "domain": {"name": "ct/test", "modality": "ct", "channels": ["ct"], "spacing_mm": 2.0, "size": 64,
                   "intensity": {"ct": {"window_hu": [-160, 240]}}},
    }
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    source = root / "source"
    write_subject(source, "case00_good", ct_volume(), label_volume())
    write_subject(source, "case01_unmapped", ct_volume(), label_volume(value=7))
    far = AFFINE.copy()
    far[:3, 3] = [900.0, 900.0, 900.0]
    write_subject(source, "case02_label_elsewhere", ct_volume(), label_volume(), label_affine=far)
    write_subject(source, "case03_4d", np.stack([ct_volume(), ct_volume()], axis=-1), label_volume())
    coarse = np.diag([5.0, 5.0, 3.0, 1.0])
    write_subject(source, "case04_upsampling", ct_volume(), label_volume(), image_affine=coarse, label_affine=coarse)
    truncated = write_subject(source, "case05_truncated", ct_volume(), label_volume())
    data = (truncated / "ct.nii.gz").read_bytes()
    (truncated / "ct.nii.gz").write_bytes(data[: len(data) // 2])
    not_image = write_subject(source, "case06_not_image", None, label_volume())
    (not_image / "ct.nii.gz").write_text("this is a text file\n")
    nan = ct_volume()
    nan[3, 3, 2] = np.nan
    write_subject(source, "case07_nan", nan, label_volume())
    write_subject(source, "case08_label_shape", ct_volume(), label_volume(shape=(40, 40, 4)), label_affine=AFFINE)
    recipe = write_recipe(root / "recipe.yaml")
    out = root / "out"
    summary = run_prepare(recipe_for_sources(recipe, [str(source)]), out)
    rejected = {row["subject"]: row["reason"] for row in pq.read_table(out / "rejected.parquet").to_pylist()}
    return summary, rejected, out


@pytest.mark.parametrize(
    "subject, fragments",
    [
        ("case01_unmapped", ["label", "7"]),
        ("case02_label_elsewhere", ["label.nii.gz", "overlap"]),
        ("case03_4d", ["ct.nii.gz", "2-frame", "channel"]),
        ("case04_upsampling", ["5", "2"]),
        ("case05_truncated", ["ct.nii.gz", "expected"]),
        ("case06_not_image", ["ct.nii.gz", "expected"]),
        ("case07_nan", ["ct.nii.gz", "NaN"]),
        ("case08_label_shape", ["label"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_bad_volume_is_rejected_with_a_reason(bad_run, subject, fragments):
    _, rejected, _ = bad_run
    assert subject in rejected, sorted(rejected)
    reason = rejected[subject]
    assert "\n" not in reason
    for fragment in fragments:
        assert fragment in reason, reason


def test_the_run_goes_on_and_counts_rejections(bad_run):
    summary, rejected, out = bad_run
    assert summary.volumes_rejected == len(rejected) == 8
    frame = read_index(out / "index.parquet").to_pandas()
    assert set(frame["subject"]) == {"case00_good"}
    assert summary.slices == len(frame) == 5


@pytest.mark.parametrize("policy, expected", [("background", {0}), ("ignore", {0, 255})])
def test_unmapped_policies(tmp_path, policy, expected):
    from medaug.data.shards import ShardStore

    write_subject(tmp_path / "source", "case01", ct_volume(), label_volume(value=7))
    out = tmp_path / "out"
    run_prepare(recipe_for_sources(write_recipe(tmp_path / "r.yaml", unmapped=policy), [str(tmp_path / "source")]), out)
    frame = read_index(out / "index.parquet").to_pandas()
    _, label = ShardStore(out).read(frame["shard"].iloc[2], int(frame["shard_row"].iloc[2]))
    assert set(np.unique(label).tolist()) == expected
    assert frame["structures_present"].iloc[2].tolist() == []


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        ({"layout": "folders"}, "layout", "msd, nnunet, totalsegmentator, subjects, dicom, images"),
        ({"unmapped": "drop"}, "unmapped", "background, ignore, reject"),
        ({"colour": "red"}, "colour", "allowed keys"),
        ({"labels": {1: "livr"}}, "labels.1", "liver"),
    ],
    ids=["layout", "unmapped", "unknown-key", "vocabulary-name"],
)
def test_bad_dataset_recipes_fail_before_any_work(tmp_path, overrides, key, allowed):
    recipe = write_recipe(tmp_path / "r.yaml", **overrides)
    with pytest.raises(ConfigError) as info:
        load_dataset_recipe(recipe)
    assert info.value.where.endswith(key)
    assert allowed in info.value.reason


def test_prepare_recipe_with_unknown_domain_fails_before_any_work(tmp_path):
    from medaug.prepare.pipeline import plan

    dataset = write_recipe(tmp_path / "dataset.yaml")
    write_subject(tmp_path / "source", "case01", ct_volume(), label_volume())
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text(yaml.safe_dump({
        "sources": [{"path": str(tmp_path / "source"), "dataset": str(dataset), "domain": "ct/elsewhere"}],
        "domains": {"ct/test": {"modality": "ct", "channels": ["ct"], "spacing_mm": 2.0, "intensity": {"ct": {"window_hu": [-160, 240]}}}},
    }))
    with pytest.raises(ConfigError, match="allowed: ct/test"):
        plan(load_prepare_recipe(recipe))
    assert not (tmp_path / "out").exists()
