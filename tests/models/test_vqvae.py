"""Paired image + label tokenizer and its losses: architecture, inputs, partial-label and channel masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medaug.config.base import from_dict
from medaug.errors import ConfigError, LabelError
from medaug.models.losses import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    marginal_cross_entropy,
    mask_loss,
    masked_l1,
    masked_ssim_loss,
    soft_dice_loss,
    ssim,
    structure_l1,
    structure_regions,
)
from medaug.models.quant import QuantizerConfig
from medaug.models.vqvae import VQVAE, VQVAEConfig, label_to_onehot, norm_groups


def _tiny_config(image_channels: int = 1, num_structures: int = 2, **overrides) -> VQVAEConfig:
    """64² slices, 16× downsampling (4×4 latent, scales 1..4), base width 16, small codebook."""
    values = dict(
        image_size=64, image_channels=image_channels, num_structures=num_structures, base_channels=16,
        encoder_res_blocks=1, decoder_res_blocks=1,
        quantizer=QuantizerConfig(codebook_size=256, latent_dim=16, patch_sides=(1, 2, 3, 4)),
    )
    values.update(overrides)
    return VQVAEConfig(**values)


def _shapes_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 64² slices: a disc (class 1, intensity 0.6) and a square (class 2, -0.1) on -0.8."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    shapes = [(20, 22, 10, 40, 36, 9), (30, 40, 12, 10, 12, 10), (44, 18, 8, 30, 44, 12), (16, 44, 11, 42, 10, 8)]
    images, labels = [], []
    for cy, cx, radius, sy, sx, half in shapes:
        label = torch.zeros(64, 64, dtype=torch.long)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
        label[((yy - sy).abs() <= half) & ((xx - sx).abs() <= half) & (label == 0)] = 2
        image = torch.full((64, 64), -0.8)
        image[label == 1] = 0.6
        image[label == 2] = -0.1
        images.append(image)
        labels.append(label)
    return torch.stack(images).unsqueeze(1), torch.stack(labels)


def _dice_numpy(pred: np.ndarray, true: np.ndarray, structure: int) -> float:
    p, t = pred == structure, true == structure
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# ---------------------------------------------------------------- architecture


def test_var_sized_parameter_counts():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig())  # ch 160, (1, 1, 2, 2, 4), 256², one image channel, no labels
    encoder = _count(model.encoder) + _count(model.quant_conv)
    decoder = _count(model.decoder) + _count(model.post_quant_conv)
    assert abs(encoder - 44e6) <= 0.15 * 44e6, encoder
    assert abs(decoder - 65e6) <= 0.15 * 65e6, decoder
    assert abs(_count(model) - 109e6) <= 0.15 * 109e6
    assert _count(model.quantizer) == 4096 * 32 + 4 * (32 * 32 * 9 + 32)  # codebook + four φ convs


@pytest.mark.parametrize(("channels", "groups"), [(160, 32), (16, 16), (48, 24), (3, 3), (640, 32)])
def test_norm_groups(channels, groups):
    assert norm_groups(channels, 32) == groups


def test_no_batch_norm_and_grouped_norms():
    model = VQVAE(_tiny_config())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 and m.num_groups <= 32 for m in norms)


def test_config_from_dict_nested_and_checked():
    data = {"image_size": 128, "base_channels": 32, "quantizer": {"patch_sides": [1, 2, 3, 4, 5, 6, 8]}}
    config = from_dict(VQVAEConfig, data, where="tokenizer.yaml")
    assert config.latent_side == 8 and config.quantizer.patch_sides[-1] == 8
    with pytest.raises(ConfigError, match="patch_sides"):
        VQVAEConfig(image_size=64)  # the default 256² schedule ends at 16, the 64² latent is 4


def test_label_to_onehot():
    label = torch.tensor([[[0, 1, 2], [255, 2, 0]]])
    expected = np.zeros((1, 2, 2, 3), dtype=np.float32)
    for i, j, s in [(0, 1, 1), (0, 2, 2), (1, 1, 2)]:
        expected[0, s - 1, i, j] = 1.0
    assert np.array_equal(label_to_onehot(label, 2).numpy(), expected)
    with pytest.raises(LabelError, match="value 3"):
        label_to_onehot(torch.tensor([[[0, 3]]]), 2)


def test_shapes_with_labels():
    config = _tiny_config(image_channels=2, num_structures=3)
    model = VQVAE(config).eval()
    image = torch.rand(2, 2, 64, 64) * 2 - 1
    mask = torch.tensor([[True, True], [True, False]])
    label = torch.randint(0, 4, (2, 64, 64))
    assert model.encoder[0].in_channels == 2 * 2 + 3
    image_rec, logits, quant_loss, stats = model(image, mask, label)
    assert tuple(image_rec.shape) == (2, 2, 64, 64) and tuple(logits.shape) == (2, 4, 64, 64)
    assert quant_loss.dim() == 0 and tuple(stats["usage_K"].shape) == (4,)
    indices = model.img_to_indices(image, mask, label)
    assert [tuple(idx.shape) for idx in indices] == [(2, p, p) for p in (1, 2, 3, 4)]
    image_out, label_out = model.indices_to_img(indices)
    assert tuple(image_out.shape) == (2, 2, 64, 64) and float(image_out.abs().max()) <= 1.0
    assert tuple(label_out.shape) == (2, 64, 64) and int(label_out.max()) <= 3
    assert tuple(model.last_decoder_layer.shape) == (2 + 4, 16, 3, 3)


def test_image_only_mode():
    model = VQVAE(_tiny_config(image_channels=1, num_structures=0)).eval()
    assert model.encoder[0].in_channels == 2
    image_rec, logits, _, _ = model(torch.zeros(1, 1, 64, 64), torch.ones(1, 1, dtype=torch.bool))
    assert tuple(image_rec.shape) == (1, 1, 64, 64)
    assert torch.equal(logits, torch.zeros(1, 1, 64, 64))  # background only


def test_absent_channel_content_does_not_reach_the_encoder():
    torch.manual_seed(0)
    model = VQVAE(_tiny_config(image_channels=2)).eval()
    mask = torch.tensor([[True, False]])
    image = torch.rand(1, 2, 64, 64)
    garbage = image.clone()
    garbage[:, 1] = torch.rand(64, 64) * 5
    assert torch.equal(model.encode(image, mask), model.encode(garbage, mask))
    present_mask = torch.tensor([[True, True]])
    assert not torch.equal(model.encode(image, present_mask), model.encode(garbage, present_mask))


@pytest.mark.slow
def test_tiny_vqvae_overfits_one_labelled_batch():
    torch.manual_seed(1)
    image, label = _shapes_batch()
    mask, annotated = torch.ones(4, 1, dtype=torch.bool), torch.ones(4, 2, dtype=torch.bool)
    model = VQVAE(_tiny_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(150):
        if step == 0:  # give the fresh codebook real values
            with torch.no_grad():
                features = model.encode(image, mask, label_to_onehot(label, 2))
            model.quantizer.reinit_dead_codes(features, model.quantizer.usage_counts)
        image_rec, logits, quant_loss, _ = model(image, mask, label)
        loss = masked_l1(image_rec, image, mask) + mask_loss(logits, label, annotated)[0] + quant_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    model.eval()
    image_out, label_out = model.indices_to_img(model.img_to_indices(image, mask, label))
    for structure in (1, 2):
        assert _dice_numpy(label_out.numpy(), label.numpy(), structure) > 0.9
    assert float((image_out - image).abs().mean()) < 0.1


# ---------------------------------------------------------------- image losses


def test_masked_l1_ignores_absent_channels():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=generator)
    rec = torch.rand(2, 3, 8, 8, generator=generator).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, False, False]])
    loss = masked_l1(rec, target, mask)
    diff = (rec.detach() - target).abs().numpy()
    expected = np.concatenate([diff[0, [0, 2]].ravel(), diff[1, [0]].ravel()]).mean()
    assert np.isclose(float(loss.detach()), expected, atol=1e-6)
    changed = rec.detach().clone()
    changed[0, 1] += 7.0
    changed[1, 2] -= 3.0
    assert torch.equal(masked_l1(changed, target, mask), loss.detach())
    loss.backward()
    assert bool((rec.grad[0, 1] == 0).all()) and bool((rec.grad[1, 1:] == 0).all())
    assert bool((rec.grad[0, 0] != 0).any())


def test_structure_l1_weighs_every_structure_region_of_every_row_the_same():
    """Against the mean over (row, structure) regions of each region's mean error, written out with loops."""
    generator = torch.Generator().manual_seed(1)
    rec, target = torch.rand(3, 2, 8, 8, generator=generator), torch.rand(3, 2, 8, 8, generator=generator)
    mask = torch.tensor([[True, True], [True, False], [False, False]])  # row 2 has no channel: no region
    label = torch.randint(0, 4, (3, 8, 8), generator=generator)
    label[0, :3] = 255  # ignored pixels belong to no region
    label[1] = 0
    label[1, 0, 0] = 3  # a one-pixel structure weighs as much as the larger ones
    means = []
    for b in range(3):
        for k in range(1, 4):
            pixels = label[b] == k
            channels = mask[b].nonzero().flatten()
            if pixels.any() and len(channels):
                means.append(float((rec[b][channels][:, pixels] - target[b][channels][:, pixels]).abs().mean()))
    assert float(structure_l1(rec, target, mask, label, 4)) == pytest.approx(np.mean(means), abs=1e-6)
    assert float(structure_regions(mask, label, 4)) == len(means) == 4
    nothing = torch.zeros(3, 8, 8, dtype=torch.long)
    assert float(structure_l1(rec, target, mask, nothing, 4)) == 0.0 and float(structure_regions(mask, nothing, 4)) == 0


