"""End-to-end `prepare` on phantoms: geometry, intensity, labels, splits, lineage, resume, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medaug import vocab
from medaug.config.recipes import load_prepare_recipe
from medaug.data.index import read_index
from medaug.data.shards import ShardStore
from medaug.phantoms import make_phantom, write_phantoms
from medaug.prepare.pipeline import recipe_for_sources, run_prepare

REPO = Path(__file__).resolve().parents[2]
SMALL = (96, 96, 12)  # phantom voxels; the CT phantom's 380-480 mm field of view -> 4-5 mm pixels


def frame_of(out: Path) -> pd.DataFrame:
    return read_index(out / "index.parquet").to_pandas()


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("slice_id").reset_index(drop=True)


def ct_domain(spacing_mm: float = 4.0, size: int = 64) -> dict:
    return {"modality": "ct", "channels": ["ct"], "spacing_mm": spacing_mm, "size": size, "intensity": {"ct": {"window_hu": [-160, 240]}}}


def write_prepare_recipe(path: Path, sources: list[dict], domains: dict) -> Path:
    path.write_text(yaml.safe_dump({"sources": sources, "domains": domains}))
    return path


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, domains=["ct_abdomen"], n=3, seed=7, formats=("nifti", "dicom"), shape=SMALL)
    # the NIfTI copy as float32 (RAS), the DICOM copy int16 (LPS): two packagings of one scan
    from medaug.io import read_nifti, write_nifti

    for path in sorted((root / "ct_abdomen").glob("phantom_*/ct.nii.gz")):
        write_nifti(read_nifti(path), path, dtype="float32")
    return root


@pytest.fixture(scope="module")
def prepared_ct(phantom_root, tmp_path_factory) -> Path:
    """Three CT phantoms through two sources (NIfTI RAS float/int16 and int16 LPS DICOM)."""
    out = tmp_path_factory.mktemp("prepared")
    recipe = write_prepare_recipe(
        out.parent / f"{out.name}.yaml",
        [
            {"path": str(phantom_root / "ct_abdomen"), "dataset": str(REPO / "recipes/datasets/phantom_ct_abdomen.yaml")},
            {"path": str(phantom_root / "ct_abdomen_dicom"), "dataset": str(REPO / "recipes/datasets/phantom_ct_abdomen_dicom.yaml")},
        ],
        {"ct/abdomen": ct_domain()},
    )
    run_prepare(load_prepare_recipe(recipe), out)
    return out


def test_dataset_files_exist(prepared_ct):
    for name in ("index.parquet", "rejected.parquet", "domains.json", "vocab.json", "prepare.json"):
        assert (prepared_ct / name).is_file(), name
    record = json.loads((prepared_ct / "prepare.json").read_text())
    assert record["counts"]["slices"] == len(frame_of(prepared_ct))
    assert all(len(checksum) == 64 for checksum in record["inputs"].values())
    assert not (prepared_ct / "prepare.partial.json").exists()


def test_same_scan_through_two_sources_joins_one_patient_group(prepared_ct, phantom_root):
    import nibabel as nib

    assert nib.load(phantom_root / "ct_abdomen/phantom_0000/ct.nii.gz").get_data_dtype() == np.float32
    frame = frame_of(prepared_ct)
    volumes = frame.groupby("volume_id").first()
    assert len(volumes) == 6  # 3 subjects x 2 sources
    groups_per_subject = volumes.groupby("subject")["patient_group"].nunique()
    assert (groups_per_subject == 1).all(), groups_per_subject
    assert volumes["patient_group"].nunique() == 3


def test_splits_never_share_a_patient_group(prepared_ct):
    frame = frame_of(prepared_ct)
    assert set(frame["split"]) <= {"train", "val", "test"}
    assert (frame.groupby("patient_group")["split"].nunique() == 1).all()


def test_labels_are_vocabulary_ids_and_match_the_index(prepared_ct):
    frame = frame_of(prepared_ct)
    store = ShardStore(prepared_ct)
    allowed = {vocab.structure(name).id for name in frame["structures_annotated"].iloc[0]} | {0}
    for _, row in frame.iterrows():
        _, label = store.read(row["shard"], int(row["shard_row"]))
        values, counts = np.unique(label, return_counts=True)
        assert set(values.tolist()) <= allowed
        expected = {vocab.structure(n).id: c for n, c in zip(row["structures_present"], row["structure_pixels"])}
        assert {int(v): int(c) for v, c in zip(values, counts) if v != 0} == expected


def test_known_voxel_lands_at_the_right_pixel(prepared_ct, phantom_root):
    """The liver centroid of the source phantom, mapped through each stored slice affine, is liver."""
    frame = frame_of(prepared_ct)
    phantom = make_phantom("ct_abdomen", seed=json.loads((phantom_root / "ct_abdomen/phantom_0000/phantom.json").read_text())["seed"], shape=SMALL)
    liver_id_source = [k for k, v in phantom.labels.items() if v == "liver"][0]
    ijk = np.argwhere(phantom.label.array[0] == liver_id_source).mean(axis=0).round()
    point_ras = phantom.label.voxel_to_world(ijk)
    rows = frame[(frame["subject"] == "phantom_0000") & (frame["dataset"] == "phantom_ct_abdomen")]
    store = ShardStore(prepared_ct)
    hits = 0
    for _, row in rows.iterrows():
        affine = np.asarray(row["affine"]).reshape(4, 4)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :2], axis=0), [4.0, 4.0], atol=1e-6)
        pixel = np.linalg.inv(affine) @ np.append(point_ras, 1.0)
        if abs(pixel[2]) < 0.5:  # the point lies in this slice
            _, label = store.read(row["shard"], int(row["shard_row"]))
            assert label[int(round(pixel[0])), int(round(pixel[1]))] == vocab.structure("liver").id
            hits += 1
    assert hits == 1


def test_liver_lies_on_the_patients_right_in_every_slice(prepared_ct):
    """Axial convention: columns run patient right -> left, so the liver is in the image's left half."""
    frame = frame_of(prepared_ct)
    store = ShardStore(prepared_ct)
    liver, spleen = vocab.structure("liver").id, vocab.structure("spleen").id
    checked = 0
    for _, row in frame.iterrows():
        if {"liver", "spleen"} <= set(row["structures_present"]):
            _, label = store.read(row["shard"], int(row["shard_row"]))
            assert np.argwhere(label == liver)[:, 1].mean() < np.argwhere(label == spleen)[:, 1].mean()
            checked += 1
    assert checked > 0


