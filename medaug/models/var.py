"""MedVAR's next-scale transformer (VAR-NOTES.md "Transformer", DESIGN.md §3 "Conditioning" and §4).

The tokenizer describes a slice by K token maps of sides p_0 < ... < p_{K-1}, flattened row-major and
concatenated into L = Σ p_k² positions. The transformer predicts every scale at once under teacher
forcing: position i attends to position j when scale(j) <= scale(i) (block-causal over scales), so the
logits of scale k depend only on the condition and on the teacher inputs of scales 1..k, which are built
from the tokens of scales 0..k-1.

Inputs (``forward``):

* the first scale's p_0² positions (1 for VAR's schedules) are the condition vector plus a learned start
  embedding; the other L - p_0² positions are a linear projection (latent_dim → width) of the tokenizer's
  teacher-forcing input (:meth:`MultiScaleQuantizer.indices_to_teacher_inputs`);
* every position adds a learned absolute position embedding and a learned level (scale index) embedding.

Condition (DESIGN §3): domain embedding + Linear(S → width) of the multi-hot of structures present +
Linear(S → width) of the multi-hot of structures annotated (the context), one vector of ``width`` per
row. Rows flagged in ``drop_B`` use a learned null condition instead (classifier-free guidance; the
training task draws the flags at the recipe's rate). The condition is the first token and the input of
adaptive LayerNorm in every block and before the head.

Block: LayerNorm without affine; SiLU → Linear(width, 6·width) of the condition gives γ1, γ2, s1, s2, b1,
b2 (once per row, not per token); x += γ1·Attn(LN(x)(1 + s1) + b1); x += γ2·FFN(LN(x)(1 + s2) + b2).
Attention has q and v biases but no k bias, L2-normalises q and k per head, multiplies q by a learned
per-head factor exp(min(t, ln 100)) initialised at 4 and uses a softmax scale of 1. The FFN is
Linear(4·width), tanh-GELU, Linear(width). Stochastic depth rises linearly over the blocks to
``drop_path_rate``. The head is an adaptive LayerNorm and Linear(width, V); logits are float32.

Attention runs through ``F.scaled_dot_product_attention`` with a boolean block-causal mask, or through
FlexAttention with a block mask (``attn_impl="flex"``; imported lazily, compiled on CUDA, eager and
forward-only on CPU). ``"auto"`` picks SDPA, measured as fast at L = 680 (:meth:`VAR.resolved_attn_impl`).
Sampling uses :meth:`VAR.forward_scale` with a preallocated :class:`KVCache`: one call per scale, the
new positions attending to the cached keys of all earlier scales and to themselves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medaug.errors import ConfigError
from medaug.models.quant import VAR_PATCH_SIDES_256

AttnImpl = Literal["sdpa", "flex", "auto"]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# VAR clamps the learned attention temperature at 100 (log-space), so q·k stays within [-100, 100].
_MAX_LOG_ATTN_SCALE = math.log(100.0)
_INIT_LOG_ATTN_SCALE = math.log(4.0)

TOKENIZER_FIELDS = ("patch_sides", "codebook_size", "latent_dim")
"""VARConfig fields that come from the tokenizer checkpoint (not from the model preset)."""

DATA_FIELDS = ("num_domains", "num_structures")
"""VARConfig fields that come from the prepared dataset (not from the model preset)."""


@dataclass(frozen=True)
class VARConfig:
    """Next-scale transformer settings (defaults: VAR d16 on the 256² tokenizer).

    depth: number of blocks. width: model width C (default 64·depth). heads: attention heads (default
        depth, i.e. a head dimension of 64). mlp_ratio: FFN hidden width / C.
    patch_sides, codebook_size, latent_dim: the tokenizer's scale schedule, vocabulary V and code
        dimension (from its checkpoint).
    num_domains: domains of the prepared dataset (embedding rows). num_structures: S, the length of the
        present/annotated multi-hot vectors (0: domain-only condition).
    drop_path_rate: stochastic depth of the last block (default 0.1·depth/24; linear from 0 at the first).
    attn_impl: "sdpa" (boolean mask), "flex" (FlexAttention block mask; forward only on CPU) or "auto"
        (the faster one measured: sdpa, see :meth:`VAR.resolved_attn_impl`) for the teacher-forced forward.
    norm_eps: LayerNorm epsilon. shared_adaln: one Linear(C, 6C) for all blocks plus a learned per-block
        offset (VAR's ``shared_aln``) instead of one Linear per block.
    init_std: std of the truncated-normal init of linears and embeddings (default sqrt(1/(3C))).
    init_head: multiplier of the head weights. init_adaln: multiplier of the AdaLN scale/shift rows.
    init_adaln_gamma: multiplier of the AdaLN γ rows (default by depth as VAR's recipes: 1e-3 up to d20,
        1e-4 up to d24, 1e-5 beyond).
    null_keeps_domain: the null condition of classifier-free guidance (dropped rows in training, the
        unconditional stream in sampling) keeps the row's domain and drops only its structures, so guidance
        pushes towards the asked structures within the domain rather than also away from the domain
        (False: VAR's null class, everything dropped, as runs made before this field).
    """

    depth: int = 16
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    patch_sides: tuple[int, ...] = VAR_PATCH_SIDES_256
    codebook_size: int = 4096
    latent_dim: int = 32
    num_domains: int = 1
    num_structures: int = 0
    drop_path_rate: float | None = None
    attn_impl: AttnImpl = "auto"
    norm_eps: float = 1e-6
    shared_adaln: bool = False
    init_std: float | None = None
    init_head: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float | None = None
    null_keeps_domain: bool = False

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError("model.depth", f"is {self.depth}; expected >= 1")
        width = self.width if self.width is not None else 64 * self.depth
        defaults = {
            "width": width,
            "heads": self.depth,
            "drop_path_rate": 0.1 * self.depth / 24,
            "init_std": math.sqrt(1.0 / (3.0 * width)),
            "init_adaln_gamma": default_adaln_gamma(self.depth),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "patch_sides", tuple(self.patch_sides))
        self._validate()

    def _validate(self) -> None:
        sides = self.patch_sides
        if not sides or sides[0] < 1 or any(b <= a for a, b in zip(sides, sides[1:])):
            raise ConfigError("model.patch_sides", f"is {sides}; expected increasing positive sides")
        for name in ("width", "heads", "codebook_size", "latent_dim", "num_domains"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"is {getattr(self, name)}; expected >= 1")
        if self.width % self.heads:
            raise ConfigError("model.heads", f"is {self.heads}; expected a divisor of width {self.width}")
        if self.num_structures < 0:
            raise ConfigError("model.num_structures", f"is {self.num_structures}; expected >= 0")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError("model.drop_path_rate", f"is {self.drop_path_rate}; expected a value in [0, 1)")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model", "mlp_ratio, norm_eps and init_std must be > 0")

    @property
    def num_scales(self) -> int:
        return len(self.patch_sides)

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        """p_k² per scale: (1, 4, 9, ..., 256) for the 256² schedule."""
        return tuple(side * side for side in self.patch_sides)

    @property
    def total_tokens(self) -> int:
        """L = Σ p_k² (680 for the 256² schedule)."""
        return sum(self.tokens_per_scale)

    @property
    def scale_starts(self) -> tuple[int, ...]:
        """Index of each scale's first position in the L-long sequence."""
        starts, position = [], 0
        for count in self.tokens_per_scale:
            starts.append(position)
            position += count
        return tuple(starts)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    def num_block_params(self) -> int:
        """N = 12·width²·depth: the per-token matmul weights of the blocks (qkv, proj, FFN), no AdaLN."""
        return 12 * self.width**2 * self.depth

    def flops_per_token(self, training: bool) -> int:
        """Matmul FLOPs per token (nanoGPT's estimate): 6N for training, 2N for inference.

        N = :meth:`num_block_params` + the head (width·V). The AdaLN projections run once per row, not
        per token, and attention scores are left out, as in DESIGN.md §5.
        """
        params = self.num_block_params() + self.width * self.codebook_size
        return (6 if training else 2) * params


def default_adaln_gamma(depth: int) -> float:
    """VAR's init multiplier of the AdaLN γ rows: 1e-3 up to d20, 1e-4 up to d24, 1e-5 beyond."""
    if depth <= 20:
        return 1e-3
    if depth <= 24:
        return 1e-4
    return 1e-5


_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and demos; the tokenizer fields match recipes/models/tiny.yaml (64², 512 codes × 16, 4 scales).
    "tiny": dict(depth=2, width=128, heads=4, drop_path_rate=0.0, init_adaln_gamma=1e-3,
                 patch_sides=(1, 2, 3, 4), codebook_size=512, latent_dim=16),
    # VAR's sizes: width 64·depth, heads = depth, stochastic depth 0.1·depth/24 (the config default).
    "d16": dict(depth=16, width=1024, heads=16, init_adaln_gamma=1e-3),
    "d20": dict(depth=20, width=1280, heads=20, init_adaln_gamma=1e-3),
    "d24": dict(depth=24, width=1536, heads=24, init_adaln_gamma=1e-4),
    "d30": dict(depth=30, width=1920, heads=30, init_adaln_gamma=1e-5),
}
PRESET_NAMES = tuple(_PRESETS)


def var_preset(name: str, **overrides: Any) -> VARConfig:
    """A preset (tiny, d16, d20, d24, d30) with ``overrides`` applied (e.g. the tokenizer's fields).

    The d* presets default to VAR's 256² tokenizer (4096 codes × 32, 680 tokens) and one domain.
    ``recipes/models/var-<name>.yaml`` holds the same architecture fields.
    """
    if name not in _PRESETS:
        raise ConfigError("model.preset", f"is {name!r}; allowed values: {', '.join(_PRESETS)}")
    return VARConfig(**{**_PRESETS[name], **overrides})


# ---------------------------------------------------------------- attention backends
def masked_sdpa(mask_LL: torch.Tensor) -> Attend:
    """Attention with a boolean mask (True = attend) and softmax scale 1 (q and k are unit vectors)."""
    return functools.partial(_sdpa_with_mask, mask_LL=mask_LL)


def _sdpa_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=1.0)


