"""`prepare` on every scan in ../shared/real, through recipes/shared-real.yaml."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medaug import vocab
from medaug.config.recipes import load_prepare_recipe
from medaug.data.index import read_index
from medaug.data.shards import ShardStore
from medaug.prepare.pipeline import run_prepare

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared_real(real_dir, tmp_path_factory) -> Path:
    recipe = load_prepare_recipe(REPO / "recipes/shared-real.yaml")
    prefix = "../../shared/real"
    sources = [replace(source, path=str(real_dir / source.path[len(prefix) + 1 :])) for source in recipe.sources]
    out = tmp_path_factory.mktemp("real")
    run_prepare(replace(recipe, sources=sources), out, recipe_dir=REPO / "recipes", workers=2)
    return out


@pytest.fixture(scope="module")
def frame(prepared_real):
    return read_index(prepared_real / "index.parquet").to_pandas()


def hu_of(prepared: Path, frame, dataset: str, name: str) -> np.ndarray:
    """HU of every pixel labelled ``name`` in ``dataset``'s slices, through the stored inverse mapping."""
    store = ShardStore(prepared)
    values = []
    for _, row in frame[frame["dataset"] == dataset].iterrows():
        if name in row["structures_present"]:
            image, label = store.read(row["shard"], int(row["shard_row"]))
            mapping = json.loads(row["intensity"])[0]
            values.append(image[0][label == vocab.structure(name).id].astype(np.float64) * mapping["scale"] + mapping["offset"])
    return np.concatenate(values)


def test_every_real_volume_is_prepared(prepared_real, frame):
    import pyarrow.parquet as pq

    assert pq.read_table(prepared_real / "rejected.parquet").num_rows == 0
    datasets = set(frame["dataset"])
    assert datasets == {
        "brats2013",
        "real_totalsegmentator_ct_sm",
        "real_totalsegmentator_ct",
        "real_totalsegmentator_ct_dicom",
        "real_totalsegmentator_mr",
        "real_pyradiomics_brain",
        "real_dcm_qa_nih_mosaic",
    }
    assert frame.groupby("dataset")["volume_id"].nunique()["real_dcm_qa_nih_mosaic"] == 2  # two time points


def test_brats_is_sliced_axially_with_pinned_splits(frame):
    brats = frame[frame["dataset"] == "brats2013"]
    assert set(brats["plane"]) == {"axial"}
    for affine in brats["affine"]:
        normal = np.asarray(affine).reshape(4, 4)[:3, 2]
        assert abs(normal[2]) / np.linalg.norm(normal) > 0.99
        np.testing.assert_allclose(np.linalg.norm(np.asarray(affine).reshape(4, 4)[:3, :2], axis=0), [1.0, 1.0], atol=1e-6)
    assert set(brats[brats["subject"] == "pat0005"]["split"]) == {"train"}
    assert set(brats[brats["subject"] == "pat0006"]["split"]) == {"test"}
    assert {"brain_tumor_edema", "brain_tumor_enhancing"} <= set(brats["structures_annotated"].iloc[0])


def test_the_same_scan_through_two_recipes_joins_one_patient_group(frame):
    groups = frame.groupby("dataset")["patient_group"].first()
    assert groups["real_totalsegmentator_ct"] == groups["real_totalsegmentator_ct_sm"]
    assert frame.groupby("patient_group")["split"].nunique().max() == 1


def test_dicom_labels_align_in_physical_space(prepared_real, frame):
    """example_seg_dicom is stored with y and z flipped against the series: aligned by affine, organs read right."""
    dataset = "real_totalsegmentator_ct_dicom"
    assert 75 <= np.median(hu_of(prepared_real, frame, dataset, "liver")) <= 100
    assert 70 <= np.median(hu_of(prepared_real, frame, dataset, "spleen")) <= 100
    assert 140 <= np.median(hu_of(prepared_real, frame, dataset, "aorta")) <= 240


def test_3mm_ct_organs_keep_their_hu(prepared_real, frame, real_dir):
    """Liver and spleen of example_ct_sm (3 mm, upsampled exactly 2x) keep their source median HU."""
    import nibabel as nib

    image = np.asarray(nib.load(real_dir / "totalsegmentator/example_ct_sm.nii.gz").dataobj)
    label = np.asarray(nib.load(real_dir / "totalsegmentator/example_seg.nii.gz").dataobj)
    for name in ("liver", "spleen"):
        source = np.median(image[label == vocab.structure(name).id])
        prepared = np.median(hu_of(prepared_real, frame, "real_totalsegmentator_ct_sm", name))
        assert abs(prepared - source) < 5, (name, source, prepared)


def test_spacing_and_labels_are_vocabulary_ids(prepared_real, frame):
    store = ShardStore(prepared_real)
    ids = {s.id for s in vocab.VOCABULARY.values()} | {0}
    for _, row in frame.sample(n=40, random_state=0).iterrows():
        image, label = store.read(row["shard"], int(row["shard_row"]))
        assert image.shape == (len(row["channels"]), row["height"], row["width"])
        assert np.abs(image).max() <= 1.001
        if label is not None:
            assert set(np.unique(label).tolist()) <= ids