def test_ct_intensity_round_trips_through_the_stored_inverse(tmp_path):
    """HU that vary linearly in world space come back at each pixel's world position within 1 HU."""
    from medaug.io import Volume, write_nifti

    i, j, k = np.meshgrid(np.arange(40), np.arange(36), np.arange(6), indexing="ij")
    affine = np.array([[-3.0, 0, 0, 60], [0, -3.0, 0, 50], [0, 0, 5.0, -10], [0, 0, 0, 1]])  # LPS-like storage
    xyz = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ affine.T
    hu = (0.9 * xyz[..., 0] - 0.7 * xyz[..., 1] + 30.0).astype(np.float32)  # -90..150 HU: inside the window
    subject = tmp_path / "src" / "s1"
    write_nifti(Volume(hu[None], affine), subject / "ct.nii.gz")
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "linear_ct", "layout": "subjects", "channels": ["ct"], "images": {"ct": "ct.nii.gz"},
        "domain": {"name": "ct/test", **ct_domain(spacing_mm=2.5, size=64), "min_body_fraction": 0.0},
    }))
    out = tmp_path / "out"
    run_prepare(recipe_for_sources(recipe, [str(tmp_path / "src")]), out)
    frame = frame_of(out)
    store = ShardStore(out)
    assert len(frame) == 6
    for _, row in frame.iterrows():
        image, label = store.read(row["shard"], int(row["shard_row"]))
        assert label is None
        mapping = json.loads(row["intensity"])[0]
        affine_slice = np.asarray(row["affine"]).reshape(4, 4)
        r, c = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
        world = np.stack([r, c, np.zeros_like(r), np.ones_like(r)], -1) @ affine_slice.T
        expected = 0.9 * world[..., 0] - 0.7 * world[..., 1] + 30.0
        inside = _inside_source(world, affine, hu.shape)
        back = image[0].astype(np.float64) * mapping["scale"] + mapping["offset"]
        assert inside.sum() > 1000
        np.testing.assert_allclose(back[inside], expected[inside], atol=1.0)


