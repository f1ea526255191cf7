"""Flash attention in Triton: forward and FlashAttention-2 backward, with grouped kv heads,
bool or float masks, ALiBi, banded masking (causal, sliding windows) and dropout.

Maths, for query i of head h (reading kv head h // (Hq / Hkv)) of batch b and key j, in
float32:
    s_ij  = cap(scale * q_i . k_j) + mask_ij      bool mask: -inf where False; cap(u) =
                                                  softcap * tanh(u / softcap) with a softcap
    s_ij -= slope_bh * |j - (i + offset)|         with ALiBi slopes (B, Hq), computed in-kernel
    s_ij  = -inf unless  i + offset - left <= j <= i + offset + right   (band; a side < 0 is open)
    lse_i = log sum_j exp(s_ij)                   -inf when every key of row i is masked
    p_ij  = exp(s_ij - lse_i),   z_ij = rand(seed, ((b * Hq + h) * L + i) * S + j) >= p_drop
    out_i = sum_j p_ij * z_ij / (1 - p_drop) * v_j          (0 for a fully masked row)
Backward, with delta_i = dO_i . out_i (out in float32: see OUT_RESIDUAL):
    dP_ij = z_ij / (1 - p_drop) * dO_i . v_j,    dS_ij = p_ij * (dP_ij - delta_i)
    dq_i  = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,
    dv_j  = sum_i p_ij * z_ij / (1 - p_drop) * dO_i     (dk, dv summed over the kv head's group)

Limits and choices:
- q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): any strides with a unit last one; no
  copies, no repeat of k/v for grouped heads. 16 <= D, Dv <= 256; head dims that are not
  powers of two are padded inside the kernels by masked loads. Offsets are int64.
- Online softmax in base 2: log2(e) is folded into the scale and the mask, exp2 throughout,
  float32 statistics and accumulators. fp32 inputs use IEEE dot products (no TF32). The
  forward saves each row's max and log-sum apart (stats) for the backward, besides their
  sum lse, so that the backward's s_ij - max_i stays exact in rows of huge scores.
- The mask is read tile by tile through its four strides (0 where broadcast). Finite float
  mask values stay finite after scaling (finfo(float32).min does not become -inf).
- Key blocks outside the band are skipped by the loop bounds; blocks wholly inside the band
  and the sequences run without the per-element band mask (three loops, one body).
- Dropout is regenerated from the Philox seed in the backward; nothing is stored.
- Backward: delta by a preprocess kernel (for half-precision inputs from out plus the
  forward's out_residual, the float32 out's rounding error, when the op keeps it); dK/dV
  per key block looping over query blocks and over every query head of the group; dQ per
  query block looping over key blocks. No atomics: the results are deterministic.
- Grids are one-dimensional (blocks x batch x heads in dim 0). On CUDA the tile shapes are
  autotuned per head dim, dtype, features and power-of-two buckets of L and S; under
  Triton's interpreter a single 16 x 16 tile is used.
- Decoding (split forward): where one query block per head leaves the GPU mostly idle
  (L <= 16 and fewer (batch, head) pairs than multiprocessors), several programs share a
  query block's keys, each writing its (row max, row sum, unnormalized out) in float32; a
  combine kernel merges them by the online softmax's rule into the same out, lse and
  statistics (kv_splits chooses how many).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    empty,
    empty_absent,
    multiprocessor_count,
    next_power_of_2,
    require_unit_column_stride,
    serialized,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)

# ----------------------------------------------------------------------------------------
# Tile shapes: (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages, widest head dim),
# the widest head dim (fp32 counts four times) a tile is tried at. Every tile fits Hopper's
# shared memory there; some spill registers at their widest or with masks and dropout
# (tools/cross_compile.py compiles them all for sm_90 without a GPU and reports registers
# and spills: benchmarks/results/triton-compile-sm_90.csv). Autotuning picks among the
# tiles that fit a call.
# ----------------------------------------------------------------------------------------

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FWD_TILES = [(128, 128, 8, 2, 128), (128, 64, 8, 3, 128), (128, 64, 4, 3, 64),
              (128, 32, 4, 3, 64), (64, 64, 4, 3, 128), (64, 64, 8, 2, 256), (64, 32, 4, 2, 256),
              (32, 64, 4, 3, 256), (16, 128, 4, 2, 128), (16, 64, 4, 3, 256), (32, 32, 4, 2, 512),
              (16, 32, 4, 2, 512)]
_DKDV_TILES = [(64, 128, 8, 2, 64), (32, 128, 8, 2, 128), (16, 128, 8, 2, 128),
               (16, 64, 4, 2, 64), (32, 32, 4, 2, 128), (32, 32, 8, 1, 512), (16, 32, 4, 1, 512)]
_DQ_TILES = [(128, 64, 8, 2, 128), (128, 32, 8, 2, 128), (128, 32, 4, 3, 64), (64, 64, 4, 3, 128),
             (64, 32, 4, 2, 128), (64, 64, 8, 2, 256), (32, 64, 4, 2, 256), (16, 64, 4, 2, 256),
             (32, 32, 4, 1, 512), (16, 32, 4, 1, 512)]
_PREPROCESS_BLOCK_M = 16 if INTERPRETING else 64
_COMBINE_BLOCK_R = 16
# Split forwards (kv_splits): for L up to this (every tile holds the queries of a head in one
# block), at least this many visible keys per split, at most this many splits.
MAX_SPLIT_LENGTH, MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS = 16, 256, 64
# Keys of the autotuning cache (the dtypes of the tensor arguments are added by Triton); the
# forward's adds SPLIT. tools/autotune_report.py names the keys of stored tunings by them.
TUNING_KEY = ["BLOCK_D", "BLOCK_DV", "L_BUCKET", "S_BUCKET", "HAS_MASK", "MASK_IS_BOOL",
              "HAS_ALIBI", "HAS_SOFTCAP", "HAS_DROPOUT", "BAND_LEFT", "BAND_RIGHT"]
FWD_TUNING_KEY = [*TUNING_KEY, "SPLIT"]


AUTOTUNE_ENV = "FASTFORMER_AUTOTUNE"


def autotuning_enabled() -> bool:
    """FASTFORMER_AUTOTUNE: "1" (or unset) times every tile that fits a call and keeps the
    fastest; "0" takes the first that fits (the largest), with no timing: quick and
    predictable where many shapes each compile once (test suites), not the fastest."""
    value = os.environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


def _autotune(tiles: list[tuple[int, int, int, int, int]], key: list[str] = TUNING_KEY):
    """triton.autotune over the tiles that fit each call: no longer than the sequences
    (decoding gets 16-row tiles) and wide enough for the head dims; only the first of them
    when autotuning_enabled() is false. The interpreter runs a single 16 x 16 tile."""
    if INTERPRETING:
        return triton.autotune(
            configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)],
            key=[])
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s, _ in tiles]
    widest = {id(config): tile[4] for config, tile in zip(configs, tiles, strict=True)}

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        max_m, max_n = max(16, args["L_BUCKET"]), max(16, args["S_BUCKET"])
        # fp32 IEEE dot products run on the FMA units with operands in registers: 4x wider.
        head = max(args["BLOCK_D"], args["BLOCK_DV"]) * (4 if args["Q"].element_size() == 4 else 1)
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m
                and c.kwargs["BLOCK_N"] <= max_n and widest[id(c)] >= head]
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept if autotuning_enabled() else kept[:1]

    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune})


# ----------------------------------------------------------------------------------------
# Device functions shared by the kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _program_block(pid, n, heads, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Program pid's (batch * heads + head, batch, head, first position) in a grid of
    cdiv(n, BLOCK) blocks for every (batch, head). REVERSE hands out the last blocks first:
    under a causal band they have the most work, so they should not start last."""
    blocks = tl.cdiv(n, BLOCK)
    bh = pid // blocks
    block = pid % blocks
    if REVERSE:
        block = blocks - 1 - block
    return bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), block * BLOCK


