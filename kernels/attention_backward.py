"""Flash attention backward in Triton (FlashAttention-2): the gradients of attention.py.

Maths (see attention.py for the forward and the notation), with the forward's row
statistics, the row max m_i and log-sum l_i of the base-2 scores:
    p_ij  = exp2(s_ij - m_i - l_i)                recomputed from q, k and the masks
    delta_i = dO_i . out_i                        (preprocess kernel, float32)
    dP_ij = z_ij / (1 - p_drop) * dO_i . v_j,    dS_ij = p_ij * (dP_ij - delta_i)
    dv_j  = sum_i p_ij * z_ij / (1 - p_drop) * dO_i,   dk_j = scale * sum_i dS_ij q_i
    dq_i  = scale * sum_j dS_ij k_j
(with a softcap, dS_ij is taken through the cap: times 1 - tanh^2 of the capped score)
(delta_i = rowsum(p * dP) holds with dropout too, since out_i carries the same z / (1 - p)).

Limits and choices:
- dK/dV: one program per key block of a kv head; it loops over the query heads of the
  group and over the query blocks the band reaches, so grouped heads need no atomics.
  dQ: one program per query block, looping over key blocks. Deterministic results.
- Blocks outside the band are skipped, blocks inside it run without the band mask, as in
  the forward; the dropout mask is regenerated from the same Philox offsets.
- m_i and l_i are kept apart (not one lse): s_ij - m_i is exact even for rows of huge
  scores (a finite mask of -1e30 or finfo.min on every key), whose lse would round away l_i.
- Fully masked rows and rows past the end contribute exactly zero, so their gradients are
  zero, never NaN. A hidden score (by a boolean mask, the band or the bounds) gets dS = 0
  exactly, also in a row whose statistics or delta are NaN because it sees a NaN key: NaN
  reaches dK where the reference's does (its masked_fill stops the gradient there), and dV
  through p = NaN across such a row, as the reference's softmax. A float mask's -inf is
  added to the score, as in the reference, and hides nothing from a NaN.
- grad_q, grad_k, grad_v are contiguous; grad_out and out may have any strides with a unit
  last one; stats is (B, Hq, L, 2) float32 as the forward returns it. A gradient of the lse
  output (grad_lse) enters as delta_i - grad_lse_i (d lse_i / d s_ij = p_ij).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import empty, require_unit_column_stride, serialized
from .attention import (
    _DKDV_TILES,
    _DQ_TILES,
    _PREPROCESS_BLOCK_M,
    _alibi_args,
    _alibi_slope,
    _autotune,
    _block_bounds,
    _check,
    _dropout_keep,
    _features,
    _load_row_stats,
    _load_rows,
    _mask_args,
    _program_block,
    _score_scales,
    _scores_and_visibility,
)


@triton.jit
def _attention_bwd_preprocess_kernel(
    OUT,  # [B, Hq, L, DV] forward output, unit column stride
    OUT_RESIDUAL,  # [B, Hq, L, DV] the forward's out_residual, OUT's strides (unused without
    #                HAS_RESIDUAL)
    GRAD_OUT,  # [B, Hq, L, DV] gradient of the output, unit column stride
    DELTA,  # [B, Hq, L] float32 rowsum(OUT * GRAD_OUT), contiguous
    stride_ob, stride_oh, stride_om,  # strides of OUT in elements (batch, head, row)
    stride_gb, stride_gh, stride_gm,  # strides of GRAD_OUT
    H,  # query heads
    L,  # query length
    DV,  # head dim of v
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_DV: tl.constexpr,  # DV padded to a power of two
):
    bh, b, h, start_m = _program_block(tl.program_id(0), L, H, BLOCK_M, False)
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    out_base = b * stride_ob + h * stride_oh
    out = _load_rows(OUT + out_base, rows, L, stride_om, cols, DV).to(tl.float32)
    if HAS_RESIDUAL:
        # out to about float32's precision: delta_i cancels against dP_ij in dS_ij where a
        # row's attention sits on few keys, and out rounded to half precision makes dq and
        # dk several times less accurate than the rest of the computation there.
        out += _load_rows(OUT_RESIDUAL + out_base, rows, L, stride_om, cols, DV).to(tl.float32)
    grad_out = _load_rows(GRAD_OUT + b * stride_gb + h * stride_gh, rows, L, stride_gm, cols, DV)
    delta = tl.sum(out * grad_out.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@_autotune(_DKDV_TILES)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # [B, Hq, L, D] queries, unit column stride
    K,  # [B, Hkv, S, D] keys, unit column stride
    V,  # [B, Hkv, S, DV] values, unit column stride
    MASK,  # [B, Hq, L, S] float mask, or bool viewed as uint8 (unused without HAS_MASK)
    ALIBI,  # [B, Hq] float32 ALiBi slopes, 0 strides where broadcast (unused without HAS_ALIBI)
    SEED,  # [1] int64 Philox seed of the forward (unused without HAS_DROPOUT)
    GRAD_OUT,  # [B, Hq, L, DV] gradient of the output, unit column stride
    STATS,  # [B, Hq, L, 2] float32 row statistics from the forward, contiguous
    DELTA,  # [B, Hq, L] float32 rowsum(out * grad_out), contiguous
    GRAD_K,  # [B, Hkv, S, D] gradient of k, contiguous, k's dtype
    GRAD_V,  # [B, Hkv, S, DV] gradient of v, contiguous, v's dtype
    stride_qb, stride_qh, stride_qm,  # strides of Q in elements (batch, head, row)
    stride_kb, stride_kh, stride_kn,  # strides of K
    stride_vb, stride_vh, stride_vn,  # strides of V
    stride_mb, stride_mh, stride_mm, stride_mn,  # strides of MASK, 0 where broadcast
    stride_ab, stride_ah,  # strides of ALIBI
    stride_gb, stride_gh, stride_gm,  # strides of GRAD_OUT
    H,  # query heads Hq
    GROUP,  # query heads per kv head, Hq // Hkv
    L,  # query length
    S,  # key length
    D,  # head dim of q and k
    DV,  # head dim of v
    scale,  # softmax scale of q . k
    softcap,  # the forward's softcap (used when HAS_SOFTCAP)
    diagonal_offset,  # band centre: key i + diagonal_offset for query i
    window_left,  # keys visible left of the centre (used when BAND_LEFT)
    window_right,  # keys visible right of the centre (used when BAND_RIGHT)
    dropout_p,  # the forward's dropout probability
    L_BUCKET,  # next power of two of L: autotuning key only
    S_BUCKET,  # next power of two of S: autotuning key only
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,  # bool mask (keep where nonzero), else added
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BAND_LEFT: tl.constexpr,  # window_left >= 0
    BAND_RIGHT: tl.constexpr,  # window_right >= 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,  # query rows per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_DV: tl.constexpr,  # DV padded to a power of two
):
    # bhk: b * Hkv + kv_h
    bhk, b, kv_h, start_n = _program_block(tl.program_id(0), S, H // GROUP, BLOCK_N, False)
    keys = start_n + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b * stride_kb + kv_h * stride_kh, keys, S, stride_kn, cols_d, D)
    v = _load_rows(V + b * stride_vb + kv_h * stride_vh, keys, S, stride_vn, cols_dv, DV)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    qk_scale, cap2 = _score_scales(scale, softcap, HAS_SOFTCAP)
    # Scores are computed transposed, [keys, queries], so that dk and dv need no transposes.
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # Query i sees key j iff j - offset - right <= i <= j - offset + left.
    last_n = tl.minimum(start_n + BLOCK_N, S) - 1
    m0, m1, m2, m3 = _block_bounds(start_n, last_n, L, -(diagonal_offset + window_right),
                                   window_left - diagonal_offset, BAND_RIGHT, BAND_LEFT, BLOCK_M)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        grad_out_base = GRAD_OUT + b * stride_gb + h * stride_gh
        mask_offset = b * stride_mb + h * stride_mh
        alibi_slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
        rng_offset = bh * L * S
        for phase in tl.static_range(3):  # edge blocks, inner blocks, edge blocks
            if phase == 0:
                lo, hi = m0, m1
            elif phase == 1:
                lo, hi = m1, m2
            else:
                lo, hi = m2, m3
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                q = _load_rows(q_base, rows, L, stride_qm, cols_d, D)
                grad_out = _load_rows(grad_out_base, rows, L, stride_gm, cols_dv, DV)
                row_max, log2_sum = _load_row_stats(STATS + bh * L * 2, rows, L)
                delta = tl.load(DELTA + bh * L + rows, mask=rows < L, other=0.0)
                qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
                s, visible, capped = _scores_and_visibility(
                    qk, MASK, mask_offset, rows[None, :], keys[:, None], stride_mm, stride_mn,
                    L, S, qk_scale, cap2, alibi_slope, diagonal_offset, window_left,
                    window_right, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, BAND_LEFT,
                    BAND_RIGHT, phase != 1)
                p = tl.math.exp2((s - row_max[None, :]) - log2_sum[None, :])
                dp = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
                if HAS_DROPOUT:
                    keep = _dropout_keep(seed, rng_offset, rows[None, :], keys[:, None], S,
                                         dropout_p)
                    inv_keep = 1.0 / (1.0 - dropout_p)
                    p_kept = tl.where(keep, p * inv_keep, 0.0)
                    dp = tl.where(keep, dp * inv_keep, 0.0)
                else:
                    p_kept = p
                dv = tl.dot(p_kept.to(grad_out.dtype), grad_out, dv,
                            input_precision=DOT_PRECISION)
                ds = p * (dp - delta[None, :])
                if HAS_SOFTCAP:
                    ds = ds * (1.0 - capped * capped)
                if (HAS_MASK and MASK_IS_BOOL) or phase != 1:  # hidden: dS = 0 (docstring)
                    ds = tl.where(visible, ds, 0.0)
                dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    out_rows = (bhk.to(tl.int64) * S + keys)[:, None]
    tl.store(GRAD_K + out_rows * D + cols_d[None, :], (dk * scale).to(GRAD_K.dtype.element_ty),
             mask=(keys < S)[:, None] & (cols_d < D)[None, :])
    tl.store(GRAD_V + out_rows * DV + cols_dv[None, :], dv.to(GRAD_V.dtype.element_ty),
             mask=(keys < S)[:, None] & (cols_dv < DV)[None, :])


@_autotune(_DQ_TILES)
@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # [B, Hq, L, D] queries, unit column stride
    K,  # [B, Hkv, S, D] keys, unit column stride
    V,  # [B, Hkv, S, DV] values, unit column stride
    MASK,  # [B, Hq, L, S] float mask, or bool viewed as uint8 (unused without HAS_MASK)
    ALIBI,  # [B, Hq] float32 ALiBi slopes, 0 strides where broadcast (unused without HAS_ALIBI)
    SEED,  # [1] int64 Philox seed of the forward (unused without HAS_DROPOUT)
    GRAD_OUT,  # [B, Hq, L, DV] gradient of the output, unit column stride
    STATS,  # [B, Hq, L, 2] float32 row statistics from the forward, contiguous
    DELTA,  # [B, Hq, L] float32 rowsum(out * grad_out), contiguous
    GRAD_Q,  # [B, Hq, L, D] gradient of q, contiguous, q's dtype
    stride_qb, stride_qh, stride_qm,  # strides of Q in elements (batch, head, row)
    stride_kb, stride_kh, stride_kn,  # strides of K
    stride_vb, stride_vh, stride_vn,  # strides of V
    stride_mb, stride_mh, stride_mm, stride_mn,  # strides of MASK, 0 where broadcast
    stride_ab, stride_ah,  # strides of ALIBI
    stride_gb, stride_gh, stride_gm,  # strides of GRAD_OUT
    H,  # query heads Hq
    GROUP,  # query heads per kv head, Hq // Hkv
    L,  # query length
    S,  # key length
    D,  # head dim of q and k
    DV,  # head dim of v
    scale,  # softmax scale of q . k
    softcap,  # the forward's softcap (used when HAS_SOFTCAP)
    diagonal_offset,  # band centre: key i + diagonal_offset for query i
    window_left,  # keys visible left of the centre (used when BAND_LEFT)
    window_right,  # keys visible right of the centre (used when BAND_RIGHT)
    dropout_p,  # the forward's dropout probability
    L_BUCKET,  # next power of two of L: autotuning key only
    S_BUCKET,  # next power of two of S: autotuning key only
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,  # bool mask (keep where nonzero), else added
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BAND_LEFT: tl.constexpr,  # window_left >= 0
    BAND_RIGHT: tl.constexpr,  # window_right >= 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_DV: tl.constexpr,  # DV padded to a power of two
):
    bh, b, h, start_m = _program_block(tl.program_id(0), L, H, BLOCK_M, True)
    kv_h = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, L, stride_qm, cols_d, D)
    grad_out = _load_rows(GRAD_OUT + b * stride_gb + h * stride_gh, rows, L, stride_gm, cols_dv,
                          DV)
    row_max, log2_sum = _load_row_stats(STATS + bh.to(tl.int64) * L * 2, rows, L)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    mask_offset = b * stride_mb + h * stride_mh
    alibi_slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
    rng_offset = bh.to(tl.int64) * L * S
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    qk_scale, cap2 = _score_scales(scale, softcap, HAS_SOFTCAP)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    last_m = tl.minimum(start_m + BLOCK_M, L) - 1
    n0, n1, n2, n3 = _block_bounds(start_m, last_m, S, diagonal_offset - window_left,
                                   diagonal_offset + window_right, BAND_LEFT, BAND_RIGHT, BLOCK_N)
    for phase in tl.static_range(3):  # edge blocks, inner blocks, edge blocks
        if phase == 0:
            lo, hi = n0, n1
        elif phase == 1:
            lo, hi = n1, n2
        else:
            lo, hi = n2, n3
        for start_n in range(lo, hi, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, keys, S, stride_kn, cols_d, D)
            v = _load_rows(v_base, keys, S, stride_vn, cols_dv, DV)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s, visible, capped = _scores_and_visibility(
                qk, MASK, mask_offset, rows[:, None], keys[None, :], stride_mm, stride_mn, L, S,
                qk_scale, cap2, alibi_slope, diagonal_offset, window_left, window_right,
                HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, BAND_LEFT, BAND_RIGHT,
                phase != 1)
            p = tl.math.exp2((s - row_max[:, None]) - log2_sum[:, None])
            dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rng_offset, rows[:, None], keys[None, :], S, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - capped * capped)
            if (HAS_MASK and MASK_IS_BOOL) or phase != 1:  # hidden: dS = 0 (docstring)
                ds = tl.where(visible, ds, 0.0)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    out_rows = (bh.to(tl.int64) * L + rows)[:, None]
    tl.store(GRAD_Q + out_rows * D + cols_d[None, :], (dq * scale).to(GRAD_Q.dtype.element_ty),
             mask=(rows < L)[:, None] & (cols_d < D)[None, :])


class AttentionBackward(NamedTuple):
    grad_q: torch.Tensor  # (B, Hq, L, D) in q's dtype
    grad_k: torch.Tensor  # (B, Hkv, S, D) in k's dtype, summed over the kv head's group
    grad_v: torch.Tensor  # (B, Hkv, S, Dv) in v's dtype


@serialized
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    grad_lse: torch.Tensor | None,
    mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    softcap: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    out_residual: torch.Tensor | None,
) -> AttentionBackward:
    """Launch the backward kernels; see the module docstring for the maths. The arguments
    are those of the op fastformer::attention_bwd, in its order."""
    op = "attention_bwd"
    problem = _check(op, q, k, v, mask, alibi_slopes, seed, softcap, dropout_p)
    require_unit_column_stride(op, grad_out=grad_out, out=out)
    batch, heads, kv_heads = problem.batch, problem.heads, problem.kv_heads
    length, source = problem.length, problem.source
    expected = (batch, heads, length, problem.value_dim)
    if tuple(out.shape) != expected or tuple(grad_out.shape) != expected:
        raise ValueError(f"{op}: out and grad_out must be {expected}, got {tuple(out.shape)} "
                         f"and {tuple(grad_out.shape)}")
    if tuple(stats.shape) != (batch, heads, length, 2) or stats.dtype != torch.float32:
        raise ValueError(f"{op}: stats must be float32 {(batch, heads, length, 2)}, got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    has_residual = out_residual is not None and out_residual.numel() > 0
    if has_residual and (out_residual.shape != out.shape or out_residual.stride() != out.stride()
                         or out_residual.dtype != out.dtype):
        raise ValueError(f"{op}: out_residual must have out's shape, strides and dtype, got "
                         f"{out_residual.dtype} {tuple(out_residual.shape)}")
    device = q.device
    grad_q = empty(tuple(q.shape), q.dtype, device)
    grad_k = empty(tuple(k.shape), k.dtype, device)
    grad_v = empty(tuple(v.shape), v.dtype, device)
    stats = stats.contiguous()  # the forward's already are
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=device)
    features = _features(problem, q, mask, alibi_slopes, softcap, dropout_p, window_left,
                         window_right)
    mask_arg, mask_strides = _mask_args(mask)
    alibi_arg, alibi_strides = _alibi_args(alibi_slopes)
    seed_arg = seed if dropout_p > 0.0 else None
    shared = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *alibi_strides,
              *grad_out.stride()[:3], heads, heads // kv_heads, length, source, problem.head_dim,
              problem.value_dim, scale, softcap, diagonal_offset, window_left, window_right,
              dropout_p)

    if batch * heads * length > 0:
        preprocess_grid = (triton.cdiv(length, _PREPROCESS_BLOCK_M) * batch * heads,)
        _attention_bwd_preprocess_kernel[preprocess_grid](
            out, out_residual if has_residual else None, grad_out, delta, *out.stride()[:3],
            *grad_out.stride()[:3], heads, length, problem.value_dim, HAS_RESIDUAL=has_residual,
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_DV=features["BLOCK_DV"],
        )
    if grad_lse is not None:
        # d lse_i / d s_ij = p_ij: the lse's gradient G_i joins dS_ij = p_ij (dP_ij - delta_i)
        # as p_ij G_i, that is delta_i - G_i in place of delta_i.
        delta -= grad_lse.to(torch.float32)
    if batch * kv_heads * source > 0:
        def dkdv_grid(meta):
            return (triton.cdiv(source, meta["BLOCK_N"]) * batch * kv_heads,)

        _attention_bwd_dkdv_kernel[dkdv_grid](
            q, k, v, mask_arg, alibi_arg, seed_arg, grad_out, stats, delta, grad_k, grad_v,
            *shared,
            **features,
        )
    if batch * heads * length > 0:
        def dq_grid(meta):
            return (triton.cdiv(length, meta["BLOCK_M"]) * batch * heads,)

        _attention_bwd_dq_kernel[dq_grid](
            q, k, v, mask_arg, alibi_arg, seed_arg, grad_out, stats, delta, grad_q, *shared,
            **features,
        )
    return AttentionBackward(grad_q, grad_k, grad_v)
