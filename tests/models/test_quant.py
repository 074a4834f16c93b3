"""Multi-scale residual quantizer: schedules, φ assignment, conversions, training signal, codebook health."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medaug.config.base import from_dict
from medaug.errors import ConfigError
from medaug.models import quant
from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig, default_patch_sides, phi_assignment


def _smooth_features(batch: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """Random latents with most energy at low frequencies (as encoder outputs have), (B, C, side, side)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 3, 3, generator=generator)
    fine = torch.randn(batch, channels, side, side, generator=generator)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True) + 0.2 * fine


def _independent_accumulators(q: MultiScaleQuantizer, indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """f_hat after each scale, written out from the definition with functional ops."""
    side, ratio = q.latent_side, q.config.phi_ratio
    f_hat = torch.zeros(indices[0].shape[0], q.config.latent_dim, side, side)
    accumulators = []
    for k, idx in enumerate(indices):
        codes = q.embedding.weight[idx].permute(0, 3, 1, 2)
        if idx.shape[-1] != side:
            codes = F.interpolate(codes, size=(side, side), mode="bicubic", align_corners=False)
        conv = q.phis[phi_assignment(q.num_scales, q.config.num_phi)[k]].conv
        f_hat = f_hat + (1 - ratio) * codes + ratio * F.conv2d(codes, conv.weight, conv.bias, padding=1)
        accumulators.append(f_hat)
    return accumulators


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [(64, (1, 2, 3, 4)), (128, (1, 2, 3, 4, 5, 6, 8)), (256, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))],
    ids=["64px", "128px", "256px"],
)
def test_default_patch_sides(image_size, expected):
    assert default_patch_sides(image_size) == expected


def test_default_patch_sides_rejects_non_multiple():
    with pytest.raises(ConfigError, match="image_size"):
        default_patch_sides(100)


def test_token_counts_of_var_schedule():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=8, latent_dim=4))
    assert q.tokens_per_scale == (1, 4, 9, 16, 25, 36, 64, 100, 169, 256)
    assert q.total_tokens == 680
    last_two = (169 + 256) / 680
    assert math.isclose(last_two, 0.625)  # VAR-NOTES: 62% of tokens in the last two scales


@pytest.mark.parametrize(
    ("num_scales", "num_phi", "expected"),
    [(10, 4, (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)), (4, 4, (0, 1, 2, 3)), (5, 1, (0, 0, 0, 0, 0)), (1, 4, (0,))],
    ids=["var-256", "one-per-scale", "single-phi", "single-scale"],
)
def test_phi_assignment(num_scales, num_phi, expected):
    assert phi_assignment(num_scales, num_phi) == expected


def test_quantizer_uses_var_phi_assignment():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=8, latent_dim=4))
    assert q.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert len(q.phis) == 4


def test_shapes_at_every_scale():
    config = QuantizerConfig(codebook_size=64, latent_dim=8)
    q = MultiScaleQuantizer(config)
    f = _smooth_features(3, 8, 16)
    indices = q.features_to_indices(f)
    assert [tuple(idx.shape) for idx in indices] == [(3, p, p) for p in config.patch_sides]
    assert all(idx.dtype == torch.long and 0 <= int(idx.min()) and int(idx.max()) < 64 for idx in indices)
    assert tuple(q.indices_to_teacher_inputs(indices).shape) == (3, 680 - 1, 8)
    assert tuple(q.indices_to_features(indices).shape) == (3, 8, 16, 16)
    tokens = q.indices_to_tokens(indices)
    assert tuple(tokens.shape) == (3, 680)
    assert all(torch.equal(a, b) for a, b in zip(q.tokens_to_indices(tokens), indices))
    f_hat, loss, stats = q(f)
    assert tuple(f_hat.shape) == tuple(f.shape) and loss.dim() == 0
    assert tuple(stats["usage_K"].shape) == (10,) and tuple(stats["perplexity_K"].shape) == (10,)