@triton.jit
def _block_bounds(start, last, n, c_lo, c_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Partner blocks of the own positions [start, last]: partner p is visible to own x iff
    x + c_lo <= p (when HAS_LO), p <= x + c_hi (when HAS_HI) and 0 <= p < n. Returns block
    starts a <= b <= c <= d: [a, b) and [c, d) need the band and bounds masks; every block
    of [b, c) is visible to every own position."""
    lo = 0
    full_lo = 0
    hi = n
    full_hi = n
    if HAS_LO:
        lo = tl.minimum(tl.maximum(start + c_lo, 0), n)
        full_lo = tl.minimum(tl.maximum(last + c_lo, 0), n)
    if HAS_HI:
        hi = tl.minimum(tl.maximum(last + c_hi + 1, 0), n)
        full_hi = tl.minimum(tl.maximum(start + c_hi + 1, 0), n)
    a = lo // BLOCK * BLOCK
    d = tl.cdiv(hi, BLOCK) * BLOCK
    b = tl.minimum(tl.maximum(a, tl.cdiv(full_lo, BLOCK) * BLOCK), d)
    c = tl.minimum(tl.maximum(b, full_hi // BLOCK * BLOCK), d)
    return a, b, c, d


@triton.jit
def _scores(
    qk, MASK, mask_offset, i, j, stride_mm, stride_mn, L, S, qk_scale, cap2, alibi_slope,
    diagonal_offset, window_left, window_right, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, EDGE: tl.constexpr,
):
    """Masked scores of a tile in base 2, log2(e) * s. i and j are the query and key
    positions, broadcastable to the tile ([BM, 1] and [1, BN], or transposed); qk_scale and
    cap2 are _score_scales'; alibi_slope is the head's ALiBi slope times log2(e) (see
    _alibi_slope). EDGE applies the band and the bounds of both sequences."""
    s, _visible, _capped = _scores_and_visibility(
        qk, MASK, mask_offset, i, j, stride_mm, stride_mn, L, S, qk_scale, cap2, alibi_slope,
        diagonal_offset, window_left, window_right, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI,
        HAS_SOFTCAP, BAND_LEFT, BAND_RIGHT, EDGE)
    return s


@triton.jit
def _scores_and_visibility(
    qk, MASK, mask_offset, i, j, stride_mm, stride_mn, L, S, qk_scale, cap2, alibi_slope,
    diagonal_offset, window_left, window_right, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, EDGE: tl.constexpr,
):
    """_scores, which scores are visible (not hidden by a boolean mask, the band or the
    bounds), and with HAS_SOFTCAP the tanh of the capped scores (the backward's
    d cap / du = 1 - tanh^2; else the scores, unused). A float mask's -inf counts as
    visible, as the reference adds it to the score (this tells a masked-out score from one
    that is -inf by itself or by addition)."""
    s = qk * qk_scale
    capped = s
    if HAS_SOFTCAP:  # s holds u / softcap: tanh(x) = 1 - 2 / (e^2x + 1), finite at +-inf
        capped = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * LOG2E)) + 1.0)
        s = capped * cap2
    visible = (i >= 0) & (j >= 0)  # all True, in the tile's shape
    if HAS_MASK:
        offsets = mask_offset + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn
        mask = tl.load(MASK + offsets, mask=(i < L) & (j < S), other=0)
        if MASK_IS_BOOL:
            visible = mask != 0
            s = tl.where(visible, s, float("-inf"))
        else:
            bias = mask.to(tl.float32)
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias * LOG2E, -FLOAT32_MAX))
            s = s + bias
    if HAS_ALIBI:
        s = s - alibi_slope * tl.abs(j - (i + diagonal_offset)).to(tl.float32)
    if EDGE:
        inside = (i < L) & (j < S)
        if BAND_LEFT:
            inside = inside & (j >= i + (diagonal_offset - window_left))
        if BAND_RIGHT:
            inside = inside & (j <= i + (diagonal_offset + window_right))
        visible = visible & inside
        s = tl.where(inside, s, float("-inf"))
    return s, visible, capped


@triton.jit
def _score_scales(scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(qk_scale, cap2): the products q . k times qk_scale give base-2 scores,
    log2(e) * scale, or with HAS_SOFTCAP u / softcap, which the cap takes to base-2 scores
    as cap2 * tanh(u / softcap), cap2 = log2(e) * softcap."""
    if HAS_SOFTCAP:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


@triton.jit
def _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of head (b, h) in base-2 score units, log2(e) * slope (0 without)."""
    if HAS_ALIBI:
        return tl.load(ALIBI + b * stride_ab + h * stride_ah) * LOG2E
    return 0.0


@triton.jit
def _dropout_keep(seed, rng_offset, i, j, S, dropout_p):
    """z_ij = rand >= p for a tile; rng_offset = (b * Hq + h) * L * S (int64)."""
    return tl.rand(seed, rng_offset + i.to(tl.int64) * S + j) >= dropout_p


@triton.jit
def _load_row_stats(STATS, rows, L):
    """The forward's row statistics (base 2) of the rows: (row max, log2 of the row sum),
    with +inf as the max of fully masked and out-of-range rows, so that
    exp2(s - max - log2_sum) is 0 there, never NaN."""
    row_max = tl.load(STATS + rows * 2, mask=rows < L, other=float("-inf"))
    log2_sum = tl.load(STATS + rows * 2 + 1, mask=rows < L, other=0.0)
    hidden = row_max == float("-inf")
    return tl.where(hidden, float("inf"), row_max), tl.where(hidden, 0.0, log2_sum)


@triton.jit
def _load_rows(BASE, rows, n, stride, cols, width):
    """A [rows, cols] tile of a (n, width) matrix with unit column stride, zeros outside."""
    ptrs = BASE + rows[:, None].to(tl.int64) * stride + cols[None, :]
    return tl.load(ptrs, mask=(rows < n)[:, None] & (cols < width)[None, :], other=0.0)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@_autotune(_FWD_TILES, FWD_TUNING_KEY)
@triton.jit
def _attention_fwd_kernel(
    Q,  # [B, Hq, L, D] queries, unit column stride
    K,  # [B, Hkv, S, D] keys, unit column stride
    V,  # [B, Hkv, S, DV] values, unit column stride
    MASK,  # [B, Hq, L, S] float mask, or bool viewed as uint8 (unused without HAS_MASK)
    ALIBI,  # [B, Hq] float32 ALiBi slopes, 0 strides where broadcast (unused without HAS_ALIBI)
    SEED,  # [1] int64 Philox seed (unused without HAS_DROPOUT)
    OUT,  # [B, Hq, L, DV] output, contiguous, q's dtype
    OUT_RESIDUAL,  # [B, Hq, L, DV] out in float32 minus OUT, in q's dtype, contiguous (unused
    #                without HAS_RESIDUAL): OUT + OUT_RESIDUAL is out to about float32's
    #                precision, for the backward's delta (attention_backward.py)
    LSE,  # [B, Hq, L] float32 log-sum-exp of the scores (natural log), contiguous
    STATS,  # [B, Hq, L, 2] float32 row statistics (base 2) for the backward: the row max of
    #         the scores and log2 of the row sum (lse = (max + log2 sum) * ln 2). Contiguous.
    PART_ACC,  # [splits, B * Hq * L, DV] float32 (SPLIT only): each split's unnormalized out
    PART_STATS,  # [splits, B * Hq * L, 2] float32 (SPLIT only): each split's row max, row sum
    splits,  # programs sharing the keys of one query block (1 unless SPLIT)
    rows_total,  # B * Hq * L: the rows of one split in PART_ACC and PART_STATS
    stride_qb, stride_qh, stride_qm,  # strides of Q in elements (batch, head, row)
    stride_kb, stride_kh, stride_kn,  # strides of K
    stride_vb, stride_vh, stride_vn,  # strides of V
    stride_mb, stride_mh, stride_mm, stride_mn,  # strides of MASK, 0 where broadcast
    stride_ab, stride_ah,  # strides of ALIBI
    H,  # query heads Hq
    GROUP,  # query heads per kv head, Hq // Hkv
    L,  # query length
    S,  # key length
    D,  # head dim of q and k
    DV,  # head dim of v
    scale,  # softmax scale of q . k
    softcap,  # scores capped to softcap * tanh(scale * q . k / softcap) (used when HAS_SOFTCAP)
    diagonal_offset,  # band centre: key i + diagonal_offset for query i
    window_left,  # keys visible left of the centre (used when BAND_LEFT)
    window_right,  # keys visible right of the centre (used when BAND_RIGHT)
    dropout_p,  # probability of dropping an attention probability
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
    HAS_RESIDUAL: tl.constexpr,  # write OUT_RESIDUAL
    SPLIT: tl.constexpr,  # split the keys: write PART_ACC and PART_STATS for the combine kernel
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_DV: tl.constexpr,  # DV padded to a power of two
):
    pid = tl.program_id(0)
    split = pid % splits  # consecutive programs share a query block (its q stays in L2)
    bh, b, h, start_m = _program_block(pid // splits, L, H, BLOCK_M, True)
    kv_h = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, L, stride_qm, cols_d, D)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    mask_offset = b * stride_mb + h * stride_mh
    alibi_slope = _alibi_slope(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
    rng_offset = bh.to(tl.int64) * L * S
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    qk_scale, cap2 = _score_scales(scale, softcap, HAS_SOFTCAP)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    last_m = tl.minimum(start_m + BLOCK_M, L) - 1
    n0, n1, n2, n3 = _block_bounds(start_m, last_m, S, diagonal_offset - window_left,
                                   diagonal_offset + window_right, BAND_LEFT, BAND_RIGHT, BLOCK_N)
    split_lo = n0
    split_hi = n3
    if SPLIT:  # this split's share of the key blocks [n0, n3), whole blocks each
        per_split = tl.cdiv((n3 - n0) // BLOCK_N, splits) * BLOCK_N
        split_lo = tl.minimum(n0 + split * per_split, n3)
        split_hi = tl.minimum(split_lo + per_split, n3)
    for phase in tl.static_range(3):  # edge blocks, inner blocks, edge blocks
        if phase == 0:
            lo, hi = n0, n1
        elif phase == 1:
            lo, hi = n1, n2
        else:
            lo, hi = n2, n3
        if SPLIT:
            lo = tl.maximum(lo, split_lo)
            hi = tl.minimum(hi, split_hi)
        for start_n in range(lo, hi, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, keys, S, stride_kn, cols_d, D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s = _scores(qk, MASK, mask_offset, rows[:, None], keys[None, :], stride_mm, stride_mn,
                        L, S, qk_scale, cap2, alibi_slope, diagonal_offset, window_left,
                        window_right, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, HAS_SOFTCAP, BAND_LEFT,
                        BAND_RIGHT, phase != 1)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rng_offset, rows[:, None], keys[None, :], S, dropout_p)
                p = tl.where(keep, p, 0.0)
            v = _load_rows(v_base, keys, S, stride_vn, cols_dv, DV)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    out_rows = bh.to(tl.int64) * L + rows
    if SPLIT:
        part_rows = split.to(tl.int64) * rows_total + out_rows
        part_mask = (rows < L)[:, None] & (cols_dv < DV)[None, :]
        tl.store(PART_ACC + part_rows[:, None] * DV + cols_dv[None, :], acc, mask=part_mask)
        tl.store(PART_STATS + part_rows * 2, m_i, mask=rows < L)
        tl.store(PART_STATS + part_rows * 2 + 1, l_i, mask=rows < L)
    else:
        _store_forward(acc, m_i, l_i, out_rows, rows < L, cols_dv, DV, dropout_p, OUT,
                       OUT_RESIDUAL, LSE, STATS, HAS_DROPOUT, HAS_RESIDUAL)


@triton.jit
def _store_forward(acc, m_i, l_i, out_rows, valid, cols_dv, DV, dropout_p, OUT, OUT_RESIDUAL,
                   LSE, STATS, HAS_DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The forward's results for rows out_rows (of B * Hq * L; `valid` where they exist) from
    the online softmax's state: acc = sum_j exp2(s_ij - m_i) z_ij v_j, m_i the row max
    (base 2), l_i = sum_j exp2(s_ij - m_i)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l_i >= 1 unless every key is masked
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    # Kept apart, not summed into the lse: a row of huge scores (a finite mask of -1e30) has
    # an lse whose float32 rounding swamps log2(l), and the backward needs both exactly.
    row_max = tl.where(l_i == 0.0, float("-inf"), m_i)
    log2_sum = tl.where(l_i == 0.0, float("-inf"), tl.math.log2(l_safe))
    out_offsets = out_rows[:, None] * DV + cols_dv[None, :]
    out_mask = valid[:, None] & (cols_dv < DV)[None, :]
    rounded = out.to(OUT.dtype.element_ty)
    tl.store(OUT + out_offsets, rounded, mask=out_mask)
    if HAS_RESIDUAL:
        residual = out - rounded.to(tl.float32)
        tl.store(OUT_RESIDUAL + out_offsets, residual.to(OUT.dtype.element_ty), mask=out_mask)
    tl.store(LSE + out_rows, (row_max + log2_sum) * LN2, mask=valid)
    tl.store(STATS + out_rows * 2, row_max, mask=valid)
    tl.store(STATS + out_rows * 2 + 1, log2_sum, mask=valid)


@triton.jit
def _attention_fwd_combine_kernel(
    PART_ACC, PART_STATS,  # the split forward's partial results (see _attention_fwd_kernel)
    OUT, OUT_RESIDUAL, LSE, STATS,  # as in _attention_fwd_kernel
    rows_total,  # B * Hq * L
    splits,
    DV,
    dropout_p,
    HAS_DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_DV: tl.constexpr,
):
    """The forward's results from the splits of a split forward: each split's (row max, row
    sum, unnormalized out) merged by the online softmax's rule, in split order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = rows < rows_total
    cols_dv = tl.arange(0, BLOCK_DV)
    tile_mask = valid[:, None] & (cols_dv < DV)[None, :]
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    part_rows = rows  # of split 0, int64
    for _split in range(splits):
        m_s = tl.load(PART_STATS + part_rows * 2, mask=valid, other=float("-inf"))
        l_s = tl.load(PART_STATS + part_rows * 2 + 1, mask=valid, other=0.0)
        acc_s = tl.load(PART_ACC + part_rows[:, None] * DV + cols_dv[None, :], mask=tile_mask,
                        other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
        part_rows += rows_total
    _store_forward(acc, m_i, l_i, rows, valid, cols_dv, DV, dropout_p, OUT, OUT_RESIDUAL, LSE,
                   STATS, HAS_DROPOUT, HAS_RESIDUAL)


class AttentionForward(NamedTuple):
    out: torch.Tensor  # (B, Hq, L, Dv) in q's dtype
    lse: torch.Tensor  # (B, Hq, L) float32; -inf for a row whose keys are all masked
    # (B, Hq, L, 2) float32, for the backward: row max of the base-2 scores and log2 of the
    # row sum, both -inf for a row whose keys are all masked.
    stats: torch.Tensor
    # (B, Hq, L, Dv) in q's dtype: out computed in float32 minus out rounded (their sum is out
    # to about float32's precision); numel 0 unless asked for with a half-precision q.
    out_residual: torch.Tensor


class _Problem(NamedTuple):
    batch: int
    heads: int  # query heads Hq
    kv_heads: int
    length: int  # L
    source: int  # S
    head_dim: int  # D
    value_dim: int  # Dv


def _check(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None, softcap: float,
           dropout_p: float) -> _Problem:
    """Shapes, dtypes and strides the kernels rely on; a ValueError naming the culprit."""
    require_unit_column_stride(op, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (B, H, L, D), got {q.dim()}, {k.dim()}, "
                         f"{v.dim()} dimensions")
    batch, heads, length, head_dim = q.shape
    _, kv_heads, source, value_dim = v.shape
    if k.shape != (batch, kv_heads, source, head_dim) or v.shape[0] != batch:
        raise ValueError(f"{op}: inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{op}: query heads ({heads}) must be a multiple of kv heads "
                         f"({kv_heads})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    for name, dim in (("D", head_dim), ("Dv", value_dim)):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dim {name} = {dim} outside [{MIN_HEAD_DIM}, "
                             f"{MAX_HEAD_DIM}]")
    if mask is not None:
        if tuple(mask.shape) != (batch, heads, length, source):
            raise ValueError(f"{op}: mask must be broadcast to {(batch, heads, length, source)}, "
                             f"got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"{op}: mask must be bool or floating point, got {mask.dtype}")
    if alibi_slopes is not None and (tuple(alibi_slopes.shape) != (batch, heads)
                                     or alibi_slopes.dtype != torch.float32):
        raise ValueError(f"{op}: alibi_slopes must be float32 broadcast to {(batch, heads)}, got "
                         f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    if dropout_p > 0.0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError(f"{op}: dropout needs a 1-element int64 seed tensor")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{op}: softcap must be finite and >= 0 (0: no capping), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return _Problem(batch, heads, kv_heads, length, source, head_dim, value_dim)


def _features(problem: _Problem, q: torch.Tensor, mask: torch.Tensor | None,
              alibi_slopes: torch.Tensor | None, softcap: float, dropout_p: float,
              window_left: int, window_right: int) -> dict:
    """The constexpr flags and keys shared by every kernel launch of a call."""
    return dict(
        L_BUCKET=next_power_of_2(problem.length),
        S_BUCKET=next_power_of_2(problem.source),
        HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_DROPOUT=dropout_p > 0.0,
        BAND_LEFT=window_left >= 0,
        BAND_RIGHT=window_right >= 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(MIN_HEAD_DIM, next_power_of_2(problem.head_dim)),
        BLOCK_DV=max(MIN_HEAD_DIM, next_power_of_2(problem.value_dim)),
    )


def kv_splits(problem: _Problem, device: torch.device, diagonal_offset: int, window_left: int,
              window_right: int) -> int:
    """How many programs share the keys of one query block (a split forward, then the combine
    kernel). Splitting pays where the query blocks are too few to fill the GPU: decoding and
    short query chunks (L <= MAX_SPLIT_LENGTH: one query block per head for every tile)
    against many keys. About two programs per multiprocessor, each with at least
    MIN_KEYS_PER_SPLIT of the keys the band lets the queries see."""
    programs = problem.batch * problem.heads
    multiprocessors = multiprocessor_count(device)
    if problem.length > MAX_SPLIT_LENGTH or programs >= multiprocessors:
        return 1
    first = 0 if window_left < 0 else max(0, diagonal_offset - window_left)
    end = problem.source if window_right < 0 else min(
        problem.source, problem.length + diagonal_offset + window_right)
    wanted = triton.cdiv(2 * multiprocessors, programs)
    return max(1, min(wanted, max(0, end - first) // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))


def _mask_args(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """The mask as the kernels read it (bool reinterpreted as uint8, no copy) and its strides."""
    if mask is None:
        return None, (0, 0, 0, 0)
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask), mask.stride()


def _alibi_args(alibi_slopes: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """The ALiBi slopes as the kernels read them, and their two strides."""
    return alibi_slopes, (0, 0) if alibi_slopes is None else alibi_slopes.stride()


@serialized
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    softcap: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    keep_residual: bool,
    *,
    splits: int | None = None,
) -> AttentionForward:
    """Launch the forward kernel; see the module docstring for the maths. The arguments are
    those of the op fastformer::attention_fwd, in its order. keep_residual: also return
    out_residual where q is in half precision (for the backward's delta). splits: programs
    sharing the keys of a query block (default: kv_splits())."""
    problem = _check("attention_fwd", q, k, v, mask, alibi_slopes, seed, softcap, dropout_p)
    batch, heads, length = problem.batch, problem.heads, problem.length
    value_dim = problem.value_dim
    out = empty((batch, heads, length, value_dim), q.dtype, q.device)
    lse = empty((batch, heads, length), torch.float32, q.device)
    stats = empty((batch, heads, length, 2), torch.float32, q.device)
    has_residual = keep_residual and q.dtype != torch.float32
    out_residual = empty(out.shape, q.dtype, q.device) if has_residual else empty_absent(
        q.dtype, q.device)
    if out.numel() == 0:
        return AttentionForward(out, lse, stats, out_residual)
    mask_arg, mask_strides = _mask_args(mask)
    alibi_arg, alibi_strides = _alibi_args(alibi_slopes)
    has_dropout = dropout_p > 0.0
    if splits is None:
        splits = kv_splits(problem, q.device, diagonal_offset, window_left, window_right)
    if splits < 1:
        raise ValueError(f"attention_fwd: splits must be >= 1, got {splits}")
    rows_total = batch * heads * length
    part_acc = part_stats = None
    if splits > 1:
        part_acc = torch.empty((splits, rows_total, value_dim), dtype=torch.float32,
                               device=q.device)
        part_stats = torch.empty((splits, rows_total, 2), dtype=torch.float32, device=q.device)
    features = _features(problem, q, mask, alibi_slopes, softcap, dropout_p, window_left,
                         window_right)

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]) * batch * heads * splits,)

    _attention_fwd_kernel[grid](
        q, k, v, mask_arg, alibi_arg, seed if has_dropout else None, out,
        out_residual if has_residual else None, lse, stats, part_acc, part_stats, splits,
        rows_total, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides,
        *alibi_strides, heads, heads // problem.kv_heads, length, problem.source,
        problem.head_dim, value_dim, scale, softcap, diagonal_offset, window_left, window_right,
        dropout_p,
        HAS_RESIDUAL=has_residual, SPLIT=splits > 1, **features,
    )
    if splits > 1:
        _attention_fwd_combine_kernel[(triton.cdiv(rows_total, _COMBINE_BLOCK_R),)](
            part_acc, part_stats, out, out_residual if has_residual else None, lse, stats,
            rows_total, splits, value_dim, dropout_p, HAS_DROPOUT=has_dropout,
            HAS_RESIDUAL=has_residual, BLOCK_R=_COMBINE_BLOCK_R, BLOCK_DV=features["BLOCK_DV"],
        )
    return AttentionForward(out, lse, stats, out_residual)
