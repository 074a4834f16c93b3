"""Training: one engine for every medaug model, and the tasks that plug into it.

* :mod:`medaug.train.engine`: ``TrainConfig``, ``OptimConfig``, the ``Task`` protocol, ``train``,
  ``TrainResult`` (the loop: DDP, compile, autocast, AdamW, schedules, EMA, data position, logs).
* :mod:`medaug.train.checkpoint`: the checkpoint format (safetensors + meta.json + weights-only
  trainer.pt), ``save_checkpoint``, ``load_checkpoint``, ``latest_checkpoint``, ``load_module_weights``.
* :mod:`medaug.train.distributed`: torchrun setup/teardown, ``is_rank0``, ``on_rank0``,
  ``all_reduce_mean``, ``barrier``.
* :mod:`medaug.train.schedule` (``lr_at``), :mod:`medaug.train.ema` (``ModelEMA``),
  :mod:`medaug.train.logs` (``RunLogger``).

Names are imported on first use, so ``import medaug.train`` alone does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OptimConfig": "engine",
    "TrainConfig": "engine",
    "Task": "engine",
    "TrainResult": "engine",
    "train": "engine",
    "unwrap": "engine",
    "Checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_module_weights": "checkpoint",
    "update_checkpoint_meta": "checkpoint",
    "CheckpointError": "checkpoint",
    "lr_at": "schedule",
    "ModelEMA": "ema",
    "is_rank0": "distributed",
    "on_rank0": "distributed",
    "all_reduce_mean": "distributed",
    "barrier": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medaug.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medaug.train.{_EXPORTS[name]}"), name)
