"""Two passes of the fast sampler as hand-written Triton kernels (issue 9; session 9's profile of d16 at
batch 256 on the H200, ``benchmarks/results/sample-h200-session9.json``):

* :func:`fused_qkv` — split the qkv projection, L2-normalise q (× the head's scale) and k, write k and v into
  their KV-cache slots and q into a new tensor. The compiled (inductor) version took 40.5 of ~370 ms: its
  cache writes index a tensor of more than 2³¹ elements, so the whole kernel ran 64-bit index arithmetic
  (divisions by dynamic sizes included) at a third of the bandwidth. Here one program handles a block of
  (token, head) rows of D elements; only the cache row offset is 64-bit.
* :func:`fused_filter_draw` — top-k, top-p and the inverse-CDF draw of one token per row without sorting.
  ``torch.topk`` (k = 900 of 4096) + softmax + two cumsums + searchsorted took ~21 ms. The kernel holds a
  row's logits in registers and finds each cut by a bitwise search over order-preserving integer keys of
  the float logits: the k-th largest key (counts), the smallest key the top-p prefix keeps (masses), and the
  key at which the cumulative mass passes ``u·total`` (masses). Ties at a cut are ordered by vocabulary
  index, as in :func:`draw_reference`.

Both compute what the torch sampler computes (:func:`~medaug.models.sampling.normalized_qkv`;
:func:`~medaug.models.sampling.filter_probs` + :func:`~medaug.models.sampling.draw_tokens`) up to float
rounding: the drawn token is the same one unless ``u·total`` falls within rounding of a cumulative-mass
boundary (sums in another order) or logits tie (``torch.topk`` leaves the order of equal values open). Without
Triton, or on CPU tensors, the same functions run those torch references; the kernels are tested against
them in Triton's interpreter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medaug.models.fused_decode import _use_kernels, tl, triton

QKV_ROWS = 32
"""(token, head) rows of :func:`fused_qkv` per program (× head dim 64: 2,048 elements of each of q, k, v)."""
QKV_WARPS = 4
DRAW_WARPS = 8
"""Warps per row of :func:`fused_filter_draw` (4,096 logits: 16 per thread)."""
RADIX_TOP_K = True
"""Find the k-th largest logit by radix select (four histogram rounds) rather than a 32-step bitwise search."""
COMPACT = True
"""Move the top-k lanes into next_power_of_2(k) lanes before the mass searches (when that is at most half)."""

_INT32_MIN = -(2**31)


# ---------------------------------------------------------------- torch references (CPU, no Triton)
def qkv_reference(qkv_RlE: torch.Tensor, attn_scale_11H1: torch.Tensor, keys_RlHD: torch.Tensor,
                  values_RlHD: torch.Tensor) -> torch.Tensor:
    """:func:`fused_qkv` in plain torch (the sampler's ``normalized_qkv``)."""
    from medaug.models.sampling import normalized_qkv

    return normalized_qkv(qkv_RlE, attn_scale_11H1, keys_RlHD, values_RlHD)


def draw_reference(logits_NV: torch.Tensor, uniform_N: torch.Tensor, top_k: int, top_p: float,
                   temperature: float = 1.0) -> torch.Tensor:
    """:func:`fused_filter_draw` in plain torch: the sampler's ``filter_probs`` + ``draw_tokens``."""
    from medaug.models.sampling import draw_tokens, filter_probs

    probs_NM, index_NM = filter_probs(logits_NV, top_k, top_p, temperature)
    return draw_tokens(probs_NM, index_NM, uniform_N)


def draw_exact(logits_NV: np.ndarray, uniform_N: np.ndarray, top_k: int, top_p: float,
               temperature: float = 1.0) -> np.ndarray:
    """The same draw in float64 numpy with ties ordered by vocabulary index (an independent reference for
    tests): rank by (logit descending, index ascending), keep the top k, softmax, keep entries whose mass
    before is below ``top_p``, and invert the cumulative distribution at ``u·total``."""
    tokens = np.empty(len(logits_NV), dtype=np.int64)
    for n, row in enumerate(np.asarray(logits_NV, dtype=np.float64) / temperature):
        order = np.lexsort((np.arange(len(row)), -row))
        keep = len(row) if top_k <= 0 else min(top_k, len(row))
        values = row[order[:keep]]
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        if top_p < 1.0:
            probs = probs * ((np.cumsum(probs) - probs) < top_p)
        cdf = np.cumsum(probs)
        position = min(int(np.searchsorted(cdf, uniform_N[n] * cdf[-1], side="right")), int((probs > 0).sum()) - 1)
        tokens[n] = order[position]
    return tokens


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

    @triton.jit
    def _max_key(key, weight, threshold, STRICT: tl.constexpr):
        """The largest int32 c with Σ weight[key ≥ c] ≥ threshold (> when STRICT); INT32_MIN when even the
        whole sum falls short. Bitwise from the top: Σ weight[key ≥ c] does not grow with c."""
        best = tl.full([], -2147483648, tl.int64)
        for bit in tl.static_range(31, -1, -1):
            candidate = best + (1 << bit)
            mass = tl.sum(tl.where(key >= candidate.to(tl.int32), weight, 0.0), axis=0)
            ok = mass > threshold if STRICT else mass >= threshold
            best = tl.where(ok, candidate, best)
        return best.to(tl.int32)

    @triton.jit
    def _kth_key_radix(key, valid, wanted):
        """The k-th largest key (k = ``wanted``, counted over ``valid`` lanes) by radix select: four rounds
        of an 8-bit-digit histogram of the lanes that share the digits found so far."""
        bins = tl.arange(0, 256)
        kth = tl.full([], 0, tl.int32)
        remaining = wanted
        for r in tl.static_range(4):
            shift = 24 - 8 * r
            if r == 0:
                match = valid
                digit = (key >> 24) + 128  # the signed top byte, shifted to 0..255 (order kept)
            else:
                match = valid & ((key >> (shift + 8)) == (kth >> (shift + 8)))
                digit = (key >> shift) & 0xFF
            counts = tl.histogram(tl.where(match, digit, 0), 256)  # unmatched lanes land in bin 0 ...
            unmatched = tl.sum(tl.where(match, 0, 1), axis=0)
            counts = counts - tl.where(bins == 0, unmatched, 0)  # ... and leave it again
            at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # lanes with digit >= bin
            chosen = tl.max(tl.where(at_least >= remaining, bins, 0), axis=0)
            remaining = remaining - tl.sum(tl.where(bins > chosen, counts, 0), axis=0)
            if r == 0:
                kth = (chosen - 128) << 24
            else:
                kth = kth | (chosen << shift)
        return kth

    @triton.jit
    def _top_k_keep(key, valid, top_k, RADIX: tl.constexpr):
        """Lanes of the top k: keys above the k-th largest, and of the keys equal to it the lowest lanes."""
        if RADIX:
            kth = _kth_key_radix(key, valid, top_k)
        else:
            kth = _max_key(key, tl.where(valid, 1.0, 0.0), top_k * 1.0, False)
        above = tl.sum(tl.where(valid & (key > kth), 1, 0), axis=0)
        tied = valid & (key == kth)
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=0)  # 1-based among the tied lanes
        return valid & ((key > kth) | (tied & (tie_rank <= top_k - above)))

    @triton.jit
    def _filter_draw_kernel(logits_ptr, uniform_ptr, out_ptr, scratch_x_ptr, scratch_i_ptr, vocab, length,
                            logits_row_stride, uniform_row_stride, uniform_start, top_k, top_p, temperature,
                            TOP_K: tl.constexpr, TOP_P: tl.constexpr, RADIX: tl.constexpr, BLOCK_V: tl.constexpr,
                            COMPACT: tl.constexpr):
        """Program n: row n of the logits (sample b, position j = divmod(n, length)); its uniform is
        uniform[b, uniform_start + j]. With COMPACT (> 0), the top-k lanes are moved, in vocabulary order,
        into COMPACT lanes (through a scratch row) before the mass searches."""
        n = tl.program_id(0)
        lane = tl.arange(0, BLOCK_V)
        valid = lane < vocab
        x = tl.load(logits_ptr + n.to(tl.int64) * logits_row_stride + lane, mask=valid, other=0.0).to(tl.float32)
        x = x / temperature
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # orders as the floats
        keep = valid
        if TOP_K:
            keep = _top_k_keep(key, valid, top_k, RADIX)
        if COMPACT > 0:  # the kept lanes, in vocabulary order, into the first top_k of COMPACT lanes
            position = tl.cumsum(keep.to(tl.int32), axis=0) - 1
            row = n.to(tl.int64) * COMPACT
            tl.store(scratch_x_ptr + row + position, x, mask=keep)
            tl.store(scratch_i_ptr + row + position, lane, mask=keep)
            tl.debug_barrier()
            slot = tl.arange(0, COMPACT)
            keep_c = slot < top_k
            x_c = tl.load(scratch_x_ptr + row + slot, mask=keep_c, other=0.0)
            vocab_c = tl.load(scratch_i_ptr + row + slot, mask=keep_c, other=0)
            bits_c = x_c.to(tl.int32, bitcast=True)
            key_c = bits_c ^ ((bits_c >> 31) & 0x7FFFFFFF)
            chosen = _draw_lane(x_c, key_c, keep_c, uniform_ptr, n, length, uniform_row_stride, uniform_start,
                                top_p, TOP_P, COMPACT)
            token = tl.sum(tl.where(slot == chosen, vocab_c, 0), axis=0)
        else:
            token = _draw_lane(x, key, keep, uniform_ptr, n, length, uniform_row_stride, uniform_start, top_p,
                               TOP_P, BLOCK_V)
        tl.store(out_ptr + n, token.to(tl.int64))

    @triton.jit
    def _draw_lane(x, key, keep, uniform_ptr, n, length, uniform_row_stride, uniform_start, top_p,
                   TOP_P: tl.constexpr, LANES: tl.constexpr):
        """Softmax over the ``keep`` lanes, top-p, and the lane the row's uniform draws (lanes in vocabulary
        order: ties at a cut go to the lower lane, as in :func:`draw_exact`)."""
        lane = tl.arange(0, LANES)
        peak = tl.max(tl.where(keep, x, float("-inf")), axis=0)
        e = tl.where(keep, tl.exp(x - peak), 0.0)
        p = e / tl.sum(e, axis=0)
        if TOP_P:  # entries whose mass before (higher keys, then lower lanes among equal ones) is < top_p
            cut = _max_key(key, p, top_p, False)
            before = tl.sum(tl.where(key > cut, p, 0.0), axis=0)
            tied = keep & (key == cut)
            tied_p = tl.where(tied, p, 0.0)
            tie_before = before + tl.cumsum(tied_p, axis=0) - tied_p
            keep = keep & ((key > cut) | (tied & (tie_before < top_p)))
            p = tl.where(keep, p, 0.0)
        total = tl.sum(p, axis=0)
        b = n // length
        u = tl.load(uniform_ptr + b.to(tl.int64) * uniform_row_stride + uniform_start + n % length)
        target = u * total
        # the largest key whose cumulative mass (keys >= it) passes the target; none when rounding put the
        # target at the total: then the last kept entry (smallest key, highest lane among equal ones)
        chosen = _max_key(tl.where(keep, key, -2147483648), p, target, True)
        smallest = tl.min(tl.where(keep, key, 2147483647), axis=0)
        overshoot = chosen == -2147483648
        chosen = tl.where(overshoot, smallest, chosen)
        before = tl.sum(tl.where(key > chosen, p, 0.0), axis=0)
        tied = keep & (key == chosen)
        cumulative = before + tl.cumsum(tl.where(tied, p, 0.0), axis=0)
        passes = tied & (cumulative > target)
        first_pass = tl.min(tl.where(passes, lane, LANES), axis=0)
        last_tied = tl.max(tl.where(tied, lane, -1), axis=0)
        return tl.where(overshoot | (first_pass == LANES), last_tied, first_pass)


