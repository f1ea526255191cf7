"""The decoder's KV cache for incremental decoding.

Decoding token t attends over the keys and values of tokens 0..t. Without a cache every
step recomputes them for the whole prefix; with one, each decoder layer keeps:

- its self-attention keys and values in buffers preallocated for `capacity` positions,
  (batch, heads, capacity, head_dim), into which each step writes only its new positions;
- its cross-attention keys and values, projected from the encoder output once, before the
  first step, instead of once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DecoderCache", "KVCache", "LayerCache"]


class KVCache:
    """Self-attention keys and values of one layer, filled position by position."""

    def __init__(
        self,
        batch: int,
        heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.key = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.value = torch.empty_like(self.key)
        self.length = 0  # positions filled so far

    @property
    def capacity(self) -> int:
        return self.key.shape[-2]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store key, value (B, H, L, Dh) at the next L positions; return the keys and values
        of every position so far, (B, H, length, Dh) views of the buffers."""
        start, end = self.length, self.length + key.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity of {self.capacity}")
        self.key[:, :, start:end] = key
        self.value[:, :, start:end] = value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]


@dataclass
class LayerCache:
    """What one decoder layer keeps between decoding steps."""

    self_attention: KVCache
    # (key, value) of the encoder output, (B, H, S, Dh) each: projected once per generate()
    cross_attention: tuple[Tensor, Tensor]


@dataclass
class DecoderCache:
    """Everything the decoder keeps between decoding steps, one entry per decoder layer."""

    layers: list[LayerCache]

    @property
    def length(self) -> int:
        """Decoder positions already processed: the position of the next token."""
        return self.layers[0].self_attention.length
