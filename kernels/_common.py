"""Helpers shared by the Triton launchers: output allocation, device properties, and the
serialization of launches that share state across threads."""

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
# Launches that share state across threads take this lock. Triton's interpreter keeps the
# running grid and program id, and its patches of triton.language, in process-wide state;
# Triton's Autotuner keeps each call's arguments in an attribute of the shared kernel object
# (Autotuner.nargs, set at the start of a call and reset to None at its end), so two threads
# launching one autotuned kernel at once can prune with each other's arguments or fail on
# None. Launches are Python-bound under the GIL anyway: the lock costs them next to nothing.
_LAUNCH_LOCK = threading.RLock()


def serialized(launcher: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher of autotuned kernels: one thread runs it at a time, compiled or
    interpreted."""

    @functools.wraps(launcher)
    def locked_launcher(*args: P.args, **kwargs: P.kwargs) -> R:
        with _LAUNCH_LOCK:
            return launcher(*args, **kwargs)

    return locked_launcher


def serialized_when_interpreting(launcher: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher of plain (not autotuned) kernels: under TRITON_INTERPRET=1 one
    thread runs at a time; compiled launches of such kernels share no state."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return launcher
    return serialized(launcher)


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
