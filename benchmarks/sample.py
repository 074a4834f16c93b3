"""Benchmark: the fast sampler and decoder of ``medaug synthesize`` on one GPU (issue 9, DESIGN.md §5).

Random weights (VAR init, random tokenizer): speed does not depend on what the weights learned, but
the numbers are not those of a trained model's token distribution (random VAR logits are nearly flat,
so top-p 0.96 keeps most of the top-900). Shapes are the real ones: VAR d16/d30 presets on the 256²
tokenizer (4096 codes × 32, scales 1..16, 680 tokens), the ``tokenizer-256`` decoder with 2 image
channels and 20 structures (23 output channels), cfg 1.5, top-k 900, top-p 0.96.

Two parts run as two processes, one per GPU of the lent 2-GPU machine (``benchmarks/gpu_sample.sh``):

* ``--part a`` (d16): the matmul and copy ceilings; correctness on the GPU (float32 fast vs basic
  tokens; bf16 guided logits vs float32 teacher-forced logits; graph vs eager tokens; cuBLASLt GELU;
  bf16 decoder vs float32); decoder variants at batch 256; d16 sampling at batch 1, 16, 64, 256 with
  image+mask decode (fast, plus the basic sampler and eager ablations as references).
* ``--part b`` (d30): ceilings, d30 sampling at batch 1, 16, 64, 256 with peak memory, the filter alone.

Images/s count tokens + decode to image (float32, clamped) + label (annotated argmax), on the device.
Utilisation = FLOPs per image × images/s / 790 TFLOP/s (DESIGN §5's bf16 rate; the measured matmul
rate of the same run is reported too): transformer FLOPs = flops_per_token(inference) × 680 × 2
(guidance), decoder FLOPs counted by torch's FlopCounterMode. Every section writes the JSON so far,
so a run cut by its time limit still reports. ``--smoke`` runs tiny models (CPU check of the script).

    python benchmarks/sample.py --part a --json-out $OUT/sample-a.json
    python benchmarks/sample.py --smoke --part a          # on the CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

from medaug.models.quant import QuantizerConfig  # noqa: E402
from medaug.models.sampling import (  # noqa: E402
    FastSampler,
    draw_tokens,
    filter_probs,
    generators_from_seeds,
    guidance_ramp,
    sample_memory_bytes,
    sample_tokens,
)
from medaug.models.var import VAR, var_preset  # noqa: E402
from medaug.models.vqvae import VQVAE, CodeUpsampler, FastDecoder, VQVAEConfig, logits_to_label  # noqa: E402

BF16_RATE = 790e12
SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96, temperature=1.0)
DOMAINS, STRUCTURES, IMAGE_CHANNELS = 4, 20, 2
START = time.perf_counter()
VARIANTS: set[str] | None = None  # --variants: the decoder variants part g times (None: all)


class Report:
    """The JSON report, rewritten after every section."""

    def __init__(self, path: Path | None, device: torch.device, **fields: Any):
        self.path, self.device, self.data = path, device, dict(fields)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        print(f"[{time.perf_counter() - START:6.1f}s] {key}: {json.dumps(value)[:600]}", flush=True)
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` synchronised calls (after the caller's warm-up)."""
    seconds = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        function()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def left(deadline: float) -> float:
    return deadline - (time.perf_counter() - START)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2)}


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- models and inputs
def build_models(preset: str, device: torch.device, smoke: bool) -> tuple[VAR, VQVAE]:
    """Random-weight VAR (float32) and paired tokenizer on ``device``."""
    torch.manual_seed(0)
    if smoke:
        sides = (1, 2, 3, 4)
        quantizer = QuantizerConfig(codebook_size=64, latent_dim=8, patch_sides=sides)
        vq_config = VQVAEConfig(image_size=64, image_channels=IMAGE_CHANNELS, num_structures=STRUCTURES,
                                base_channels=16, quantizer=quantizer)
        var_config = var_preset("tiny", depth=2 if preset == "d16" else 3, width=64, heads=4, patch_sides=sides,
                                codebook_size=64, latent_dim=8, num_domains=DOMAINS, num_structures=STRUCTURES)
    else:
        vq_config = VQVAEConfig(image_size=256, image_channels=IMAGE_CHANNELS, num_structures=STRUCTURES)
        var_config = var_preset(preset, num_domains=DOMAINS, num_structures=STRUCTURES)
    with torch.device(device):
        var = VAR(var_config).eval()
        vqvae = VQVAE(vq_config).eval()
    return var, vqvae


def conditions(batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    domain_B = torch.randint(DOMAINS, (batch,), generator=generator)
    present_BS = torch.rand(batch, STRUCTURES, generator=generator) < 0.3
    annotated_BS = present_BS | (torch.rand(batch, STRUCTURES, generator=generator) < 0.2)
    return domain_B.to(device), present_BS.to(device), annotated_BS.to(device)


def run_fast(sampler: FastSampler, decoder: FastDecoder | None, quantizer, condition, seeds) -> Any:
    """Tokens, and with a decoder: image float32 in [-1, 1] + annotated label, all on the device."""
    indices = sampler.sample_tokens(*condition, generators=generators_from_seeds(seeds, sampler.device), **SETTINGS)
    if decoder is None:
        return indices
    return decoder.indices_to_img(quantizer, indices, condition[2])


def run_basic(var: VAR, vqvae: VQVAE, condition, seeds, device: torch.device, decode: bool) -> Any:
    """The basic sampler (and VQVAE.decode) under bf16 autocast with float32 weights."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        indices = sample_tokens(var, vqvae.quantizer, *condition, generators=generators_from_seeds(seeds, device),
                                **SETTINGS)
        if not decode:
            return indices
        image_BCHW, logits_BKHW = vqvae.decode(vqvae.quantizer.indices_to_features(indices))
    return image_BCHW.float().clamp(-1, 1), logits_to_label(logits_BKHW, condition[2])


# ---------------------------------------------------------------- ceilings
def ceilings(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Measured bf16 matmul rate (8192³, random data) and device-to-device copy bandwidth."""
    if device.type != "cuda":
        return {}
    size = 2048 if smoke else 8192
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, device, 10)
    source = torch.randn(1 << 30, device=device, dtype=torch.float32 if not smoke else torch.float16)
    target = torch.empty_like(source)
    target.copy_(source)
    copy_s = timed(lambda: target.copy_(source), device, 10)
    del a, b, source, target
    free_memory(device)
    return {"matmul_bf16_tflops": round(2 * size**3 / seconds / 1e12, 1),
            "copy_tb_per_s": round(2 * (1 << 30) * 4 / copy_s / 1e12, 2)}


# ---------------------------------------------------------------- correctness
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def teacher_guided(var: VAR, quantizer, indices, condition, cfg: float) -> list[torch.Tensor]:
    """Guided logits per scale from the teacher-forced forward (independent of the sampler code)."""
    config, batch = var.config, condition[0].shape[0]
    x_BLC = quantizer.indices_to_teacher_inputs(indices)
    cond_BLV = var(x_BLC, *condition, torch.zeros(batch, dtype=torch.bool, device=x_BLC.device))
    uncond_BLV = var(x_BLC, *condition, torch.ones(batch, dtype=torch.bool, device=x_BLC.device))
    out = []
    for k, t in enumerate(guidance_ramp(cfg, config.num_scales)):
        s, e = config.scale_starts[k], config.scale_starts[k] + config.tokens_per_scale[k]
        out.append((1 + t) * cond_BLV[:, s:e].float() - t * uncond_BLV[:, s:e].float())
    return out


