"""Class-balanced, distributed-aware training samplers (DESIGN.md §2 ``data/``, issue 5 part 3).

A prepared dataset is dominated by its large domains and common structures: a 3-volume prostate set next
to a 1,000-volume CT set, or a tumour class in 2% of the slices. :func:`row_weights` gives every row a
sampling weight from the recipe (:class:`SamplerConfig`):

* ``by: natural``: every row weighs 1 (the data's own frequencies);
* ``by: domain``: row i weighs ``n_d^-power`` where n_d is the number of rows of its domain, so domain d
  receives ``n_d^(1 - power)`` of the mass: natural at ``power`` 0, every domain equally often at 1;
* ``by: structure``: every structure s present in a row is a class with ``f_s`` rows (rows with no
  structure present form one "empty" class); row i weighs ``max_{s in row i} f_s^-power``, so the rarest
  structure a row shows decides how often it is drawn (repeat-factor sampling, as LVIS does for rare
  classes). At ``power`` 1 a structure's rows are drawn about as often as any other structure's (exactly
  so when rows hold one class each); ``power`` 0.5 is the usual square-root compromise.

:class:`BalancedSampler` draws an epoch of ``epoch_size`` rows *with replacement* from these weights as
one **global stream**: position t of epoch e is ``searchsorted(cdf, u_t)`` where ``u`` comes from a
``torch.Generator`` seeded with (seed, e), so the stream is a pure function of (weights, seed, epoch).
Rank r of W takes positions r, r + W, r + 2W, ... (the convention of ``DistributedSampler`` and of
the training engine), so the ranks' shares are disjoint, together are the whole stream, and step s of a
W-process run reads the rows of step s of a one-process run with the same global batch. ``start`` skips
the first positions of the rank's share (an exact resume), and ``set_epoch`` picks the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from medaug.errors import ConfigError

log = logging.getLogger(__name__)

BalanceBy = Literal["natural", "domain", "structure"]


@dataclass(frozen=True)
class SamplerConfig:
    """How training rows are drawn (module docstring).

    by: natural | domain | structure. power: 0 = natural frequencies, 1 = fully balanced (values in
    between interpolate geometrically). epoch_size: draws per epoch over all ranks (None = the number of
    rows); an epoch only matters for when the stream is re-drawn.
    """

    by: BalanceBy = "natural"
    power: float = 1.0
    epoch_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.power <= 1.0:
            raise ConfigError("sampler.power", f"is {self.power}; expected a value in [0, 1] (0 natural, 1 balanced)")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ConfigError("sampler.epoch_size", f"is {self.epoch_size}; expected a positive integer or null")


def domain_weights(domain_N: np.ndarray, power: float) -> np.ndarray:
    """(N,) float64: ``n_d^-power`` for each row's domain d (``domain_N`` int, any labels)."""
    domain_N = np.asarray(domain_N)
    _, inverse_N, counts_D = np.unique(domain_N, return_inverse=True, return_counts=True)
    return counts_D.astype(np.float64)[inverse_N.reshape(-1)] ** -power


def structure_weights(present_NS: np.ndarray, power: float) -> np.ndarray:
    """(N,) float64: ``max over the row's classes of f_class^-power`` (an "empty" class for rows with none).

    ``present_NS``: (N, S) bool, structure s present in row i.
    """
    present_NS = np.asarray(present_NS, dtype=bool)
    empty_N1 = ~present_NS.any(axis=1, keepdims=True)
    classes_NC = np.concatenate([present_NS, empty_N1], axis=1)  # (N, S + 1)
    counts_C = classes_NC.sum(axis=0).astype(np.float64)
    per_class_C = np.where(counts_C > 0, np.maximum(counts_C, 1.0) ** -power, 0.0)
    return np.where(classes_NC, per_class_C[None, :], 0.0).max(axis=1)


