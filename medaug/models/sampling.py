"""Next-scale samplers for :class:`~medaug.models.var.VAR` (VAR-NOTES.md "Sampling", DESIGN.md §4).

:func:`sample_tokens` is the basic sampler (the reference); :class:`FastSampler` runs the same algorithm
with the same seeds fast on CUDA (issue 9; its docstring lists what it changes). In float32 on the CPU
both give identical tokens.

One forward per scale through the KV cache. With guidance (cfg != 0) the conditional and the
unconditional (null-condition) streams run as 2B rows of one forward; at scale k the logits are
``(1 + t_k)·cond - t_k·uncond`` with ``t_k = cfg·k/(K-1)`` (so the first scale is unguided, but its
unconditional pass still fills the unconditional cache). Then, per token: divide by ``temperature``,
keep the ``top_k`` largest logits, keep the smallest prefix of those (renormalised) whose probability
mass reaches ``top_p``, and draw one token from what is left.

Seeds: each sample has its own ``torch.Generator`` (on the model's device; see
:func:`generators_from_seeds`). Before the first scale, each row draws its L uniform numbers from its own
generator, and token j of that row is drawn by inverting the cumulative distribution at the row's j-th
number. A sample therefore depends only on its own seed and condition, not on the other rows of the
batch (on the same machine and software), and the draws need no host synchronisation.

After scale k the sampler adds φ_k(upsample(codes)) to the accumulator f_hat
(``quantizer.next_accumulator``) and area-downsamples it to the next side
(``quantizer.accumulator_to_next_input``): the same steps as ``indices_to_teacher_inputs``, which is
what the transformer saw in training.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medaug.models.fused_decode import fused_default
from medaug.models.fused_sample import fused_qkv
from medaug.models.quant import MultiScaleQuantizer
from medaug.models.var import _MAX_LOG_ATTN_SCALE, VAR, AdaLNBlock, VARConfig
from medaug.models.vqvae import VQVAE, CodeUpsampler


@dataclass
class SampledScales:
    """What the sampler produced: ``indices`` K tensors (B, p_k, p_k) int64; ``inputs_BLC`` the
    transformer inputs it built for scales 1..K-1, (B, L - p_0², latent_dim) float32."""

    indices: list[torch.Tensor]
    inputs_BLC: torch.Tensor


def generators_from_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample on ``device``, seeded with ``seeds[i]``."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def guidance_ramp(cfg: float, num_scales: int) -> list[float]:
    """Guidance weight t_k = cfg·k/(K-1) of each scale (all 0 when K = 1)."""
    if num_scales == 1:
        return [0.0]
    return [cfg * k / (num_scales - 1) for k in range(num_scales)]


def filter_probs(
    logits_NV: torch.Tensor, top_k: int, top_p: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p filtered probabilities, sorted by decreasing logit.

    Returns ``probs_NM`` float32 (M = top_k, or V when top_k is 0 or larger than V; not renormalised
    after top-p: dropped entries are 0, kept entries are softmax over the top-k) and ``index_NM``, the
    vocabulary index of each column. Top-p keeps the smallest prefix whose mass reaches ``top_p``: entry
    i is kept when the mass before it is below ``top_p``, so the most likely token always stays.
    """
    vocab = logits_NV.shape[-1]
    keep = vocab if top_k <= 0 else min(top_k, vocab)
    scaled_NV = logits_NV.float() if temperature == 1.0 else logits_NV.float() / temperature  # x / 1 == x exactly
    values_NM, index_NM = torch.topk(scaled_NV, keep, dim=-1, sorted=True)
    probs_NM = torch.softmax(values_NM, dim=-1)
    if top_p < 1.0:
        mass_before_NM = torch.cumsum(probs_NM, dim=-1) - probs_NM
        probs_NM = probs_NM * (mass_before_NM < top_p)
    return probs_NM, index_NM


def draw_tokens(probs_NM: torch.Tensor, index_NM: torch.Tensor, uniform_N: torch.Tensor) -> torch.Tensor:
    """One token per row (N,) int64 by inverting the cumulative distribution of ``probs_NM`` at ``uniform_N``.

    ``probs_NM``: non-negative, any positive total, zeros only after the last positive entry (as
    :func:`filter_probs` returns); ``uniform_N`` in [0, 1). Entry i is drawn with probability
    probs[i] / Σ probs.
    """
    cdf_NM = torch.cumsum(probs_NM, dim=-1)
    target_N1 = (uniform_N.to(cdf_NM.dtype) * cdf_NM[:, -1]).unsqueeze(-1)
    position_N1 = torch.searchsorted(cdf_NM, target_N1, right=True)
    # A target that rounds up to the total lands past the last kept entry: pull it back.
    last_kept_N1 = (probs_NM > 0).sum(dim=-1, keepdim=True) - 1
    position_N1 = torch.minimum(position_N1, last_kept_N1)
    return index_NM.gather(-1, position_N1).squeeze(-1)


def row_uniforms(generators: Sequence[torch.Generator], length: int, device: torch.device) -> torch.Tensor:
    """(B, length) float32 uniforms in [0, 1), row b drawn from ``generators[b]`` alone."""
    rows = [torch.rand(length, generator=generator, device=generator.device) for generator in generators]
    return torch.stack(rows).to(device)


