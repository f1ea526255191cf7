"""fastformer.layer_norm_residual: fused (dropout +) residual add + LayerNorm / RMSNorm.

The dispatcher ops fastformer::layer_norm_residual_fwd / _bwd are defined in
csrc/ops.cpp with their C++ CPU kernels and their autograd formula (csrc/autograd.cpp);
this file registers the Triton kernels for CUDA and the fake kernels that torch.compile
traces with, then exposes the functional API.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backend, reference
from . import _checks

OP = "layer_norm_residual"
_FWD = "fastformer::layer_norm_residual_fwd"
_BWD = "fastformer::layer_norm_residual_bwd"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS = "fastformer_kernels.layer_norm_residual"


# The Triton launchers take the dispatcher ops' arguments in schema order; they are imported
# on first use, so that importing fastformer does not import Triton.
backend.register_op(
    OP,
    backend.OpSupport(
        cuda_dtypes=_TRITON_DTYPES,
        cpu_dtypes=_checks.FLOAT_DTYPES,
        triton_kernels={
            "layer_norm_residual_fwd": f"{_KERNELS}:layer_norm_residual_forward",
            "layer_norm_residual_bwd": f"{_KERNELS}:layer_norm_residual_backward",
        },
    ),
)


# ----------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------


def _absent(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _fake_fwd(x, residual, weight, bias, seed, eps, dropout_p, rms_norm, h_dtype, store_h):
    m, n = x.shape
    acc = reference.accumulation_dtype(x.dtype)
    out = x.new_empty((m, n))
    h = x.new_empty((m, n), dtype=h_dtype) if store_h else _absent(x, h_dtype)
    mean = _absent(x, acc) if rms_norm else x.new_empty((m,), dtype=acc)
    return out, h, mean, x.new_empty((m,), dtype=acc)


def _fake_bwd(
    grad_out,
    grad_h,
    h,
    weight,
    mean,
    rstd,
    seed,
    dropout_p,
    rms_norm,
    has_bias,
    x_dtype,
    residual_dtype,
    store_grad_residual,
):
    m, n = h.shape
    acc = reference.accumulation_dtype(x_dtype)
    grad_x = h.new_empty((m, n), dtype=x_dtype)
    grad_residual = (
        h.new_empty((m, n), dtype=residual_dtype)
        if store_grad_residual and residual_dtype is not None
        else _absent(h, residual_dtype or x_dtype)
    )
    grad_weight = h.new_empty((n,), dtype=acc) if weight is not None else _absent(h, acc)
    grad_bias = h.new_empty((n,), dtype=acc) if has_bias else _absent(h, acc)
    return grad_x, grad_residual, grad_weight, grad_bias


if _extension.available:
    torch.library.register_fake(_FWD)(_fake_fwd)
    torch.library.register_fake(_BWD)(_fake_bwd)


# ----------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------


def layer_norm_residual(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    rms_norm: bool = False,
    residual_in_fp32: bool = False,
    training: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fused dropout + residual add + LayerNorm (or RMSNorm), returning (out, h).

    h = dropout(x) + residual (dropout(x) without residual) is the residual stream a
    pre-norm block passes on; out = LayerNorm(h) * weight + bias, or RMSNorm(h) * weight
    (+ bias) when rms_norm, is what the next sub-layer (or a post-norm block) consumes.

    Args:
        x: (..., N) input, float16/bfloat16/float32 (float64 on CPU).
        residual: same shape as x, in x's dtype or float32; None for no residual.
        weight, bias: (N,) affine parameters of any float dtype (float32 master weights
            with bfloat16 activations are fine), or None.
        eps: added to the variance; finite and >= 0 (0, as torch allows: a constant row then
            gives NaN, as in torch).
        dropout_p: probability of zeroing an element of x, in [0, 1); applied only when
            training. The mask comes from torch's generator (torch.manual_seed reproduces
            it; activation checkpointing recomputes the same one) and is never stored.
        rms_norm: normalize by the root mean square instead (no mean subtraction).
        residual_in_fp32: keep h in float32 even when x and residual are half precision.

    Returns:
        out in x's dtype, and h in the residual's dtype (x's when residual is None; float32
        with residual_in_fp32). When there is nothing to add (no residual, no active
        dropout, same dtype), h is x itself rather than a copy.
    """
    x = _checks.check_tensor(OP, "x", x)
    residual = _checks.check_optional_tensor(OP, "residual", residual)
    weight = _checks.check_optional_tensor(OP, "weight", weight)
    bias = _checks.check_optional_tensor(OP, "bias", bias)
    eps = _checks.check_eps(OP, "eps", eps)
    dropout_p = _checks.check_probability(OP, "dropout_p", dropout_p)
    for name, flag in (
        ("rms_norm", rms_norm),
        ("residual_in_fp32", residual_in_fp32),
        ("training", training),
    ):
        _checks.check_bool(OP, name, flag)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{OP}: x must have a last (feature) dimension of size >= 1, got shape {list(x.shape)}"
        )
    features = x.shape[-1]
    _checks.check_same_device(OP, "x", x, residual=residual, weight=weight, bias=bias)
    _checks.check_shape(OP, "residual", residual, x.shape)
    _checks.check_shape(OP, "weight", weight, (features,))
    _checks.check_shape(OP, "bias", bias, (features,))
    acc = reference.accumulation_dtype(x.dtype)
    if residual is not None and residual.dtype not in (x.dtype, acc):
        allowed = f"x's dtype ({x.dtype})" + ("" if acc == x.dtype else f" or {acc}")
        raise TypeError(f"{OP}: residual must have {allowed}, got {residual.dtype}")

    dropout_p = dropout_p if training else 0.0
    h_dtype = reference.residual_stream_dtype(
        x.dtype, None if residual is None else residual.dtype, residual_in_fp32
    )
    reason = backend.fallback_reason(OP, x.device, x.dtype)
    if reason:
        backend.note_fallback(OP, reason)
        return reference.layer_norm_residual(
            x,
            residual,
            weight,
            bias,
            eps=eps,
            dropout_p=dropout_p,
            rms_norm=rms_norm,
            residual_in_fp32=residual_in_fp32,
        )
    _extension.require(OP)

    store_h = residual is not None or dropout_p > 0.0 or h_dtype != x.dtype
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    out, h, _mean, _rstd = torch.ops.fastformer.layer_norm_residual_fwd(
        _checks.as_rows(x, features),
        None if residual is None else _checks.as_rows(residual, features),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(),
        seed,
        eps,
        dropout_p,
        rms_norm,
        h_dtype,
        store_h,
    )
    out = out.view(x.shape)
    return out, (h.view(x.shape) if store_h else x)
