"""Paired image + label-map tokenizer: an LDM "vq-f16"-style CNN around the multi-scale quantizer.

One token map is one labelled slice (DESIGN.md §3 "Paired masks"): the encoder reads the image channels,
their presence mask and the label map; the decoder returns the image channels and per-structure logits.

Encoder input (B, 2·C_img + S, H, W), concatenated along channels:

* the image channels (B, C_img, H, W) in [-1, 1], multiplied by the channel mask so that absent
  channels are exactly zero (C_img is the most channels any domain has);
* the channel mask (B, C_img) bool broadcast to constant 0/1 planes (concatenation rather than FiLM:
  the first conv sees, per pixel, which channels are real, at a cost of C_img extra input planes);
* the label map as one-hot over the S structures the model knows (B, S, H, W): structure s (1..S) is
  plane s-1; background (0) and ignore (255) pixels are all-zero. Labels arrive as *model-local*
  structure indices 1..S; mapping vocabulary ids to these indices is the data layer's job.

Decoder output (B, C_img + S + 1, H, W), split into the image (B, C_img, H, W) and the logits
(B, S + 1, H, W) over background + S structures. The image head is linear by default (CT windows clip
large areas to exactly -1, which tanh reaches only at infinite pre-activation); ``indices_to_img``
clamps to [-1, 1]. With S = 0 (image-only mode) the decoder has no logit channels and ``decode``
returns logits of a single constant background channel.

Architecture (VAR-NOTES.md): conv_in, per level ``encoder_res_blocks`` residual blocks (GroupNorm, SiLU,
3×3 convs) and a stride-2 conv except at the last level; single-head self-attention in the last level's
blocks and in the middle (block, attention, block); GroupNorm, SiLU, 3×3 conv to the latent. The decoder
mirrors it with ``decoder_res_blocks`` blocks per level and nearest ×2 + 3×3 conv upsampling. No
BatchNorm, so multi-GPU training equals single-GPU training.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medaug.errors import ConfigError, LabelError
from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig

log = logging.getLogger(__name__)

IGNORE_LABEL = 255
"""Label value of pixels that carry no label (no loss, all-zero one-hot)."""


@dataclass(frozen=True)
class VQVAEConfig:
    """Tokenizer settings (defaults: VAR's 256² tokenizer on one image channel, no labels).

    image_size: H = W of the input slices in pixels.
    image_channels: C_img, the most channels any domain has (absent ones are zero-filled and masked).
    num_structures: S, structures the model knows (model-local indices 1..S); 0 = image-only mode.
    base_channels: width of the first level (160 in VAR; 16-32 for tests).
    channel_multipliers: per-level width multipliers; 2**(levels - 1) is the downsampling factor.
    encoder_res_blocks / decoder_res_blocks: residual blocks per level (VAR: 2 and 3).
    attention: single-head self-attention at the lowest resolution (last level's blocks and middle).
    max_norm_groups: GroupNorm uses the largest group count <= this that divides the channels.
    dropout: dropout inside residual blocks.
    image_head: "linear" (default) or "tanh" on the image output.
    quantizer: the multi-scale quantizer; its last patch side must equal image_size / downsampling.
    """

    image_size: int = 256
    image_channels: int = 1
    num_structures: int = 0
    base_channels: int = 160
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    encoder_res_blocks: int = 2
    decoder_res_blocks: int = 3
    attention: bool = True
    max_norm_groups: int = 32
    dropout: float = 0.0
    image_head: Literal["linear", "tanh"] = "linear"
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def downsample(self) -> int:
        """Spatial reduction of the encoder (16 for five levels)."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_side(self) -> int:
        return self.image_size // self.downsample

    def __post_init__(self) -> None:
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ConfigError("channel_multipliers", f"is {self.channel_multipliers}; expected positive ints")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ConfigError("image_size", f"is {self.image_size}; expected a multiple of {self.downsample}")
        if self.quantizer.patch_sides[-1] != self.latent_side:
            raise ConfigError(
                "quantizer.patch_sides",
                f"ends with {self.quantizer.patch_sides[-1]}; expected the latent side {self.latent_side}"
                f" (image_size {self.image_size} / downsampling {self.downsample})",
            )
        for name in ("image_channels", "base_channels", "encoder_res_blocks", "decoder_res_blocks", "max_norm_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}; expected >= 1")
        if not 0 <= self.num_structures < IGNORE_LABEL:
            raise ConfigError("num_structures", f"is {self.num_structures}; expected 0..{IGNORE_LABEL - 1}")


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels``."""
    return max(groups for groups in range(1, min(max_groups, channels) + 1) if channels % groups == 0)


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels, max_groups), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 conv on the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, max_groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, max_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, max_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.conv1(F.silu(self.norm1(x_BCHW)))
        h_BCHW = self.conv2(self.dropout(F.silu(self.norm2(h_BCHW))))
        return self.skip(x_BCHW) + h_BCHW


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, residual: x + proj(softmax(qkᵀ/√C)·v)."""

    def __init__(self, channels: int, max_groups: int):
        super().__init__()
        self.norm = group_norm(channels, max_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x_BCHW.shape
        qkv_B3CN = self.qkv(self.norm(x_BCHW)).reshape(batch, 3, channels, height * width)  # copies if channels-last
        q_BNC, k_BNC, v_BNC = qkv_B3CN.transpose(2, 3).unbind(dim=1)  # each (B, H·W, C)
        out_BNC = F.scaled_dot_product_attention(q_BNC, k_BNC, v_BNC)
        out_BCHW = out_BNC.transpose(1, 2).reshape(batch, channels, height, width)
        return x_BCHW + self.proj(out_BCHW)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding right/bottom by one (halves an even side exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, config: VQVAEConfig) -> list[nn.Module]:
    """Block, (attention), block at the lowest resolution."""
    groups, dropout = config.max_norm_groups, config.dropout
    attention = [SelfAttention(channels, groups)] if config.attention else []
    first = ResnetBlock(channels, channels, groups, dropout)
    second = ResnetBlock(channels, channels, groups, dropout)
    return [first, *attention, second]


def _level(in_channels: int, out_channels: int, blocks: int, attention: bool, config: VQVAEConfig) -> list[nn.Module]:
    """``blocks`` residual blocks, each followed by self-attention when ``attention``."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config.max_norm_groups,
                                  config.dropout))
        if attention:
            layers.append(SelfAttention(out_channels, config.max_norm_groups))
    return layers


def _output(channels: int, out_channels: int, config: VQVAEConfig) -> list[nn.Module]:
    return [group_norm(channels, config.max_norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]


class Encoder(nn.Sequential):
    """(B, in_channels, H, W) → (B, latent_dim, H/d, W/d), d = 2**(levels - 1)."""

    def __init__(self, config: VQVAEConfig, in_channels: int):
        widths = [config.base_channels * m for m in config.channel_multipliers]
        last = len(widths) - 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, config.base_channels, kernel_size=3, padding=1)]
        previous = config.base_channels
        for i, width in enumerate(widths):
            layers += _level(previous, width, config.encoder_res_blocks, config.attention and i == last, config)
            if i != last:
                layers.append(Downsample(width))
            previous = width
        layers += _middle(previous, config)
        layers += _output(previous, config.quantizer.latent_dim, config)
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """(B, latent_dim, h, w) → (B, out_channels, h·d, w·d), mirroring :class:`Encoder`."""

    def __init__(self, config: VQVAEConfig, out_channels: int):
        widths = [config.base_channels * m for m in config.channel_multipliers]
        last = len(widths) - 1
        previous = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(config.quantizer.latent_dim, previous, kernel_size=3, padding=1)]
        layers += _middle(previous, config)
        for i in reversed(range(len(widths))):
            layers += _level(previous, widths[i], config.decoder_res_blocks, config.attention and i == last, config)
            if i != 0:
                layers.append(Upsample(widths[i]))
            previous = widths[i]
        layers += _output(previous, out_channels, config)
        super().__init__(*layers)

    @property
    def last_layer(self) -> nn.Conv2d:
        """The output conv (its weight is where VAR-style adaptive GAN weights measure gradients)."""
        return self[-1]


def label_to_onehot(label_BHW: torch.Tensor, num_structures: int) -> torch.Tensor:
    """One-hot (B, S, H, W) float32 of a model-local label map (B, H, W).

    Values: 0 background, 1..S structures (plane s-1), 255 ignore; background and ignore pixels are
    all-zero. Any other value raises :class:`LabelError`.
    """
    valid_BHW = (label_BHW >= 0) & ((label_BHW <= num_structures) | (label_BHW == IGNORE_LABEL))
    if not bool(valid_BHW.all()):
        bad = label_BHW[~valid_BHW][0].item()
        raise LabelError("label map", f"holds value {bad}; expected 0, 1..{num_structures} or {IGNORE_LABEL}")
    structure_BHW = torch.where(label_BHW == IGNORE_LABEL, 0, label_BHW).long()
    onehot_BHWS = F.one_hot(structure_BHW, num_structures + 1)[..., 1:]  # drop background
    return onehot_BHWS.permute(0, 3, 1, 2).float()


def logits_to_label(logits_BKHW: torch.Tensor, annotated_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Most likely model-local label (B, H, W) int64 (0 background, 1..S) from logits (B, S+1, H, W).

    ``annotated_BS`` (B, S) bool or 0/1: when given, only background and each row's annotated
    structures compete (what the sampler's condition promised to label).
    """
    if annotated_BS is None or logits_BKHW.shape[1] == 1:
        return logits_BKHW.argmax(dim=1)
    allowed_BK = torch.cat([annotated_BS.new_ones(annotated_BS.shape[0], 1), annotated_BS], dim=1).bool()
    return logits_BKHW.masked_fill(~allowed_BK[:, :, None, None], float("-inf")).argmax(dim=1)


class VQVAE(nn.Module):
    """Multi-scale residual VQ-VAE over image channels + channel mask + label map (see module doc)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        latent_dim = config.quantizer.latent_dim
        in_channels = 2 * config.image_channels + config.num_structures
        logit_channels = config.num_structures + 1 if config.num_structures else 0
        self.encoder = Encoder(config, in_channels)
        self.quant_conv = nn.Conv2d(latent_dim, latent_dim, kernel_size=3, padding=1)
        self.quantizer = MultiScaleQuantizer(config.quantizer)
        self.post_quant_conv = nn.Conv2d(latent_dim, latent_dim, kernel_size=3, padding=1)
        self.decoder = Decoder(config, config.image_channels + logit_channels)

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for :func:`medaug.models.losses.adaptive_gan_weight`)."""
        return self.decoder.last_layer.weight

    def encoder_input(
        self, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor, label_onehot_BSHW: torch.Tensor | None
    ) -> torch.Tensor:
        """Concatenate masked image, channel-mask planes and one-hot labels: (B, 2·C_img + S, H, W).

        ``label_onehot_BSHW``: (B, S, H, W) from :func:`label_to_onehot`, or None for no labels (zero planes).
        """
        self._check_image(image_BCHW, channel_mask_BC)
        planes_BCHW = channel_mask_BC.to(image_BCHW.dtype)[:, :, None, None].expand_as(image_BCHW)
        parts = [image_BCHW * planes_BCHW, planes_BCHW]
        structures = self.config.num_structures
        if structures:
            if label_onehot_BSHW is None:
                label_onehot_BSHW = image_BCHW.new_zeros(image_BCHW.shape[0], structures, *image_BCHW.shape[2:])
            if tuple(label_onehot_BSHW.shape[1:]) != (structures, *image_BCHW.shape[2:]):
                raise ValueError(f"one-hot labels have shape {tuple(label_onehot_BSHW.shape)}; expected "
                                 f"(B, {structures}, {image_BCHW.shape[2]}, {image_BCHW.shape[3]})")
            parts.append(label_onehot_BSHW.to(image_BCHW.dtype))
        return torch.cat(parts, dim=1)

    def encode(
        self, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor, label_onehot_BSHW: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Continuous latent f (B, latent_dim, h, h) before quantization."""
        return self.quant_conv(self.encoder(self.encoder_input(image_BCHW, channel_mask_BC, label_onehot_BSHW)))

    def quantize(self, f_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(f_hat_st, quantization loss, codebook stats): see :meth:`MultiScaleQuantizer.forward`."""
        return self.quantizer(f_BCHW)

    def decode(self, f_hat_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (B, C_img, H, W), logits (B, S + 1, H, W)) from the accumulated latent."""
        out_BCHW = self.decoder(self.post_quant_conv(f_hat_BCHW))
        channels = self.config.image_channels
        image_BCHW = out_BCHW[:, :channels]
        if self.config.image_head == "tanh":
            image_BCHW = torch.tanh(image_BCHW)
        if self.config.num_structures:
            return image_BCHW, out_BCHW[:, channels:]
        return image_BCHW, out_BCHW.new_zeros(out_BCHW.shape[0], 1, *out_BCHW.shape[2:])

    def forward(
        self, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor, label_BHW: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct: (image_rec (B, C_img, H, W), logits (B, S+1, H, W), quant_loss, stats).

        ``label_BHW``: model-local label map (0 background, 1..S, 255 ignore) or None (no labels).
        """
        f_BCHW = self.encode(image_BCHW, channel_mask_BC, self._onehot(label_BHW))
        f_hat_BCHW, quant_loss, stats = self.quantize(f_BCHW)
        image_rec_BCHW, logits_BKHW = self.decode(f_hat_BCHW)
        return image_rec_BCHW, logits_BKHW, quant_loss, stats

    @torch.no_grad()
    def img_to_indices(
        self, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor, label_BHW: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-scale token maps [(B, p_k, p_k) int64] of labelled slices (for the transformer)."""
        f_BCHW = self.encode(image_BCHW, channel_mask_BC, self._onehot(label_BHW))
        return self.quantizer.features_to_indices(f_BCHW)

    @torch.no_grad()
    def indices_to_img(self, indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode token maps: (image (B, C_img, H, W) clamped to [-1, 1], label (B, H, W) int64 model-local)."""
        image_BCHW, logits_BKHW = self.decode(self.quantizer.indices_to_features(indices))
        return image_BCHW.clamp(-1.0, 1.0), logits_to_label(logits_BKHW)

    def _onehot(self, label_BHW: torch.Tensor | None) -> torch.Tensor | None:
        if label_BHW is None or not self.config.num_structures:
            return None
        return label_to_onehot(label_BHW, self.config.num_structures)

    def _check_image(self, image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.image_channels
        if image_BCHW.dim() != 4 or tuple(image_BCHW.shape[1:]) != (channels, size, size):
            raise ValueError(f"image has shape {tuple(image_BCHW.shape)}; expected (B, {channels}, {size}, {size})")
        if tuple(channel_mask_BC.shape) != (image_BCHW.shape[0], channels):
            raise ValueError(f"channel_mask has shape {tuple(channel_mask_BC.shape)}; expected (B, {channels})")


class CodeUpsampler:
    """The quantizer's per-scale code upsampling (bicubic, p_k → latent side) as one exact linear map.

    PyTorch's CUDA bicubic kernel runs one thread per output pixel over all B·C planes, which for
    16×16 latents is about 6 ms per scale at batch 256. Bicubic resizing is linear, so each side's map is
    a (p², h²) matrix, built once by resizing the p² one-hot images with ``F.interpolate`` itself in
    float64 (borders included) and applied as a float64 matmul (immune to TF32 settings; results equal
    the kernel's to float32 rounding). ``contribution`` and ``features`` mirror
    :meth:`MultiScaleQuantizer.scale_contribution` and :meth:`MultiScaleQuantizer.indices_to_features`.
    """

    def __init__(self, quantizer: MultiScaleQuantizer, device: torch.device | str):
        self.quantizer = quantizer
        latent = quantizer.latent_side
        self.matrices = {side: _bicubic_matrix(side, latent).to(device) for side in quantizer.patch_sides
                         if side != latent}

    def contribution(self, indices_Bpp: torch.Tensor, k: int) -> torch.Tensor:
        """φ_k(upsample(codes)): what scale k adds to the accumulator, (B, C, h, h) float32."""
        quantizer, side, latent = self.quantizer, self.quantizer.patch_sides[k], self.quantizer.latent_side
        codes_BCpp = quantizer.embedding(indices_Bpp).permute(0, 3, 1, 2)  # (B, C, p, p)
        if side != latent:
            batch, channels = codes_BCpp.shape[:2]
            flat_NP = codes_BCpp.reshape(batch * channels, side * side).double()
            codes_BCpp = (flat_NP @ self.matrices[side]).float().view(batch, channels, latent, latent)
        return quantizer.phis[quantizer.phi_index[k]](codes_BCpp.contiguous())

    def features(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The accumulator f_hat (B, C, h, h) after all scales (the decoder's input)."""
        f_hat_BCHW = self.quantizer.empty_accumulator(indices[0].shape[0], indices[0].device)
        for k, indices_Bpp in enumerate(indices):
            f_hat_BCHW = f_hat_BCHW + self.contribution(indices_Bpp, k)
        return f_hat_BCHW


def _bicubic_matrix(side: int, latent: int) -> torch.Tensor:
    """(side², latent²) float64: row i is the bicubic resize of the i-th one-hot side×side image."""
    basis_N1pp = torch.eye(side * side, dtype=torch.float64).view(side * side, 1, side, side)
    resized_N1hh = F.interpolate(basis_N1pp, size=(latent, latent), mode="bicubic")
    return resized_N1hh.reshape(side * side, latent * latent)


class FoldedUpsample(nn.Module):
    """:class:`Upsample` (nearest ×2, then a 3×3 conv) as one stride-2 transposed 4×4 conv: the same function.

    Output row 2m reads input rows m-1 (tap 0) and m (taps 1 + 2); row 2m+1 reads m (taps 0 + 1) and m+1
    (tap 2); likewise for columns. The transposed conv's 4×4 kernel holds those summed taps, so it does
    4 instead of 9 multiply-adds per upsampled pixel and never writes the upsampled input. Borders match
    the original's zero padding. The fold is computed in float32.
    """

    # FOLD[k, d]: original tap d (0..2) contributes to transposed-conv tap k (0..3)
    FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))

    def __init__(self, upsample: Upsample):
        super().__init__()
        weight = upsample.conv.weight.detach().float()  # (C_out, C_in, 3, 3)
        fold = torch.tensor(self.FOLD, dtype=torch.float32, device=weight.device)
        folded = torch.einsum("ky,lx,oiyx->iokl", fold, fold, weight)  # (C_in, C_out, 4, 4), transposed layout
        self.weight = nn.Parameter(folded.to(upsample.conv.weight.dtype).contiguous())
        self.bias = nn.Parameter(upsample.conv.bias.detach().clone())

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x_BCHW, self.weight, self.bias, stride=2, padding=1)


def replace_modules(module: nn.Module, kind: type[nn.Module], make: Any) -> nn.Module:
    """Replace every submodule of type ``kind`` inside ``module`` (at any depth) by ``make(submodule)``, in place."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            replace_modules(child, kind, make)
    return module


def fold_upsamples(decoder: nn.Sequential) -> nn.Sequential:
    """Replace every :class:`Upsample` of ``decoder`` by its :class:`FoldedUpsample` (in place)."""
    return replace_modules(decoder, Upsample, FoldedUpsample)


class ChannelStatsGroupNorm(nn.Module):
    """:class:`nn.GroupNorm` (inference) from per-channel statistics: the same function, fast on channels-last.

    torch's GroupNorm views (B, C, H, W) as (B, G, C/G·H·W), which on channels-last memory is a gather
    (compiled: each thread reads C/G channels every C elements). Here the mean and variance of each
    channel over each of ``row_bands`` bands of rows (a reduction along memory with the channels
    contiguous; bands give the GPU more outputs to work on) are combined exactly into group statistics
    (the mean of the equal-count partial means; the mean of the partial variances plus the variance of
    the partial means), and the output is one multiply-add per element with a (B, C) scale and shift,
    computed in float32 and returned in the input's dtype and memory layout. Heights that ``row_bands``
    does not divide use one band.

    Written on the (B, C, H, W) view on purpose: the same computation on the (B, H, W, C) view (contiguous
    on channels-last memory) made inductor's multiply-add kernels slower, and the decoder 872 against 946
    images/s at batch 256 on the H200 (session 7, ``results/sample-h200-session7.json``).
    """

    def __init__(self, norm: nn.GroupNorm, row_bands: int = 1):
        super().__init__()
        self.num_groups, self.eps, self.row_bands = norm.num_groups, norm.eps, row_bands
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x_BCHW.shape
        bands = self.row_bands if height % self.row_bands == 0 else 1
        x32_BCHW = x_BCHW.float()
        x32_BCShW = x32_BCHW.view(batch, channels, bands, height // bands, width)  # (B, C, bands, H/bands, W)
        var_BCS, mean_BCS = torch.var_mean(x32_BCShW, dim=(3, 4), correction=0)
        mean_BGn = mean_BCS.reshape(batch, self.num_groups, -1)  # (B, G, C/G·bands) partial means
        group_mean_BG1 = mean_BGn.mean(-1, keepdim=True)
        spread_BGn = var_BCS.reshape_as(mean_BGn) + (mean_BGn - group_mean_BG1) ** 2
        rstd_BG1 = torch.rsqrt(spread_BGn.mean(-1, keepdim=True) + self.eps)
        per_group = channels // self.num_groups
        scale_BC = rstd_BG1.expand(batch, self.num_groups, per_group).reshape(batch, channels) * self.weight.float()
        mean_BC = group_mean_BG1.expand(batch, self.num_groups, per_group).reshape(batch, channels)
        shift_BC = self.bias.float() - mean_BC * scale_BC
        out_BCHW = x32_BCHW * scale_BC[:, :, None, None] + shift_BC[:, :, None, None]
        return out_BCHW.to(x_BCHW.dtype)


def channel_stats_group_norms(module: nn.Module, row_bands: int = 1) -> nn.Module:
    """Replace every :class:`nn.GroupNorm` inside ``module`` by its :class:`ChannelStatsGroupNorm` (in place)."""
    return replace_modules(module, nn.GroupNorm, lambda norm: ChannelStatsGroupNorm(norm, row_bands))


class GemmSelfAttention(nn.Module):
    """:class:`SelfAttention` for bfloat16 inference as two batched GEMMs with a float32 softmax.

    The decoder's single head is ``C`` = 640 wide at 256², past the 256 that SDPA's fused CUDA kernels take,
    so compiled bf16 SDPA ran inductor's math decomposition in float32 (FFMA GEMMs: ~4 ms of the ~265 ms
    decode of 256 images on the H200; with this module the compiled decoder made 965 against 946 images/s,
    session 7, ``results/sample-h200-session7.json``). Here q·kᵀ and p·v are GEMMs in the input dtype
    (float32 accumulation; in bf16 the scores come out rounded to bf16, where flash attention would keep
    them in float32), the scores are scaled and soft-maxed in float32 and p is rounded to the input dtype
    before p·v, and qkv/proj run as linear layers on the (B, H·W, C) view (contiguous on channels-last
    memory). In float32 it computes :class:`SelfAttention`; in bf16 the compiled decoder's images differed
    from the SDPA path's by 4.1 % (relative L2, random weights), as much as any two bf16 variants of it
    (3.8-4.1 %).
    """

    def __init__(self, attention: SelfAttention):
        super().__init__()
        self.norm = attention.norm
        channels = attention.proj.in_channels
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        with torch.no_grad():
            self.qkv.weight.copy_(attention.qkv.weight.view(3 * channels, channels))
            self.qkv.bias.copy_(attention.qkv.bias)
            self.proj.weight.copy_(attention.proj.weight.view(channels, channels))
            self.proj.bias.copy_(attention.proj.bias)
        self.to(device=attention.proj.weight.device, dtype=attention.proj.weight.dtype)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x_BCHW.shape
        h_BNC = self.norm(x_BCHW).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        out_BHWC = self.proj(gemm_attention(self.qkv(h_BNC))).view(batch, height, width, channels)
        return x_BCHW + out_BHWC.permute(0, 3, 1, 2)


def gemm_attention(qkv_BN3C: torch.Tensor) -> torch.Tensor:
    """Single-head softmax(q·kᵀ/√C)·v (B, N, C) from a (B, N, 3·C) projection: two batched GEMMs in its dtype
    with a float32 softmax (:class:`GemmSelfAttention`)."""
    q_BNC, k_BNC, v_BNC = qkv_BN3C.chunk(3, dim=-1)
    scores_BNN = torch.bmm(q_BNC, k_BNC.transpose(1, 2)).float() * q_BNC.shape[-1] ** -0.5
    return torch.bmm(scores_BNN.softmax(dim=-1).to(v_BNC.dtype), v_BNC)


def gemm_attentions(decoder: nn.Sequential) -> nn.Sequential:
    """Replace every :class:`SelfAttention` of ``decoder`` by its :class:`GemmSelfAttention` (in place)."""
    return replace_modules(decoder, SelfAttention, GemmSelfAttention)


class _DecodePath(nn.Module):
    """post_quant_conv then the decoder: (B, latent_dim, h, h) → (B, C_img + S + 1, H, W)."""

    def __init__(self, post_quant_conv: nn.Conv2d, decoder: Decoder):
        super().__init__()
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder

    def forward(self, f_hat_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BCHW))


FUSED_ROW_MULTIPLE = 32
"""The fused path decodes chunks padded up to a multiple of this many rows (``padded_rows``): cuDNN's
benchmark searches algorithms once per input shape (~2.5 s for the decoder's convolutions at batch 256 on the
H200), and a run's redraw batches come in every size."""

GRAPH_MAX_ROWS = 2
"""Rows (images, one image padded to two) up to which the compiled small-batch decode replays a CUDA graph."""


@dataclass
class _DecodeGraph:
    """A captured decode of a fixed number of rows: copy into ``input``, replay, read ``output``."""

    graph: Any
    input: torch.Tensor
    output: torch.Tensor


DECODE_BYTES_PER_PIXEL_CHANNEL = 8
"""Peak bytes per pixel × base channel of one decoded image per byte of dtype (measured ≤ 6, with margin)."""


class FastDecoder:
    """The decode path of a :class:`VQVAE` for inference: :meth:`VQVAE.decode` made fast on CUDA.

    A copy of ``post_quant_conv`` and the decoder with ``dtype`` weights (default bfloat16 on CUDA,
    float32 on the CPU), optionally channels-last and torch.compile'd (defaults: compiled on CUDA, and
    channels-last when compiled: eager, NCHW was faster on the H200, 501 vs 353 images/s at batch 256; the
    batch dimension is dynamic, so one compile serves every batch size; a batch of one is padded to two).
    ``fold_upsample`` (default on CUDA) runs each nearest-×2 + 3×3 conv as one transposed conv
    (:class:`FoldedUpsample`: the same function, 10% fewer decoder FLOPs at 256²).
    ``gemm_attention`` (default True) runs each self-attention of the per-channel-statistics path (chunks of
    at least ``channel_stats_min_batch`` images) as bf16 GEMMs (:class:`GemmSelfAttention`), where it was
    measured (compiled, batch 256 on the H200: 965 against 946 images/s, same run). The small-batch path
    keeps SDPA: its one-image latency was measured with it (d16, one image with decode: 15.7 ms; 20.5 ms in
    a later run with GEMM attention on every path, not isolated from run-to-run variation; session 7).
    ``channel_stats_norm`` runs each GroupNorm from per-channel statistics (:class:`ChannelStatsGroupNorm`:
    the same function, its reductions along channels-last memory; ``norm_row_bands`` bands of rows per
    channel; default when compiled on CUDA: at batch 256 on the H200 the compiled decoder made 974 images/s with it
    against 824 with torch's GroupNorm, 861 with 16 bands; ``results/sample-h200-session6.json``) for
    chunks of at least ``channel_stats_min_batch`` images; smaller chunks run a second copy with torch's
    GroupNorm (at batch 1, padded to 2, the per-channel path has too few reductions to fill the GPU:
    one d16 image took 24.3 ms with it against 17.3 ms without).
    Batches are decoded in chunks of :meth:`chunk_size` images: on CUDA what fits in a third of the device's
    total memory (``max_chunk`` caps it), fixed for the decoder's life, so a batch's decode (and its
    convolution algorithms, picked per shape) does not depend on what else holds memory at the time (the
    decode may run on a side stream beside sampling); after an out-of-memory error the chunk halves, with a
    warning, and stays halved.
    ``fused_norm`` (default on CUDA GPUs of compute capability 8.0 or later where Triton imports) runs chunks
    of at least ``channel_stats_min_batch`` images through :class:`~medaug.models.fused_decode.FusedDecodePath`
    instead (GroupNorm, SiLU and residual adds in Triton kernels beside cuDNN convolutions, uncompiled; it
    replaces the per-channel-statistics path; ``padded_output``, default on, runs its output conv with
    zero-padded output channels, :data:`~medaug.models.fused_decode.OUT_CHANNEL_MULTIPLE`; ``phase_upsample``,
    default on, runs a folded upsample whose map only its kernels read in its phase form,
    :class:`~medaug.models.fused_decode.FusedDecodePath`): at batch 256 on
    the H200 1,013, 1,001 and 979 images/s against the compiled path's 991, 986 and 958 in the same runs,
    with no ~55 s compile (session 8, ``results/sample-h200-session8.json``).
    ``padded_rows`` (default on) pads the fused path's chunks to a multiple of :data:`FUSED_ROW_MULTIPLE` rows
    (copies of the last image; each image decodes on its own), so chunks of many sizes share a few shapes and
    cuDNN's per-shape algorithm search.
    ``small_graph`` (default: when compiled on CUDA) replays the compiled path for one or two images from a
    CUDA graph, captured at the end of the first call at that size and replayed from the second on: the
    one-image decode is bound by kernel launches (~300 small kernels; 3.6-9.9 ms for the same code on
    different hosts in session 9), a replay is one launch, and it runs the same kernels on the same shapes,
    so it decodes exactly as without it (checked on the H200: equal outputs; not recorded in synthesize.json
    for that reason). The graph's input and output buffers are the decoder's own: call one decoder from one
    stream at a time (``medaug synthesize`` decodes on one stream).
    With float32 weights and every option off it computes exactly :meth:`VQVAE.decode`.
    On CUDA it turns on ``torch.backends.cudnn.benchmark`` (convolution algorithms picked per shape).
    """

    def __init__(
        self,
        vqvae: VQVAE,
        *,
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
        fold_upsample: bool | None = None,
        gemm_attention: bool = True,
        fused_norm: bool | None = None,
        channel_stats_norm: bool | None = None,
        norm_row_bands: int = 1,
        channel_stats_min_batch: int = 32,
        max_chunk: int = 256,
        padded_output: bool = True,
        phase_upsample: bool = True,
        small_graph: bool | None = None,
        padded_rows: bool = True,
    ):
        self.config = vqvae.config
        self.device = vqvae.post_quant_conv.weight.device
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.compiled = cuda if compile is None else compile
        # eager bf16 at batch 256 on the H200: NCHW 501 images/s, channels-last 353; compiled, channels-last wins
        self.channels_last = (cuda and self.compiled) if channels_last is None else channels_last
        self.max_chunk = max_chunk
        self.fold_upsample = cuda if fold_upsample is None else fold_upsample
        self.gemm_attention = gemm_attention
        if fused_norm is None:
            from medaug.models.fused_decode import fused_default

            fused_norm = fused_default(self.device)
        self.fused_norm = fused_norm
        self.padded_output = padded_output
        self.phase_upsample = phase_upsample
        self.small_graph = (cuda and self.compiled) if small_graph is None else small_graph
        self.padded_rows = padded_rows
        self._graphs: dict[int, _DecodeGraph | None] = {}  # rows → captured graph (None: capture failed)
        default_stats = cuda and self.compiled and not fused_norm
        self.channel_stats_norm = default_stats if channel_stats_norm is None else channel_stats_norm
        self.channel_stats_min_batch = channel_stats_min_batch
        self.path = self._decode_path(vqvae, None)
        self.stats_path = self._decode_path(vqvae, norm_row_bands) if self.channel_stats_norm else None
        self.fused_path = self._fused_path(vqvae) if fused_norm else None
        self._upsampler: CodeUpsampler | None = None
        self._chunk: int | None = None
        self._forward = self._runner(self.path)
        self._stats_forward = self._runner(self.stats_path) if self.stats_path is not None else None
        if cuda:
            torch.backends.cudnn.benchmark = True

    def _runner(self, path: _DecodePath) -> Any:
        """``path`` compiled (dynamic batch) when ``compiled``, else itself."""
        return torch.compile(path, dynamic=None) if self.compiled else path

    def _decode_path(self, vqvae: VQVAE, row_bands: int | None) -> _DecodePath:
        """A copy of the decode path in ``dtype`` (upsamples folded if set); with ``row_bands``, its GroupNorms
        computed from per-channel statistics (and its attention as GEMMs if set)."""
        decoder = copy.deepcopy(vqvae.decoder)
        if self.fold_upsample:
            fold_upsamples(decoder)
        if row_bands is not None:
            if self.gemm_attention:
                gemm_attentions(decoder)  # before the norms: its GroupNorm is replaced with the others
            channel_stats_group_norms(decoder, row_bands)
        path = _DecodePath(copy.deepcopy(vqvae.post_quant_conv), decoder).eval()
        path = path.to(self.dtype).requires_grad_(False)
        return path.to(memory_format=torch.channels_last) if self.channels_last else path

    def _fused_path(self, vqvae: VQVAE) -> nn.Module:
        """:class:`~medaug.models.fused_decode.FusedDecodePath` over a copy of the plain decode path
        (channels-last, uncompiled: its kernels are Triton's)."""
        from medaug.models.fused_decode import OUT_CHANNEL_MULTIPLE, FusedDecodePath, triton_available

        if self.device.type == "cuda" and not triton_available():
            log.warning("fused_norm: Triton is not installed; the fused decode path runs its torch reference")
        path = self._decode_path(vqvae, None)
        multiple = OUT_CHANNEL_MULTIPLE if self.padded_output else 1
        path = FusedDecodePath(path.post_quant_conv, path.decoder, multiple, self.phase_upsample)
        return path.eval().to(memory_format=torch.channels_last)

    def chunk_size(self) -> int:
        """Images per decoder call (class docstring): at most ``max_chunk``; on CUDA what fits in a third of
        the device's total memory, fixed once computed (halved after an out-of-memory error)."""
        if self.device.type != "cuda":
            return self.max_chunk
        if self._chunk is None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            per_image = self.config.image_size**2 * self.config.base_channels * itemsize * DECODE_BYTES_PER_PIXEL_CHANNEL
            self._chunk = max(1, min(self.max_chunk, total // 3 // per_image))
        return self._chunk

    @torch.no_grad()
    def decode(self, f_hat_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (B, C_img, H, W) float32, logits (B, S + 1, H, W) in ``dtype``), as :meth:`VQVAE.decode`."""
        while True:
            chunk = self.chunk_size()
            try:
                outputs = [self._decode_chunk(f_hat_BCHW[s:s + chunk]) for s in range(0, f_hat_BCHW.shape[0], chunk)]
                break
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                self._chunk = chunk // 2
                log.warning("decoder out of memory at %d images per call; decoding %d at a time from now on",
                            chunk, self._chunk)
                torch.cuda.empty_cache()
        out_BCHW = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        channels = self.config.image_channels
        image_BCHW = out_BCHW[:, :channels].float()
        if self.config.image_head == "tanh":
            image_BCHW = torch.tanh(image_BCHW)
        if self.config.num_structures:
            return image_BCHW, out_BCHW[:, channels:]
        return image_BCHW, out_BCHW.new_zeros(out_BCHW.shape[0], 1, *out_BCHW.shape[2:])

    def _decode_chunk(self, f_hat_BCHW: torch.Tensor) -> torch.Tensor:
        batch = f_hat_BCHW.shape[0]
        forward, rows = self._path_for(batch)
        x_BCHW = f_hat_BCHW.to(self.dtype)
        if rows > batch:  # padded with copies of the last image (each image decodes on its own)
            x_BCHW = torch.cat((x_BCHW, x_BCHW[-1:].expand(rows - batch, -1, -1, -1)))
        if self.channels_last:
            x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(x_BCHW, 0)
        if self.small_graph and forward is self._forward and rows <= GRAPH_MAX_ROWS and x_BCHW.is_cuda:
            return self._replayed(forward, x_BCHW)[:batch]
        return forward(x_BCHW)[:batch]

    def _replayed(self, forward: Any, x_BCHW: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` from the CUDA graph of its row count: the first call runs it (compiling it and picking
        cuDNN's algorithms outside any capture) and captures the graph for the next ones."""
        rows = x_BCHW.shape[0]
        if rows not in self._graphs:
            out_BCHW = forward(x_BCHW)
            try:
                self._graphs[rows] = self._capture(forward, x_BCHW)
            except RuntimeError as error:  # e.g. another thread's CUDA call during the capture: run without
                log.warning("decoder: no CUDA graph for %d rows (%s); decoding them without one", rows, error)
                self._graphs[rows] = None
            return out_BCHW
        graph = self._graphs[rows]
        if graph is None:
            return forward(x_BCHW)
        graph.input.copy_(x_BCHW)
        graph.graph.replay()
        return graph.output.clone()

    @staticmethod
    def _capture(forward: Any, x_BCHW: torch.Tensor) -> _DecodeGraph:
        static_BCHW = x_BCHW.clone()
        torch._dynamo.maybe_mark_dynamic(static_BCHW, 0)  # as the calls it replaces: no recompilation
        current = torch.cuda.current_stream(x_BCHW.device)
        stream = torch.cuda.Stream(x_BCHW.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):  # warm-up off the capture, as CUDA graphs need
            forward(static_BCHW)
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # entering synchronizes the device once per row count (a sampler running beside it waits that once);
        # thread-local: CUDA calls of other threads during the capture neither fail nor break it
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out_BCHW = forward(static_BCHW)
        return _DecodeGraph(graph, static_BCHW, out_BCHW)

    def _path_for(self, batch: int) -> tuple[Any, int]:
        """The (compiled) decode path for a chunk of ``batch`` images and the rows to run it on: the fused path
        (if ``fused_norm``; rows padded if ``padded_rows``) or else per-channel statistics from
        ``channel_stats_min_batch`` images on, torch's GroupNorm below (by configuration alone, so a batch
        decodes the same whatever ran before). Compiled, a single image is padded to two (a size-1 batch
        would be specialised: compile once)."""
        if self.fused_path is not None and batch >= self.channel_stats_min_batch:
            if not self.padded_rows:
                return self.fused_path, batch
            return self.fused_path, max(batch, min(-(-batch // FUSED_ROW_MULTIPLE) * FUSED_ROW_MULTIPLE,
                                                   self.chunk_size()))
        rows = 2 if self.compiled and batch == 1 else batch
        if self._stats_forward is not None and batch >= self.channel_stats_min_batch:
            return self._stats_forward, rows
        return self._forward, rows

    @torch.no_grad()
    def indices_to_img(
        self, quantizer: MultiScaleQuantizer, indices: list[torch.Tensor], annotated_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode token maps: (image float32 clamped to [-1, 1], label (B, H, W) int64 model-local).

        ``quantizer``: the VQVAE's (float32); ``annotated_BS``: see :func:`logits_to_label`.
        """
        if self.device.type == "cuda":  # PyTorch's bicubic kernel is slow on CUDA: the exact linear map
            if self._upsampler is None or self._upsampler.quantizer is not quantizer:
                self._upsampler = CodeUpsampler(quantizer, self.device)
            f_hat_BCHW = self._upsampler.features(indices)
        else:
            f_hat_BCHW = quantizer.indices_to_features(indices)
        image_BCHW, logits_BKHW = self.decode(f_hat_BCHW)
        return image_BCHW.clamp(-1.0, 1.0), logits_to_label(logits_BKHW, annotated_BS)


__all__ = [
    "IGNORE_LABEL",
    "CodeUpsampler",
    "FastDecoder",
    "FUSED_ROW_MULTIPLE",
    "GRAPH_MAX_ROWS",
    "ChannelStatsGroupNorm",
    "FoldedUpsample",
    "GemmSelfAttention",
    "channel_stats_group_norms",
    "VQVAEConfig",
    "VQVAE",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "SelfAttention",
    "label_to_onehot",
    "fold_upsamples",
    "gemm_attention",
    "gemm_attentions",
    "logits_to_label",
    "norm_groups",
    "replace_modules",
]