def test_tokens_are_row_major_per_scale():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=64, latent_dim=4, patch_sides=(1, 2, 3)))
    indices = [torch.arange(p * p).view(1, p, p) + 10 * k for k, p in enumerate((1, 2, 3))]
    expected = [0, 10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 26, 27, 28]
    assert q.indices_to_tokens(indices).tolist() == [expected]


@pytest.mark.parametrize("chunk_elements", [1 << 26, 100], ids=["one-chunk", "many-chunks"])
def test_nearest_codes_match_brute_force(monkeypatch, chunk_elements):
    monkeypatch.setattr(quant, "_DISTANCE_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(1)
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=37, latent_dim=5, patch_sides=(1, 2)))
    q.embedding.weight.data = torch.randn(37, 5, generator=generator)
    z = torch.randn(203, 5, generator=generator)
    brute = torch.cdist(z.double(), q.embedding.weight.double()).argmin(dim=1)
    assert torch.equal(q.nearest_codes(z), brute)


def test_feature_error_decreases_as_scales_are_added():
    # φ = identity (ratio 0): an untrained φ is a random conv, and the property is about the residual scheme.
    config = QuantizerConfig(codebook_size=512, latent_dim=8, patch_sides=(1, 2, 3, 4, 5, 6, 8), phi_ratio=0.0)
    torch.manual_seed(0)
    q = MultiScaleQuantizer(config).train()
    f = _smooth_features(4, 8, 8, seed=3)
    generator = torch.Generator().manual_seed(0)
    assert q.reinit_dead_codes(f, q.usage_counts, threshold=1, generator=generator) == 512  # fresh = all dead
    for _ in range(3):  # a few rounds of usage counting and dead-code refresh, as training would do
        q(f)
        q.reinit_dead_codes(f, q.usage_counts, threshold=1, generator=generator)
    with torch.no_grad():
        accumulators = _independent_accumulators(q, q.features_to_indices(f))
    errors = [float((f - f_hat).pow(2).mean()) for f_hat in accumulators]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors
    assert torch.allclose(q.indices_to_features(q.features_to_indices(f)), accumulators[-1], atol=1e-6)


def test_teacher_inputs_equal_step_by_step_sampler_inputs():
    config = QuantizerConfig(codebook_size=50, latent_dim=6)  # VAR schedule, φ ratio 0.5, random φ
    torch.manual_seed(0)
    q = MultiScaleQuantizer(config)
    q.embedding.weight.data.normal_()
    generator = torch.Generator().manual_seed(2)
    indices = [torch.randint(50, (2, p, p), generator=generator) for p in config.patch_sides]
    teacher = q.indices_to_teacher_inputs(indices)
    f_hat = q.empty_accumulator(2, "cpu")
    stepwise = []
    for k in range(q.num_scales - 1):
        f_hat = q.next_accumulator(f_hat, k, indices[k])
        stepwise.append(q.accumulator_to_next_input(f_hat, k))
    assert torch.equal(torch.cat(stepwise, dim=1), teacher)


def test_teacher_inputs_are_downsampled_accumulators():
    config = QuantizerConfig(codebook_size=50, latent_dim=6)
    torch.manual_seed(0)
    q = MultiScaleQuantizer(config)
    q.embedding.weight.data.normal_()
    indices = q.features_to_indices(_smooth_features(2, 6, 16))
    accumulators = _independent_accumulators(q, indices)
    teacher = q.indices_to_teacher_inputs(indices)
    start = 0  # scale 0 has no input (the transformer's start token stands there)
    for k in range(1, q.num_scales):
        side = config.patch_sides[k]
        pooled = F.adaptive_avg_pool2d(accumulators[k - 1], side)  # (B, C, p, p)
        expected = torch.stack([pooled[:, :, i, j] for i in range(side) for j in range(side)], dim=1)
        assert torch.allclose(teacher[:, start:start + side * side], expected, atol=1e-6), f"scale {k}"
        start += side * side
    assert start == teacher.shape[1]
    assert torch.allclose(q.indices_to_features(indices), accumulators[-1], atol=1e-6)


