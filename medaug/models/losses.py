"""Tokenizer losses: pure functions and the PatchGAN discriminator (no training loop, no schedule).

Image terms use only the channels a row's domain has (DESIGN.md §3 "Domains and channels"): absent
channels contribute nothing to the value or the gradient.

Mask terms follow "not annotated is never absent" (DESIGN.md §3 "Labels") with the marginal loss of
partially-labelled segmentation (Shi et al., "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", MedIA 2021; Fang & Yan, "Multi-organ segmentation over partially labeled
datasets", IEEE TMI 2020): for each row, the logits of the background and of every structure the row does
not annotate are merged by logsumexp into one "background or unlabelled" class, so the cross-entropy
depends only on p(annotated s) and p(background) + Σ p(unannotated); moving probability between
background and an unannotated structure leaves it unchanged. Soft Dice runs over annotated structures
only. Ignore pixels (255) contribute nothing.

Adversarial terms: hinge losses and the VAR/taming adaptive weight ‖∇rec‖ / ‖∇gan‖ at the decoder's last
layer. The warm-up before the GAN starts belongs to the training task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from medaug.errors import ConfigError
from medaug.models.vqvae import IGNORE_LABEL, norm_groups

# ---------------------------------------------------------------- image terms


def _channel_weights(channel_mask_BC: torch.Tensor, like_BCHW: torch.Tensor) -> torch.Tensor:
    """Channel mask as 0/1 weights broadcast to (B, C, H, W)."""
    if tuple(channel_mask_BC.shape) != tuple(like_BCHW.shape[:2]):
        expected = tuple(like_BCHW.shape[:2])
        raise ValueError(f"channel_mask has shape {tuple(channel_mask_BC.shape)}; expected {expected}")
    return channel_mask_BC.to(like_BCHW.dtype)[:, :, None, None].expand_as(like_BCHW)


def masked_l1(image_rec_BCHW: torch.Tensor, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor) -> torch.Tensor:
    """Mean |rec - target| over the present channels' pixels (each present channel-pixel weighs the same).

    Returns a scalar; 0 (with a graph) when no channel is present.
    """
    weights_BCHW = _channel_weights(channel_mask_BC, image_BCHW)
    error_BCHW = (image_rec_BCHW - image_BCHW).abs() * weights_BCHW
    return error_BCHW.sum() / weights_BCHW.sum().clamp(min=1.0)


def structure_l1(image_rec_BCHW: torch.Tensor, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor,
                 label_BHW: torch.Tensor, classes: int) -> torch.Tensor:
    """Mean over the batch's structure regions of each region's mean |rec - target| (present channels).

    A region is the pixels of one structure (label 1..classes-1) in one row; background (0) and ignored
    pixels (``IGNORE_LABEL``) belong to none. Every region weighs the same whatever its area, so a tumour of
    ten pixels counts as much as the body: the whole-image L1 lets a decoder draw the mask of a small bright
    lesion and leave the lesion out of the image, which the phantom runs showed (FLAIR inside the tumour
    decoded at +0.1 against +0.85 real while its mask had Dice 0.9). Returns a scalar; 0 (with a graph)
    when the batch holds no region.
    """
    weights_BCHW = _channel_weights(channel_mask_BC, image_BCHW)
    error_BN = ((image_rec_BCHW - image_BCHW).abs() * weights_BCHW).sum(1).flatten(1)  # summed over channels
    index_BN, labelled_BN = _region_index(label_BHW, classes)
    sums_BK = error_BN.new_zeros(error_BN.shape[0], classes).scatter_add(1, index_BN, error_BN * labelled_BN)
    counts_BK = error_BN.new_zeros(sums_BK.shape).scatter_add(1, index_BN, labelled_BN.to(error_BN.dtype))
    channels_B1 = channel_mask_BC.sum(1, keepdim=True).to(error_BN.dtype)
    region_BS = (counts_BK[:, 1:] > 0) & (channels_B1 > 0)
    means_BS = sums_BK[:, 1:] / (counts_BK[:, 1:] * channels_B1).clamp(min=1.0)
    return (means_BS * region_BS).sum() / region_BS.sum().clamp(min=1)


def structure_regions(channel_mask_BC: torch.Tensor, label_BHW: torch.Tensor, classes: int) -> torch.Tensor:
    """How many regions :func:`structure_l1` averages over (a 0-d float tensor)."""
    index_BN, labelled_BN = _region_index(label_BHW, classes)
    counts_BK = torch.zeros(index_BN.shape[0], classes, device=index_BN.device).scatter_add(
        1, index_BN, labelled_BN.float())
    return ((counts_BK[:, 1:] > 0) & channel_mask_BC.any(1, keepdim=True)).sum().float()


def _region_index(label_BHW: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index (B, H·W) int64 with unlabelled pixels sent to 0, labelled (B, H·W) bool): the pixels of
    labels below ``classes`` other than ``IGNORE_LABEL``."""
    label_BN = label_BHW.flatten(1).long()
    labelled_BN = (label_BN != IGNORE_LABEL) & (label_BN < classes)
    return torch.where(labelled_BN, label_BN, 0), labelled_BN


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized 1-D Gaussian (size,) centred on the middle sample."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (window / window.sum()).to(dtype)


