"""Basic sampler: identity with teacher forcing, seeds, guidance, top-k/top-p filtering, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig
from medaug.models.sampling import (
    check_settings,
    draw_tokens,
    filter_probs,
    generators_from_seeds,
    guidance_ramp,
    sample_images,
    sample_scales,
    sample_tokens,
)
from medaug.models.var import VAR, VARConfig
from medaug.models.vqvae import VQVAE, VQVAEConfig

SIDES = (1, 2, 3, 4)
STRUCTURES = 3


def _config(**overrides) -> VARConfig:
    """Tiny model with full-size AdaLN γ and head, so that logits differ clearly between tokens."""
    settings = dict(depth=2, width=64, heads=4, patch_sides=SIDES, codebook_size=32, latent_dim=8,
                    num_domains=2, num_structures=STRUCTURES, drop_path_rate=0.0, attn_impl="sdpa",
                    init_adaln_gamma=1.0, init_head=1.0, init_adaln=1.0)
    return VARConfig(**{**settings, **overrides})


def _model_and_quantizer(config: VARConfig, seed: int = 0) -> tuple[VAR, MultiScaleQuantizer]:
    torch.manual_seed(seed)
    model = VAR(config).eval()
    quantizer = MultiScaleQuantizer(QuantizerConfig(config.codebook_size, config.latent_dim, config.patch_sides))
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    return model, quantizer


def _conditions(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    domain_B = torch.randint(2, (batch,), generator=generator)
    present_BS = torch.rand(batch, STRUCTURES, generator=generator) < 0.5
    annotated_BS = present_BS | (torch.rand(batch, STRUCTURES, generator=generator) < 0.5)
    return domain_B, present_BS, annotated_BS


def _rows(condition, rows):
    return tuple(part[rows] for part in condition)


# ---------------------------------------------------------------- the sampling loop
def test_sampler_inputs_equal_teacher_inputs_of_its_tokens():
    config = _config()
    model, quantizer = _model_and_quantizer(config)
    condition = _conditions(4, seed=1)
    sampled = sample_scales(model, quantizer, *condition, generators=generators_from_seeds([1, 2, 3, 4]),
                            cfg=1.5, top_k=20, top_p=0.9)
    assert [tuple(idx.shape) for idx in sampled.indices] == [(4, side, side) for side in SIDES]
    with torch.no_grad():
        expected_BLC = quantizer.indices_to_teacher_inputs(sampled.indices)
    torch.testing.assert_close(sampled.inputs_BLC, expected_BLC, rtol=0, atol=1e-6)


def _guided_teacher_logits(model: VAR, quantizer: MultiScaleQuantizer, indices, condition, cfg: float):
    """Guided logits (B, L, V) written out from the teacher-forced forward and the ramp's definition."""
    batch = condition[0].shape[0]
    with torch.no_grad():
        x_BLC = quantizer.indices_to_teacher_inputs(indices)
        cond_BLV = model(x_BLC, *condition, torch.zeros(batch, dtype=torch.bool))
        uncond_BLV = model(x_BLC, *condition, torch.ones(batch, dtype=torch.bool))
    K = len(SIDES)
    levels = [k for k, side in enumerate(SIDES) for _ in range(side * side)]
    t_L1 = torch.tensor([cfg * k / (K - 1) for k in levels]).unsqueeze(-1)
    return (1 + t_L1) * cond_BLV - t_L1 * uncond_BLV


@pytest.mark.parametrize("cfg", [0.0, 3.0], ids=["no-guidance", "guidance-3"])
def test_top_k_1_samples_the_argmax_of_guided_teacher_forced_logits(cfg):
    config = _config()
    model, quantizer = _model_and_quantizer(config, seed=2)
    condition = _conditions(3, seed=3)
    indices = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([7, 8, 9]),
                            cfg=cfg, top_k=1, top_p=1.0)
    guided_BLV = _guided_teacher_logits(model, quantizer, indices, condition, cfg)
    assert torch.equal(quantizer.indices_to_tokens(indices), guided_BLV.argmax(dim=-1))


def test_guidance_changes_the_greedy_sample():
    config = _config()
    model, quantizer = _model_and_quantizer(config, seed=2)
    condition = _conditions(3, seed=3)
    plain, guided = (
        quantizer.indices_to_tokens(sample_tokens(model, quantizer, *condition, cfg=cfg, top_k=1, top_p=1.0,
                                                  generators=generators_from_seeds([0, 0, 0])))
        for cfg in (0.0, 3.0)
    )
    assert torch.equal(plain[:, 0], guided[:, 0])  # t_0 = 0: the first scale is never guided
    assert not torch.equal(plain, guided)


def test_same_seed_gives_the_same_sample_whatever_the_batch():
    config = _config()
    model, quantizer = _model_and_quantizer(config, seed=4)
    condition = _conditions(3, seed=5)
    settings = dict(cfg=1.5, top_k=24, top_p=0.95, temperature=1.2)
    batch = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([11, 12, 13]), **settings)
    again = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([11, 12, 13]), **settings)
    alone = sample_tokens(model, quantizer, *_rows(condition, [1]), generators=generators_from_seeds([12]), **settings)
    swapped = sample_tokens(model, quantizer, *_rows(condition, [1, 0]), generators=generators_from_seeds([12, 11]),
                            **settings)
    for k in range(len(SIDES)):
        assert torch.equal(batch[k], again[k])
        assert torch.equal(batch[k][1:2], alone[k])
        assert torch.equal(batch[k][[1, 0]], swapped[k])
    other = sample_tokens(model, quantizer, *_rows(condition, [1]), generators=generators_from_seeds([99]), **settings)
    assert not all(torch.equal(batch[k][1:2], other[k]) for k in range(len(SIDES)))


