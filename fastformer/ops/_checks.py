"""Argument checks shared by the ops: each error names the argument, what was expected and
what was given."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str, name: str, value: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(
            f"{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {value.dtype}"
        )
    return value


def check_optional_tensor(
    op: str, name: str, value: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
) -> Tensor | None:
    return None if value is None else check_tensor(op, name, value, dtypes)


def check_same_device(op: str, reference_name: str, reference: Tensor, **others: Tensor | None):
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{op}: {name} must be on the same device as {reference_name} "
                f"({reference.device}), got {tensor.device}"
            )


def check_shape(op: str, name: str, tensor: Tensor | None, expected: Sequence[int]) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(tensor.shape)}")


def check_probability(op: str, name: str, value: object) -> float:
    """A dropout probability: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{op}: {name} must be in [0, 1), got {value}")
    return float(value)


def check_positive(op: str, name: str, value: object) -> float:
    """A strictly positive, finite real number (eps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a positive float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return float(value)


def check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def as_rows(tensor: Tensor, features: int) -> Tensor:
    """View a (..., features) tensor as 2-D rows with unit column stride; copies only when
    no such view exists (for example a transposed input)."""
    rows = tensor.reshape(-1, features)
    if rows.stride(-1) == 1:
        return rows
    # Not .contiguous(): it keeps odd strides on empty and size-1 dimensions.
    return rows.new_empty(rows.shape).copy_(rows)


def no_double_backward(op: str) -> tuple:
    """The autograd formula of an op's backward, (backward, setup_context): gradients of
    gradients are not supported, and saying so beats autograd's default for such ops (outputs
    that silently carry no gradient). Register it for the backward op:
    backward, setup = no_double_backward(op)
    torch.library.register_autograd(bwd_op, backward, setup_context=setup)."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (gradients of gradients, create_graph=True) is not supported"
        )

    def setup_context(ctx, inputs, output) -> None:
        pass

    return backward, setup_context
