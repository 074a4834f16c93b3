"""The fast sampler's q/k normalisation and KV-cache writes as one hand-written Triton kernel (issue 9).

:func:`fused_qkv` splits the qkv projection, L2-normalises q (× the head's scale) and k, writes k and v into
their KV-cache slots and q into a new tensor, as :func:`~medaug.models.sampling.normalized_qkv` does. The
compiled (inductor) version of that function took 40.5 of the ~370 ms of d16's tokens at batch 256 on the
H200 (session 8's profile; this kernel: 16.7 ms, ``benchmarks/results/sample-h200-session9.json``): with the
sampler's dynamic row and length sizes and a cache of more than 2³¹ elements, its kernels ran 64-bit index
arithmetic (divisions by dynamic sizes included) at about a third of the bandwidth (the same function compiled
for static shapes ran at full speed, 0.51 ms at the last scale against this kernel's 0.46). Here one program
handles a block of (token, head) rows of D elements (D a power of two; other head sizes run the torch
function), with 64-bit row offsets and 32-bit arithmetic within rows.

Tried and dropped (session 9; see this file's history): a sort-free top-k + top-p + draw kernel (bitwise searches over
order-preserving integer keys of the logits; variants with radix-select top-k and compaction of the kept
lanes). It drew the torch path's tokens (99.95 % of rows; the rest within rounding of a cumulative-mass
boundary) but took 8.8-16.8 ms at (65,536, 4096) against 7.7 ms for ``torch.topk`` + softmax + cumsum +
searchsorted: its ~100 row reductions per row are latency-bound.

Without Triton, or on CPU tensors, :func:`fused_qkv` runs the torch function; the kernel is tested against it
in Triton's interpreter and compiled for sm_80/sm_90 in CPU tests.
"""

from __future__ import annotations

import torch

from medaug.models.fused_decode import _use_kernels, tl, triton

QKV_ROWS = 32
"""(token, head) rows of :func:`fused_qkv` per program (× head dim 64: 2,048 elements of each of q, k, v)."""
QKV_WARPS = 4
"""Warps per program (a sweep of 16-128 rows × 2-8 warps on the H200 ran 0.454-0.52 ms, except 128 × 2)."""


# ---------------------------------------------------------------- torch references (CPU, no Triton)
def qkv_reference(qkv_RlE: torch.Tensor, attn_scale_11H1: torch.Tensor, keys_RlHD: torch.Tensor,
                  values_RlHD: torch.Tensor) -> torch.Tensor:
    """:func:`fused_qkv` in plain torch (the sampler's ``normalized_qkv``)."""
    from medaug.models.sampling import normalized_qkv

    return normalized_qkv(qkv_RlE, attn_scale_11H1, keys_RlHD, values_RlHD)


# ---------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _qkv_kernel(qkv_ptr, scale_ptr, keys_ptr, values_ptr, q_ptr, rows, length, cache_row_stride,
                    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program i: (token, head) rows [i·BLOCK_M, (i+1)·BLOCK_M) of the R·l·H; token n = row // H is
        (r, t) = divmod(n, l). q, k normalised in float32 (x / max(‖x‖, 1e-12), as F.normalize)."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = (m < rows)[:, None]
        d = tl.arange(0, DIM)[None, :]
        token = m // HEADS
        head = m % HEADS
        width = HEADS * DIM
        source = (token.to(tl.int64) * (3 * width) + head * DIM)[:, None] + d
        q = tl.load(qkv_ptr + source, mask=valid, other=0.0).to(tl.float32)
        k = tl.load(qkv_ptr + source + width, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(qkv_ptr + source + 2 * width, mask=valid, other=0.0)
        scale = tl.load(scale_ptr + head, mask=m < rows, other=0.0)
        q_norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)
        k_norm = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)
        q = q / q_norm[:, None] * scale[:, None]
        k = k / k_norm[:, None]
        row = token // length
        slot = (row.to(tl.int64) * cache_row_stride + (token % length) * width + head * DIM)[:, None] + d
        tl.store(keys_ptr + slot, k.to(keys_ptr.dtype.element_ty), mask=valid)
        tl.store(values_ptr + slot, v.to(values_ptr.dtype.element_ty), mask=valid)
        tl.store(q_ptr + m.to(tl.int64)[:, None] * DIM + d, q.to(q_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------- entry points
def fused_qkv(qkv_RlE: torch.Tensor, attn_scale_11H1: torch.Tensor, keys_RlHD: torch.Tensor,
              values_RlHD: torch.Tensor) -> torch.Tensor:
    """As the sampler's ``normalized_qkv``: k, v written into the cache slots (R, l, H, D) (rows any stride,
    (l, H, D) contiguous), q (R, H, l, D) returned as a transposed view of (R, l, H, D)."""
    rows, length, _ = qkv_RlE.shape
    heads, dim = keys_RlHD.shape[2], keys_RlHD.shape[3]
    if qkv_RlE.shape[2] != 3 * heads * dim:
        raise ValueError(f"qkv has {qkv_RlE.shape[2]} features; expected 3·{heads}·{dim} for the cache's heads")
    if not _use_kernels(qkv_RlE) or rows * length == 0 or dim & (dim - 1):  # (the kernel's tiles: 2^n wide)
        return qkv_reference(qkv_RlE, attn_scale_11H1, keys_RlHD, values_RlHD)
    for name, slot in (("keys", keys_RlHD), ("values", values_RlHD)):
        if slot.stride()[1:] != (heads * dim, dim, 1):
            raise ValueError(f"{name} slot strides {slot.stride()}; expected (any, {heads * dim}, {dim}, 1)")
    if keys_RlHD.stride(0) != values_RlHD.stride(0):
        raise ValueError("keys and values slots have different row strides")
    qkv_RlE = qkv_RlE.contiguous()
    q_RlHD = torch.empty((rows, length, heads, dim), dtype=keys_RlHD.dtype, device=qkv_RlE.device)
    scale_H = attn_scale_11H1.reshape(-1).float().contiguous()
    count = rows * length * heads
    _qkv_kernel[(triton.cdiv(count, QKV_ROWS),)](
        qkv_RlE, scale_H, keys_RlHD, values_RlHD, q_RlHD, count, length, keys_RlHD.stride(0),
        HEADS=heads, DIM=dim, BLOCK_M=QKV_ROWS, num_warps=QKV_WARPS)
    return q_RlHD.transpose(1, 2)


__all__ = ["fused_qkv", "qkv_reference"]
