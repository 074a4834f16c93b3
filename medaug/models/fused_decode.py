"""The tokenizer's decode path with GroupNorm + SiLU in hand-written Triton kernels beside cuDNN convolutions.

Why: at batch 256 on the H200 the compiled decoder spent ~71 of ~265 ms in inductor's GroupNorm, SiLU and
residual kernels, moving bytes at about half the device's bandwidth (their channels-last reductions read
64-byte pieces strided by the channel count, session 7's profile). Here every such pass is one Triton
kernel that reads (pixels, channels) tiles of channels-last memory whole, and convolutions run without
their bias, which is folded into what reads their output:

* :func:`channel_moments` — per-image, per-channel mean and sum of squared deviations over equal splits
  of the pixels (running Welford moments per tile lane, combined exactly into channels, then groups),
  optionally of ``x + h + bias`` written out in the same pass (the residual add);
* :func:`group_scale_shift` — GroupNorm's per-(image, channel) scale and shift from those moments, with a
  bias the stored tensor has not received yet folded into the shift;
* :func:`scale_shift_act` — ``x·scale + shift`` (then SiLU) in one pass.

A residual block is then: norm1 + SiLU (1 read, 1 write), conv1 (cuDNN), its moments (1 read), norm2 +
SiLU (1 read, 1 write), conv2, and the residual add with the next norm's moments (2 reads, 1 write):
eight passes, as the compiled graph, but at close to full bandwidth, and no ``torch.compile`` (Triton
compiles each kernel in seconds, against ~55 s for the decoder graph).

An upsample (nearest ×2 + 3×3 conv, folded into a stride-2 transposed 4×4 conv) whose map only these kernels
read (the next block's skip is the identity) runs in its *phase form*: one 2×2 conv with four times the
output channels on the 1-padded input (:func:`phase_weight`), whose output phase (p, q) at window
(m + p, n + q) is upsampled pixel (2m + p, 2n + q). cuDNN runs that as a plain conv (6.35 ms into 256² at
batch 256 on the H200, against 10.75 ms for the transposed conv's ``dgrad`` kernel), and the kernels read
each pixel's channels from its phase in place (``PHASE``), so the map is never interleaved in memory
(:func:`interleave_phases` is the torch form). Decoder at batch 256, same run: 1,018 against 1,004 images/s.

Without Triton (the CPU build of torch) or on CPU tensors the same functions run as plain torch in float32
(:func:`moments_reference`, :func:`scale_shift_act_reference`): :class:`FusedDecodePath` in float32
computes :meth:`medaug.models.vqvae.VQVAE.decode` (tested), and the kernels are tested against those
references in Triton's interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # the CPU build of torch comes without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

@dataclass
class KernelSettings:
    """Launch settings of one kernel: pixels per tile (fewer where an image has fewer: the largest power of
    two dividing its pixel count, at most this), warps per program, software-pipelining stages of the pixel
    loop (1: none)."""

    block_pixels: int
    warps: int
    stages: int


# The best of a sweep on the H200 at (256, 160, 256, 256) bf16 (session 8, results/sample-h200-session8.json):
# moments 1.52 ms (3.5 TB/s; a plain copy moves 4.2), residual add + moments 4.61 ms, scale-shift-SiLU 3.03 ms
MOMENTS = KernelSettings(block_pixels=128, warps=4, stages=3)
""":func:`channel_moments` reading x (+ bias) only."""
ADD_MOMENTS = KernelSettings(block_pixels=128, warps=4, stages=1)
""":func:`channel_moments` that writes its sum (the residual add)."""
SCALE_SHIFT = KernelSettings(block_pixels=256, warps=8, stages=1)
""":func:`scale_shift_act`."""
OUT_CHANNEL_MULTIPLE = 32
"""The decoder's output conv runs with zero-padded output channels up to a multiple of this: at (256, 160,
256, 256) bf16 on the H200, 160 → 23 channels took 8.62 ms, padded to 24 7.58, to 32 5.69, to 48 5.58, to
64 5.75 (cuDNN's tiles are 64 or more channels wide; ``benchmarks/sample.py --part c``, session 9)."""
FUSED_PROGRAMS = 65_536
"""Programs a launch aims at (channel blocks × images × splits of the pixels): many short programs keep the
last wave small (16,384 ran the kernels 12-24 % slower)."""


def triton_available() -> bool:
    """Whether the Triton kernels can run: Triton imports (compiled on CUDA, or TRITON_INTERPRET=1 on the CPU)."""
    return triton is not None


MIN_CAPABILITY = (8, 0)
"""GPUs the fused path is the default on (Ampere and later: bf16 tensor cores, Triton's supported range)."""


def fused_default(device: torch.device | str) -> bool:
    """Whether the fused decode path is the default on ``device``: a CUDA GPU of :data:`MIN_CAPABILITY` or
    later where Triton imports (older GPUs keep the torch decoder rather than fail in Triton's compiler)."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_available() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether ``triton.jit`` made interpreted kernels (it reads the variable when this module is imported)."""


def _use_kernels(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _INTERPRETED)


def block_channels(channels: int) -> int:
    """Channels per tile: the largest power of two ≤ 64 dividing ``channels`` (no masked lanes) when it is
    at least 16, else the next power of two ≥ ``channels`` (masked), at most 64. (Whole rows per tile, lanes
    masked, measured no better on the H200.)"""
    largest = channels & -channels
    if largest >= 16:
        return min(largest, 64)
    return min(64, triton.next_power_of_2(channels) if triton is not None else 1 << (channels - 1).bit_length())


def tile_pixels(split_pixels: int, settings: KernelSettings) -> int:
    """Pixels per tile for splits of ``split_pixels`` pixels: ``settings.block_pixels``, or the largest power
    of two dividing ``split_pixels`` where that is less."""
    return min(settings.block_pixels, split_pixels & -split_pixels)


def pixel_splits(batch: int, channels: int, pixels: int, settings: KernelSettings) -> int:
    """Equal splits of each image's pixels: the smallest power of two giving :data:`FUSED_PROGRAMS` programs
    while every split keeps at least one whole tile of ``settings.block_pixels``."""
    blocks = -(-channels // block_channels(channels))
    splits = 1
    while (batch * blocks * splits < FUSED_PROGRAMS and pixels % (2 * splits) == 0
           and pixels // (2 * splits) >= settings.block_pixels):
        splits *= 2
    return splits


def _checked_splits(splits: int | None, shape: tuple[int, ...], settings: KernelSettings) -> int:
    batch, channels, height, width = shape
    if splits is None:
        return pixel_splits(batch, channels, height * width, settings)
    if splits < 1 or (height * width) % splits:
        raise ValueError(f"splits is {splits}; expected a positive divisor of the {height * width} pixels per image")
    return splits


# ---------------------------------------------------------------- the phase form of an upsample
PHASE_TAPS = ((3, 1), (2, 0))
"""PHASE_TAPS[p][a]: the tap of a stride-2, padding-1 transposed 4×4 conv that phase p (output rows
2m + p) applies to row a of its 2×2 window on the 1-padded input (input rows m + p - 1 + a)."""


def phase_weight(transposed_IOkk: torch.Tensor) -> torch.Tensor:
    """The weight (4·C_out, C_in, 2, 2) of the phase form of a stride-2, padding-1 transposed 4×4 conv with
    weight (C_in, C_out, 4, 4): output channel (2·p + q)·C_out + o is output o at rows 2m + p, columns
    2n + q, computed at window (m + p, n + q) of the 1-padded input (the same taps, in the same dtype)."""
    taps = torch.tensor(PHASE_TAPS, device=transposed_IOkk.device)
    phases = [transposed_IOkk[:, :, taps[p]][:, :, :, taps[q]].transpose(0, 1) for p in range(2) for q in range(2)]
    return torch.cat(phases)


def phase_shape(y_BQHW: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, C, 2S, 2S): the shape of the upsampled map whose phase form (B, 4·C, S + 1, S + 1) is ``y``."""
    batch, channels4, grid_h, grid_w = y_BQHW.shape
    return batch, channels4 // 4, 2 * (grid_h - 1), 2 * (grid_w - 1)


def _empty_map(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def interleave_phases(y_BQHW: torch.Tensor) -> torch.Tensor:
    """The upsampled map (B, C, 2S, 2S) channels-last from its phase form ``y`` (B, (2, 2, C), S + 1, S + 1):
    output (2m + p, 2n + q) is phase (p, q) at (m + p, n + q)."""
    batch, channels, height, width = phase_shape(y_BQHW)
    parts = y_BQHW.reshape(batch, 2, 2, channels, *y_BQHW.shape[2:])
    out_BCHW = _empty_map(y_BQHW, (batch, channels, height, width))
    for p in range(2):
        for q in range(2):
            out_BCHW[:, :, p::2, q::2] = parts[:, p, q, :, p:p + height // 2, q:q + width // 2]
    return out_BCHW


# ---------------------------------------------------------------- torch references (CPU, no Triton)
def _rows_BPC(x_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C) view of channels-last memory (a copy otherwise)."""
    batch, channels = x_BCHW.shape[:2]
    return x_BCHW.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, P, C)


def moments_reference(
    x_BCHW: torch.Tensor, h_BCHW: torch.Tensor | None, bias_C: torch.Tensor | None, write: bool, splits: int,
    phase: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`channel_moments` in plain torch (float32 arithmetic)."""
    if phase:
        x_BCHW = interleave_phases(x_BCHW)
    v_BCHW = x_BCHW.float()
    if h_BCHW is not None:
        v_BCHW = v_BCHW + h_BCHW.float()
    if bias_C is not None:
        v_BCHW = v_BCHW + bias_C.float()[:, None, None]
    out_BCHW = None
    if write:
        out_BCHW = v_BCHW.to(x_BCHW.dtype).contiguous(memory_format=torch.channels_last)
        v_BCHW = out_BCHW.float()
    batch, channels = x_BCHW.shape[:2]
    v_BSnC = _rows_BPC(v_BCHW).reshape(batch, splits, -1, channels)  # (B, S, P/S, C)
    var_BSC, mean_BSC = torch.var_mean(v_BSnC, dim=2, correction=0)
    return out_BCHW, mean_BSC, var_BSC * v_BSnC.shape[2]


def scale_shift_act_reference(x_BCHW: torch.Tensor, scale_BC: torch.Tensor, shift_BC: torch.Tensor,
                              silu: bool, phase: bool = False) -> torch.Tensor:
    """:func:`scale_shift_act` in plain torch (float32 arithmetic)."""
    if phase:
        x_BCHW = interleave_phases(x_BCHW)
    v_BCHW = x_BCHW.float() * scale_BC[:, :, None, None] + shift_BC[:, :, None, None]
    if silu:
        v_BCHW = F.silu(v_BCHW)
    return v_BCHW.to(x_BCHW.dtype).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _phase_index(image, offs_q, offs_c, channels, width, grid_h, grid_w):
        """Where pixel ``offs_q`` (row-major in its (2·Sh, 2·Sw) image, ``width`` = 2·Sw) and channel ``offs_c``
        of an upsampled map live in its phase form (:func:`interleave_phases`): (B, (2, 2, C), Sh + 1, Sw + 1)
        channels-last, ``grid_h`` = Sh + 1, ``grid_w`` = Sw + 1."""
        out_row = offs_q // width
        out_col = offs_q % width
        phase_row = out_row % 2
        phase_col = out_col % 2
        source = (image.to(tl.int64) * grid_h + out_row // 2 + phase_row) * grid_w + out_col // 2 + phase_col
        return (source * 4 + phase_row * 2 + phase_col)[:, None] * channels + offs_c[None, :]

    @triton.jit
    def _moments_kernel(x_ptr, h_ptr, bias_ptr, out_ptr, mean_ptr, m2_ptr, pixels, channels, split_pixels, splits,
                        channel_blocks, width, grid_h, grid_w,
                        HAS_H: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE: tl.constexpr, PHASE: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """Program (image·splits + split)·channel_blocks + channel block: moments of x (+ h) (+ bias) over its
        split's pixels, the sum written if WRITE (x read from its phase form if PHASE). Each tile lane keeps a
        running (Welford) mean and m2 of the values it sees, one per tile step; the lanes of a channel, equal
        in count, are combined once at the end."""
        row = tl.program_id(0) // channel_blocks
        image = row // splits
        split = row % splits
        offs_c = (tl.program_id(0) % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_c < channels)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_c, mask=offs_c < channels, other=0.0).to(tl.float32)
        first = image.to(tl.int64) * pixels + split * split_pixels
        mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        count = 0.0
        for start in tl.range(0, split_pixels, BLOCK_P, num_stages=STAGES):
            offs_p = first + start + tl.arange(0, BLOCK_P)
            index = offs_p[:, None] * channels + offs_c[None, :]
            if PHASE:
                offs_q = split * split_pixels + start + tl.arange(0, BLOCK_P)
                x_index = _phase_index(image, offs_q, offs_c, channels, width, grid_h, grid_w)
            else:
                x_index = index
            v = tl.load(x_ptr + x_index, mask=mask, other=0.0).to(tl.float32)
            if HAS_H:
                v += tl.load(h_ptr + index, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += bias[None, :]
            if WRITE:
                stored = v.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + index, stored, mask=mask)
                v = stored.to(tl.float32)
            count += 1.0
            delta = v - mean
            mean += delta * (1.0 / count)
            m2 += delta * (v - mean)
        channel_mean = tl.sum(mean, axis=0) / BLOCK_P
        spread = mean - channel_mean[None, :]
        channel_m2 = tl.sum(m2, axis=0) + count * tl.sum(spread * spread, axis=0)
        out_offs = row.to(tl.int64) * channels + offs_c
        tl.store(mean_ptr + out_offs, channel_mean, mask=offs_c < channels)
        tl.store(m2_ptr + out_offs, channel_m2, mask=offs_c < channels)

    @triton.jit
    def _scale_shift_act_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, pixels, channels, split_pixels, splits,
                                channel_blocks, width, grid_h, grid_w,
                                SILU: tl.constexpr, PHASE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                                STAGES: tl.constexpr):
        """Program (image·splits + split)·channel_blocks + channel block: out = x·scale + shift (then SiLU) over
        its split's pixels (x read from its phase form if PHASE)."""
        row = tl.program_id(0) // channel_blocks
        image = row // splits
        split = row % splits
        offs_c = (tl.program_id(0) % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_c < channels)[None, :]
        params = image.to(tl.int64) * channels + offs_c
        scale = tl.load(scale_ptr + params, mask=offs_c < channels, other=0.0)[None, :]
        shift = tl.load(shift_ptr + params, mask=offs_c < channels, other=0.0)[None, :]
        first = image.to(tl.int64) * pixels + split * split_pixels
        for start in tl.range(0, split_pixels, BLOCK_P, num_stages=STAGES):
            offs_p = first + start + tl.arange(0, BLOCK_P)
            index = offs_p[:, None] * channels + offs_c[None, :]
            if PHASE:
                offs_q = split * split_pixels + start + tl.arange(0, BLOCK_P)
                x_index = _phase_index(image, offs_q, offs_c, channels, width, grid_h, grid_w)
            else:
                x_index = index
            v = tl.load(x_ptr + x_index, mask=mask, other=0.0).to(tl.float32) * scale + shift
            if SILU:
                v = v * tl.sigmoid(v)
            tl.store(out_ptr + index, v.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(shape: tuple[int, ...], splits: int, settings: KernelSettings, phase: bool) -> dict[str, object]:
    """Grid and shape arguments of a kernel over a (B, C, H, W) map: one program per (image, split, channel
    block), the channel blocks of one pixel range adjacent (they share its cache lines: a 160-channel row
    is 320 bytes, a 32-channel block reads half lines, fetched twice when its neighbours run apart);
    ``phase``: the map is read from its phase form (:func:`interleave_phases`)."""
    batch, channels, height, width = shape
    pixels = height * width
    block_c = block_channels(channels)
    blocks = -(-channels // block_c)
    return dict(grid=(blocks * batch * splits,), pixels=pixels, channels=channels, split_pixels=pixels // splits,
                splits=splits, channel_blocks=blocks, width=width, grid_h=height // 2 + 1, grid_w=width // 2 + 1, PHASE=phase,
                BLOCK_P=tile_pixels(pixels // splits, settings), BLOCK_C=block_c, STAGES=settings.stages,
                num_warps=settings.warps)


def map_shape(x_BCHW: torch.Tensor, phase: bool) -> tuple[int, int, int, int]:
    """The (B, C, H, W) shape of the map ``x`` holds (its phase form if ``phase``)."""
    return phase_shape(x_BCHW) if phase else tuple(x_BCHW.shape)


def _check_layout(*tensors: torch.Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None and not tensor.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"tensor of shape {tuple(tensor.shape)} is not channels-last contiguous")


def channel_moments(
    x_BCHW: torch.Tensor,
    h_BCHW: torch.Tensor | None = None,
    bias_C: torch.Tensor | None = None,
    *,
    write: bool = False,
    splits: int | None = None,
    phase: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Moments of v = x (+ h) (+ bias) per image, split and channel: (out, mean (B, S, C), m2 (B, S, C)).

    ``x``/``h``: (B, C, H, W) channels-last; ``bias_C`` broadcast over pixels. Each of the S equal splits of
    an image's pixels (default :func:`pixel_splits`) gets the float32 mean and the sum of squared deviations
    from it. ``write``: v is also returned in x's dtype (``out``, channels-last) and the moments are those of
    the stored (rounded) values; else ``out`` is None. ``phase``: x holds the phase form of the map
    (:func:`interleave_phases`; ``out`` is then the interleaved map).
    """
    shape = map_shape(x_BCHW, phase)
    batch, channels = shape[:2]
    settings = ADD_MOMENTS if write else MOMENTS
    splits = _checked_splits(splits, shape, settings)
    if not _use_kernels(x_BCHW):
        return moments_reference(x_BCHW, h_BCHW, bias_C, write, splits, phase)
    _check_layout(x_BCHW, h_BCHW)
    out_BCHW = _empty_map(x_BCHW, shape) if write else None
    mean_BSC = torch.empty(batch, splits, channels, dtype=torch.float32, device=x_BCHW.device)
    m2_BSC = torch.empty_like(mean_BSC)
    bias = bias_C.float().contiguous() if bias_C is not None else mean_BSC
    launch = _launch(shape, splits, settings, phase)
    _moments_kernel[launch.pop("grid")](x_BCHW, h_BCHW if h_BCHW is not None else x_BCHW, bias,
                                        out_BCHW if write else x_BCHW, mean_BSC, m2_BSC, **launch,
                                        HAS_H=h_BCHW is not None, HAS_BIAS=bias_C is not None, WRITE=write)
    return out_BCHW, mean_BSC, m2_BSC


def scale_shift_act(x_BCHW: torch.Tensor, scale_BC: torch.Tensor, shift_BC: torch.Tensor, *, silu: bool = True,
                    splits: int | None = None, phase: bool = False) -> torch.Tensor:
    """x·scale + shift per (image, channel), then SiLU if ``silu``: (B, C, H, W) channels-last in x's dtype
    (computed in float32; ``scale_BC``/``shift_BC`` float32). ``phase``: x holds the phase form of the map
    (:func:`interleave_phases`)."""
    if not _use_kernels(x_BCHW):
        return scale_shift_act_reference(x_BCHW, scale_BC, shift_BC, silu, phase)
    _check_layout(x_BCHW)
    shape = map_shape(x_BCHW, phase)
    splits = _checked_splits(splits, shape, SCALE_SHIFT)
    out_BCHW = _empty_map(x_BCHW, shape)
    launch = _launch(shape, splits, SCALE_SHIFT, phase)
    _scale_shift_act_kernel[launch.pop("grid")](x_BCHW, scale_BC.float().contiguous(), shift_BC.float().contiguous(),
                                                out_BCHW, **launch, SILU=silu)
    return out_BCHW


def group_scale_shift(
    norm: nn.GroupNorm, mean_BSC: torch.Tensor, m2_BSC: torch.Tensor, split_pixels: int,
    pending_bias_C: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm ``norm`` as a per-(image, channel) float32 (scale, shift) from :func:`channel_moments`.

    Group statistics combine the S·C/G partial moments of each group exactly (equal counts: the mean of the
    means; the sum of the m2 plus count × the squared spread of the means). ``pending_bias_C``: the moments
    describe ``stored + pending_bias``; the shift is then for the stored tensor (bias·scale folded in).
    """
    batch, splits, channels = mean_BSC.shape
    groups = norm.num_groups
    per_group = channels // groups
    mean_BGn = mean_BSC.view(batch, splits, groups, per_group).transpose(1, 2).reshape(batch, groups, -1)
    m2_BGn = m2_BSC.view(batch, splits, groups, per_group).transpose(1, 2).reshape(batch, groups, -1)
    group_mean_BG1 = mean_BGn.mean(-1, keepdim=True)
    spread_BG1 = ((mean_BGn - group_mean_BG1) ** 2).sum(-1, keepdim=True)
    var_BG1 = (m2_BGn.sum(-1, keepdim=True) + split_pixels * spread_BG1) / (split_pixels * mean_BGn.shape[-1])
    rstd_BG1 = torch.rsqrt(var_BG1 + norm.eps)
    scale_BC = rstd_BG1.expand(batch, groups, per_group).reshape(batch, channels) * norm.weight.float()
    mean_BC = group_mean_BG1.expand(batch, groups, per_group).reshape(batch, channels)
    shift_BC = norm.bias.float() - mean_BC * scale_BC
    if pending_bias_C is not None:
        shift_BC = shift_BC + pending_bias_C * scale_BC
    return scale_BC, shift_BC


# ---------------------------------------------------------------- the decode path
@dataclass
class _Activation:
    """A tensor between decoder layers: ``stored`` (channels-last) + ``bias`` (float32 (C,) not yet added,
    or None), and, once computed, the moments of that sum (:func:`channel_moments`). ``phase``: ``stored``
    is the phase form of the map (:func:`interleave_phases`), which the kernels read in place."""

    stored: torch.Tensor
    bias: torch.Tensor | None = None
    moments: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (mean (B, S, C), m2 (B, S, C), pixels/split)
    phase: bool = False

    @classmethod
    def sum_of(cls, x_BCHW: torch.Tensor, h_BCHW: torch.Tensor | None, bias_C: torch.Tensor | None,
               phase: bool = False) -> _Activation:
        """x (+ h) (+ bias) written out in one pass, with its moments (x in its phase form if ``phase``)."""
        out_BCHW, mean_BSC, m2_BSC = channel_moments(x_BCHW, h_BCHW, bias_C, write=True, phase=phase)
        return cls(out_BCHW, None, (mean_BSC, m2_BSC, _split_pixels(out_BCHW.shape, mean_BSC)))

    def with_moments(self) -> _Activation:
        if self.moments is None:
            _, mean_BSC, m2_BSC = channel_moments(self.stored, None, self.bias, phase=self.phase)
            self.moments = (mean_BSC, m2_BSC, _split_pixels(map_shape(self.stored, self.phase), mean_BSC))
        return self

    def materialized(self) -> torch.Tensor:
        """The map with its bias added (convolutions with zero padding need it: a bias is no constant
        through their borders), interleaved if held in its phase form."""
        if self.bias is not None or self.phase:
            summed = _Activation.sum_of(self.stored, None, self.bias, self.phase)
            self.stored, self.bias, self.moments, self.phase = summed.stored, None, summed.moments, False
        return self.stored


def _reads_in_place(layer: nn.Module) -> bool:
    """Whether ``layer`` reads its input only through the fused kernels (a residual block whose skip is the
    identity: its norm, and its residual add), so the map before it can stay in phase form; a 1×1 skip conv
    or any other layer needs the map interleaved in memory."""
    from medaug.models.vqvae import ResnetBlock

    return isinstance(layer, ResnetBlock) and isinstance(layer.skip, nn.Identity)


def _split_pixels(shape: tuple[int, ...], mean_BSC: torch.Tensor) -> int:
    return shape[2] * shape[3] // mean_BSC.shape[1]


def _normalized(norm: nn.GroupNorm, x: _Activation, silu: bool) -> torch.Tensor:
    """GroupNorm ``norm`` (then SiLU) of ``x`` in one pass over it."""
    mean_BSC, m2_BSC, split_pixels = x.with_moments().moments
    scale_BC, shift_BC = group_scale_shift(norm, mean_BSC, m2_BSC, split_pixels, x.bias)
    return scale_shift_act(x.stored, scale_BC, shift_BC, silu=silu, phase=x.phase)


def _conv(conv: nn.Conv2d, x_BCHW: torch.Tensor, weight: torch.Tensor | None = None) -> _Activation:
    """``conv`` without its bias (left pending for the reader of its output); with ``weight``, through that one
    (zero-padded output channels), its first ``conv.out_channels`` kept as a view."""
    weight = conv.weight if weight is None else weight
    out_BCHW = F.conv2d(x_BCHW, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _Activation(out_BCHW.contiguous(memory_format=torch.channels_last)[:, :conv.out_channels], _bias(conv))


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().float()


def _add_bias(*biases: torch.Tensor | None) -> torch.Tensor | None:
    present = [bias for bias in biases if bias is not None]
    return sum(present[1:], present[0]) if present else None


class FusedDecodePath(nn.Module):
    """post_quant_conv + a :class:`~medaug.models.vqvae.Decoder` run layer by layer with the fused kernels.

    ``out_channel_multiple``: the last conv runs with its output channels zero-padded up to a multiple of it
    (:data:`OUT_CHANNEL_MULTIPLE`; 1: as it is). ``phase_upsample``: folded upsamples whose map only the
    kernels read run in phase form (module docstring; ``phase_weights`` holds their 2×2 weights by layer index).

    Takes the modules of a decode path (upsamples already folded into
    :class:`~medaug.models.vqvae.FoldedUpsample`, in the weights' dtype, channels-last) and runs the same
    function: GroupNorm (+ SiLU) from :func:`channel_moments`, convolutions through ``F.conv2d`` without
    bias, residual adds fused with the next GroupNorm's moments, attention as two batched GEMMs with a
    float32 softmax (as :class:`~medaug.models.vqvae.GemmSelfAttention`).
    """

    def __init__(self, post_quant_conv: nn.Conv2d, decoder: nn.Sequential,
                 out_channel_multiple: int = OUT_CHANNEL_MULTIPLE, phase_upsample: bool = True):
        from medaug.models.vqvae import FoldedUpsample

        super().__init__()
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder
        # phase-form weights of the folded upsamples whose map only the fused kernels read (layer index → weight)
        self.phase_weights = nn.ParameterDict({
            str(i): nn.Parameter(phase_weight(layer.weight.detach()).contiguous(memory_format=torch.channels_last),
                                 requires_grad=False)
            for i, layer in enumerate(decoder)
            if phase_upsample and isinstance(layer, FoldedUpsample) and i + 1 < len(decoder)
            and _reads_in_place(decoder[i + 1])})
        last = decoder[-1] if len(decoder) else None
        self.out_weight = None  # the output conv's weight with zero rows up to a multiple of output channels
        if isinstance(last, nn.Conv2d) and last.groups == 1 and last.out_channels % out_channel_multiple:
            padded = -(-last.out_channels // out_channel_multiple) * out_channel_multiple
            weight = last.weight.detach()
            zeros = weight.new_zeros(padded - last.out_channels, *weight.shape[1:])
            self.out_weight = nn.Parameter(torch.cat((weight, zeros)).contiguous(memory_format=torch.channels_last),
                                           requires_grad=False)

    def forward(self, f_hat_BCHW: torch.Tensor) -> torch.Tensor:
        x = _conv(self.post_quant_conv, f_hat_BCHW.contiguous(memory_format=torch.channels_last))
        layers = list(self.decoder)
        i = 0
        while i < len(layers):
            layer = layers[i]
            fuse_silu = isinstance(layer, nn.GroupNorm) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.SiLU)
            if i == len(layers) - 1 and self.out_weight is not None:  # the bias add below writes its channels
                x = _conv(layer, x.materialized(), self.out_weight)
            elif str(i) in self.phase_weights:  # the 2×2 conv at each phase; the kernels interleave as they read
                y_BQHW = F.conv2d(x.materialized(), self.phase_weights[str(i)], None, 1, 1)
                x = _Activation(y_BQHW.contiguous(memory_format=torch.channels_last), _bias(layer), phase=True)
            else:
                x = self._layer(layer, x, fuse_silu)
            i += 2 if fuse_silu else 1
        if x.bias is None:
            return x.stored
        return (x.stored.float() + x.bias[:, None, None]).to(x.stored.dtype)  # one rounding, as a conv with bias

    def _layer(self, layer: nn.Module, x: _Activation, fuse_silu: bool) -> _Activation:
        from medaug.models.vqvae import FoldedUpsample, ResnetBlock, SelfAttention, Upsample

        if x.phase and not _reads_in_place(layer):
            x.materialized()
        if isinstance(layer, ResnetBlock):
            return self._resnet_block(layer, x)
        if isinstance(layer, SelfAttention):
            return self._attention(layer, x)
        if isinstance(layer, nn.GroupNorm):
            return _Activation(_normalized(layer, x, silu=fuse_silu))
        if isinstance(layer, nn.SiLU):
            return _Activation(F.silu(x.materialized()).contiguous(memory_format=torch.channels_last))
        if isinstance(layer, nn.Conv2d):
            return _conv(layer, x.materialized())
        if isinstance(layer, FoldedUpsample):
            out_BCHW = F.conv_transpose2d(x.materialized(), layer.weight, None, stride=2, padding=1)
            return _Activation(out_BCHW.contiguous(memory_format=torch.channels_last), _bias(layer))
        if isinstance(layer, Upsample):
            upsampled_BCHW = F.interpolate(x.materialized(), scale_factor=2.0, mode="nearest")
            return _conv(layer.conv, upsampled_BCHW.contiguous(memory_format=torch.channels_last))
        raise TypeError(f"FusedDecodePath: no fused form of {type(layer).__name__}")

    @staticmethod
    def _resnet_block(block: nn.Module, x: _Activation) -> _Activation:
        """x + conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))), the add writing the sum and its moments in one pass."""
        h1 = _conv(block.conv1, _normalized(block.norm1, x, silu=True))
        h2 = _conv(block.conv2, _normalized(block.norm2, h1, silu=True))
        if isinstance(block.skip, nn.Conv2d):  # 1×1, no padding: skip(stored + b) = skip(stored) + W·b
            skip = _conv(block.skip, x.stored)
            if x.bias is not None:
                skip.bias = skip.bias + block.skip.weight.detach().float()[:, :, 0, 0] @ x.bias
        else:
            skip = x
        return _Activation.sum_of(skip.stored, h2.stored, _add_bias(skip.bias, h2.bias), skip.phase)

    @staticmethod
    def _attention(attention: nn.Module, x: _Activation) -> _Activation:
        """x + proj(softmax(q·kᵀ/√C)·v) over all positions, q·kᵀ and p·v as batched GEMMs (float32 softmax)."""
        from medaug.models.vqvae import gemm_attention

        batch, channels, height, width = x.stored.shape
        h_BNC = _normalized(attention.norm, x, silu=False).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        qkv_weight = attention.qkv.weight.view(3 * channels, channels)
        attended_BNC = gemm_attention(F.linear(h_BNC, qkv_weight, attention.qkv.bias))
        out_BNC = F.linear(attended_BNC, attention.proj.weight.view(channels, channels))
        out_BCHW = out_BNC.view(batch, height, width, channels).permute(0, 3, 1, 2)  # channels-last view
        return _Activation.sum_of(x.stored, out_BCHW, _add_bias(x.bias, _bias(attention.proj)))


__all__ = [
    "ADD_MOMENTS",
    "FUSED_PROGRAMS",
    "FusedDecodePath",
    "KernelSettings",
    "MOMENTS",
    "OUT_CHANNEL_MULTIPLE",
    "PHASE_TAPS",
    "SCALE_SHIFT",
    "block_channels",
    "interleave_phases",
    "map_shape",
    "phase_shape",
    "phase_weight",
    "fused_default",
    "channel_moments",
    "group_scale_shift",
    "moments_reference",
    "pixel_splits",
    "tile_pixels",
    "scale_shift_act",
    "scale_shift_act_reference",
    "triton_available",
]
