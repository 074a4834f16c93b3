"""Distributed tests: single-process helpers, and 2-process gloo DDP under torchrun equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medaug.errors import ConfigError
from medaug.train import distributed
from medaug.train.checkpoint import load_checkpoint
from medaug.train.engine import OptimConfig, TrainConfig, train
from tests.conftest import REPO_ROOT
from tests.train.torchrun import run_torchrun
from tests.train.toy import ToyTask

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_one_process_without_torchrun(plain_process: None) -> None:
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.device, info.owns_process_group) == (0, 1, torch.device("cpu"), False)
    values = torch.tensor([1.0, 3.0])
    reduced = distributed.all_reduce_mean(values)
    assert torch.equal(reduced, values) and reduced is not values
    assert distributed.on_rank0(lambda a, b: a + b, 2, b=3) == 5
    assert distributed.is_rank0() and distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.teardown(info)


def test_rank_from_environment_before_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_rank0() and distributed.on_rank0(lambda: "side effect") is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"\$WORLD_SIZE: is 'two'; expected a non-negative integer"):
        distributed.setup("cpu")


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path, plain_process: None) -> None:
    config = {"max_steps": 6, "batch_size": 8, "num_workers": 0, "checkpoint_every": 100, "log_every": 3, "seed": 5,
              "ema_decay": 0.5, "device": "cpu",
              "optim": {"net": {"lr": 0.01, "warmup_steps": 2, "grad_clip": 0.5}, "aux": {"lr": 0.005}}}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO_ROOT / "tests" / "train" / "toy.py"), str(tmp_path / "ddp"), json.dumps(config)]
    (tmp_path / "ddp").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    finished = run_torchrun(command, fresh_dir=tmp_path / "ddp", env=environment, cwd=REPO_ROOT, timeout=180)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    optim = {name: OptimConfig(**options) for name, options in config["optim"].items()}
    single_task = ToyTask(noise=False)
    single = train(single_task, TrainConfig(**{**config, "optim": optim}), tmp_path / "single")

    ranks = [json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["world_size"] for report in ranks] == [2, 2]
    assert ranks[0]["mean"] == ranks[1]["mean"] == [0.5, 5.0]  # all_reduce_mean of (rank, 10 rank)
    assert (tmp_path / "ddp" / "written_by.txt").read_text() == "rank 0\n"  # on_rank0: one side effect
    for step, batch in enumerate(single_task.seen):  # same samples per step, split over the two ranks
        assert sorted(ranks[0]["seen"][step] + ranks[1]["seen"][step]) == sorted(batch)
        assert len(ranks[0]["seen"][step]) == len(ranks[1]["seen"][step]) == 4

    ddp = load_checkpoint(tmp_path / "ddp", expect_kind="toy")
    reference = load_checkpoint(single.checkpoint_path)
    assert ddp.step == reference.step == 6 and ddp.meta["world_size"] == 2
    for stem in ("model", "aux", "ema"):
        for key, value in reference.state_dicts[stem].items():
            assert torch.allclose(ddp.state_dicts[stem][key].double(), value.double(), rtol=0, atol=1e-5), f"{stem}.{key}"
    for name in ("loss", "aux_loss", "grad_norm/net"):  # metrics are means over ranks = means over the global batch
        assert ranks[0]["metrics"][name] == pytest.approx(single.metrics[name], abs=1e-5)
    torch.manual_seed(config["seed"])  # as the engine does before build_modules
    initial = ToyTask().build_modules()["net"].inp.weight.detach()
    assert (reference.state_dicts["model"]["inp.weight"] - initial).abs().max() > 1e-3  # trained, not the start
