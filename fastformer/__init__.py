"""fastformer: fused Triton and C++/CUDA kernels for PyTorch Transformers."""

from . import backend, nn, reference
from ._extension import ExtensionNotBuiltError
from .backend import empty_cpu_cache, info, set_triton_on_cpu, triton_on_cpu
from .ops import layer_norm_residual

backend._apply_environment()

__all__ = [
    "ExtensionNotBuiltError",
    "empty_cpu_cache",
    "info",
    "layer_norm_residual",
    "nn",
    "reference",
    "set_triton_on_cpu",
    "triton_on_cpu",
]
