"""Which implementation of attention, residual + LayerNorm and feed-forward a model runs.

One table, three rows, each row three functions with the same signatures:

    "fastformer"  fastformer's ops: scaled_dot_product_attention, and layer_norm_residual /
                  feed_forward through the modules fastformer.nn.LayerNorm / FeedForward
    "torch"       torch's own: F.scaled_dot_product_attention, F.layer_norm, F.linear + activation
    "reference"   fastformer/reference.py, the plain-PyTorch definitions the tests trust

The parameters are the same modules whichever row runs, so one set of weights gives the
same outputs and gradients on every backend. A model picks its row by its `backend`
attribute; `use_backend(name)` overrides it for every model inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..nn import FeedForward, LayerNorm
from ..ops import scaled_dot_product_attention as sdpa_op
from ..ops.attention import torch_sdpa

__all__ = ["BACKENDS", "Kernels", "active_backend", "get_kernels", "use_backend"]

# attention(q, k, v, attn_mask, dropout_p, is_causal) -> out: SDPA's signature and semantics.
AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor | None, float, bool], Tensor]
# residual_norm(norm, x, residual) -> (LayerNorm(dropout(x) + residual), dropout(x) + residual)
ResidualNormFn = Callable[[LayerNorm, Tensor, Tensor | None], tuple[Tensor, Tensor]]
# feed_forward(module, x) -> linear2(dropout(act(linear1(x))))
FeedForwardFn = Callable[[FeedForward, Tensor], Tensor]


class Kernels(NamedTuple):
    """The three functions a model's layers call, from one backend."""

    name: str
    attention: AttentionFn
    residual_norm: ResidualNormFn
    feed_forward: FeedForwardFn


def _norm_dropout(norm: LayerNorm) -> float:
    return norm.dropout if norm.training else 0.0


# ----------------------------------------------------------------------------------------
# "fastformer": the fused ops
# ----------------------------------------------------------------------------------------


def _fastformer_attention(q, k, v, attn_mask, dropout_p, is_causal):
    return sdpa_op(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def _fastformer_residual_norm(norm, x, residual):
    return norm(x, residual, return_residual=True)


def _fastformer_feed_forward(module, x):
    return module(x)


# ----------------------------------------------------------------------------------------
# "torch": torch's functions, as torch.nn's modules call them
# ----------------------------------------------------------------------------------------


def _torch_attention(q, k, v, attn_mask, dropout_p, is_causal):
    return torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def _torch_residual_norm(norm, x, residual):
    h = F.dropout(x, _norm_dropout(norm), norm.training)
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps), h


def _torch_feed_forward(module, x):
    pre = F.linear(x, module.linear1.weight, module.linear1.bias)
    if module.activation in reference.GATED_ACTIVATIONS:
        gate, up = pre.chunk(2, dim=-1)
        hidden = reference.GATED_ACTIVATIONS[module.activation](gate) * up
    else:
        hidden = reference.ACTIVATIONS[module.activation](pre)
    hidden = F.dropout(hidden, module.dropout, module.training)
    return F.linear(hidden, module.linear2.weight, module.linear2.bias)


# ----------------------------------------------------------------------------------------
# "reference": fastformer/reference.py
# ----------------------------------------------------------------------------------------


def _reference_attention(q, k, v, attn_mask, dropout_p, is_causal):
    return reference.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )


def _reference_residual_norm(norm, x, residual):
    return reference.layer_norm_residual(
        x,
        residual,
        norm.weight,
        norm.bias,
        eps=norm.eps,
        dropout_p=_norm_dropout(norm),
        training=norm.training,
    )


def _reference_feed_forward(module, x):
    return reference.feed_forward(
        x,
        module.linear1.weight,
        module.linear1.bias,
        module.linear2.weight,
        module.linear2.bias,
        activation=module.activation,
        dropout_p=module.dropout,
        training=module.training,
    )


BACKENDS: dict[str, Kernels] = {
    "fastformer": Kernels(
        "fastformer", _fastformer_attention, _fastformer_residual_norm, _fastformer_feed_forward
    ),
    "torch": Kernels("torch", _torch_attention, _torch_residual_norm, _torch_feed_forward),
    "reference": Kernels(
        "reference", _reference_attention, _reference_residual_norm, _reference_feed_forward
    ),
}

# The backend forced by use_backend() blocks, innermost last; empty: each model's own.
# A plain module-level list (not a ContextVar) so that torch.compile can guard on it.
_override: list[str] = []


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    return name


def active_backend(model_backend: str) -> str:
    """The backend that runs: the innermost use_backend() block's, else the model's own."""
    return _override[-1] if _override else model_backend


def get_kernels(model_backend: str) -> Kernels:
    return BACKENDS[active_backend(model_backend)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every fastformer model in the block on backend `name` ("fastformer", "torch" or
    "reference"), whatever its own `backend` attribute says. Blocks nest; the setting is
    process-wide (not per thread)."""
    _override.append(check_backend(name))
    try:
        yield
    finally:
        _override.pop()
