"""torch.nn's Transformer modules on fastformer's fused ops.

TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and
Transformer take torch.nn's constructor and forward arguments and have its state_dict keys,
so `fast.load_state_dict(torch_model.state_dict())` gives torch.nn's outputs and gradients.
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

import copy
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
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

Activation = str | Callable[[Tensor], Tensor]
_NAMED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def _generate_square_subsequent_mask(
    sz: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(sz, sz) float mask: 0 on and below the diagonal, -inf above (torch.nn's)."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), 1)


def _detect_is_causal_mask(mask: Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch.nn's rule: an explicit hint wins; with None, a mask equal to the causal mask
    (float -inf above the diagonal, or boolean True there) counts as causal."""
    if is_causal is not None or mask is None:
        return bool(is_causal)
    if tuple(mask.shape) != (size, size):
        return False
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, causal))
    return bool(torch.equal(mask, _generate_square_subsequent_mask(size, mask.device, mask.dtype)))


def _seq_len(x: Tensor, batch_first: bool) -> int:
    return x.shape[1] if batch_first and x.dim() == 3 else x.shape[0]


def _add_norm(
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
        x, _ = _add_norm(
            self.norm1,
            self._sa(src, src_mask, src_key_padding_mask, is_causal),
            src,
            self.dropout1.p,
            self.training,
        )
        x, _ = _add_norm(self.norm2, self._ff(x), x, self.dropout2.p, self.training)
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
        a, h = _add_norm(self.norm1, x, residual, dropout_p, self.training)
        b, h = _add_norm(
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
        x, _ = _add_norm(self.norm1, sa, tgt, self.dropout1.p, training)
        mha = self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x, _ = _add_norm(self.norm2, mha, x, self.dropout2.p, training)
        x, _ = _add_norm(self.norm3, self._ff(x), x, self.dropout3.p, training)
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
        a, h = _add_norm(self.norm1, x, residual, dropout_p, training)
        sa = self._sa(a, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        b, h = _add_norm(self.norm2, sa, h, self.dropout1.p, training)
        mha = self._mha(b, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        c, h = _add_norm(self.norm3, mha, h, self.dropout2.p, training)
        return self._ff(c), h


def _get_clones(module: torch.nn.Module, n: int) -> torch.nn.ModuleList:
    return torch.nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _streams(layers: torch.nn.ModuleList, layer_type: type) -> bool:
    """Whether a stack can carry the pre-norm stream from layer to layer: every layer is
    fastformer's, pre-norm, without hooks (its forward would be bypassed)."""
    return (
        len(layers) > 0
        and all(
            type(layer) is layer_type and layer.norm_first and not has_hooks(layer)
            for layer in layers
        )
        and not torch.nn.modules.module._global_forward_hooks
        and not torch.nn.modules.module._global_forward_pre_hooks
    )


def _finish_stream(
    x: Tensor, h: Tensor, dropout_p: float, norm: torch.nn.Module | None, training: bool
) -> Tensor:
    """The stack's output from the last layer's (ff, h): norm(h + dropout(ff)), fused when
    the norm is fastformer's LayerNorm."""
    if type(norm) is LayerNorm and not has_hooks(norm):
        return _add_norm(norm, x, h, dropout_p, training)[0]
    out = h + F.dropout(x, dropout_p, training)
    return out if norm is None else norm(out)


class TransformerEncoder(torch.nn.Module):
    """torch.nn.TransformerEncoder: num_layers deep copies of encoder_layer, then `norm`.

    Same arguments and state_dict keys as torch.nn's. enable_nested_tensor and mask_check
    only steer torch's NestedTensor inference fast path, which has no counterpart here:
    they are accepted and stored, and ignored (use_nested_tensor is always False). A stack
    of fastformer pre-norm layers fuses each layer's last residual add into the next
    layer's first norm (and the last one into `norm`).
    """

    def __init__(
        self,
        encoder_layer: torch.nn.Module,
        num_layers: int,
        norm: torch.nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False
        self.mask_check = mask_check

    @classmethod
    def from_torch(cls, module: torch.nn.TransformerEncoder) -> TransformerEncoder:
        """This stack on `module`'s own layers and norm (shared, not copied)."""
        new = cls(torch.nn.Identity(), 0, module.norm, module.enable_nested_tensor)
        new.mask_check = getattr(module, "mask_check", True)
        new.layers, new.num_layers = module.layers, module.num_layers
        new.training = module.training
        return new

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """torch.nn.TransformerEncoder.forward: is_causal=None detects a causal `mask`."""
        first = self.layers[0] if len(self.layers) else None
        batch_first = bool(first is not None and first.self_attn.batch_first)
        is_causal = _detect_is_causal_mask(mask, is_causal, _seq_len(src, batch_first))
        if _streams(self.layers, TransformerEncoderLayer):
            x, h, dropout_p = src, None, 0.0
            for layer in self.layers:
                x, h = layer._pre_norm(x, h, dropout_p, mask, src_key_padding_mask, is_causal)
                dropout_p = layer.dropout2.p
            return _finish_stream(x, h, dropout_p, self.norm, self.training)
        output = src
        for layer in self.layers:
            output = layer(
                output,
                src_mask=mask,
                is_causal=is_causal,
                src_key_padding_mask=src_key_padding_mask,
            )
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(torch.nn.Module):
    """torch.nn.TransformerDecoder: num_layers deep copies of decoder_layer, then `norm`.

    Same arguments and state_dict keys as torch.nn's; pre-norm stacks fuse across layers
    as TransformerEncoder's do.
    """

    def __init__(
        self, decoder_layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    @classmethod
    def from_torch(cls, module: torch.nn.TransformerDecoder) -> TransformerDecoder:
        """This stack on `module`'s own layers and norm (shared, not copied)."""
        new = cls(torch.nn.Identity(), 0, module.norm)
        new.layers, new.num_layers = module.layers, module.num_layers
        new.training = module.training
        return new

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """torch.nn.TransformerDecoder.forward: tgt_is_causal=None detects a causal tgt_mask."""
        first = self.layers[0] if len(self.layers) else None
        batch_first = bool(first is not None and first.self_attn.batch_first)
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        masks = (
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
        )
        if _streams(self.layers, TransformerDecoderLayer):
            x, h, dropout_p = tgt, None, 0.0
            for layer in self.layers:
                x, h = layer._pre_norm(x, h, dropout_p, memory, *masks)
                dropout_p = layer.dropout3.p
            return _finish_stream(x, h, dropout_p, self.norm, self.training)
        output = tgt
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        return output if self.norm is None else self.norm(output)


class Transformer(torch.nn.Module):
    """torch.nn.Transformer: an encoder-decoder built from fastformer's layers and stacks.

    Same constructor and forward arguments, state_dict keys and initialization (xavier
    uniform on every matrix, custom encoders and decoders included, as torch.nn does).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        custom_encoder: Any | None = None,
        custom_decoder: Any | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        layer_args = (
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
        )
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(*layer_args, **factory),
                num_encoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory),
            )
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(*layer_args, **factory),
                num_decoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory),
            )
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    @classmethod
    def from_torch(cls, module: torch.nn.Transformer) -> Transformer:
        """This model on `module`'s own encoder and decoder (shared, not copied, and not
        re-initialized)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.encoder, new.decoder = module.encoder, module.decoder
        new.d_model, new.nhead, new.batch_first = module.d_model, module.nhead, module.batch_first
        new.training = module.training
        return new

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """torch.nn.Transformer.forward: src (S, N, E), tgt (T, N, E) (batch first with
        batch_first); returns (T, N, E)."""
        batch_dim = 0 if self.batch_first else 1
        if src.dim() == 3 and src.size(batch_dim) != tgt.size(batch_dim):
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(
            src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
        )
        return self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )

    @staticmethod
    def generate_square_subsequent_mask(
        sz: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """(sz, sz) causal mask: float -inf above the diagonal, 0 elsewhere (torch.nn's)."""
        return _generate_square_subsequent_mask(sz, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)