def flex_attend(block_mask: Any) -> Attend:
    """FlexAttention with a block mask; compiled on CUDA (eager FlexAttention materialises all scores)."""
    return functools.partial(_flex_with_mask, block_mask=block_mask)


def _flex_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    return _flex_function(q.device.type)(q, k, v, block_mask=block_mask, scale=1.0)


@functools.cache
def _flex_function(device_type: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def flex_available() -> bool:
    """Whether this torch has FlexAttention (2.5+)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def block_causal_block_mask(level_L: torch.Tensor) -> Any:
    """FlexAttention BlockMask for "query i attends key j iff level[j] <= level[i]" over L positions."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch: Any, head: Any, q_index: Any, kv_index: Any) -> Any:
        return level_L[kv_index] <= level_L[q_index]

    length = level_L.shape[0]
    return create_block_mask(mask_mod, None, None, length, length, device=level_L.device)


def drop_path(x_BLC: torch.Tensor, rate: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole rows of a residual branch with probability ``rate``, rescale the rest.

    ``rate``: a float, or a 0-d float32 tensor (the blocks pass their rate as a buffer, so that blocks of
    different rates trace to one ``torch.compile`` graph; a tensor rate of 0 keeps every row).
    """
    if not training or (not isinstance(rate, torch.Tensor) and rate == 0.0):
        return x_BLC
    keep = 1.0 - rate
    mask_B11 = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(keep)
    return x_BLC * mask_B11 / keep


# ---------------------------------------------------------------- modules
class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature (VAR)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("k_bias_zero", torch.zeros(width), persistent=False)
        self.log_scale_H = nn.Parameter(torch.full((heads,), _INIT_LOG_ATTN_SCALE))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: torch.Tensor, attend: Attend) -> torch.Tensor:
        batch, length, width = x_BLC.shape
        bias = torch.cat((self.q_bias, self.k_bias_zero, self.v_bias))
        qkv = F.linear(x_BLC, self.qkv.weight, bias).view(batch, length, 3, self.heads, width // self.heads)
        q_BHLD, k_BHLD, v_BHLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        scale_H = self.log_scale_H.clamp(max=_MAX_LOG_ATTN_SCALE).exp()
        # normalize() may run in float32 under autocast; attention needs one dtype for q, k, v.
        q_BHLD = (F.normalize(q_BHLD, dim=-1) * scale_H.view(1, -1, 1, 1)).to(v_BHLD.dtype)
        k_BHLD = F.normalize(k_BHLD, dim=-1).to(v_BHLD.dtype)
        out_BHLD = attend(q_BHLD, k_BHLD, v_BHLD)
        return self.proj(out_BHLD.transpose(1, 2).reshape(batch, length, width))  # (B, L, C)


class FeedForward(nn.Module):
    """Linear(C → hidden), tanh-GELU, Linear(hidden → C)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Transformer block with adaptive LayerNorm on the condition (see the module doc for the math)."""

    def __init__(self, config: VARConfig, drop_path_rate: float):
        super().__init__()
        width = config.width
        self.drop_path_rate = drop_path_rate
        # The rate as a 0-d buffer too: a Python float would be a per-block constant of a compiled block
        # (one recompilation per distinct rate); with the tensor every block shares one graph.
        self.register_buffer("drop_rate", torch.tensor(drop_path_rate, dtype=torch.float32), persistent=False)
        self.stochastic_depth = config.drop_path_rate > 0.0  # the same in every block (block 0 has rate 0)
        self.norm = nn.LayerNorm(width, eps=config.norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(width, config.heads)
        self.ffn = FeedForward(width, config.mlp_hidden)
        if config.shared_adaln:
            self.ada_lin = None
            self.ada_offset_6C = nn.Parameter(torch.zeros(6, width))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            self.ada_offset_6C = None

    def modulation(self, cond_BC: torch.Tensor, shared_B6C: torch.Tensor | None) -> torch.Tensor:
        """(γ1, γ2, s1, s2, b1, b2) per row, (B, 6, C): from this block's projection or the shared one."""
        if self.ada_lin is None:
            return shared_B6C + self.ada_offset_6C
        return self.ada_lin(cond_BC).view(cond_BC.shape[0], 6, -1)  # (B, 6, C)

    def forward(self, x_BLC: torch.Tensor, mod_B6C: torch.Tensor | None, attend: Attend, training: bool,
                cond_BC: torch.Tensor | None = None, shared_B6C: torch.Tensor | None = None) -> torch.Tensor:
        """One block on (B, L, C). ``mod_B6C``: this block's AdaLN vectors (:meth:`modulation`), or None to
        compute them here from ``cond_BC`` (and ``shared_B6C``). The teacher-forced forward passes None, so
        that every weight of the block is used inside the block's own call (FSDP2 gathers a block's
        parameters around that call; a compiled block includes its AdaLN projection)."""
        if mod_B6C is None:
            mod_B6C = self.modulation(cond_BC, shared_B6C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B6C.unsqueeze(1).unbind(2)  # each (B, 1, C)
        h_BLC = self.norm(x_BLC) * (1 + scale1) + shift1
        training = training and self.stochastic_depth
        x_BLC = x_BLC + drop_path(self.attn(h_BLC, attend) * gamma1, self.drop_rate, training)
        h_BLC = self.norm(x_BLC) * (1 + scale2) + shift2
        return x_BLC + drop_path(self.ffn(h_BLC) * gamma2, self.drop_rate, training)


@dataclass
class KVCache:
    """Preallocated keys and values of every block, each (B, H, capacity, D).

    Scale k writes positions [start_k, end_k); a scale that ends beyond ``capacity`` (normally the last,
    whose keys no later scale needs) is attended to without being stored.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


def cached_attend(keys_BHMD: torch.Tensor, values_BHMD: torch.Tensor, start: int) -> Attend:
    """Attention of one scale's positions (from ``start``) to the cached prefix and to themselves."""

    def attend(q_BHlD: torch.Tensor, k_BHlD: torch.Tensor, v_BHlD: torch.Tensor) -> torch.Tensor:
        end = start + k_BHlD.shape[2]
        if end <= keys_BHMD.shape[2]:
            keys_BHMD[:, :, start:end] = k_BHlD
            values_BHMD[:, :, start:end] = v_BHlD
            k_all, v_all = keys_BHMD[:, :, :end], values_BHMD[:, :, :end]
        else:
            k_all = torch.cat((keys_BHMD[:, :, :start].to(k_BHlD.dtype), k_BHlD), dim=2)
            v_all = torch.cat((values_BHMD[:, :, :start].to(v_BHlD.dtype), v_BHlD), dim=2)
        return F.scaled_dot_product_attention(q_BHlD, k_all.to(q_BHlD.dtype), v_all.to(q_BHlD.dtype), scale=1.0)

    return attend


class VAR(nn.Module):
    """Next-scale prediction transformer conditioned on domain + structures (see the module doc).

    Buffers (not saved): ``level_L`` (L,) int64, the scale of each position; ``mask_LL`` (L, L) bool,
    True where position i may attend to position j (level[j] <= level[i]).
    """

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        width, structures = config.width, config.num_structures
        self.domain_embed = nn.Embedding(config.num_domains, width)
        self.present_proj = nn.Linear(structures, width, bias=False) if structures else None
        self.annotated_proj = nn.Linear(structures, width, bias=False) if structures else None
        self.null_condition_C = nn.Parameter(torch.empty(width))
        self.word_embed = nn.Linear(config.latent_dim, width)
        self.start_embed = nn.Parameter(torch.empty(config.tokens_per_scale[0], width))
        self.position_embed = nn.Parameter(torch.empty(config.total_tokens, width))
        self.level_embed = nn.Embedding(config.num_scales, width)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if config.shared_adaln else None
        rates = torch.linspace(0.0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(AdaLNBlock(config, rate) for rate in rates)
        self.head_norm = nn.LayerNorm(width, eps=config.norm_eps, elementwise_affine=False)
        self.head_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, config.codebook_size)
        length = config.total_tokens
        self.register_buffer("level_L", torch.zeros(length, dtype=torch.long), persistent=False)
        self.register_buffer("mask_LL", torch.zeros(length, length, dtype=torch.bool), persistent=False)
        self._block_masks: dict[str, Any] = {}
        self.init_weights()

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """VAR's init: truncated normal (init_std) everywhere, then the head, AdaLN and residual rescalings.

        Also fills the non-persistent buffers, so that a model built on the meta device and moved with
        ``to_empty`` is complete after this call.
        """
        config = self.config
        std = config.init_std
        self._init_buffers()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for param in (self.null_condition_C, self.start_embed, self.position_embed):
            nn.init.trunc_normal_(param, std=std)
        self.head.weight.mul_(config.init_head)
        self.head_ada_lin[-1].weight.mul_(config.init_adaln)
        residual_scale = 1.0 / math.sqrt(2 * config.depth)
        for block in self.blocks:
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            block.attn.log_scale_H.fill_(_INIT_LOG_ATTN_SCALE)
            block.attn.proj.weight.mul_(residual_scale)
            block.ffn.fc2.weight.mul_(residual_scale)
            if block.ada_lin is not None:
                self._scale_adaln(block.ada_lin[-1])
            else:
                block.ada_offset_6C.zero_()
        if self.shared_ada_lin is not None:
            self._scale_adaln(self.shared_ada_lin[-1])

    def _init_buffers(self) -> None:
        levels = [k for k, count in enumerate(self.config.tokens_per_scale) for _ in range(count)]
        self.level_L.copy_(torch.tensor(levels, dtype=torch.long))
        self.mask_LL.copy_(self.level_L[None, :] <= self.level_L[:, None])
        for block in self.blocks:
            block.attn.k_bias_zero.zero_()
            block.drop_rate.fill_(block.drop_path_rate)
        self._block_masks.clear()

    def _scale_adaln(self, linear: nn.Linear) -> None:
        """Rows [0, 2C) make γ1, γ2 (× init_adaln_gamma); rows [2C, 6C) the scales and shifts (× init_adaln)."""
        width = self.config.width
        linear.weight[: 2 * width].mul_(self.config.init_adaln_gamma)
        linear.weight[2 * width:].mul_(self.config.init_adaln)

    # ---------------------------------------------------------------- condition and embeddings
    def condition(
        self, domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor, drop_B: torch.Tensor
    ) -> torch.Tensor:
        """The condition vector (B, C): domain + present + annotated, or the null condition where ``drop_B``
        (plus the domain with ``config.null_keeps_domain``).

        ``domain_B`` int64 in [0, num_domains); ``present_BS`` / ``annotated_BS`` (B, S) bool or 0/1
        float multi-hots over the model's S structures; ``drop_B`` (B,) bool.
        """
        self._check_condition(domain_B, present_BS, annotated_BS, drop_B)
        cond_BC = self.domain_embed(domain_B)
        if self.present_proj is not None:
            weight_dtype = self.present_proj.weight.dtype
            cond_BC = cond_BC + self.present_proj(present_BS.to(weight_dtype))
            cond_BC = cond_BC + self.annotated_proj(annotated_BS.to(weight_dtype))
        null_BC = self.null_condition_C.to(cond_BC.dtype).expand_as(cond_BC)
        if self.config.null_keeps_domain:
            null_BC = null_BC + self.domain_embed(domain_B)
        return torch.where(drop_B.view(-1, 1).bool(), null_BC, cond_BC)

    def embed_teacher(self, x_teacher_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        """All L input embeddings (B, L, C) from the teacher inputs (B, L - p_0², latent_dim)."""
        first_BlC = cond_BC.unsqueeze(1) + self.start_embed  # (B, p_0², C)
        rest_BLC = self.word_embed(x_teacher_BLC.to(self.word_embed.weight.dtype))
        dtype = torch.promote_types(first_BlC.dtype, rest_BLC.dtype)  # float32 under autocast
        x_BLC = torch.cat((first_BlC.to(dtype), rest_BLC.to(dtype)), dim=1)
        return x_BLC + self.position_embed + self.level_embed(self.level_L)

    def embed_scale(self, k: int, x_BlC: torch.Tensor | None, cond_BC: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, p_k², C) of scale k: the start tokens for k = 0, else Linear(x_BlC)."""
        start = self.config.scale_starts[k]
        end = start + self.config.tokens_per_scale[k]
        if k == 0:
            x_BlC = cond_BC.unsqueeze(1) + self.start_embed  # (B, p_0², C)
        else:
            _check_inputs(f"scale {k} input", x_BlC, (end - start, self.config.latent_dim))
            x_BlC = self.word_embed(x_BlC.to(self.word_embed.weight.dtype))
        return x_BlC + self.position_embed[start:end] + self.level_embed.weight[k]

    def block_modulations(self, cond_BC: torch.Tensor) -> list[torch.Tensor]:
        """Each block's (B, 6, C) AdaLN vectors, computed once per row."""
        shared_B6C = None
        if self.shared_ada_lin is not None:
            shared_B6C = self.shared_ada_lin(cond_BC).view(cond_BC.shape[0], 6, -1)  # (B, 6, C)
        return [block.modulation(cond_BC, shared_B6C) for block in self.blocks]

    def logits(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        """Final adaptive LayerNorm and head: logits (B, L, V) float32."""
        scale_B1C, shift_B1C = self.head_ada_lin(cond_BC).view(cond_BC.shape[0], 1, 2, -1).unbind(2)
        h_BLC = self.head_norm(x_BLC) * (1 + scale_B1C) + shift_B1C
        return self.head(h_BLC).float()

    # ---------------------------------------------------------------- teacher-forced forward
    def forward(
        self,
        x_teacher_BLC: torch.Tensor,
        domain_B: torch.Tensor,
        present_BS: torch.Tensor,
        annotated_BS: torch.Tensor,
        drop_B: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, L, V) float32 of every scale's tokens under teacher forcing.

        ``x_teacher_BLC``: (B, L - p_0², latent_dim), from ``indices_to_teacher_inputs``; the condition
        arguments as in :meth:`condition`.
        """
        inputs = self.config.total_tokens - self.config.tokens_per_scale[0]
        _check_inputs("teacher inputs", x_teacher_BLC, (inputs, self.config.latent_dim))
        cond_BC = self.condition(domain_B, present_BS, annotated_BS, drop_B)
        x_BLC = self.embed_teacher(x_teacher_BLC, cond_BC)
        attend = self.teacher_attend(x_BLC.device)
        shared_B6C = None
        if self.shared_ada_lin is not None:
            shared_B6C = self.shared_ada_lin(cond_BC).view(cond_BC.shape[0], 6, -1)  # (B, 6, C)
        for block in self.blocks:  # each block computes its own AdaLN vectors (see AdaLNBlock.forward)
            x_BLC = block(x_BLC, None, attend, self.training, cond_BC, shared_B6C)
        return self.logits(x_BLC, cond_BC)

    def resolved_attn_impl(self, device: torch.device) -> str:
        """"sdpa" or "flex" for ``device``; "auto" is sdpa everywhere.

        Measured on one H200 (torch 2.11, d16, bf16 autocast, AdamW step; benchmarks/train_var.py,
        results/train_var-h200x2.json): per-block compiled training at batch 128, SDPA 346 images/s and
        FlexAttention 339; attention alone (forward + backward, batch 128, 16 heads): SDPA with the mask
        5.0 ms (PyTorch picks cuDNN's kernel; the memory-efficient one takes 11.3 ms), FlexAttention
        5.8 ms, unmasked SDPA 3.5 ms. With VAR's schedule 425 of the 680 positions sit in the last two
        scales, so a 128-wide block mask skips few blocks (62% of the scores are needed); FlexAttention
        stays available for longer schedules (512², 2240 tokens).
        """
        del device  # kept so that a later measurement can choose per device
        impl = self.config.attn_impl
        return "sdpa" if impl == "auto" else impl

    def teacher_attend(self, device: torch.device) -> Attend:
        """The block-causal attention of the teacher-forced forward on ``device``."""
        if self.resolved_attn_impl(device) == "sdpa":
            return masked_sdpa(self.mask_LL)
        key = str(device)
        if key not in self._block_masks:
            self._block_masks[key] = block_causal_block_mask(self.level_L)
        return flex_attend(self._block_masks[key])

    # ---------------------------------------------------------------- KV-cache path (sampling)
    def init_cache(
        self,
        batch: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Zeroed keys/values for ``batch`` rows and ``max_len`` positions (default L) per block.

        ``max_len = L - p_{K-1}²`` leaves the last scale out (it is attended to but never stored).
        ``dtype``/``device`` default to the parameters'.
        """
        config = self.config
        max_len = config.total_tokens if max_len is None else max_len
        if not config.tokens_per_scale[0] <= max_len <= config.total_tokens:
            raise ValueError(f"cache length {max_len}; expected {config.tokens_per_scale[0]}..{config.total_tokens}")
        weight = self.head.weight
        shape = (batch, config.heads, max_len, config.head_dim)
        options = dict(dtype=dtype or weight.dtype, device=device or weight.device)
        keys = [torch.zeros(shape, **options) for _ in self.blocks]
        values = [torch.zeros(shape, **options) for _ in self.blocks]
        return KVCache(keys, values)

    def forward_scale(
        self, k: int, x_BlC: torch.Tensor | None, cond_BC: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Logits (B, p_k², V) float32 of scale k, given the cache filled by scales 0..k-1.

        ``x_BlC``: None for k = 0, else the scale's input (B, p_k², latent_dim) from
        ``accumulator_to_next_input``; ``cond_BC`` from :meth:`condition`. Call scales in order 0..K-1;
        no stochastic depth is applied (inference path).
        """
        start = self.config.scale_starts[k]
        if start > cache.capacity:
            raise ValueError(f"scale {k} starts at {start}, beyond the cache length {cache.capacity}")
        x_BlC = self.embed_scale(k, x_BlC, cond_BC)
        modulations = self.block_modulations(cond_BC)
        for block, mod_B6C, keys, values in zip(self.blocks, modulations, cache.keys, cache.values):
            x_BlC = block(x_BlC, mod_B6C, cached_attend(keys, values, start), False)
        return self.logits(x_BlC, cond_BC)

    # ---------------------------------------------------------------- optimizer and cost helpers
    def no_weight_decay(self) -> set[str]:
        """Parameter names not to decay: vectors (biases, null condition, q/v biases, attention scales),
        position/start/level embeddings and shared AdaLN offsets (VAR: matrices only)."""
        embeddings = {"start_embed", "position_embed", "level_embed.weight"}
        names = set()
        for name, param in self.named_parameters():
            if param.ndim < 2 or name in embeddings or name.endswith("ada_offset_6C"):
                names.add(name)
        return names

    def num_block_params(self) -> int:
        """See :meth:`VARConfig.num_block_params`."""
        return self.config.num_block_params()

    def flops_per_token(self, training: bool) -> int:
        """See :meth:`VARConfig.flops_per_token`."""
        return self.config.flops_per_token(training)

    # ---------------------------------------------------------------- checks
    def _check_condition(
        self, domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor, drop_B: torch.Tensor
    ) -> None:
        batch, structures = domain_B.shape[0], self.config.num_structures
        if domain_B.dim() != 1 or tuple(drop_B.shape) != (batch,):
            raise ValueError(f"domain {tuple(domain_B.shape)} and drop {tuple(drop_B.shape)}; expected (B,) each")
        for name, multi_hot in (("present", present_BS), ("annotated", annotated_BS)):
            if tuple(multi_hot.shape) != (batch, structures):
                raise ValueError(f"{name} has shape {tuple(multi_hot.shape)}; expected ({batch}, {structures})")


def _check_inputs(name: str, x_BlC: torch.Tensor | None, expected: tuple[int, int]) -> None:
    """Raise ValueError unless ``x_BlC`` is (B, *expected)."""
    if x_BlC is None or x_BlC.dim() != 3 or tuple(x_BlC.shape[1:]) != expected:
        shape = None if x_BlC is None else tuple(x_BlC.shape)
        raise ValueError(f"{name} have shape {shape}; expected (B, {expected[0]}, {expected[1]})")


__all__ = [
    "DATA_FIELDS",
    "PRESET_NAMES",
    "TOKENIZER_FIELDS",
    "VAR",
    "AdaLNBlock",
    "FeedForward",
    "KVCache",
    "SelfAttention",
    "VARConfig",
    "block_causal_block_mask",
    "cached_attend",
    "default_adaln_gamma",
    "drop_path",
    "flex_attend",
    "flex_available",
    "masked_sdpa",
    "var_preset",
]
