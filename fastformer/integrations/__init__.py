"""Ways to swap fastformer in: SDPA patching and Hugging Face transformers registration."""

from .sdpa import patch_sdpa, unpatch_sdpa
from .transformers import enable_transformers

__all__ = ["enable_transformers", "patch_sdpa", "unpatch_sdpa"]
