"""Plain-PyTorch definitions of every fastformer op: the source of truth for the tests.

Each function computes in the dtype of its inputs, so the same code gives the float64
reference (inputs cast to float64) and the "same precision" baseline (inputs as given)
that the tolerance rule of the tests compares against. Internally they follow eager
PyTorch's own numerics: normalisation statistics and softmax in at least float32.

Randomness is explicit: where an op has dropout, the caller may pass the keep-mask that a
kernel used (True = kept), so a kernel's output can be checked element by element.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "accumulation_dtype",
    "feed_forward",
    "layer_norm_residual",
    "residual_stream_dtype",
    "scaled_dot_product_attention",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_stream_dtype(
    x_dtype: torch.dtype, residual_dtype: torch.dtype | None, residual_in_fp32: bool
) -> torch.dtype:
    """The dtype of h, the residual stream: the residual's dtype (x's when there is none),
    raised to at least float32 when residual_in_fp32 is set."""
    stream = residual_dtype if residual_dtype is not None else x_dtype
    return torch.promote_types(stream, torch.float32) if residual_in_fp32 else stream


def _dropout(x: Tensor, p: float, training: bool, mask: Tensor | None) -> Tensor:
    """Inverted dropout: kept elements are scaled by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if mask is None:
        mask = torch.rand(x.shape, device=x.device) >= p
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0  # p = 1 drops everything: zeros, as torch
    return x * mask.to(x.dtype) * scale


# ----------------------------------------------------------------------------------------
# Residual add + LayerNorm / RMSNorm
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
    dropout_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """h = dropout(x) + residual, rounded to the residual stream's dtype;
    out = LayerNorm(h) * weight + bias (RMSNorm(h) * weight [+ bias] when rms_norm), in x's dtype.

    Returns (out, h). The sum is formed in the accumulation dtype and rounded once, as an
    eager `x + residual` does; the statistics come from the rounded h, as eager
    `F.layer_norm(x + residual)` computes them.
    """
    acc = accumulation_dtype(x.dtype)
    h_dtype = residual_stream_dtype(
        x.dtype, None if residual is None else residual.dtype, residual_in_fp32
    )
    h = _dropout(x.to(acc), dropout_p, training, dropout_mask)
    if residual is not None:
        h = h + residual.to(acc)
    h = h.to(h_dtype)

    hidden = h.to(acc)
    if rms_norm:
        normed = hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + eps)
    else:
        mean = hidden.mean(-1, keepdim=True)
        var = (hidden - mean).square().mean(-1, keepdim=True)
        normed = (hidden - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        normed = normed * weight.to(acc)
    if bias is not None:
        normed = normed + bias.to(acc)
    return normed.to(x.dtype), h


# ----------------------------------------------------------------------------------------
# Attention with the semantics of torch.nn.functional.scaled_dot_product_attention
# ----------------------------------------------------------------------------------------


def default_attention_scale(head_dim: int) -> float:
    """1 / sqrt(E), the scale scaled_dot_product_attention takes by default. With E = 0
    every score is 0 whatever the scale (torch's function then averages the values): 1."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: Tensor | None = None,
    softcap: float = 0.0,
) -> Tensor:
    """softmax(q @ k^T * scale + mask) @ v over inputs (..., L, E), (..., S, E), (..., S, Ev).

    - a boolean mask keeps the positions where it is True; a float mask is added;
      any shape that broadcasts to (..., L, S) is accepted;
    - softcap > 0 (flash-attn's extension) caps the scaled scores before the mask:
      softcap * tanh(q @ k^T * scale / softcap);
    - is_causal keeps key j for query i when j <= i (diagonal aligned to the upper left),
      together with a mask if one is given (torch's function takes both);
    - enable_gqa: key/value may have fewer heads (dim -3), query heads divisible by them;
    - a query row whose keys are all masked gives zeros (torch's math kernel gives NaN);
    - dropout_mask (broadcastable to (..., L, S), True = kept) fixes the dropout pattern.
    The scores and softmax are computed in at least float32, the products in the input dtype.
    """
    length, source = query.shape[-2], key.shape[-2]
    scale = default_attention_scale(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)

    acc = accumulation_dtype(query.dtype)
    scores = (query @ key.transpose(-2, -1)).to(acc) * scale  # (..., L, S)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    keep = None
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(acc)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    # Rows with every key masked: softmax of all -inf is NaN; the defined result is zeros.
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
    probs = probs.masked_fill(fully_masked, 0.0)
    probs = _dropout(probs, dropout_p, True, dropout_mask)
    return probs.to(value.dtype) @ value


# ----------------------------------------------------------------------------------------
# Feed-forward: Linear, activation, Linear
# ----------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact: x * Phi(x), through erf
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
# Gated activations: the first half of the hidden projection is the gate, the second the up.
GATED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def feed_forward(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    training: bool = True,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """out = dropout(act(x @ w1.T + b1)) @ w2.T + b2, x of shape (..., d_model).

    Gated activations ("swiglu", "geglu"): w1 has 2 * hidden rows, gate first, then up;
    out = dropout(act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w2.T + b2.
    """
    pre = F.linear(x, w1, b1)
    if activation in GATED_ACTIVATIONS:
        gate, up = pre.chunk(2, dim=-1)
        hidden = GATED_ACTIVATIONS[activation](gate) * up
    elif activation in ACTIVATIONS:
        hidden = ACTIVATIONS[activation](pre)
    else:
        known = sorted([*ACTIVATIONS, *GATED_ACTIVATIONS])
        raise ValueError(f"feed_forward: activation must be one of {known}, got {activation!r}")
    hidden = _dropout(hidden, dropout_p, training, dropout_mask)
    return F.linear(hidden, w2, b2)
