"""Source layouts: MSD, nnU-Net v2, TotalSegmentator masks, DICOM tree with SEG, image-only; each
prepared end to end from small files built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medaug import vocab
from medaug.config.recipes import load_dataset_recipe
from medaug.data.index import read_index
from medaug.data.shards import ShardStore
from medaug.io import Volume, write_nifti
from medaug.prepare.pipeline import recipe_for_sources, run_prepare
from medaug.prepare.sources import discover

AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])
SHAPE = (32, 32, 4)


def disc(shape=SHAPE, radius=10.0, centre=(16, 16)) -> np.ndarray:
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return ((i - centre[0]) ** 2 + (j - centre[1]) ** 2 < radius**2)[..., None].repeat(shape[2], axis=2)


def mr_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(disc(), 200.0 + 20 * rng.standard_normal(SHAPE), 2.0).astype(np.float32)


def two_zone_label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[disc(radius=6)] = 2
    label[disc(radius=6, centre=(16, 24)) & ~disc(radius=6)] = 1
    return label


def mr_domain(channels: list[str]) -> dict:
    return {"name": "mr/test", "modality": "mr", "channels": channels, "spacing_mm": 2.0, "size": 32,
            "intensity": {c: {"percentiles": [0.5, 99.5]} for c in channels}}


def recipe_file(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def prepared(tmp_path: Path, recipe: Path, source: Path):
    out = tmp_path / "out"
    summary = run_prepare(recipe_for_sources(recipe, [str(source)]), out)
    return summary, read_index(out / "index.parquet").to_pandas(), ShardStore(out)


def test_msd_task_with_4d_multimodal_images(tmp_path):
    root = tmp_path / "Task05_Prostate"
    for index in range(3):
        image = np.stack([mr_image(index), mr_image(index + 10) * 0.5], axis=-1)  # (I, J, K, 2): T2 + ADC
        write_nifti(Volume(np.moveaxis(image, -1, 0), AFFINE), root / f"imagesTr/prostate_{index:02d}.nii.gz")
        write_nifti(Volume(two_zone_label()[None], AFFINE), root / f"labelsTr/prostate_{index:02d}.nii.gz")
    (root / "imagesTr/._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    write_nifti(Volume(np.moveaxis(np.stack([mr_image(9)] * 2, -1), -1, 0), AFFINE), root / "imagesTs/prostate_09.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": [{"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"} for i in range(3)]
        + [{"image": "./imagesTr/._prostate_00.nii.gz", "label": "./labelsTr/._prostate_00.nii.gz"}],
        "test": ["./imagesTs/prostate_09.nii.gz"],
    }))
    recipe = recipe_file(tmp_path / "msd.yaml", name="msd_test", layout="msd", channels=["t2", "adc"],
                         labels={1: "prostate_peripheral_zone", 2: "prostate_transition_zone"}, domain=mr_domain(["t2", "adc"]))
    tasks = discover(root, load_dataset_recipe(recipe))
    assert [t.subject for t in tasks] == ["prostate_00", "prostate_01", "prostate_02", "prostate_09"]
    summary, frame, store = prepared(tmp_path, recipe, root)
    assert summary.volumes_rejected == 0 and frame["volume_id"].nunique() == 4
    labelled = frame[frame["subject"] == "prostate_01"].iloc[0]
    image, label = store.read(labelled["shard"], int(labelled["shard_row"]))
    assert image.shape == (2, 32, 32)
    assert set(np.unique(label)) == {0, vocab.structure("prostate_peripheral_zone").id, vocab.structure("prostate_transition_zone").id}
    test_row = frame[frame["subject"] == "prostate_09"].iloc[0]
    assert store.read(test_row["shard"], int(test_row["shard_row"]))[1] is None
    assert list(test_row["structures_annotated"]) == []


def test_nnunet_v2_with_region_labels_and_ignore(tmp_path):
    root = tmp_path / "Dataset001_Test"
    for index in range(2):
        for channel in range(2):
            write_nifti(Volume(mr_image(index * 2 + channel)[None], AFFINE), root / f"imagesTr/case{index}_{channel:04d}.nii.gz")
        label = two_zone_label()
        label[0:3, 0:3] = 3  # the dataset's "ignore" label
        write_nifti(Volume(label[None], AFFINE), root / f"labelsTr/case{index}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "whole_gland": [1, 2], "TZ": 2, "ignore": 3},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }))
    recipe = recipe_file(tmp_path / "nnunet.yaml", name="nnunet_test", layout="nnunet", channels=["t2", "adc"],
                         labels={1: "prostate_peripheral_zone", 2: "prostate_transition_zone"},
                         domain={**mr_domain(["t2", "adc"]), "min_body_fraction": 0.0})
    summary, frame, store = prepared(tmp_path, recipe, root)
    assert summary.volumes_rejected == 0 and frame["volume_id"].nunique() == 2
    row = frame.iloc[0]
    _, label = store.read(row["shard"], int(row["shard_row"]))
    assert (label == vocab.IGNORE).sum() > 0  # the ignore label became 255, not a structure and not a rejection


def test_totalsegmentator_folder_of_binary_masks(tmp_path):
    root = tmp_path / "ts"
    for subject in ("s0001", "s0002"):
        ct = np.where(disc(), 40.0, -1000.0).astype(np.float32)
        write_nifti(Volume(ct[None], AFFINE), root / subject / "ct.nii.gz")
        write_nifti(Volume(disc(radius=5).astype(np.uint8)[None], AFFINE), root / subject / "segmentations/liver.nii.gz")
        write_nifti(Volume(disc(radius=3, centre=(16, 26)).astype(np.uint8)[None], AFFINE), root / subject / "segmentations/spleen.nii.gz")
        write_nifti(Volume(np.zeros(SHAPE, np.uint8)[None], AFFINE), root / subject / "segmentations/kidney_left.nii.gz")
    recipe = recipe_file(tmp_path / "ts.yaml", name="ts_test", layout="totalsegmentator", channels=["ct"],
                         domain={"name": "ct/test", "modality": "ct", "channels": ["ct"], "spacing_mm": 2.0, "size": 32,
                                 "intensity": {"ct": {"window_hu": [-160, 240]}}})
    summary, frame, store = prepared(tmp_path, recipe, root)
    assert summary.volumes_rejected == 0 and frame["volume_id"].nunique() == 2
    row = frame.iloc[1]
    assert list(row["structures_annotated"]) == ["kidney_left", "liver", "spleen"]  # an empty mask is still annotated
    assert list(row["structures_present"]) == ["liver", "spleen"]
    _, label = store.read(row["shard"], int(row["shard_row"]))
    assert (label == vocab.structure("liver").id).sum() == row["structure_pixels"][0]


def test_dicom_tree_with_dicom_seg_labels(tmp_path):
    """A DICOM tree (two phantom CT series) with a DICOM SEG referencing one of them."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medaug.phantoms import write_phantoms

    write_phantoms(tmp_path / "ph", domains=["ct_abdomen"], n=2, seed=5, formats=("dicom",), shape=(48, 48, 8))
    tree = tmp_path / "ph" / "ct_abdomen_dicom"
    series_files = sorted((tree / "phantom_0000" / "ct").glob("*.dcm"))
    images = [pydicom.dcmread(path) for path in series_files]
    mask = np.stack([image.pixel_array > 1100 for image in images]).astype(bool)  # > 76 HU: aorta and bone
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="aorta", segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Aorta, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medaug tests", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )
    seg.save_as(tree / "phantom_0000" / "seg.dcm")
    (tree / "phantom_0000" / "label.nii.gz").unlink()
    (tree / "phantom_0001" / "label.nii.gz").unlink()
    recipe = recipe_file(tmp_path / "dicom.yaml", name="dicom_test", layout="dicom", channels=["ct"], unmapped="reject",
                         domain={"name": "ct/test", "modality": "ct", "channels": ["ct"], "spacing_mm": 8.0, "size": 64,
                                 "intensity": {"ct": {"window_hu": [-160, 240]}}})
    tasks = discover(tree, load_dataset_recipe(recipe))
    assert len(tasks) == 2 and sorted(t.label_kind for t in tasks) == ["dicom_seg", "map"]
    summary, frame, store = prepared(tmp_path, recipe, tree)
    assert summary.volumes_rejected == 0, summary.rejected
    labelled = frame[frame["structures_annotated"].map(len) > 0]
    assert set(labelled["source_label"]) == {str(tree / "phantom_0000" / "seg.dcm")}
    assert labelled["structures_present"].map(lambda s: "aorta" in s).any()
    assert frame[frame["structures_annotated"].map(len) == 0]["volume_id"].nunique() == 1  # the series without SEG


def test_image_only_source(tmp_path, real_dir):
    recipe = Path(__file__).resolve().parents[2] / "recipes/datasets/real_totalsegmentator_mr.yaml"
    summary, frame, store = prepared(tmp_path, recipe, real_dir / "totalsegmentator")
    assert summary.volumes_rejected == 0 and len(frame) > 0
    assert all(len(s) == 0 for s in frame["structures_annotated"])
    assert frame["source_label"].isna().all()
    assert store.read(frame["shard"].iloc[0], 0)[1] is None