def row_weights(config: SamplerConfig, domain_N: np.ndarray, present_NS: np.ndarray) -> np.ndarray:
    """(N,) float64 sampling weights of the rows (module docstring), not normalised.

    ``domain_N``: (N,) domain index per row; ``present_NS``: (N, S) bool structures present.
    """
    rows = len(domain_N)
    if len(present_NS) != rows:
        raise ValueError(f"present has {len(present_NS)} rows, domain has {rows}; expected one per row")
    if config.by == "natural" or config.power == 0.0:
        return np.ones(rows, dtype=np.float64)
    if config.by == "domain":
        return domain_weights(domain_N, config.power)
    return structure_weights(present_NS, config.power)


def stream_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch), independent for each pair."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0x5A3B1E]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class BalancedSampler(Sampler[int]):
    """Weighted draws with replacement as one global stream per epoch, shared out over ranks (module doc).

    ``weights_N``: non-negative row weights with a positive sum. ``num_replicas`` / ``rank``: the process
    layout (1 / 0 for one process). ``seed``: the stream's seed. ``epoch_size``: draws per epoch over all
    ranks (default: the number of rows), rounded down to a multiple of ``num_replicas``.
    Attributes the training engine uses: ``num_samples`` (this rank's draws per epoch), ``start``
    (positions of this rank's share to skip) and :meth:`set_epoch`.
    """

    def __init__(self, weights_N: np.ndarray | torch.Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 epoch_size: int | None = None):
        weights = torch.as_tensor(np.asarray(weights_N, dtype=np.float64))
        _check_weights(weights)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} processes; expected 0 <= rank < num_replicas")
        self.cdf_N = torch.cumsum(weights, dim=0)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        draws = len(weights) if epoch_size is None else epoch_size
        self.total_size = draws // num_replicas * num_replicas
        if self.total_size == 0:
            raise ConfigError("sampler.epoch_size", f"gives {draws} draws per epoch; expected at least one per "
                                                    f"process ({num_replicas})")
        self.num_samples = self.total_size // num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the stream of ``epoch`` on the next iteration."""
        self.epoch = epoch

    def global_stream(self, epoch: int) -> torch.Tensor:
        """All ranks' draws of ``epoch``, (total_size,) int64 row indices, the same on every rank."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch))
        uniform_T = torch.rand(self.total_size, generator=generator, dtype=torch.float64) * self.cdf_N[-1]
        rows_T = torch.searchsorted(self.cdf_N, uniform_T, right=True)
        return rows_T.clamp_(max=len(self.cdf_N) - 1)  # guards u rounding up to the total

    def share(self, epoch: int) -> torch.Tensor:
        """This rank's draws of ``epoch``: stream positions rank, rank + W, ..., (num_samples,) int64."""
        return self.global_stream(epoch)[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.share(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _check_weights(weights_N: torch.Tensor) -> None:
    if weights_N.dim() != 1 or len(weights_N) == 0:
        raise ValueError(f"weights have shape {tuple(weights_N.shape)}; expected (N,) with N >= 1")
    if not bool(torch.isfinite(weights_N).all()) or bool((weights_N < 0).any()) or float(weights_N.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")


def build_sampler(config: SamplerConfig, domain_N: np.ndarray, present_NS: np.ndarray, num_replicas: int = 1,
                  rank: int = 0, seed: int = 0) -> BalancedSampler:
    """:class:`BalancedSampler` over :func:`row_weights` of ``config``; logs the mass each domain receives."""
    weights_N = row_weights(config, domain_N, present_NS)
    if rank == 0:
        shares = {int(d): float(weights_N[np.asarray(domain_N) == d].sum() / weights_N.sum()) for d in np.unique(domain_N)}
        log.info("sampler by=%s power=%g: share of draws per domain index %s", config.by, config.power,
                 {d: round(share, 3) for d, share in shares.items()})
    return BalancedSampler(weights_N, num_replicas, rank, seed, config.epoch_size)


__all__ = [
    "BalanceBy",
    "BalancedSampler",
    "SamplerConfig",
    "build_sampler",
    "domain_weights",
    "row_weights",
    "stream_seed",
    "structure_weights",
]
