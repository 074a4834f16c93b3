"""The quality bar a generator has to clear before its samples are worth training on (issue 11).

A generator can run, write files and still not work: masks that do not contain what was asked for, images
whose anatomy does not match their masks, textures no closer to the real data than noise, or copies of
training patients. :func:`acceptance_checks` measures each of these on a synthetic folder against the real
prepared dataset it came from and returns a verdict per check:

* **presence**: per requested target, the fraction of its samples whose mask shows the target (any of its
  structures) on at least ``min_pixels`` pixels must be >= ``presence``. Counting single pixels would
  pass an untrained model, whose argmax over random logits scatters every structure somewhere.
* **mask agreement**: a MONAI UNet trained on the real train split (``unet_steps`` steps) segments the
  synthetic images; its Dice against the generated masks must be >= ``mask_dice`` per target and exceed by
  ``shuffled_margin`` the same UNet's Dice on real test images scored against *shuffled* real masks of the
  same domain (what an image-blind mask at the usual place of an organ would already reach).
* **distribution**: with medaug's own feature backbone, FID of synthetic vs real test rows must be at most
  ``fid_floor_multiple`` (5) times the real-vs-real floor (two disjoint real subsets, as in ``evaluate
  metrics``) and at most ``noise_fraction`` (half) of the FID of pure noise images (uniform in [-1, 1],
  same channels); KID, which is unbiased and scatters around zero at the floor (a multiple of it means
  nothing), must close at least half the gap between noise and the floor: ``kid - floor <=
  noise_fraction · (kid_noise - floor)``. On the phantom sets of the demo (about 40 real test rows) the
  floor itself is FID 3-6, noise 35-45: the bar asks for a distance nearer the floor than the noise.
* **memorization**: no synthetic sample flagged as a near copy of a training slice (``evaluate metrics``'s
  rule: pixel NCC and SSIM above absolute bars and above the val→train quantile).

The thresholds are :data:`THRESHOLDS`; they are the bar, not tuning knobs: a generator that fails them is
reported as failing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """The acceptance bar (module docstring)."""

    presence: float = 0.9
    min_pixels: int = 8
    mask_dice: float = 0.7
    shuffled_margin: float = 0.2
    fid_floor_multiple: float = 5.0
    noise_fraction: float = 0.5
    near_copies: int = 0


THRESHOLDS = Thresholds()


def presence(synthetic: Path, min_pixels: int) -> dict[str, dict[str, Any]]:
    """Per target of the synthetic folder: {samples, fraction, first_draw} of samples whose mask holds
    >= ``min_pixels`` pixels of the target or any structure below it in the vocabulary; ``first_draw`` counts
    only samples kept at their first draw (``medaug synthesize --redraws`` draws a missing target again), so
    it is the generator's own rate."""
    from medaug import vocab
    from medaug.data.dataset import PreparedSliceDataset
    from medaug.synth.run import read_manifest

    manifest = read_manifest(synthetic)
    targets = manifest.column("target").to_pylist()
    draws = manifest.column("draws").to_pylist() if "draws" in manifest.column_names else [1] * len(targets)
    dataset = PreparedSliceDataset(synthetic)
    shown: dict[str, list[bool]] = {}
    first: dict[str, list[bool]] = {}
    for position, target in enumerate(targets):
        if target is None:
            continue
        ids = [vocab.structure(name).id for name in vocab.resolve(target)]
        label_HW = np.asarray(dataset[position]["label"])
        flag = int(np.isin(label_HW, ids).sum()) >= min_pixels
        shown.setdefault(target, []).append(flag)
        first.setdefault(target, []).append(flag and draws[position] == 1)
    return {target: {"samples": len(flags), "fraction": float(np.mean(flags)), "first_draw": float(np.mean(first[target]))}
            for target, flags in shown.items()}