def _ssim_numpy(x: np.ndarray, y: np.ndarray, size: int, sigma: float, data_range: float) -> float:
    """Wang et al. SSIM with a Gaussian window at every valid position, written out with loops."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (12, 13))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    expected = _ssim_numpy(x, y, size=7, sigma=1.5, data_range=2.0)
    got = ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None], data_range=2.0, window_size=7)
    assert tuple(got.shape) == (1, 1)
    assert np.isclose(float(got), expected, atol=1e-10)
    same = ssim(torch.tensor(x)[None, None], torch.tensor(x)[None, None], window_size=7)
    assert np.isclose(float(same), 1.0, atol=1e-12)


def test_masked_ssim_loss_ignores_absent_channels():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 2, 16, 16, generator=generator)
    rec = target + 0.1 * torch.rand(1, 2, 16, 16, generator=generator)
    mask = torch.tensor([[True, False]])
    loss = masked_ssim_loss(rec, target, mask, window_size=7)
    expected = 1.0 - _ssim_numpy(rec[0, 0].double().numpy(), target[0, 0].double().numpy(), 7, 1.5, 2.0)
    assert np.isclose(float(loss), expected, atol=1e-5)
    changed = rec.clone()
    changed[0, 1] = -1.0
    assert torch.equal(masked_ssim_loss(changed, target, mask, window_size=7), loss)


# ---------------------------------------------------------------- mask losses


def _move_mass(logits: torch.Tensor, source: int, destination: int, fraction: float) -> torch.Tensor:
    """Logits whose softmax moves ``fraction`` of class ``source``'s probability to ``destination``."""
    probs = logits.softmax(dim=1).clone()
    moved = fraction * probs[:, source]
    probs[:, source] -= moved
    probs[:, destination] += moved
    return probs.log()


