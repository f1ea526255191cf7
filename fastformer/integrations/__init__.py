"""Ways to swap fastformer in: SDPA patching (and, later, Hugging Face registration)."""

from .sdpa import patch_sdpa, unpatch_sdpa

__all__ = ["patch_sdpa", "unpatch_sdpa"]