def _stream_inputs(
    domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor, guided: bool,
    drop_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition arguments for B conditional rows (null where ``drop_B``), then B null rows when ``guided``."""
    if drop_B is None:
        drop_B = torch.zeros(domain_B.shape[0], dtype=torch.bool, device=domain_B.device)
    if not guided:
        return domain_B, present_BS, annotated_BS, drop_B
    drop_2B = torch.cat((drop_B, torch.ones_like(drop_B)))
    return domain_B.repeat(2), present_BS.repeat(2, 1), annotated_BS.repeat(2, 1), drop_2B


def _cache_dtype(var: VAR, device: torch.device) -> torch.dtype:
    """The dtype attention keys have: the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return var.head.weight.dtype


def check_settings(top_k: int, top_p: float, temperature: float) -> None:
    """Reject filter settings outside their ranges (ValueError naming the argument)."""
    if top_k < 0:
        raise ValueError(f"top_k is {top_k}; expected >= 0 (0 keeps every token)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p is {top_p}; expected a value in (0, 1] (1 keeps every token)")
    if temperature <= 0.0:
        raise ValueError(f"temperature is {temperature}; expected > 0")


def _check_inputs(var: VAR, quantizer: MultiScaleQuantizer, batch: int, generators: Sequence[torch.Generator]) -> None:
    config = var.config
    if tuple(quantizer.patch_sides) != tuple(config.patch_sides):
        raise ValueError(f"quantizer scales {quantizer.patch_sides} differ from the transformer's {config.patch_sides}")
    if quantizer.config.codebook_size != config.codebook_size or quantizer.config.latent_dim != config.latent_dim:
        raise ValueError("quantizer codebook size or latent dim differs from the transformer's")
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for {batch} samples; expected one per sample")


def guided_logits(logits_RlV: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
    """(1 + t)·cond - t·uncond from 2B rows (conditional first), or the B rows as they are."""
    if not guided:
        return logits_RlV
    cond_BlV, uncond_BlV = logits_RlV.chunk(2)
    return (1.0 + t) * cond_BlV - t * uncond_BlV


@torch.no_grad()
def sample_scales(
    var: VAR,
    quantizer: MultiScaleQuantizer,
    domain_B: torch.Tensor,
    present_BS: torch.Tensor,
    annotated_BS: torch.Tensor,
    *,
    generators: Sequence[torch.Generator],
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    temperature: float = 1.0,
    drop_B: torch.Tensor | None = None,
) -> SampledScales:
    """Sample B token maps scale by scale (see the module doc); the inputs it built come back too.

    Condition arguments as :meth:`VAR.condition`, on the model's device. ``generators``: one
    ``torch.Generator`` per row (:func:`generators_from_seeds`). ``cfg``: guidance at the last scale
    (0: no unconditional stream); ``top_k`` (0 = all), ``top_p`` in (0, 1] (1 = all), ``temperature``
    > 0; ``drop_B`` (B,) bool: rows sampled with the null condition (unconditional samples). Put the model
    in eval mode first; runs under the caller's autocast, if any.
    """
    check_settings(top_k, top_p, temperature)
    batch, device, config = domain_B.shape[0], domain_B.device, var.config
    _check_inputs(var, quantizer, batch, generators)
    guided = cfg != 0.0
    cond_RC = var.condition(*_stream_inputs(domain_B, present_BS, annotated_BS, guided, drop_B))
    capacity = config.total_tokens - config.tokens_per_scale[-1] if config.num_scales > 1 else None
    cache = var.init_cache(cond_RC.shape[0], capacity, _cache_dtype(var, device), device)
    uniform_BL = row_uniforms(generators, config.total_tokens, device)
    f_hat_BCHW = quantizer.empty_accumulator(batch, device)
    x_RlC, indices, inputs = None, [], []
    for k, t in enumerate(guidance_ramp(cfg, config.num_scales)):
        logits_BlV = guided_logits(var.forward_scale(k, x_RlC, cond_RC, cache), t, guided)
        probs_NM, index_NM = filter_probs(logits_BlV.flatten(0, 1), top_k, top_p, temperature)
        start, side = config.scale_starts[k], config.patch_sides[k]
        uniform_N = uniform_BL[:, start:start + side * side].flatten()
        indices.append(draw_tokens(probs_NM, index_NM, uniform_N).view(batch, side, side))
        if k + 1 < config.num_scales:
            f_hat_BCHW = quantizer.next_accumulator(f_hat_BCHW, k, indices[-1])
            inputs.append(quantizer.accumulator_to_next_input(f_hat_BCHW, k))
            x_RlC = inputs[-1].repeat(2, 1, 1) if guided else inputs[-1]
    inputs_BLC = torch.cat(inputs, dim=1) if inputs else f_hat_BCHW.new_zeros(batch, 0, config.latent_dim)
    return SampledScales(indices, inputs_BLC)


def sample_tokens(
    var: VAR,
    quantizer: MultiScaleQuantizer,
    domain_B: torch.Tensor,
    present_BS: torch.Tensor,
    annotated_BS: torch.Tensor,
    *,
    generators: Sequence[torch.Generator],
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    temperature: float = 1.0,
    drop_B: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per-scale token maps [(B, p_k, p_k) int64] of B samples (:func:`sample_scales` without the inputs)."""
    sampled = sample_scales(var, quantizer, domain_B, present_BS, annotated_BS, generators=generators,
                            cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, drop_B=drop_B)
    return sampled.indices


@torch.no_grad()
def sample_images(
    var: VAR,
    vqvae: VQVAE,
    domain_B: torch.Tensor,
    present_BS: torch.Tensor,
    annotated_BS: torch.Tensor,
    *,
    generators: Sequence[torch.Generator],
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample and decode: (image (B, C_img, H, W) float32 in [-1, 1], label (B, H, W) int64).

    Labels are model-local structure indices (0 background, 1..S) as ``VQVAE.indices_to_img`` returns;
    the other arguments as :func:`sample_scales`.
    """
    indices = sample_tokens(var, vqvae.quantizer, domain_B, present_BS, annotated_BS, generators=generators,
                            cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    return vqvae.indices_to_img(indices)



# ---------------------------------------------------------------- the fast sampler
# The functions below are module-level and take weights as arguments, so that one torch.compile graph
# serves every block (and d16 and d30 recompile only for their own width).


def norm_modulate(
    x_RlC: torch.Tensor, scale_R1C: torch.Tensor, shift_R1C: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm(x)·scale + shift (scale is 1 + s), computed in x's dtype and returned in ``dtype``."""
    return (F.layer_norm(x_RlC, x_RlC.shape[-1:], eps=eps) * scale_R1C + shift_R1C).to(dtype)


def residual_norm_modulate(
    x_RlC: torch.Tensor,
    delta_RlC: torch.Tensor,
    gamma_R1C: torch.Tensor,
    scale_R1C: torch.Tensor,
    shift_R1C: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x + delta·γ (the residual stream, x's dtype) and the next sub-layer's input LN(·)·scale + shift."""
    x_RlC = x_RlC + delta_RlC * gamma_R1C
    return x_RlC, norm_modulate(x_RlC, scale_R1C, shift_R1C, eps, dtype)


def normalized_qkv(
    qkv_RlE: torch.Tensor, attn_scale_11H1: torch.Tensor, keys_RlHD: torch.Tensor, values_RlHD: torch.Tensor
) -> torch.Tensor:
    """Split the qkv projection (R, l, 3·H·D): L2-normalised k into ``keys_RlHD`` and v into ``values_RlHD``
    (cache slots, written in place, any row stride), and q (R, H, l, D), L2-normalised × the head scale.

    One compiled kernel reads the projection once and writes the cache; an eager copy into the cache
    is split into 32-bit-indexed pieces once the cache passes 2 GiB (8 launches per block and scale for
    d16 at batch 256). Normalised in the projection's (R, l, H, D) order and q returned as a transposed
    view: a fused kernel that wrote (R, H, l, D) directly ran 5× under memory bandwidth on the H200.
    """
    rows, length, width3 = qkv_RlE.shape
    heads, dim = keys_RlHD.shape[2], keys_RlHD.shape[3]
    q_RlHD, k_RlHD, v_RlHD = qkv_RlE.view(rows, length, 3, heads, dim).unbind(2)
    keys_RlHD.copy_(F.normalize(k_RlHD, dim=-1))
    values_RlHD.copy_(v_RlHD)
    q_RlHD = (F.normalize(q_RlHD, dim=-1) * attn_scale_11H1).to(keys_RlHD.dtype)
    return q_RlHD.transpose(1, 2)


def guided_logits_t(logits_RlV: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 + t)·cond - t·uncond in float32 from 2B rows (conditional first); ``t`` a 0-d float32 tensor."""
    cond_BlV, uncond_BlV = logits_RlV.float().chunk(2)
    return (1.0 + t) * cond_BlV - t * uncond_BlV


_STEP_FUNCTIONS = {"norm": norm_modulate, "residual": residual_norm_modulate, "qkv": normalized_qkv,
                   "guide": guided_logits_t}
"""The per-scale step functions :class:`FastSampler` compiles on CUDA (weights are arguments)."""


class ChainedKVCache:
    """Keys and values of all blocks in one buffer each, (R, depth·capacity + p_{K-1}², H, D).

    Block i keeps positions [0, capacity) (scales 0..K-2) at offset a_i = (depth - 1 - i)·capacity. The
    last scale is attended to but never read later, so block i writes it into [a_i + capacity, a_i + L),
    which is block i-1's region (block i-1 has finished the last scale) or, for block 0, a tail of
    p_{K-1}² positions. Attention then reads one strided view [a_i, a_i + end) without ``torch.cat``;
    memory is that of a cache that leaves the last scale out, plus one last scale for the whole model.
    Positions come before heads, as in the qkv projection, so a scale's slot (R, l, H, D) is l·H·D
    contiguous elements per row; attention reads (R, H, e, D) transposed views (cuDNN and flash
    attention take any stride but the last).
    """

    def __init__(self, rows: int, config: VARConfig, dtype: torch.dtype, device: torch.device):
        last = config.tokens_per_scale[-1]
        self.capacity = config.total_tokens - last
        positions = config.depth * self.capacity + last
        shape = (rows, positions, config.heads, config.head_dim)
        self.keys_RPHD = torch.empty(shape, dtype=dtype, device=device)
        self.values_RPHD = torch.empty(shape, dtype=dtype, device=device)
        self.offsets = tuple((config.depth - 1 - i) * self.capacity for i in range(config.depth))

    def slots(self, block: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (R, length, H, D) where ``block`` stores the keys and values of positions [start, start + length)."""
        base = self.offsets[block] + start
        return self.keys_RPHD[:, base:base + length], self.values_RPHD[:, base:base + length]

    def attend(self, block: int, end: int, q_RHlD: torch.Tensor) -> torch.Tensor:
        """Attention (softmax scale 1) of q (R, H, l, D) to the stored positions [0, end) of ``block``.

        Returns (R, H, l, D) in q's memory layout (so a transposed view when q is one).
        """
        base = self.offsets[block]
        keys_RHeD = self.keys_RPHD[:, base:base + end].transpose(1, 2)
        values_RHeD = self.values_RPHD[:, base:base + end].transpose(1, 2)
        return F.scaled_dot_product_attention(q_RHlD, keys_RHeD, values_RHeD, scale=1.0)

    @staticmethod
    def bytes_per_row(config: VARConfig, itemsize: int) -> int:
        """Bytes of keys + values per row (one stream of one sample)."""
        last = config.tokens_per_scale[-1]
        return 2 * config.width * (config.depth * (config.total_tokens - last) + last) * itemsize


@dataclass(frozen=True)
class _BlockWeights:
    """One block's inference weights (views of the model's parameters, plus the fused qkv bias)."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    attn_scale_11H1: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


def _block_weights(block: AdaLNBlock) -> _BlockWeights:
    attn, ffn = block.attn, block.ffn
    bias = torch.cat((attn.q_bias, attn.k_bias_zero.to(attn.q_bias.dtype), attn.v_bias)).detach()
    scale_H = attn.log_scale_H.detach().float().clamp(max=_MAX_LOG_ATTN_SCALE).exp()
    return _BlockWeights(attn.qkv.weight.detach(), bias, scale_H.view(1, 1, -1, 1), attn.proj.weight.detach(),
                         attn.proj.bias.detach(), ffn.fc1.weight.detach(), ffn.fc1.bias.detach(),
                         ffn.fc2.weight.detach(), ffn.fc2.bias.detach())


@dataclass(frozen=True)
class _Modulation:
    """One block's AdaLN vectors for R rows, each (R, 1, C) contiguous in the residual dtype; scales are 1 + s."""

    gamma1: torch.Tensor
    gamma2: torch.Tensor
    scale1: torch.Tensor
    scale2: torch.Tensor
    shift1: torch.Tensor
    shift2: torch.Tensor


@dataclass
class _SampleState:
    """What one sampling call computes once: condition, AdaLN vectors of every block and the head, cache."""

    cond_RC: torch.Tensor
    modulations: list[_Modulation]
    head_scale_R1C: torch.Tensor
    head_shift_R1C: torch.Tensor
    cache: ChainedKVCache


@dataclass(frozen=True)
class SamplerSettings:
    """Guidance and filtering of one sampling call; ``guided`` is False when every t_k is 0."""

    cfg: float
    top_k: int
    top_p: float
    temperature: float
    guided: bool


@dataclass
class _Graph:
    """A captured whole-sample CUDA graph for one bucket size: its static inputs and outputs."""

    graph: Any
    domain_B: torch.Tensor
    present_BS: torch.Tensor
    annotated_BS: torch.Tensor
    uniform_BL: torch.Tensor
    indices: list[torch.Tensor]


def sample_memory_bytes(config: VARConfig, guided: bool, top_k: int, itemsize: int = 2) -> int:
    """Estimated device bytes one sample needs in :class:`FastSampler` (cache + the last scale's work).

    Cache: :meth:`ChainedKVCache.bytes_per_row` per stream. The last scale (the largest) holds, per row,
    the float32 residual stream and a few activations of width C and hidden, the logits in the compute
    dtype and float32, and the top-k values, indices and probabilities.
    """
    rows, last = (2 if guided else 1), config.tokens_per_scale[-1]
    vocab = config.codebook_size
    kept = vocab if top_k <= 0 else min(top_k, vocab)
    cache = rows * ChainedKVCache.bytes_per_row(config, itemsize)
    activations = rows * last * (config.width * (4 * 3 + itemsize * 8) + config.mlp_hidden * itemsize * 2)
    logits = rows * last * vocab * (itemsize + 4) + last * vocab * 4 * 2
    filtered = last * kept * (4 * 4 + 8 * 2)
    return cache + activations + logits + filtered


def default_graph_max_batch(config: VARConfig) -> int:
    """The largest power of two ≤ 256·(1024 / width)² (d16: 256, d20: 128, d24 and d30: 64): CUDA graphs
    pay while launches are long against kernels, i.e. up to a fixed work per scale, not a fixed batch."""
    limit = max(1, int(256 * (1024 / config.width) ** 2))
    return 1 << (limit.bit_length() - 1)


def _free_device_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA device, counting memory the caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _raise_recompile_limit(limit: int = 64) -> None:
    """Let dynamo keep more graphs per function (shape buckets, dtypes); the name changed across versions."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def _mark_dynamic(*tensors_and_dims: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Mark row/length dimensions dynamic for torch.compile (sizes 0 and 1 stay specialised)."""
    for tensor, dims in tensors_and_dims:
        for dim in dims:
            if tensor.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


class FastSampler:
    """The sampler of :func:`sample_tokens` (same algorithm, same seeds), made fast for CUDA.

    Construct once per model and reuse; it holds compiled functions and captured CUDA graphs.

    * ``dtype``: weight dtype for the transformer (default bfloat16 on CUDA, float32 on the CPU); the
      residual stream, LayerNorm, AdaLN vectors, guidance and filtering stay float32, GEMMs run in
      ``dtype`` (no autocast casts). A model in another dtype is copied, or converted in place with
      ``convert_in_place=True`` (saves the float32 copy's memory: 8 GB for d30).
    * AdaLN vectors of all blocks and the head are computed once per call, not per scale.
    * :class:`ChainedKVCache`: preallocated, no ``torch.cat``, the last scale not cached; laid out
      (rows, positions, heads, head dim) and written by the q/k normalisation kernel (no separate copies).
    * No unconditional stream when every guidance weight is 0 (``cfg`` 0, or a single scale).
    * ``compile`` (default: on CUDA): LayerNorm + modulation + residual, the guidance mix and (without
      ``fused_kernels``) the q/k normalisation with the cache writes run as torch.compile kernels with dynamic
      row/length sizes (one compile per model); fc1 + tanh-GELU use cuBLASLt's fused epilogue on CUDA.
    * ``cuda_graphs`` (default: on CUDA): batches of at most ``graph_max_batch`` samples run as one
      captured graph per power-of-two bucket (padding rows are dropped), which removes launch overhead
      (the first scales' kernels are shorter than their launches). The default ``graph_max_batch``
      (:func:`default_graph_max_batch`) scales with the work per launch: d16 up to 256 (its tokens went
      from 557 to 695 images/s at batch 256 on the H200), d30 up to 64 (at 256 the graph gained nothing,
      125 images/s either way, and its held pool raised the memory reserved from 68 to 108 GB;
      ``benchmarks/results/sample-h200-session6.json``). :meth:`clear_graphs` releases the pools.
    * On CUDA the codes' bicubic upsampling runs as an exact linear map (:class:`CodeUpsampler`), not
      PyTorch's bicubic kernel (6 ms per scale at batch 256); on the CPU the quantizer's own path runs.
    * ``fused_kernels`` (default: where the fused decoder is, :func:`~medaug.models.fused_decode.fused_default`):
      the q/k normalisation with its cache writes runs as the Triton kernel of
      :mod:`medaug.models.fused_sample` (the same computation up to float rounding; on the CPU or without
      Triton the torch function runs): d16 at batch 256 on the H200, 16.7 ms against inductor's 40.5.
    * Filtering and drawing have no host synchronisation; batches larger than what fits in free
      memory (:func:`sample_memory_bytes`, ``memory_fraction``) are split into chunks. Each row's tokens
      depend only on its own generator and condition, so chunking does not change results on the CPU
      (on CUDA, kernels chosen per batch size may round differently).
    """

    def __init__(
        self,
        var: VAR,
        quantizer: MultiScaleQuantizer,
        *,
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        graph_max_batch: int | None = None,
        memory_fraction: float = 0.85,
        convert_in_place: bool = False,
        fused_kernels: bool | None = None,
    ):
        self.device = var.head.weight.device
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.var = _inference_model(var, self.dtype, convert_in_place)
        self.quantizer = quantizer
        self.config = var.config
        self.residual_dtype = torch.float32
        self.compiled = cuda if compile is None else compile
        self.cuda_graphs = (cuda if cuda_graphs is None else cuda_graphs) and cuda
        self.graph_max_batch = default_graph_max_batch(var.config) if graph_max_batch is None else graph_max_batch
        self.memory_fraction = memory_fraction
        self.fused_gelu = cuda
        self.fused_kernels = fused_default(self.device) if fused_kernels is None else fused_kernels
        self._blocks = [_block_weights(block) for block in self.var.blocks]
        self._upsampler = CodeUpsampler(quantizer, self.device) if cuda else None
        self._embeddings()
        self._functions = self._compile_functions() if self.compiled else None
        self._graphs: dict[tuple, _Graph] = {}

    # ---------------------------------------------------------------- setup
    def _embeddings(self) -> None:
        var, rd = self.var, self.residual_dtype
        self._word_weight = var.word_embed.weight.detach()
        self._word_bias = var.word_embed.bias.detach()
        self._start_lC = var.start_embed.detach().to(rd)
        self._position_LC = var.position_embed.detach().to(rd)
        self._level_KC = var.level_embed.weight.detach().to(rd)
        self._head_weight = var.head.weight.detach()
        self._head_bias = var.head.bias.detach()

    def _compile_functions(self) -> dict[str, Any]:
        _raise_recompile_limit()
        return {name: torch.compile(function, dynamic=None) for name, function in _STEP_FUNCTIONS.items()}

    def _function(self, name: str, rows: int, length: int) -> Any:
        """The compiled version for shapes worth it (rows, length >= 2), else the eager one."""
        if self._functions is not None and rows > 1 and length > 1:
            return self._functions[name]
        return _STEP_FUNCTIONS[name]

    def _captured_rows(self, settings: SamplerSettings) -> int:
        """Rows of the largest graph captured for ``settings`` (0 if none). Its memory pool is held, so free
        memory no longer shows room for it, but replaying it needs no more: chunks may stay that large."""
        return max(self._captured_buckets(settings), default=0)

    def _captured_buckets(self, settings: SamplerSettings) -> list[int]:
        return sorted(bucket for bucket, captured in self._graphs if captured == settings)

    def _bucket(self, batch: int, settings: SamplerSettings) -> int | None:
        """The graph bucket a chunk of ``batch`` rows replays, or None to run it eagerly.

        Its own power-of-two bucket when captured, or when free memory holds a new capture of it (the
        bucket's rows, not only the chunk's); else the smallest larger bucket already captured (padding
        costs compute, not memory); else eagerly (the chunk itself fits: :meth:`sample_tokens` sized it).
        """
        if not self.cuda_graphs or batch > self.graph_max_batch:
            return None
        bucket, captured = 1 << (batch - 1).bit_length(), self._captured_buckets(settings)
        if bucket in captured or bucket <= self.max_batch_size(settings):
            return bucket
        return next((size for size in captured if size >= batch), None)

    def clear_graphs(self) -> None:
        """Release captured CUDA graphs and their memory pools."""
        self._graphs.clear()

    # ---------------------------------------------------------------- public API
    def settings(self, cfg: float, top_k: int, top_p: float, temperature: float) -> SamplerSettings:
        """Checked settings; ``guided`` is whether any scale has a non-zero guidance weight."""
        check_settings(top_k, top_p, temperature)
        guided = any(t != 0.0 for t in guidance_ramp(cfg, self.config.num_scales))
        return SamplerSettings(float(cfg), int(top_k), float(top_p), float(temperature), guided)

    def max_batch_size(self, settings: SamplerSettings) -> int:
        """Samples per chunk that fit in ``memory_fraction`` of free device memory (64 on the CPU)."""
        if self.device.type != "cuda":
            return 64
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_sample = sample_memory_bytes(self.config, settings.guided, settings.top_k, itemsize)
        return max(1, int(_free_device_bytes(self.device) * self.memory_fraction) // per_sample)

    @torch.no_grad()
    def sample_tokens(
        self,
        domain_B: torch.Tensor,
        present_BS: torch.Tensor,
        annotated_BS: torch.Tensor,
        *,
        generators: Sequence[torch.Generator],
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        temperature: float = 1.0,
        max_batch: int | None = None,
    ) -> list[torch.Tensor]:
        """Per-scale token maps [(B, p_k, p_k) int64], as :func:`sample_tokens` (arguments the same).

        ``max_batch``: samples per chunk (default: from free memory, :meth:`max_batch_size`).
        """
        settings = self.settings(cfg, top_k, top_p, temperature)
        batch = domain_B.shape[0]
        _check_inputs(self.var, self.quantizer, batch, generators)
        uniform_BL = row_uniforms(generators, self.config.total_tokens, self.device)
        present_BS, annotated_BS = present_BS.to(self.dtype), annotated_BS.to(self.dtype)
        floor = min(batch, self._captured_rows(settings), self.graph_max_batch)
        chunk = max_batch or max(self.max_batch_size(settings), floor)
        pieces = [self._sample_chunk(domain_B[s:s + chunk], present_BS[s:s + chunk], annotated_BS[s:s + chunk],
                                     uniform_BL[s:s + chunk], settings) for s in range(0, batch, chunk)]
        if len(pieces) == 1:
            return pieces[0]
        return [torch.cat([piece[k] for piece in pieces]) for k in range(self.config.num_scales)]

    @torch.no_grad()
    def guided_scale_logits(
        self,
        indices: list[torch.Tensor],
        domain_B: torch.Tensor,
        present_BS: torch.Tensor,
        annotated_BS: torch.Tensor,
        *,
        cfg: float = 1.5,
    ) -> list[torch.Tensor]:
        """Guided float32 logits [(B, p_k², V)] of each scale when the given tokens are fed (teacher path).

        Runs the same per-scale steps as sampling but takes ``indices`` instead of drawing; for checking
        this sampler's numerics against :meth:`VAR.forward` or the basic sampler.
        """
        settings = self.settings(cfg, 0, 1.0, 1.0)
        present_BS, annotated_BS = present_BS.to(self.dtype), annotated_BS.to(self.dtype)
        _, logits = self._sample_core(domain_B, present_BS, annotated_BS, None, settings, forced=indices)
        return logits

    # ---------------------------------------------------------------- chunks and graphs
    def _sample_chunk(
        self,
        domain_B: torch.Tensor,
        present_BS: torch.Tensor,
        annotated_BS: torch.Tensor,
        uniform_BL: torch.Tensor,
        settings: SamplerSettings,
    ) -> list[torch.Tensor]:
        batch = domain_B.shape[0]
        bucket = self._bucket(batch, settings)
        if bucket is None:
            return self._sample_core(domain_B, present_BS, annotated_BS, uniform_BL, settings)[0]
        graph = self._graph(bucket, settings, present_BS.shape[1])
        pad = bucket - batch
        graph.domain_B.copy_(_pad_rows(domain_B, pad))
        graph.present_BS.copy_(_pad_rows(present_BS, pad))
        graph.annotated_BS.copy_(_pad_rows(annotated_BS, pad))
        graph.uniform_BL.copy_(_pad_rows(uniform_BL, pad))
        graph.graph.replay()
        return [indices_Bpp[:batch].clone() for indices_Bpp in graph.indices]

    def _graph(self, bucket: int, settings: SamplerSettings, structures: int) -> _Graph:
        """The captured graph for ``bucket`` rows and these settings (captured on first use)."""
        key = (bucket, settings)
        if key in self._graphs:
            return self._graphs[key]
        options = dict(device=self.device)
        inputs = (torch.zeros(bucket, dtype=torch.long, **options),
                  torch.zeros(bucket, structures, dtype=self.dtype, **options),
                  torch.zeros(bucket, structures, dtype=self.dtype, **options),
                  torch.full((bucket, self.config.total_tokens), 0.5, **options))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles what the capture will run
            self._sample_core(*inputs, settings)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            indices, _ = self._sample_core(*inputs, settings)
        self._graphs[key] = _Graph(graph, *inputs, indices)
        return self._graphs[key]

    # ---------------------------------------------------------------- the sampling loop
    def _sample_core(
        self,
        domain_B: torch.Tensor,
        present_BS: torch.Tensor,
        annotated_BS: torch.Tensor,
        uniform_BL: torch.Tensor | None,
        settings: SamplerSettings,
        forced: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Scale-by-scale loop (as :func:`sample_scales`): token maps, and guided logits when ``forced``."""
        batch, config, quantizer = domain_B.shape[0], self.config, self.quantizer
        state = self._state(domain_B, present_BS, annotated_BS, settings.guided)
        f_hat_BCHW = quantizer.empty_accumulator(batch, self.device)
        ramp = guidance_ramp(settings.cfg, config.num_scales)
        x_RlC, indices, logits = None, [], []
        for k in range(config.num_scales):
            logits_BlV = self._guide(self._forward_scale(k, x_RlC, state), ramp[k], settings.guided)
            if forced is None:
                indices.append(self._draw(k, logits_BlV, uniform_BL, settings))
            else:
                indices.append(forced[k])
                logits.append(logits_BlV)
            if k + 1 < config.num_scales:
                f_hat_BCHW = f_hat_BCHW + self._contribution(indices[-1], k)
                x_BlC = quantizer.accumulator_to_next_input(f_hat_BCHW, k)
                x_RlC = x_BlC.repeat(2, 1, 1) if settings.guided else x_BlC
        return indices, logits

    def _contribution(self, indices_Bpp: torch.Tensor, k: int) -> torch.Tensor:
        """φ_k(upsample(codes)) (as ``quantizer.next_accumulator`` adds it); the exact matrix form on CUDA."""
        if self._upsampler is None:
            return self.quantizer.scale_contribution(indices_Bpp, k)
        return self._upsampler.contribution(indices_Bpp, k)

    def _draw(self, k: int, logits_BlV: torch.Tensor, uniform_BL: torch.Tensor, settings: SamplerSettings
              ) -> torch.Tensor:
        batch, start, side = logits_BlV.shape[0], self.config.scale_starts[k], self.config.patch_sides[k]
        probs_NM, index_NM = filter_probs(logits_BlV.flatten(0, 1), settings.top_k, settings.top_p,
                                          settings.temperature)
        uniform_N = uniform_BL[:, start:start + side * side].flatten()
        return draw_tokens(probs_NM, index_NM, uniform_N).view(batch, side, side)

    def _guide(self, logits_RlV: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        """Guided float32 logits; the compiled path reads the compute-dtype logits once."""
        rows, length = logits_RlV.shape[:2]
        if not guided or self._functions is None or length < 2:
            return guided_logits(logits_RlV.float(), t, guided)
        t_0d = torch.full((), t, dtype=torch.float32, device=self.device)
        _mark_dynamic((logits_RlV, (0, 1)))
        return self._function("guide", rows, length)(logits_RlV, t_0d)

    def _state(self, domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor, guided: bool
               ) -> _SampleState:
        """Condition rows (B conditional, then B null when guided), AdaLN vectors once, an empty cache."""
        var, rd = self.var, self.residual_dtype
        cond_RC = var.condition(*_stream_inputs(domain_B, present_BS, annotated_BS, guided))
        rows = cond_RC.shape[0]
        modulations = []
        for mod_R6C in var.block_modulations(cond_RC):
            gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_R6C.to(rd).unsqueeze(1).unbind(2)
            modulations.append(_Modulation(gamma1.contiguous(), gamma2.contiguous(), 1 + scale1, 1 + scale2,
                                           shift1.contiguous(), shift2.contiguous()))
        head_scale_R1C, head_shift_R1C = var.head_ada_lin(cond_RC).to(rd).view(rows, 1, 2, -1).unbind(2)
        cache = ChainedKVCache(rows, self.config, self.dtype, self.device)
        return _SampleState(cond_RC, modulations, 1 + head_scale_R1C, head_shift_R1C.contiguous(), cache)

    def _embed(self, k: int, x_RlC: torch.Tensor | None, cond_RC: torch.Tensor) -> torch.Tensor:
        """Scale k's input embeddings (R, p_k², C) in the residual dtype (as :meth:`VAR.embed_scale`)."""
        start, end = self.config.scale_starts[k], self.config.scale_starts[k] + self.config.tokens_per_scale[k]
        if k == 0:
            x_RlC = cond_RC.to(self.residual_dtype).unsqueeze(1) + self._start_lC
        else:
            x_RlC = F.linear(x_RlC.to(self.dtype), self._word_weight, self._word_bias).to(self.residual_dtype)
        return x_RlC + self._position_LC[start:end] + self._level_KC[k]

    def _forward_scale(self, k: int, x_RlC: torch.Tensor | None, state: _SampleState) -> torch.Tensor:
        """Logits (R, p_k², V) in the compute dtype of scale k (cache filled by scales 0..k-1)."""
        x_RlC = self._embed(k, x_RlC, state.cond_RC)
        rows, length, _ = x_RlC.shape
        start, eps, mods = self.config.scale_starts[k], self.config.norm_eps, state.modulations
        norm, residual = self._function("norm", rows, length), self._function("residual", rows, length)
        qkv_fn = fused_qkv if self.fused_kernels else self._function("qkv", rows, length)
        if self._functions is not None:
            _mark_dynamic((x_RlC, (0, 1)), *[(t, (0,)) for m in mods for t in vars(m).values()],
                          (state.head_scale_R1C, (0,)), (state.head_shift_R1C, (0,)))
        h_RlC = norm(x_RlC, mods[0].scale1, mods[0].shift1, eps, self.dtype)
        for i, (weights, mod) in enumerate(zip(self._blocks, mods)):
            qkv_RlE = self._rows_dynamic(F.linear(h_RlC, weights.qkv_weight, weights.qkv_bias))
            keys_RlHD, values_RlHD = state.cache.slots(i, start, length)
            q_RHlD = qkv_fn(qkv_RlE, weights.attn_scale_11H1, self._rows_dynamic(keys_RlHD),
                            self._rows_dynamic(values_RlHD))
            out_RHlD = state.cache.attend(i, start + length, q_RHlD)
            attn_RlC = F.linear(out_RHlD.transpose(1, 2).reshape(rows, length, -1), weights.proj_weight,
                                weights.proj_bias)
            x_RlC, h_RlC = residual(x_RlC, self._rows_dynamic(attn_RlC), mod.gamma1, mod.scale2, mod.shift2, eps,
                                    self.dtype)
            next_scale, next_shift = ((mods[i + 1].scale1, mods[i + 1].shift1) if i + 1 < len(mods)
                                      else (state.head_scale_R1C, state.head_shift_R1C))
            ffn_RlC = self._rows_dynamic(self._ffn(h_RlC, weights))
            x_RlC, h_RlC = residual(x_RlC, ffn_RlC, mod.gamma2, next_scale, next_shift, eps, self.dtype)
        return F.linear(h_RlC, self._head_weight, self._head_bias)

    def _rows_dynamic(self, x_RlX: torch.Tensor) -> torch.Tensor:
        """``x`` with its row and length dimensions marked dynamic for the compiled functions."""
        if self._functions is not None:
            _mark_dynamic((x_RlX, (0, 1)))
        return x_RlX

    def _ffn(self, h_RlC: torch.Tensor, weights: _BlockWeights) -> torch.Tensor:
        """fc2(tanh-GELU(fc1(h))); on CUDA fc1's bias and GELU run in cuBLASLt's epilogue."""
        if self.fused_gelu:
            rows, length, width = h_RlC.shape
            hidden_NH = torch._addmm_activation(weights.fc1_bias, h_RlC.reshape(-1, width), weights.fc1_weight.t(),
                                                use_gelu=True)
            hidden_RlH = hidden_NH.view(rows, length, -1)
        else:
            hidden_RlH = F.gelu(F.linear(h_RlC, weights.fc1_weight, weights.fc1_bias), approximate="tanh")
        return F.linear(hidden_RlH, weights.fc2_weight, weights.fc2_bias)


def _inference_model(var: VAR, dtype: torch.dtype, convert_in_place: bool) -> VAR:
    """``var`` in eval mode with ``dtype`` weights: itself if already so, else a converted copy (or itself)."""
    if all(param.dtype == dtype for param in var.parameters()):
        return var.eval()
    model = var if convert_in_place else copy.deepcopy(var)
    return model.to(dtype).eval()


def _pad_rows(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    """``tensor`` with ``pad`` copies of its first row appended (bucket padding)."""
    if pad == 0:
        return tensor
    return torch.cat((tensor, tensor[:1].expand(pad, *tensor.shape[1:])))


__all__ = [
    "ChainedKVCache",
    "FastSampler",
    "SampledScales",
    "SamplerSettings",
    "check_settings",
    "default_graph_max_batch",
    "draw_tokens",
    "filter_probs",
    "generators_from_seeds",
    "guidance_ramp",
    "guided_logits",
    "norm_modulate",
    "normalized_qkv",
    "residual_norm_modulate",
    "row_uniforms",
    "sample_images",
    "sample_memory_bytes",
    "sample_scales",
    "sample_tokens",
]
