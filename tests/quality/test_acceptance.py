"""Issue 11's quality bar on phantoms: the demo's generator, trained at the demo's budget on the CPU, must
clear every check of :mod:`medaug.eval.acceptance` (slow: about 6-8 minutes on 2 cores).

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


# Measured run to run (training is not bit-reproducible between runs). Sessions 3-4 (CPU and GPU, 21 runs):
# tumour presence 0.58-0.98 and the tumour's mask agreement 0.0-0.92 kept the whole bar to about half the runs.
# Two causes, two fixes (session 5):
# - a sample whose mask misses its target is drawn again (``medaug synthesize --redraws``, default 2): the
#   generator's own first-draw rate stays in the record and is recounted below;
# - the tokenizer learned to decode the tumour's mask but not its bright FLAIR lesion (contrast 0.3 against
#   1.04 real in the worst run), so the real-trained UNet found no tumour in the generated images:
#   ``losses.structure_l1`` in the tiny tokenizer recipe (benchmarks/results/tokenizer-lesions-cpu.json).
# With both, 8 of 8 CPU sweep runs at the demo's budget cleared the whole bar: presence 0.98-1.0 (first draw:
# tumour 0.78-0.97, prostate 0.89-0.98, liver 0.94-1.0), mask Dice liver 0.80-0.91, prostate 0.90-0.98, tumour
# 0.77-0.92, FID 14.6-18.3 (benchmarks/results/phantom-sweep-round5-cpu.json); so did this test's own demo run
# (tumour presence 1.0, first draw 0.95; tumour mask Dice 0.78). Every check is hard again.
TARGETS = ("liver", "prostate", "brain_tumor")


def recounted_presence(out, first_draw_only: bool = False) -> dict[str, float]:
    """Per target: the fraction of its samples whose label PNG shows it on >= min_pixels pixels (with
    ``first_draw_only``, and that were kept at their first draw: the manifest's ``draws`` is 1)."""
    import pyarrow.parquet as pq

    manifest = pq.read_table(out / "synthetic" / "manifest.parquet").to_pylist()
    shown: dict[str, list[bool]] = {}
    for row in manifest:
        label_HW = np.asarray(Image.open(out / "synthetic" / "png" / f"{row['sample_id']}_label.png"))
        ids = [vocab.structure(name).id for name in vocab.resolve(row["target"])]
        flag = int(np.isin(label_HW, ids).sum()) >= THRESHOLDS.min_pixels
        shown.setdefault(row["target"], []).append(flag and (row["draws"] == 1 or not first_draw_only))
    return {target: float(np.mean(flags)) for target, flags in shown.items()}


def test_presence_is_counted_from_the_masks_written(accepted):
    out, _, result = accepted
    fractions, first_draws = recounted_presence(out), recounted_presence(out, first_draw_only=True)
    assert set(fractions) == set(TARGETS)
    for target, fraction in fractions.items():
        assert result["measured"]["presence"][target]["fraction"] == pytest.approx(fraction)
        assert result["measured"]["presence"][target]["first_draw"] == pytest.approx(first_draws[target])
        assert result["checks"][f"presence/{target}"]["passed"] == (fraction >= THRESHOLDS.presence)


def test_every_requested_target_is_present_in_90_percent_of_masks(accepted):
    out, _, _ = accepted
    for target, fraction in recounted_presence(out).items():
        assert fraction >= THRESHOLDS.presence, (target, fraction)


@pytest.mark.parametrize("target", TARGETS)
def test_a_unet_trained_on_real_slices_agrees_with_the_generated_masks(accepted, target):
    _, _, result = accepted
    entry = result["measured"]["mask_agreement"][target]
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


def test_no_sample_is_a_near_copy(accepted):
    out, state, result = accepted
    assert result["measured"]["near_copies"] == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["memorization"]["overall"]["n_flagged"] == 0
    assert state["stages"]["acceptance"]["summary"]["passed"] == result["passed"] == all(
        check["passed"] for check in result["checks"].values())
