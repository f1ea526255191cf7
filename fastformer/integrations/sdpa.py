"""Route every call of torch.nn.functional.scaled_dot_product_attention to fastformer.

torch.nn.MultiheadAttention, torch.nn.Transformer layers (need_weights=False) and Hugging
Face models with attn_implementation="sdpa" look the function up on torch.nn.functional at
call time, so replacing that attribute reaches them all. Calls fastformer's kernels do not
support go to torch's own function, counted by fastformer.info().
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

from ..ops.attention import scaled_dot_product_attention, torch_sdpa


class SdpaPatch:
    """Returned by patch_sdpa(); as a context manager it restores, on exit, the function
    that was in place before (so nested and global patches compose)."""

    def __init__(self, previous: Callable) -> None:
        self.previous = previous

    def __enter__(self) -> SdpaPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        F.scaled_dot_product_attention = self.previous


def patch_sdpa() -> SdpaPatch:
    """Make torch.nn.functional.scaled_dot_product_attention run fastformer's attention,
    for the whole process, or for a block: `with fastformer.patch_sdpa(): ...`."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    return SdpaPatch(previous)


def unpatch_sdpa() -> None:
    """Restore torch's own scaled_dot_product_attention."""
    F.scaled_dot_product_attention = torch_sdpa


def is_patched() -> bool:
    return F.scaled_dot_product_attention is scaled_dot_product_attention
