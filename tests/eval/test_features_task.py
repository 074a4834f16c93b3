"""medaug's own feature encoder: ``medaug train features`` really trains it on phantoms (held-out
structure-present AUROC >= 0.9), its losses and metrics against direct formulas, and the ``medaug`` backbone
that loads the run."""

from __future__ import annotations

import json
import time
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medaug.errors import ConfigError
from medaug.eval.features import BackboneUnavailable, extract_features, load_backbone
from medaug.train.features_task import (
    FeatureLossConfig,
    binary_auroc,
    feature_losses,
    load_features_recipe,
    region_targets,
)
from tests.train.conftest import write_tiny_prepared

# Five phantom subjects per domain: three train, one val, one test (tests/train/conftest.py pins the last
# to val). With one training subject per domain (the three-subject tiny_prepared), presence of kidneys and
# vertebrae does not generalize to a new subject; three subjects do.
SUBJECTS = 5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_tiny_prepared(tmp_path_factory.mktemp("features-data"), n=SUBJECTS)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    """``medaug train features --recipe features-tiny`` (200 steps) through the CLI: its JSON summary and wall time.

    One torch thread: the 64² convolutions gain little from two, and OpenMP threads spin-wait when the
    CI runner's cores are shared.
    """
    from medaug_cli.app import app

    out = tmp_path_factory.mktemp("features-run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        result = CliRunner().invoke(app, ["train", "features", "--data", str(prepared), "--out", str(out),
                                          "--recipe", "features-tiny", "--set", "train.device=cpu", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    return {"summary": summary, "seconds": time.monotonic() - started, "run": out}


def pairwise_auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over all pairs."""
    positives, negatives = scores[labels], scores[~labels]
    greater = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(greater + 0.5 * ties)


# ---------------------------------------------------------------- training reaches the target


def test_trained_encoder_detects_structures_on_held_out_subjects(trained):
    summary = trained["summary"]
    evaluation = summary["evaluation"]
    print(f"features-tiny: val macro AUROC {evaluation['structure_auroc_macro']:.3f}, domain accuracy "
          f"{evaluation['domain_accuracy']:.3f}, {trained['seconds']:.1f} s (prepare excluded)")
    assert summary["step"] == 200 and summary["stopped_by"] == "max_steps"
    assert evaluation["split"] == "val" and evaluation["held_out"] is True
    assert evaluation["structure_auroc_macro"] >= 0.9
    assert evaluation["domain_accuracy"] >= 0.95
    assert evaluation["structures_scored"] >= 10


def test_recorded_auroc_equals_a_recomputation(trained, prepared):
    """Recompute every structure's AUROC from the saved weights on the val split with the pairwise formula,
    and find the same numbers in metrics.json and the checkpoint's meta.json."""
    from medaug.data.structures import StructureTable, read_domain_names
    from medaug.train.features_task import feature_dataset, load_feature_net

    net, meta = load_feature_net(trained["run"])
    table = StructureTable.from_records(meta["structure_table"])
    dataset = feature_dataset(prepared, "val", table, read_domain_names(prepared), 64)
    batch = dataset.read_batch(list(range(len(dataset))))
    with torch.no_grad():
        domain_logits, structure_logits, _ = net(batch["image"], batch["channel_mask"])
    scores, present, annotated = structure_logits.numpy(), batch["present"].numpy(), batch["annotated"].numpy()
    recomputed = {}
    for s, name in enumerate(table.names):
        labels = present[annotated[:, s], s]
        if labels.any() and not labels.all():
            recomputed[name] = pairwise_auroc(scores[annotated[:, s], s], labels)
    recorded = meta["evaluation"]
    assert recorded == json.loads((trained["run"] / "metrics.json").read_text())["evaluation"]
    assert {name: v["auroc"] for name, v in recorded["structure_auroc"].items() if v["auroc"] is not None} == \
        pytest.approx(recomputed, abs=1e-9)
    assert recorded["structure_auroc_macro"] == pytest.approx(np.mean(list(recomputed.values())))
    accuracy = (domain_logits.argmax(1) == batch["domain_index"]).float().mean().item()
    assert recorded["domain_accuracy"] == pytest.approx(accuracy)


# ---------------------------------------------------------------- the medaug backbone


def test_medaug_backbone_is_deterministic_and_resizes(trained, prepared):
    from medaug.data.dataset import PreparedSliceDataset

    backbone = load_backbone("medaug", trained["run"])
    dataset = PreparedSliceDataset(prepared, split="test")
    assert backbone.name == "medaug" and backbone.dim == 128
    features = extract_features(backbone, dataset, batch_size=16)
    assert features.shape == (len(dataset), 128) and features.dtype == np.float64
    np.testing.assert_array_equal(features, extract_features(backbone, dataset, batch_size=16))
    alone = extract_features(backbone, dataset, batch_size=1, indices=[5])
    np.testing.assert_allclose(alone[0], features[5], rtol=1e-5, atol=1e-6)
    batch = dataset.read_batch([0, 5, 11])
    doubled = batch["image"].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 128²: area-averages back
    np.testing.assert_allclose(backbone(doubled, batch["channel_mask"]).numpy(), features[[0, 5, 11]],
                               rtol=1e-5, atol=1e-5)
    padded = torch.cat([batch["image"], torch.zeros(3, 1, 64, 64)], dim=1)  # an extra absent channel is ignored
    mask = torch.cat([batch["channel_mask"], torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    np.testing.assert_allclose(backbone(padded, mask).numpy(), features[[0, 5, 11]], rtol=1e-6, atol=1e-6)


def test_features_separate_domains(trained, prepared):
    """Slices lie nearer the centroid of their own domain than of any other (held-out test split)."""
    from medaug.data.dataset import PreparedSliceDataset

    dataset = PreparedSliceDataset(prepared, split="test")
    features = extract_features(load_backbone("medaug", trained["run"]), dataset)
    domains = np.array(dataset.read_batch(list(range(len(dataset))))["domain"])
    names = sorted(set(domains))
    centroids = np.stack([features[domains == name].mean(axis=0) for name in names])
    nearest = np.linalg.norm(features[:, None] - centroids[None], axis=2).argmin(axis=1)
    assert (np.array(names)[nearest] == domains).mean() == 1.0


def test_medaug_backbone_refuses_other_folders(tmp_path, prepared):
    with pytest.raises(BackboneUnavailable, match="medaug: expected a `medaug train features` run"):
        load_backbone("medaug", prepared / "index.parquet")
    with pytest.raises(BackboneUnavailable, match="medaug: .*meta.json"):
        load_backbone("medaug", tmp_path)


# ---------------------------------------------------------------- losses and metrics against formulas


def test_binary_auroc_counts_pairs_and_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    assert binary_auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels))
    assert binary_auroc(np.array([0.1, 0.9, 0.4]), np.array([False, True, False])) == 1.0
    assert binary_auroc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_region_targets_mark_structures_per_cell_and_ignore():
    label = torch.zeros(1, 4, 6, dtype=torch.long)
    label[0, 0, 0] = 2  # cell (0, 0)
    label[0, 3, 5] = 1  # cell (1, 2)
    label[0, 2, 2] = 255  # cell (1, 1) holds an ignore pixel
    present, clean = region_targets(label, 2, (2, 3))
    expected = torch.zeros(1, 2, 2, 3, dtype=torch.bool)
    for k, row, column in product(range(2), range(2), range(3)):
        block = label[0, 2 * row:2 * row + 2, 2 * column:2 * column + 2]
        expected[0, k, row, column] = bool((block == k + 1).any())
    assert torch.equal(present, expected)
    assert clean[0, 0].tolist() == [[True, True, True], [True, False, True]]


def test_losses_skip_structures_a_row_does_not_annotate():
    torch.manual_seed(0)
    batch = {"domain_index": torch.tensor([0, 1]), "annotated": torch.tensor([[True, False], [True, True]]),
             "present": torch.tensor([[True, False], [False, True]]), "label": torch.zeros(2, 4, 4, dtype=torch.long)}
    batch["label"][1, 3, 3] = 2
    domain, structure, region = torch.randn(2, 3), torch.randn(2, 2), torch.randn(2, 2, 2, 2)
    config = FeatureLossConfig(domain=0.0, structures=1.0, regions=0.0)
    loss, _ = feature_losses((domain, structure, region), batch, config)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    by_hand = (bce(structure[0, 0], torch.tensor(1.0)) + bce(structure[1, 0], torch.tensor(0.0))
               + bce(structure[1, 1], torch.tensor(1.0))) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    changed = structure.clone()
    changed[0, 1] = 50.0  # row 0 does not annotate structure 2: its logit must not matter
    assert feature_losses((domain, changed, region), batch, config)[0].item() == pytest.approx(loss.item())
    region_only = FeatureLossConfig(domain=0.0, structures=0.0, regions=1.0)
    target = torch.zeros(2, 2, 2, 2)
    target[1, 1, 1, 1] = 1.0
    weight = batch["annotated"].float()[:, :, None, None].expand(2, 2, 2, 2)
    expected = (bce(region, target, reduction="none") * weight).sum() / weight.sum()
    assert feature_losses((domain, structure, region), batch, region_only)[0].item() == pytest.approx(expected.item())


def test_recipe_refuses_data_keys_and_unknown_keys():
    recipe = load_features_recipe("features-tiny", ["train.max_steps=7"])
    assert recipe.train.max_steps == 7 and recipe.model.image_size == 64
    with pytest.raises(ConfigError, match="model.num_structures: is filled from the prepared dataset"):
        load_features_recipe("features-tiny", ["model.num_structures=3"])
    with pytest.raises(ConfigError, match="width"):
        load_features_recipe("features-tiny", ["model.width=3"])
    with pytest.raises(ConfigError, match="model.image_size: is 60; expected a multiple of"):
        load_features_recipe("features-tiny", ["model.image_size=60"])
    full = load_features_recipe("features")
    assert full.model.image_size == 256 and full.model.widths[-1] == 256


def test_cli_resume_of_a_finished_run_prints_the_evaluation(trained, prepared):
    """--resume at max_steps trains nothing, evaluates the checkpoint again and renders the tables."""
    from medaug_cli.app import app

    result = CliRunner().invoke(app, ["train", "features", "--data", str(prepared), "--out", str(trained["run"]),
                                      "--recipe", "features-tiny", "--set", "train.device=cpu", "--resume"])
    assert result.exit_code == 0, result.output
    macro = trained["summary"]["evaluation"]["structure_auroc_macro"]
    assert "structure AUROC (macro)" in result.output and f"{macro:.3f}" in result.output
    assert "kidney_left" in result.output


def test_cli_help_lists_features():
    from medaug_cli.app import app

    result = CliRunner().invoke(app, ["train", "features", "--help"])
    assert result.exit_code == 0 and "--data" in result.output and "features-tiny" in result.output