@torch.no_grad()
def correctness(var: VAR, vqvae: VQVAE, decoder: FastDecoder, device: torch.device) -> dict[str, Any]:
    """float32 fast == basic tokens; bf16 logits vs float32; graph == eager; GELU epilogue; decoder."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    quantizer, batch, result = vqvae.quantizer, 8, {}
    condition, seeds = conditions(batch, device, seed=1), list(range(100, 100 + batch))
    generators = lambda: generators_from_seeds(seeds, device)  # noqa: E731
    basic32 = sample_tokens(var, quantizer, *condition, generators=generators(), **SETTINGS)
    fast32 = FastSampler(var, quantizer, dtype=torch.float32, compile=False, cuda_graphs=False)
    tokens32 = fast32.sample_tokens(*condition, generators=generators(), **SETTINGS)
    result["fp32_fast_vs_basic_token_agreement"] = token_agreement(quantizer, tokens32, basic32)
    reference = teacher_guided(var, quantizer, basic32, condition, SETTINGS["cfg"])
    result["fp32_fast_logits_rel_err_max"] = max(map(rel, fast32.guided_scale_logits(basic32, *condition), reference))
    del fast32
    bf16 = FastSampler(var, quantizer)  # a bf16 copy, compiled, graphs
    result["bf16_fast_logits_rel_err_per_scale"] = [round(rel(a, b), 5) for a, b in zip(
        bf16.guided_scale_logits(basic32, *condition), reference)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        autocast_ref = teacher_guided(var, quantizer, basic32, condition, SETTINGS["cfg"])
    result["bf16_autocast_teacher_logits_rel_err_per_scale"] = [round(rel(a, b), 5)
                                                                for a, b in zip(autocast_ref, reference)]
    graph = bf16.sample_tokens(*condition, generators=generators(), **SETTINGS)
    eager = bf16.sample_tokens(*condition, generators=generators(), max_batch=batch, **SETTINGS) \
        if not bf16.cuda_graphs else _eager_tokens(bf16, condition, generators())
    result["bf16_graph_vs_eager_token_agreement"] = token_agreement(quantizer, graph, eager)
    result["bf16_fast_vs_fp32_basic_token_agreement_scale0"] = float((graph[0] == basic32[0]).float().mean())
    result["gelu_epilogue"] = gelu_check(device)
    upsampler = CodeUpsampler(quantizer, device)
    result["code_upsampler_features_rel_err"] = rel(upsampler.features(basic32), quantizer.indices_to_features(basic32))
    result.update(decoder_check(vqvae, decoder, quantizer, basic32, condition[2]))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return result


def _eager_tokens(sampler: FastSampler, condition, generators) -> list[torch.Tensor]:
    sampler.cuda_graphs = False
    try:
        return sampler.sample_tokens(*condition, generators=generators, **SETTINGS)
    finally:
        sampler.cuda_graphs = True


def token_agreement(quantizer, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float((quantizer.indices_to_tokens(a) == quantizer.indices_to_tokens(b)).float().mean())


def gelu_check(device: torch.device) -> dict[str, float]:
    """torch._addmm_activation(use_gelu=True) against tanh- and erf-GELU in float32 (max abs difference)."""
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator).to(device) for shape in ((4096, 256), (512, 256), (512,)))
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    plain = torch.nn.functional.linear(x, w, b)
    return {"vs_tanh": float((fused - torch.nn.functional.gelu(plain, approximate="tanh")).abs().max()),
            "vs_erf": float((fused - torch.nn.functional.gelu(plain)).abs().max())}


def check_tokens(vqvae: VQVAE, device: torch.device, batch: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random token maps of ``batch`` samples and an annotated mask, for decoder checks."""
    generator = torch.Generator().manual_seed(4)
    indices = [torch.randint(vqvae.quantizer.config.codebook_size, (batch, s, s), generator=generator).to(device)
               for s in vqvae.quantizer.patch_sides]
    return indices, conditions(batch, device, seed=4)[2]


@torch.no_grad()
def decoder_check(vqvae: VQVAE, decoder: FastDecoder, quantizer, indices, annotated_BS) -> dict[str, float]:
    """The default FastDecoder (bf16, channels-last, compiled on CUDA) against float32 VQVAE.decode."""
    image_ref, logits_ref = vqvae.decode(quantizer.indices_to_features(indices))
    label_ref = logits_to_label(logits_ref, annotated_BS)
    image, label = decoder.indices_to_img(quantizer, indices, annotated_BS)
    return {"decoder_bf16_image_rel_err": rel(image, image_ref.clamp(-1, 1)),
            "decoder_bf16_label_agreement": float((label == label_ref).float().mean())}


# ---------------------------------------------------------------- decoder
def random_features(vqvae: VQVAE, batch: int, device: torch.device) -> torch.Tensor:
    """f_hat (B, C, h, w) of random token maps at every scale (seeded): what the decoder reads."""
    generator = torch.Generator().manual_seed(3)
    indices = [torch.randint(vqvae.quantizer.config.codebook_size, (batch, s, s), generator=generator).to(device)
               for s in vqvae.quantizer.patch_sides]
    return vqvae.quantizer.indices_to_features(indices)


