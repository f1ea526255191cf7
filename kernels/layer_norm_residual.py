"""Fused (dropout +) residual add + LayerNorm / RMSNorm in Triton: forward and backward.

Maths, per row of N features (statistics in float32):
    h    = dropout(x) + residual            dropout(x) = x * keep / (1 - p), keep = rand >= p
    h    = round(h) to h's dtype             (the statistics see the rounded h, as eager does)
    mean = sum(h) / N,  var = sum((h - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
    xhat = (h - mean) * rstd                 RMSNorm: xhat = h * rstd,
                                             rstd = 1 / sqrt(sum(h^2) / N + eps)
    out  = xhat * weight + bias
Backward, with g = grad_out * weight:
    grad_h_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_h      (RMS: no mean(g))
    grad_x = grad_h_total * keep / (1 - p),  grad_residual = grad_h_total
    grad_weight = sum_rows(grad_out * xhat), grad_bias = sum_rows(grad_out)

Limits and choices:
- Rows are 2-D (M, N) with unit column stride; the row stride is free, so row slices of a
  wider tensor need no copy. Offsets are int64: tensors over 2^31 elements work.
- Rows up to MAX_FUSED_BLOCK features are held in registers (one read, one write); longer
  rows are processed in chunks of CHUNK_BLOCK: statistics by Chan's parallel combination,
  then a second sweep that recomputes h from the inputs (still in L2) rather than reading
  back the h just written, which other threads of the program may not see yet.
- Dropout draws Philox (tl.rand) at element offset row * N + col from a seed read on the
  device, so the backward regenerates the same mask and nothing is stored.
- Weight and bias gradients: each program accumulates the rows it owns into its own row of
  a (programs, N) float32 buffer; the launcher sums that buffer. No atomics.
- fp16, bf16 and fp32 inputs; weight and bias may have another float dtype than x.
"""

from __future__ import annotations

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
    serialized_when_interpreting,
)

# Longest row kept whole in registers, and the chunk width used beyond it.
MAX_FUSED_BLOCK = 16384
CHUNK_BLOCK = 4096
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LaunchConfig(NamedTuple):
    block_m: int  # rows per tile
    block_n: int  # features per tile (the whole row when single_pass)
    num_warps: int
    single_pass: bool  # the row fits in one tile


def launch_config(n: int) -> LaunchConfig:
    """Tile shape for rows of n features: about 4K elements a tile, rows packed when short."""
    block_n = min(next_power_of_2(n), MAX_FUSED_BLOCK)
    single_pass = block_n >= n
    if not single_pass:
        block_n = CHUNK_BLOCK
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return LaunchConfig(block_m, block_n, num_warps, single_pass)