def _inside_source(world_HW4: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose world position lies inside the source grid, one voxel away from its in-plane border."""
    ijk = world_HW4 @ np.linalg.inv(affine).T
    in_plane = [(ijk[..., a] >= 1) & (ijk[..., a] <= shape[a] - 2) for a in range(2)]
    return np.all(in_plane + [np.abs(ijk[..., 2] - np.round(ijk[..., 2])) < 1e-6], axis=0)


def test_resume_after_a_kill_equals_an_uninterrupted_run(phantom_root, tmp_path, monkeypatch):
    from medaug.data import shards

    config = recipe_for_sources(REPO / "recipes/datasets/phantom_ct_abdomen.yaml", [str(phantom_root / "ct_abdomen")])
    config = type(config)(sources=config.sources, domains={"ct/abdomen": _domain_config()})
    whole = tmp_path / "whole"
    run_prepare(config, whole)

    killed = tmp_path / "killed"
    original = shards.ShardWriter.write_volume
    calls = {"n": 0}

    def dies_on_second_volume(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill half way: nothing of this volume counts as complete
        return original(self, *args, **kwargs)

    monkeypatch.setattr(shards.ShardWriter, "write_volume", dies_on_second_volume)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(config, killed)
    assert not (killed / "index.parquet").exists()
    monkeypatch.setattr(shards.ShardWriter, "write_volume", original)
    summary = run_prepare(config, killed)
    assert summary.volumes_skipped == 1 and summary.volumes_done == 2
    pd.testing.assert_frame_equal(comparable(frame_of(whole)), comparable(frame_of(killed)))


def _domain_config():
    from medaug.config.base import from_dict
    from medaug.config.recipes import DomainConfig

    return from_dict(DomainConfig, {**ct_domain(), "name": "ct/abdomen"}, "test")


def test_shards_then_merge_equal_one_run(phantom_root, tmp_path):
    from medaug.prepare.merge import merge_prepared

    config = recipe_for_sources(REPO / "recipes/datasets/phantom_ct_abdomen.yaml", [str(phantom_root / "ct_abdomen")])
    config = type(config)(sources=config.sources, domains={"ct/abdomen": _domain_config()})
    run_prepare(config, tmp_path / "whole")
    for index in range(2):
        run_prepare(config, tmp_path / f"part{index}", shard=(index, 2))
    merge_prepared([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    pd.testing.assert_frame_equal(comparable(frame_of(tmp_path / "whole")), comparable(frame_of(tmp_path / "merged")))


def test_row_order_does_not_depend_on_the_source_folder(phantom_root, tmp_path):
    """Volume ids hash the source paths; the index's row order (which samplers permute) must not."""
    import shutil

    frames = []
    for name in ("here", "somewhere/else"):
        source = tmp_path / name / "ct_abdomen"
        shutil.copytree(phantom_root / "ct_abdomen", source)
        config = recipe_for_sources(REPO / "recipes/datasets/phantom_ct_abdomen.yaml", [str(source)])
        config = type(config)(sources=config.sources, domains={"ct/abdomen": _domain_config()})
        run_prepare(config, tmp_path / name / "out")
        frames.append(frame_of(tmp_path / name / "out"))
    assert set(frames[0]["volume_id"]).isdisjoint(frames[1]["volume_id"])  # the premise: ids differ
    by_path = ["slice_id", "volume_id", "shard", "source_image", "source_label"]
    pd.testing.assert_frame_equal(frames[0].drop(columns=by_path), frames[1].drop(columns=by_path))


def test_merge_refuses_different_domains(phantom_root, tmp_path):
    from medaug.config.base import from_dict
    from medaug.config.recipes import DomainConfig
    from medaug.errors import ConfigError
    from medaug.prepare.merge import merge_prepared

    config = recipe_for_sources(REPO / "recipes/datasets/phantom_ct_abdomen.yaml", [str(phantom_root / "ct_abdomen")])
    first = type(config)(sources=config.sources, domains={"ct/abdomen": _domain_config()})
    other = from_dict(DomainConfig, {**ct_domain(spacing_mm=5.0), "name": "ct/abdomen"}, "test")
    second = type(config)(sources=config.sources, domains={"ct/abdomen": other})
    run_prepare(first, tmp_path / "a", shard=(0, 2))
    run_prepare(second, tmp_path / "b", shard=(1, 2))
    with pytest.raises(ConfigError, match="domains differ"):
        merge_prepared([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
