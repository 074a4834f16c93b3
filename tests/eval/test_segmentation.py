"""``medaug.eval.segmentation``: scoring against NumPy/SciPy on hand-made masks, deterministic training, and
mask fidelity with a model that knows every true label."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from monai.networks import one_hot
from scipy import ndimage

from medaug import vocab
from medaug.eval.segmentation import (
    build_unet,
    mask_fidelity,
    predict,
    same_domain_partners,
    score_segmentation,
    train_segmenter,
)
from medaug.monai import SliceDataset, SyntheticDataset

PROSTATE = {"domains": ["mr/prostate"], "classes": ["prostate"]}
TINY_UNET = (8, 16)


# ---------------------------------------------------------------------------------------------- scoring


def ellipse(center: tuple[float, float], radii: tuple[float, float], shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 <= 1.0


def box(top: int, bottom: int, left: int, right: int, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def reference_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float]) -> float:
    """Symmetric 95th-percentile surface distance in mm: boundary pixels (mask minus its erosion), distances
    by SciPy's Euclidean distance transform with the pixel spacing, the larger of the two directions."""
    edges_pred = pred & ~ndimage.binary_erosion(pred)
    edges_truth = truth & ~ndimage.binary_erosion(truth)
    to_truth = ndimage.distance_transform_edt(~edges_truth, sampling=spacing)[edges_pred]
    to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=spacing)[edges_truth]
    return max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))


def reference_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())


@pytest.fixture
def hand_made():
    """Three slices, two classes, anisotropic spacings, an ignore band that hides a false positive.

    slice 0: both classes on both sides (shifted ellipse, shifted box); slice 1: class 1 in the label only;
    slice 2: class 1 in the prediction only, class 2 exact except for a blob inside the ignored band."""
    label = np.zeros((3, 48, 40), dtype=np.uint8)
    pred = np.zeros_like(label)
    label[0][ellipse((20, 18), (9, 12))] = 1
    pred[0][ellipse((23, 16), (10, 9))] = 1
    label[0][box(36, 44, 28, 36)] = 2
    pred[0][box(38, 45, 26, 35)] = 2
    label[1][ellipse((24, 20), (6, 6))] = 1
    pred[2][ellipse((10, 10), (4, 4))] = 1
    label[2][box(30, 40, 5, 30)] = 2
    pred[2][box(30, 40, 5, 30)] = 2
    label[2][:8] = vocab.IGNORE
    pred[2][2:6, 20:30] = 2
    spacing = np.array([[0.5, 1.5], [0.5, 1.5], [2.0, 2.0]])
    return pred, label, spacing


def test_dice_and_hd95_match_numpy_and_scipy(hand_made):
    pred, label, spacing = hand_made
    scores = score_segmentation(torch.from_numpy(pred), torch.from_numpy(label), ["liver", "spleen"], spacing)
    class_1 = [reference_dice(pred[0] == 1, label[0] == 1), 0.0]
    assert scores["liver"]["dice"] == pytest.approx(np.mean(class_1), abs=1e-6)
    assert scores["liver"]["n_dice"] == 2  # slice 2 has no class 1 in the label: not scored (ignore_empty)
    assert scores["liver"]["hd95_mm"] == pytest.approx(reference_hd95(pred[0] == 1, label[0] == 1, (0.5, 1.5)), rel=1e-5)
    assert (scores["liver"]["n_hd95"], scores["liver"]["hd95_skipped"]) == (1, 2)
    # slice 2's class 2 is exact once the ignored rows are left out of both sides
    class_2_dice = [reference_dice(pred[0] == 2, label[0] == 2), 1.0]
    assert scores["spleen"]["dice"] == pytest.approx(np.mean(class_2_dice), abs=1e-6)
    class_2_hd = [reference_hd95(pred[0] == 2, label[0] == 2, (0.5, 1.5)), 0.0]
    assert scores["spleen"]["hd95_mm"] == pytest.approx(np.mean(class_2_hd), rel=1e-5)
    assert (scores["spleen"]["n_dice"], scores["spleen"]["n_hd95"], scores["spleen"]["hd95_skipped"]) == (2, 2, 0)
    assert class_2_hd[0] > 1.0 and reference_dice(pred[2] == 2, label[2] == 2) < 0.95  # the cases are not trivial


