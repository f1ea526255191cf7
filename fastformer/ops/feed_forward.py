"""fastformer.feed_forward: Linear, activation, (dropout,) Linear with fused bias and activation.

The dispatcher ops fastformer::feed_forward_fwd / _bwd are defined in csrc/ops.cpp, with
their C++ CPU kernels (csrc/feed_forward_cpu.cpp), in a CUDA build their CUDA kernels
(csrc/cuda/), and their autograd formula (csrc/autograd.cpp); this file registers the fake
kernels that torch.compile traces with, then exposes the functional API.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, backend, reference
from . import _checks

OP = "feed_forward"
_FWD = "fastformer::feed_forward_fwd"
_BWD = "fastformer::feed_forward_bwd"
ACTIVATIONS = (*reference.ACTIVATIONS, *reference.GATED_ACTIVATIONS)

backend.register_op(
    OP,
    backend.OpSupport(
        cuda_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        cpu_dtypes=_checks.FLOAT_DTYPES,
        cuda_implementation=backend.CUDA_CPP,
    ),
)


# ----------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------


def _fake_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, save_preact):
    out = x.new_empty((x.shape[0], w2.shape[0]))
    preact = x.new_empty((x.shape[0], w1.shape[0]) if save_preact else (0,))
    return out, preact


def _fake_bwd(grad_out, x, w1, b1, w2, preact, activation, dropout_p, seed, has_b2):
    grad_b1 = x.new_empty((w1.shape[0],) if b1 is not None else (0,))
    grad_b2 = x.new_empty((w2.shape[0],) if has_b2 else (0,))
    return torch.empty_like(x), torch.empty_like(w1), grad_b1, torch.empty_like(w2), grad_b2


if _extension.available:
    torch.library.register_fake(_FWD)(_fake_fwd)
    torch.library.register_fake(_BWD)(_fake_bwd)


# ----------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------


def _check_matrix(name: str, value: Tensor, rows: int | None, cols: int, rows_hint: str) -> None:
    if value.dim() != 2 or value.shape[1] != cols or (rows is not None and value.shape[0] != rows):
        expected = f"[{rows_hint if rows is None else rows}, {cols}]"
        raise ValueError(f"{OP}: {name} must have shape {expected}, got {list(value.shape)}")


def _autocast(tensors: list[Tensor | None], device_type: str) -> list[Tensor | None]:
    """Under autocast, the op runs in the autocast dtype, as torch.nn.Linear does: autocast
    casts floating tensors other than float64 (float64 ones stay as they are)."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors]


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
    recompute: bool = False,
) -> Tensor:
    """The feed-forward of a Transformer layer, with bias and activation fused:

        out = dropout(act(x @ w1.T + b1)) @ w2.T + b2

    Gated activations ("swiglu", "geglu") take w1 with 2 * hidden rows, the gate first, then
    the up projection: out = dropout(act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w2.T + b2.

    Args:
        x: (..., d_model), float16/bfloat16/float32 (float64 on CPU).
        w1: (hidden, d_model), or (2 * hidden, d_model) for gated activations; b1 its bias or None.
        w2: (d_out, hidden); b2 (d_out,) or None. All of x's dtype and device (under autocast
            they are cast to the autocast dtype, as torch.nn.Linear's would be).
        activation: "relu", "gelu" (exact, erf), "gelu_tanh", "silu", "swiglu" (silu gate)
            or "geglu" (exact gelu gate).
        dropout_p: probability of zeroing a hidden activation, in [0, 1); applied only when
            training. The mask comes from torch's generator and is regenerated in backward,
            never stored.
        recompute: save only x for backward and recompute the pre-activation there (one more
            GEMM) instead of keeping it: less memory, more time.

    Returns:
        (..., d_out) in x's dtype.
    """
    x = _checks.check_tensor(OP, "x", x)
    w1 = _checks.check_tensor(OP, "w1", w1)
    w2 = _checks.check_tensor(OP, "w2", w2)
    b1 = _checks.check_optional_tensor(OP, "b1", b1)
    b2 = _checks.check_optional_tensor(OP, "b2", b2)
    dropout_p = _checks.check_probability(OP, "dropout_p", dropout_p)
    _checks.check_bool(OP, "training", training)
    _checks.check_bool(OP, "recompute", recompute)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if x.dim() == 0:
        raise ValueError(f"{OP}: x must have a last (feature) dimension, got a 0-d tensor")
    _checks.check_same_device(OP, "x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    x, w1, b1, w2, b2 = _autocast([x, w1, b1, w2, b2], x.device.type)
    for name, tensor in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(
                f"{OP}: {name} must have x's dtype ({x.dtype}), got {tensor.dtype}; "
                "cast the weights or run under torch.autocast"
            )
    d_model = x.shape[-1]
    gated = activation in reference.GATED_ACTIVATIONS
    _check_matrix("w1", w1, None, d_model, "2 * hidden" if gated else "hidden")
    if gated and w1.shape[0] % 2:
        raise ValueError(
            f"{OP}: activation {activation!r} needs w1 with an even number of rows (gate, then "
            f"up), got {list(w1.shape)}"
        )
    hidden = w1.shape[0] // 2 if gated else w1.shape[0]
    _check_matrix("w2", w2, None, hidden, "d_out")
    _checks.check_shape(OP, "b1", b1, (w1.shape[0],))
    _checks.check_shape(OP, "b2", b2, (w2.shape[0],))

    dropout_p = dropout_p if training else 0.0
    if d_model == 0:  # x @ w1.T is all zeros: nothing for a kernel to do (F.linear's result)
        return reference.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)
    reason = backend.fallback_reason(OP, x.device, x.dtype)
    if reason:
        backend.note_fallback(OP, reason)
        return reference.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)
    _extension.require(OP)

    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    # Without a backward to come, nothing is kept and plain activations write hidden over pre.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)
    )
    out, _preact = torch.ops.fastformer.feed_forward_fwd(
        x.reshape(-1, d_model).contiguous(),
        w1.contiguous(),
        None if b1 is None else b1.contiguous(),
        w2.contiguous(),
        None if b2 is None else b2.contiguous(),
        activation,
        dropout_p,
        seed,
        needs_grad and not recompute,
    )
    return out.view(*x.shape[:-1], w2.shape[0])
