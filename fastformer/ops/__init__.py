"""One module per op: registration with torch.library, autograd, fake kernel, checks."""

from .attention import flash_attn_func, scaled_dot_product_attention
from .feed_forward import feed_forward
from .layer_norm_residual import layer_norm_residual

__all__ = ["feed_forward", "flash_attn_func", "layer_norm_residual", "scaled_dot_product_attention"]
