"""Helpers shared by the Triton launchers: output allocation, device properties, and the
serialization of launches under Triton's interpreter."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

# Debug aid for tests: fill every output a launcher allocates with NaN (or the dtype's
# extreme value for integers) so that an element a kernel forgot to write is noticed.
POISON_ENV = "FASTFORMER_POISON_OUTPUTS"


P = ParamSpec("P")
R = TypeVar("R")
# Triton's interpreter keeps the running grid and program id, and its patches of
# triton.language, in process-wide state, so launches from two threads corrupt each other.
# While interpreting, launchers take this lock; compiled GPU launches need none.
_INTERPRETER_LOCK = threading.RLock()


def serialized_when_interpreting(launcher: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher so that, under TRITON_INTERPRET=1, one thread runs at a time."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return launcher

    @functools.wraps(launcher)
    def serialized(*args: P.args, **kwargs: P.kwargs) -> R:
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)

    return serialized


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, poisoned when FASTFORMER_POISON_OUTPUTS=1."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV, "0") == "1":
        tensor.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max)
    return tensor


def empty_absent(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The placeholder returned for an output the call did not ask for (numel 0)."""
    return torch.empty((0,), dtype=dtype, device=device)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def require_unit_column_stride(op: str, **tensors: torch.Tensor | None) -> None:
    """The kernels index columns with stride 1; say so instead of reading wrong elements."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{op}: {name} must have unit stride in its last dimension, got strides "
                f"{tuple(tensor.stride())}"
            )
