"""Which implementation runs an op for a device and dtype, and fastformer.info().

- CUDA tensors run the Triton kernels (fp16, bf16, fp32), or for an op written in C++/CUDA
  (feed_forward) the CUDA kernels of fastformer._C, when it was built with CUDA.
- CPU tensors run the C++ kernels of fastformer._C.
- With TRITON_INTERPRET=1 set before fastformer is imported, `use_triton_on_cpu()` (or
  FASTFORMER_CPU_BACKEND=triton at import) makes CPU tensors run the Triton kernels through
  Triton's interpreter instead: slow, but it is how CI tests the GPU kernels without a GPU.
- Anything else (another device, float64 on CUDA...) falls back to plain PyTorch
  (fastformer/reference.py): counted, reported by info(), and warned about once per op.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import _extension

TRITON = "triton"
TRITON_INTERPRETER = "triton (interpreter)"
CPP = "c++"
CUDA_CPP = "c++/cuda"
TORCH_FALLBACK = "torch (fallback)"

CPU_BACKEND_ENV = "FASTFORMER_CPU_BACKEND"


@dataclass
class OpSupport:
    """What the fast implementations of one op accept."""

    cuda_dtypes: tuple[torch.dtype, ...]
    cpu_dtypes: tuple[torch.dtype, ...]
    # what runs CUDA tensors of cuda_dtypes: the Triton kernels, or the extension's CUDA ones
    cuda_implementation: str = TRITON
    # dispatcher op name -> "module:function" of its Triton launcher, which takes the op's
    # arguments in schema order; registered for CUDA (and CPU on demand), imported on first
    # call so that importing fastformer does not import Triton.
    triton_kernels: dict[str, str] = field(default_factory=dict)


def _lazy_kernel(path: str) -> Callable:
    module_name, function_name = path.split(":")
    launcher: Callable | None = None

    def kernel(*args):
        nonlocal launcher
        if launcher is None:
            launcher = getattr(importlib.import_module(module_name), function_name)
        return tuple(launcher(*args))  # the dispatcher wants a plain tuple

    kernel.__name__ = function_name
    return kernel


_ops: dict[str, OpSupport] = {}
_cuda_library: torch.library.Library | None = None
_cpu_triton_library: torch.library.Library | None = None
fallback_counts: Counter[str] = Counter()
_warned: set[str] = set()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def register_op(name: str, support: OpSupport) -> None:
    """Called by each ops/<op>.py at import: record what it supports, and register its
    Triton kernels as the CUDA implementation of its dispatcher ops."""
    global _cuda_library
    _ops[name] = support
    if not _extension.available or not support.triton_kernels:
        return  # Python-defined ops (torch.library.custom_op) carry their own kernels
    if _cuda_library is None:
        _cuda_library = torch.library.Library("fastformer", "IMPL")
    for op_name, path in support.triton_kernels.items():
        _cuda_library.impl(op_name, _lazy_kernel(path), "CUDA")
    if _cpu_triton_library is not None:
        _cpu_triton_library_register(support)


def _cpu_triton_library_register(support: OpSupport) -> None:
    assert _cpu_triton_library is not None
    with warnings.catch_warnings():
        # Replacing the C++ CPU kernel is the point here; the dispatcher warns about it.
        warnings.simplefilter("ignore", UserWarning)
        for op_name, path in support.triton_kernels.items():
            _cpu_triton_library.impl(op_name, _lazy_kernel(path), "CPU")


def cpu_runs_triton() -> bool:
    return _cpu_triton_library is not None


def set_triton_on_cpu(enabled: bool) -> None:
    """Make CPU tensors run the Triton kernels through the interpreter (or stop doing so)."""
    global _cpu_triton_library
    if enabled == cpu_runs_triton():
        return
    if not enabled:
        assert _cpu_triton_library is not None
        _cpu_triton_library._destroy()  # the C++ kernels registered beneath become active again
        _cpu_triton_library = None
        return
    if not triton_interpreter_enabled():
        raise RuntimeError(
            "Triton kernels run on CPU tensors only through Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing fastformer"
        )
    _cpu_triton_library = torch.library.Library("fastformer", "IMPL")
    if _extension.available:  # without it, only the Python-defined ops run (they need no switch)
        for support in _ops.values():
            _cpu_triton_library_register(support)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Context manager form of set_triton_on_cpu."""
    previous = cpu_runs_triton()
    set_triton_on_cpu(enabled)
    try:
        yield
    finally:
        set_triton_on_cpu(previous)


def _cuda_ready(op: str, support: OpSupport) -> bool:
    """Whether the CUDA implementation of `op` can run: Triton is installed, or the extension
    was built with the op's CUDA kernels (a build without nvcc has only the CPU ones)."""
    if support.cuda_implementation == TRITON:
        return triton_available()
    return _extension.available and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastformer::{op}_fwd", "CUDA"
    )


