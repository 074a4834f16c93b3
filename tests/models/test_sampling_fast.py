"""Fast sampler and decoder (issue 9): same tokens as the basic sampler in float32 on the CPU, the chained
KV cache against plain attention, the compiled functions against eager ones, the fast decode path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig
from medaug.models.sampling import (
    ChainedKVCache,
    FastSampler,
    generators_from_seeds,
    guidance_ramp,
    normalized_qkv,
    sample_memory_bytes,
    sample_tokens,
)
from medaug.models.var import var_preset
from medaug.models.vqvae import VQVAE, FastDecoder, VQVAEConfig, logits_to_label

from tests.models.test_sampling import SIDES, STRUCTURES, _conditions, _config, _model_and_quantizer  # noqa: F401


# ---------------------------------------------------------------- same tokens as the basic sampler
@pytest.mark.parametrize(
    ("cfg", "top_k", "top_p", "temperature", "shared"),
    [(1.5, 20, 0.9, 1.0, False), (0.0, 0, 1.0, 1.3, False), (3.0, 5, 0.5, 0.7, False), (1.5, 12, 0.96, 1.0, True)],
    ids=["cfg1.5-k20-p0.9", "cfg0-all-T1.3", "cfg3-k5-p0.5-T0.7", "shared-adaln"],
)
def test_fast_sampler_draws_the_basic_samplers_tokens_in_float32(cfg, top_k, top_p, temperature, shared):
    model, quantizer = _model_and_quantizer(_config(shared_adaln=shared), seed=1)
    condition = _conditions(6, seed=2)
    settings = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    seeds = [5, 6, 7, 8, 9, 10]
    basic = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds(seeds), **settings)
    sampler = FastSampler(model, quantizer)
    assert sampler.dtype == torch.float32 and not sampler.compiled and not sampler.cuda_graphs
    fast = sampler.sample_tokens(*condition, generators=generators_from_seeds(seeds), **settings)
    chunked = sampler.sample_tokens(*condition, generators=generators_from_seeds(seeds), max_batch=4, **settings)
    for k, side in enumerate(SIDES):
        assert fast[k].shape == (6, side, side) and fast[k].dtype == torch.int64
        assert torch.equal(fast[k], basic[k]), f"scale {k}"
        assert torch.equal(chunked[k], basic[k]), f"scale {k} (chunks of 4)"


def test_fast_sampler_logits_equal_guided_teacher_forced_logits():
    config = _config()
    model, quantizer = _model_and_quantizer(config, seed=3)
    condition = _conditions(3, seed=4)
    indices = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([1, 2, 3]))
    cfg = 2.0
    with torch.no_grad():
        x_BLC = quantizer.indices_to_teacher_inputs(indices)
        cond_BLV = model(x_BLC, *condition, torch.zeros(3, dtype=torch.bool))
        uncond_BLV = model(x_BLC, *condition, torch.ones(3, dtype=torch.bool))
    per_scale = FastSampler(model, quantizer).guided_scale_logits(indices, *condition, cfg=cfg)
    for k, (start, t) in enumerate(zip(config.scale_starts, guidance_ramp(cfg, len(SIDES)))):
        end = start + config.tokens_per_scale[k]
        expected_BlV = (1 + t) * cond_BLV[:, start:end] - t * uncond_BLV[:, start:end]
        torch.testing.assert_close(per_scale[k], expected_BlV, rtol=0, atol=1e-4, msg=f"scale {k}")


def test_no_unconditional_stream_without_guidance():
    model, quantizer = _model_and_quantizer(_config())
    sampler = FastSampler(model, quantizer)
    assert sampler.settings(1.5, 900, 0.96, 1.0).guided
    assert not sampler.settings(0.0, 900, 0.96, 1.0).guided
    single, single_quantizer = _model_and_quantizer(_config(patch_sides=(4,)))
    assert not FastSampler(single, single_quantizer).settings(3.0, 0, 1.0, 1.0).guided  # K = 1: t_0 = 0
    d16 = var_preset("d16")
    extra = sample_memory_bytes(d16, guided=True, top_k=900) - sample_memory_bytes(d16, guided=False, top_k=900)
    assert extra >= ChainedKVCache.bytes_per_row(d16, 2)  # the null stream's cache is not allocated


def test_fast_sampler_checks_its_arguments():
    model, quantizer = _model_and_quantizer(_config())
    sampler = FastSampler(model, quantizer)
    condition = _conditions(2)
    with pytest.raises(ValueError, match="one per sample"):
        sampler.sample_tokens(*condition, generators=generators_from_seeds([1]))
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample_tokens(*condition, generators=generators_from_seeds([1, 2]), top_p=0.0)


def test_bfloat16_weights_are_a_copy_unless_converted_in_place():
    model, quantizer = _model_and_quantizer(_config())
    sampler = FastSampler(model, quantizer, dtype=torch.bfloat16)
    assert sampler.var is not model and model.head.weight.dtype == torch.float32
    assert sampler.var.head.weight.dtype == torch.bfloat16
    tokens = sampler.sample_tokens(*_conditions(2), generators=generators_from_seeds([1, 2]))
    assert [tuple(t.shape) for t in tokens] == [(2, side, side) for side in SIDES]
    assert all(0 <= int(t.min()) and int(t.max()) < 32 for t in tokens)
    FastSampler(model, quantizer, dtype=torch.bfloat16, convert_in_place=True)
    assert model.head.weight.dtype == torch.bfloat16


def test_compiled_functions_match_eager_ones():
    """The torch.compile path (inductor on the CPU here; Triton on CUDA) with dynamic rows and lengths."""
    model, quantizer = _model_and_quantizer(_config(), seed=5)
    eager, compiled = FastSampler(model, quantizer), FastSampler(model, quantizer, compile=True)
    for batch in (3, 5):
        condition = _conditions(batch, seed=batch)
        indices = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds(range(batch)))
        expected = eager.guided_scale_logits(indices, *condition, cfg=1.5)
        for k, logits_BlV in enumerate(compiled.guided_scale_logits(indices, *condition, cfg=1.5)):
            torch.testing.assert_close(logits_BlV, expected[k], rtol=1e-5, atol=1e-5, msg=f"scale {k}")


# ---------------------------------------------------------------- the chained cache
def test_chained_kv_cache_attends_like_concatenated_keys():
    config = _config(depth=3, patch_sides=(1, 2, 3))
    rows, heads, dim = 2, config.heads, config.head_dim
    cache = ChainedKVCache(rows, config, torch.float32, torch.device("cpu"))
    assert cache.keys_RPHD.shape == (rows, 3 * (1 + 4) + 9, heads, dim)
    generator = torch.Generator().manual_seed(0)
    history = [([], []) for _ in range(config.depth)]
    for k, count in enumerate(config.tokens_per_scale):  # scale by scale, blocks in order, as the sampler
        for block in range(config.depth):
            q, key, value = (torch.randn(rows, heads, count, dim, generator=generator) for _ in range(3))
            history[block][0].append(key)
            history[block][1].append(value)
            keys_RlHD, values_RlHD = cache.slots(block, config.scale_starts[k], count)
            keys_RlHD.copy_(key.transpose(1, 2))
            values_RlHD.copy_(value.transpose(1, 2))
            out = cache.attend(block, config.scale_starts[k] + count, q)
            keys, values = torch.cat(history[block][0], dim=2), torch.cat(history[block][1], dim=2)
            weights = torch.softmax(q @ keys.transpose(-1, -2), dim=-1)  # softmax scale 1
            torch.testing.assert_close(out, weights @ values, rtol=1e-5, atol=1e-5, msg=f"scale {k} block {block}")


def test_normalized_qkv_writes_unit_keys_and_values_into_cache_slots():
    rows, length, heads, dim = 2, 3, 4, 8
    generator = torch.Generator().manual_seed(1)
    qkv_RlE = torch.randn(rows, length, 3 * heads * dim, generator=generator)
    scale_11H1 = torch.rand(1, 1, heads, 1, generator=generator) + 1.0
    keys_RPHD, values_RPHD = torch.full((2, rows, 7, heads, dim), float("nan")).unbind(0)
    q_RHlD = normalized_qkv(qkv_RlE, scale_11H1, keys_RPHD[:, 2:5], values_RPHD[:, 2:5])
    q_ref, k_ref, v_ref = qkv_RlE.view(rows, length, 3, heads, dim).unbind(2)  # each (R, l, H, D)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(q_RHlD, (unit(q_ref) * scale_11H1).transpose(1, 2))
    torch.testing.assert_close(keys_RPHD[:, 2:5], unit(k_ref))
    assert torch.equal(values_RPHD[:, 2:5], v_ref)
    assert keys_RPHD[:, [0, 1, 5, 6]].isnan().all() and values_RPHD[:, [0, 1, 5, 6]].isnan().all()


def test_memory_estimate_counts_the_cache_of_both_streams():
    config = var_preset("d16")
    cache_per_sample = 2 * 2 * 1024 * (16 * 424 + 256) * 2  # rows × (k, v) × C × positions × bf16
    assert ChainedKVCache.bytes_per_row(config, 2) * 2 == cache_per_sample
    assert cache_per_sample < sample_memory_bytes(config, guided=True, top_k=900) < 3 * cache_per_sample


# ---------------------------------------------------------------- the fast decoder
def _vqvae() -> VQVAE:
    torch.manual_seed(5)
    config = VQVAEConfig(
        image_size=64, image_channels=2, num_structures=STRUCTURES, base_channels=16, encoder_res_blocks=1,
        decoder_res_blocks=1, quantizer=QuantizerConfig(codebook_size=32, latent_dim=8, patch_sides=SIDES),
    )
    return VQVAE(config).eval()


def test_fast_decoder_in_float32_is_the_decode_path():
    vqvae = _vqvae()
    f_hat_BCHW = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_ref, logits_ref = vqvae.decode(f_hat_BCHW)
    image_BCHW, logits_BKHW = FastDecoder(vqvae, compile=False, channels_last=False).decode(f_hat_BCHW)
    assert torch.equal(image_BCHW, image_ref) and torch.equal(logits_BKHW, logits_ref)
    # chunks of 2 + 1 (convolution kernels may round differently per batch size)
    image_ch, logits_ch = FastDecoder(vqvae, compile=False, channels_last=False, max_chunk=2).decode(f_hat_BCHW)
    torch.testing.assert_close(image_ch, image_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_ch, logits_ref, rtol=1e-5, atol=1e-5)
    image_cl, logits_cl = FastDecoder(vqvae, compile=False, channels_last=True).decode(f_hat_BCHW)
    torch.testing.assert_close(image_cl, image_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_cl, logits_ref, rtol=1e-4, atol=1e-4)
    image_bf, _ = FastDecoder(vqvae, dtype=torch.bfloat16, compile=False).decode(f_hat_BCHW)
    assert image_bf.dtype == torch.float32
    assert (image_bf - image_ref).norm() / image_ref.norm() < 3e-2


def test_fast_decoder_indices_to_img_matches_vqvae():
    vqvae = _vqvae()
    generator = torch.Generator().manual_seed(2)
    indices = [torch.randint(32, (2, side, side), generator=generator) for side in SIDES]
    image_ref, label_ref = vqvae.indices_to_img(indices)
    image_BCHW, label_BHW = FastDecoder(vqvae, compile=False, channels_last=False).indices_to_img(vqvae.quantizer,
                                                                                                   indices)
    assert torch.equal(image_BCHW, image_ref) and torch.equal(label_BHW, label_ref)


def test_label_is_restricted_to_annotated_structures():
    logits_BKHW = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 1.0, 5.0, 2.0]])[:, :, None, None].repeat(1, 1, 2, 2)
    annotated_BS = torch.tensor([[True, False, True], [False, False, False]])
    label_BHW = logits_to_label(logits_BKHW, annotated_BS)
    # row 0: structure 2 (logit 5) is not annotated; of background, 1 and 3 the best is 3 (logit 2)
    assert label_BHW[0].unique().tolist() == [3] and label_BHW[1].unique().tolist() == [0]
    assert logits_to_label(logits_BKHW).unique().tolist() == [2]
    assert torch.equal(logits_to_label(logits_BKHW, annotated_BS.float()), label_BHW)


def test_attention_of_the_decoder_runs_on_channels_last_inputs():
    vqvae = _vqvae()
    attention = next(m for m in vqvae.decoder.modules() if m.__class__.__name__ == "SelfAttention")
    x_BCHW = torch.randn(2, attention.qkv.in_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = attention(x_BCHW)
        out = attention(x_BCHW.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    qkv = attention.qkv(attention.norm(x_BCHW)).view(2, 3, -1, 16).transpose(2, 3)
    attended = F.scaled_dot_product_attention(*qkv.unbind(1)).transpose(1, 2).reshape(2, -1, 4, 4)
    reference = x_BCHW + attention.proj(attended)
    torch.testing.assert_close(expected, reference, rtol=1e-5, atol=1e-5)


def test_folded_upsample_is_nearest_upsample_then_conv():
    from medaug.models.vqvae import FoldedUpsample, Upsample

    torch.manual_seed(6)
    upsample = Upsample(5)
    folded = FoldedUpsample(upsample)
    for height, width in ((1, 1), (3, 4), (6, 5)):  # borders of every parity
        x_BCHW = torch.randn(2, 5, height, width)
        with torch.no_grad():
            expected = F.conv2d(x_BCHW.repeat_interleave(2, 2).repeat_interleave(2, 3), upsample.conv.weight,
                                upsample.conv.bias, padding=1)
            out = folded(x_BCHW)
        assert out.shape == (2, 5, 2 * height, 2 * width)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fast_decoder_with_folded_upsamples_matches_decode():
    vqvae = _vqvae()
    f_hat_BCHW = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        image_ref, logits_ref = vqvae.decode(f_hat_BCHW)
    decoder = FastDecoder(vqvae, compile=False, channels_last=True, fold_upsample=True)
    assert sum(m.__class__.__name__ == "FoldedUpsample" for m in decoder.path.modules()) == 4
    image_BCHW, logits_BKHW = decoder.decode(f_hat_BCHW)
    torch.testing.assert_close(image_BCHW, image_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_BKHW, logits_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_gemm_attention_is_self_attention(channels_last):
    from medaug.models.vqvae import GemmSelfAttention, SelfAttention

    torch.manual_seed(12)
    attention = SelfAttention(16, 4).eval()
    x_BCHW = torch.randn(3, 16, 5, 4)
    # independent reference: softmax(q kᵀ / √C) v by einsum, in float64
    x64 = x_BCHW.double()
    h64 = F.group_norm(x64, 4, attention.norm.weight.double(), attention.norm.bias.double(), eps=attention.norm.eps)
    qkv = torch.einsum("oc,bchw->bohw", attention.qkv.weight.double()[:, :, 0, 0], h64)
    qkv = qkv + attention.qkv.bias.double()[None, :, None, None]
    q, k, v = (t.flatten(2) for t in qkv.chunk(3, dim=1))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / 16**0.5, dim=-1)
    attended = torch.einsum("bnm,bcm->bcn", weights, v).reshape(3, 16, 5, 4)
    proj = torch.einsum("oc,bchw->bohw", attention.proj.weight.double()[:, :, 0, 0], attended)
    expected = x64 + proj + attention.proj.bias.double()[None, :, None, None]
    gemm = GemmSelfAttention(attention).eval()
    if channels_last:
        x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = gemm(x_BCHW)
        out_bf16 = GemmSelfAttention(copy.deepcopy(attention).to(torch.bfloat16))(x_BCHW.to(torch.bfloat16))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out_bf16.double() - expected).norm() / expected.norm() < 2e-2


def test_fast_decoder_with_gemm_attention_matches_decode():
    vqvae, f_hat_BCHW, image_ref, logits_ref = _decode_reference(2, seed=13)
    decoder = FastDecoder(vqvae, compile=False, channels_last=True, channel_stats_norm=True, channel_stats_min_batch=2)
    assert sum(m.__class__.__name__ == "GemmSelfAttention" for m in decoder.stats_path.modules()) == \
        sum(m.__class__.__name__ == "SelfAttention" for m in vqvae.decoder.modules()) > 0
    image_BCHW, logits_BKHW = decoder.decode(f_hat_BCHW)
    torch.testing.assert_close(image_BCHW, image_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_BKHW, logits_ref, rtol=1e-4, atol=1e-4)


def test_gemm_attention_runs_on_the_large_batch_path_only():
    vqvae = _vqvae()

    def gemm_paths(decoder: FastDecoder) -> list[bool]:
        paths = [decoder.path] + ([decoder.stats_path] if decoder.stats_path is not None else [])
        return [any(m.__class__.__name__ == "GemmSelfAttention" for m in path.modules()) for path in paths]

    assert gemm_paths(FastDecoder(vqvae, compile=False, channel_stats_norm=True)) == [False, True]
    assert gemm_paths(FastDecoder(vqvae, compile=False, channel_stats_norm=True, gemm_attention=False)) == [False, False]
    assert gemm_paths(FastDecoder(vqvae, compile=False)) == [False]


def test_code_upsampler_is_the_quantizers_bicubic_path():
    from medaug.models.vqvae import CodeUpsampler

    torch.manual_seed(8)
    quantizer = MultiScaleQuantizer(QuantizerConfig(codebook_size=64, latent_dim=8, patch_sides=(1, 2, 3, 5, 8)))
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    upsampler = CodeUpsampler(quantizer, "cpu")
    generator = torch.Generator().manual_seed(9)
    indices = [torch.randint(64, (3, side, side), generator=generator) for side in quantizer.patch_sides]
    with torch.no_grad():
        for k, indices_Bpp in enumerate(indices):
            torch.testing.assert_close(upsampler.contribution(indices_Bpp, k),
                                       quantizer.scale_contribution(indices_Bpp, k), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(upsampler.features(indices), quantizer.indices_to_features(indices),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("channels_last", "row_bands"), [(False, 1), (True, 1), (True, 5), (True, 2)],
                         ids=["nchw", "channels-last", "channels-last-5-bands", "2-bands-fall-back-to-1"])
def test_channel_stats_group_norm_is_group_norm(channels_last, row_bands):
    from medaug.models.vqvae import ChannelStatsGroupNorm

    generator = torch.Generator().manual_seed(10)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=generator))
        norm.bias.copy_(torch.randn(12, generator=generator))
    # per-channel offsets and spreads, so group statistics differ from any channel's
    x_BCHW = torch.randn(3, 12, 5, 7, generator=generator) * torch.rand(1, 12, 1, 1, generator=generator) * 4
    x_BCHW = x_BCHW + torch.randn(1, 12, 1, 1, generator=generator) * 3
    if channels_last:
        x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ChannelStatsGroupNorm(norm, row_bands)(x_BCHW)
        expected = F.group_norm(x_BCHW.double(), 4, norm.weight.double(), norm.bias.double(), eps=1e-6)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def _decode_reference(rows: int, seed: int) -> tuple[VQVAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny VQVAE, random f_hat (rows, 8, 4, 4) and its ``VQVAE.decode`` (image, logits)."""
    vqvae = _vqvae()
    f_hat_BCHW = torch.randn(rows, 8, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        image_ref, logits_ref = vqvae.decode(f_hat_BCHW)
    return vqvae, f_hat_BCHW, image_ref, logits_ref


def test_fast_decoder_with_channel_stats_norms_matches_decode():
    vqvae, f_hat_BCHW, image_ref, logits_ref = _decode_reference(2, seed=11)
    decoder = FastDecoder(vqvae, compile=False, channels_last=True, channel_stats_norm=True, channel_stats_min_batch=2)
    norms = [m.__class__.__name__ for m in decoder.stats_path.modules() if "GroupNorm" in m.__class__.__name__]
    assert norms and set(norms) == {"ChannelStatsGroupNorm"}
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in vqvae.decoder.modules())
    image_BCHW, logits_BKHW = decoder.decode(f_hat_BCHW)
    torch.testing.assert_close(image_BCHW, image_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_BKHW, logits_ref, rtol=1e-4, atol=1e-4)
    # below channel_stats_min_batch: the copy with torch's GroupNorm (test_..._by_chunk_size_alone)
    assert {m.__class__.__name__ for m in decoder.path.modules() if "GroupNorm" in m.__class__.__name__} == {"GroupNorm"}


