"""torch.nn's Transformer layers on fastformer's fused ops (the stacks and the
encoder-decoder built from them: transformer.py).

TransformerEncoderLayer and TransformerDecoderLayer take torch.nn's constructor and forward
arguments and have its state_dict keys, so `fast.load_state_dict(torch_model.state_dict())`
gives torch.nn's outputs and gradients.
Inside, every sub-layer boundary is one fused (dropout +) residual add + LayerNorm (or
RMSNorm, when the layer's norms are RMSNorms):

    post-norm (norm_first=False):  x = norm(dropout(sublayer(x)) + x)
        = layer_norm_residual(sublayer(x), residual=x, dropout_p)[0]
    pre-norm (norm_first=True):    h = h + dropout(sublayer(norm(h)))
        the add and the next sub-layer's norm are one call returning (norm(h), h), and a
        stack of pre-norm layers carries (sublayer output, h) from one layer into the next
        (and into the stack's final norm), so no add runs on its own.

Attention is fastformer.nn.MultiheadAttention (need_weights=False), the feed-forward is
fastformer.feed_forward on the layer's own linear1 / linear2 (torch.nn keeps them, and the
norms and dropouts, on the layer: so does this module, for the keys to match).

The fused calls read the submodules' attributes (weight, eps, p) instead of calling them,
which gives torch.nn's result only for the exact classes they read, unhooked. Each forward
checks that (types and a few dict lookups) and calls a submodule a user replaced (a LoRA
linear, another norm, a hooked dropout) as torch.nn's layer does, unfused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _hooks  # the global module hooks

from ..ops import _checks, feed_forward, layer_norm_residual
from ..ops.feed_forward import ACTIVATIONS
from ..reference import GATED_ACTIVATIONS
from .attention import MultiheadAttention
from .feed_forward import activation_name
from .norm import LayerNorm, RMSNorm, norm_eps

__all__ = [
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "add_norm",
    "bypassable",
    "check_layer_args",
    "detect_is_causal_mask",
    "fused_dropout_p",
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


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether hooks are registered on `module` (its replacement would not run them)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def bypassable(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run nothing but its forward: no hooks of its own and
    no global module hooks (register_module_forward_hook...). A fused path may then read
    its attributes instead of calling it, if its type is exactly the class it reads (a
    subclass may override forward)."""
    return not (
        has_hooks(module)
        or _hooks._global_forward_hooks
        or _hooks._global_forward_pre_hooks
        or _hooks._global_backward_hooks
        or _hooks._global_backward_pre_hooks
    )


# The norm classes the fused add + norm reads, and their rms_norm flag.
_FUSED_NORMS: dict[type, bool] = {
    LayerNorm: False,
    torch.nn.LayerNorm: False,
    RMSNorm: True,
    torch.nn.RMSNorm: True,
}


def fused_dropout_p(dropout: torch.nn.Module | None) -> float | None:
    """The probability a fused kernel applies in place of calling `dropout` (0 without one,
    or in eval mode), or None when it must be called: not exactly nn.Dropout, or hooked."""
    if dropout is None:
        return 0.0
    if type(dropout) is not torch.nn.Dropout or not bypassable(dropout):
        return None
    return dropout.p if dropout.training else 0.0


def add_norm(
    norm: torch.nn.Module, x: Tensor, residual: Tensor | None, dropout: torch.nn.Module | None
) -> tuple[Tensor, Tensor]:
    """(norm(h), h) with h = residual + dropout(x) (no add without a residual, no dropout
    without the module), as torch.nn's layers compute it.

    One fused call when `norm` is exactly a LayerNorm or RMSNorm (torch.nn's, or
    fastformer's with its own dropout off) over the last dimension and `dropout` exactly an
    nn.Dropout, none of them hooked; otherwise the modules are called, so that any other
    norm, a subclass or a hook gives torch.nn's result.
    """
    rms_norm = _FUSED_NORMS.get(type(norm))
    dropout_p = fused_dropout_p(dropout)
    if (
        rms_norm is None
        or dropout_p is None
        or not bypassable(norm)
        or len(norm.normalized_shape) != 1
        or getattr(norm, "dropout", 0.0)  # fastformer's norms drop their input when called
    ):
        if dropout is not None:
            x = dropout(x)
        h = x if residual is None else residual + x
        return norm(h), h
    if residual is not None and residual.dtype != x.dtype:
        # torch.nn adds in the promoted dtype (under autocast: a bfloat16 sub-layer output
        # onto the float32 stream) and normalizes that, so its output is float32 too.
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    return layer_norm_residual(
        x,
        residual,
        norm.weight,
        None if rms_norm else norm.bias,  # torch.nn.RMSNorm has no bias attribute
        eps=norm_eps(norm.eps, x.dtype),
        dropout_p=dropout_p,
        rms_norm=rms_norm,
    )


def check_layer_args(
    owner: str, dropout: object, batch_first: object, norm_first: object, bias: object
) -> None:
    """The Transformer layers' own arguments, checked when built (their submodules check
    theirs): TypeError / ValueError naming the argument."""
    _checks.check_probability(owner, "dropout", dropout)
    for name, flag in (("batch_first", batch_first), ("norm_first", norm_first), ("bias", bias)):
        _checks.check_bool(owner, name, flag)


