"""Multi-scale residual vector quantizer: the bottleneck of VAR's tokenizer (VAR-NOTES.md, DESIGN.md §4).

A latent ``f`` of shape (B, C, h, w) with ``h == w == patch_sides[-1]`` is described by K token maps of
growing side ``p_0 < p_1 < ... < p_{K-1}``, all drawn from one shared codebook (V entries of C dims).
Encoding keeps a residual ``r = f`` and an accumulator ``f_hat = 0``; at scale k it area-downsamples ``r``
to ``p_k`` (the last scale as is), picks the nearest code at every position (L2), looks the codes up,
upsamples them bicubically to ``h`` (the last scale needs none), passes them through a residual conv φ
and adds the result to ``f_hat`` and subtracts it from ``r``. Decoding reads ``f_hat`` after all scales.

φ(x) = (1 - ratio)·x + ratio·conv3x3(x); ``num_phi`` convs are shared over the K scales, scale k using the
one whose anchor (evenly spaced from 1/(3·num_phi) to 1 - 1/(3·num_phi)) is nearest to k/(K-1).

Training signal (the VAR formulation). ``forward`` returns ``f_hat_st = f + sg[f_hat - f]`` (the
straight-through estimator on the accumulated reconstruction: the decoder sees ``f_hat``, the encoder
receives the decoder's gradient) and the quantization loss

    loss = mean_k ( beta·‖sg[f_hat_k] - f‖² + ‖f_hat_k - sg[f]‖² )

where ``f_hat_k`` is the accumulator after scales 0..k and ‖·‖² is a mean over elements. The first term
commits the encoder to its reconstruction; the second trains the codebook and the φ convs by gradient
(no EMA updates), so the codebook is an ordinary parameter that any optimizer and DDP handle as usual.
Codes that fall out of use are re-initialized from encoder outputs with :meth:`reinit_dead_codes`.

Token layout for the transformer: scale k's indices (B, p_k, p_k) are flattened row-major and scales
are concatenated in order, giving L = Σ p_k² tokens (680 for the 256² schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medaug.errors import ConfigError

VAR_PATCH_SIDES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
"""VAR's schedule for a 16×16 latent (256² images, 16× downsampling): L = 680 tokens."""

VAR_PATCH_SIDES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
"""VAR's schedule for a 32×32 latent (512² images, 16× downsampling): L = 2240 tokens."""

# Distance matrices are computed in chunks of at most this many elements (64 Mi floats = 256 MiB).
_DISTANCE_CHUNK_ELEMENTS = 1 << 26


def default_patch_sides(image_size: int, downsample: int = 16) -> tuple[int, ...]:
    """The scale schedule for square ``image_size``² images and a ``downsample``× encoder.

    The latent side is ``image_size // downsample``: 16 gives VAR's (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    32 VAR's 512² schedule; any other side takes the sides of the 16-schedule below it and ends with
    itself (8 → (1, 2, 3, 4, 5, 6, 8), 4 → (1, 2, 3, 4)).
    """
    if image_size <= 0 or downsample <= 0 or image_size % downsample:
        raise ConfigError("image_size", f"is {image_size}; expected a positive multiple of {downsample}")
    latent_side = image_size // downsample
    if latent_side == 32:
        return VAR_PATCH_SIDES_512
    smaller = tuple(side for side in VAR_PATCH_SIDES_256 if side < latent_side)
    return smaller + (latent_side,)


