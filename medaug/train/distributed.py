"""Process setup for one process or many under torchrun, and the few collectives training needs.

torchrun (``python -m torch.distributed.run``) starts one process per GPU and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (plus the rendezvous address). Without them this is one process on
one GPU (or the CPU). Backend: NCCL on CUDA, gloo on CPU. Every helper here also works when no process
group exists (one process), so callers never branch on it. Model code never imports this module
(STYLE rule 3): the engine wraps modules in DDP, or shards them with FSDP2 (:func:`shard_module`), from
outside.

FSDP2 (``torch.distributed.fsdp.fully_shard``) needs a process group even in one process: ``setup(...,
process_group=True)`` then makes a one-rank group (an in-process store, no rendezvous). Sharded
parameters are DTensors; :func:`full_tensor` gathers one (every rank calls it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medaug.errors import ConfigError

log = logging.getLogger(__name__)

R = TypeVar("R")

# Long enough for rank 0 to write a multi-GB checkpoint while the others wait at a barrier.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, GPU ``local_rank`` on its host, its device.

    ``owns_process_group``: True when :func:`setup` created the process group (so :func:`teardown`
    destroys it); False when there is none or the caller created it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise ConfigError(f"${name}", f"is {value!r}; expected a non-negative integer (set by torchrun)")
    return int(value)


def pick_device(local_rank: int, device: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (or asked for), else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", "is 'cuda' but torch sees no CUDA device; expected 'auto' or 'cpu'")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError("$LOCAL_RANK", f"is {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                          "expected one process per GPU (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device: Literal["auto", "cpu", "cuda"] = "auto", process_group: bool = False) -> DistInfo:
    """Read the torchrun environment, choose the device and join the process group (if WORLD_SIZE > 1).

    ``process_group``: make a one-rank group when WORLD_SIZE is 1 too (FSDP2 needs one). An existing
    process group (created by the caller) is used as it is and left to the caller.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, pick_device(local_rank, device), False)
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    chosen = pick_device(local_rank, device)
    if world_size == 1 and not process_group:
        return DistInfo(0, 1, local_rank, chosen, False)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": chosen} if chosen.type == "cuda" else {}
    if world_size == 1:  # no torchrun: a one-rank group on an in-process store (no address, no port)
        options["store"] = dist.HashStore()
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT,
                            **options)
    log.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, chosen)
    return DistInfo(rank, world_size, local_rank, chosen, True)


def teardown(info: DistInfo | None = None) -> None:
    """Leave the process group if ``info`` says :func:`setup` made it (or, without ``info``, if one exists)."""
    owns = info.owns_process_group if info is not None else True
    if owns and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group; torchrun's ``RANK`` before setup)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def is_rank0() -> bool:
    """True in the one process that does side effects (files, logs, progress)."""
    return get_rank() == 0


def on_rank0(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
    """Call ``fn(*args, **kwargs)`` on rank 0 only (the one helper for side effects); None elsewhere."""
    return fn(*args, **kwargs) if is_rank0() else None


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if _initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean of ``values`` over ranks (a new float32 tensor of the same shape, on the input's device)."""
    result = values.detach().to(torch.float32, copy=True)
    if not _initialized() or dist.get_world_size() == 1:
        return result
    reduced = result.to(_collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return (reduced / dist.get_world_size()).to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (so that all ranks stop together)."""
    if not _initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (pickled between the job's own processes only)."""
    if not _initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# ------------------------------------------------------------------------------------------------ FSDP2


def shard_module(module: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """FSDP2 in place: ``fully_shard`` each of ``blocks``, then ``module`` (its remaining parameters).

    Parameters, gradients and (through them) optimizer states are split over all ranks along dim 0
    (ZeRO-3): a block's parameters are all-gathered just before its forward and backward and freed after.
    Parameters stay float32 (bf16 autocast does the matmuls, as without FSDP), so a sharded run computes
    what a DDP run computes. Needs the process group (``setup(process_group=True)``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds FSDP2-sharded (DTensor) parameters."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective: every rank calls it); other tensors unchanged."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            return value.full_tensor()
    return value


def distribute_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the whole tensor, the same on every rank) laid out as DTensor ``like`` (this rank's shard)."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full


__all__ = [
    "DistInfo",
    "shard_module",
    "is_sharded",
    "full_tensor",
    "distribute_like",
    "setup",
    "teardown",
    "pick_device",
    "get_rank",
    "get_world_size",
    "is_rank0",
    "on_rank0",
    "barrier",
    "all_reduce_mean",
    "any_rank",
    "all_gather_objects",
]
