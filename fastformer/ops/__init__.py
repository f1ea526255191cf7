"""One module per op: registration with torch.library, autograd, fake kernel, checks."""

from .layer_norm_residual import layer_norm_residual

__all__ = ["layer_norm_residual"]
