"""The training loop every medaug model shares (tokenizer, VAR, features): a task says what to compute,
the engine does the rest.

A :class:`Task` builds its modules and its train dataset and computes losses in ``training_step``; it
calls ``update(name, loss)`` once per module it trains that step. The engine owns everything around
it, applied from outside the model (STYLE rule 3, as torchtitan does): torchrun setup, DDP (gradients
averaged over ranks, ``broadcast_buffers=False``), optional ``torch.compile``, bf16 autocast on CUDA,
AdamW per module with decay/no-decay groups, learning-rate schedules, gradient clipping, EMA of the
main module, a DistributedSampler with an exact data position, atomic checkpoints (model, optimizer,
schedule, step, RNG, data position) with bit-exact resume on CPU, ``run_dir/log.jsonl`` (+ TensorBoard
when installed), and ``max_steps`` / ``max_minutes``.

Global batch: ``TrainConfig.batch_size`` samples per step over all ranks. Rank r of world size W takes
every W-th index of the epoch's permutation, so step s of a W-process run sees exactly the samples of
step s of a one-process run with the same global batch (and the averaged gradient is the same mean).

Scale: one process trains on one GPU (or the CPU); under ``torchrun --nproc-per-node N`` each process
takes GPU ``LOCAL_RANK`` and a share of the global batch. A trained module is replicated with DDP
(gradients all-reduced in buckets during the backward pass), or with ``fsdp: true`` sharded with FSDP2
block by block (each GPU keeps 1/N of the weights, gradients and AdamW states; a block's weights are
gathered just for its forward and backward: d24/d30). Both compute what one process computes with the
same global batch, and checkpoints hold full tensors (gathered onto rank 0), so a run saved by N
processes resumes on M, sharded or not, and samples on a CPU. ``compile`` (scope "blocks": each block
compiled in place, one graph for all of them), ``activation_checkpointing`` (a fraction of the blocks
recomputed in the backward pass), fused AdamW and bf16 autocast are the speed and memory knobs; their
measured effect is in benchmarks/README.md. Several nodes: the same command on every node under
torchrun's c10d rendezvous (recipes/README.md, "Training on several GPUs and nodes").

Exactness of resume: all randomness the engine uses is checkpointed (Python, NumPy, torch CPU/CUDA
generators per rank; the sampler's permutation is a function of seed and epoch; DataLoader workers are
seeded from (seed, rank, epoch)). Randomness drawn inside ``Dataset.__getitem__`` in worker processes is
not checkpointed: draw augmentation in ``training_step`` (main process) where a resume must be exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medaug.config.base import to_dict
from medaug.errors import CheckpointError, ConfigError
from medaug.io.atomic import atomic_output
from medaug.train import distributed as dist_utils
from medaug.train.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_module_weights,
    load_optimizer_state_dict,
    module_state_dict,
    optimizer_state_dict,
    restore_rng_state,
    save_checkpoint,
    step_dir_name,
    to_json_text,
)
from medaug.train.distributed import DistInfo
from medaug.train.ema import ModelEMA
from medaug.train.logs import RunLogger, truncate_log
from medaug.train.schedule import lr_at

log = logging.getLogger(__name__)

UpdateFn = Callable[[str, Tensor], None]
COMPILE_OPTIONS: dict[str, Any] = {}
"""Keyword arguments of every ``torch.compile`` the engine makes (e.g. ``mode``; tests use a cheaper backend)."""
ProgressFn = Callable[[int, int, dict[str, float]], None]
CONFIG_FILE = "train_config.json"
RESERVED_MODULE_NAMES = ("model", "ema", "meta", "trainer")


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and learning-rate schedule of one trained module.

    ``weight_decay`` applies to parameters with ndim >= 2 only; biases, norm weights and the names a
    module lists in ``no_weight_decay()`` get none. ``min_lr_ratio``: the final lr is ``lr * ratio``.
    ``grad_clip``: max global L2 norm of the module's gradients (None = no clipping). ``fused``: fused
    AdamW kernel; None = on CUDA only.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", self.lr, "a positive number")
        _require(all(0 <= beta < 1 for beta in self.betas), "betas", self.betas, "two values in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a value >= 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a value in [0, 1]")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "a positive number or null")


RESUMABLE_TRAIN_KEYS = ("train.max_steps", "train.max_minutes", "train.device", "train.num_workers",
                        "train.log_every", "train.checkpoint_every", "train.keep_last")
"""Recipe keys a resumed run may change without a warning: how long and where it runs, not what it learns."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is the GLOBAL batch (per rank: batch_size // world_size).

    ``precision``: "auto" = bf16 autocast on CUDA, fp32 on CPU. ``ema_decay``: EMA of the first
    module's weights (None = off). ``keep_last``: checkpoints kept on disk. ``device``: "auto" = CUDA
    when available. ``optim``: one OptimConfig per trained module by name (defaults for the others).

    Speed and memory (module doc, "Scale"): ``compile``: ``torch.compile``; ``compile_scope`` "blocks"
    compiles each repeated block of a module (its ``blocks`` ModuleList) in place, all blocks sharing one
    graph (fast to compile, works with DDP and FSDP2; a module without blocks is compiled whole), "model"
    compiles the whole (DDP-wrapped) module. ``fsdp``: shard every trained module with FSDP2 (per block,
    then the rest) instead of replicating it with DDP; also in one process. ``activation_checkpointing``:
    the fraction of blocks (evenly spaced) whose activations are recomputed in the backward pass instead
    of kept (0 = none, 1 = all: about a third more compute for a large cut in activation memory).
    """

    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 32
    num_workers: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    compile_scope: Literal["blocks", "model"] = "blocks"
    fsdp: bool = False
    activation_checkpointing: float = 0.0
    ema_decay: float | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    keep_last: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    optim: dict[str, OptimConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, "max_steps", self.max_steps, "an integer >= 0")
        _require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", self.max_minutes,
                 "a positive number or null")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _require(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "a value in [0, 1) or null")
        _require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _require(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        _require(self.keep_last >= 1, "keep_last", self.keep_last, "an integer >= 1")
        _require(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")
        _require(0.0 <= self.activation_checkpointing <= 1.0, "activation_checkpointing",
                 self.activation_checkpointing, "a fraction of the blocks in [0, 1]")
        _require(not (self.fsdp and self.compile and self.compile_scope == "model"), "compile_scope",
                 self.compile_scope, "'blocks' with fsdp: true (FSDP2 gathers parameters block by block)")


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(key, f"is {value!r}; expected {expected}")


# ------------------------------------------------------------------------------------ task and result


class Task(Protocol):
    """What a model brings to the engine (the tokenizer, VAR, feature tasks implement it).

    Optional methods, called when present: ``after_step(modules, step)`` after each step (e.g. dead
    code re-initialization; ``modules`` are the wrapped modules, use :func:`unwrap` for the raw ones),
    ``train_sampler(rank, world_size, seed)`` returning the sampler of this rank (instead of the engine's
    :class:`ResumableSampler`; it must yield this rank's share of an order that is a function of seed
    and epoch, and have ``set_epoch(epoch)``, a settable ``start`` (indices of the epoch's share to skip,
    for exact resume) and ``num_samples`` (indices per epoch), e.g.
    :class:`medaug.data.samplers.BalancedSampler`), and ``evaluate(modules, run_dir) -> dict`` (called by
    the task's run function on rank 0, not here).
    """

    name: str

    def build_modules(self) -> dict[str, nn.Module]:
        """Modules by name, in order; the first is the main model (EMA, ``model.safetensors``)."""
        ...

    def train_dataset(self) -> Dataset:
        """The train split only; items are dicts of tensors (lists of strings are passed through)."""
        ...

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, Any], step: int,
                      update: UpdateFn) -> dict[str, float | Tensor]:
        """Forward passes and ``update(name, loss)`` per trained module; returns scalar metrics.

        ``modules``: DDP-wrapped / compiled when the run is distributed / compiled. ``step``: 0-based
        index of this step. Autocast (bf16 on CUDA) is active around this call. Metrics may be 0-d
        tensors (no device sync); every rank must return the same keys.
        """
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-able keys for the checkpoint's meta.json (model config, domains, vocabulary...)."""
        ...


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: ``step`` updates done, the last logged ``metrics`` (mean over ranks and the
    last log interval), the final checkpoint folder, and why it stopped."""

    step: int
    metrics: dict[str, float]
    checkpoint_path: Path | None
    stopped_by: Literal["max_steps", "max_minutes"]


# ------------------------------------------------------------------------------ modules and optimizers


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DDP wrappers (what checkpoints and EMA see)."""
    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif isinstance(module, DistributedDataParallel):
            module = module.module
        else:
            return module


def _no_decay_names(module: nn.Module) -> set[str]:
    method = getattr(module, "no_weight_decay", None)
    return set(method()) if callable(method) else set()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: parameters with ndim >= 2 decay; 1-D ones (biases, norms) and those named by the
    module's optional ``no_weight_decay()`` (a name or a submodule prefix) do not. Frozen ones are left out."""
    skip = _no_decay_names(module)
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        listed = any(name == entry or name.startswith(entry + ".") for entry in skip)
        (no_decay if parameter.ndim < 2 or listed else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; lr is set from the schedule before every step."""
    fused = device.type == "cuda" if config.fused is None else config.fused
    return torch.optim.AdamW(param_groups(module, config.weight_decay), lr=config.lr, betas=config.betas,
                             fused=fused)


def _no_buffer_sync() -> dict[str, bool]:
    # Buffers are not re-broadcast before every forward (rank-local statistics stay local, no extra
    # collective); torch >= 2.13 spells it forward_sync_buffers (broadcast_buffers is deprecated there).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_module(module: nn.Module, info: DistInfo, compile_module: bool) -> nn.Module:
    """DDP (when distributed, trainable and not FSDP2-sharded), then ``torch.compile`` of the wrapper
    (PyTorch's DDP + compile order) when ``compile_module``. Gradients live in DDP's buckets
    (``gradient_as_bucket_view``: one copy of them, not two)."""
    wrapped = module
    trainable = any(parameter.requires_grad for parameter in module.parameters())
    if info.world_size > 1 and trainable and not dist_utils.is_sharded(module):
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                          **_no_buffer_sync())
    return torch.compile(wrapped, **COMPILE_OPTIONS) if compile_module else wrapped


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The module's repeated blocks (its ``blocks`` attribute when that is an ``nn.ModuleList``), else []:
    the unit of per-block compilation, activation checkpointing and FSDP2 sharding."""
    blocks = getattr(module, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def checkpoint_blocks(module: nn.Module, fraction: float) -> list[int]:
    """Recompute the activations of ``round(fraction · n)`` of the module's n blocks (evenly spaced) in the
    backward pass instead of keeping them (non-reentrant ``torch.utils.checkpoint``; the block's RNG
    state is replayed, so stochastic depth draws the same rows). The block's ``forward`` is replaced on
    the instance: parameter names and state-dict keys do not change. Returns the block indices."""
    blocks = repeated_blocks(module)
    count = round(fraction * len(blocks))
    chosen = [int(i * len(blocks) / count) for i in range(count)] if count else []
    for index in chosen:
        blocks[index].forward = _recomputed(blocks[index].forward)
    return chosen


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def prepare_module(module: nn.Module, config: TrainConfig, info: DistInfo) -> str:
    """Apply, in place and in this order, activation checkpointing, per-block compilation and FSDP2 to a
    trained module (torchtitan's order); DDP and whole-module compilation come later (:func:`wrap_module`).
    Returns a one-line description for the log."""
    blocks = repeated_blocks(module)
    done = []
    if config.activation_checkpointing > 0 and blocks:
        recomputed = checkpoint_blocks(module, config.activation_checkpointing)
        done.append(f"{len(recomputed)}/{len(blocks)} blocks recomputed")
    if config.compile and config.compile_scope == "blocks" and blocks:
        for block in blocks:
            block.compile(**COMPILE_OPTIONS)
        done.append(f"{len(blocks)} blocks compiled")
    if config.fsdp:
        dist_utils.shard_module(module, blocks, info.device)
        done.append(f"FSDP2 over {info.world_size} rank(s), {len(blocks)} blocks + root")
    return ", ".join(done) or "as built"


def _compile_whole(module: nn.Module, config: TrainConfig) -> bool:
    return config.compile and (config.compile_scope == "model" or not repeated_blocks(module))


@dataclass
class _Trained:
    """One trained module: its optimizer, schedule config and how many updates it has had."""

    module: nn.Module
    optimizer: torch.optim.AdamW
    config: OptimConfig
    updates: int = 0
    last_lr: float = 0.0


# ------------------------------------------------------------------------------------------------ data


@dataclass
class DataPosition:
    """How far the data has been read: ``batch`` batches consumed of epoch ``epoch`` (0-based)."""

    epoch: int = 0
    batch: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.batch += 1
        if self.batch >= batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (shuffle with ``seed + epoch``, rank's share, drop_last) that can start
    ``start`` indices into its share of the epoch, so a resumed run skips what was consumed without
    reading it."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _derived_seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, rank, epoch...), independent for each combination."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (in dicts, lists, tuples) to ``device``; anything else unchanged."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", and for "auto" on CUDA; no autocast otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- metrics


class _Meter:
    """Running sums of per-step metrics (tensors stay on device: no sync until :meth:`reduce`)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: float | Tensor) -> None:
        value = value.detach().float() if isinstance(value, Tensor) else float(value)
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Mean per key over the interval and over ranks; resets the sums."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        means = torch.stack([torch.as_tensor(self.sums[key], dtype=torch.float32, device=device).reshape(())
                             / self.counts[key] for key in keys])  # (n_keys,)
        values = dist_utils.all_reduce_mean(means).tolist()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values, strict=True))


# --------------------------------------------------------------------------------------------- trainer


class _Trainer:
    """The state of one run (modules, optimizers, EMA, data position, step); :func:`train` drives it."""

    def __init__(self, task: Task, config: TrainConfig, run_dir: Path, info: DistInfo):
        self.task, self.config, self.run_dir, self.info = task, config, run_dir, info
        self.device = info.device
        self.step = 0
        self.position = DataPosition()
        seed_everything(config.seed)  # the same on every rank: identical initial weights
        self.modules = self._build_modules()
        self.main_name = next(iter(self.modules))
        self._prepare_modules()
        self.trained = self._build_optimizers()
        self.ema = ModelEMA(self.modules[self.main_name], config.ema_decay) if config.ema_decay is not None else None
        seed_everything(_derived_seed(config.seed, info.rank))  # then one stream per rank (dropout, noise)
        self.per_rank_batch = self._per_rank_batch()
        self.loader_generator = torch.Generator()
        self.sampler, self.loader = self._build_loader(task.train_dataset())
        self.batches_per_epoch = self.sampler.num_samples // self.per_rank_batch
        self.wrapped: dict[str, nn.Module] = {}
        self.meter = _Meter()
        self.metrics: dict[str, float] = {}
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self._last_log = (time.monotonic(), 0)  # (time, step) of the last log record

    # ---- building

    def _build_modules(self) -> dict[str, nn.Module]:
        modules = dict(self.task.build_modules())
        if not modules:
            raise ConfigError(f"{self.task.name}.build_modules", "returned no modules; expected at least the main model")
        reserved = [name for name in list(modules)[1:] if name in RESERVED_MODULE_NAMES]
        if reserved:
            raise ConfigError(f"{self.task.name}.build_modules", f"module name {reserved[0]!r} is reserved for "
                              f"checkpoint files; expected a name other than {', '.join(RESERVED_MODULE_NAMES)}")
        return {name: module.to(self.device) for name, module in modules.items()}

    def _prepare_modules(self) -> None:
        """Activation checkpointing, per-block compilation and FSDP2 of every trainable module (config)."""
        for name, module in self.modules.items():
            if any(parameter.requires_grad for parameter in module.parameters()):
                description = prepare_module(module, self.config, self.info)
                if self.info.is_rank0:
                    log.info("%s: %s", name, description)

    def _build_optimizers(self) -> dict[str, _Trained]:
        unknown = [name for name in self.config.optim if name not in self.modules]
        if unknown:
            raise ConfigError(f"optim.{unknown[0]}", f"no module of that name; expected one of {', '.join(self.modules)}")
        trained = {}
        for name, module in self.modules.items():
            if not any(parameter.requires_grad for parameter in module.parameters()):
                if name in self.config.optim:
                    log.warning("optim.%s is ignored: module %r has no trainable parameters", name, name)
                continue
            optim_config = self.config.optim.get(name, OptimConfig())
            trained[name] = _Trained(module, build_optimizer(module, optim_config, self.device), optim_config)
        return trained

    def _per_rank_batch(self) -> int:
        world_size = self.info.world_size
        if self.config.batch_size % world_size:
            raise ConfigError("batch_size", f"is {self.config.batch_size}; expected a multiple of the {world_size} "
                                            "processes (the global batch is split evenly over ranks)")
        return self.config.batch_size // world_size

    def _build_loader(self, dataset: Dataset) -> tuple[ResumableSampler, DataLoader]:
        make_sampler = getattr(self.task, "train_sampler", None)
        if callable(make_sampler):  # the task's own order (e.g. class-balanced draws); same contract as below
            sampler = make_sampler(self.info.rank, self.info.world_size, self.config.seed)
        else:
            sampler = ResumableSampler(dataset, self.info.world_size, self.info.rank, self.config.seed)
        if sampler.num_samples < self.per_rank_batch:
            raise ConfigError("batch_size", f"is {self.config.batch_size} but the train dataset has {len(dataset)} "
                                            "samples; expected at most the dataset size")
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=self.per_rank_batch, sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                            generator=self.loader_generator)
        return sampler, loader

    def _batches(self) -> Iterator[Any]:
        """Batches forever from the saved data position on; epoch e shuffles with ``seed + e``."""
        epoch, start = self.position.epoch, self.position.batch
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.start = start * self.per_rank_batch
            # worker seeds come from this generator: a function of (seed, rank, epoch), not of the main RNG
            self.loader_generator.manual_seed(_derived_seed(self.config.seed, self.info.rank, epoch))
            yield from self.loader
            epoch, start = epoch + 1, 0

    def _stem(self, name: str) -> str:
        return "model" if name == self.main_name else name

    def _saved_modules(self) -> dict[str, nn.Module]:
        """What checkpoints hold, by file stem: the main module ("model") and every trained one."""
        return {self._stem(name): module for name, module in self.modules.items()
                if name == self.main_name or name in self.trained}

    # ---- checkpoints

    def _state_dicts(self) -> dict[str, dict[str, Tensor]]:
        """Full state dicts by file stem; gathers sharded modules (every rank calls it, rank 0 gets them)."""
        states = {stem: module_state_dict(module) for stem, module in self._saved_modules().items()}
        if self.ema is not None:
            states["ema"] = {key: dist_utils.full_tensor(value) for key, value in self.ema.state_dict().items()}
        return states

    def _trainer_state(self, rng_states: list[dict[str, Tensor]]) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_position": dataclasses.asdict(self.position),
            "world_size": self.info.world_size,
            "batch_size": self.config.batch_size,
            "optimizers": {name: optimizer_state_dict(trained.module, trained.optimizer)
                           for name, trained in self.trained.items()},
            "schedules": {name: {"updates": trained.updates, "last_lr": trained.last_lr}
                          for name, trained in self.trained.items()},
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "rng": rng_states,
        }

    def _metadata(self) -> dict[str, Any]:
        engine = {
            "train_config": to_dict(self.config),
            "modules": {stem: self.main_name if stem == "model" else stem for stem in self._saved_modules()},
            "world_size": self.info.world_size,
        }
        task_metadata = dict(self.task.metadata())
        clashes = sorted(set(engine) & set(task_metadata))
        if clashes:
            raise ConfigError(f"{self.task.name}.metadata", f"key {clashes[0]!r} is the engine's; expected other keys")
        return {**engine, **task_metadata}

    def save(self) -> Path:
        """Checkpoint the current step (rank 0 writes; RNG states come from every rank)."""
        rng_states = dist_utils.all_gather_objects(capture_rng_state(self.device))
        path = self.run_dir / CHECKPOINTS_DIR / step_dir_name(self.step)
        states, trainer_state = self._state_dicts(), self._trainer_state(rng_states)  # collectives when sharded
        if self.info.is_rank0:
            path = save_checkpoint(self.run_dir / CHECKPOINTS_DIR, self.step, self.task.name, states, trainer_state,
                                   self._metadata(), keep_last=self.config.keep_last)
        dist_utils.barrier()
        self.saved_step, self.saved_path = self.step, path
        return path

    def resume_from(self, path: Path) -> None:
        """Restore weights, optimizers, schedules, EMA, step, data position and RNG from a checkpoint."""
        checkpoint = load_checkpoint(path, expect_kind=self.task.name)
        state = checkpoint.trainer_state
        if state is None:
            raise CheckpointError(checkpoint.path / "trainer.pt", "missing; expected the trainer state to resume from")
        for stem, module in self._saved_modules().items():
            load_module_weights(module, checkpoint, stem)
        self._restore_optimizers(checkpoint, state)
        self._restore_ema(checkpoint)
        self.step = int(state["step"])
        self.position = DataPosition(**state["data_position"])
        self._restore_rng(state)
        self._warn_config_changes(checkpoint.meta.get("train_config", {}))
        self.saved_step, self.saved_path = self.step, checkpoint.path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint.path, self.step,
                 self.position.epoch, self.position.batch)

    def _restore_optimizers(self, checkpoint: Checkpoint, state: dict[str, Any]) -> None:
        for name, trained in self.trained.items():
            if name not in state["optimizers"]:
                raise CheckpointError(checkpoint.path / "trainer.pt", f"has no optimizer state for module {name!r}; "
                                      f"expected one of {sorted(state['optimizers'])}")
            load_optimizer_state_dict(trained.module, trained.optimizer, state["optimizers"][name],
                                      f"{checkpoint.path / 'trainer.pt'} optimizers.{name}")
            schedule = state["schedules"].get(name, {})
            trained.updates = int(schedule.get("updates", 0))
            trained.last_lr = float(schedule.get("last_lr", 0.0))

    def _restore_ema(self, checkpoint: Checkpoint) -> None:
        if self.ema is None:
            return
        if "ema" in checkpoint.state_dicts:
            current = self.ema.state_dict()  # DTensor shards when the module is sharded
            saved = checkpoint.state_dicts["ema"]
            self.ema.load_state_dict({key: dist_utils.distribute_like(value, current[key]) if key in current else value
                                      for key, value in saved.items()})
            self.ema.updates = int((checkpoint.trainer_state or {}).get("ema_updates", 0))
            return
        log.warning("%s has no ema.safetensors; the EMA starts from the loaded weights", checkpoint.path)
        self.ema = ModelEMA(self.modules[self.main_name], self.ema.decay)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        rng_states = state["rng"]
        if len(rng_states) == self.info.world_size:
            restore_rng_state(rng_states[self.info.rank], self.device)
            return
        log.warning("checkpoint was written by %d processes, this run has %d: random streams are reseeded "
                    "(the data order is unchanged, the run is no longer bit-exact)", len(rng_states), self.info.world_size)
        seed_everything(_derived_seed(self.config.seed, self.info.rank, self.step))

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        current = json.loads(to_json_text(to_dict(self.config), CONFIG_FILE))
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        if changed:
            log.warning("train config differs from the checkpoint's in: %s (data order and schedule follow the new "
                        "values)", ", ".join(changed))

    # ---- one step

    def update(self, name: str, loss: Tensor) -> None:
        """Zero ``name``'s gradients, backward ``loss``, clip, set the scheduled lr, step its optimizer."""
        trained = self.trained.get(name)
        if trained is None:
            raise ConfigError(f"update({name!r})",
                              f"no trained module of that name; expected one of {', '.join(self.trained)}")
        trained.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trained.config.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(trained.module.parameters(), trained.config.grad_clip)
            self.meter.add(f"grad_norm/{name}", dist_utils.full_tensor(norm))  # sharded: a replicated DTensor
        trained.last_lr = lr_at(self.step, trained.config, self.config.max_steps)
        for group in trained.optimizer.param_groups:
            group["lr"] = trained.last_lr
        trained.optimizer.step()
        trained.updates += 1

    def _train_step(self, batch: Any) -> None:
        batch = move_to_device(batch, self.device)
        with autocast_context(self.config.precision, self.device):
            metrics = self.task.training_step(self.wrapped, batch, self.step, self.update)
        for key, value in (metrics or {}).items():
            self.meter.add(key, value)
        after_step = getattr(self.task, "after_step", None)
        if callable(after_step):
            after_step(self.wrapped, self.step)
        self.step += 1
        self.position.advance(self.batches_per_epoch)
        if self.ema is not None:
            self.ema.update(self.modules[self.main_name])

    # ---- the loop

    def start(self, resume: bool) -> None:
        """Resume (or refuse to overwrite an earlier run), write the resolved config, wrap the modules."""
        found = latest_checkpoint(self.run_dir)
        if found is not None and not resume:
            raise ConfigError(self.run_dir, "holds checkpoints of an earlier run; expected resume=True (--resume) "
                                            "or a new run folder")
        if resume and found is None:
            log.info("no checkpoint in %s; starting from step 0", self.run_dir)
        if resume and found is not None:
            self.resume_from(found)
            dropped = dist_utils.on_rank0(truncate_log, self.run_dir / "log.jsonl", self.step)
            if dropped:
                log.info("log.jsonl: dropped %d records written after step %d", dropped, self.step)
        dist_utils.on_rank0(self._write_config)
        self.wrapped = {name: wrap_module(module, self.info, _compile_whole(module, self.config))
                        for name, module in self.modules.items()}

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.run_dir / CONFIG_FILE) as temporary:
            temporary.write_text(to_json_text(to_dict(self.config), CONFIG_FILE))

    def _log(self, logger: RunLogger, started: float) -> None:
        metrics = self.meter.reduce(self.device)
        metrics.update({f"lr/{name}": trained.last_lr for name, trained in self.trained.items()})
        now = time.monotonic()
        last_time, last_step = self._last_log
        samples_per_s = (self.step - last_step) * self.config.batch_size / max(now - last_time, 1e-9)
        self._last_log = (now, self.step)
        self.metrics = metrics
        logger.write(self.step, {"epoch": self.position.epoch, "elapsed_s": round(now - started, 3),
                                 "samples_per_s": samples_per_s, **metrics})
        if self.info.is_rank0:
            shown = " ".join(f"{key}={value:.4g}" for key, value in metrics.items())
            log.info("step %d/%d %s", self.step, self.config.max_steps, shown)

    def _out_of_time(self, deadline: float | None) -> bool:
        if deadline is None:
            return False
        if self.info.world_size > 1 and self.step % self.config.log_every:
            return False  # ranks agree on stopping at log steps, where they synchronize anyway
        return dist_utils.any_rank(time.monotonic() >= deadline)

    def run(self, progress: ProgressFn | None) -> TrainResult:
        """Train until ``max_steps`` or ``max_minutes``; checkpoint at the end."""
        started = time.monotonic()
        deadline = started + 60.0 * self.config.max_minutes if self.config.max_minutes is not None else None
        self._last_log = (started, self.step)
        logger = RunLogger(self.run_dir, enabled=self.info.is_rank0)
        batches = self._batches()
        stopped_by: Literal["max_steps", "max_minutes"] = "max_steps"
        try:
            while self.step < self.config.max_steps:
                self._train_step(next(batches))
                if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
                    self._log(logger, started)
                if progress is not None and self.info.is_rank0:
                    progress(self.step, self.config.max_steps, self.metrics)
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
                if self.step < self.config.max_steps and self._out_of_time(deadline):
                    stopped_by = "max_minutes"
                    break
            if self._last_log[1] != self.step:
                self._log(logger, started)
            if self.saved_step != self.step:
                self.save()
        finally:
            batches.close()
            logger.close()
        return TrainResult(self.step, self.metrics, self.saved_path, stopped_by)


def train(task: Task, config: TrainConfig, run_dir: Path, resume: bool = False,
          progress: ProgressFn | None = None) -> TrainResult:
    """Train ``task``'s modules under ``config``, writing logs and checkpoints into ``run_dir``.

    Works as one process (CPU or one GPU) and under torchrun (one process per GPU; gloo on CPU). With
    ``resume``, continues from ``run_dir``'s latest checkpoint; without it, a run folder that already
    holds checkpoints is refused. ``progress(step, max_steps, metrics)`` is called on rank 0 after
    every step (metrics: the last logged means). Returns the final step, metrics, checkpoint and the
    reason it stopped.
    """
    run_dir = Path(run_dir)
    info = dist_utils.setup(config.device, process_group=config.fsdp)
    try:
        trainer = _Trainer(task, config, run_dir, info)
        trainer.start(resume)
        return trainer.run(progress)
    finally:
        dist_utils.teardown(info)


__all__ = [
    "RESUMABLE_TRAIN_KEYS",
    "OptimConfig",
    "TrainConfig",
    "Task",
    "TrainResult",
    "DataPosition",
    "ResumableSampler",
    "train",
    "unwrap",
    "param_groups",
    "build_optimizer",
    "wrap_module",
    "prepare_module",
    "repeated_blocks",
    "checkpoint_blocks",
    "move_to_device",
    "seed_everything",
    "autocast_context",
]
