"""torch.nn's Transformer layers on fastformer's fused ops (the stacks and the
encoder-decoder built from them: transformer.py).

TransformerEncoderLayer and TransformerDecoderLayer take torch.nn's constructor and forward
arguments and have its state_dict keys, so `fast.load_state_dict(torch_model.state_dict())`
gives torch.nn's outputs and gradients.
Inside, every sub-layer boundary is one fused (dropout +) residual add + LayerNorm:

    post-norm (norm_first=False):  x = norm(dropout(sublayer(x)) + x)
        = layer_norm_residual(sublayer(x), residual=x, dropout_p)[0]
    pre-norm (norm_first=True):    h = h + dropout(sublayer(norm(h)))
        the add and the next sub-layer's norm are one call returning (norm(h), h), and a
        stack of pre-norm layers carries (sublayer output, h) from one layer into the next
        (and into the stack's final norm), so no add runs on its own.

Attention is fastformer.nn.MultiheadAttention (need_weights=False), the feed-forward is
fastformer.feed_forward on the layer's own linear1 / linear2 (torch.nn keeps them, and the
norms and dropouts, on the layer: so does this module, for the keys to match).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import feed_forward, layer_norm_residual
from ..ops.feed_forward import ACTIVATIONS
from ..reference import GATED_ACTIVATIONS
from .attention import MultiheadAttention
from .feed_forward import activation_name
from .norm import LayerNorm

__all__ = [
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "add_norm",
    "detect_is_causal_mask",
    "has_hooks",
    "sequence_length",
    "square_subsequent_mask",
]

Activation = str | Callable[[Tensor], Tensor]
_NAMED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def square_subsequent_mask(
    sz: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(sz, sz) float mask: 0 on and below the diagonal, -inf above (torch.nn's)."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), 1)


def detect_is_causal_mask(mask: Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch.nn's rule: an explicit hint wins; with None, a mask equal to the causal mask
    (float -inf above the diagonal, or boolean True there) counts as causal."""
    if is_causal is not None or mask is None:
        return bool(is_causal)
    if tuple(mask.shape) != (size, size):
        return False
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, causal))
    return bool(torch.equal(mask, square_subsequent_mask(size, mask.device, mask.dtype)))


def sequence_length(x: Tensor, batch_first: bool) -> int:
    return x.shape[1] if batch_first and x.dim() == 3 else x.shape[0]


def add_norm(
    norm: torch.nn.Module, x: Tensor, residual: Tensor | None, dropout_p: float, training: bool
) -> tuple[Tensor, Tensor]:
    """(norm(dropout(x) + residual), dropout(x) + residual) in one fused call."""
    return layer_norm_residual(
        x,
        residual,
        norm.weight,
        norm.bias,
        eps=norm.eps,
        dropout_p=dropout_p,
        training=training,
    )


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether hooks are registered on `module` (its replacement would not run them)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


