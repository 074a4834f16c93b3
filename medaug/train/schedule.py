"""Learning-rate schedules as pure functions of the step (no scheduler objects, nothing to checkpoint).

``step`` is the 0-based index of the optimizer update being taken: step 0 is the first update and
``max_steps - 1`` the last. Warm-up is linear from ``lr / warmup_steps`` (step 0) to ``lr`` (step
``warmup_steps - 1``), so no update runs at a learning rate of 0. After warm-up the decay goes from
``lr`` to ``lr * min_lr_ratio``, reached exactly at the last step ``max_steps - 1`` and held beyond.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medaug.train.engine import OptimConfig


def decay_progress(step: int, warmup_steps: int, max_steps: int) -> float:
    """Fraction in [0, 1] of the decay phase done at ``step`` (0 at the end of warm-up, 1 at the last step)."""
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """Learning rate for update ``step`` (0-based) of a run of ``max_steps`` updates."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    min_lr = config.lr * config.min_lr_ratio
    progress = decay_progress(step, config.warmup_steps, max_steps)
    if config.schedule == "linear":
        return config.lr - (config.lr - min_lr) * progress
    # cosine: half a period from lr down to min_lr (SGDR, Loshchilov & Hutter 2017, without restarts)
    return min_lr + (config.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["lr_at", "decay_progress"]