def phi_assignment(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which shared φ conv each scale uses (VAR's rule), as a tuple of length ``num_scales``.

    Scale k sits at k/(K-1) in [0, 1] (0 when K = 1) and uses the φ whose anchor, evenly spaced from
    1/(3n) to 1 - 1/(3n), is nearest. Computed as VAR computes it (float64 ``numpy.linspace``, first
    minimum) so that checkpoints agree with VAR's layout: several schedules have exact rational ties
    (K=10, n=4 at k=2 and k=7, 5/36 either side) that float rounding decides; for K=10, n=4 the result
    is (0, 0, 1, 1, 1, 2, 2, 3, 3, 3).
    """
    anchors = np.linspace(1 / (3 * num_phi), 1 - 1 / (3 * num_phi), num_phi)
    positions = [k / (num_scales - 1) if num_scales > 1 else 0.0 for k in range(num_scales)]
    return tuple(int(np.argmin(np.abs(anchors - position))) for position in positions)


@dataclass(frozen=True)
class QuantizerConfig:
    """Multi-scale residual quantizer settings (defaults: VAR's 256² tokenizer).

    codebook_size: V, the number of shared codes (the transformer's vocabulary).
    latent_dim: C, the dimension of a code and of the encoder's latent.
    patch_sides: token-map sides p_0 < ... < p_{K-1}; the last equals the latent side
        (image side / downsampling); see :func:`default_patch_sides` for 64² and 128² schedules.
    num_phi: the number of shared 3×3 residual convs φ.
    phi_ratio: r in φ(x) = (1 - r)·x + r·conv(x); 0 makes φ the identity.
    beta: commitment weight on ‖sg[f_hat_k] - f‖².
    """

    codebook_size: int = 4096
    latent_dim: int = 32
    patch_sides: tuple[int, ...] = VAR_PATCH_SIDES_256
    num_phi: int = 4
    phi_ratio: float = 0.5
    beta: float = 0.25

    def __post_init__(self) -> None:
        sides = self.patch_sides
        if not sides or sides[0] < 1 or any(b <= a for a, b in zip(sides, sides[1:])):
            raise ConfigError("quantizer.patch_sides", f"is {sides}; expected increasing positive sides")
        for name in ("codebook_size", "latent_dim", "num_phi"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantizer.{name}", f"is {getattr(self, name)}; expected >= 1")
        if not 0.0 <= self.phi_ratio <= 1.0:
            raise ConfigError("quantizer.phi_ratio", f"is {self.phi_ratio}; expected a value in [0, 1]")
        if self.beta < 0:
            raise ConfigError("quantizer.beta", f"is {self.beta}; expected >= 0")


class Phi(nn.Module):
    """φ(x) = (1 - ratio)·x + ratio·conv3x3(x), channels preserved."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.ratio) * x_BCHW + self.ratio * self.conv(x_BCHW)


def area_resize(x_BCHW: torch.Tensor, side: int) -> torch.Tensor:
    """Area-average ``x`` to ``side``×``side``; returned as is when it already has that size."""
    if x_BCHW.shape[-2:] == (side, side):
        return x_BCHW
    return F.interpolate(x_BCHW, size=(side, side), mode="area")


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer with a shared codebook and shared φ convs.

    Buffers: ``usage_counts`` (V,) int64, how often each code was picked by training-mode forwards since
    the last :meth:`reinit_dead_codes` (or :meth:`reset_usage_counts`). The model does no distributed
    work: under DDP, construct the wrapper with ``broadcast_buffers=False`` and all-reduce the counts
    before passing them to :meth:`reinit_dead_codes`.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.codebook_size, config.latent_dim)
        # Small uniform codes (VAR's default); dead-code re-initialization gives them real values early.
        bound = 1.0 / config.codebook_size
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.phis = nn.ModuleList(Phi(config.latent_dim, config.phi_ratio) for _ in range(config.num_phi))
        self.phi_index = phi_assignment(len(config.patch_sides), config.num_phi)
        self.register_buffer("usage_counts", torch.zeros(config.codebook_size, dtype=torch.long))

    @property
    def patch_sides(self) -> tuple[int, ...]:
        return self.config.patch_sides

    @property
    def num_scales(self) -> int:
        return len(self.config.patch_sides)

    @property
    def latent_side(self) -> int:
        return self.config.patch_sides[-1]

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        """p_k² for each scale: (1, 4, 9, ..., 256) for the 256² schedule."""
        return tuple(side * side for side in self.config.patch_sides)

    @property
    def total_tokens(self) -> int:
        """L = Σ p_k² (680 for the 256² schedule)."""
        return sum(self.tokens_per_scale)

    # ---------------------------------------------------------------- one scale
    def nearest_codes(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index (N,) int64 of the nearest code (L2) to each row of ``z_NC`` (N, C).

        ‖z - e‖² = ‖z‖² - 2 z·e + ‖e‖² as one matmul per chunk; ‖z‖² is the same for every code of a row,
        so it is left out of the argmin. Computed in float32 whatever the input dtype.
        """
        codes_VC = self.embedding.weight.detach().float()
        codes_sq_V = (codes_VC * codes_VC).sum(dim=1)
        chunk = max(1, _DISTANCE_CHUNK_ELEMENTS // codes_VC.shape[0])
        picks = []
        for start in range(0, z_NC.shape[0], chunk):
            z_nC = z_NC[start:start + chunk].detach().float()
            distance_nV = torch.addmm(codes_sq_V.unsqueeze(0), z_nC, codes_VC.t(), alpha=-2.0)
            picks.append(distance_nV.argmin(dim=1))
        return torch.cat(picks) if picks else z_NC.new_zeros(0, dtype=torch.long)

    def quantize_scale(self, residual_BCHW: torch.Tensor, k: int) -> torch.Tensor:
        """Nearest-code indices (B, p_k, p_k) of ``residual`` area-downsampled to side p_k."""
        side = self.patch_sides[k]
        small_BCpp = area_resize(residual_BCHW, side)
        batch, channels = small_BCpp.shape[:2]
        z_NC = small_BCpp.permute(0, 2, 3, 1).reshape(-1, channels)  # (B·p·p, C), row-major positions
        return self.nearest_codes(z_NC).view(batch, side, side)

    def scale_contribution(self, indices_Bpp: torch.Tensor, k: int) -> torch.Tensor:
        """φ_k(upsample(codes)): what scale k adds to the accumulator, (B, C, h, h)."""
        side = self.patch_sides[k]
        if indices_Bpp.shape[-2:] != (side, side):
            raise ValueError(f"scale {k}: indices have shape {tuple(indices_Bpp.shape)}; expected (B, {side}, {side})")
        codes_BCpp = self.embedding(indices_Bpp).permute(0, 3, 1, 2)  # (B, C, p, p)
        if side != self.latent_side:
            codes_BCpp = F.interpolate(codes_BCpp, size=(self.latent_side, self.latent_side), mode="bicubic")
        return self.phis[self.phi_index[k]](codes_BCpp.contiguous())

    # ---------------------------------------------------------------- training forward
    def forward(self, f_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize ``f`` (B, C, h, h): returns (f_hat_st (B, C, h, h), loss (scalar), stats).

        Runs in float32 (autocast off). ``stats`` holds detached tensors: ``usage_K`` (K,) fraction of
        the V codes used at each scale in this batch, ``perplexity_K`` (K,) exp(entropy) of each scale's
        code histogram, ``usage`` the fraction used at any scale. Training mode adds the picks to
        ``usage_counts``.
        """
        self._check_latent(f_BCHW)
        with torch.autocast(device_type=f_BCHW.device.type, enabled=False):
            f_BCHW = f_BCHW.float()
            f_detached = f_BCHW.detach()
            residual_BCHW = f_detached.clone()
            f_hat_BCHW = torch.zeros_like(f_detached)
            loss = f_BCHW.new_zeros(())
            counts = []
            for k in range(self.num_scales):
                indices_Bpp = self.quantize_scale(residual_BCHW, k)
                h_BCHW = self.scale_contribution(indices_Bpp, k)
                f_hat_BCHW = f_hat_BCHW + h_BCHW
                residual_BCHW = residual_BCHW - h_BCHW.detach()
                commitment = F.mse_loss(f_hat_BCHW.detach(), f_BCHW)
                loss = loss + self.config.beta * commitment + F.mse_loss(f_hat_BCHW, f_detached)
                counts.append(torch.bincount(indices_Bpp.flatten(), minlength=self.config.codebook_size))
            loss = loss / self.num_scales
            f_hat_st_BCHW = f_BCHW + (f_hat_BCHW - f_BCHW).detach()
        counts_KV = torch.stack(counts)
        if self.training:
            self.usage_counts += counts_KV.sum(dim=0)
        return f_hat_st_BCHW, loss, codebook_stats(counts_KV)

    # ---------------------------------------------------------------- conversions
    @torch.no_grad()
    def features_to_indices(self, f_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale code indices of ``f`` (B, C, h, h): a list of K int64 tensors (B, p_k, p_k)."""
        self._check_latent(f_BCHW)
        residual_BCHW = f_BCHW.float()
        indices = []
        for k in range(self.num_scales):
            indices_Bpp = self.quantize_scale(residual_BCHW, k)
            residual_BCHW = residual_BCHW - self.scale_contribution(indices_Bpp, k)
            indices.append(indices_Bpp)
        return indices

    def indices_to_features(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The accumulator f_hat (B, C, h, h) after all K scales, i.e. the decoder's input."""
        self._check_indices(indices, self.num_scales)
        f_hat_BCHW = self.empty_accumulator(indices[0].shape[0], indices[0].device)
        for k, indices_Bpp in enumerate(indices):
            f_hat_BCHW = self.next_accumulator(f_hat_BCHW, k, indices_Bpp)
        return f_hat_BCHW

    def indices_to_teacher_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs for scales 1..K-1 under teacher forcing: (B, L - p_0², C).

        The input of scale k is the accumulator after scales 0..k-1, area-downsampled to p_k and
        flattened row-major; scales are concatenated in order. Only indices of scales 0..K-2 are used.
        """
        self._check_indices(indices, self.num_scales - 1)
        f_hat_BCHW = self.empty_accumulator(indices[0].shape[0], indices[0].device)
        inputs = [f_hat_BCHW.new_zeros(f_hat_BCHW.shape[0], 0, self.config.latent_dim)]  # K = 1: no inputs
        for k in range(self.num_scales - 1):
            f_hat_BCHW = self.next_accumulator(f_hat_BCHW, k, indices[k])
            inputs.append(self.accumulator_to_next_input(f_hat_BCHW, k))
        return torch.cat(inputs, dim=1)

    def empty_accumulator(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """f_hat before any scale: zeros (B, C, h, h) float32."""
        side = self.latent_side
        return torch.zeros(batch, self.config.latent_dim, side, side, device=device)

    def next_accumulator(self, f_hat_BCHW: torch.Tensor, k: int, indices_Bpp: torch.Tensor) -> torch.Tensor:
        """f_hat after scale k: ``f_hat + φ_k(upsample(codes of indices_Bpp))`` (sampler step)."""
        return f_hat_BCHW + self.scale_contribution(indices_Bpp, k)

    def accumulator_to_next_input(self, f_hat_BCHW: torch.Tensor, k: int) -> torch.Tensor:
        """The transformer input of scale k+1: f_hat area-downsampled to p_{k+1}, (B, p_{k+1}², C)."""
        if not 0 <= k < self.num_scales - 1:
            raise ValueError(f"scale {k} has no next scale; expected 0 <= k < {self.num_scales - 1}")
        small_BCpp = area_resize(f_hat_BCHW, self.patch_sides[k + 1])
        return small_BCpp.flatten(2).transpose(1, 2)  # (B, p·p, C), row-major

    def indices_to_tokens(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-scale indices row-major into one token sequence (B, L) int64."""
        self._check_indices(indices, self.num_scales)
        return torch.cat([indices_Bpp.flatten(1) for indices_Bpp in indices], dim=1)

    def tokens_to_indices(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """Split a token sequence (B, L) back into K maps (B, p_k, p_k)."""
        if tokens_BL.dim() != 2 or tokens_BL.shape[1] != self.total_tokens:
            raise ValueError(f"tokens have shape {tuple(tokens_BL.shape)}; expected (B, {self.total_tokens})")
        pieces = torch.split(tokens_BL, list(self.tokens_per_scale), dim=1)
        return [piece.reshape(-1, side, side) for piece, side in zip(pieces, self.patch_sides)]

    # ---------------------------------------------------------------- codebook health
    def reset_usage_counts(self) -> None:
        """Start a new usage window."""
        self.usage_counts.zero_()

    @torch.no_grad()
    def reinit_dead_codes(
        self,
        features_BCHW: torch.Tensor,
        usage_counts_V: torch.Tensor,
        threshold: int = 1,
        generator: torch.Generator | None = None,
    ) -> int:
        """Re-initialize codes used fewer than ``threshold`` times; returns how many were replaced.

        ``features_BCHW``: a sample of current encoder outputs (B, C, h, h). ``usage_counts_V``: hits per
        code over the window (normally ``self.usage_counts``, all-reduced across ranks by the caller).
        Dead codes get random picks (``generator``, on the features' device) among the pre-quantization
        residual vectors of every scale; the usage window restarts afterwards. Under DDP, call it with
        the same features and seed on every rank so that the codebooks stay identical. Optimizer state
        of the replaced rows (Adam moments) is left as is; the training task may reset it.
        """
        dead_V = usage_counts_V.to(self.usage_counts.device) < threshold
        num_dead = int(dead_V.sum())
        if num_dead:
            residuals_NC = self.scale_residuals(features_BCHW)
            picks = _random_rows(residuals_NC.shape[0], num_dead, generator, residuals_NC.device)
            weight = self.embedding.weight
            weight[dead_V.to(weight.device)] = residuals_NC[picks].to(weight.dtype)
        self.reset_usage_counts()
        return num_dead

    @torch.no_grad()
    def scale_residuals(self, f_BCHW: torch.Tensor) -> torch.Tensor:
        """All pre-quantization residual vectors (the area-downsampled r of every scale), (N, C)."""
        self._check_latent(f_BCHW)
        residual_BCHW = f_BCHW.float()
        vectors = []
        for k, side in enumerate(self.patch_sides):
            small_BCpp = area_resize(residual_BCHW, side)
            vectors.append(small_BCpp.permute(0, 2, 3, 1).reshape(-1, small_BCpp.shape[1]))  # (B·p·p, C)
            indices_Bpp = self.quantize_scale(residual_BCHW, k)
            residual_BCHW = residual_BCHW - self.scale_contribution(indices_Bpp, k)
        return torch.cat(vectors)

    # ---------------------------------------------------------------- checks
    def _check_latent(self, f_BCHW: torch.Tensor) -> None:
        expected = (self.config.latent_dim, self.latent_side, self.latent_side)
        if f_BCHW.dim() != 4 or tuple(f_BCHW.shape[1:]) != expected:
            raise ValueError(f"latent has shape {tuple(f_BCHW.shape)}; expected (B, {', '.join(map(str, expected))})")

    def _check_indices(self, indices: list[torch.Tensor], needed: int) -> None:
        if len(indices) < max(needed, 1):
            raise ValueError(f"got indices for {len(indices)} scales; expected at least {max(needed, 1)}")


def codebook_stats(counts_KV: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-scale usage fraction and perplexity from code hit counts (K, V); all detached float32."""
    counts_KV = counts_KV.detach().float()
    probs_KV = counts_KV / counts_KV.sum(dim=1, keepdim=True).clamp(min=1.0)
    entropy_K = -(probs_KV * probs_KV.clamp(min=1e-12).log()).sum(dim=1)
    return {
        "usage_K": (counts_KV > 0).float().mean(dim=1),
        "perplexity_K": entropy_K.exp(),
        "usage": (counts_KV.sum(dim=0) > 0).float().mean(),
    }


def _random_rows(
    num_rows: int, num_picks: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``num_picks`` row indices in [0, num_rows): without replacement when there are enough rows."""
    gen_device = generator.device if generator is not None else device
    if num_picks <= num_rows:
        picks = torch.randperm(num_rows, generator=generator, device=gen_device)[:num_picks]
    else:
        picks = torch.randint(num_rows, (num_picks,), generator=generator, device=gen_device)
    return picks.to(device)


__all__ = [
    "VAR_PATCH_SIDES_256",
    "VAR_PATCH_SIDES_512",
    "QuantizerConfig",
    "MultiScaleQuantizer",
    "Phi",
    "area_resize",
    "codebook_stats",
    "default_patch_sides",
    "phi_assignment",
]