class _TransformerLayer(torch.nn.Module):
    """What the encoder and decoder layers share: the feed-forward and its activation."""

    def _init_feed_forward(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        activation: Activation,
        bias: bool,
        factory: dict[str, Any],
    ) -> None:
        self.linear1 = torch.nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = torch.nn.Dropout(dropout)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        if isinstance(activation, str):
            if activation not in ACTIVATIONS or activation in GATED_ACTIVATIONS:
                raise RuntimeError(
                    f"activation should be one of relu/gelu/gelu_tanh/silu, not {activation}"
                )
            activation = _NAMED_ACTIVATIONS.get(activation) or torch.nn.GELU("tanh")
        self.activation = activation
        # torch.nn's flag (1: relu, 2: gelu), kept for code that reads it.
        if activation is F.relu or isinstance(activation, torch.nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, torch.nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self._set_fused_activation()

    def _set_fused_activation(self) -> None:
        """The feed_forward name of self.activation, or None (plain torch) for a callable
        the fused op does not have."""
        try:
            self.fused_activation: str | None = activation_name(self.activation)
        except ValueError:
            self.fused_activation = None
            warnings.warn(
                f"{type(self).__name__}: activation {self.activation!r} has no fused "
                "kernel; this layer's feed-forward runs plain PyTorch (linear1, activation, "
                "dropout, linear2)",
                stacklevel=4,
            )

    def _ff(self, x: Tensor) -> Tensor:
        """linear2(dropout(activation(linear1(x)))), fused when the activation allows."""
        if self.fused_activation is None:
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        return feed_forward(
            x,
            self.linear1.weight,
            self.linear1.bias,
            self.linear2.weight,
            self.linear2.bias,
            activation=self.fused_activation,
            dropout_p=self.dropout.p,
            training=self.training,
        )

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> Self:
        """This layer on `module`'s (a torch.nn TransformerEncoderLayer or
        TransformerDecoderLayer) own submodules and Parameters (shared, not copied)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the activation is checked again below
            new = cls(
                module.linear1.in_features,
                module.self_attn.num_heads,
                module.linear1.out_features,
                activation=module.activation,
                batch_first=module.self_attn.batch_first,
                norm_first=module.norm_first,
                device="meta",
            )
        new._copy_children(module)
        new.activation = module.activation
        new._set_fused_activation()
        return new

    def _copy_children(self, module: torch.nn.Module) -> None:
        """Take `module`'s submodules (the same objects; torch.nn's MultiheadAttention and
        LayerNorm become fastformer's, sharing their Parameters) and training flag."""
        for name, child in module.named_children():
            if type(child) is torch.nn.MultiheadAttention:
                child = MultiheadAttention.from_torch(child)
            elif type(child) is torch.nn.LayerNorm:
                child = LayerNorm.from_torch(child)
            setattr(self, name, child)
        self.training = module.training


class TransformerEncoderLayer(_TransformerLayer):
    """torch.nn.TransformerEncoderLayer: self-attention and feed-forward, each followed
    (post-norm) or preceded (pre-norm, norm_first=True) by LayerNorm.

    Same constructor and forward arguments, attributes and state_dict keys as torch.nn's.
    activation: "relu", "gelu", "gelu_tanh", "silu", F.relu / F.gelu / F.silu or
    nn.ReLU / nn.GELU / nn.SiLU run fused; any other callable runs this layer's
    feed-forward in plain PyTorch (with a warning at construction). Results are those of
    torch.nn's ordinary path; torch's inference fast path (eval, no grad, NestedTensor)
    has no counterpart here and NestedTensor inputs are not accepted.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self._init_feed_forward(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = torch.nn.Dropout(dropout)
        self.dropout2 = torch.nn.Dropout(dropout)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """src (S, N, E), (N, S, E) with batch_first, or (S, E); masks as
        torch.nn.TransformerEncoderLayer's (True = not allowed, float = added)."""
        if self.norm_first:
            x, h = self._pre_norm(src, None, 0.0, src_mask, src_key_padding_mask, is_causal)
            return h + self.dropout2(x)
        x, _ = add_norm(
            self.norm1,
            self._sa(src, src_mask, src_key_padding_mask, is_causal),
            src,
            self.dropout1.p,
            self.training,
        )
        x, _ = add_norm(self.norm2, self._ff(x), x, self.dropout2.p, self.training)
        return x

    def _sa(self, x: Tensor, mask: Tensor | None, padding: Tensor | None, is_causal: bool):
        return self.self_attn(
            x,
            x,
            x,
            attn_mask=mask,
            key_padding_mask=padding,
            need_weights=False,
            is_causal=is_causal,
        )[0]

    def _pre_norm(
        self,
        x: Tensor,
        residual: Tensor | None,
        dropout_p: float,
        mask: Tensor | None,
        padding: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        """The pre-norm layer on the stream h = residual + dropout(x): returns (ff, h) with
        the layer's output h + dropout2(ff) left for the caller to add (fused into the
        next norm in a stack)."""
        a, h = add_norm(self.norm1, x, residual, dropout_p, self.training)
        b, h = add_norm(
            self.norm2, self._sa(a, mask, padding, is_causal), h, self.dropout1.p, self.training
        )
        return self._ff(b), h


class TransformerDecoderLayer(_TransformerLayer):
    """torch.nn.TransformerDecoderLayer: self-attention, attention over the memory, and
    feed-forward, with LayerNorm after (post-norm) or before (norm_first=True) each.

    Same constructor and forward arguments, attributes and state_dict keys as torch.nn's;
    activations as for TransformerEncoderLayer.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self._init_feed_forward(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = torch.nn.Dropout(dropout)
        self.dropout2 = torch.nn.Dropout(dropout)
        self.dropout3 = torch.nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """tgt (T, N, E) and memory (S, N, E) (batch first with batch_first); masks as
        torch.nn.TransformerDecoderLayer's (True = not allowed, float = added)."""
        masks = (
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
        )
        if self.norm_first:
            x, h = self._pre_norm(tgt, None, 0.0, memory, *masks)
            return h + self.dropout3(x)
        training = self.training
        sa = self._sa(tgt, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x, _ = add_norm(self.norm1, sa, tgt, self.dropout1.p, training)
        mha = self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x, _ = add_norm(self.norm2, mha, x, self.dropout2.p, training)
        x, _ = add_norm(self.norm3, self._ff(x), x, self.dropout3.p, training)
        return x

    def _sa(self, x: Tensor, mask: Tensor | None, padding: Tensor | None, is_causal: bool):
        return self.self_attn(
            x,
            x,
            x,
            attn_mask=mask,
            key_padding_mask=padding,
            is_causal=is_causal,
            need_weights=False,
        )[0]

    def _mha(
        self,
        x: Tensor,
        memory: Tensor,
        mask: Tensor | None,
        padding: Tensor | None,
        is_causal: bool,
    ):
        return self.multihead_attn(
            x,
            memory,
            memory,
            attn_mask=mask,
            key_padding_mask=padding,
            is_causal=is_causal,
            need_weights=False,
        )[0]

    def _pre_norm(
        self,
        x: Tensor,
        residual: Tensor | None,
        dropout_p: float,
        memory: Tensor,
        tgt_mask: Tensor | None,
        memory_mask: Tensor | None,
        tgt_key_padding_mask: Tensor | None,
        memory_key_padding_mask: Tensor | None,
        tgt_is_causal: bool,
        memory_is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        """The pre-norm layer on the stream h = residual + dropout(x): returns (ff, h), the
        output being h + dropout3(ff)."""
        training = self.training
        a, h = add_norm(self.norm1, x, residual, dropout_p, training)
        sa = self._sa(a, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        b, h = add_norm(self.norm2, sa, h, self.dropout1.p, training)
        mha = self._mha(b, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        c, h = add_norm(self.norm3, mha, h, self.dropout2.p, training)
        return self._ff(c), h