def time_decode(function: Callable[[], Any], device: torch.device, batch: int, reps: int, flops: int,
                setup: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """images/s, the first call's seconds (compilation; run inside ``setup()``) and utilisation of ``function``."""
    start = time.perf_counter()
    with setup():
        function()
        sync(device)
    warm_s = time.perf_counter() - start
    seconds = timed(function, device, reps)
    return {"images_per_s": round(batch / seconds, 1), "first_call_s": round(warm_s, 1),
            "utilisation": round(flops * batch / seconds / BF16_RATE, 3)}

@torch.no_grad()
def decoder_variants(vqvae: VQVAE, plain: FastDecoder, stats: FastDecoder, device: torch.device, batch: int,
                     reps: int) -> dict[str, Any]:
    """Decoder alone (f_hat → image + logits) at ``batch``: autocast, bf16 eager NCHW/NHWC, compiled NHWC
    with GroupNorm from per-channel statistics (``stats``, the default: one band of rows; and 16 bands) and
    with torch's GroupNorm (``plain``), with kernel profiles of ``plain`` and ``stats``.

    A compiled NCHW variant is left out: inductor's layout optimisation runs convolutions channels-last
    on CUDA whatever the input layout, and each compile costs about a minute of the device call.
    """
    f_hat_BCHW = random_features(vqvae, batch, device)
    result = {"batch": batch, "flops_per_image": decoder_flops(vqvae, f_hat_BCHW[:1])}

    def autocast_decode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return vqvae.decode(f_hat_BCHW)

    variants = {"autocast_fp32_weights": autocast_decode}
    for name, options in (("bf16_nchw_eager", dict(channels_last=False, compile=False)),
                          ("bf16_channels_last_eager", dict(channels_last=True, compile=False)),
                          ("compiled_channel_stats_16_row_bands", dict(channel_stats_norm=True, norm_row_bands=16))):
        decoder = FastDecoder(vqvae, **options)
        variants[name] = lambda d=decoder: d.decode(f_hat_BCHW)
    variants["compiled_channel_stats_norm"] = lambda: stats.decode(f_hat_BCHW)
    variants["compiled_torch_group_norm" if plain.compiled else "eager_torch_group_norm"] = lambda: plain.decode(f_hat_BCHW)
    for name, function in variants.items():
        result[name] = time_decode(function, device, batch, reps, result["flops_per_image"])
    result["profile_torch_group_norm"] = profile_top(lambda: plain.decode(f_hat_BCHW), device, top=25)
    result["profile_channel_stats_norm"] = profile_top(variants["compiled_channel_stats_norm"], device, top=25)
    return result


@torch.no_grad()
def decoder_autotune(vqvae: VQVAE, device: torch.device, batch: int, reps: int) -> dict[str, Any]:
    """The default decoder compiled with ``mode="max-autotune-no-cudagraphs"`` (Triton convolution templates
    benchmarked against cuDNN, epilogues fused into the winners): images/s and the compile time it costs."""
    f_hat_BCHW = random_features(vqvae, batch, device)
    decoder = FastDecoder(vqvae, compile=False, channels_last=True)
    decoder._forward = torch.compile(decoder.path, dynamic=None, mode="max-autotune-no-cudagraphs")
    decoder.compiled = True
    row = time_decode(lambda: decoder.decode(f_hat_BCHW), device, batch, reps, decoder_flops(vqvae, f_hat_BCHW[:1]))
    return {"batch": batch, **row, "profile": profile_top(lambda: decoder.decode(f_hat_BCHW), device)}


def profile_top(function: Callable[[], Any], device: torch.device, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` device kernels of one call by total time (torch.profiler), after a warm call."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    try:
        function()
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            function()
            sync(device)
        rows = []
        for event in prof.key_averages():
            total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if total > 0:
                rows.append({"kernel": event.key[:90], "ms": round(total / 1000, 2), "calls": event.count})
    except Exception as error:  # noqa: BLE001 (diagnostics only)
        return [{"error": f"{type(error).__name__}: {str(error)[:200]}"}]
    return sorted(rows, key=lambda row: -row["ms"])[:top]


def decoder_flops(vqvae: VQVAE, f_hat_1CHW: torch.Tensor) -> int:
    """FLOPs of one image's decode (post-quant conv + decoder), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        vqvae.decode(f_hat_1CHW)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- sampling
@torch.no_grad()
def sampling_rows(var, vqvae, decoder, device, batches, deadline, basic_batches=(), ablations=False,
                  other_decoders: dict[str, FastDecoder] | None = None) -> list[dict]:
    """Images/s (tokens only and with decode), latency and peak memory per batch size; with each of
    ``other_decoders`` at the largest batch too."""
    rows, quantizer = [], vqvae.quantizer
    flops_image = var.config.flops_per_token(False) * var.config.total_tokens * 2
    for batch in basic_batches:
        if left(deadline) > 60:
            rows.append(measure("basic_autocast", batch, device, flops_image,
                                lambda c, s: run_basic(var, vqvae, c, s, device, False),
                                lambda c, s: run_basic(var, vqvae, c, s, device, True)))
            free_memory(device)
    sampler = FastSampler(var, quantizer, convert_in_place=True)  # the reference above is done: bf16 in place
    for batch in batches:
        if left(deadline) < 25:
            rows.append({"variant": "fast", "batch": batch, "skipped": "time limit"})
            continue
        estimate = sample_memory_bytes(var.config, True, SETTINGS["top_k"]) * batch
        rows.append(measure("fast", batch, device, flops_image,
                            lambda c, s: run_fast(sampler, None, quantizer, c, s),
                            lambda c, s: run_fast(sampler, decoder, quantizer, c, s)))
        rows[-1]["memory_estimate_gb"] = round(estimate / 1e9, 2)
        if "error" in rows[-1] and "OutOfMemory" not in rows[-1]["error"] and sampler.compiled:
            sampler = FastSampler(sampler.var, quantizer, compile=False)  # record, then go on without compile
            rows.append({"note": "compiled sampler failed; later rows run with compile=False"})
        rows[-1]["auto_max_batch"] = sampler.max_batch_size(sampler.settings(**SETTINGS))
        sampler.clear_graphs()
        free_memory(device)
    for name, other in (other_decoders or {}).items():
        if left(deadline) > 25:
            rows.append(measure("fast_decoder_" + name, batches[-1], device, flops_image,
                                lambda c, s: run_fast(sampler, None, quantizer, c, s),
                                lambda c, s, d=other: run_fast(sampler, d, quantizer, c, s)))
            free_memory(device)
    if ablations:
        rows += ablation_rows(sampler, decoder, quantizer, device, flops_image, deadline)
    return rows


def ablation_rows(sampler, decoder, quantizer, device, flops_image, deadline) -> list[dict]:
    """The sampler of another source file at batch 256 (``MEDAUG_BASELINE_SAMPLER``: a path to an older
    medaug/models/sampling.py, timed in the same process as the current one), a kernel profile of the
    default at 256, one graph at 256, without CUDA graphs at batch 1, without torch.compile at batch 256
    (same weights)."""
    rows = []
    baseline = os.environ.get("MEDAUG_BASELINE_SAMPLER")
    if baseline and left(deadline) > 60:
        try:
            rows.append(baseline_row(Path(baseline), sampler, decoder, quantizer, device, flops_image))
        except Exception as error:  # noqa: BLE001 (a comparison row must not cost the rows after it)
            traceback.print_exc()
            rows.append({"variant": "fast_baseline", "error": f"{type(error).__name__}: {str(error)[:300]}"})
        free_memory(device)
    if left(deadline) > 60 and device.type == "cuda":
        condition, seeds = conditions(256, device, seed=256), list(range(256))
        rows.append({"variant": "profile_fast_tokens_256",
                     "kernels": profile_top(lambda: run_fast(sampler, None, quantizer, condition, seeds), device,
                                            top=25)})
        rows.append(flash_row(sampler, decoder, quantizer, device, flops_image, 256))
        rows.append(no_graph_row(sampler, decoder, quantizer, device, flops_image, 256))
        free_memory(device)
    if left(deadline) > 40:
        sampler.cuda_graphs = False
        rows.append(measure("fast_no_graphs", 1, device, flops_image,
                            lambda c, s: run_fast(sampler, None, quantizer, c, s),
                            lambda c, s: run_fast(sampler, decoder, quantizer, c, s)))
        sampler.cuda_graphs = True
    if left(deadline) > 40:
        eager = FastSampler(sampler.var, quantizer, compile=False, cuda_graphs=False)
        batch = 256 if device.type == "cuda" else 4
        rows.append(measure("fast_no_compile", batch, device, flops_image,
                            lambda c, s: run_fast(eager, None, quantizer, c, s), None))
    free_memory(device)
    return rows


def no_graph_row(sampler, decoder, quantizer, device, flops_image, batch: int) -> dict[str, Any]:
    """``batch`` without its CUDA graph (eager launches of the compiled functions), graphs restored after."""
    limit, sampler.graph_max_batch = sampler.graph_max_batch, batch - 1
    try:
        return measure("fast_no_graph", batch, device, flops_image,
                       lambda c, s: run_fast(sampler, None, quantizer, c, s),
                       lambda c, s: run_fast(sampler, decoder, quantizer, c, s))
    finally:
        sampler.graph_max_batch = limit


def flash_row(sampler, decoder, quantizer, device, flops_image, batch: int) -> dict[str, Any]:
    """``batch`` with SDPA on the flash backend; the graphs are captured again inside it, then dropped."""
    sampler.clear_graphs()
    row = measure("fast_flash_attention", batch, device, flops_image,
                  lambda c, s: flash_only(lambda: run_fast(sampler, None, quantizer, c, s)),
                  lambda c, s: flash_only(lambda: run_fast(sampler, decoder, quantizer, c, s)))
    sampler.clear_graphs()
    return row


def flash_only(function: Callable[[], Any]) -> Any:
    """``function()`` with SDPA restricted to the flash backend (PyTorch picks cuDNN on the H200 by default)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return function()


def baseline_row(path: Path, sampler, decoder, quantizer, device, flops_image) -> dict[str, Any]:
    """Tokens and tokens + decode at batch 256 (4 on the CPU) with the FastSampler of ``path``, and
    whether its tokens equal the current sampler's (bf16 on CUDA: the kernels differ, so near-ties may
    flip; the share of equal tokens is reported)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    old = module.FastSampler(sampler.var, quantizer)
    batch = 256 if device.type == "cuda" else 4
    row = measure("fast_baseline_" + path.stem, batch, device, flops_image,
                  lambda c, s: run_fast(old, None, quantizer, c, s), lambda c, s: run_fast(old, decoder, quantizer, c, s))
    condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
    row["token_agreement_with_current"] = token_agreement(quantizer, run_fast(old, None, quantizer, condition, seeds),
                                                          run_fast(sampler, None, quantizer, condition, seeds))
    return row


def measure(variant: str, batch: int, device, flops_image: float, tokens_fn, full_fn) -> dict[str, Any]:
    """Warm-up (compile, graph capture) then timed calls of tokens-only and tokens+decode."""
    condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
    reps = 10 if batch <= 16 else 5 if batch <= 64 else 3
    try:
        start = time.perf_counter()
        tokens_fn(condition, seeds)
        sync(device)
        row = {"variant": variant, "batch": batch, "first_call_s": round(time.perf_counter() - start, 1)}
        tokens_s = timed(lambda: tokens_fn(condition, seeds), device, reps)
        row.update(tokens_images_per_s=round(batch / tokens_s, 1), tokens_ms=round(1000 * tokens_s, 2),
                   transformer_utilisation=round(flops_image * batch / tokens_s / BF16_RATE, 3))
        if full_fn is not None:
            full_fn(condition, seeds)
            reset_peak(device)
            full_s = timed(lambda: full_fn(condition, seeds), device, reps)
            row.update(images_per_s=round(batch / full_s, 1), ms=round(1000 * full_s, 2), **peak_gb(device))
    except Exception as error:  # noqa: BLE001 (a benchmark row records the failure and the run goes on)
        traceback.print_exc()
        row = {"variant": variant, "batch": batch, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return row


@torch.no_grad()
def filter_alone(device: torch.device, rows: int, vocab: int) -> dict[str, Any]:
    """filter_probs + draw_tokens on (rows, vocab) float32 logits (the last scale of d16 at batch 256)."""
    logits = torch.randn(rows, vocab, device=device) * 0.05
    uniform = torch.rand(rows, device=device)

    def run():
        probs, index = filter_probs(logits, SETTINGS["top_k"], SETTINGS["top_p"])
        return draw_tokens(probs, index, uniform)

    run()
    result = {"rows": rows, "filter_and_draw_ms": round(1000 * timed(run, device, 5), 2)}
    result["topk_only_ms"] = round(1000 * timed(lambda: torch.topk(logits, SETTINGS["top_k"], dim=-1), device, 5), 2)
    result["sort_only_ms"] = round(1000 * timed(lambda: torch.sort(logits, dim=-1, descending=True), device, 5), 2)
    return result


# ---------------------------------------------------------------- streamed (decode behind sampling)
def stream_pass(sampler: FastSampler, decoder: FastDecoder, quantizer, device: torch.device, batch: int,
                count: int, overlap: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches as ``medaug synthesize`` makes them, results in host memory. ``overlap``: each
    batch's decode (and copy to the host) runs on a second stream behind the next batch's sampling
    (:func:`medaug.synth.engine.decode_behind`, what :meth:`SynthGenerator.submit` does); else one batch
    at a time on one stream."""
    from medaug.synth.engine import decode_behind

    stream = torch.cuda.Stream(device) if overlap else None
    made: list[tuple[torch.Tensor, torch.Tensor]] = []

    def submit(i: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        condition = conditions(batch, device, seed=1000 + i)
        seeds = range(i * batch, (i + 1) * batch)
        indices = sampler.sample_tokens(*condition, generators=generators_from_seeds(seeds, device), **SETTINGS)
        if overlap:
            return decode_behind(decoder, quantizer, indices, condition[2], stream)
        image_BCHW, label_BHW = decoder.indices_to_img(quantizer, indices, condition[2])
        return image_BCHW.cpu(), label_BHW.clamp(0, 255).to(torch.uint8).cpu(), None

    queued = submit(0)
    for i in range(count):
        following = submit(i + 1) if overlap and i + 1 < count else None
        if queued[2] is not None:
            queued[2].synchronize()
        made.append(queued[:2])
        queued = following if overlap else (submit(i + 1) if i + 1 < count else None)
    return made


def streamed_rows(sampler: FastSampler, decoder: FastDecoder, quantizer, device: torch.device, batch: int,
                  count: int) -> dict[str, Any]:
    """Images/s over ``count`` consecutive batches into host memory, one at a time vs decode overlapped
    with the next batch's sampling (CUDA only); whether both give the same images and labels; peak memory."""
    out: dict[str, Any] = {"batch": batch, "batches": count}
    results = {}
    for overlap in (False, True) if device.type == "cuda" else (False,):
        name = "overlapped" if overlap else "one_at_a_time"
        stream_pass(sampler, decoder, quantizer, device, batch, 2, overlap)  # warm-up (compile, cudnn)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        results[name] = stream_pass(sampler, decoder, quantizer, device, batch, count, overlap)
        sync(device)
        seconds = time.perf_counter() - start
        out[name] = {"images_per_s": round(batch * count / seconds, 1), "ms_per_batch": round(1000 * seconds / count, 1),
                     **peak_gb(device)}
    if "overlapped" not in results:
        return out
    pairs = list(zip(results["one_at_a_time"], results["overlapped"]))
    out["identical_images"] = all(torch.equal(a[0], b[0]) for a, b in pairs)
    out["label_agreement"] = round(float(torch.stack([(a[1] == b[1]).float().mean() for a, b in pairs]).mean()), 6)
    out["speedup"] = round(out["overlapped"]["images_per_s"] / out["one_at_a_time"]["images_per_s"], 3)
    return out


# ---------------------------------------------------------------- parts
def guarded(report: Report, key: str, function: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded under ``key`` and the next section still runs."""
    try:
        report.put(key, function())
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        report.put(key, {"error": f"{type(error).__name__}: {str(error)[:500]}"})
    free_memory(report.device)


def part_a(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    guarded(report, "ceilings", lambda: ceilings(device, smoke))
    var, vqvae = build_models("d16", device, smoke)
    decoder, plain = FastDecoder(vqvae), FastDecoder(vqvae, channel_stats_norm=False)
    guarded(report, "correctness_d16", lambda: correctness(var, vqvae, decoder, device))
    guarded(report, "decoder_check_default_vs_torch_group_norm",
            lambda: {name: decoder_check(vqvae, d, vqvae.quantizer, *check_tokens(vqvae, device))
                     for name, d in (("default", decoder), ("torch_group_norm", plain))})
    batch = 256 if not smoke else 4
    guarded(report, "decoder_alone",
            lambda: decoder_variants(vqvae, plain, decoder, device, batch, 5 if not smoke else 1))
    batches = (1, 16, 64, 256) if not smoke else (1, 2, 4)
    basic = (1, 256) if not smoke else (1,)
    guarded(report, "sampling_d16", lambda: sampling_rows(var, vqvae, decoder, device, batches, deadline, basic,
                                                          ablations=True, other_decoders={"torch_group_norm": plain}))
    if left(deadline) > 60:
        sampler = FastSampler(var, vqvae.quantizer, convert_in_place=True)
        guarded(report, "streamed_d16", lambda: streamed_rows(sampler, decoder, vqvae.quantizer, device, batch,
                                                               8 if not smoke else 2))
        del sampler
        free_memory(device)
    if not smoke and left(deadline) > 200:
        guarded(report, "decoder_max_autotune", lambda: decoder_autotune(vqvae, device, batch, 5))


def part_b(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    guarded(report, "ceilings", lambda: ceilings(device, smoke))
    guarded(report, "filter_alone", lambda: filter_alone(device, 65536 if not smoke else 256, 4096))
    var, vqvae = build_models("d30", device, smoke)
    batches = (256, 1, 16, 64) if not smoke else (4, 1)
    decoder = FastDecoder(vqvae)
    guarded(report, "sampling_d30", lambda: sampling_rows(var, vqvae, decoder, device, batches, deadline))
    if left(deadline) > 45:
        sampler = FastSampler(var, vqvae.quantizer, convert_in_place=True)
        guarded(report, "streamed_d30", lambda: streamed_rows(sampler, decoder, vqvae.quantizer, device,
                                                               batches[0], 3))


def part_s(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """The streamed loop alone (d16 at batch 256 and 64: one at a time vs decode behind sampling), then the
    max-autotune decoder: what part a reaches last, first."""
    var, vqvae = build_models("d16", device, smoke)
    decoder = FastDecoder(vqvae)
    sampler = FastSampler(var, vqvae.quantizer, convert_in_place=True)
    for batch, count in ((256, 8), (64, 16)) if not smoke else ((4, 2),):
        if left(deadline) > 40:
            guarded(report, f"streamed_d16_batch{batch}",
                    lambda b=batch, c=count: streamed_rows(sampler, decoder, vqvae.quantizer, device, b, c))
    del sampler
    free_memory(device)
    if not smoke and left(deadline) > 60:
        guarded(report, "decoder_max_autotune", lambda: decoder_autotune(vqvae, device, 256, 5))


def part_f(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """What ``medaug synthesize`` runs, with every default as shipped: the decoder alone at 256 (whole
    batch and chunks of 128); d16 at 1, 16, 64, 256 with decode; at 256 without its CUDA graph (with a
    kernel profile), with flash attention, and streamed (decode behind the next batch); d30 at 256, 1,
    16, 64. No correctness section: part a checks the same code."""
    guarded(report, "ceilings", lambda: ceilings(device, smoke))
    var, vqvae = build_models("d16", device, smoke)
    decoder, quantizer = FastDecoder(vqvae), vqvae.quantizer
    batch = 256 if not smoke else 4
    guarded(report, "decoder_alone", lambda: decoder_chunks(vqvae, decoder, device, batch, 5 if not smoke else 1))
    sampler = FastSampler(var, quantizer, convert_in_place=True)
    flops_image = var.config.flops_per_token(False) * var.config.total_tokens * 2
    rows: list[dict] = []

    def fast_rows() -> list[dict]:
        for size in (1, 16, 64, 256) if not smoke else (1, 2, 4):
            rows.append(measure("fast", size, device, flops_image,
                                lambda c, s: run_fast(sampler, None, quantizer, c, s),
                                lambda c, s: run_fast(sampler, decoder, quantizer, c, s)))
            rows[-1]["memory_estimate_gb"] = round(sample_memory_bytes(var.config, True, SETTINGS["top_k"]) * size
                                                   / 1e9, 2)
            rows[-1]["graph_captured"] = sampler._captured_rows(sampler.settings(**SETTINGS)) >= size
        return rows

    guarded(report, "sampling_d16", fast_rows)
    guarded(report, "streamed_d16",
            lambda: streamed_rows(sampler, decoder, quantizer, device, batch, 8 if not smoke else 2))
    sampler.clear_graphs()
    free_memory(device)
    if left(deadline) > 90:
        guarded(report, "no_graph_d16", lambda: no_graph_row(sampler, decoder, quantizer, device, flops_image, batch))
        condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
        limit, sampler.graph_max_batch = sampler.graph_max_batch, batch - 1
        guarded(report, "profile_tokens_d16_no_graph",
                lambda: profile_top(lambda: run_fast(sampler, None, quantizer, condition, seeds), device, top=25))
        sampler.graph_max_batch = limit
    if left(deadline) > 90 and device.type == "cuda":
        guarded(report, "flash_d16", lambda: flash_row(sampler, decoder, quantizer, device, flops_image, batch))
    del sampler, var, decoder
    free_memory(device)
    if left(deadline) > 120:
        var, vqvae = build_models("d30", device, smoke)
        decoder = FastDecoder(vqvae)
        guarded(report, "sampling_d30", lambda: sampling_rows(var, vqvae, decoder, device,
                                                              (256, 1, 16, 64) if not smoke else (4, 1), deadline))


def part_d(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """Where ``FastDecoder.channel_stats_min_batch`` belongs (both GroupNorm paths at batch 1..256), then
    d16 at batch 1 and 256 and d30 at 256 and 64 with every default (CUDA graphs up to
    ``default_graph_max_batch``, the decoder switching paths by chunk size)."""
    var, vqvae = build_models("d16", device, smoke)
    batches = (1, 2, 4, 8, 16, 32, 64, 128, 256) if not smoke else (1, 2, 4)
    guarded(report, "decoder_by_batch", lambda: decoder_by_batch(vqvae, device, batches, deadline))
    decoder = FastDecoder(vqvae)
    guarded(report, "sampling_d16", lambda: sampling_rows(var, vqvae, decoder, device, (1, 256) if not smoke else (1, 4),
                                                          deadline))
    del var, vqvae, decoder
    free_memory(device)
    if left(deadline) > 100:
        var, vqvae = build_models("d30", device, smoke)
        guarded(report, "sampling_d30", lambda: sampling_rows(var, vqvae, FastDecoder(vqvae), device,
                                                              (256, 64) if not smoke else (4, 1), deadline))


@torch.no_grad()
def decoder_by_batch(vqvae: VQVAE, device: torch.device, batches: tuple[int, ...], deadline: float) -> dict[str, Any]:
    """ms per decode of ``batch`` images with the per-channel-statistics GroupNorm and with torch's, each
    compiled (dynamic batch) and warmed at every size first."""
    f_hat_BCHW = random_features(vqvae, max(batches), device)
    result: dict[str, Any] = {}
    for name, stats in (("channel_stats", True), ("torch_group_norm", False)):
        decoder = FastDecoder(vqvae, channel_stats_norm=stats, channel_stats_min_batch=1)
        start = time.perf_counter()
        for batch in batches:
            decoder.decode(f_hat_BCHW[:batch])
        sync(device)
        rows = {"first_calls_s": round(time.perf_counter() - start, 1)}
        for batch in batches:
            if left(deadline) < 20:
                break
            seconds = timed(lambda: decoder.decode(f_hat_BCHW[:batch]), device, 10 if batch <= 16 else 3)
            rows[str(batch)] = {"ms": round(1000 * seconds, 2), "images_per_s": round(batch / seconds, 1)}
        result[name] = rows
        del decoder
        free_memory(device)
    return result


@torch.no_grad()
def decoder_chunks(vqvae: VQVAE, decoder: FastDecoder, device: torch.device, batch: int, reps: int) -> dict[str, Any]:
    """The default decoder alone at ``batch``: one call, and the batch in chunks of half (the chunk is set
    by hand), with the kernel profile of the whole-batch call."""
    f_hat_BCHW = random_features(vqvae, batch, device)
    flops = decoder_flops(vqvae, f_hat_BCHW[:1])
    result: dict[str, Any] = {"batch": batch, "flops_per_image": flops, "channel_stats_norm": decoder.channel_stats_norm}
    for name, chunk in (("whole_batch", batch), ("half_batch_chunks", max(1, batch // 2))):
        decoder._chunk = chunk
        result[name] = time_decode(lambda: decoder.decode(f_hat_BCHW), device, batch, reps, flops)
    decoder._chunk = None
    result["profile"] = profile_top(lambda: decoder.decode(f_hat_BCHW), device, top=25)
    return result


def part_g(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """The decoder alone at batch 256: each variant compiled and warmed, then timed in three round-robin
    rounds (so heat and clocks, which moved one variant 982 → 946 images/s between rounds in session 7,
    treat all alike), then profiled. Variants (``--variants`` picks some): the shipped default (the fused
    path, ``fused_norm``), the compiled per-channel-statistics decoder (session 7's default, attention as
    bf16 GEMMs), the session-6 decoder (SDPA attention), and the eager bfloat16 NCHW decoder.
    ``MEDAUG_CUDNN_BENCHMARK_LIMIT`` (main) sets how many cuDNN algorithms ``cudnn.benchmark`` tries per
    shape (torch's default 10; 0: all)."""
    _, vqvae = build_models("d16", device, smoke)
    batch, reps = (256, 5) if not smoke else (4, 1)
    f_hat_BCHW = random_features(vqvae, batch, device)
    flops = decoder_flops(vqvae, f_hat_BCHW[:1])
    result: dict[str, Any] = {"batch": batch, "flops_per_image": flops}
    options = {"eager_bf16_nchw": dict(compile=False, fused_norm=False),
               "compiled_channel_stats": dict(fused_norm=False),
               "compiled_session6": dict(gemm_attention=False, fused_norm=False), "fused_norm": {},
               "fused_no_phase": dict(phase_upsample=False)}
    unknown = (VARIANTS or set()) - set(options)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; expected some of {sorted(options)}")
    options = {name: kwargs for name, kwargs in options.items() if VARIANTS is None or name in VARIANTS}
    decoders: dict[str, FastDecoder] = {}
    for name, kwargs in options.items():
        if left(deadline) < 75:
            result[name] = "skipped: deadline"
            continue
        decoders[name] = FastDecoder(vqvae, **kwargs)
        result[name] = time_decode(lambda d=decoders[name]: d.decode(f_hat_BCHW), device, batch, reps, flops)
        result[name]["rounds_images_per_s"] = [result[name]["images_per_s"]]
        report.put("decoder_alone", result)
    for _ in range(2):
        for name, decoder in decoders.items():
            seconds = timed(lambda d=decoder: d.decode(f_hat_BCHW), device, reps)
            result[name]["rounds_images_per_s"].append(round(batch / seconds, 1))
    for name, decoder in decoders.items():
        result[name]["median_images_per_s"] = statistics.median(result[name]["rounds_images_per_s"])
        if decoder.compiled and left(deadline) > 10:
            result[name]["profile"] = profile_top(lambda d=decoder: d.decode(f_hat_BCHW), device, top=25)
        report.put("decoder_alone", result)
    reference_name = next((name for name in ("compiled_session6", "compiled_channel_stats", "fused_no_phase")
                           if name in decoders), None)
    if reference_name is not None:  # the changes compute the same function: outputs of the same f_hat agree
        result["reference"] = reference_name
        image_ref, logits_ref = decoders[reference_name].decode(f_hat_BCHW[:32])
        with torch.no_grad():
            image_32, logits_32 = vqvae.decode(f_hat_BCHW[:32])  # float32 weights (tf32 convolutions)
        for name, decoder in decoders.items():
            image, logits = decoder.decode(f_hat_BCHW[:32])
            result[name]["image_rel_diff_vs_reference"] = rel(image, image_ref)
            result[name]["label_agreement_vs_reference"] = (logits.argmax(1) == logits_ref.argmax(1)).float().mean().item()
            result[name]["image_rel_diff_vs_float32"] = rel(image, image_32)
            result[name]["label_agreement_vs_float32"] = (logits.argmax(1) == logits_32.argmax(1)).float().mean().item()
    report.put("decoder_alone", result)


def _sweep(module: Any, names: tuple[str, ...], values: list[tuple], function: Callable[[], Any],
           device: torch.device, smoke: bool, deadline: float) -> list[dict[str, Any]]:
    """ms of ``function`` with each tuple of ``values`` set as ``module``'s ``names`` (restored after)."""
    defaults, rows = tuple(getattr(module, name) for name in names), []
    for setting in values:
        if left(deadline) < 20:
            break
        for name, value in zip(names, setting):
            setattr(module, name, value)
        row = dict(zip(names, setting))
        try:
            function()
            sync(device)
            row["ms"] = round(1000 * timed(function, device, 10 if not smoke else 1), 3)
        except Exception as error:  # noqa: BLE001 (a setting the compiler rejects)
            row["ms"] = f"{type(error).__name__}: {str(error)[:120]}"
        rows.append(row)
    for name, value in zip(names, defaults):
        setattr(module, name, value)
    return rows


@torch.no_grad()
def qkv_kernel(device: torch.device, smoke: bool, deadline: float) -> dict[str, Any]:
    """fused_qkv against the compiled normalized_qkv at d16's last scale at batch 256 with guidance (512 rows of
    256 tokens, 16 heads of 64) writing into the sampler's real (>2³¹-element) cache."""
    from medaug.models import fused_sample as fs
    from medaug.models.sampling import ChainedKVCache, normalized_qkv

    config = var_preset("d16", num_domains=DOMAINS, num_structures=STRUCTURES)
    if smoke:
        config = var_preset("tiny", depth=2, width=64, heads=4, patch_sides=(1, 2, 3, 4), codebook_size=64,
                            latent_dim=8, num_domains=DOMAINS, num_structures=STRUCTURES)
    rows, k = (512 if not smoke else 4), config.num_scales - 1
    start, length = config.scale_starts[k], config.tokens_per_scale[k]
    generator = torch.Generator(device=device).manual_seed(5)
    qkv = torch.randn(rows, length, 3 * config.width, generator=generator, device=device).to(torch.bfloat16)
    scale = (torch.rand(1, 1, config.heads, 1, generator=generator, device=device) * 4 + 1)
    dtype = torch.bfloat16
    cache, reference = ChainedKVCache(rows, config, dtype, device), ChainedKVCache(rows if smoke else 8, config, dtype, device)
    compiled = torch.compile(normalized_qkv, dynamic=None)
    result: dict[str, Any] = {"rows": rows, "length": length, "cache_elements": cache.keys_RPHD.numel()}
    q = fs.fused_qkv(qkv, scale, *cache.slots(0, start, length))
    few = slice(0, reference.keys_RPHD.shape[0])
    q_ref = compiled(qkv[few], scale, *reference.slots(0, start, length))
    q_32 = fs.qkv_reference(qkv[few].float(), scale, *[t.float() for t in reference.slots(0, start, length)])
    keys, keys_ref = cache.slots(0, start, length)[0][few], reference.slots(0, start, length)[0]
    result["checks"] = {"q_max_abs_vs_compiled": (q[few] - q_ref).abs().max().item(),
                        "q_max_abs_vs_float32": (q[few].float() - q_32).abs().max().item(),
                        "k_max_abs_vs_compiled": (keys.float() - keys_ref.float()).abs().max().item(),
                        "v_equal": bool(torch.equal(cache.slots(0, start, length)[1][few],
                                                    reference.slots(0, start, length)[1]))}
    moved_gb = qkv.numel() * qkv.element_size() * 2 / 1e9
    cases = {"fused": lambda: fs.fused_qkv(qkv, scale, *cache.slots(0, start, length)),
             "compiled": lambda: compiled(qkv, scale, *cache.slots(0, start, length)),
             "copy_same_bytes": lambda: qkv.clone()}
    for name, function in cases.items():
        function()
        sync(device)
        seconds = timed(function, device, 10 if not smoke else 1)
        result[name] = {"ms": round(1000 * seconds, 3),
                        "tb_per_s": round(moved_gb / seconds / 1000 * (0.5 if name == "copy_same_bytes" else 1), 2)}
    sweep = [(r, w) for r in (16, 32, 64, 128) for w in (2, 4, 8)]
    result["sweep"] = _sweep(fs, ("QKV_ROWS", "QKV_WARPS"), sweep if not smoke else sweep[:2], cases["fused"],
                             device, smoke, deadline)
    return result


@torch.no_grad()
def sampler_fused_kernels(device: torch.device, smoke: bool, deadline: float) -> dict[str, Any]:
    """d16 tokens at batch 256 (CUDA graphs as shipped) with the sampler's Triton kernels on and off, three
    round-robin rounds; how many tokens the two draw alike; the kernel profile with them on."""
    var, vqvae = build_models("d16", device, smoke)
    batch = 256 if not smoke else 4
    samplers = {"fused_kernels": FastSampler(var, vqvae.quantizer, fused_kernels=True),
                "torch_kernels": FastSampler(var, vqvae.quantizer, convert_in_place=True, fused_kernels=False)}
    condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
    result: dict[str, Any] = {"batch": batch}
    tokens = {}
    for name, sampler in samplers.items():
        start = time.perf_counter()
        tokens[name] = run_fast(sampler, None, vqvae.quantizer, condition, seeds)
        sync(device)
        result[name + "_first_call_s"] = round(time.perf_counter() - start, 1)
    first, second = tokens.values()
    result["token_agreement"] = token_agreement(vqvae.quantizer, first, second)
    result["first_scale_agreement"] = (first[0] == second[0]).float().mean().item()
    rounds: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(3):
        for name, sampler in samplers.items():
            seconds = timed(lambda s=sampler: run_fast(s, None, vqvae.quantizer, condition, seeds), device, 3)
            rounds[name].append(round(batch / seconds, 1))
    result["tokens_images_per_s_rounds"] = rounds
    result["tokens_images_per_s_median"] = {name: statistics.median(v) for name, v in rounds.items()}
    sampler = samplers["fused_kernels"]
    decoder, one = FastDecoder(vqvae), conditions(1, device, seed=1)
    indices = run_fast(sampler, None, vqvae.quantizer, one, [1])
    parts = {"tokens": lambda: run_fast(sampler, None, vqvae.quantizer, one, [1]),
             "decode": lambda: decoder.indices_to_img(vqvae.quantizer, indices, one[2]),
             "tokens_and_decode": lambda: run_fast(sampler, decoder, vqvae.quantizer, one, [1])}
    for function in parts.values():
        function()
    result["one_image_ms"] = {name: round(1000 * timed(function, device, 20), 2) for name, function in parts.items()}
    limit, sampler.graph_max_batch = sampler.graph_max_batch, batch - 1
    result["profile_no_graph"] = profile_top(lambda: run_fast(sampler, None, vqvae.quantizer, condition, seeds),
                                             device, top=25)
    sampler.graph_max_batch = limit
    return result


@torch.no_grad()
def part_c(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """Each convolution of the fused decode path at batch 256, timed alone on its real shapes (cuDNN benchmark
    on, as shipped): ms and TFLOP/s per call, to find the ones far under the rate of the rest; then the output
    convolution with its output channels zero-padded to 24..64."""
    from medaug.models import fused_decode as fd

    _, vqvae = build_models("d16", device, smoke)
    decoder = FastDecoder(vqvae)
    batch = 256 if not smoke else 4
    f_hat = random_features(vqvae, 2, device)  # shapes recorded at batch 2: the search at 256 happens below
    calls: list[tuple[str, tuple, torch.Tensor, dict]] = []
    conv2d, conv_transpose2d = fd.F.conv2d, fd.F.conv_transpose2d

    def record(kind, function):
        def wrapped(x, weight, bias=None, *args, **kwargs):
            calls.append((kind, tuple(x.shape), weight, dict(args=args, kwargs=kwargs, bias=bias)))
            return function(x, weight, bias, *args, **kwargs)
        return wrapped

    fd.F.conv2d, fd.F.conv_transpose2d = record("conv", conv2d), record("transposed", conv_transpose2d)
    try:
        decoder.decode(f_hat)
    finally:
        fd.F.conv2d, fd.F.conv_transpose2d = conv2d, conv_transpose2d
    rows, seen = [], {}
    for kind, shape, weight, options in calls:
        key = (kind, shape, tuple(weight.shape))
        if key in seen:
            seen[key]["calls"] += 1
            continue
        shape = (batch, *shape[1:])
        x = torch.randn(shape, device=device, dtype=weight.dtype).contiguous(memory_format=torch.channels_last)
        function = conv2d if kind == "conv" else conv_transpose2d
        run = lambda f=function, x=x, w=weight, o=options: f(x, w, o["bias"], *o["args"], **o["kwargs"])  # noqa: E731
        sync(device)
        start = time.perf_counter()
        out = run()  # the first call at this shape: cuDNN's algorithm search (benchmark on)
        sync(device)
        first_s = time.perf_counter() - start
        seconds = timed(run, device, 5 if not smoke else 1)
        taps = weight.shape[2] * weight.shape[3] if kind == "conv" else weight.shape[2] * weight.shape[3] / 4
        in_channels = weight.shape[1] if kind == "conv" else weight.shape[0]
        flops = 2 * out.numel() * in_channels * taps
        seen[key] = {"kind": kind, "input": list(shape), "weight": list(weight.shape), "calls": 1,
                     "ms": round(1000 * seconds, 3), "tflop_per_s": round(flops / seconds / 1e12, 1),
                     "first_call_s": round(first_s, 3)}
        rows.append(seen[key])
        del x, out
    report.put("convolutions", rows)
    last = max((row for row in rows if row["kind"] == "conv"), key=lambda row: row["input"][2] * (1000 - row["weight"][0]))
    padded = {}
    x = torch.randn(last["input"], device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out_channels, in_channels = last["weight"][:2]
    for channels in sorted({out_channels, 24, 32, 48, 64}):
        if channels < out_channels:
            continue
        weight = torch.randn(channels, in_channels, 3, 3, device=device, dtype=torch.bfloat16)
        weight = weight.contiguous(memory_format=torch.channels_last)
        run = lambda w=weight: conv2d(x, w, None, 1, 1)  # noqa: E731
        run()
        sync(device)
        padded[str(channels)] = round(1000 * timed(run, device, 5 if not smoke else 1), 3)
    report.put("output_conv_padded_ms", {"input": last["input"], "out_channels": out_channels, "ms": padded})


@torch.no_grad()
def part_o(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """One d16 image (and chunks of 3 and 8), where the small-batch decode is bound by kernel launches: tokens,
    then decode (and tokens + decode) with the shipped decoder (compiled plain path under 32 images, replayed
    from a CUDA graph for one or two images) and without its graph (``small_graph=False``; session 9 measured
    the fused path from one image, ``channel_stats_min_batch=1``, at 46 ms), 20 calls each, and how far the two
    decoders' outputs are apart (the graph replays the same kernels: equal)."""
    var, vqvae = build_models("d16", device, smoke)
    quantizer = vqvae.quantizer
    sampler = FastSampler(var, quantizer, convert_in_place=True)
    decoders = {"shipped": FastDecoder(vqvae), "no_graph": FastDecoder(vqvae, small_graph=False)}
    result: dict[str, Any] = {}
    for batch in (1, 3, 8) if not smoke else (1, 3):
        if left(deadline) < 30:
            break
        condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
        indices = run_fast(sampler, None, quantizer, condition, seeds)
        functions = {"tokens": lambda c=condition, s=seeds: run_fast(sampler, None, quantizer, c, s)}
        for name, decoder in decoders.items():
            functions[f"decode_{name}"] = lambda d=decoder, c=condition, i=indices: d.indices_to_img(quantizer, i, c[2])
            functions[f"tokens_and_decode_{name}"] = lambda d=decoder, c=condition, s=seeds: run_fast(sampler, d,
                                                                                                     quantizer, c, s)
        row: dict[str, Any] = {}
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            sync(device)
            row[name + "_first_s"] = round(time.perf_counter() - start, 2)
            function()
            row[name + "_ms"] = round(1000 * timed(function, device, 20 if not smoke else 2), 2)
        (image_a, label_a), (image_b, label_b) = (functions[f"decode_{name}"]() for name in decoders)
        row["image_rel_diff"] = rel(image_b, image_a)
        row["label_agreement"] = (label_a == label_b).float().mean().item()
        row["equal"] = bool(torch.equal(image_a, image_b) and torch.equal(label_a, label_b))
        result[f"batch_{batch}"] = row
        report.put("small_batches", result)


def timeline(function: Callable[[], Any], device: torch.device, gaps: int = 12) -> dict[str, Any]:
    """One call of ``function`` under torch.profiler: the device span (first kernel start to last kernel
    end), the time some kernel runs (union of kernel intervals), and the largest idle gaps with the
    kernels on either side, to tell launch or host stalls from slow kernels."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    function()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        sync(device)
    kernels = sorted((event.time_range.start, event.time_range.end, event.name[:60]) for event in prof.events()
                     if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > 0)
    if not kernels:
        return {"error": "no device events"}
    busy, end, holes = 0.0, kernels[0][0], []
    for (start, stop, name), previous in zip(kernels, [None] + kernels[:-1]):
        if start > end:
            holes.append((start - end, previous[2] if previous else "", name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    holes.sort(reverse=True)
    return {"span_ms": round((end - kernels[0][0]) / 1000, 2), "busy_ms": round(busy / 1000, 2),
            "kernels": len(kernels), "idle_ms": round(sum(h[0] for h in holes) / 1000, 2),
            "largest_gaps": [{"us": round(h[0], 1), "after": h[1], "before": h[2]} for h in holes[:gaps]]}


def graphed(function: Callable[[torch.Tensor], Any], example: torch.Tensor) -> Callable[[], Any]:
    """``function(example)`` captured once in a CUDA graph (warmed on a side stream): a replay."""
    static = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            function(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function(static)
    return graph.replay


@torch.no_grad()
def part_t(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """The fused decoder at batch 256: wall time per call against its kernels' busy time (timeline: are
    there idle gaps on the device?), the same decode replayed from a CUDA graph, and the folded
    upsamples' transposed convolutions against their phase form (one 2×2 conv with four times the output
    channels on the 1-padded input, whose four shifted sub-grids interleave into the upsampled map)."""
    _, vqvae = build_models("d16", device, smoke)
    batch, reps = (256, 5) if not smoke else (4, 1)
    decoder = FastDecoder(vqvae)
    f_hat_BCHW = random_features(vqvae, batch, device)
    flops = decoder_flops(vqvae, f_hat_BCHW[:1])
    result: dict[str, Any] = {"batch": batch}
    result["eager"] = time_decode(lambda: decoder.decode(f_hat_BCHW), device, batch, reps, flops)
    guarded(report, "decoder_timeline", lambda: timeline(lambda: decoder.decode(f_hat_BCHW), device))
    if device.type == "cuda":
        free_memory(device)
        before = torch.cuda.memory_allocated(device)
        try:
            replay = graphed(lambda x: decoder.decode(x), f_hat_BCHW)
            result["graph"] = time_decode(replay, device, batch, reps, flops)
            result["graph"]["pool_gb"] = round((torch.cuda.memory_allocated(device) - before) / 1e9, 1)
            rounds = {"eager": [], "graph": []}
            for _ in range(3):
                rounds["eager"].append(round(batch / timed(lambda: decoder.decode(f_hat_BCHW), device, reps), 1))
                rounds["graph"].append(round(batch / timed(replay, device, reps), 1))
            result["rounds_images_per_s"] = rounds
            del replay
        except Exception as error:  # noqa: BLE001
            result["graph"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        free_memory(device)
    report.put("decoder_graph", result)
    guarded(report, "upsample_phase_conv", lambda: upsample_phase_conv(vqvae, decoder, device, batch, smoke))


@torch.no_grad()
def upsample_phase_conv(vqvae: VQVAE, decoder: FastDecoder, device: torch.device, batch: int,
                        smoke: bool) -> list[dict[str, Any]]:
    """Each folded upsample's stride-2 transposed 4×4 conv (as the decoder runs it) against the phase form
    of the same function (ms each, the interleave as a torch copy for scale, and the max difference)."""
    from medaug.models.vqvae import FoldedUpsample, Upsample

    rows = []
    upsamples = [module for module in vqvae.decoder.modules() if isinstance(module, Upsample)]
    path = decoder.fused_path if decoder.fused_path is not None else decoder.path
    folds = [module for module in path.modules() if isinstance(module, FoldedUpsample)]
    folds = folds or [FoldedUpsample(module).to(torch.bfloat16) for module in upsamples]  # unfolded (CPU)
    for level, (module, folded) in enumerate(zip(upsamples, folds)):  # from the latent side up: each doubles it
        conv = module.conv
        channels, side = conv.in_channels, vqvae.config.latent_side * 2 ** level
        x = torch.randn(batch, channels, side, side, device=device, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        w = conv.weight.float()
        # output row 2m + p reads input rows m - 1 + p and m + p, i.e. padded rows s, s + 1 with s = m + p:
        # phase 0 weighs them (tap 0; taps 1 + 2), phase 1 (taps 0 + 1; tap 2); likewise for columns
        taps = (torch.tensor(((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), device=device),
                torch.tensor(((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)), device=device))
        phases = [torch.einsum("ay,bx,oiyx->oiab", taps[py], taps[px], w) for py in range(2) for px in range(2)]
        weight = torch.cat(phases).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def phase_form(x=x, weight=weight):
            return F.conv2d(x, weight, None, 1, 1)  # (B, 4·C, side + 1, side + 1)

        def interleave(y, out_channels=conv.out_channels, side=side):
            b = y.shape[0]
            parts = y.view(b, 2, 2, out_channels, side + 1, side + 1)
            out = torch.empty(b, out_channels, 2 * side, 2 * side, device=y.device, dtype=y.dtype,
                              memory_format=torch.channels_last)
            for py in range(2):
                for px in range(2):
                    out[:, :, py::2, px::2] = parts[:, py, px, :, py:py + side, px:px + side]
            return out

        transposed = lambda x=x, folded=folded: F.conv_transpose2d(x, folded.weight, None, stride=2, padding=1)  # noqa: E731
        reference = transposed()
        phased = interleave(phase_form())
        sync(device)
        row = {"side": side, "channels": channels,
               "max_abs_diff": float((phased.float() - reference.float()).abs().max()),
               "reference_abs_max": float(reference.float().abs().max())}
        for name, function in (("transposed_ms", transposed), ("phase_conv_ms", phase_form),
                               ("interleave_copy_ms", lambda y=phase_form(): interleave(y))):
            function()
            sync(device)
            row[name] = round(1000 * timed(function, device, 5 if not smoke else 1), 3)
        rows.append(row)
        del x, reference, phased
    return rows


@torch.no_grad()
def part_r(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """Decoder chunks of many sizes, as a run's redraw batches come: the first and a warm call at each size
    with the fused path's rows padded to a multiple of 32 (the default) and without (other sizes, since cuDNN's
    per-shape algorithm cache is shared by the process)."""
    _, vqvae = build_models("d16", device, smoke)
    f_hat_BCHW = random_features(vqvae, 256 if not smoke else 40, device)
    sizes = {"padded": (161, 167, 173, 179, 185, 191), "unpadded": (162, 168, 174, 180, 186, 190)}
    if smoke:
        sizes = {"padded": (33, 35), "unpadded": (34, 36)}
    result: dict[str, Any] = {}
    for name, padded in (("padded", True), ("unpadded", False)):
        decoder = FastDecoder(vqvae, padded_rows=padded)
        decoder.decode(f_hat_BCHW[:64])  # Triton kernels compiled, outside the timings
        sync(device)
        rows = []
        for size in sizes[name]:
            start = time.perf_counter()
            decoder.decode(f_hat_BCHW[:size])
            sync(device)
            first = time.perf_counter() - start
            rows.append({"size": size, "first_s": round(first, 3),
                         "warm_ms": round(1000 * timed(lambda n=size: decoder.decode(f_hat_BCHW[:n]), device, 3), 1)})
        result[name] = {"sizes": rows, "first_calls_s": round(sum(row["first_s"] for row in rows), 2)}
        report.put("redraw_sizes", result)
        del decoder
        free_memory(device)


def part_q(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """The sampler's Triton kernel (medaug.models.fused_sample) alone against the compiled function it
    replaces, with checks and a launch-setting sweep, then d16 tokens at batch 256 with it on and off and one
    image's time by part."""
    guarded(report, "qkv_kernel", lambda: qkv_kernel(device, smoke, deadline))
    if left(deadline) > 60:
        guarded(report, "sampler_fused_kernels", lambda: sampler_fused_kernels(device, smoke, deadline))


@torch.no_grad()
def part_k(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """The fused decoder's kernels alone on one 256² level activation of 256 images (B, 160, 256, 256) bf16
    channels-last: ms and bytes moved per second against a plain copy (the bandwidth ceiling) and against
    the same work compiled by inductor, then a sweep of tile and launch settings; each kernel checked
    against its float32 torch reference first."""
    from medaug.models import fused_decode as fd
    from medaug.models.vqvae import ChannelStatsGroupNorm

    batch, channels, side = (256, 160, 256) if not smoke else (2, 32, 16)
    generator = torch.Generator(device=device).manual_seed(4)
    shape = (batch, channels, side, side)
    x = torch.randn(shape, generator=generator, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    h = torch.randn(shape, generator=generator, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, generator=generator, device=device)
    scale = torch.rand(batch, channels, generator=generator, device=device) + 0.5
    shift = torch.randn(batch, channels, generator=generator, device=device)
    tensor_gb = x.numel() * x.element_size() / 1e9
    norm = torch.nn.GroupNorm(32, channels, eps=1e-6).to(device)
    result: dict[str, Any] = {"shape": list(shape), "tensor_gb": round(tensor_gb, 3)}
    checks = {}
    small = (slice(0, 4),)
    _, mean, m2 = fd.channel_moments(x[small], h[small], bias, write=False)
    _, mean_ref, m2_ref = fd.moments_reference(x[small], h[small], bias, False, mean.shape[1])
    checks["moments_mean_rel"], checks["moments_m2_rel"] = rel(mean, mean_ref), rel(m2, m2_ref)
    out, _, _ = fd.channel_moments(x[small], h[small], bias, write=True)
    out_ref, _, _ = fd.moments_reference(x[small], h[small], bias, True, mean.shape[1])
    checks["add_rel"] = rel(out, out_ref)
    act = fd.scale_shift_act(x[small], scale[small], shift[small])
    checks["scale_shift_silu_rel"] = rel(act, fd.scale_shift_act_reference(x[small], scale[small], shift[small], True))
    result["checks"] = checks
    report.put("kernels", result)

    def gn_silu(t):
        return F.silu(ChannelStatsGroupNorm(norm)(t))

    compiled_gn = torch.compile(gn_silu)
    compiled_add_stats = torch.compile(lambda a, b: torch.var_mean((a + b + bias[:, None, None]).float(), dim=(2, 3)))
    cases = {
        "copy": (lambda: x.clone(memory_format=torch.channels_last), 2),
        "moments": (lambda: fd.channel_moments(x, None, bias), 1),
        "add_moments_write": (lambda: fd.channel_moments(x, h, bias, write=True), 3),
        "scale_shift_silu": (lambda: fd.scale_shift_act(x, scale, shift), 2),
        "inductor_groupnorm_silu": (lambda: compiled_gn(x), 3),
        "inductor_add_var_mean": (lambda: compiled_add_stats(x, h), 2),
    }
    for name, (function, passes) in cases.items():
        if left(deadline) < 30:
            break
        function()
        sync(device)
        seconds = timed(function, device, 10 if not smoke else 1)
        result[name] = {"ms": round(1000 * seconds, 3), "tb_per_s": round(passes * tensor_gb / seconds / 1000, 2)}
        report.put("kernels", result)
    sweep = []
    defaults = (fd.MOMENTS, fd.ADD_MOMENTS, fd.SCALE_SHIFT, fd.FUSED_PROGRAMS)
    configs = [(128, 4, 1, 65536), (128, 4, 3, 65536), (256, 8, 1, 65536), (256, 8, 3, 65536), (128, 4, 2, 65536),
               (256, 4, 1, 65536), (128, 4, 1, 32768), (256, 8, 1, 131072)]
    for block, warps, stages, programs in configs if not smoke else configs[:2]:
        if left(deadline) < 20:
            break
        fd.MOMENTS = fd.ADD_MOMENTS = fd.SCALE_SHIFT = fd.KernelSettings(block, warps, stages)
        fd.FUSED_PROGRAMS = programs
        row = {"block_pixels": block, "warps": warps, "stages": stages, "programs": programs}
        for name, passes in (("moments", 1), ("add_moments_write", 3), ("scale_shift_silu", 2)):
            function = cases[name][0]
            try:
                function()
                sync(device)
                row[name + "_ms"] = round(1000 * timed(function, device, 10 if not smoke else 1), 3)
            except Exception as error:  # noqa: BLE001 (a setting the compiler rejects)
                row[name + "_ms"] = f"{type(error).__name__}: {str(error)[:120]}"
        sweep.append(row)
        result["sweep"] = sweep
        report.put("kernels", result)
    fd.MOMENTS, fd.ADD_MOMENTS, fd.SCALE_SHIFT, fd.FUSED_PROGRAMS = defaults


def part_p(report: Report, device: torch.device, smoke: bool, deadline: float) -> None:
    """Kernel profiles only (what to speed up next): d16 tokens at batch 256 and the decoder at batch 256."""
    var, vqvae = build_models("d16", device, smoke)
    batch = 256 if not smoke else 4
    sampler = FastSampler(var, vqvae.quantizer, convert_in_place=True)
    condition, seeds = conditions(batch, device, seed=batch), list(range(batch))
    run_fast(sampler, None, vqvae.quantizer, condition, seeds)  # compile and warm up
    sync(device)
    guarded(report, "profile_tokens_d16_256",
            lambda: profile_top(lambda: run_fast(sampler, None, vqvae.quantizer, condition, seeds), device, top=25))
    decoder = FastDecoder(vqvae)
    indices = run_fast(sampler, None, vqvae.quantizer, condition, seeds)
    f_hat_BCHW = vqvae.quantizer.indices_to_features(indices)
    decoder.decode(f_hat_BCHW)
    sync(device)
    guarded(report, "profile_decoder_256", lambda: profile_top(lambda: decoder.decode(f_hat_BCHW), device, top=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "s", "p", "f", "d", "g", "k", "q", "c", "o", "t", "r"), required=True,
                        help="a: d16, b: d30, "
                        "s: streamed d16 and the max-autotune decoder, p: kernel profiles of d16 tokens and the decoder, "
                        "f: the shipped defaults, d16 then d30 (part_f), d: decoder by batch size, then d16 and d30 "
                        "(part_d), g: decoder variants in three rounds each (part_g), k: the fused decoder's kernels (part_k), q: the sampler's kernels (part_q), c: the decoder's convolutions one by one (part_c), o: one image and small chunks, shipped "
                        "decoder against the fused path from one image (part_o), t: the decoder's device timeline, a CUDA graph of it, "
                        "and the upsamples' phase form (part_t), r: decoder chunks of many sizes, rows padded or not (part_r)")
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script on the CPU)")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="skip what would not finish by then")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--variants", default=None, help="part g: comma-separated decoder variants (default all)")
    args = parser.parse_args()
    global VARIANTS
    VARIANTS = set(args.variants.split(",")) if args.variants else None
    if os.environ.get("MEDAUG_CUDNN_BENCHMARK_LIMIT"):
        torch.backends.cudnn.benchmark_limit = int(os.environ["MEDAUG_CUDNN_BENCHMARK_LIMIT"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    report = Report(args.json_out, device, benchmark="sample", part=args.part,
                    weights="random (VAR init, random tokenizer)",
                    settings=SETTINGS, machine=common.machine(gpu=gpu, torch=torch.__version__,
                                                              python=platform.python_version()),
                    commit=os.environ.get("MEDAUG_COMMIT") or common.commit()["commit"])
    report.put("cudnn_benchmark_limit", torch.backends.cudnn.benchmark_limit)
    {"a": part_a, "b": part_b, "s": part_s, "p": part_p, "f": part_f, "d": part_d,
     "g": part_g, "k": part_k, "q": part_q, "c": part_c, "o": part_o, "t": part_t, "r": part_r}[args.part](report, device, args.smoke, args.deadline_s)
    report.put("wall_s", round(time.perf_counter() - START, 1))


if __name__ == "__main__":
    main()