def test_marginal_ce_equals_cross_entropy_when_everything_is_annotated():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 6), generator=generator)
    target[0, 0, :3] = 255
    annotated = torch.ones(2, 3, dtype=torch.bool)
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(marginal_cross_entropy(logits, target, annotated), expected, rtol=0.0, atol=1e-12)


def test_marginal_ce_merges_unannotated_into_background():
    logits = torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1)
    probs = logits.flatten().softmax(dim=0)
    annotated = torch.tensor([[True, False]])  # structure 2 is not annotated
    background = marginal_cross_entropy(logits, torch.zeros(1, 1, 1, dtype=torch.long), annotated)
    structure = marginal_cross_entropy(logits, torch.ones(1, 1, 1, dtype=torch.long), annotated)
    assert torch.isclose(background, -(probs[0] + probs[2]).log())
    assert torch.isclose(structure, -probs[1].log())


def test_mask_loss_is_blind_to_mass_moved_between_background_and_unannotated():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 8, 8), generator=generator)
    target[0][target[0] == 2] = 0  # row 0 does not annotate structure 2: its pixels read background
    annotated = torch.tensor([[True, False], [True, True]])
    loss, _ = mask_loss(logits, target, annotated)
    shifted = logits.clone()
    shifted[0:1] = _move_mass(logits[0:1], source=0, destination=2, fraction=0.7)
    assert torch.allclose(mask_loss(shifted, target, annotated)[0], loss, rtol=0.0, atol=1e-12)
    into_annotated = logits.clone()
    into_annotated[0:1] = _move_mass(logits[0:1], source=0, destination=1, fraction=0.7)
    assert not torch.allclose(mask_loss(into_annotated, target, annotated)[0], loss, atol=1e-3)
    also_row_1 = logits.clone()
    also_row_1[1:2] = _move_mass(logits[1:2], source=0, destination=2, fraction=0.7)  # row 1 annotates 2
    assert not torch.allclose(mask_loss(also_row_1, target, annotated)[0], loss, atol=1e-3)