def mask_agreement(real: Path, synthetic: Path, targets: Sequence[str], *, unet_steps: int, device: str,
                   seed: int = 0, batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """:func:`medaug.eval.segmentation.mask_fidelity` per target of one UNet trained on the real train split
    of every domain that annotates a target (one class per target, 255 where a slice does not annotate it;
    channels zero-filled to the largest count)."""
    from medaug.eval.segmentation import mask_fidelity, train_segmenter
    from medaug.monai import SliceDataset, SyntheticDataset, annotating_domains

    domains = sorted({domain for target in targets for domain in annotating_domains(real, [target])})
    options = {"domains": domains, "channels": "max", "classes": list(targets)}
    model, _ = train_segmenter(SliceDataset(real, split="train", **options), steps=unet_steps, seed=seed,
                               batch_size=batch_size, device=device)
    return mask_fidelity(model, SliceDataset(real, split="test", **options), SyntheticDataset(synthetic, **options),
                         list(targets), batch_size, device, seed)


class NoiseImages:
    """``count`` images of uniform noise in [-1, 1] shaped like ``like``'s rows (channels and their mask
    copied), for the noise baseline of the distribution check."""

    def __init__(self, like: Any, count: int, seed: int = 0):
        self.like, self.count, self.seed = like, count, seed

    def __len__(self) -> int:
        return self.count

    def read_batch(self, positions: Sequence[int]) -> dict[str, Any]:
        import torch

        batch = self.like.read_batch([int(position) % len(self.like) for position in positions])
        generator = torch.Generator().manual_seed(self.seed + int(positions[0]))
        noise_BCHW = torch.rand(batch["image"].shape, generator=generator) * 2 - 1
        return {"image": noise_BCHW * batch["channel_mask"][:, :, None, None], "channel_mask": batch["channel_mask"]}


def noise_baseline(real: Path, synthetic: Path, features_run: Path, device: str, split: str = "test",
                   seed: int = 0) -> dict[str, float]:
    """FID and KID of noise images (as many as synthetic rows) against the real ``split`` rows, own backbone."""
    from medaug.data.dataset import PreparedSliceDataset
    from medaug.eval.features import extract_features, load_backbone
    from medaug.eval.metrics import fid, kid

    backbone = load_backbone("medaug", features_run, device)
    real_rows = PreparedSliceDataset(real, split=split)
    noise = NoiseImages(PreparedSliceDataset(synthetic), len(PreparedSliceDataset(synthetic)), seed)
    real_ND, noise_MD = extract_features(backbone, real_rows), extract_features(backbone, noise)
    return {"fid": fid(real_ND, noise_MD), "kid": kid(real_ND, noise_MD).mean}


def verdicts(measured: dict[str, Any], thresholds: Thresholds) -> dict[str, dict[str, Any]]:
    """Each check of the module docstring: {passed, value(s), bar} from the measured numbers."""
    checks: dict[str, dict[str, Any]] = {}
    for target, entry in measured["presence"].items():
        checks[f"presence/{target}"] = {"passed": entry["fraction"] >= thresholds.presence,
                                        "value": entry["fraction"], "bar": f">= {thresholds.presence}"}
    for target, entry in measured["mask_agreement"].items():
        value, shuffled = entry["synthetic_dice"], entry["shuffled_real_dice"]
        passed = value is not None and value >= thresholds.mask_dice and (
            shuffled is None or value >= shuffled + thresholds.shuffled_margin)
        checks[f"mask_dice/{target}"] = {"passed": passed, "value": value, "shuffled": shuffled,
                                         "bar": f">= {thresholds.mask_dice} and >= shuffled + "
                                                f"{thresholds.shuffled_margin}"}
    distribution, noise = measured["distribution"], measured["noise"]
    fid_value, fid_floor = distribution["fid"]["value"], distribution["fid"]["floor"]
    checks["fid"] = {"passed": fid_value <= thresholds.fid_floor_multiple * fid_floor
                     and fid_value <= thresholds.noise_fraction * noise["fid"],
                     "value": fid_value, "floor": fid_floor, "noise": noise["fid"],
                     "bar": f"<= {thresholds.fid_floor_multiple} x floor and <= {thresholds.noise_fraction} x noise"}
    kid_value, kid_floor = distribution["kid"]["value"], distribution["kid"]["floor"]
    checks["kid"] = {"passed": kid_value - kid_floor <= thresholds.noise_fraction * (noise["kid"] - kid_floor),
                     "value": kid_value, "floor": kid_floor, "noise": noise["kid"],
                     "bar": f"kid - floor <= {thresholds.noise_fraction} x (noise - floor)"}
    flagged = measured["near_copies"]
    checks["near_copies"] = {"passed": flagged is not None and flagged <= thresholds.near_copies, "value": flagged,
                             "bar": f"<= {thresholds.near_copies}"}
    return checks


def acceptance_checks(real: Path, synthetic: Path, features_run: Path, targets: Sequence[str], *,
                      metrics: dict[str, Any], unet_steps: int = 300, device: str = "cpu",
                      thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """Measure and judge a synthetic folder (module docstring). ``metrics``: the result of
    :func:`medaug.eval.evaluate.evaluate_metrics` for the same folders with the ``medaug`` backbone
    (its overall FID/KID with their real-vs-real floors and the memorization count are reused).

    Returns {thresholds, measured: {presence, mask_agreement, distribution, noise, near_copies}, checks,
    passed}."""
    overall = metrics["distribution"]["medaug"]["overall"]
    measured = {
        "presence": presence(synthetic, thresholds.min_pixels),
        "mask_agreement": mask_agreement(real, synthetic, targets, unet_steps=unet_steps, device=device),
        "distribution": {name: {"value": overall[name]["value"], "floor": overall[name]["floor"]}
                         for name in ("fid", "kid")},
        "noise": noise_baseline(real, synthetic, features_run, device),
        "near_copies": (metrics.get("memorization", {}).get("overall") or {}).get("n_flagged"),
    }
    checks = verdicts(measured, thresholds)
    for name, check in checks.items():
        log.info("acceptance %s: %s (%s)", name, "pass" if check["passed"] else "FAIL", check)
    return {"thresholds": asdict(thresholds), "measured": measured, "checks": checks,
            "passed": all(check["passed"] for check in checks.values())}


__all__ = ["THRESHOLDS", "NoiseImages", "Thresholds", "acceptance_checks", "mask_agreement", "noise_baseline",
           "presence", "verdicts"]