def _fused_name(activation: object) -> str | None:
    """feed_forward's name for a layer's activation, or None for one it lacks."""
    if isinstance(activation, str):  # torch.nn's layers would fail to call it
        return None
    try:
        return activation_name(activation)
    except ValueError:
        return None


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
        self._named_activation: tuple[object, str | None] = (None, None)
        self._warn_if_unfused(stacklevel=4)

    @property
    def fused_activation(self) -> str | None:
        """feed_forward's name for self.activation (what torch.nn's layer runs), or None,
        and the feed-forward runs plain PyTorch, for an activation the fused op lacks or a
        module with hooks. Looked up again when another activation has been assigned."""
        activation = self.activation
        if isinstance(activation, torch.nn.Module) and not bypassable(activation):
            return None
        # .get: a layer pickled before this attribute existed has none.
        named, name = self.__dict__.get("_named_activation", (None, None))
        if activation is not named:
            # A tuple, not the module itself: an attribute holding a module would register
            # it as a child (a state_dict key).
            name = _fused_name(activation)
            self._named_activation = (activation, name)
        return name

    def _warn_if_unfused(self, stacklevel: int) -> None:
        if self.fused_activation is None:
            warnings.warn(
                f"{type(self).__name__}: activation {self.activation!r} has no fused "
                "kernel; this layer's feed-forward runs plain PyTorch (linear1, activation, "
                "dropout, linear2)",
                stacklevel=stacklevel,
            )

    def _ff(self, x: Tensor) -> Tensor:
        """linear2(dropout(activation(linear1(x)))): one fused op when the activation has a
        kernel and linear1 / dropout / linear2 are exactly torch.nn's, unhooked; otherwise
        the modules are called, as torch.nn's layer calls them."""
        activation = self.fused_activation
        dropout_p = fused_dropout_p(self.dropout)
        linear1, linear2 = self.linear1, self.linear2
        if (
            activation is None
            or dropout_p is None
            or type(linear1) is not torch.nn.Linear
            or type(linear2) is not torch.nn.Linear
            or not bypassable(linear1)
            or not bypassable(linear2)
        ):
            return linear2(self.dropout(self.activation(linear1(x))))
        return feed_forward(
            x,
            linear1.weight,
            linear1.bias,
            linear2.weight,
            linear2.bias,
            activation=activation,
            dropout_p=dropout_p,
        )

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> Self:
        """This layer on `module`'s (a torch.nn TransformerEncoderLayer or
        TransformerDecoderLayer) own submodules and Parameters (shared, not copied), running
        the activation `module` runs."""
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
        if "activation" in module.__dict__:
            # What torch's layer runs is its attribute. For the decoder layers torch deep-
            # copies (torch.nn.Transformer, TransformerDecoder), TransformerDecoderLayer's
            # __setstate__ puts F.relu in the instance dict while an activation module stays
            # a child: the function runs, the module keeps its state_dict keys. Same here
            # (assigning through setattr would refuse a function over a child module).
            new.__dict__["activation"] = module.__dict__["activation"]
        new._warn_if_unfused(stacklevel=3)
        return new

    def _copy_children(self, module: torch.nn.Module) -> None:
        """Take `module`'s submodules (the same objects; torch.nn's MultiheadAttention,
        LayerNorm and RMSNorm become fastformer's, sharing their Parameters) and training
        flag."""
        for name, child in module._modules.items():
            convert_child = _CHILD_CONVERTERS.get(type(child))
            setattr(self, name, child if convert_child is None else convert_child(child))
            # In `module`'s order, for the same state_dict key order (an activation module
            # is registered last in torch's encoder layer, with the feed-forward here).
            self._modules[name] = self._modules.pop(name)
        self.training = module.training


# torch.nn class -> fastformer's from_torch, for the children from_torch converts.
_CHILD_CONVERTERS: dict[type, Callable[[Any], torch.nn.Module]] = {
    torch.nn.MultiheadAttention: MultiheadAttention.from_torch,
    torch.nn.LayerNorm: LayerNorm.from_torch,
    torch.nn.RMSNorm: RMSNorm.from_torch,
}


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
        check_layer_args(type(self).__name__, dropout, batch_first, norm_first, bias)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self._init_feed_forward(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        _checks.check_eps(type(self).__name__, "layer_norm_eps", layer_norm_eps)
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
            x, h = self._pre_norm(src, None, None, src_mask, src_key_padding_mask, is_causal)
            return h + self.dropout2(x)
        sa = self._sa(src, src_mask, src_key_padding_mask, is_causal)
        x, _ = add_norm(self.norm1, sa, src, self.dropout1)
        x, _ = add_norm(self.norm2, self._ff(x), x, self.dropout2)
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
        dropout: torch.nn.Module | None,
        mask: Tensor | None,
        padding: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        """The pre-norm layer on the stream h = residual + dropout(x) (the previous layer's
        dropout2, or None): returns (ff, h) with the layer's output h + dropout2(ff) left
        for the caller to add (fused into the next norm in a stack)."""
        a, h = add_norm(self.norm1, x, residual, dropout)
        b, h = add_norm(self.norm2, self._sa(a, mask, padding, is_causal), h, self.dropout1)
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
        check_layer_args(type(self).__name__, dropout, batch_first, norm_first, bias)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self._init_feed_forward(d_model, dim_feedforward, dropout, activation, bias, factory)
        self.norm_first = norm_first
        _checks.check_eps(type(self).__name__, "layer_norm_eps", layer_norm_eps)
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
            x, h = self._pre_norm(tgt, None, None, memory, *masks)
            return h + self.dropout3(x)
        sa = self._sa(tgt, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x, _ = add_norm(self.norm1, sa, tgt, self.dropout1)
        mha = self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x, _ = add_norm(self.norm2, mha, x, self.dropout2)
        x, _ = add_norm(self.norm3, self._ff(x), x, self.dropout3)
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
        dropout: torch.nn.Module | None,
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
        a, h = add_norm(self.norm1, x, residual, dropout)
        sa = self._sa(a, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        b, h = add_norm(self.norm2, sa, h, self.dropout1)
        mha = self._mha(b, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        c, h = add_norm(self.norm3, mha, h, self.dropout2)
        return self._ff(c), h