def test_default_graph_limit_scales_with_the_work_per_launch():
    from medaug.models.sampling import default_graph_max_batch
    from medaug.models.var import var_preset

    limits = {name: default_graph_max_batch(var_preset(name)) for name in ("d16", "d20", "d24", "d30")}
    for name, limit in limits.items():
        width = var_preset(name).width
        assert limit & (limit - 1) == 0  # a power of two: one graph bucket
        assert limit * width**2 <= 256 * 1024**2 < 2 * limit * width**2
    assert limits["d16"] == 256 and limits["d30"] == 64


def test_fast_decoder_picks_its_groupnorm_path_by_chunk_size_alone():
    vqvae, f_hat_BCHW, image_ref, logits_ref = _decode_reference(4, seed=12)
    decoder = FastDecoder(vqvae, compile=False, channels_last=True, channel_stats_norm=True, channel_stats_min_batch=3)
    for order in ((4, 2, 1, 3), (1, 3, 2, 4)):  # the same choice whatever ran before
        for rows in order:
            path, run_rows = decoder._path_for(rows)
            assert (path is decoder.stats_path) == (rows >= 3) and run_rows == rows
            image_BCHW, logits_BKHW = decoder.decode(f_hat_BCHW[:rows])
            torch.testing.assert_close(image_BCHW, image_ref[:rows], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits_BKHW, logits_ref[:rows], rtol=1e-4, atol=1e-4)
    decoder.compiled = True  # the row count a compiled decoder runs (eager modules here): one image padded to two
    assert decoder._path_for(1) == (decoder.path, 2) and decoder._path_for(3) == (decoder.stats_path, 3)
    image_BCHW, _ = decoder.decode(f_hat_BCHW[:1])
    torch.testing.assert_close(image_BCHW, image_ref[:1], rtol=1e-4, atol=1e-4)


