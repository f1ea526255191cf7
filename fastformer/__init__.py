"""fastformer: fused Triton and C++/CUDA kernels for PyTorch Transformers."""

from . import backend, models, nn, reference
from ._extension import ExtensionNotBuiltError
from .backend import empty_cpu_cache, info, set_triton_on_cpu, triton_on_cpu
from .integrations import enable_transformers, patch_sdpa, unpatch_sdpa
from .nn import convert
from .ops import feed_forward, flash_attn_func, layer_norm_residual, scaled_dot_product_attention

backend._apply_environment()

__all__ = [
    "ExtensionNotBuiltError",
    "convert",
    "empty_cpu_cache",
    "enable_transformers",
    "feed_forward",
    "flash_attn_func",
    "info",
    "layer_norm_residual",
    "models",
    "nn",
    "patch_sdpa",
    "reference",
    "scaled_dot_product_attention",
    "set_triton_on_cpu",
    "triton_on_cpu",
    "unpatch_sdpa",
]