def _gaussian_filter(x_BCHW: torch.Tensor, window_W: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' (no padding): (B, C, H - w + 1, W - w + 1)."""
    channels = x_BCHW.shape[1]
    size = window_W.shape[0]
    rows = window_W.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = window_W.view(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(x_BCHW, rows, groups=channels), cols, groups=channels)


def ssim(
    x_BCHW: torch.Tensor,
    y_BCHW: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """SSIM per image and channel (B, C) with a Gaussian window (Wang et al. 2004), differentiable.

    Local means, variances and covariance are Gaussian-weighted (population form) over 'valid' window
    positions, C1 = (0.01·data_range)², C2 = (0.03·data_range)², and the SSIM map is averaged over
    positions. ``data_range`` is 2 for model space [-1, 1]. Images must be at least ``window_size`` wide.
    """
    if min(x_BCHW.shape[-2:]) < window_size:
        raise ValueError(f"image of shape {tuple(x_BCHW.shape)} is smaller than the SSIM window {window_size}")
    window_W = gaussian_window(window_size, sigma, x_BCHW.dtype).to(x_BCHW.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _gaussian_filter(x_BCHW, window_W), _gaussian_filter(y_BCHW, window_W)
    var_x = _gaussian_filter(x_BCHW * x_BCHW, window_W) - mu_x * mu_x
    var_y = _gaussian_filter(y_BCHW * y_BCHW, window_W) - mu_y * mu_y
    cov_xy = _gaussian_filter(x_BCHW * y_BCHW, window_W) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(-2, -1))


def masked_ssim_loss(
    image_rec_BCHW: torch.Tensor,
    image_BCHW: torch.Tensor,
    channel_mask_BC: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """1 - mean SSIM (see :func:`ssim`) over the present channels; a scalar."""
    weights_BC = channel_mask_BC.to(image_BCHW.dtype)
    ssim_BC = ssim(image_rec_BCHW, image_BCHW, data_range, window_size, sigma)
    return 1.0 - (ssim_BC * weights_BC).sum() / weights_BC.sum().clamp(min=1.0)


# ---------------------------------------------------------------- mask terms


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted (softmax and log in float32); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_mask_inputs(logits_BKHW: torch.Tensor, target_BHW: torch.Tensor, annotated_BS: torch.Tensor) -> None:
    batch, classes = logits_BKHW.shape[:2]
    if tuple(target_BHW.shape) != (batch, *logits_BKHW.shape[2:]):
        raise ValueError(f"target has shape {tuple(target_BHW.shape)}; expected {(batch, *logits_BKHW.shape[2:])}")
    if tuple(annotated_BS.shape) != (batch, classes - 1):
        raise ValueError(f"annotated has shape {tuple(annotated_BS.shape)}; expected ({batch}, {classes - 1})")


def marginal_cross_entropy(
    logits_BKHW: torch.Tensor, target_BHW: torch.Tensor, annotated_BS: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy with unannotated structures merged into background, mean over labelled pixels.

    ``logits_BKHW``: (B, S+1, H, W), class 0 background. ``target_BHW``: model-local labels (0, 1..S,
    255 ignore). ``annotated_BS``: (B, S) bool, the structures each row labels. A pixel whose target is
    background, or (should the data hold one) an unannotated structure, is scored by
    log(p_bg + Σ_unannotated p_s); a pixel of an annotated structure by log p_s. Scalar; 0 (with a graph)
    when no pixel is labelled.
    """
    _check_mask_inputs(logits_BKHW, target_BHW, annotated_BS)
    log_probs_BKHW = _at_least_float32(logits_BKHW).log_softmax(dim=1)
    merged_BK = torch.cat([annotated_BS.new_ones(annotated_BS.shape[0], 1), ~annotated_BS.bool()], dim=1)
    merged_log_probs = log_probs_BKHW.masked_fill(~merged_BK[:, :, None, None], float("-inf"))
    background_BHW = torch.logsumexp(merged_log_probs, dim=1)
    labelled_BHW = target_BHW != IGNORE_LABEL
    target_BHW = torch.where(labelled_BHW, target_BHW, 0).long()
    target_log_prob_BHW = log_probs_BKHW.gather(1, target_BHW.unsqueeze(1)).squeeze(1)
    target_merged_BHW = merged_BK.gather(1, target_BHW.flatten(1)).view_as(target_BHW)
    nll_BHW = -torch.where(target_merged_BHW, background_BHW, target_log_prob_BHW)
    weights_BHW = labelled_BHW.to(nll_BHW.dtype)
    return (nll_BHW * weights_BHW).sum() / weights_BHW.sum().clamp(min=1.0)


def soft_dice_loss(
    logits_BKHW: torch.Tensor, target_BHW: torch.Tensor, annotated_BS: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """1 - mean soft Dice over (row, annotated structure) pairs, on softmax probabilities.

    Dice_{b,s} = (2 Σ p·t + smooth) / (Σ p + Σ t + smooth) over the row's labelled (non-ignore) pixels;
    an annotated structure absent from a row has Σ t = 0 and is pushed towards p = 0. Background is not
    scored. Scalar; 0 (with a graph) when no row annotates anything.
    """
    _check_mask_inputs(logits_BKHW, target_BHW, annotated_BS)
    structures = annotated_BS.shape[1]
    probs_BSN = _at_least_float32(logits_BKHW).softmax(dim=1)[:, 1:].flatten(2)  # (B, S, H·W)
    labelled_BN = (target_BHW != IGNORE_LABEL).flatten(1)
    target_BN = torch.where(labelled_BN, target_BHW.flatten(1), 0).long()
    onehot_BSN = F.one_hot(target_BN, structures + 1)[..., 1:].transpose(1, 2).to(probs_BSN.dtype)  # (B, S, H·W)
    probs_BSN = probs_BSN * labelled_BN[:, None, :]
    intersection_BS = (probs_BSN * onehot_BSN).sum(dim=2)
    dice_BS = (2 * intersection_BS + smooth) / (probs_BSN.sum(dim=2) + onehot_BSN.sum(dim=2) + smooth)
    weights_BS = annotated_BS.to(dice_BS.dtype)
    return ((1.0 - dice_BS) * weights_BS).sum() / weights_BS.sum().clamp(min=1.0)


def mask_loss(
    logits_BKHW: torch.Tensor,
    target_BHW: torch.Tensor,
    annotated_BS: torch.Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight``·marginal CE + ``dice_weight``·soft Dice; returns (total, {"ce", "dice"} detached)."""
    ce = marginal_cross_entropy(logits_BKHW, target_BHW, annotated_BS)
    dice = soft_dice_loss(logits_BKHW, target_BHW, annotated_BS)
    return ce_weight * ce + dice_weight * dice, {"ce": ce.detach(), "dice": dice.detach()}


# ---------------------------------------------------------------- adversarial terms


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN discriminator (pix2pix N-layer) settings.

    in_channels: what the discriminator reads (e.g. C_img image channels, plus S+1 mask probabilities).
    base_channels: width of the first conv; doubles per layer up to 8×.
    num_layers: stride-2 convs after the first (3 gives 70×70 receptive fields).
    norm: "group" (GroupNorm) or "spectral" (spectral normalization on every conv, no norm layers).
    """

    in_channels: int = 1
    base_channels: int = 64
    num_layers: int = 3
    norm: Literal["group", "spectral"] = "group"
    max_norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.base_channels < 1 or self.num_layers < 1:
            raise ConfigError("discriminator", "in_channels, base_channels and num_layers must be >= 1")


class PatchDiscriminator(nn.Sequential):
    """(B, in_channels, H, W) → patch logits (B, 1, h, w); real > 0 > fake under the hinge loss."""

    def __init__(self, config: DiscriminatorConfig):
        widths = [config.base_channels * min(2**i, 8) for i in range(config.num_layers + 1)]
        layers = [self._conv(config.in_channels, widths[0], 2, config), nn.LeakyReLU(0.2)]
        for i in range(1, config.num_layers + 1):
            stride = 2 if i < config.num_layers else 1
            layers += [self._conv(widths[i - 1], widths[i], stride, config), *self._norm(widths[i], config),
                       nn.LeakyReLU(0.2)]
        layers.append(self._conv(widths[-1], 1, 1, config))
        super().__init__(*layers)

    @staticmethod
    def _conv(in_channels: int, out_channels: int, stride: int, config: DiscriminatorConfig) -> nn.Module:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=stride, padding=1)
        return spectral_norm(conv) if config.norm == "spectral" else conv

    @staticmethod
    def _norm(channels: int, config: DiscriminatorConfig) -> list[nn.Module]:
        if config.norm == "spectral":
            return []
        return [nn.GroupNorm(norm_groups(channels, config.max_norm_groups), channels)]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5·(mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) hinge loss -mean D(fake)."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """‖∂rec/∂W‖ / (‖∂gan/∂W‖ + eps) at the decoder's last layer W, clamped to [0, max_weight], detached.

    Balances the GAN term against reconstruction (taming-transformers, used by VAR's tokenizer); the
    caller multiplies by its discriminator weight (0.4 in VAR's single-scale trainer). Keeps the graph.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


__all__ = [
    "DiscriminatorConfig",
    "PatchDiscriminator",
    "adaptive_gan_weight",
    "gaussian_window",
    "hinge_d_loss",
    "hinge_g_loss",
    "marginal_cross_entropy",
    "mask_loss",
    "masked_l1",
    "masked_ssim_loss",
    "structure_l1",
    "structure_regions",
    "soft_dice_loss",
    "ssim",
]