def test_forward_is_straight_through_with_var_loss():
    config = QuantizerConfig(codebook_size=40, latent_dim=4, patch_sides=(1, 2, 4), beta=0.25)
    torch.manual_seed(0)
    q = MultiScaleQuantizer(config)
    q.embedding.weight.data.normal_()
    f = _smooth_features(2, 4, 4).requires_grad_(True)
    f_hat_st, loss, _ = q(f)
    indices = q.features_to_indices(f.detach())
    accumulators = _independent_accumulators(q, indices)
    assert torch.allclose(f_hat_st, accumulators[-1], atol=1e-6)
    expected_loss = sum((1 + 0.25) * (a - f.detach()).pow(2).mean() for a in accumulators) / 3
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    (grad_f,) = torch.autograd.grad(f_hat_st.sum(), f, retain_graph=True)
    assert torch.equal(grad_f, torch.ones_like(f))  # straight-through: d f_hat_st / d f = identity
    loss.backward()
    used = torch.zeros(40, dtype=torch.bool)
    used[torch.cat([idx.flatten() for idx in indices])] = True
    row_grad = q.embedding.weight.grad.abs().sum(dim=1)
    assert bool((row_grad[used] > 0).all()) and bool((row_grad[~used] == 0).all())
    assert float(q.phis[0].conv.weight.grad.abs().sum()) > 0


def _handmade_quantizer() -> tuple[MultiScaleQuantizer, torch.Tensor]:
    """Codes 0, (4,0), (0,4), (0,-4); a 2×2 latent whose mean is (4,0) and whose residuals are 0,0,(0,4),(0,-4)."""
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=4, latent_dim=2, patch_sides=(1, 2), phi_ratio=0.0))
    q.embedding.weight.data = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    f = torch.tensor([[[4.0, 4.0], [4.0, 4.0]], [[0.0, 0.0], [4.0, -4.0]]]).unsqueeze(0)  # (1, 2, 2, 2)
    return q, f


def test_codebook_stats_and_usage_counts():
    q, f = _handmade_quantizer()
    assert [idx.flatten().tolist() for idx in q.features_to_indices(f)] == [[1], [0, 0, 2, 3]]
    q.train()
    _, _, stats = q(f)
    assert torch.allclose(stats["usage_K"], torch.tensor([0.25, 0.75]))
    perplexity_1 = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert torch.allclose(stats["perplexity_K"], torch.tensor([1.0, perplexity_1]))
    assert float(stats["usage"]) == 1.0
    assert q.usage_counts.tolist() == [2, 1, 1, 1]
    q.eval()
    q(f)
    assert q.usage_counts.tolist() == [2, 1, 1, 1]  # eval forwards do not count


def test_reinit_dead_codes_replaces_only_dead_codes_with_residuals():
    q, f = _handmade_quantizer()
    before = q.embedding.weight.detach().clone()
    q.usage_counts.copy_(torch.tensor([5, 0, 3, 0]))
    replaced = q.reinit_dead_codes(f, q.usage_counts, threshold=1, generator=torch.Generator().manual_seed(0))
    after = q.embedding.weight.detach()
    assert replaced == 2
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    # candidates: the scale-0 residual (the mean, (4,0)) and the scale-1 residuals 0, 0, (0,4), (0,-4)
    candidates = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    for row in after[[1, 3]]:
        assert bool((candidates == row).all(dim=1).any()), row
    assert q.usage_counts.tolist() == [0, 0, 0, 0]


def test_config_from_dict_and_validation():
    config = from_dict(QuantizerConfig, {"codebook_size": 256, "patch_sides": [1, 2, 4]}, where="tokenizer")
    assert config.patch_sides == (1, 2, 4) and config.latent_dim == 32
    with pytest.raises(ConfigError, match="patch_sides"):
        QuantizerConfig(patch_sides=(1, 3, 2))
    with pytest.raises(ConfigError, match="phi_ratio"):
        QuantizerConfig(phi_ratio=1.5)


def test_wrong_latent_shape_is_rejected():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=8, latent_dim=4, patch_sides=(1, 2, 4)))
    with pytest.raises(ValueError, match="expected"):
        q.features_to_indices(torch.zeros(1, 4, 8, 8))