def test_sampler_checks_its_arguments():
    config = _config()
    model, quantizer = _model_and_quantizer(config)
    condition = _conditions(2)
    with pytest.raises(ValueError, match="one per sample"):
        sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([1]))
    other = MultiScaleQuantizer(QuantizerConfig(config.codebook_size, config.latent_dim, (1, 2, 4)))
    with pytest.raises(ValueError, match="scales"):
        sample_tokens(model, other, *condition, generators=generators_from_seeds([1, 2]))
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            check_settings(**{**dict(top_k=0, top_p=1.0, temperature=1.0), **bad})


def test_guidance_ramp_is_linear_over_scales():
    assert guidance_ramp(1.5, 4) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert guidance_ramp(4.0, 10)[-1] == 4.0 and guidance_ramp(4.0, 10)[0] == 0.0
    assert guidance_ramp(2.0, 1) == [0.0]


# ---------------------------------------------------------------- filtering and drawing
def _numpy_nucleus(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The kept token set, from the definitions: the k largest, then the smallest top set with mass ≥ p."""
    order = np.argsort(-logits, kind="stable")[: top_k or len(logits)]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    smallest = int(np.argmax(np.cumsum(probs) >= top_p - 1e-12)) + 1
    return set(order[:smallest].tolist())


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(0, 0.5), (0, 0.9), (5, 0.8), (8, 1.0), (1, 0.3)],
    ids=["p0.5", "p0.9", "k5-p0.8", "k8-only", "k1"],
)
def test_filter_keeps_the_smallest_set_reaching_top_p(top_k, top_p):
    generator = torch.Generator().manual_seed(top_k * 10 + int(top_p * 10))
    logits_NV = 2.0 * torch.randn(40, 20, generator=generator)
    probs_NM, index_NM = filter_probs(logits_NV, top_k, top_p)
    for row in range(40):
        kept = set(index_NM[row][probs_NM[row] > 0].tolist())
        assert kept == _numpy_nucleus(logits_NV[row].double().numpy(), top_k, top_p)
    # Kept entries are the softmax over the top-k, not renormalised after top-p.
    top_NM = torch.softmax(logits_NV.gather(-1, index_NM), dim=-1)
    torch.testing.assert_close(probs_NM[probs_NM > 0], top_NM[probs_NM > 0])


def test_temperature_divides_the_logits():
    logits_NV = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs_NM, index_NM = filter_probs(logits_NV, top_k=0, top_p=1.0, temperature=2.0)
    assert index_NM.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(probs_NM, torch.softmax(logits_NV / 2.0, dim=-1))


def test_top_k_1_draws_the_argmax_for_any_uniform():
    logits_NV = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    probs_NM, index_NM = filter_probs(logits_NV, top_k=1, top_p=0.5)
    for uniform in (0.0, 0.5, 1.0 - 1e-7):
        drawn_N = draw_tokens(probs_NM, index_NM, torch.full((64,), uniform))
        assert torch.equal(drawn_N, logits_NV.argmax(dim=-1))


def test_draw_follows_the_probabilities_and_never_picks_dropped_tokens():
    probs_NM = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]).repeat(1000, 1)
    index_NM = torch.tensor([[4, 0, 3, 1, 2]]).repeat(1000, 1)
    uniform_N = (torch.arange(1000) + 0.5) / 1000  # an even grid: exact expected counts
    counts = torch.bincount(draw_tokens(probs_NM, index_NM, uniform_N), minlength=5)
    assert counts.tolist() == [300, 0, 0, 200, 500]
    edge_N = torch.full((1000,), float(np.nextafter(np.float32(1), np.float32(0))))
    assert set(draw_tokens(probs_NM, index_NM, edge_N).tolist()) == {3}


# ---------------------------------------------------------------- decoding
def test_sample_images_decodes_the_sampled_tokens():
    torch.manual_seed(5)
    vqvae_config = VQVAEConfig(
        image_size=64, image_channels=2, num_structures=STRUCTURES, base_channels=8, encoder_res_blocks=1,
        decoder_res_blocks=1, quantizer=QuantizerConfig(codebook_size=32, latent_dim=8, patch_sides=SIDES),
    )
    vqvae = VQVAE(vqvae_config).eval()
    model = VAR(_config()).eval()
    condition = _conditions(2, seed=6)
    image_BCHW, label_BHW = sample_images(model, vqvae, *condition, generators=generators_from_seeds([3, 4]))
    assert image_BCHW.shape == (2, 2, 64, 64) and label_BHW.shape == (2, 64, 64)
    assert image_BCHW.dtype == torch.float32 and label_BHW.dtype == torch.int64
    assert image_BCHW.abs().max() <= 1.0 and 0 <= label_BHW.min() and label_BHW.max() <= STRUCTURES
    indices = sample_tokens(model, vqvae.quantizer, *condition, generators=generators_from_seeds([3, 4]))
    expected_image, expected_label = vqvae.indices_to_img(indices)
    assert torch.equal(image_BCHW, expected_image) and torch.equal(label_BHW, expected_label)