def test_spacing_scales_hd95_and_one_pair_serves_all_slices(hand_made):
    pred, label, _ = hand_made
    first = score_segmentation(torch.from_numpy(pred[:1]), torch.from_numpy(label[:1]), ["liver", "spleen"], [1.0, 1.0])
    doubled = score_segmentation(torch.from_numpy(pred[:1]), torch.from_numpy(label[:1]), ["liver", "spleen"], [2.0, 2.0])
    assert doubled["liver"]["hd95_mm"] == pytest.approx(2 * first["liver"]["hd95_mm"], rel=1e-6)
    assert first["liver"]["hd95_mm"] == pytest.approx(reference_hd95(pred[0] == 1, label[0] == 1, (1.0, 1.0)), rel=1e-5)


def test_same_domain_partners_is_a_fixed_derangement_within_domains():
    domains = ["a", "b", "a", "a", "c", "b", "a"]
    partners = same_domain_partners(domains, seed=4)
    assert partners[4] == -1  # alone in its domain
    paired = [i for i in range(len(domains)) if i != 4]
    assert all(partners[i] != i and domains[partners[i]] == domains[i] for i in paired)
    assert sorted(partners[paired].tolist()) == paired  # a permutation: every mask is used once
    assert np.array_equal(partners, same_domain_partners(domains, seed=4))


# ---------------------------------------------------------------------------------------------- training


def prostate_split(root, split: str) -> SliceDataset:
    return SliceDataset(root, split=split, **PROSTATE)


def test_training_is_deterministic_per_seed_and_the_curve_scores_the_val_split(tiny_prepared):
    train, val = prostate_split(tiny_prepared, "train"), prostate_split(tiny_prepared, "val")
    options = {"steps": 6, "batch_size": 4, "lr": 3e-3, "device": "cpu", "eval_set": val, "eval_every": 3,
               "channels": TINY_UNET}
    model, curve = train_segmenter(train, seed=0, **options)
    again, same_curve = train_segmenter(train, seed=0, **options)
    other, other_curve = train_segmenter(train, seed=1, **options)
    weights, weights_again, weights_other = (m.state_dict() for m in (model, again, other))
    assert all(torch.equal(weights[key], weights_again[key]) for key in weights) and curve == same_curve
    assert not all(torch.equal(weights[key], weights_other[key]) for key in weights) and curve != other_curve
    assert [point["step"] for point in curve] == [3, 6]
    # the last point's val Dice is the returned model's, recomputed with numpy over slices holding the prostate
    dices = []
    with torch.no_grad():
        for index in range(len(val)):
            item = val[index]
            predicted = model(item["image"].as_tensor()[None]).argmax(dim=1)[0].numpy() == 1
            truth = item["label"].as_tensor()[0].numpy() == 1
            if truth.any():
                dices.append(reference_dice(predicted, truth))
    assert dices and curve[-1]["val_dice"] == pytest.approx(np.mean(dices), abs=1e-6)