def test_mask_loss_ignores_ignore_pixels():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 6, 6, generator=generator)
    target = torch.randint(0, 3, (1, 6, 6), generator=generator)
    target[0, :2] = 255
    annotated = torch.ones(1, 2, dtype=torch.bool)
    changed = logits.clone()
    changed[0, :, :2] = torch.randn(3, 2, 6, generator=generator) * 10
    assert torch.allclose(mask_loss(changed, target, annotated)[0], mask_loss(logits, target, annotated)[0])


def test_soft_dice_matches_numpy_over_annotated_pairs():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 5), generator=generator)
    target[1, 0] = 255
    annotated = torch.tensor([[True, False, True], [False, True, True]])
    probs = logits.softmax(dim=1).numpy()
    scores = []
    for b in range(2):
        labelled = target[b].numpy() != 255
        for s in range(1, 4):
            if annotated[b, s - 1]:
                p, t = probs[b, s] * labelled, (target[b].numpy() == s) & labelled
                scores.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert np.isclose(float(soft_dice_loss(logits, target, annotated)), np.mean(scores), atol=1e-6)


def test_mask_loss_without_labels_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255, dtype=torch.long)
    loss, parts = mask_loss(logits, target, torch.zeros(2, 2, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(parts["dice"]) == 0.0
    assert bool((logits.grad == 0).all())


# ---------------------------------------------------------------- adversarial terms


@pytest.mark.parametrize("norm", ["group", "spectral"])
def test_patch_discriminator_shape_and_norms(norm):
    config = DiscriminatorConfig(in_channels=3, base_channels=8, num_layers=3, norm=norm)
    discriminator = PatchDiscriminator(config)
    side = 64
    for stride in (2, 2, 2, 1, 1):  # 4×4 convs with padding 1
        side = (side + 2 - 4) // stride + 1
    assert tuple(discriminator(torch.randn(2, 3, 64, 64)).shape) == (2, 1, side, side)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in discriminator.modules())
    has_group_norm = any(isinstance(m, nn.GroupNorm) for m in discriminator.modules())
    assert has_group_norm == (norm == "group")
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert all(hasattr(m, "parametrizations") == (norm == "spectral") for m in convs)


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-3.0, 0.0, 0.4])
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 1.4) / 3)))
    assert torch.isclose(hinge_g_loss(fake), torch.tensor((3.0 - 0.4) / 3))


def test_adaptive_gan_weight_is_gradient_norm_ratio():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    rec_loss = (weight**2).sum()  # gradient 2W
    gan_loss = (3.0 * weight).sum()  # gradient 3 everywhere
    expected = torch.linalg.norm(2 * weight.detach()) / (torch.linalg.norm(torch.full((2, 2), 3.0)) + 1e-4)
    got = adaptive_gan_weight(rec_loss, gan_loss, weight)
    assert torch.isclose(got, expected) and not got.requires_grad
    assert float(adaptive_gan_weight(rec_loss, gan_loss, weight, max_weight=0.1)) == pytest.approx(0.1)
