"""Exponential moving average of a module's weights, kept in float32 beside the trained module.

After each step ``shadow = decay * shadow + (1 - decay) * parameter`` for every floating-point
parameter; buffers (GroupNorm has none, but counters and running statistics may exist) are copied,
not averaged. The shadow's state dict has the module's own keys, so ``module.load_state_dict`` takes
it (cast to the module's dtypes) and a checkpoint stores it as ``ema.safetensors``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ModelEMA:
    """An fp32 shadow of ``module``'s parameters and a copy of its buffers.

    ``decay`` in [0, 1): the weight of the old shadow per update (0.999 averages over about 1000 steps).
    The shadow lives on the module's device; ``module`` must be the unwrapped (no DDP, not compiled)
    module, so that the keys match its ``state_dict``.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay is {decay}; expected a value in [0, 1)")
        self.decay = decay
        self.updates = 0
        self.param_names = [name for name, _ in module.named_parameters()]
        self.buffer_names = [name for name, _ in module.named_buffers()]
        self.shadow = {name: value.detach().to(torch.float32, copy=True) for name, value in module.named_parameters()}
        self.buffers = {name: value.detach().clone() for name, value in module.named_buffers()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the shadow towards ``module``'s current parameters; copy its buffers."""
        parameters = dict(module.named_parameters())
        shadows = [self.shadow[name] for name in self.param_names]
        currents = [parameters[name].detach().to(torch.float32) for name in self.param_names]
        # lerp(shadow, current, 1 - decay) = decay * shadow + (1 - decay) * current
        torch._foreach_lerp_(shadows, currents, 1.0 - self.decay)
        for name, buffer in module.named_buffers():
            self.buffers[name].copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Shadow parameters (float32) and buffers under the module's state-dict keys."""
        return {**self.shadow, **self.buffers}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` output; keys must match the module exactly."""
        expected = set(self.shadow) | set(self.buffers)
        if set(state) != expected:
            missing = sorted(expected - set(state))
            unexpected = sorted(set(state) - expected)
            raise KeyError(f"ema state keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])
        for name, buffer in self.buffers.items():
            buffer.copy_(state[name])

    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (cast to its parameter dtypes)."""
        module.load_state_dict(self.state_dict())


__all__ = ["ModelEMA"]
