"""Modules built on fastformer's ops, drop-in replacements for their torch.nn namesakes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops import feed_forward, layer_norm_residual
from ..ops.feed_forward import ACTIVATIONS

__all__ = ["FeedForward", "LayerNorm", "RMSNorm", "activation_name"]

_ShapeArg = int | Sequence[int] | torch.Size


def _as_shape(normalized_shape: _ShapeArg) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


class _FusedNorm(torch.nn.Module):
    """Shared body of LayerNorm and RMSNorm: parameters as torch.nn's, fused forward."""

    rms_norm: bool = False

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float | None,
        elementwise_affine: bool,
        bias: bool,
        dropout: float,
        residual_in_fp32: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.dropout = dropout
        self.residual_in_fp32 = residual_in_fp32
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = (
                torch.nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
            )
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(
        self, input: Tensor, residual: Tensor | None = None, *, return_residual: bool | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Normalize dropout(input) + residual over the trailing normalized_shape dims.

        Returns out, or (out, h) with h = dropout(input) + residual when a residual is given
        (or return_residual=True): the residual stream a pre-norm block passes on.
        """
        dims = len(self.normalized_shape)
        if tuple(input.shape[-dims:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__}: input's trailing dimensions must be "
                f"{list(self.normalized_shape)}, got shape {list(input.shape)}"
            )
        # Several normalized dims are one feature dim of their product for the kernel.
        features = math.prod(self.normalized_shape)
        flat_shape = (*input.shape[: input.dim() - dims], features)
        eps = self.eps if self.eps is not None else torch.finfo(input.dtype).eps
        flat_input = input.reshape(flat_shape)
        out, h = layer_norm_residual(
            flat_input,
            None if residual is None else residual.reshape(flat_shape),
            None if self.weight is None else self.weight.reshape(features),
            None if self.bias is None else self.bias.reshape(features),
            eps=eps,
            dropout_p=self.dropout,
            rms_norm=self.rms_norm,
            residual_in_fp32=self.residual_in_fp32,
            training=self.training,
        )
        out = out.view(input.shape)
        if return_residual if return_residual is not None else residual is not None:
            # h is the input itself when there was nothing to add: hand back the same tensor.
            return out, (input if h is flat_input else h.view(input.shape))
        return out

    def extra_repr(self) -> str:
        extra = (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.residual_in_fp32:
            extra += ", residual_in_fp32=True"
        return extra


class LayerNorm(_FusedNorm):
    """torch.nn.LayerNorm with a fused kernel; forward also takes a residual to add first.

    Same constructor arguments and state_dict as torch.nn.LayerNorm. Two extras:
    `dropout` (applied to the input before the residual add, in training) and
    `residual_in_fp32` (keep the returned residual stream in float32).
    """

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dropout: float = 0.0,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps,
            elementwise_affine,
            bias,
            dropout,
            residual_in_fp32,
            device,
            dtype,
        )


class RMSNorm(_FusedNorm):
    """torch.nn.RMSNorm with a fused kernel; forward also takes a residual to add first.

    Same constructor arguments and state_dict as torch.nn.RMSNorm (eps=None means the
    input dtype's machine epsilon, as there), plus `dropout` and `residual_in_fp32`.
    """

    rms_norm = True

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dropout: float = 0.0,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps,
            elementwise_affine,
            False,
            dropout,
            residual_in_fp32,
            device,
            dtype,
        )


# torch.nn's activation callables and modules, by the name feed_forward knows them by.
_TORCH_ACTIVATIONS: dict[object, str] = {
    torch.nn.functional.relu: "relu",
    torch.nn.functional.gelu: "gelu",
    torch.nn.functional.silu: "silu",
}


def activation_name(activation: object) -> str:
    """The feed_forward name of an activation given as torch.nn layers take it: a name
    ("relu", "gelu", ...), F.relu / F.gelu / F.silu, or an nn.ReLU / nn.GELU / nn.SiLU module.
    Raises ValueError for anything else (a custom callable has no fused kernel)."""
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return activation
    if isinstance(activation, torch.nn.ReLU):
        return "relu"
    if isinstance(activation, torch.nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if isinstance(activation, torch.nn.SiLU):
        return "silu"
    try:
        return _TORCH_ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {list(ACTIVATIONS)}, F.relu/F.gelu/F.silu or "
            f"nn.ReLU/nn.GELU/nn.SiLU, got {activation!r}"
        ) from None


class FeedForward(torch.nn.Module):
    """Linear, activation, dropout, Linear in one fused op (fastformer.feed_forward).

    Parameters are torch.nn.Linear modules named linear1 and linear2, as in
    torch.nn.TransformerEncoderLayer / TransformerDecoderLayer, so their weights load
    directly (see from_transformer_layer). Gated activations ("swiglu", "geglu") give linear1
    2 * dim_feedforward outputs: the gate, then the up projection.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        activation: object = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.activation = activation_name(activation)
        self.dropout = dropout
        self.recompute = recompute
        gate_factor = 2 if self.activation in ("swiglu", "geglu") else 1
        factory = {"device": device, "dtype": dtype}
        self.linear1 = torch.nn.Linear(d_model, gate_factor * dim_feedforward, bias, **factory)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model, bias, **factory)

    @classmethod
    def from_transformer_layer(
        cls, layer: torch.nn.TransformerEncoderLayer | torch.nn.TransformerDecoderLayer
    ) -> FeedForward:
        """The feed-forward of a torch.nn Transformer layer, sharing its linear1 / linear2
        parameters (not copies) and taking its activation and dropout probability."""
        linear1, linear2 = layer.linear1, layer.linear2
        module = cls(
            linear1.in_features,
            linear1.out_features,
            activation=layer.activation,
            dropout=layer.dropout.p,
            bias=linear1.bias is not None,
            device=linear1.weight.device,
            dtype=linear1.weight.dtype,
        )
        module.linear1, module.linear2 = linear1, linear2
        return module

    def forward(self, x: Tensor) -> Tensor:
        return feed_forward(
            x,
            self.linear1.weight,
            self.linear1.bias,
            self.linear2.weight,
            self.linear2.bias,
            activation=self.activation,
            dropout_p=self.dropout,
            training=self.training,
            recompute=self.recompute,
        )

    def extra_repr(self) -> str:
        extra = f"activation={self.activation!r}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.recompute:
            extra += ", recompute=True"
        return extra
