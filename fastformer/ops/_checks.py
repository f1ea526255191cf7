"""Argument checks shared by the ops: each error names the argument, what was expected and
what was given."""

from __future__ import annotations

import math
import numbers
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


def real_number(op: str, name: str, value: object, expected: str) -> float:
    """value as a float: an int, a float, a numpy scalar (any numbers.Real) or a 0-d tensor
    without gradient. Under torch.compile a symbolic number passes as it is (comparisons
    with it become guards)."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value  # type: ignore[return-value]
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        beyond = "an int beyond float's range"
        raise ValueError(f"{op}: {name} must be {expected}, got {beyond}") from None


def check_probability(op: str, name: str, value: object, *, allow_one: bool = False) -> float:
    """A dropout probability: a real number in [0, 1) ([0, 1] with allow_one)."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    value = real_number(op, name, value, f"a float in {interval}")
    if not (value >= 0.0 and (value <= 1.0 if allow_one else value < 1.0)):  # rejects NaN
        raise ValueError(f"{op}: {name} must be in {interval}, got {value}")
    return value


def check_positive(op: str, name: str, value: object) -> float:
    """A strictly positive, finite real number (softcap, a module's eps)."""
    value = real_number(op, name, value, "a positive float")
    if not (0.0 < value < math.inf):  # rejects NaN
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_eps(op: str, name: str, value: object) -> float:
    """A normalization's epsilon: finite and >= 0 (0 is allowed, as torch allows it)."""
    value = real_number(op, name, value, "a float >= 0")
    if not (0.0 <= value < math.inf):  # rejects NaN
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value}")
    return value


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
