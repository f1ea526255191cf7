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

from torch import Tensor

__all__ = ["DecoderCache", "KVCache", "LayerCache"]


class KVCache:
    """Self-attention keys and values of one layer, filled position by position.

    The buffers are allocated at the first append, in the dtype and on the device of the
    keys given (under autocast, the projections' dtype rather than the parameters').
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.key: Tensor | None = None  # (B, H, capacity, Dh)
        self.value: Tensor | None = None
        self.length = 0  # positions filled so far

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store key, value (B, H, L, Dh) at the next L positions; return the keys and values
        of every position so far, (B, H, length, Dh) views of the buffers."""
        start, end = self.length, self.length + key.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity of {self.capacity}")
        if self.key is None or self.value is None:
            batch, heads, _, head_dim = key.shape
            self.key = key.new_empty(batch, heads, self.capacity, head_dim)
            self.value = value.new_empty(batch, heads, self.capacity, value.shape[-1])
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
