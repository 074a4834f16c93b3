"""Next-scale transformer: config and presets, conditioning, block-causal attention, KV cache, init, overfitting."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from medaug.config.base import from_dict, read_yaml, to_dict
from medaug.errors import ConfigError
from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig
from medaug.models.var import (
    DATA_FIELDS,
    PRESET_NAMES,
    TOKENIZER_FIELDS,
    VAR,
    VARConfig,
    flex_available,
    var_preset,
)
from tests.conftest import REPO_ROOT

SIDES = (1, 2, 3, 4, 5)
STRUCTURES = 5


def _config(**overrides) -> VARConfig:
    """A small model whose AdaLN γ and head start at full size, so every input visibly moves the logits."""
    settings = dict(depth=2, width=64, heads=4, patch_sides=SIDES, codebook_size=48, latent_dim=8,
                    num_domains=3, num_structures=STRUCTURES, drop_path_rate=0.0, attn_impl="sdpa",
                    init_adaln_gamma=1.0, init_head=1.0, init_adaln=1.0)
    return VARConfig(**{**settings, **overrides})


def _quantizer(config: VARConfig, seed: int = 0) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    quantizer = MultiScaleQuantizer(QuantizerConfig(config.codebook_size, config.latent_dim, config.patch_sides))
    with torch.no_grad():
        quantizer.embedding.weight.normal_()  # unit-size codes, so that teacher inputs are far from zero
    return quantizer


def _random_indices(config: VARConfig, batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sides = config.patch_sides
    return [torch.randint(config.codebook_size, (batch, side, side), generator=generator) for side in sides]


def _conditions(batch: int, seed: int = 0, drop: list[bool] | None = None):
    generator = torch.Generator().manual_seed(seed)
    domain_B = torch.randint(3, (batch,), generator=generator)
    present_BS = torch.rand(batch, STRUCTURES, generator=generator) < 0.5
    annotated_BS = present_BS | (torch.rand(batch, STRUCTURES, generator=generator) < 0.5)
    drop_B = torch.tensor(drop if drop is not None else [False] * batch)
    return domain_B, present_BS, annotated_BS, drop_B


def _model(config: VARConfig, seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    return VAR(config).eval()


# ---------------------------------------------------------------- config and presets
def test_config_defaults_follow_depth():
    config = VARConfig(depth=12)
    assert (config.width, config.heads, config.head_dim) == (768, 12, 64)
    assert config.drop_path_rate == pytest.approx(0.05)
    assert config.init_std == pytest.approx((3 * 768) ** -0.5)
    assert config.mlp_hidden == 3072
    gammas = [VARConfig(depth=depth).init_adaln_gamma for depth in (16, 20, 24, 30)]
    assert gammas == [1e-3, 1e-3, 1e-4, 1e-5]
    assert VARConfig().total_tokens == 680 and VARConfig().scale_starts[-1] == 680 - 256


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"width": 100, "heads": 3}, "model.heads"), ({"patch_sides": (1, 3, 2)}, "model.patch_sides"),
     ({"drop_path_rate": 1.0}, "model.drop_path_rate"), ({"num_domains": 0}, "model.num_domains")],
    ids=["heads-not-divisor", "sides-not-increasing", "drop-path-1", "no-domains"],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ConfigError, match=field):
        VARConfig(**overrides)


@pytest.mark.parametrize(
    ("name", "expected"), [("d16", 310e6), ("d20", 601e6), ("d24", 1.03e9), ("d30", 2.01e9)],
    ids=["d16", "d20", "d24", "d30"],
)
def test_preset_parameter_counts_match_var(name, expected):
    # VAR's 256² setup (4096 codes × 32, 680 tokens, 1000 classes); meta tensors allocate nothing.
    config = var_preset(name, num_domains=1000)
    assert config.tokens_per_scale[-1] == 256 and config.total_tokens == 680
    with torch.device("meta"):
        model = VAR(config)
    count = sum(param.numel() for param in model.parameters())
    assert abs(count / expected - 1) < 0.05, f"{name}: {count / 1e6:.1f}M parameters"


def test_preset_widths_and_heads():
    for name in ("d16", "d20", "d24", "d30"):
        config = var_preset(name)
        assert (config.width, config.heads) == (64 * config.depth, config.depth)
        assert config.drop_path_rate == pytest.approx(0.1 * config.depth / 24)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_yaml_presets_equal_var_preset(name):
    data = read_yaml(REPO_ROOT / "recipes" / "models" / f"var-{name}.yaml")
    preset = var_preset(name)
    outside = {field: getattr(preset, field) for field in (*TOKENIZER_FIELDS, *DATA_FIELDS)}
    assert not set(outside) & set(data["model"]), "tokenizer/data fields do not belong in a model preset"
    assert from_dict(VARConfig, {**data["model"], **outside}, f"var-{name}.yaml:model") == preset


def test_resolved_config_round_trips_through_its_dict():
    # Checkpoints store to_dict(config); the resolved defaults (width, heads, ...) must come back equal.
    config = var_preset("d20", num_domains=5, num_structures=7, patch_sides=(1, 2, 4, 8))
    assert from_dict(VARConfig, to_dict(config), "meta.json:model_config") == config


def test_auto_attention_is_sdpa_with_a_block_causal_mask():
    model = _model(_config(attn_impl="auto"))
    assert model.resolved_attn_impl(torch.device("cpu")) == "sdpa"
    levels = torch.tensor([k for k, side in enumerate(SIDES) for _ in range(side * side)])
    assert torch.equal(model.mask_LL, levels[None, :] <= levels[:, None])


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="tiny, d16"):
        var_preset("d99")


def test_block_params_and_flops_estimate():
    config = _config(depth=3, width=96)
    model = VAR(config)
    counted = sum(
        layer.weight.numel()
        for block in model.blocks
        for layer in (block.attn.qkv, block.attn.proj, block.ffn.fc1, block.ffn.fc2)
    )
    assert model.num_block_params() == counted == 12 * 96**2 * 3
    head = model.head.weight.numel()
    assert model.flops_per_token(training=False) == 2 * (counted + head)
    assert model.flops_per_token(training=True) == 6 * (counted + head)


# ---------------------------------------------------------------- conditioning
def test_condition_sums_domain_present_and_annotated():
    model = _model(_config())
    domain_B, present_BS, annotated_BS, drop_B = _conditions(4, seed=1)
    cond_BC = model.condition(domain_B, present_BS, annotated_BS, drop_B)
    expected = (model.domain_embed.weight[domain_B] + present_BS.float() @ model.present_proj.weight.T
                + annotated_BS.float() @ model.annotated_proj.weight.T)
    torch.testing.assert_close(cond_BC, expected)


def test_condition_dropout_yields_exactly_the_null_condition():
    model = _model(_config())
    drop = [True, False, True, False]
    domain_B, present_BS, annotated_BS, drop_B = _conditions(4, seed=2, drop=drop)
    cond_BC = model.condition(domain_B, present_BS, annotated_BS, drop_B)
    for row, dropped in enumerate(drop):
        assert torch.equal(cond_BC[row], model.null_condition_C.detach()) == dropped
    # Dropped rows ignore what they were conditioned on, down to the logits.
    x_BLC = _quantizer(model.config).indices_to_teacher_inputs(_random_indices(model.config, 4, seed=3))
    other_domain, other_present, other_annotated, _ = _conditions(4, seed=9)
    with torch.no_grad():
        logits = model(x_BLC, domain_B, present_BS, annotated_BS, drop_B)
        other = model(x_BLC, other_domain, other_present, other_annotated, drop_B)
    assert torch.equal(logits[drop_B], other[drop_B])
    assert not torch.allclose(logits[~drop_B], other[~drop_B])


def test_a_null_condition_that_keeps_the_domain_drops_only_the_structures():
    model = _model(_config(null_keeps_domain=True))
    drop = [True, False, True, False]
    domain_B, present_BS, annotated_BS, drop_B = _conditions(4, seed=2, drop=drop)
    cond_BC = model.condition(domain_B, present_BS, annotated_BS, drop_B)
    weights = model.domain_embed.weight.detach()
    for row, dropped in enumerate(drop):
        structures = present_BS[row].float() @ model.present_proj.weight.T + annotated_BS[row].float() @ model.annotated_proj.weight.T
        expected = model.null_condition_C + weights[domain_B[row]] if dropped else weights[domain_B[row]] + structures
        torch.testing.assert_close(cond_BC[row], expected.detach())
    # dropped rows still follow their domain, and only it
    _, other_present, other_annotated, _ = _conditions(4, seed=9)
    other_domain = (domain_B + 1) % model.config.num_domains
    same = model.condition(domain_B, other_present, other_annotated, drop_B)
    moved = model.condition(other_domain, present_BS, annotated_BS, drop_B)
    assert torch.equal(same[drop_B], cond_BC[drop_B]) and not torch.allclose(moved[drop_B], cond_BC[drop_B])


def test_domain_only_model_without_structures():
    config = _config(num_structures=0)
    model = _model(config)
    x_BLC = _quantizer(config).indices_to_teacher_inputs(_random_indices(config, 2, seed=0))
    empty_BS = torch.zeros(2, 0, dtype=torch.bool)
    with torch.no_grad():
        logits_BLV = model(x_BLC, torch.tensor([0, 2]), empty_BS, empty_BS, torch.tensor([False, False]))
    assert logits_BLV.shape == (2, config.total_tokens, config.codebook_size)
    assert logits_BLV.dtype == torch.float32


def test_forward_rejects_wrong_shapes():
    config = _config()
    model = _model(config)
    domain_B, present_BS, annotated_BS, drop_B = _conditions(2)
    with pytest.raises(ValueError, match="teacher inputs"):
        model(torch.zeros(2, config.total_tokens, config.latent_dim), domain_B, present_BS, annotated_BS, drop_B)
    with pytest.raises(ValueError, match="present"):
        model.condition(domain_B, present_BS[:, :2], annotated_BS, drop_B)


# ---------------------------------------------------------------- attention
def test_logits_of_a_scale_ignore_tokens_of_that_scale_and_later():
    config = _config()
    model, quantizer = _model(config), _quantizer(config)
    condition = _conditions(2, seed=4)
    indices = _random_indices(config, 2, seed=5)
    with torch.no_grad():
        logits_BLV = model(quantizer.indices_to_teacher_inputs(indices), *condition)
        for k in range(1, config.num_scales):
            changed = indices[:k] + _random_indices(config, 2, seed=100 + k)[k:]
            changed_BLV = model(quantizer.indices_to_teacher_inputs(changed), *condition)
            end_k = config.scale_starts[k] + config.tokens_per_scale[k]
            torch.testing.assert_close(changed_BLV[:, :end_k], logits_BLV[:, :end_k], rtol=0, atol=1e-6)
            if k + 1 < config.num_scales:  # the next scale reads scale k's tokens, so it must move
                assert (changed_BLV[:, end_k:] - logits_BLV[:, end_k:]).abs().max() > 1e-3


def test_input_of_scale_k_reaches_scale_k_and_no_earlier_scale():
    config = _config()
    model, quantizer = _model(config), _quantizer(config)
    condition = _conditions(2, seed=6)
    x_BLC = quantizer.indices_to_teacher_inputs(_random_indices(config, 2, seed=7))
    first = config.tokens_per_scale[0]
    with torch.no_grad():
        logits_BLV = model(x_BLC, *condition)
        for k in range(1, config.num_scales):
            start, end = config.scale_starts[k], config.scale_starts[k] + config.tokens_per_scale[k]
            changed_BLC = x_BLC.clone()
            changed_BLC[:, start - first:end - first] += 1.0  # inputs exclude the first scale's positions
            changed_BLV = model(changed_BLC, *condition)
            torch.testing.assert_close(changed_BLV[:, :start], logits_BLV[:, :start], rtol=0, atol=1e-6)
            assert (changed_BLV[:, start:end] - logits_BLV[:, start:end]).abs().max() > 1e-3


def _teacher_and_cached(config: VARConfig, capacity: int | None, batch: int = 3):
    model, quantizer = _model(config), _quantizer(config)
    condition = _conditions(batch, seed=8, drop=[False, True, False][:batch])
    x_BLC = quantizer.indices_to_teacher_inputs(_random_indices(config, batch, seed=9))
    pieces = torch.split(x_BLC, list(config.tokens_per_scale[1:]), dim=1)
    with torch.no_grad():
        logits_BLV = model(x_BLC, *condition)
        cond_BC = model.condition(*condition)
        cache = model.init_cache(batch, capacity)
        per_scale = [model.forward_scale(k, None if k == 0 else pieces[k - 1], cond_BC, cache)
                     for k in range(config.num_scales)]
    return logits_BLV, per_scale


@pytest.mark.parametrize(
    ("capacity", "shared"), [(None, False), (55 - 25, False), (None, True)],
    ids=["full-cache", "last-scale-not-stored", "shared-adaln"],
)
def test_kv_cache_path_equals_teacher_forcing(capacity, shared):
    config = _config(shared_adaln=shared)
    logits_BLV, per_scale = _teacher_and_cached(config, capacity)
    for k, logits_BlV in enumerate(per_scale):
        start = config.scale_starts[k]
        expected_BlV = logits_BLV[:, start:start + config.tokens_per_scale[k]]
        torch.testing.assert_close(logits_BlV, expected_BlV, rtol=0, atol=1e-4, msg=f"scale {k}")


def test_kv_cache_refuses_a_scale_past_its_length():
    config = _config()
    model = _model(config)
    cond_BC = model.condition(*_conditions(1))
    cache = model.init_cache(1, max_len=5)  # scales 0 and 1 only
    with torch.no_grad(), pytest.raises(ValueError, match="cache length"):
        model.forward_scale(3, torch.zeros(1, 16, config.latent_dim), cond_BC, cache)


def test_flex_attention_computes_the_same_as_sdpa():
    if not flex_available():
        pytest.skip("this torch has no torch.nn.attention.flex_attention")
    config = _config()
    sdpa_model = _model(config)
    flex_model = VAR(dataclasses.replace(config, attn_impl="flex")).eval()
    flex_model.load_state_dict(sdpa_model.state_dict())
    condition = _conditions(2, seed=10)
    x_BLC = _quantizer(config).indices_to_teacher_inputs(_random_indices(config, 2, seed=11))
    with torch.no_grad():
        expected = sdpa_model(x_BLC, *condition)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is unfused
            try:
                flex = flex_model(x_BLC, *condition)
            except (NotImplementedError, RuntimeError) as error:
                pytest.skip(f"FlexAttention cannot run on this CPU build: {error}")
    torch.testing.assert_close(flex, expected, rtol=0, atol=1e-5)


def test_autocast_bfloat16_keeps_float32_logits():
    config = _config()
    model, quantizer = _model(config), _quantizer(config)
    condition = _conditions(2, seed=12)
    x_BLC = quantizer.indices_to_teacher_inputs(_random_indices(config, 2, seed=13))
    with torch.no_grad():
        expected = model(x_BLC, *condition)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x_BLC, *condition)
    assert logits.dtype == torch.float32
    relative = (logits - expected).norm() / expected.norm()
    assert relative < 0.05


def test_stochastic_depth_only_in_training():
    config = _config(depth=4, drop_path_rate=0.5)
    model = _model(config)
    condition = _conditions(4, seed=14)
    x_BLC = _quantizer(config).indices_to_teacher_inputs(_random_indices(config, 4, seed=15))
    with torch.no_grad():
        evaluated = [model(x_BLC, *condition) for _ in range(2)]
        model.train()
        trained = [model(x_BLC, *condition) for _ in range(2)]
    assert torch.equal(evaluated[0], evaluated[1])
    assert not torch.equal(trained[0], trained[1])
    assert [round(block.drop_path_rate, 6) for block in model.blocks] == [0.0, round(0.5 / 3, 6), round(1 / 3, 6), 0.5]


# ---------------------------------------------------------------- init and optimizer groups
def test_init_follows_var():
    config = VARConfig(depth=4, width=256, heads=4, codebook_size=1024, init_adaln_gamma=1e-3)
    model = _model(config)
    std, width = config.init_std, config.width
    block = model.blocks[1]
    ada_weight = block.ada_lin[-1].weight
    assert ada_weight[: 2 * width].std().item() == pytest.approx(1e-3 * std, rel=0.1)
    assert ada_weight[2 * width:].std().item() == pytest.approx(0.5 * std, rel=0.1)
    assert block.attn.qkv.weight.std().item() == pytest.approx(std, rel=0.1)
    assert block.attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.1)
    assert block.ffn.fc2.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.1)
    assert model.head.weight.std().item() == pytest.approx(0.02 * std, rel=0.1)
    assert torch.equal(block.attn.log_scale_H.detach(), torch.full((4,), math.log(4.0)))
    assert not block.ada_lin[-1].bias.any() and not model.head.bias.any()


def test_meta_build_then_to_empty_and_init_equals_a_direct_build():
    config = _config()
    with torch.device("meta"):
        meta_model = VAR(config)
    model = meta_model.to_empty(device="cpu")
    model.init_weights()
    direct = VAR(config)
    assert torch.equal(model.level_L, direct.level_L)
    assert torch.equal(model.mask_LL, direct.mask_LL)
    levels = direct.level_L
    assert torch.equal(direct.mask_LL, levels[None, :] <= levels[:, None])
    assert levels.tolist() == [k for k, side in enumerate(SIDES) for _ in range(side * side)]


def test_no_weight_decay_names_vectors_and_embeddings_only():
    model = _model(_config(shared_adaln=True))
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    for name, param in params.items():
        vector_or_embedding = param.ndim < 2 or name in {"start_embed", "position_embed", "level_embed.weight"}
        assert (name in names) == (vector_or_embedding or name.endswith("ada_offset_6C")), name
    assert {"blocks.0.attn.log_scale_H", "blocks.0.attn.q_bias", "null_condition_C", "head.bias"} <= names
    assert "blocks.0.attn.qkv.weight" not in names and "domain_embed.weight" not in names


# ---------------------------------------------------------------- learning
def test_tiny_model_overfits_a_few_token_maps():
    torch.manual_seed(0)
    config = var_preset("tiny", num_domains=4, num_structures=3)
    model, quantizer = VAR(config), _quantizer(config)
    batch = 8
    indices = _random_indices(config, batch, seed=16)
    x_BLC = quantizer.indices_to_teacher_inputs(indices).detach()
    target_BL = quantizer.indices_to_tokens(indices)
    domain_B = torch.arange(batch) % 4
    present_BS = torch.tensor([[row // 4 == 0, row // 4 == 1, True] for row in range(batch)])  # unique per row
    condition = (domain_B, present_BS, torch.ones(batch, 3, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):  # stop once the maps are learnt, to keep the test fast
        logits_BLV = model(x_BLC, *condition)
        if (logits_BLV.argmax(-1) == target_BL).float().mean() > 0.98:
            break
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert step > 5  # it did have to learn: random init is at chance
    with torch.no_grad():
        accuracy = (model.eval()(x_BLC, *condition).argmax(-1) == target_BL).float().mean().item()
    chance = 1 / config.codebook_size
    assert accuracy > 0.9, f"token accuracy {accuracy:.3f} (chance {chance:.4f})"