# ----------------------------------------------------------------------------------------
# Device functions shared by the forward and backward kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _dropout_scale(seed, rows, cols, N, dropout_p):
    """keep / (1 - p) for every element of the tile (rows: [BM] int64, cols: [BN])."""
    offsets = rows[:, None] * N + cols[None, :]
    keep = tl.rand(seed, offsets) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _load_h(
    X, RESIDUAL, seed, rows, cols, mask, stride_x, stride_residual, N, dropout_p,
    H_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """h = dropout(x) + residual for a tile, rounded to H_DTYPE and returned in float32."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_DROPOUT:
        h = h * _dropout_scale(seed, rows, cols, N, dropout_p)
    if HAS_RESIDUAL:
        residual = tl.load(
            RESIDUAL + rows[:, None] * stride_residual + cols[None, :], mask=mask, other=0.0
        )
        h = h + residual.to(tl.float32)
    return h.to(H_DTYPE).to(tl.float32)


@triton.jit
def _load_row_param(PARAM, cols, N, HAS_PARAM: tl.constexpr, default: tl.constexpr):
    """weight or bias for the tile's columns, as a [1, BN] float32 row."""
    if HAS_PARAM:
        return tl.load(PARAM + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return tl.full((1, cols.shape[0]), default, tl.float32)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _store_out(
    OUT, WEIGHT, BIAS, h, mean, rstd, rows, cols, mask, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out = (h - mean) * rstd * weight + bias for a tile (mean is 0 for RMSNorm)."""
    xhat = (h - mean[:, None]) * rstd[:, None]
    weight = _load_row_param(WEIGHT, cols, N, HAS_WEIGHT, 1.0)
    bias = _load_row_param(BIAS, cols, N, HAS_BIAS, 0.0)
    out = xhat * weight + bias
    tl.store(OUT + rows[:, None] * N + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)




@triton.jit
def _layer_norm_residual_fwd_kernel(
    X,  # [M, N] input, unit column stride
    RESIDUAL,  # [M, N] residual (unused without HAS_RESIDUAL)
    WEIGHT,  # [N] scale (unused without HAS_WEIGHT)
    BIAS,  # [N] shift (unused without HAS_BIAS)
    SEED,  # [1] int64 Philox seed (unused without HAS_DROPOUT)
    OUT,  # [M, N] normalized output, contiguous, x's dtype
    H,  # [M, N] residual stream h, contiguous (unused without STORE_H)
    MEAN,  # [M] float32 row means (unused for IS_RMS_NORM)
    RSTD,  # [M] float32 row reciprocal standard deviations
    stride_x,  # row stride of X in elements
    stride_residual,  # row stride of RESIDUAL in elements
    M,  # rows
    N,  # features per row
    eps,  # added to the variance
    dropout_p,  # probability of zeroing an element of x
    H_DTYPE: tl.constexpr,  # dtype h is rounded to (H's dtype, or x's when not STORE_H)
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_RMS_NORM: tl.constexpr,
    STORE_H: tl.constexpr,  # False when h equals x (no residual, no dropout, same dtype)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # features per tile
    SINGLE_PASS: tl.constexpr,  # BLOCK_N >= N: the row stays in registers
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < N)[None, :]
        h = _load_h(X, RESIDUAL, seed, rows, cols, mask, stride_x, stride_residual, N,
                    dropout_p, H_DTYPE, HAS_RESIDUAL, HAS_DROPOUT)
        if STORE_H:
            tl.store(H + rows[:, None] * N + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
        if IS_RMS_NORM:
            mean = tl.zeros((BLOCK_M,), tl.float32)
            centered = h
        else:
            mean = tl.sum(h, axis=1) / N
            centered = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / N
    else:
        # Pass 1: statistics chunk by chunk, merged with Chan's formula (count, mean, M2).
        mean = tl.zeros((BLOCK_M,), tl.float32)
        m2 = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, N, BLOCK_N):
            chunk_cols = start + cols
            mask = row_mask[:, None] & (chunk_cols < N)[None, :]
            h = _load_h(X, RESIDUAL, seed, rows, chunk_cols, mask, stride_x, stride_residual,
                        N, dropout_p, H_DTYPE, HAS_RESIDUAL, HAS_DROPOUT)
            if STORE_H:
                tl.store(H + rows[:, None] * N + chunk_cols[None, :], h.to(H.dtype.element_ty),
                         mask=mask)
            if IS_RMS_NORM:
                m2 += tl.sum(h * h, axis=1)
            else:
                count = tl.minimum(N - start, BLOCK_N) * 1.0  # valid columns, as float
                chunk_mean = tl.sum(h, axis=1) / count
                chunk_centered = tl.where(mask, h - chunk_mean[:, None], 0.0)
                chunk_m2 = tl.sum(chunk_centered * chunk_centered, axis=1)
                seen = start * 1.0  # columns already merged
                delta = chunk_mean - mean
                mean += delta * (count / (seen + count))
                m2 += chunk_m2 + delta * delta * (seen * count / (seen + count))
        var = m2 / N
    rstd = 1.0 / tl.sqrt(var + eps)
    if not IS_RMS_NORM:
        tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    if SINGLE_PASS:
        _store_out(OUT, WEIGHT, BIAS, h, mean, rstd, rows, cols, mask, N, HAS_WEIGHT, HAS_BIAS)
    else:
        # Pass 2: recompute h from the inputs (cheaper than a barrier-ordered re-read of H).
        for start in range(0, N, BLOCK_N):
            chunk_cols = start + cols
            mask = row_mask[:, None] & (chunk_cols < N)[None, :]
            h = _load_h(X, RESIDUAL, seed, rows, chunk_cols, mask, stride_x, stride_residual,
                        N, dropout_p, H_DTYPE, HAS_RESIDUAL, HAS_DROPOUT)
            _store_out(OUT, WEIGHT, BIAS, h, mean, rstd, rows, chunk_cols, mask, N, HAS_WEIGHT,
                       HAS_BIAS)


class LayerNormResidualForward(NamedTuple):
    out: torch.Tensor  # [M, N] in x's dtype
    h: torch.Tensor  # [M, N] in h_dtype; empty when store_h is false
    mean: torch.Tensor  # [M] float32; empty for RMSNorm
    rstd: torch.Tensor  # [M] float32


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@serialized_when_interpreting
def layer_norm_residual_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    eps: float,
    dropout_p: float,
    rms_norm: bool,
    h_dtype: torch.dtype,
    store_h: bool,
) -> LayerNormResidualForward:
    """Launch the forward kernel on 2-D x (M, N); see the module docstring for the maths.
    The arguments are those of the op fastformer::layer_norm_residual_fwd, in its order."""
    require_unit_column_stride("layer_norm_residual_fwd", x=x, residual=residual, weight=weight,
                               bias=bias)
    m, n = x.shape
    device = x.device
    out = empty((m, n), x.dtype, device)
    h = empty((m, n), h_dtype, device) if store_h else empty_absent(h_dtype, device)
    mean = empty_absent(torch.float32, device) if rms_norm else empty((m,), torch.float32, device)
    rstd = empty((m,), torch.float32, device)
    if m == 0:
        return LayerNormResidualForward(out, h, mean, rstd)
    config = launch_config(n)
    has_dropout = dropout_p > 0.0
    # Outputs a call does not write go in as None (a compile-time constant), never as
    # empty tensors, whose null pointers a GPU launch may reject.
    _layer_norm_residual_fwd_kernel[(triton.cdiv(m, config.block_m),)](
        x, residual, weight, bias, seed if has_dropout else None,
        out, h if store_h else None, None if rms_norm else mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        m, n, eps, dropout_p,
        H_DTYPE=_TL_DTYPES[h_dtype if store_h else x.dtype],
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_dropout,
        IS_RMS_NORM=rms_norm,
        STORE_H=store_h,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        SINGLE_PASS=config.single_pass,
        num_warps=config.num_warps,
    )
    return LayerNormResidualForward(out, h, mean, rstd)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _grad_tile(
    GRAD_OUT, H, WEIGHT, rows, cols, mask, mean, rstd, stride_grad_out, stride_h, N,
    HAS_WEIGHT: tl.constexpr, IS_RMS_NORM: tl.constexpr,
):
    """grad_out, xhat and g = grad_out * weight for a tile, in float32."""
    dy = tl.load(GRAD_OUT + rows[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    if IS_RMS_NORM:
        xhat = h.to(tl.float32) * rstd[:, None]
    else:
        xhat = (h.to(tl.float32) - mean[:, None]) * rstd[:, None]
    xhat = tl.where(mask, xhat, 0.0)
    g = dy * _load_row_param(WEIGHT, cols, N, HAS_WEIGHT, 1.0)
    return dy, xhat, g


@triton.jit
def _store_input_grads(
    GRAD_H, GRAD_X, GRAD_RESIDUAL, seed, rows, cols, mask, g, xhat, mean_g, mean_g_xhat, rstd,
    stride_grad_h, N, dropout_p, HAS_GRAD_H: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IS_RMS_NORM: tl.constexpr, STORE_GRAD_RESIDUAL: tl.constexpr,
):
    """grad_h_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_h for a tile, then
    write grad_residual and grad_x (through dropout)."""
    grad_h_total = g - xhat * mean_g_xhat
    if not IS_RMS_NORM:
        grad_h_total -= mean_g
    grad_h_total = tl.where(mask, grad_h_total * rstd[:, None], 0.0)
    if HAS_GRAD_H:
        grad_h = tl.load(GRAD_H + rows[:, None] * stride_grad_h + cols[None, :], mask=mask,
                         other=0.0)
        grad_h_total += grad_h.to(tl.float32)
    offsets = rows[:, None] * N + cols[None, :]
    if STORE_GRAD_RESIDUAL:
        tl.store(GRAD_RESIDUAL + offsets, grad_h_total.to(GRAD_RESIDUAL.dtype.element_ty),
                 mask=mask)
    grad_x = grad_h_total
    if HAS_DROPOUT:
        grad_x = grad_x * _dropout_scale(seed, rows, cols, N, dropout_p)
    tl.store(GRAD_X + offsets, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_residual_bwd_kernel(
    GRAD_OUT,  # [M, N] gradient of out, unit column stride
    GRAD_H,  # [M, N] gradient arriving at h (unused without HAS_GRAD_H)
    H,  # [M, N] the normalized input saved by the forward
    WEIGHT,  # [N] scale (unused without HAS_WEIGHT)
    MEAN,  # [M] float32 (unused for IS_RMS_NORM)
    RSTD,  # [M] float32
    SEED,  # [1] int64 Philox seed of the forward (unused without HAS_DROPOUT)
    GRAD_X,  # [M, N] gradient of x, contiguous
    GRAD_RESIDUAL,  # [M, N] gradient of residual, contiguous (unused without STORE_GRAD_RESIDUAL)
    GRAD_WEIGHT_PARTIAL,  # [programs, N] float32 per-program sums of grad_out * xhat
    GRAD_BIAS_PARTIAL,  # [programs, N] float32 per-program sums of grad_out
    stride_grad_out,  # row strides in elements
    stride_grad_h,
    stride_h,
    M,  # rows
    N,  # features per row
    rows_per_program,  # contiguous rows each program owns (a multiple of BLOCK_M)
    dropout_p,  # the forward's dropout probability
    HAS_GRAD_H: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_RMS_NORM: tl.constexpr,
    STORE_GRAD_RESIDUAL: tl.constexpr,  # False when grad_residual equals grad_x
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    program = tl.program_id(0)
    first_row = program.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    cols = tl.arange(0, BLOCK_N)
    partial_offsets = program.to(tl.int64) * N + cols
    grad_weight_acc = tl.zeros((BLOCK_N,), tl.float32)
    grad_bias_acc = tl.zeros((BLOCK_N,), tl.float32)

    for block_start in range(first_row, last_row, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < last_row
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        mean = tl.zeros((BLOCK_M,), tl.float32)
        if not IS_RMS_NORM:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)

        if SINGLE_PASS:
            mask = row_mask[:, None] & (cols < N)[None, :]
            dy, xhat, g = _grad_tile(GRAD_OUT, H, WEIGHT, rows, cols, mask, mean, rstd,
                                     stride_grad_out, stride_h, N, HAS_WEIGHT, IS_RMS_NORM)
            sum_g_xhat = tl.sum(g * xhat, axis=1)
            sum_g = tl.sum(g, axis=1)
        else:
            sum_g_xhat = tl.zeros((BLOCK_M,), tl.float32)
            sum_g = tl.zeros((BLOCK_M,), tl.float32)
            for start in range(0, N, BLOCK_N):
                chunk_cols = start + cols
                mask = row_mask[:, None] & (chunk_cols < N)[None, :]
                dy, xhat, g = _grad_tile(GRAD_OUT, H, WEIGHT, rows, chunk_cols, mask, mean,
                                         rstd, stride_grad_out, stride_h, N, HAS_WEIGHT,
                                         IS_RMS_NORM)
                sum_g_xhat += tl.sum(g * xhat, axis=1)
                sum_g += tl.sum(g, axis=1)
        mean_g_xhat = (sum_g_xhat / N)[:, None]
        mean_g = (sum_g / N)[:, None]

        if SINGLE_PASS:
            _store_input_grads(GRAD_H, GRAD_X, GRAD_RESIDUAL, seed, rows, cols, mask, g, xhat,
                               mean_g, mean_g_xhat, rstd, stride_grad_h, N, dropout_p,
                               HAS_GRAD_H, HAS_DROPOUT, IS_RMS_NORM, STORE_GRAD_RESIDUAL)
            grad_weight_acc += tl.sum(dy * xhat, axis=0)
            grad_bias_acc += tl.sum(dy, axis=0)
        else:
            for start in range(0, N, BLOCK_N):
                chunk_cols = start + cols
                mask = row_mask[:, None] & (chunk_cols < N)[None, :]
                dy, xhat, g = _grad_tile(GRAD_OUT, H, WEIGHT, rows, chunk_cols, mask, mean,
                                         rstd, stride_grad_out, stride_h, N, HAS_WEIGHT,
                                         IS_RMS_NORM)
                _store_input_grads(GRAD_H, GRAD_X, GRAD_RESIDUAL, seed, rows, chunk_cols,
                                   mask, g, xhat, mean_g, mean_g_xhat, rstd, stride_grad_h, N,
                                   dropout_p, HAS_GRAD_H, HAS_DROPOUT, IS_RMS_NORM,
                                   STORE_GRAD_RESIDUAL)
                # The program's own partial row, read-modify-write; the barrier orders this
                # iteration's stores before the next iteration's loads across its threads.
                col_mask = chunk_cols < N
                if HAS_WEIGHT:
                    partial = tl.load(GRAD_WEIGHT_PARTIAL + start + partial_offsets,
                                      mask=col_mask, other=0.0)
                    tl.store(GRAD_WEIGHT_PARTIAL + start + partial_offsets,
                             partial + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if HAS_BIAS:
                    partial = tl.load(GRAD_BIAS_PARTIAL + start + partial_offsets,
                                      mask=col_mask, other=0.0)
                    tl.store(GRAD_BIAS_PARTIAL + start + partial_offsets,
                             partial + tl.sum(dy, axis=0), mask=col_mask)
                tl.debug_barrier()

    if SINGLE_PASS:
        col_mask = cols < N
        if HAS_WEIGHT:
            tl.store(GRAD_WEIGHT_PARTIAL + partial_offsets, grad_weight_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(GRAD_BIAS_PARTIAL + partial_offsets, grad_bias_acc, mask=col_mask)


class LayerNormResidualBackward(NamedTuple):
    grad_x: torch.Tensor  # [M, N] in x's dtype
    grad_residual: torch.Tensor  # [M, N] in the residual's dtype; empty unless stored
    grad_weight: torch.Tensor  # [N] float32; empty without weight
    grad_bias: torch.Tensor  # [N] float32; empty without bias


@serialized_when_interpreting
def layer_norm_residual_backward(
    grad_out: torch.Tensor,
    grad_h: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: torch.Tensor | None,
    dropout_p: float,
    rms_norm: bool,
    has_bias: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    store_grad_residual: bool,
) -> LayerNormResidualBackward:
    """Launch the backward kernel; see the module docstring for the maths. The arguments are
    those of the op fastformer::layer_norm_residual_bwd, in its order."""
    require_unit_column_stride("layer_norm_residual_bwd", grad_out=grad_out, grad_h=grad_h, h=h,
                               weight=weight)
    m, n = h.shape
    device = h.device
    grad_x = empty((m, n), x_dtype, device)
    store_grad_residual = store_grad_residual and residual_dtype is not None
    grad_residual = (
        empty((m, n), residual_dtype, device)
        if store_grad_residual
        else empty_absent(residual_dtype or x_dtype, device)
    )
    config = launch_config(n)
    tiles = triton.cdiv(m, config.block_m)
    programs = max(1, min(tiles, 4 * multiprocessor_count(device)))
    rows_per_program = triton.cdiv(tiles, programs) * config.block_m
    programs = triton.cdiv(m, rows_per_program) if m else 1
    # Zero-filled: programs without rows leave their partial row untouched, and the
    # chunked path accumulates into it.
    weight_partial = torch.zeros((programs, n), dtype=torch.float32, device=device) \
        if weight is not None else None
    bias_partial = torch.zeros((programs, n), dtype=torch.float32, device=device) \
        if has_bias else None
    if m > 0:
        has_dropout = dropout_p > 0.0
        # Unused pointers go in as None, never as empty tensors (see the forward launcher).
        _layer_norm_residual_bwd_kernel[(programs,)](
            grad_out, grad_h, h, weight, None if rms_norm else mean, rstd,
            seed if has_dropout else None,
            grad_x, grad_residual if store_grad_residual else None, weight_partial, bias_partial,
            grad_out.stride(0), grad_h.stride(0) if grad_h is not None else 0, h.stride(0),
            m, n, rows_per_program, dropout_p,
            HAS_GRAD_H=grad_h is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias,
            HAS_DROPOUT=has_dropout,
            IS_RMS_NORM=rms_norm,
            STORE_GRAD_RESIDUAL=store_grad_residual,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            SINGLE_PASS=config.single_pass,
            num_warps=config.num_warps,
        )
    absent = empty_absent(torch.float32, device)
    grad_weight = weight_partial.sum(0) if weight_partial is not None else absent
    grad_bias = bias_partial.sum(0) if bias_partial is not None else absent
    return LayerNormResidualBackward(grad_x, grad_residual, grad_weight, grad_bias)