# ---------------------------------------------------------------- entry points
def fused_qkv(qkv_RlE: torch.Tensor, attn_scale_11H1: torch.Tensor, keys_RlHD: torch.Tensor,
              values_RlHD: torch.Tensor) -> torch.Tensor:
    """As the sampler's ``normalized_qkv``: k, v written into the cache slots (R, l, H, D) (rows any stride,
    (l, H, D) contiguous), q (R, H, l, D) returned as a transposed view of (R, l, H, D)."""
    rows, length, _ = qkv_RlE.shape
    heads, dim = keys_RlHD.shape[2], keys_RlHD.shape[3]
    if not _use_kernels(qkv_RlE) or rows * length == 0:
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


def fused_filter_draw(logits_BlV: torch.Tensor, uniform_BL: torch.Tensor, start: int, top_k: int, top_p: float,
                      temperature: float = 1.0) -> torch.Tensor:
    """Tokens (B·l,) int64: row (b, j) of ``logits_BlV`` filtered (top-k, top-p) and drawn at
    ``uniform_BL[b, start + j]``, as :func:`draw_reference` does with the flattened rows."""
    batch, length, vocab = logits_BlV.shape
    if not _use_kernels(logits_BlV):
        uniform_N = uniform_BL[:, start:start + length].flatten()
        return draw_reference(logits_BlV.flatten(0, 1), uniform_N, top_k, top_p, temperature)
    logits_NV = logits_BlV.reshape(batch * length, vocab)
    if logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    uniform_BL = uniform_BL.float()
    if uniform_BL.stride(1) != 1:
        uniform_BL = uniform_BL.contiguous()
    rows = batch * length
    tokens_N = torch.empty(rows, dtype=torch.int64, device=logits_BlV.device)
    if rows == 0:
        return tokens_N
    top_k_on = 0 < top_k < vocab
    block = triton.next_power_of_2(vocab)
    compact = max(32, triton.next_power_of_2(top_k)) if top_k_on and COMPACT and 2 * top_k <= block else 0
    scratch_x = torch.empty((rows, max(compact, 1)), dtype=torch.float32, device=logits_BlV.device)
    scratch_i = torch.empty((rows, max(compact, 1)), dtype=torch.int32, device=logits_BlV.device)
    _filter_draw_kernel[(rows,)](
        logits_NV, uniform_BL, tokens_N, scratch_x, scratch_i, vocab, length, logits_NV.stride(0),
        uniform_BL.stride(0), start, int(top_k), float(top_p), float(temperature),
        TOP_K=top_k_on, TOP_P=top_p < 1.0, RADIX=RADIX_TOP_K, BLOCK_V=block, COMPACT=compact,
        num_warps=DRAW_WARPS)
    return tokens_N


__all__ = ["draw_exact", "draw_reference", "fused_filter_draw", "fused_qkv", "qkv_reference"]
