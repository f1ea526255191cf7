"""torch.nn's Transformer stacks and encoder-decoder on fastformer's layers.

TransformerEncoder, TransformerDecoder and Transformer take torch.nn's constructor and
forward arguments and have its state_dict keys. The layers, and how each sub-layer boundary
becomes one fused residual add + LayerNorm, are in transformer_layer.py; a stack of pre-norm
layers carries (sublayer output, h) from one layer into the next (and into the stack's final
norm), so no add runs on its own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _checks
from .norm import LayerNorm
from .transformer_layer import (
    Activation,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    add_norm,
    detect_is_causal_mask,
    has_hooks,
    sequence_length,
    square_subsequent_mask,
)

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


def _check_num_layers(owner: str, num_layers: object) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"{owner}: num_layers must be an int, got {type(num_layers).__name__}")
    if num_layers < 0:
        raise ValueError(f"{owner}: num_layers must be >= 0, got {num_layers}")


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
    x: Tensor, h: Tensor, dropout: torch.nn.Module, norm: torch.nn.Module | None
) -> Tensor:
    """The stack's output from the last layer's (ff, h) and dropout2 (dropout3 in a
    decoder): norm(h + dropout(ff)), fused as add_norm can."""
    if norm is None:
        return h + dropout(x)
    return add_norm(norm, x, h, dropout)[0]


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
        _check_num_layers("TransformerEncoder", num_layers)
        _checks.check_bool("TransformerEncoder", "enable_nested_tensor", enable_nested_tensor)
        _checks.check_bool("TransformerEncoder", "mask_check", mask_check)
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
        is_causal = detect_is_causal_mask(mask, is_causal, sequence_length(src, batch_first))
        if _streams(self.layers, TransformerEncoderLayer):
            x, h, dropout = src, None, None
            for layer in self.layers:
                x, h = layer._pre_norm(x, h, dropout, mask, src_key_padding_mask, is_causal)
                dropout = layer.dropout2
            return _finish_stream(x, h, dropout, self.norm)
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
        _check_num_layers("TransformerDecoder", num_layers)
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
        tgt_is_causal = detect_is_causal_mask(
            tgt_mask, tgt_is_causal, sequence_length(tgt, batch_first)
        )
        masks = (
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
        )
        if _streams(self.layers, TransformerDecoderLayer):
            x, h, dropout = tgt, None, None
            for layer in self.layers:
                x, h = layer._pre_norm(x, h, dropout, memory, *masks)
                dropout = layer.dropout3
            return _finish_stream(x, h, dropout, self.norm)
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
        # The layers check the rest; batch_first is read here even with custom stacks.
        _checks.check_bool("Transformer", "batch_first", batch_first)
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
        return square_subsequent_mask(sz, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)
