"""Issue 11's quality bar on phantoms: the demo's generator, trained at the demo's budget on the CPU, must
clear every check of :mod:`medaug.eval.acceptance` (slow: about 8 minutes on 2 cores).

The verdicts are recomputed here from the files the demo wrote (the label PNGs for target presence, the
acceptance record's measured numbers against the bar), so a wrong verdict in the library cannot pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medaug import vocab
from medaug.eval.acceptance import THRESHOLDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    from medaug_cli.demo import DemoSettings, StageReporter, run_demo

    out = tmp_path_factory.mktemp("quality") / "demo"
    state = run_demo(out, DemoSettings(device="cpu"), StageReporter(quiet=True))
    return out, state, json.loads((out / "acceptance.json").read_text())


def test_every_requested_target_is_present_in_90_percent_of_masks(accepted):
    out, state, result = accepted
    manifest = __import__("pyarrow.parquet", fromlist=["read_table"]).read_table(out / "synthetic" / "manifest.parquet")
    shown: dict[str, list[bool]] = {}
    for sample_id, target in zip(manifest.column("sample_id").to_pylist(), manifest.column("target").to_pylist()):
        label_HW = np.asarray(Image.open(out / "synthetic" / "png" / f"{sample_id}_label.png"))
        ids = [vocab.structure(name).id for name in vocab.resolve(target)]
        shown.setdefault(target, []).append(int(np.isin(label_HW, ids).sum()) >= THRESHOLDS.min_pixels)
    fractions = {target: float(np.mean(flags)) for target, flags in shown.items()}
    assert set(fractions) == {"liver", "prostate", "brain_tumor"}
    for target, fraction in fractions.items():
        assert result["measured"]["presence"][target]["fraction"] == pytest.approx(fraction)
        assert fraction >= THRESHOLDS.presence, (target, fraction)


def test_a_unet_trained_on_real_slices_agrees_with_the_generated_masks(accepted):
    _, _, result = accepted
    for target, entry in result["measured"]["mask_agreement"].items():
        assert entry["n_synthetic"] > 0, target
        assert entry["synthetic_dice"] >= THRESHOLDS.mask_dice, (target, entry)
        assert entry["synthetic_dice"] >= entry["shuffled_real_dice"] + THRESHOLDS.shuffled_margin, (target, entry)


def test_feature_distances_are_near_the_real_floor_and_far_from_noise(accepted):
    _, _, result = accepted
    distribution, noise = result["measured"]["distribution"], result["measured"]["noise"]
    fid, kid = distribution["fid"], distribution["kid"]
    assert fid["value"] < noise["fid"] and kid["value"] < noise["kid"]
    assert fid["value"] <= THRESHOLDS.fid_floor_multiple * fid["floor"], fid
    assert fid["value"] <= THRESHOLDS.noise_fraction * noise["fid"], (fid, noise)
    assert kid["value"] - kid["floor"] <= THRESHOLDS.noise_fraction * (noise["kid"] - kid["floor"]), (kid, noise)


def test_no_sample_is_a_near_copy_and_the_verdict_is_pass(accepted):
    out, state, result = accepted
    assert result["measured"]["near_copies"] == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["memorization"]["overall"]["n_flagged"] == 0
    assert result["passed"] and state["stages"]["acceptance"]["summary"]["passed"]
