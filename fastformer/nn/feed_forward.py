"""fastformer.nn.FeedForward: Linear, activation, dropout, Linear as one fused op."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import _checks, feed_forward
from ..ops.feed_forward import ACTIVATIONS

__all__ = ["FeedForward", "activation_name"]


# torch.nn's activation callables and modules, by the name feed_forward knows them by.
_TORCH_ACTIVATIONS: dict[object, str] = {
    torch.nn.functional.relu: "relu",
    torch.nn.functional.gelu: "gelu",
    torch.nn.functional.silu: "silu",
}


def activation_name(activation: object) -> str:
    """The feed_forward name of an activation given as torch.nn layers take it: a name
    ("relu", "gelu", ...), F.relu / F.gelu / F.silu, or an nn.ReLU / nn.GELU / nn.SiLU module.
    Raises ValueError for anything else: a custom callable has no fused kernel, and a
    subclass of those modules may compute something else (exact types only)."""
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return activation
    kind = type(activation)
    if kind is torch.nn.ReLU:
        return "relu"
    if kind is torch.nn.GELU:
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if kind is torch.nn.SiLU:
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
        for name, size in (("d_model", d_model), ("dim_feedforward", dim_feedforward)):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"FeedForward: {name} must be an int, got {type(size).__name__}")
            if size < 0:
                raise ValueError(f"FeedForward: {name} must be >= 0, got {size}")
        _checks.check_bool("FeedForward", "bias", bias)
        self.activation = activation_name(activation)
        self.dropout = _checks.check_probability("FeedForward", "dropout", dropout)
        self.recompute = _checks.check_bool("FeedForward", "recompute", recompute)
        gate_factor = 2 if self.activation in ("swiglu", "geglu") else 1
        factory = {"device": device, "dtype": dtype}
        self.linear1 = torch.nn.Linear(d_model, gate_factor * dim_feedforward, bias, **factory)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model, bias, **factory)

    @classmethod
    def from_transformer_layer(
        cls, layer: torch.nn.TransformerEncoderLayer | torch.nn.TransformerDecoderLayer
    ) -> FeedForward:
        """The feed-forward of a torch.nn Transformer layer, sharing its linear1 / linear2
        parameters (not copies) and taking its activation, dropout probability and training
        mode."""
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
        module.training = layer.training
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