def implementation(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation `op` runs for tensors of this device and dtype."""
    support = _ops[op]
    uses_triton = support.cuda_implementation == TRITON
    if device.type == "cuda" and dtype in support.cuda_dtypes and _cuda_ready(op, support):
        return support.cuda_implementation
    if device.type == "cpu" and cpu_runs_triton() and uses_triton:
        # Triton's interpreter computes bfloat16 dots and casts wrongly (triton 3.9): bf16
        # falls back rather than return garbage.
        interpretable = dtype in support.cuda_dtypes and dtype != torch.bfloat16
        return TRITON_INTERPRETER if interpretable else TORCH_FALLBACK
    if device.type == "cpu" and dtype in support.cpu_dtypes:
        return CPP
    return TORCH_FALLBACK


def fallback_reason(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why a call of `op` on tensors of this device and dtype must run plain PyTorch; "" when
    fastformer's kernels can take it. Besides dtypes and devices without a kernel: inside a
    torch.func transform (grad, vmap, ...), which the ops do not support (the C++ autograd of
    the ops defined in C++, csrc/autograd.cpp, raises under one)."""
    if implementation(op, device, dtype) == TORCH_FALLBACK:
        return f"no fused kernel for {dtype} tensors on {device.type}"
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform (grad, vmap, ...), which the fused ops do not support"
    return ""


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel, called from the function that calls this, of the first
    frame outside fastformer: the user's call, however deep inside fastformer it warns."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1  # the caller's frame is warnings.warn's level 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def note_fallback(op: str, reason: str) -> None:
    """Count a call that runs plain PyTorch, and warn the first time for each op (pointing at
    the user's call of the op)."""
    if torch.compiler.is_compiling():
        return
    fallback_counts[op] += 1
    if op not in _warned:
        _warned.add(op)
        warnings.warn(
            f"fastformer.{op}: {reason}; running plain PyTorch instead (fastformer.info() "
            "counts these calls)",
            stacklevel=_caller_stacklevel(),
        )


def empty_cpu_cache() -> None:
    """Release the freed CPU output blocks fastformer keeps for reuse (see the README)."""
    _extension.require("empty_cpu_cache")
    torch.ops.fastformer.empty_cpu_cache()


def _cpu_cache_info() -> dict | None:
    if not _extension.available:
        return None
    cached_bytes, blocks, limit_bytes, reuses, fresh = torch.ops.fastformer.cpu_cache_stats()
    return {
        "cached_mib": cached_bytes / 2**20,
        "cached_blocks": blocks,
        "limit_mib": limit_bytes / 2**20,
        "reuses": reuses,
        "fresh_allocations": fresh,
    }


def _cpu_gemm() -> str | None:
    """The library of the CPU feed-forward's x @ W.T GEMMs ("mkl" or "onednn"), or what is
    wrong with FASTFORMER_CPU_GEMM."""
    if not _extension.available:
        return None
    try:
        return torch.ops.fastformer.cpu_gemm_library()
    except RuntimeError as error:
        return f"error: {str(error).splitlines()[0]}"


def _triton_autotune() -> bool | str | None:
    """Whether the attention kernels autotune their tiles on a GPU (FASTFORMER_AUTOTUNE), or
    what is wrong with the setting; None without the kernels."""
    try:
        from fastformer_kernels.attention import autotuning_enabled
    except ImportError:
        return None
    try:
        return autotuning_enabled()
    except ValueError as error:
        return f"error: {error}"


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def info() -> dict:
    """Versions, device, extension and Triton status, and each op's implementation."""
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {
        "versions": {
            "fastformer": _package_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
        "device": _device_name(),
        "extension": {"available": _extension.available, "error": _extension.load_error},
        "triton": {
            "installed": triton_version is not None,
            "gpu": torch.cuda.is_available() and triton_version is not None,
            "interpreter": triton_interpreter_enabled(),
            "runs_cpu_tensors": cpu_runs_triton(),
            "autotune": _triton_autotune(),
        },
        "ops": {
            op: {
                device.type: {
                    str(dtype).removeprefix("torch."): implementation(op, device, dtype)
                    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                }
                for device in devices
            }
            for op in sorted(_ops)
        },
        "fallback_calls": dict(fallback_counts),
        "cpu_output_cache": _cpu_cache_info(),
        "cpu_gemm": _cpu_gemm(),
    }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastformer")
    except PackageNotFoundError:
        return "unknown"


def _apply_environment() -> None:
    choice = os.environ.get(CPU_BACKEND_ENV, "").strip().lower()
    if choice in ("", "c++", "cpp"):
        return
    if choice != TRITON:
        raise ValueError(f"{CPU_BACKEND_ENV} must be 'cpp' or 'triton', got {choice!r}")
    set_triton_on_cpu(True)