def test_graph_buckets_never_capture_past_free_memory(monkeypatch):
    """Which captured graph a chunk replays (the choice alone: on the CPU nothing is captured)."""
    model, quantizer = _model_and_quantizer(_config(), seed=1)
    sampler = FastSampler(model, quantizer, graph_max_batch=256)
    sampler.cuda_graphs = True
    settings, other = sampler.settings(1.5, 0, 1.0, 1.0), sampler.settings(3.0, 0, 1.0, 1.0)
    fits = {"rows": 300}
    monkeypatch.setattr(sampler, "max_batch_size", lambda _settings: fits["rows"])
    assert sampler._bucket(100, settings) == 128  # room for a new capture of 128 rows
    assert sampler._bucket(257, settings) is None  # past graph_max_batch: eager
    sampler._graphs = {(256, settings): None, (16, other): None}  # captured buckets (their graphs unused here)
    fits["rows"] = 50
    assert sampler._bucket(100, settings) == 256  # 128 would not fit: the captured 256, padded
    assert sampler._bucket(16, settings) == 16  # fits: its own bucket
    assert sampler._bucket(60, other) is None  # nothing captured for these settings that holds 60: eager
    fits["rows"] = 100
    assert sampler._bucket(100, settings) == 256  # 100 rows fit, a 128-row capture does not
    assert sampler._captured_rows(settings) == 256 and sampler._captured_rows(other) == 16
