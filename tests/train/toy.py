"""A tiny task for the engine tests: an MLP regressing random data, plus an auxiliary trained module.

Run as a script under torchrun it trains one run and writes what each rank saw
(``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/toy.py RUN_DIR CONFIG_JSON``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

N_SAMPLES = 40
DIM = 6
HIDDEN = 16


class DictDataset(Dataset):
    """``N_SAMPLES`` fixed random (x, y) pairs as dicts with their index (order matters to the optimizer)."""

    def __init__(self, n: int = N_SAMPLES, dim: int = DIM, seed: int = 1234):
        generator = torch.Generator().manual_seed(seed)
        self.x_ND = torch.randn(n, dim, generator=generator)
        weight_D1 = torch.randn(dim, 1, generator=generator)
        self.y_N1 = torch.tanh(self.x_ND @ weight_D1) + 0.1 * torch.randn(n, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x_ND)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x_ND[index], "y": self.y_N1[index], "index": torch.tensor(index)}


class ToyNet(nn.Module):
    """Linear → LayerNorm → GELU → Linear, a 2-D ``offset`` excluded from weight decay, a call counter buffer."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)
        self.offset = nn.Parameter(torch.zeros(1, hidden))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def no_weight_decay(self) -> list[str]:
        return ["offset"]

    def forward(self, x_BD: Tensor) -> Tensor:
        self.calls += 1
        return self.out(F.gelu(self.norm(self.inp(x_BD) + self.offset)))  # (B, 1)


class ToyTask:
    """``net`` fits y; ``aux`` (a second optimizer) fits the residual. Options make it noisy (uses the
    Python, NumPy and torch generators), slow (``sleep_s`` per step) or die at ``fail_at_step``."""

    name = "toy"

    def __init__(self, noise: bool = True, sleep_s: float = 0.0, fail_at_step: int | None = None):
        self.noise = noise
        self.sleep_s = sleep_s
        self.fail_at_step = fail_at_step
        self.seen: list[list[int]] = []
        self.after_steps: list[int] = []

    def build_modules(self) -> dict[str, nn.Module]:
        return {"net": ToyNet(), "aux": nn.Linear(DIM, 1)}

    def train_dataset(self) -> Dataset:
        return DictDataset()

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, Any], step: int, update) -> dict[str, Any]:
        if step == self.fail_at_step:
            raise RuntimeError(f"killed at step {step}")
        time.sleep(self.sleep_s)
        x_BD = batch["x"]
        if self.noise:
            jitter = 0.01 * float(np.random.randn()) + 0.01 * random.random()
            x_BD = x_BD + 0.05 * torch.randn_like(x_BD) + jitter
        prediction_B1 = modules["net"](x_BD)
        loss = F.mse_loss(prediction_B1, batch["y"])
        update("net", loss)
        aux_loss = F.mse_loss(modules["aux"](x_BD), batch["y"] - prediction_B1.detach())
        update("aux", aux_loss)
        self.seen.append(batch["index"].tolist())
        return {"loss": loss.detach(), "aux_loss": float(aux_loss.detach())}  # a tensor and a float

    def after_step(self, modules: dict[str, nn.Module], step: int) -> None:
        self.after_steps.append(step)

    def metadata(self) -> dict[str, Any]:
        return {"model_config": {"dim": DIM, "hidden": HIDDEN}}


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(line + "\n")


def _main(run_dir: Path, config_json: str) -> None:
    from medaug.config.base import from_dict
    from medaug.train.distributed import all_reduce_mean, barrier, get_world_size, on_rank0, setup, teardown
    from medaug.train.engine import TrainConfig, train

    torch.set_num_threads(1)
    config = from_dict(TrainConfig, json.loads(config_json), "config")
    info = setup(config.device)
    task = ToyTask(noise=False)
    result = train(task, config, run_dir)  # the process group is the caller's: train leaves it up
    mean = all_reduce_mean(torch.tensor([float(info.rank), 10.0 * info.rank]))
    report = {"seen": task.seen, "mean": mean.tolist(), "world_size": get_world_size(), "step": result.step,
              "metrics": result.metrics}
    (run_dir / f"rank{info.rank}.json").write_text(json.dumps(report))
    on_rank0(_append_line, run_dir / "written_by.txt", f"rank {info.rank}")
    barrier()
    teardown(info)


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2])
