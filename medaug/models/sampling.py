"""A basic next-scale sampler for :class:`~medaug.models.var.VAR` (VAR-NOTES.md "Sampling", DESIGN.md §4).

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medaug.models.quant import MultiScaleQuantizer
from medaug.models.var import VAR
from medaug.models.vqvae import VQVAE


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
    values_NM, index_NM = torch.topk(logits_NV.float() / temperature, keep, dim=-1, sorted=True)
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
    domain_B: torch.Tensor, present_BS: torch.Tensor, annotated_BS: torch.Tensor, guided: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition arguments for B conditional rows, followed by B null rows when ``guided``."""
    drop_B = torch.zeros(domain_B.shape[0], dtype=torch.bool, device=domain_B.device)
    if not guided:
        return domain_B, present_BS, annotated_BS, drop_B
    drop_2B = torch.cat((drop_B, ~drop_B))
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
) -> SampledScales:
    """Sample B token maps scale by scale (see the module doc); the inputs it built come back too.

    Condition arguments as :meth:`VAR.condition`, on the model's device. ``generators``: one
    ``torch.Generator`` per row (:func:`generators_from_seeds`). ``cfg``: guidance at the last scale
    (0: no unconditional stream); ``top_k`` (0 = all), ``top_p`` in (0, 1] (1 = all), ``temperature``
    > 0. Put the model in eval mode first; runs under the caller's autocast, if any.
    """
    check_settings(top_k, top_p, temperature)
    batch, device, config = domain_B.shape[0], domain_B.device, var.config
    _check_inputs(var, quantizer, batch, generators)
    guided = cfg != 0.0
    cond_RC = var.condition(*_stream_inputs(domain_B, present_BS, annotated_BS, guided))
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
) -> list[torch.Tensor]:
    """Per-scale token maps [(B, p_k, p_k) int64] of B samples (:func:`sample_scales` without the inputs)."""
    sampled = sample_scales(var, quantizer, domain_B, present_BS, annotated_BS, generators=generators,
                            cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
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


__all__ = [
    "SampledScales",
    "check_settings",
    "draw_tokens",
    "filter_probs",
    "generators_from_seeds",
    "guidance_ramp",
    "guided_logits",
    "row_uniforms",
    "sample_images",
    "sample_scales",
    "sample_tokens",
]
