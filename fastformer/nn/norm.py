"""fastformer.nn.LayerNorm and RMSNorm: torch.nn's norms on the fused residual + norm kernel."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from ..ops import _checks, layer_norm_residual

__all__ = ["LayerNorm", "RMSNorm", "norm_eps"]

_ShapeArg = int | Sequence[int] | torch.Size


def _as_shape(owner: str, normalized_shape: _ShapeArg) -> tuple[int, ...]:
    single = isinstance(normalized_shape, numbers.Integral)
    dims = (normalized_shape,) if single else tuple(normalized_shape)
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{owner}: normalized_shape must be ints, got {normalized_shape!r}")
    if not dims or any(d < 1 for d in dims):
        # The kernel normalizes rows of at least one element.
        raise ValueError(
            f"{owner}: normalized_shape must be sizes >= 1, got {list(map(int, dims))}"
        )
    return tuple(int(d) for d in dims)


def norm_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The eps a norm of `dtype` input applies: `eps`, or for None (torch.nn.RMSNorm's
    default) the machine epsilon of the dtype the statistics accumulate in, float32 for
    float16 / bfloat16 input. That is what torch computes (ATen's rms_norm takes its
    accumulation type's epsilon), although torch's docs name the input dtype's, which for
    bfloat16 is 65536 times larger."""
    return eps if eps is not None else torch.finfo(reference.accumulation_dtype(dtype)).eps


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
        name = type(self).__name__
        # Checked here, not first at the forward: a bad module should not be built at all.
        if eps is not None:
            _checks.check_eps(name, "eps", eps)
        _checks.check_probability(name, "dropout", dropout)
        for flag, value in (
            ("elementwise_affine", elementwise_affine),
            ("bias", bias),
            ("residual_in_fp32", residual_in_fp32),
        ):
            _checks.check_bool(name, flag, value)
        self.normalized_shape = _as_shape(name, normalized_shape)
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
        if residual is not None:
            # As the functional op does: a residual of another shape but as many elements
            # would reshape into a wrong sum.
            _checks.check_tensor(type(self).__name__, "residual", residual)
            _checks.check_shape(type(self).__name__, "residual", residual, input.shape)
        # Several normalized dims are one feature dim of their product for the kernel.
        features = math.prod(self.normalized_shape)
        flat_shape = (*input.shape[: input.dim() - dims], features)
        flat_input = input.reshape(flat_shape)
        out, h = layer_norm_residual(
            flat_input,
            None if residual is None else residual.reshape(flat_shape),
            None if self.weight is None else self.weight.reshape(features),
            None if self.bias is None else self.bias.reshape(features),
            eps=norm_eps(self.eps, input.dtype),
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

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A LayerNorm sharing `module`'s weight and bias Parameters (not copies)."""
        new = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device="meta",
        )
        new.weight, new.bias = module.weight, module.bias
        new.training = module.training
        return new


class RMSNorm(_FusedNorm):
    """torch.nn.RMSNorm with a fused kernel; forward also takes a residual to add first.

    Same constructor arguments and state_dict as torch.nn.RMSNorm, plus `dropout` and
    `residual_in_fp32`. eps=None computes what torch.nn.RMSNorm computes: the machine
    epsilon of the accumulation dtype (float32 for float16 / bfloat16 input; see norm_eps).
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

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> RMSNorm:
        """An RMSNorm sharing `module`'s weight Parameter (not a copy)."""
        new = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            device="meta",
        )
        new.weight = module.weight
        new.training = module.training
        return new