def test_build_unet_outputs_one_map_per_class_and_background():
    model = build_unet(2, 3, TINY_UNET)
    assert model(torch.zeros(1, 2, 32, 32)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------------------------------------- mask fidelity


class LabelOracle(torch.nn.Module):
    """A "model" that returns, for every image it was shown, the one-hot of that image's true class label
    (ignore → background): a perfect segmenter of exactly those images."""

    def __init__(self, datasets, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.labels: dict[bytes, torch.Tensor] = {}
        for dataset in datasets:
            for index in range(len(dataset)):
                item = dataset[index]
                label_HW = item["label"].as_tensor()[0].long()
                key = self.key(item["image"].as_tensor())
                assert key not in self.labels or torch.equal(self.labels[key], label_HW), "two labels for one image"
                self.labels[key] = label_HW

    @staticmethod
    def key(image_CHW: torch.Tensor) -> bytes:
        return image_CHW.float().contiguous().numpy().tobytes()

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        label_B1HW = torch.stack([self.labels[self.key(image)] for image in image_BCHW])[:, None]
        return one_hot(torch.where(label_B1HW == vocab.IGNORE, 0, label_B1HW), self.num_classes + 1)


PELVIS = ["urinary_bladder", "prostate", "rectum"]  # the tiny generator draws the bladder in almost every sample


def structure_masks(root, index_name: str, split: str | None, name: str) -> tuple[list[str], list[np.ndarray]]:
    """(slice ids, masks of ``name`` and its parts) of the MR prostate rows, read from the index and shards with NumPy."""
    ids = [vocab.name_to_id()[part] for part in vocab.resolve(name)]
    rows = [row for row in pq.read_table(root / index_name).to_pylist()
            if row["domain"] == "mr/prostate" and (split is None or row["split"] == split)]
    masks = [np.isin(np.load(root / f"{row['shard']}.label.npy", mmap_mode="r")[row["shard_row"]], ids) for row in rows]
    return [row["slice_id"] for row in rows], masks


def test_mask_fidelity_with_an_oracle_model(tiny_prepared, tiny_synthesis):
    options = {"domains": ["mr/prostate"], "classes": PELVIS}
    real_test = SliceDataset(tiny_prepared, split="test", **options)
    synthetic = SyntheticDataset(tiny_synthesis["out"], **options)
    assert list(real_test.class_names) == PELVIS  # class k is PELVIS[k - 1] (vocabulary id order)
    oracle = LabelOracle([real_test, synthetic], num_classes=len(PELVIS))
    scores = mask_fidelity(oracle, real_test, synthetic, PELVIS, batch_size=4, device="cpu", seed=0)
    assert sum(scores[name]["n_synthetic"] for name in PELVIS) > 0
    for name in PELVIS:
        ids, real_masks = structure_masks(tiny_prepared, "index.parquet", "test", name)
        _, synthetic_masks = structure_masks(tiny_synthesis["out"], "manifest.parquet", None, name)
        assert ids == real_test.base.rows.column("slice_id").to_pylist()  # the dataset keeps the index order
        entry = scores[name]
        assert entry["n_synthetic"] == sum(mask.any() for mask in synthetic_masks)
        assert entry["n_real"] == sum(mask.any() for mask in real_masks) > 1
        assert entry["real_test_dice"] == pytest.approx(1.0)
        assert entry["synthetic_dice"] == (pytest.approx(1.0) if entry["n_synthetic"] else None)
        # shuffled: each real test slice's (perfect) prediction against another real test slice's mask
        partners = same_domain_partners(["mr/prostate"] * len(real_masks), seed=0)
        shuffled = [reference_dice(real_masks[i], real_masks[j]) for i, j in enumerate(partners) if real_masks[j].any()]
        assert entry["shuffled_real_dice"] == pytest.approx(np.mean(shuffled), abs=1e-6) and entry["n_shuffled"] == len(shuffled)
        assert entry["shuffled_real_dice"] < 1.0


def test_predict_returns_labels_spacing_and_domains_in_dataset_order(tiny_prepared):
    test = prostate_split(tiny_prepared, "test")
    predicted = predict(build_unet(2, 1, TINY_UNET), test, batch_size=3, device="cpu")
    rows = [row for row in pq.read_table(tiny_prepared / "index.parquet").to_pylist()
            if row["domain"] == "mr/prostate" and row["split"] == "test"]
    assert predicted.pred_NHW.shape == predicted.label_NHW.shape == (len(rows), 64, 64)
    assert np.allclose(predicted.spacing_N2, [row["spacing_mm"] for row in rows])
    assert predicted.domains == ["mr/prostate"] * len(rows)
    assert int(predicted.pred_NHW.max()) <= 1
