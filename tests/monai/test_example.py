"""``examples/train_unet_monai.py`` runs on the tiny phantom set (real + synthetic, CPU), alone and under torchrun,
and its test Dice equals one recomputed with numpy from the saved model and the shards."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from monai.losses import DiceCELoss

from tests.train.torchrun import run_torchrun

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "train_unet_monai.py"
PROSTATE_IDS = [22, 150, 151]  # prostate, its peripheral and transition zones (medaug.vocab)
TINY = ["--structure", "prostate", "--ratio", "0.5", "--features", "8,16,32", "--workers", "0", "--log-every", "1"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_unet_monai", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment() -> dict[str, str]:
    # one thread: OpenMP threads spinning against each other on a loaded 2-core machine cost 50x
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def prostate_rows(root: Path, name: str, split: str | None) -> list[dict]:
    rows = pq.read_table(root / name).to_pylist()
    return [row for row in rows if row["domain"] == "mr/prostate" and (split is None or row["split"] == split)]


def saved_model(out: Path) -> torch.nn.Module:
    """The UNet the example saved (two MR prostate channels in, background + prostate out)."""
    model = load_example().build_model(2, 1, "8,16,32")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    return model.eval()


def numpy_test_dice(model: torch.nn.Module, prepared: Path) -> float:
    """Mean Dice of the prostate over the test slices that contain it, from the shards read with numpy."""
    dices = []
    for row in prostate_rows(prepared, "index.parquet", "test"):
        image = np.load(prepared / f"{row['shard']}.image.npy")[row["shard_row"]].astype(np.float32)
        truth = np.isin(np.load(prepared / f"{row['shard']}.label.npy")[row["shard_row"]], PROSTATE_IDS)
        with torch.no_grad():
            predicted = model(torch.from_numpy(image)[None]).argmax(dim=1)[0].numpy() == 1
        if truth.any():
            dices.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    return float(np.mean(dices))


def test_example_trains_on_the_mix_and_reports_the_real_test_dice(prepared_dir, synthetic_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(EXAMPLE), "--real", str(prepared_dir), "--synthetic", str(synthetic_dir),
               "--steps", "5", "--batch-size", "4", "--out", str(out), *TINY]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    real_train = len(prostate_rows(prepared_dir, "index.parquet", "train"))
    synthetic = len(prostate_rows(synthetic_dir, "manifest.parquet", None))
    assert (summary["train_real"], summary["train_synthetic"]) == (real_train, real_train) and synthetic >= real_train
    assert summary["steps"] == 5 and summary["seen_items"] == 20 == 2 * real_train  # one whole epoch of the mix
    assert summary["seen_synthetic_fraction"] == 0.5 and summary["world_size"] == 1
    assert summary["domains"] == ["mr/prostate"] and summary["classes"] == ["prostate"]
    assert summary["test_slices"] == len(prostate_rows(prepared_dir, "index.parquet", "test"))
    assert summary["test_dice"] == pytest.approx(numpy_test_dice(saved_model(out), prepared_dir), abs=1e-5)


def test_example_under_torchrun_shares_the_mix_over_two_ranks(prepared_dir, synthetic_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
               "--real", str(prepared_dir), "--synthetic", str(synthetic_dir), "--steps", "4", "--batch-size", "5",
               "--out", str(out), *TINY]
    finished = run_torchrun(command, fresh_dir=out, env=environment(), cwd=REPO_ROOT, timeout=180)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # 2 ranks x 4 steps x 5 = 40 items = two whole epochs of 10 real + 10 synthetic positions
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["seen_items"] == 40
    assert summary["seen_synthetic_fraction"] == 0.5
    # the ranks scored their shares of the test split; the gathered Dice is that of the whole split
    assert summary["test_dice"] == pytest.approx(numpy_test_dice(saved_model(out), prepared_dir), abs=1e-5)


def test_ignoring_loss_is_dice_ce_without_ignore_and_blind_to_ignored_pixels():
    loss_fn = load_example().IgnoringDiceCELoss()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 16, 16, generator=generator)
    label = torch.randint(0, 3, (3, 1, 16, 16), generator=generator)
    reference = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.allclose(loss_fn(logits, label), reference, atol=1e-6)
    ignored = label.clone()
    ignored[:, :, :4] = 255
    other_logits = logits.clone()
    other_logits[:, :, :4] = torch.randn(3, 3, 4, 16, generator=generator) * 10
    assert torch.allclose(loss_fn(logits, ignored), loss_fn(other_logits, ignored), atol=1e-6)
    assert not torch.allclose(loss_fn(logits, ignored), reference, atol=1e-3)
